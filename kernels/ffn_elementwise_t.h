/* ffn_elementwise_t.h — the FFN elementwise bodies, written once; ffn_elementwise.h includes this
 * file twice, with T = float, SUF = f32 and T = double, SUF = f64.  No include guard, on purpose.
 * Contract and maths: ffn_elementwise.h.  NF_T(name) expands to name_SUF. */

/* ---------------------------------------------------------------- one value
 * a = act(v) and, when d != NULL, *d = act'(v). */

NF_INLINE T NF_T(nf_gelu)(T v, T *d)
{
    T phi_cdf = (T)0.5 * NF_T(nf_erfc)(-v * (T)NF_SQRT1_2);
    if (d) *d = phi_cdf + v * ((T)NF_INV_SQRT_2PI * NF_T(nf_exp)((T)-0.5 * v * v));
    return v * phi_cdf;
}

NF_INLINE T NF_T(nf_gelu_tanh)(T v, T *d)
{
    T u = (T)NF_SQRT_2_PI * (v + (T)NF_GELU_C * v * v * v);
    T s = (T)1 / ((T)1 + NF_T(nf_exp)((T)-2 * u));
    if (d) {
        T du = (T)NF_SQRT_2_PI * ((T)1 + (T)(3 * NF_GELU_C) * v * v);
        *d = s + (T)2 * v * (s * ((T)1 - s)) * du;
    }
    return v * s;
}

NF_INLINE T NF_T(nf_silu)(T v, T *d)
{
    T s = (T)1 / ((T)1 + NF_T(nf_exp)(-v));
    if (d) *d = s * ((T)1 + v * ((T)1 - s));
    return v * s;
}

/* The smooth activations by code (NF_ACT_GELU, NF_ACT_GELU_TANH, NF_ACT_SILU). */
static inline T NF_T(nf_act)(int act, T v, T *d)
{
    if (act == NF_ACT_GELU) return NF_T(nf_gelu)(v, d);
    if (act == NF_ACT_GELU_TANH) return NF_T(nf_gelu_tanh)(v, d);
    return NF_T(nf_silu)(v, d);
}

/* ---------------------------------------------------------------- forward
 * z (m rows, ldz) holds the GEMM output x @ w1; v = z + b1 (b1 may be NULL).
 *   a == NULL: the activation replaces z (inference, recompute, and relu, whose saved hidden is
 *              the activation itself).
 *   a != NULL: z keeps v (the pre-activation backward needs) and a (lda) receives act(v).
 * dead != NULL: dead[j] &= (act(v)[:, j] == 0) — NaN counts as alive (ctx.dead_units). */

NF_CLONES static void NF_T(nf_ffn_relu_fwd)(T *z, nf_index ldz, const T *restrict b1,
                                            unsigned char *restrict dead, nf_index m,
                                            nf_index h)
{
    for (nf_index i = 0; i < m; i++) {
        T *restrict zi = z + i * ldz;
        if (b1) for (nf_index j = 0; j < h; j++) { T v = zi[j] + b1[j]; zi[j] = v < 0 ? 0 : v; }
        else    for (nf_index j = 0; j < h; j++) { T v = zi[j];         zi[j] = v < 0 ? 0 : v; }
        if (dead) for (nf_index j = 0; j < h; j++) dead[j] &= (zi[j] == 0);
    }
}

/* Any plain activation, one value at a time (the smooth ones call libm). */
static void NF_T(nf_ffn_plain_fwd)(T *z, nf_index ldz, T *a, nf_index lda, const T *b1,
                                   unsigned char *dead, nf_index m, nf_index h, int act)
{
    for (nf_index i = 0; i < m; i++) {
        T *zi = z + i * ldz;
        T *ai = a ? a + i * lda : zi;
        for (nf_index j = 0; j < h; j++) {
            T v = b1 ? zi[j] + b1[j] : zi[j];
            T y;
            if (act == NF_ACT_RELU) y = v < 0 ? 0 : v;
            else y = NF_T(nf_act)(act, v, NULL);
            if (a) zi[j] = v;
            ai[j] = y;
            if (dead) dead[j] &= (y == 0);
        }
    }
}

/* Gated: z rows are [gate | up] (2h wide), a rows h wide; a == NULL writes a over z's first h
 * columns (each row's gate and up are read before its a is written).  dead flags the gate. */
static void NF_T(nf_ffn_gated_fwd)(T *z, nf_index ldz, T *a, nf_index lda, const T *b1,
                                   unsigned char *dead, nf_index m, nf_index h, int act)
{
    int gate = act & ~NF_ACT_GATED;
    for (nf_index i = 0; i < m; i++) {
        T *zi = z + i * ldz;
        T *ai = a ? a + i * lda : zi;
        for (nf_index j = 0; j < h; j++) {
            T vg = b1 ? zi[j] + b1[j] : zi[j];
            T vu = b1 ? zi[h + j] + b1[h + j] : zi[h + j];
            T s = gate == NF_ACT_RELU ? (vg < 0 ? (T)0 : vg) : NF_T(nf_act)(gate, vg, NULL);
            if (a) { zi[j] = vg; zi[h + j] = vu; }
            ai[j] = s * vu;
            if (dead) dead[j] &= (s == 0);
        }
    }
}

static void NF_T(nf_ffn_fwd)(T *z, nf_index ldz, T *a, nf_index lda, const T *b1,
                             unsigned char *dead, nf_index m, nf_index h, int act)
{
    if (act & NF_ACT_GATED)
        NF_T(nf_ffn_gated_fwd)(z, ldz, a, lda, b1, dead, m, h, act);
    else if (act == NF_ACT_RELU && a == NULL)
        NF_T(nf_ffn_relu_fwd)(z, ldz, b1, dead, m, h);
    else
        NF_T(nf_ffn_plain_fwd)(z, ldz, a, lda, b1, dead, m, h, act);
}

/* ---------------------------------------------------------------- backward
 * g (ldg) holds dA = dY W2^T for the block; on return it holds dH = dA * act'(v).
 * z (ldz) holds, per row, either the saved hidden (relu: a; other activations: v) with
 * b1 == NULL, or the raw GEMM output (recompute) with b1 to add (or NULL when there is none).
 *   a_out != NULL: a_out (lda) = act(v); a_out may equal z (in place: recompute's scratch).
 *   relu: g = (v <= 0) ? 0 : g — the saved a <= 0 exactly when v <= 0, NaN passing (the mask is
 *         derived from the saved hidden, as PyTorch's threshold_backward does).
 *   else: g = g * act'(v).
 * db1_acc != NULL: db1_acc[j] += dH[i, j] over the block's rows, in row order (float64). */

NF_CLONES static void NF_T(nf_ffn_relu_mask)(T *restrict g, nf_index ldg, const T *restrict a,
                                             nf_index lda, double *restrict db1_acc,
                                             nf_index m, nf_index h)
{
    for (nf_index i = 0; i < m; i++) {
        T *restrict gi = g + i * ldg;
        const T *restrict ai = a + i * lda;
        for (nf_index j = 0; j < h; j++) gi[j] = ai[j] <= 0 ? (T)0 : gi[j];
        if (db1_acc) for (nf_index j = 0; j < h; j++) db1_acc[j] += (double)gi[j];
    }
}

NF_CLONES static void NF_T(nf_ffn_relu_bwd)(T *restrict g, nf_index ldg, T *z, nf_index ldz,
                                            const T *restrict b1, T *a_out, nf_index lda,
                                            double *restrict db1_acc, nf_index m, nf_index h)
{
    for (nf_index i = 0; i < m; i++) {
        T *restrict gi = g + i * ldg;
        T *zi = z + i * ldz, *ai = a_out + i * lda;
        for (nf_index j = 0; j < h; j++) {
            T v = b1 ? zi[j] + b1[j] : zi[j];
            ai[j] = v < 0 ? (T)0 : v;
            gi[j] = v <= 0 ? (T)0 : gi[j];
        }
        if (db1_acc) for (nf_index j = 0; j < h; j++) db1_acc[j] += (double)gi[j];
    }
}

static void NF_T(nf_ffn_smooth_bwd)(T *g, nf_index ldg, T *z, nf_index ldz, const T *b1,
                                    T *a_out, nf_index lda, double *db1_acc, nf_index m,
                                    nf_index h, int act)
{
    for (nf_index i = 0; i < m; i++) {
        T *gi = g + i * ldg, *zi = z + i * ldz, *ai = a_out ? a_out + i * lda : NULL;
        for (nf_index j = 0; j < h; j++) {
            T d;
            T v = b1 ? zi[j] + b1[j] : zi[j];
            T y = NF_T(nf_act)(act, v, &d);
            if (ai) ai[j] = y;
            gi[j] = gi[j] * d;
        }
        if (db1_acc) for (nf_index j = 0; j < h; j++) db1_acc[j] += (double)gi[j];
    }
}

/* Gated: g holds dA in its first h columns (ldg >= 2h) and returns dZ = [dgate | dup] (2h);
 * z rows are [gate | up]; a_out (may equal z) gets act(gate) * up; db1_acc is 2h wide. */
static void NF_T(nf_ffn_gated_bwd)(T *g, nf_index ldg, T *z, nf_index ldz, const T *b1,
                                   T *a_out, nf_index lda, double *db1_acc, nf_index m,
                                   nf_index h, int act)
{
    int gate = act & ~NF_ACT_GATED;
    for (nf_index i = 0; i < m; i++) {
        T *gi = g + i * ldg, *zi = z + i * ldz, *ai = a_out ? a_out + i * lda : NULL;
        for (nf_index j = 0; j < h; j++) {
            T vg = b1 ? zi[j] + b1[j] : zi[j];
            T vu = b1 ? zi[h + j] + b1[h + j] : zi[h + j];
            T da = gi[j], d, s;
            if (gate == NF_ACT_RELU) {
                s = vg < 0 ? (T)0 : vg;
                gi[j] = vg <= 0 ? (T)0 : da * vu;
            } else {
                s = NF_T(nf_act)(gate, vg, &d);
                gi[j] = (da * vu) * d;
            }
            gi[h + j] = da * s;
            if (ai) ai[j] = s * vu;
        }
        if (db1_acc) for (nf_index j = 0; j < 2 * h; j++) db1_acc[j] += (double)gi[j];
    }
}

static void NF_T(nf_ffn_bwd)(T *g, nf_index ldg, T *z, nf_index ldz, const T *b1, T *a_out,
                             nf_index lda, double *db1_acc, nf_index m, nf_index h, int act)
{
    if (act & NF_ACT_GATED) {
        NF_T(nf_ffn_gated_bwd)(g, ldg, z, ldz, b1, a_out, lda, db1_acc, m, h, act);
    } else if (act == NF_ACT_RELU) {
        if (a_out == NULL && b1 == NULL)
            NF_T(nf_ffn_relu_mask)(g, ldg, z, ldz, db1_acc, m, h);
        else
            NF_T(nf_ffn_relu_bwd)(g, ldg, z, ldz, b1, a_out ? a_out : z, a_out ? lda : ldz,
                                  db1_acc, m, h);
    } else {
        NF_T(nf_ffn_smooth_bwd)(g, ldg, z, ldz, b1, a_out, lda, db1_acc, m, h, act);
    }
}

/* a (lda) = act(z + b1) only (gated: act(gate) * up) — backward when no gradient through the
 * hidden is needed but dw2 is (a is then bitwise the a nf_ffn_bwd writes).  a may equal z (in
 * place: row j of a is written after z[j] and z[h + j] are read). */
static void NF_T(nf_ffn_activate)(T *a, nf_index lda, const T *z, nf_index ldz, const T *b1,
                                  nf_index m, nf_index h, int act)
{
    int gate = act & ~NF_ACT_GATED;
    for (nf_index i = 0; i < m; i++) {
        const T *zi = z + i * ldz;
        T *ai = a + i * lda;
        for (nf_index j = 0; j < h; j++) {
            T v = b1 ? zi[j] + b1[j] : zi[j];
            T s = gate == NF_ACT_RELU ? (v < 0 ? (T)0 : v) : NF_T(nf_act)(gate, v, NULL);
            if (act & NF_ACT_GATED) s = s * (b1 ? zi[h + j] + b1[h + j] : zi[h + j]);
            ai[j] = s;
        }
    }
}

/* ---------------------------------------------------------------- bias rows and column sums */

/* y[i, :] = b for the block's rows (the second GEMM then accumulates onto it with beta = 1). */
NF_CLONES static void NF_T(nf_fill_rows)(T *restrict y, nf_index ldy, const T *restrict b,
                                         nf_index m, nf_index w)
{
    for (nf_index i = 0; i < m; i++)
        for (nf_index j = 0; j < w; j++) y[i * ldy + j] = b[j];
}

/* y[i, :] = r[i, :] + b, or r[i, :] when b is NULL: a residual (and the bias) under the second
 * GEMM's accumulation (ffn_block's y = x + FFN). */
NF_CLONES static void NF_T(nf_add_rows)(T *restrict y, nf_index ldy, const T *restrict r,
                                        nf_index ldr, const T *restrict b, nf_index m,
                                        nf_index w)
{
    for (nf_index i = 0; i < m; i++) {
        if (b == NULL) {
            memcpy(y + i * ldy, r + i * ldr, (size_t)w * sizeof(T));
        } else {
            for (nf_index j = 0; j < w; j++) y[i * ldy + j] = r[i * ldr + j] + b[j];
        }
    }
}

/* acc[j] += sum_i x[i, j], rows in order (float64). */
NF_CLONES static void NF_T(nf_colsum)(double *restrict acc, const T *restrict x, nf_index ldx,
                                      nf_index m, nf_index w)
{
    for (nf_index i = 0; i < m; i++)
        for (nf_index j = 0; j < w; j++) acc[j] += (double)x[i * ldx + j];
}

/* out[j] = acc[j] rounded to T: the finished bias gradient. */
static void NF_T(nf_round_sums)(T *out, const double *acc, nf_index w)
{
    for (nf_index j = 0; j < w; j++) out[j] = (T)acc[j];
}
