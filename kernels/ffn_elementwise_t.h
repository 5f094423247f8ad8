/* ffn_elementwise_t.h — the FFN elementwise bodies, written once; ffn_elementwise.h includes this
 * file twice, with T = float, SUF = f32 and T = double, SUF = f64.  No include guard, on purpose.
 * Contract and maths: ffn_elementwise.h.  NF_T(name) expands to name_SUF. */

/* ---------------------------------------------------------------- one chunk of a row
 * Rows are processed in chunks of at most NF_CHUNK columns, and one loop per activation computes
 * act(v), act'(v) and the products from them straight into the outputs.  The pre-activation
 * v = z + b1 (gated: vg and vu) is read in place where that is safe — each element is read before
 * the one store that may replace it (a over z's gate columns), or nothing is written over z — and
 * copied into small local arrays otherwise, so a chunk's inputs are copied before any of its
 * outputs are stored and later chunks read columns no earlier chunk wrote.  Each loop has one
 * activation and restrict (or local) operands, so GCC vectorises it (vmath.h's functions inline
 * into it).  (One loop rather than a loop per step through local act(v) / act'(v) arrays, and no
 * copy where none is needed: the passes are bound by their loads and stores; docs/tuning.md.) */

/* v[0:n] = z[0:n] + b[0:n] (b may be NULL). */
NF_INLINE void NF_T(nf_load_v)(T *restrict v, const T *restrict z, const T *restrict b,
                               nf_index n)
{
    if (b) for (nf_index j = 0; j < n; j++) v[j] = z[j] + b[j];
    else   memcpy(v, z, (size_t)n * sizeof(T));
}

/* s = act(v) for a plain activation code (a gated code's gate). */
NF_INLINE void NF_T(nf_act_chunk)(T *restrict s, const T *restrict v, nf_index n, int act)
{
    switch (act) {
    case NF_ACT_GELU:
        for (nf_index j = 0; j < n; j++) s[j] = NF_T(nf_vgelu)(v[j], NULL);
        break;
    case NF_ACT_GELU_TANH:
        for (nf_index j = 0; j < n; j++) s[j] = NF_T(nf_vgelu_tanh)(v[j], NULL);
        break;
    case NF_ACT_SILU:
        for (nf_index j = 0; j < n; j++) s[j] = NF_T(nf_vsilu)(v[j], NULL);
        break;
    default:
        for (nf_index j = 0; j < n; j++) s[j] = v[j] < 0 ? (T)0 : v[j];
        break;
    }
}

/* Smooth activation backward of one chunk in one loop: g = g * act'(v), and a = act(v) when
 * a != NULL (g and a never overlap; v is a local copy, so a may be written over z).  Without a,
 * act(v) goes to a local sink: a store in the loop body keeps it one branch-free loop, which GCC
 * vectorises (with `if (a)` inside it did not). */
#define NF_SMOOTH_GRAD_LOOP(ACT)                                                           \
    for (nf_index j = 0; j < n; j++) {                                                     \
        T dv, s = ACT(v[j], &dv);                                                          \
        g[j] = g[j] * dv;                                                                  \
        ao[j] = s;                                                                         \
    }

NF_INLINE void NF_T(nf_smooth_grad_chunk)(T *restrict g, T *a, const T *restrict v,
                                          nf_index n, int act)
{
    T sink[NF_CHUNK];
    T *restrict ao = a ? a : sink;
    switch (act) {
    case NF_ACT_GELU:      NF_SMOOTH_GRAD_LOOP(NF_T(nf_vgelu)); break;
    case NF_ACT_GELU_TANH: NF_SMOOTH_GRAD_LOOP(NF_T(nf_vgelu_tanh)); break;
    default:               NF_SMOOTH_GRAD_LOOP(NF_T(nf_vsilu)); break;
    }
}
#undef NF_SMOOTH_GRAD_LOOP

/* out = s * u */
NF_INLINE void NF_T(nf_mul_chunk)(T *restrict out, const T *restrict s, const T *restrict u,
                                  nf_index n)
{
    for (nf_index j = 0; j < n; j++) out[j] = s[j] * u[j];
}

/* dead[j] &= (s[j] == 0) */
NF_INLINE void NF_T(nf_dead_chunk)(unsigned char *restrict dead, const T *restrict s,
                                   nf_index n)
{
    for (nf_index j = 0; j < n; j++) dead[j] &= (s[j] == 0);
}

/* Gated, one chunk, in one loop per gate.  Forward (no dead-unit flags), read straight from the
 * GEMM output or from a local copy:
 *   nf_gated_chunk:   out = act(vg) * vu (out apart from vg, vu);
 *   nf_gated_inplace: vg = zg + bg, vu = zu + bu (HAS_B, a literal), act(vg) * vu over zg
 *                     (a replaces z: inference, recompute);
 *   nf_gated_keep:    the same v written back over zg, zu (the saved pre-activation) and
 *                     act(vg) * vu to a, apart.
 * NF_GATED_EACH(LOAD_G, LOAD_U, BODY): one loop per gate over [0, n) with vg = LOAD_G,
 * vu = LOAD_U and s = act(vg) in scope of BODY. */
#define NF_GATED_FOR(ACT, LOAD_G, LOAD_U, BODY)                                            \
    for (nf_index j = 0; j < n; j++) {                                                     \
        T vg = LOAD_G, vu = LOAD_U, s = ACT;                                               \
        BODY;                                                                              \
    }
#define NF_GATED_EACH(LOAD_G, LOAD_U, BODY)                                                \
    switch (gate) {                                                                        \
    case NF_ACT_GELU:                                                                      \
        NF_GATED_FOR(NF_T(nf_vgelu)(vg, NULL), LOAD_G, LOAD_U, BODY); break;               \
    case NF_ACT_GELU_TANH:                                                                 \
        NF_GATED_FOR(NF_T(nf_vgelu_tanh)(vg, NULL), LOAD_G, LOAD_U, BODY); break;          \
    case NF_ACT_SILU:                                                                      \
        NF_GATED_FOR(NF_T(nf_vsilu)(vg, NULL), LOAD_G, LOAD_U, BODY); break;               \
    default:                                                                               \
        NF_GATED_FOR(vg < 0 ? (T)0 : vg, LOAD_G, LOAD_U, BODY); break;                     \
    }

NF_INLINE void NF_T(nf_gated_chunk)(T *restrict out, const T *restrict g, const T *restrict u,
                                    nf_index n, int gate)
{
    NF_GATED_EACH(g[j], u[j], out[j] = s * vu);
}

NF_INLINE void NF_T(nf_gated_inplace)(T *restrict zg, const T *restrict zu,
                                      const T *restrict bg, const T *restrict bu, nf_index n,
                                      int gate, const int HAS_B)
{
    NF_GATED_EACH(HAS_B ? zg[j] + bg[j] : zg[j], HAS_B ? zu[j] + bu[j] : zu[j], zg[j] = s * vu);
}

NF_INLINE void NF_T(nf_gated_keep)(T *restrict a, T *restrict zg, T *restrict zu,
                                   const T *restrict bg, const T *restrict bu, nf_index n,
                                   int gate)
{
    NF_GATED_EACH(zg[j] + bg[j], zu[j] + bu[j], (zg[j] = vg, zu[j] = vu, a[j] = s * vu));
}
#undef NF_GATED_EACH
#undef NF_GATED_FOR

/* Backward, dA in gg on entry: gg = (dA * vu) * act'(vg) (relu: dA * vu where vg is not <= 0,
 * else 0), gu = dA * act(vg), and a = act(vg) * vu when a != NULL. */
#define NF_GATED_GRAD_LOOP(ACT)                                                            \
    for (nf_index j = 0; j < n; j++) {                                                     \
        T d, s = ACT(vg[j], &d), da = gg[j];                                               \
        gg[j] = (da * vu[j]) * d;                                                          \
        gu[j] = da * s;                                                                    \
        ao[j] = s * vu[j];                                                                 \
    }

NF_INLINE void NF_T(nf_gated_grad_chunk)(T *restrict gg, T *restrict gu, T *a,
                                         const T *restrict vg, const T *restrict vu,
                                         nf_index n, int gate)
{
    T sink[NF_CHUNK];                      /* a == NULL: as nf_smooth_grad_chunk */
    T *restrict ao = a ? a : sink;
    switch (gate) {
    case NF_ACT_GELU:      NF_GATED_GRAD_LOOP(NF_T(nf_vgelu)); break;
    case NF_ACT_GELU_TANH: NF_GATED_GRAD_LOOP(NF_T(nf_vgelu_tanh)); break;
    case NF_ACT_SILU:      NF_GATED_GRAD_LOOP(NF_T(nf_vsilu)); break;
    default:
        for (nf_index j = 0; j < n; j++) {
            T s = vg[j] < 0 ? (T)0 : vg[j], da = gg[j];
            gg[j] = vg[j] <= 0 ? (T)0 : da * vu[j];
            gu[j] = da * s;
            ao[j] = s * vu[j];
        }
        break;
    }
}
#undef NF_GATED_GRAD_LOOP

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

/* Any plain activation, chunk by chunk. */
NF_CLONES static void NF_T(nf_ffn_plain_fwd)(T *z, nf_index ldz, T *a, nf_index lda,
                                             const T *b1, unsigned char *dead, nf_index m,
                                             nf_index h, int act)
{
    T v[NF_CHUNK];
    for (nf_index i = 0; i < m; i++) {
        T *zi = z + i * ldz;
        T *ai = a ? a + i * lda : zi;
        for (nf_index j0 = 0; j0 < h; j0 += NF_CHUNK) {
            nf_index n = h - j0 < NF_CHUNK ? h - j0 : NF_CHUNK;
            NF_T(nf_load_v)(v, zi + j0, b1 ? b1 + j0 : NULL, n);
            if (a && b1) memcpy(zi + j0, v, (size_t)n * sizeof(T));
            NF_T(nf_act_chunk)(ai + j0, v, n, act);
            if (dead) NF_T(nf_dead_chunk)(dead + j0, ai + j0, n);
        }
    }
}

/* Gated: z rows are [gate | up] (2h wide), a rows h wide; a == NULL writes a over z's first h
 * columns.  dead flags the gate.  A column slice (see nf_ffn_fwd) covers gate columns [0, w) of
 * the pointers given and the up columns h further on. */
NF_CLONES static void NF_T(nf_ffn_gated_fwd)(T *z, nf_index ldz, T *a, nf_index lda,
                                             const T *b1, unsigned char *dead, nf_index m,
                                             nf_index w, nf_index h, int act)
{
    int gate = act & ~NF_ACT_GATED;
    T vg[NF_CHUNK], vu[NF_CHUNK], s[NF_CHUNK];
    for (nf_index i = 0; i < m; i++) {
        T *zi = z + i * ldz;
        T *ai = a ? a + i * lda : zi;
        for (nf_index j0 = 0; j0 < w; j0 += NF_CHUNK) {
            nf_index n = w - j0 < NF_CHUNK ? w - j0 : NF_CHUNK;
            T *zg = zi + j0, *zu = zi + h + j0;
            const T *bg = b1 ? b1 + j0 : NULL, *bu = b1 ? b1 + h + j0 : NULL;
            if (!dead) {                      /* straight from z: no local copy */
                if (!a && b1)      NF_T(nf_gated_inplace)(zg, zu, bg, bu, n, gate, 1);
                else if (!a)       NF_T(nf_gated_inplace)(zg, zu, NULL, NULL, n, gate, 0);
                else if (b1)       NF_T(nf_gated_keep)(ai + j0, zg, zu, bg, bu, n, gate);
                else               NF_T(nf_gated_chunk)(ai + j0, zg, zu, n, gate);
                continue;
            }
            NF_T(nf_load_v)(vg, zg, bg, n);
            NF_T(nf_load_v)(vu, zu, bu, n);
            if (a && b1) {
                memcpy(zg, vg, (size_t)n * sizeof(T));
                memcpy(zu, vu, (size_t)n * sizeof(T));
            }
            NF_T(nf_act_chunk)(s, vg, n, gate);
            NF_T(nf_mul_chunk)(ai + j0, s, vu, n);
            NF_T(nf_dead_chunk)(dead + j0, s, n);
        }
    }
}

/* Columns [0, w) of the block (w = h: all of it; w < h: a slice whose pointers the caller has
 * offset to its first column, h still locating a gated row's up half). */
static void NF_T(nf_ffn_fwd)(T *z, nf_index ldz, T *a, nf_index lda, const T *b1,
                             unsigned char *dead, nf_index m, nf_index w, nf_index h, int act)
{
    if (act & NF_ACT_GATED)
        NF_T(nf_ffn_gated_fwd)(z, ldz, a, lda, b1, dead, m, w, h, act);
    else if (act == NF_ACT_RELU && a == NULL)
        NF_T(nf_ffn_relu_fwd)(z, ldz, b1, dead, m, w);
    else
        NF_T(nf_ffn_plain_fwd)(z, ldz, a, lda, b1, dead, m, w, act);
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

/* The backward reads v straight from z when there is no bias to add and a is not written over
 * z (the saved pre-activation, a to scratch): no copy into the local chunk, whose first touch of
 * each line of z was where the pass waited on memory.  (Recompute writes a over z: copied.) */
#ifndef NF_V_DIRECT
#define NF_V_DIRECT(b1, a_out, z) ((b1) == NULL && (const void *)(a_out) != (const void *)(z))
#endif

/* gelu, gelu_tanh, silu, chunk by chunk; g and a_out never overlap. */
NF_CLONES static void NF_T(nf_ffn_smooth_bwd)(T *g, nf_index ldg, T *z, nf_index ldz,
                                              const T *b1, T *a_out, nf_index lda,
                                              double *restrict db1_acc, nf_index m, nf_index h,
                                              int act)
{
    const int direct = NF_V_DIRECT(b1, a_out, z);
    T v[NF_CHUNK];
    for (nf_index i = 0; i < m; i++) {
        T *restrict gi = g + i * ldg;
        const T *zi = z + i * ldz;
        for (nf_index j0 = 0; j0 < h; j0 += NF_CHUNK) {
            nf_index n = h - j0 < NF_CHUNK ? h - j0 : NF_CHUNK;
            if (!direct) NF_T(nf_load_v)(v, zi + j0, b1 ? b1 + j0 : NULL, n);
            NF_T(nf_smooth_grad_chunk)(gi + j0, a_out ? a_out + i * lda + j0 : NULL,
                                       direct ? zi + j0 : v, n, act);
        }
        if (db1_acc) for (nf_index j = 0; j < h; j++) db1_acc[j] += (double)gi[j];
    }
}

/* Gated: g holds dA in its first h columns (ldg >= 2h) and returns dZ = [dgate | dup] (2h);
 * z rows are [gate | up]; a_out (may equal z) gets act(gate) * up; db1_acc is 2h wide.  A
 * column slice: gate columns [0, w) and the up columns h further on, as nf_ffn_gated_fwd. */
NF_CLONES static void NF_T(nf_ffn_gated_bwd)(T *g, nf_index ldg, T *z, nf_index ldz,
                                             const T *b1, T *a_out, nf_index lda,
                                             double *restrict db1_acc, nf_index m, nf_index w,
                                             nf_index h, int act)
{
    int gate = act & ~NF_ACT_GATED;
    const int direct = NF_V_DIRECT(b1, a_out, z);
    T vg[NF_CHUNK], vu[NF_CHUNK];
    for (nf_index i = 0; i < m; i++) {
        T *gi = g + i * ldg;
        const T *zi = z + i * ldz;
        for (nf_index j0 = 0; j0 < w; j0 += NF_CHUNK) {
            nf_index n = w - j0 < NF_CHUNK ? w - j0 : NF_CHUNK;
            if (!direct) {
                NF_T(nf_load_v)(vg, zi + j0, b1 ? b1 + j0 : NULL, n);
                NF_T(nf_load_v)(vu, zi + h + j0, b1 ? b1 + h + j0 : NULL, n);
            }
            NF_T(nf_gated_grad_chunk)(gi + j0, gi + h + j0, a_out ? a_out + i * lda + j0 : NULL,
                                      direct ? zi + j0 : vg, direct ? zi + h + j0 : vu, n,
                                      gate);
        }
        if (db1_acc) {
            for (nf_index j = 0; j < w; j++) db1_acc[j] += (double)gi[j];
            for (nf_index j = 0; j < w; j++) db1_acc[h + j] += (double)gi[h + j];
        }
    }
}

/* Columns [0, w) of the block, as nf_ffn_fwd. */
static void NF_T(nf_ffn_bwd)(T *g, nf_index ldg, T *z, nf_index ldz, const T *b1, T *a_out,
                             nf_index lda, double *db1_acc, nf_index m, nf_index w, nf_index h,
                             int act)
{
    if (act & NF_ACT_GATED) {
        NF_T(nf_ffn_gated_bwd)(g, ldg, z, ldz, b1, a_out, lda, db1_acc, m, w, h, act);
    } else if (act == NF_ACT_RELU) {
        if (a_out == NULL && b1 == NULL)
            NF_T(nf_ffn_relu_mask)(g, ldg, z, ldz, db1_acc, m, w);
        else
            NF_T(nf_ffn_relu_bwd)(g, ldg, z, ldz, b1, a_out ? a_out : z, a_out ? lda : ldz,
                                  db1_acc, m, w);
    } else {
        NF_T(nf_ffn_smooth_bwd)(g, ldg, z, ldz, b1, a_out, lda, db1_acc, m, w, act);
    }
}

/* a (lda) = act(z + b1) only (gated: act(gate) * up) — backward when no gradient through the
 * hidden is needed but dw2 is (a is then bitwise the a nf_ffn_bwd writes).  a may equal z (in
 * place).  Columns [0, w), as nf_ffn_fwd. */
NF_CLONES static void NF_T(nf_ffn_activate)(T *a, nf_index lda, const T *z, nf_index ldz,
                                            const T *b1, nf_index m, nf_index w, nf_index h,
                                            int act)
{
    int gated = act & NF_ACT_GATED, gate = act & ~NF_ACT_GATED;
    T v[NF_CHUNK], u[NF_CHUNK], s[NF_CHUNK];
    for (nf_index i = 0; i < m; i++) {
        const T *zi = z + i * ldz;
        T *ai = a + i * lda;
        for (nf_index j0 = 0; j0 < w; j0 += NF_CHUNK) {
            nf_index n = w - j0 < NF_CHUNK ? w - j0 : NF_CHUNK;
            NF_T(nf_load_v)(v, zi + j0, b1 ? b1 + j0 : NULL, n);
            NF_T(nf_act_chunk)(s, v, n, gate);
            if (gated) {
                NF_T(nf_load_v)(u, zi + h + j0, b1 ? b1 + h + j0 : NULL, n);
                NF_T(nf_mul_chunk)(ai + j0, s, u, n);
            } else {
                memcpy(ai + j0, s, (size_t)n * sizeof(T));
            }
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
