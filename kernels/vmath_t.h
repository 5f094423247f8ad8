/* vmath_t.h — silu and gelu_tanh on the vector exp, written once; vmath.h includes this file
 * twice, with T = float, SUF = f32 and T = double, SUF = f64.  No include guard, on purpose.
 * Contract and maths: vmath.h.  NF_T(name) expands to name_SUF.  *d = act'(v) when d != NULL
 * (callers pass a constant NULL or a pointer; inlined, the test disappears). */

/* 1 / (1 + e^-x): 0 for x < ~-88 (float) / -709 (double), 1 for large x, NaN for NaN. */
NF_INLINE T NF_T(nf_vsigmoid)(T x)
{
    return (T)1 / ((T)1 + NF_T(nf_vexp)(-x));
}

NF_INLINE T NF_T(nf_vsilu)(T v, T *d)
{
    T s = NF_T(nf_vsigmoid)(v);
    if (d) *d = s * ((T)1 + v * ((T)1 - s));
    return v * s;
}

/* v sigmoid(2u) = v/2 (1 + tanh u), without the cancellation of 1 + tanh u for v << 0. */
NF_INLINE T NF_T(nf_vgelu_tanh)(T v, T *d)
{
    T u = (T)NF_SQRT_2_PI * (v + (T)NF_GELU_C * v * v * v);
    T s = NF_T(nf_vsigmoid)((T)2 * u);
    if (d) {
        /* u' from |v| clamped to NF_GT_VMAX: v^2 would overflow, and where it is clamped
         * s (1 - s) is 0, so the derivative is s (NaN at +-Inf, as the reference). */
        T vc = NF_T(nf_clamp_abs)(v, NF_T(NF_GT_VMAX));
        T du = (T)NF_SQRT_2_PI * ((T)1 + (T)(3 * NF_GELU_C) * vc * vc);
        *d = s + (T)2 * v * (s * ((T)1 - s)) * du;
    }
    return v * s;
}
