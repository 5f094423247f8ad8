/* activations.h — bias + activation (+ derivative) over tiles of a row-major block, for the
 * fused FFN (kernels/ffn.pyx).
 *
 * Contract: the caller (ffn.pyx) passes a tile of `m` rows by `w` columns of a row-major block;
 * row i of each matrix starts at p + i * ld.  Every pointer is valid for that tile; m, w >= 1.
 * Per-column vectors (b1, alive, db1_acc) point at the tile's first column.  A tile is walked row
 * by row, so per-column accumulations (db1_acc, alive) add rows in row order: the caller gives
 * each column to exactly one thread and the sums do not depend on the thread count.
 *
 * Activations (NF_ACT_*):
 *   relu       a = max(v, 0)                        (NaN stays NaN)
 *   gelu       a = v * Phi(v),  Phi(v) = erfc(-v / sqrt 2) / 2        (exact GELU)
 *   gelu_tanh  a = v * sigmoid(2u),  u = sqrt(2/pi) (v + 0.044715 v^3)
 *              (= v/2 (1 + tanh u), written without the cancellation of 1 + tanh u for v << 0)
 *   silu       a = v * sigmoid(v)
 * Derivatives: gelu' = Phi(v) + v phi(v);  gelu_tanh' = s + 2 v s (1 - s) u',  s = sigmoid(2u);
 * silu' = s (1 + v (1 - s)).  relu's backward needs no derivative: the gradient passes where the
 * saved output a is not <= 0 (PyTorch's threshold_backward), so NaN outputs pass it on.
 *
 * ReLU is plain C that GCC vectorises (target_clones as in rows.h); the smooth activations call
 * libm (erfc/exp), which GCC does not vectorise without -ffast-math — and -ffast-math is never
 * used: NaN and Inf propagate through every helper.
 */
#ifndef NORMFFN_ACTIVATIONS_H
#define NORMFFN_ACTIVATIONS_H

#include <math.h>
#include "rows.h"   /* nf_index, NF_CLONES */

enum { NF_ACT_RELU = 0, NF_ACT_GELU = 1, NF_ACT_GELU_TANH = 2, NF_ACT_SILU = 3 };

#define NF_SQRT1_2   0.70710678118654752440
#define NF_INV_SQRT_2PI 0.39894228040143267794
#define NF_SQRT_2_PI 0.79788456080286535588
#define NF_GELU_C    0.044715

/* a = act(v) and, when d != NULL, *d = act'(v).  F = float or double; the libm names follow. */
#define NF_DEF_ACT(SUF, T, EXP, ERFC)                                                         \
static inline T nf_act_##SUF(int act, T v, T *d)                                              \
{                                                                                             \
    if (act == NF_ACT_GELU) {                                                                 \
        T phi_cdf = (T)0.5 * ERFC(-v * (T)NF_SQRT1_2);                                        \
        if (d) *d = phi_cdf + v * ((T)NF_INV_SQRT_2PI * EXP((T)-0.5 * v * v));                \
        return v * phi_cdf;                                                                   \
    } else if (act == NF_ACT_GELU_TANH) {                                                     \
        T u = (T)NF_SQRT_2_PI * (v + (T)NF_GELU_C * v * v * v);                               \
        T s = (T)1 / ((T)1 + EXP((T)-2 * u));                                                 \
        if (d) {                                                                              \
            T du = (T)NF_SQRT_2_PI * ((T)1 + (T)(3 * NF_GELU_C) * v * v);                     \
            *d = s + (T)2 * v * (s * ((T)1 - s)) * du;                                        \
        }                                                                                     \
        return v * s;                                                                         \
    } else { /* NF_ACT_SILU */                                                                \
        T s = (T)1 / ((T)1 + EXP(-v));                                                        \
        if (d) *d = s * ((T)1 + v * ((T)1 - s));                                              \
        return v * s;                                                                         \
    }                                                                                         \
}
NF_DEF_ACT(f32, float, expf, erfcf)
NF_DEF_ACT(f64, double, exp, erfc)

/* ---------------------------------------------------------------- forward
 * v = z + b1 (b1 may be NULL).
 *   a == NULL: z = act(v) in place (inference, and relu whose saved hidden is a itself).
 *   a != NULL: z = v (pre-activation kept for backward) and a = act(v).
 * alive != NULL (relu only): alive[j] |= (act(v) != 0) — NaN counts as alive. */
#define NF_DEF_FFN_ACT_FWD(SUF, T)                                                            \
NF_CLONES static void nf_ffn_relu_fwd_##SUF(T *z, nf_index ldz, const T *restrict b1,         \
                                            unsigned char *restrict alive, nf_index m,        \
                                            nf_index w)                                       \
{                                                                                             \
    for (nf_index i = 0; i < m; i++) {                                                        \
        T *restrict zi = z + i * ldz;                                                         \
        if (b1) for (nf_index j = 0; j < w; j++) { T v = zi[j] + b1[j]; zi[j] = v < 0 ? 0 : v; } \
        else    for (nf_index j = 0; j < w; j++) { T v = zi[j];         zi[j] = v < 0 ? 0 : v; } \
        if (alive) for (nf_index j = 0; j < w; j++) alive[j] |= (zi[j] != 0);                  \
    }                                                                                         \
}                                                                                             \
static void nf_ffn_act_fwd_##SUF(T *z, nf_index ldz, T *a, nf_index lda, const T *b1,         \
                                 unsigned char *alive, nf_index m, nf_index w, int act)       \
{                                                                                             \
    if (act == NF_ACT_RELU && a == NULL) {                                                    \
        nf_ffn_relu_fwd_##SUF(z, ldz, b1, alive, m, w);                                       \
        return;                                                                               \
    }                                                                                         \
    for (nf_index i = 0; i < m; i++) {                                                        \
        T *zi = z + i * ldz;                                                                  \
        T *ai = a ? a + i * lda : zi;                                                         \
        for (nf_index j = 0; j < w; j++) {                                                    \
            T v = b1 ? zi[j] + b1[j] : zi[j];                                                 \
            T y;                                                                              \
            if (act == NF_ACT_RELU) y = v < 0 ? 0 : v;                                        \
            else y = nf_act_##SUF(act, v, NULL);                                              \
            if (a) zi[j] = v;                                                                 \
            ai[j] = y;                                                                        \
            if (alive) alive[j] |= (y != 0);                                                  \
        }                                                                                     \
    }                                                                                         \
}
NF_DEF_FFN_ACT_FWD(f32, float)
NF_DEF_FFN_ACT_FWD(f64, double)

/* ---------------------------------------------------------------- backward
 * g holds dA = dY W2^T for the tile; on return it holds dH = dA * act'(v).
 * h holds, per row, either the saved hidden (relu: a; other activations: v = z + b1) with
 * b1 == NULL, or the raw GEMM output z (recompute) with b1 to add (or NULL when there is none).
 *   a_out != NULL: a_out = act(v) (a_out may equal h: in place, recompute's scratch).
 *   relu: g = (v <= 0) ? 0 : g — the saved a <= 0 exactly when v <= 0, NaN passing (the mask is
 *         derived from the saved hidden, as PyTorch's threshold_backward does).
 *   else: g = g * act'(v).
 * db1_acc != NULL: db1_acc[j] += dH[i, j] over the tile's rows, in row order (float64). */
#define NF_DEF_FFN_ACT_BWD(SUF, T)                                                            \
NF_CLONES static void nf_ffn_relu_mask_##SUF(T *restrict g, nf_index ldg, const T *restrict h,\
                                             nf_index ldh, double *restrict db1_acc,          \
                                             nf_index m, nf_index w)                          \
{                                                                                             \
    for (nf_index i = 0; i < m; i++) {                                                        \
        T *restrict gi = g + i * ldg;                                                         \
        const T *restrict hi = h + i * ldh;                                                   \
        for (nf_index j = 0; j < w; j++) gi[j] = hi[j] <= 0 ? (T)0 : gi[j];                   \
        if (db1_acc) for (nf_index j = 0; j < w; j++) db1_acc[j] += (double)gi[j];            \
    }                                                                                         \
}                                                                                             \
NF_CLONES static void nf_ffn_relu_bwd_##SUF(T *restrict g, nf_index ldg, T *h, nf_index ldh,  \
                                            const T *restrict b1, T *a_out, nf_index lda,     \
                                            double *restrict db1_acc, nf_index m, nf_index w) \
{                                                                                             \
    for (nf_index i = 0; i < m; i++) {                                                        \
        T *restrict gi = g + i * ldg;                                                         \
        T *hi = h + i * ldh, *ai = a_out + i * lda;                                           \
        for (nf_index j = 0; j < w; j++) {                                                    \
            T v = b1 ? hi[j] + b1[j] : hi[j];                                                 \
            ai[j] = v < 0 ? (T)0 : v;                                                         \
            gi[j] = v <= 0 ? (T)0 : gi[j];                                                    \
        }                                                                                     \
        if (db1_acc) for (nf_index j = 0; j < w; j++) db1_acc[j] += (double)gi[j];            \
    }                                                                                         \
}                                                                                             \
static void nf_ffn_act_bwd_##SUF(T *g, nf_index ldg, T *h, nf_index ldh, const T *b1,         \
                                 T *a_out, nf_index lda, double *db1_acc, nf_index m,         \
                                 nf_index w, int act)                                         \
{                                                                                             \
    if (act == NF_ACT_RELU) {                                                                 \
        if (a_out == NULL && b1 == NULL) nf_ffn_relu_mask_##SUF(g, ldg, h, ldh, db1_acc, m, w); \
        else nf_ffn_relu_bwd_##SUF(g, ldg, h, ldh, b1, a_out ? a_out : h,        \
                                      a_out ? lda : ldh, db1_acc, m, w);                      \
        return;                                                                               \
    }                                                                                         \
    for (nf_index i = 0; i < m; i++) {                                                        \
        T *gi = g + i * ldg, *hi = h + i * ldh, *ai = a_out ? a_out + i * lda : NULL;         \
        for (nf_index j = 0; j < w; j++) {                                                    \
            T d;                                                                              \
            T v = b1 ? hi[j] + b1[j] : hi[j];                                                 \
            T y = nf_act_##SUF(act, v, &d);                                                   \
            if (ai) ai[j] = y;                                                                \
            gi[j] = gi[j] * d;                                                                \
        }                                                                                     \
        if (db1_acc) for (nf_index j = 0; j < w; j++) db1_acc[j] += (double)gi[j];            \
    }                                                                                         \
}
NF_DEF_FFN_ACT_BWD(f32, float)
NF_DEF_FFN_ACT_BWD(f64, double)

/* ---------------------------------------------------------------- bias rows and column sums */

/* y[i, :] = b for the tile's rows (the second GEMM then accumulates onto it with beta = 1). */
#define NF_DEF_FILL_ROWS(SUF, T)                                                              \
NF_CLONES static void nf_fill_rows_##SUF(T *restrict y, nf_index ldy, const T *restrict b,    \
                                         nf_index m, nf_index w)                              \
{                                                                                             \
    for (nf_index i = 0; i < m; i++)                                                          \
        for (nf_index j = 0; j < w; j++) y[i * ldy + j] = b[j];                               \
}
NF_DEF_FILL_ROWS(f32, float)
NF_DEF_FILL_ROWS(f64, double)

/* acc[j] += sum_i x[i, j], rows in order (float64). */
#define NF_DEF_COLSUM(SUF, T)                                                                 \
NF_CLONES static void nf_colsum_##SUF(double *restrict acc, const T *restrict x, nf_index ldx, \
                                      nf_index m, nf_index w)                                 \
{                                                                                             \
    for (nf_index i = 0; i < m; i++)                                                          \
        for (nf_index j = 0; j < w; j++) acc[j] += (double)x[i * ldx + j];                    \
}
NF_DEF_COLSUM(f32, float)
NF_DEF_COLSUM(f64, double)

#endif /* NORMFFN_ACTIVATIONS_H */
