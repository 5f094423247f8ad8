/* vmath.h — exp, the normal CDF and the smooth activations as branch-free plain C that GCC
 * vectorises inside NF_CLONES loops (AVX-512: 16 floats or 8 doubles per instruction).
 *
 * Why: libm's expf/erfcf are scalar calls GCC never vectorises without -ffast-math, which
 * normffn never uses (NaN and Inf must propagate).  These functions use only +, -, *, /,
 * comparisons turned into selects, and integer bit operations, so a loop over a row that calls
 * them (inlined) compiles to vector code; every ISA clone rounds identically (no FMA:
 * -ffp-contract=off), so results do not depend on the machine.
 *
 * Contract of each function.  Errors measured: the float exp over all 2^32 floats against
 * double exp (a C harness, once); the rest on dense samples against long double / scipy
 * references; tests/test_vmath.py re-checks every bound on samples, and the special values.
 *
 *   nf_vexp_f32(x)    e^x for float, in float arithmetic.  Cody-Waite reduction
 *                     x = k ln2 + r, |r| <= ln2/2 (k by the round-to-nearest shifter trick,
 *                     ln2 split in a 9-bit head and a tail so k*head is exact), Cephes' degree-7
 *                     minimax polynomial for e^r, then 2^k applied as two exponent-field scalings
 *                     2^k1 * 2^k2 (k1 + k2 = k), so results down to the smallest denormal are
 *                     rounded once.  Max error 0.990 ulp over all 2^32 floats (exhaustive).
 *                     x > 88.7228 -> +Inf, x < -103.97 -> +0, NaN -> NaN, +Inf -> +Inf,
 *                     -Inf -> +0, -0.0 -> 1.
 *   nf_vexp_f64(x)    e^x for double: the same reduction with ln2 split 32 + 53 bits (fdlibm's
 *                     split), e^r = 1 + (r + r^2 P(r)) with P of degree 9 fitted (weighted least
 *                     squares on Chebyshev nodes, fit error 1.3e-17 relative; no division), and the
 *                     same two-step 2^k.  Max error < 1 ulp (0.997 ulp over 12M samples,
 *                     denormal results included).  x > 709.78 -> +Inf, x < -745.13 -> +0,
 *                     specials as for float.
 *   nf_vphi_d(v, pdf) Phi(v) = erfc(-v / sqrt 2) / 2 in double, and *pdf = phi(v) =
 *                     e^(-v^2/2) / sqrt(2 pi); accurate enough for float arguments, not a
 *                     double-precision erfc.  Phi(-w) = e^(-w^2/2) E(w) / 2 with
 *                     E(w) = erfcx(w / sqrt 2) fitted by a degree-12 polynomial in
 *                     t = 1 / (1 + w/5) (weighted Chebyshev least squares on w in [0, 15],
 *                     max relative error 6.4e-11; w > 15 is evaluated at 15, where Phi(-w) <
 *                     4e-51 is far below float's range).  For float v, v^2/2 is exact in double,
 *                     so Phi and phi keep that relative accuracy in the whole tail (max relative
 *                     error of Phi measured 6.3e-11 over float v in [-15, 10]); v > 0 uses
 *                     1 - Phi(-v).  NaN -> NaN, -Inf -> 0, +Inf -> 1.
 *   nf_vgelu_f32      v Phi(v) and its derivative Phi(v) + v phi(v), computed in double from
 *                     nf_vphi_d and rounded once to float (so v Phi(v) stays accurate where
 *                     Phi(v) itself would be a float denormal, v < -13).
 *   nf_vgelu_f64      the same for double with libm erfc (a vectorisable double erfc accurate to
 *                     a few ulp is not written; the double path is not the performance target),
 *                     and nf_vexp_f64 for phi.
 * Typed, stamped from vmath_t.h (SUF = f32, f64), all on NF_T(nf_vexp):
 *   nf_vsilu_SUF      v s, s = 1 / (1 + e^-v); derivative s (1 + v (1 - s))
 *   nf_vgelu_tanh_SUF v s, s = sigmoid(2u), u = sqrt(2/pi) (v + 0.044715 v^3);
 *                     derivative s + 2 v s (1 - s) u', u' evaluated with |v| clamped to
 *                     1e15 (float) / 1e100 (double), where s (1 - s) is already 0: no Inf * 0
 *   These keep libm-based formulas' special values: silu(-Inf) = NaN (-Inf * 0), silu(+Inf) =
 *   +Inf, derivatives at +-Inf NaN, as PyTorch's formulas give.
 * Array forms (NF_CLONES, for tests and benchmarks): nf_vexp_array_f32/_f64, nf_vphi_array,
 * nf_vact_array_f32/_f64.
 */
#ifndef NORMFFN_VMATH_H
#define NORMFFN_VMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include "core.h"   /* nf_index, NF_CLONES, NF_INLINE, NF_T */

#define NF_SQRT1_2      0.70710678118654752440
#define NF_INV_SQRT_2PI 0.39894228040143267794
#define NF_SQRT_2_PI    0.79788456080286535588
#define NF_GELU_C       0.044715

/* ---------------------------------------------------------------- bit casts */

NF_INLINE uint32_t nf_f32_bits(float x) { uint32_t u; memcpy(&u, &x, sizeof u); return u; }
NF_INLINE float nf_bits_f32(uint32_t u) { float x; memcpy(&x, &u, sizeof x); return x; }
NF_INLINE uint64_t nf_f64_bits(double x) { uint64_t u; memcpy(&u, &x, sizeof u); return u; }
NF_INLINE double nf_bits_f64(uint64_t u) { double x; memcpy(&x, &u, sizeof x); return x; }

/* x with |x| clamped to the positive value whose bits are lim (sign kept, NaN and in-range
 * values unchanged).  Selects on integer comparisons: GCC if-converts and vectorises them for
 * AVX2 too, which it does not do for float comparisons feeding arithmetic under the default
 * -ftrapping-math. */
NF_INLINE float nf_clamp_abs_f32(float x, uint32_t lim)
{
    uint32_t b = nf_f32_bits(x), a = b & 0x7fffffffu;
    return nf_bits_f32(a > lim && a <= 0x7f800000u ? (b & 0x80000000u) | lim : b);
}

NF_INLINE double nf_clamp_abs_f64(double x, uint64_t lim)
{
    uint64_t b = nf_f64_bits(x), a = b & 0x7fffffffffffffffu;
    return nf_bits_f64(a > lim && a <= 0x7ff0000000000000u ? (b & 0x8000000000000000u) | lim : b);
}

/* ---------------------------------------------------------------- exp, float */

/* t = k + 1.5 * 2^23 holds the integer k in its low mantissa bits; (bits(t) + 127) << 23 is then
 * the float 2^k (the shift drops t's exponent bits), valid for -126 <= k <= 127. */
#define NF_SHIFT_F32 12582912.0f                 /* 0x1.8p23 */

NF_INLINE float nf_pow2_f32(float t) { return nf_bits_f32((nf_f32_bits(t) + 127u) << 23); }

NF_INLINE float nf_vexp_f32(float x)
{
    /* |x| <= 104, so |k| <= 151 (beyond, the result is 0 or Inf anyway). */
    x = nf_clamp_abs_f32(x, 0x42d00000u);                     /* 104 */
    float t = x * 1.44269504088896341f + NF_SHIFT_F32;       /* k + shift, k = rint(x/ln2) */
    float k = t - NF_SHIFT_F32;
    float r = x - k * 0.693359375f;                           /* exact: 9-bit head of ln2 */
    r = r - k * -2.12194440e-4f;                              /* ln2 - head */
    float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = (p * z + r) + 1.0f;                             /* e^r */
    /* 2^k = 2^k1 * 2^k2, k1 = rint(k/2): both factors are normal floats, and y * 2^k1 is
     * exact, so a denormal result is rounded once. */
    float t1 = k * 0.5f + NF_SHIFT_F32;
    float k1 = t1 - NF_SHIFT_F32;
    float t2 = (k - k1) + NF_SHIFT_F32;
    return (y * nf_pow2_f32(t1)) * nf_pow2_f32(t2);
}

/* ---------------------------------------------------------------- exp, double */

#define NF_SHIFT_F64 6755399441055744.0          /* 0x1.8p52 */

NF_INLINE double nf_pow2_f64(double t) { return nf_bits_f64((nf_f64_bits(t) + 1023u) << 52); }

NF_INLINE double nf_vexp_f64(double x)
{
    x = nf_clamp_abs_f64(x, 0x4087c00000000000u);             /* |x| <= 760, |k| <= 1097 */
    double t = x * 1.44269504088896338700e+00 + NF_SHIFT_F64;
    double k = t - NF_SHIFT_F64;
    double hi = x - k * 6.93147180369123816490e-01;           /* exact: 32-bit head of ln2 */
    double r = hi - k * 1.90821492927058770002e-10;           /* ln2 - head */
    double p = 2.502463332219875e-08;                         /* (e^r - 1 - r) / r^2 */
    p = p * r + 2.763115485562374e-07;
    p = p * r + 2.755750743856256e-06;
    p = p * r + 2.480149026903066e-05;
    p = p * r + 0.00019841269596823096;
    p = p * r + 0.00138888889467478;
    p = p * r + 0.0083333333334516223;
    p = p * r + 0.041666666666516083;
    p = p * r + 0.16666666666666483;
    p = p * r + 0.50000000000000122;
    double y = 1.0 + (r + (r * r) * p);                       /* e^r */
    double t1 = k * 0.5 + NF_SHIFT_F64;
    double k1 = t1 - NF_SHIFT_F64;
    double t2 = (k - k1) + NF_SHIFT_F64;
    return (y * nf_pow2_f64(t1)) * nf_pow2_f64(t2);
}

/* ---------------------------------------------------------------- normal CDF (float args) */

/* E(w) = erfcx(w / sqrt 2) ~ polynomial in s = A t + B, t = 1 / (1 + 0.2 w), t in [0.25, 1]
 * (w in [0, 15]) mapped to s in [-1, 1]. */
#define NF_PHI_C    0.2
#define NF_PHI_A    2.6666666666666665
#define NF_PHI_B    -1.6666666666666667

NF_INLINE double nf_vphi_d(double v, double *pdf)
{
    double w = nf_clamp_abs_f64(fabs(v), 0x402e000000000000u); /* min(|v|, 15), NaN kept */
    double t = 1.0 / (1.0 + NF_PHI_C * w);
    double s = t * NF_PHI_A + NF_PHI_B;
    double e = 3.3448843394809076e-07;
    e = e * s + 1.4995072632753986e-06;
    e = e * s - 3.7487549395194732e-06;
    e = e * s - 3.9365190284040444e-05;
    e = e * s - 4.8218352381719736e-05;
    e = e * s + 0.00064240315904602369;
    e = e * s + 0.0047391404913516471;
    e = e * s + 0.019048275345847472;
    e = e * s + 0.054987313117545303;
    e = e * s + 0.12362351891393797;
    e = e * s + 0.22377677131645216;
    e = e * s + 0.33024417929768191;
    e = e * s + 0.24302789672338151;
    double g = nf_vexp_f64(-0.5 * (v * v));                   /* e^(-v^2/2) */
    double q = 0.5 * (g * e);                                 /* Phi(-w) */
    *pdf = g * NF_INV_SQRT_2PI;
    return nf_f64_bits(v) >> 63 ? q : 1.0 - q;              /* -0.0 gives q = 1/2 too */
}

/* ---------------------------------------------------------------- GELU (erf) */

NF_INLINE float nf_vgelu_f32(float v, float *d)
{
    double vd = v, pdf;
    double p = nf_vphi_d(vd, &pdf);
    if (d) *d = (float)(p + vd * pdf);
    return (float)(vd * p);
}

NF_INLINE double nf_vgelu_f64(double v, double *d)
{
    double p = 0.5 * erfc(-v * NF_SQRT1_2);
    if (d) *d = p + v * (NF_INV_SQRT_2PI * nf_vexp_f64(-0.5 * v * v));
    return v * p;
}

/* ---------------------------------------------------------------- typed: silu, gelu_tanh */

/* |v| bound (bits) for gelu_tanh's u' = sqrt(2/pi) (1 + 3c v^2): 1e15 (float), 1e100 (double). */
#define NF_GT_VMAX_f32 0x58635fa9u
#define NF_GT_VMAX_f64 0x54b249ad2594c37du

#define T float
#define SUF f32
#include "vmath_t.h"
#undef T
#undef SUF

#define T double
#define SUF f64
#include "vmath_t.h"
#undef T
#undef SUF

/* ---------------------------------------------------------------- array forms (tests) */

#define NF_VMATH_ARRAY NF_CLONES __attribute__((unused)) static void

NF_VMATH_ARRAY nf_vexp_array_f32(float *restrict y, const float *restrict x, nf_index n)
{
    for (nf_index i = 0; i < n; i++) y[i] = nf_vexp_f32(x[i]);
}

NF_VMATH_ARRAY nf_vexp_array_f64(double *restrict y, const double *restrict x, nf_index n)
{
    for (nf_index i = 0; i < n; i++) y[i] = nf_vexp_f64(x[i]);
}

/* y = act(x), d = act'(x); act 1 gelu, 2 gelu_tanh, 3 silu (ffn_elementwise.h's codes). */
NF_VMATH_ARRAY nf_vact_array_f32(float *restrict y, float *restrict d, const float *restrict x,
                                 nf_index n, int act)
{
    if (act == 1)      for (nf_index i = 0; i < n; i++) y[i] = nf_vgelu_f32(x[i], &d[i]);
    else if (act == 2) for (nf_index i = 0; i < n; i++) y[i] = nf_vgelu_tanh_f32(x[i], &d[i]);
    else               for (nf_index i = 0; i < n; i++) y[i] = nf_vsilu_f32(x[i], &d[i]);
}

NF_VMATH_ARRAY nf_vact_array_f64(double *restrict y, double *restrict d,
                                 const double *restrict x, nf_index n, int act)
{
    if (act == 1)      for (nf_index i = 0; i < n; i++) y[i] = nf_vgelu_f64(x[i], &d[i]);
    else if (act == 2) for (nf_index i = 0; i < n; i++) y[i] = nf_vgelu_tanh_f64(x[i], &d[i]);
    else               for (nf_index i = 0; i < n; i++) y[i] = nf_vsilu_f64(x[i], &d[i]);
}

/* y = Phi(x), p = phi(x) (x float64 holding float values, or any double). */
NF_VMATH_ARRAY nf_vphi_array(double *restrict y, double *restrict p, const double *restrict x,
                             nf_index n)
{
    for (nf_index i = 0; i < n; i++) y[i] = nf_vphi_d(x[i], &p[i]);
}

#endif /* NORMFFN_VMATH_H */
