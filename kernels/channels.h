/* channels.h — SIMD-friendly per-channel helpers for the BatchNorm kernels.
 *
 * Two shapes of work, one per memory layout (kernels/batch_norm.pyx picks):
 *  - "rows":    a contiguous run of one channel's values (a row (n, c, :) of an (N, C, S) array).
 *               Every value of the row shares the channel's scalars.
 *  - "columns": a block of `rows` rows of a row-major (M, K) matrix (channels-last: K = C; or an
 *               (N, C, S) array with small S seen as (N, C*S)); column k has its own parameters,
 *               passed as K-vectors.  Inner loops run along k (contiguous) and vectorise.
 *
 * From rows.h it uses NF_CLONES/NF_INLINE, nf_index, NF_BLOCK/NF_LANES with the blocked sums
 * (nf_sum_*, nf_ssd_*, nf_tree_sum, NF_PREFETCH_LANES) and the streaming stores.
 *
 * Contract: pointers are valid for the sizes given (the Python layer validated everything),
 * sizes >= 1.  Same build rules as rows.h: plain C auto-vectorised by GCC, compiled per ISA with
 * NF_CLONES (target_clones), no -ffast-math, no FMA contraction (setup.py) — so NaN/Inf
 * propagate and every ISA path rounds identically.
 *
 * Numerics:
 *  - Statistics are exact-order Chan/Welford merges of blocks whose (mean, M2) come from a
 *    corrected two-pass sum over the block while it is in L1/L2: stable (no E[x^2] - E[x]^2),
 *    x read from memory once for the statistics.  Sums run in the input precision over at most
 *    NF_BLOCK values, then float64 (rows.h's blocked scheme): converting every element to
 *    double halved the throughput of these passes.
 *  - Normalisation uses ((x - mean_hi) - mean_lo) * a + b with the float64 mean split into two
 *    floats for float32 data (see rows.h): an offset of 1e3..1e4 costs no accuracy.
 *  - Block sizes depend only on the problem's shape, and blocks are merged in a fixed order:
 *    results never depend on the thread count.
 */
#ifndef NORMFFN_CHANNELS_H
#define NORMFFN_CHANNELS_H

#include "rows.h"

/* Independent float64 accumulators of the row sums. */
#define NF_BN_LANES 16
/* Outputs are streamed out through L1 chunks of this many values. */
#define NF_BN_CHUNK 1024
/* Rows longer than this are reduced in segments of this many values (the second pass of each
 * segment then hits L1). */
#define NF_BN_SEG 4096
/* Column blocks: about this many bytes of x per block, so a block's second pass hits L2. */
#define NF_BN_BLOCK_BYTES 65536
/* Column blocks are streamed out through L1 chunks of this many values (several rows). */
#define NF_BN_COLS_CHUNK 4096
/* Row unroll of the column reductions (fewer loads/stores of the K accumulators). */
#define NF_BN_RU 4

/* Chan et al. merge of (nb, mb, m2b) into the running (n, mean, m2). */
static inline void nf_chan(double *n, double *mean, double *m2, double nb, double mb, double m2b)
{
    if (*n == 0) { *n = nb; *mean = mb; *m2 = m2b; return; }
    double nn = *n + nb, d = mb - *mean;
    *mean += d * (nb / nn);
    *m2 += m2b + d * d * (*n * nb / nn);
    *n = nn;
}

/* ---------------------------------------------------------------- rows (contiguous channel runs) */

/* mean and M2 = sum((x - mean)^2) of x[0:n]: two-pass per NF_BN_SEG segment (the second pass
 * finds the segment in L1), merged in order.  The sums are rows.h's blocked ones (nf_sum_*,
 * nf_ssd_*: partial sums in the input precision over NF_BLOCK values, then float64 lanes and a
 * fixed tree), so the hot loops stay float32 SIMD.  Meanwhile pf[0:n] (the next row this thread
 * reads — a strided jump the hardware prefetcher cannot guess; may equal x) is prefetched. */
#define NF_DEF_BN_ROW_STATS(NAME, T, SUM, SSD)                                                \
NF_CLONES static void NAME(const T *x, nf_index n, double *mean, double *m2, const T *pf)     \
{                                                                                             \
    double cn = 0, cm = 0, cm2 = 0;                                                           \
    for (nf_index s = 0; s < n; s += NF_BN_SEG) {                                             \
        nf_index m = n - s < NF_BN_SEG ? n - s : NF_BN_SEG;                                   \
        double bm = SUM(x + s, m) / (double)m, dev;                                           \
        double bm2 = SSD(x + s, m, bm, pf + s, &dev);                                         \
        nf_chan(&cn, &cm, &cm2, (double)m, bm + dev / (double)m, bm2 - dev * (dev / (double)m)); \
    }                                                                                         \
    *mean = cm;                                                                               \
    *m2 = cm2;                                                                                \
}
NF_DEF_BN_ROW_STATS(nf_bn_row_stats_f32, float, nf_sum_f32, nf_ssd_f32)
NF_DEF_BN_ROW_STATS(nf_bn_row_stats_f64, double, nf_sum_f64, nf_ssd_f64)

/* y[0:n] = ((x - mh) - ml) * a + b */
#define NF_DEF_BN_ROW_AFFINE1(NAME, T)                                                        \
NF_CLONES static void NAME(T *restrict y, const T *restrict x, nf_index n,                    \
                           T mh, T ml, T a, T b)                                              \
{                                                                                             \
    for (nf_index i = 0; i < n; i++) y[i] = (((x[i] - mh) - ml) * a) + b;                     \
}
NF_DEF_BN_ROW_AFFINE1(nf_bn_row_affine1_f32, float)
NF_DEF_BN_ROW_AFFINE1(nf_bn_row_affine1_f64, double)

/* The same, streamed out through an L1 chunk when `stream` (no read-for-ownership of y). */
#define NF_DEF_BN_ROW_AFFINE(NAME, T, AFF1)                                                   \
static void NAME(T *restrict y, const T *restrict x, nf_index n, T mh, T ml, T a, T b,        \
                 int stream)                                                                  \
{                                                                                             \
    if (!stream) { AFF1(y, x, n, mh, ml, a, b); return; }                                     \
    T tmp[NF_BN_CHUNK];                                                                          \
    for (nf_index c = 0; c < n; c += NF_BN_CHUNK) {                                              \
        nf_index m = n - c < NF_BN_CHUNK ? n - c : NF_BN_CHUNK;                                     \
        AFF1(tmp, x + c, m, mh, ml, a, b);                                                    \
        nf_stream_copy(y + c, tmp, (size_t)m * sizeof(T));                                    \
    }                                                                                         \
}
NF_DEF_BN_ROW_AFFINE(nf_bn_row_affine_f32, float, nf_bn_row_affine1_f32)
NF_DEF_BN_ROW_AFFINE(nf_bn_row_affine_f64, double, nf_bn_row_affine1_f64)

/* Backward sums of one row: *sdy = sum(dy), *sdyx = sum(dy * ((x - mh) - ml)) (x may be NULL:
 * then only sdy).  Blocked as rows.h's sums: NF_LANES partials in the input precision over
 * NF_BLOCK values, flushed to float64 lanes, then a fixed tree.  Meanwhile the next row this
 * thread reads (pf_dy, pf_x; may equal dy, x) is prefetched. */
#define NF_DEF_BN_ROW_BWD_SUMS(NAME, T)                                                       \
NF_CLONES static void NAME(double *sdy, double *sdyx, const T *restrict dy,                   \
                           const T *restrict x, nf_index n, T mh, T ml,                       \
                           const T *pf_dy, const T *pf_x)                                     \
{                                                                                             \
    double a1[NF_LANES] = {0}, a2[NF_LANES] = {0};                                            \
    double s1 = 0, s2 = 0;                                                                    \
    nf_index i = 0;                                                                           \
    if (x) {                                                                                  \
        while (i + NF_LANES <= n) {                                                           \
            T p1[NF_LANES] = {0}, p2[NF_LANES] = {0};                                         \
            nf_index end = i + NF_BLOCK < n ? i + NF_BLOCK : n;                               \
            for (; i + NF_LANES <= end; i += NF_LANES) {                                      \
                NF_PREFETCH_LANES(pf_dy + i, T);                                              \
                NF_PREFETCH_LANES(pf_x + i, T);                                               \
                for (int k = 0; k < NF_LANES; k++) {                                          \
                    T xc = (x[i + k] - mh) - ml;                                              \
                    p1[k] += dy[i + k];                                                       \
                    p2[k] += dy[i + k] * xc;                                                  \
                }                                                                             \
            }                                                                                 \
            for (int k = 0; k < NF_LANES; k++) { a1[k] += (double)p1[k]; a2[k] += (double)p2[k]; } \
        }                                                                                     \
        for (; i < n; i++) {                                                                  \
            T xc = (x[i] - mh) - ml;                                                          \
            s1 += (double)dy[i];                                                              \
            s2 += (double)dy[i] * (double)xc;                                                 \
        }                                                                                     \
    } else {                                                                                  \
        while (i + NF_LANES <= n) {                                                           \
            T p1[NF_LANES] = {0};                                                             \
            nf_index end = i + NF_BLOCK < n ? i + NF_BLOCK : n;                               \
            for (; i + NF_LANES <= end; i += NF_LANES) {                                      \
                NF_PREFETCH_LANES(pf_dy + i, T);                                              \
                for (int k = 0; k < NF_LANES; k++) p1[k] += dy[i + k];                        \
            }                                                                                 \
            for (int k = 0; k < NF_LANES; k++) a1[k] += (double)p1[k];                        \
        }                                                                                     \
        for (; i < n; i++) s1 += (double)dy[i];                                               \
    }                                                                                         \
    *sdy = s1 + nf_tree_sum(a1);                                                              \
    *sdyx = s2 + nf_tree_sum(a2);                                                             \
}
NF_DEF_BN_ROW_BWD_SUMS(nf_bn_row_bwd_sums_f32, float)
NF_DEF_BN_ROW_BWD_SUMS(nf_bn_row_bwd_sums_f64, double)

/* dx[0:n] = ((dy - c2) - ((x - mh) - ml) * k1) * k2   (training)
 * dx[0:n] = dy * k2                                   (x == NULL: eval) */
#define NF_DEF_BN_ROW_DX1(NAME, T)                                                            \
NF_CLONES static void NAME(T *restrict dx, const T *restrict dy, const T *restrict x,         \
                           nf_index n, T mh, T ml, T k1, T c2, T k2)                          \
{                                                                                             \
    if (x) {                                                                                  \
        for (nf_index i = 0; i < n; i++)                                                      \
            dx[i] = ((dy[i] - c2) - ((x[i] - mh) - ml) * k1) * k2;                            \
    } else {                                                                                  \
        for (nf_index i = 0; i < n; i++) dx[i] = dy[i] * k2;                                  \
    }                                                                                         \
}
NF_DEF_BN_ROW_DX1(nf_bn_row_dx1_f32, float)
NF_DEF_BN_ROW_DX1(nf_bn_row_dx1_f64, double)

#define NF_DEF_BN_ROW_DX(NAME, T, DX1)                                                        \
static void NAME(T *restrict dx, const T *restrict dy, const T *restrict x, nf_index n,       \
                 T mh, T ml, T k1, T c2, T k2, int stream)                                    \
{                                                                                             \
    if (!stream) { DX1(dx, dy, x, n, mh, ml, k1, c2, k2); return; }                           \
    T tmp[NF_BN_CHUNK];                                                                          \
    for (nf_index c = 0; c < n; c += NF_BN_CHUNK) {                                              \
        nf_index m = n - c < NF_BN_CHUNK ? n - c : NF_BN_CHUNK;                                     \
        DX1(tmp, dy + c, x ? x + c : NULL, m, mh, ml, k1, c2, k2);                            \
        nf_stream_copy(dx + c, tmp, (size_t)m * sizeof(T));                                   \
    }                                                                                         \
}
NF_DEF_BN_ROW_DX(nf_bn_row_dx_f32, float, nf_bn_row_dx1_f32)
NF_DEF_BN_ROW_DX(nf_bn_row_dx_f64, double, nf_bn_row_dx1_f64)

/* ---------------------------------------------------------------- columns ((rows, K) blocks) */

/* Rows per column block for row length K: a function of (K, itemsize) only, a multiple of
 * NF_BN_RU, at most NF_BLOCK (a block's float32 partial sums then add at most NF_BLOCK values,
 * as in rows.h). */
static inline nf_index nf_bn_block_rows(nf_index K, size_t itemsize)
{
    nf_index r = (nf_index)(NF_BN_BLOCK_BYTES / ((size_t)K * itemsize));
    if (r > NF_BLOCK) r = NF_BLOCK;
    r -= r % NF_BN_RU;
    return r < NF_BN_RU ? NF_BN_RU : r;
}

/* Block statistics of x[0:rows, 0:K] (row stride K, rows <= NF_BLOCK): bm[k] = column mean,
 * bm2[k] = column M2.  Corrected two-pass over the block (the second pass finds it in L1/L2),
 * with the column sums in the input precision (at most NF_BLOCK terms each, NF_BN_RU rows per
 * step) and only the per-block results in float64: the hot loops stay float32 SIMD.  The
 * centring uses the float64 block mean split into hi + lo (see rows.h).  tmp: 4*K values.
 * Meanwhile the pfbytes bytes at pf (the next block this thread reads; pfbytes may be 0) are
 * prefetched, half during each pass, so memory keeps streaming while the block is re-read from
 * cache (with it and the one-row steps below, channels-last training forward ran 26% faster). */
#define NF_BN_PF_SPAN(pass, r) (pfbytes * (size_t)((pass) * rows + (r)) / (size_t)(2 * rows))
#define NF_DEF_BN_COLS_STATS(NAME, T)                                                         \
NF_CLONES static void NAME(double *restrict bm, double *restrict bm2, T *restrict tmp,        \
                           const T *restrict x, nf_index rows, nf_index K,                    \
                           const T *pf, size_t pfbytes)                                       \
{                                                                                             \
    T *restrict s = tmp, *restrict q = tmp + K, *restrict mh = tmp + 2 * K,                   \
      *restrict ml = tmp + 3 * K;                                                             \
    nf_index r = 0;                                                                           \
    for (nf_index k = 0; k < K; k++) s[k] = 0;                                                \
    for (; r + NF_BN_RU <= rows; r += NF_BN_RU) {                                             \
        const T *x0 = x + r * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;                    \
        nf_prefetch_range(pf, NF_BN_PF_SPAN(0, r), NF_BN_PF_SPAN(0, r + NF_BN_RU));           \
        for (nf_index k = 0; k < K; k++) s[k] += (x0[k] + x1[k]) + (x2[k] + x3[k]);           \
    }                                                                                         \
    nf_prefetch_range(pf, NF_BN_PF_SPAN(0, r), NF_BN_PF_SPAN(1, 0));                          \
    for (; r < rows; r++)                                                                     \
        for (nf_index k = 0; k < K; k++) s[k] += x[r * K + k];                                \
    for (nf_index k = 0; k < K; k++) {                                                        \
        double m = (double)s[k] / (double)rows;                                               \
        bm[k] = m;                                                                            \
        mh[k] = (T)m;                                                                         \
        ml[k] = sizeof(T) == sizeof(float) ? (T)(m - (double)mh[k]) : (T)0;                   \
        s[k] = 0;                                                                             \
        q[k] = 0;                                                                             \
    }                                                                                         \
    for (r = 0; r + NF_BN_RU <= rows; r += NF_BN_RU) {                                        \
        const T *x0 = x + r * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;                    \
        nf_prefetch_range(pf, NF_BN_PF_SPAN(1, r), NF_BN_PF_SPAN(1, r + NF_BN_RU));           \
        for (nf_index k = 0; k < K; k++) {                                                    \
            T t0 = (x0[k] - mh[k]) - ml[k], t1 = (x1[k] - mh[k]) - ml[k];                     \
            T t2 = (x2[k] - mh[k]) - ml[k], t3 = (x3[k] - mh[k]) - ml[k];                     \
            s[k] += (t0 + t1) + (t2 + t3);                                                    \
            q[k] += (t0 * t0 + t1 * t1) + (t2 * t2 + t3 * t3);                                \
        }                                                                                     \
    }                                                                                         \
    nf_prefetch_range(pf, NF_BN_PF_SPAN(1, r), pfbytes);                                      \
    for (; r < rows; r++)                                                                     \
        for (nf_index k = 0; k < K; k++) {                                                    \
            T t = (x[r * K + k] - mh[k]) - ml[k];                                             \
            s[k] += t;                                                                        \
            q[k] += t * t;                                                                    \
        }                                                                                     \
    for (nf_index k = 0; k < K; k++) {         /* corrected two-pass (see nf_ssd_f32) */      \
        double d = (double)s[k];                                                              \
        bm[k] += d / (double)rows;                                                            \
        bm2[k] = (double)q[k] - d * (d / (double)rows);                                       \
    }                                                                                         \
}
NF_DEF_BN_COLS_STATS(nf_bn_cols_stats_f32, float)
NF_DEF_BN_COLS_STATS(nf_bn_cols_stats_f64, double)

/* Chan merge of a block of nb rows (bm, bm2) into the running (na rows; mean, m2), per column. */
NF_CLONES static void nf_bn_cols_chan(double *restrict mean, double *restrict m2, double na,
                                      const double *restrict bm, const double *restrict bm2,
                                      double nb, nf_index K)
{
    if (na == 0) {
        for (nf_index k = 0; k < K; k++) { mean[k] = bm[k]; m2[k] = bm2[k]; }
        return;
    }
    double nn = na + nb, f1 = nb / nn, f2 = na * nb / nn;
    for (nf_index k = 0; k < K; k++) {
        double d = bm[k] - mean[k];
        mean[k] += d * f1;
        m2[k] += bm2[k] + d * d * f2;
    }
}

/* y[r, k] = (x[r, k] - mh[k]) * a[k] + b[k] over `rows` rows of length K, one row at a time:
 * loading the K-vectors once per NF_BN_RU rows instead was 15% slower at (8192, 768) — four x
 * and four y rows in flight are more streams than the hardware prefetcher follows well, while
 * the extra loads hit L1.  The caller folds the low part of the split
 * mean into b (b = bias - ml * a, in float64): x - mh is exact near the mean (Sterbenz), so
 * offset data keeps its accuracy with three K-vectors instead of four. */
#define NF_DEF_BN_COLS_AFFINE1(NAME, T)                                                       \
NF_INLINE void NAME(T *restrict y, const T *restrict x, nf_index rows, nf_index K,            \
                    const T *restrict mh, const T *restrict a, const T *restrict b)           \
{                                                                                             \
    for (nf_index r = 0; r < rows; r++)                                                       \
        for (nf_index k = 0; k < K; k++)                                                      \
            y[r * K + k] = ((x[r * K + k] - mh[k]) * a[k]) + b[k];                            \
}
NF_DEF_BN_COLS_AFFINE1(nf_bn_cols_affine1_f32, float)
NF_DEF_BN_COLS_AFFINE1(nf_bn_cols_affine1_f64, double)

/* dx[r, k] = ((dy - c2[k]) - ((x - mh[k]) - ml[k]) * k1[k]) * k2[k]   (training)
 * dx[r, k] = dy * k2[k]                                              (x == NULL: eval) */
#define NF_DEF_BN_COLS_DX1(NAME, T)                                                           \
NF_CLONES static void NAME(T *restrict dx, const T *restrict dy, const T *restrict x,         \
                           nf_index rows, nf_index K, const T *restrict mh,                   \
                           const T *restrict ml, const T *restrict k1, const T *restrict c2,  \
                           const T *restrict k2)                                              \
{                                                                                             \
    if (x) {                                                                                  \
        for (nf_index r = 0; r < rows; r++)                                                   \
            for (nf_index k = 0; k < K; k++)                                                  \
                dx[r * K + k] = ((dy[r * K + k] - c2[k])                                      \
                                 - ((x[r * K + k] - mh[k]) - ml[k]) * k1[k]) * k2[k];         \
    } else {                                                                                  \
        for (nf_index r = 0; r < rows; r++)                                                   \
            for (nf_index k = 0; k < K; k++) dx[r * K + k] = dy[r * K + k] * k2[k];           \
    }                                                                                         \
}
NF_DEF_BN_COLS_DX1(nf_bn_cols_dx1_f32, float)
NF_DEF_BN_COLS_DX1(nf_bn_cols_dx1_f64, double)

/* Streaming wrappers: rows are produced in L1 chunks of whole rows (or of one row's columns
 * when a row is longer than a chunk), then streamed out. */
#define NF_DEF_BN_COLS_AFFINE(NAME, T, AFF1)                                                  \
NF_CLONES static void NAME(T *restrict y, const T *restrict x, nf_index rows, nf_index K,     \
                           const T *mh, const T *a, const T *b, int stream)                   \
{                                                                                             \
    if (!stream) { AFF1(y, x, rows, K, mh, a, b); return; }                                   \
    T tmp[NF_BN_COLS_CHUNK];                                                                  \
    if (K <= NF_BN_COLS_CHUNK) {                                                              \
        nf_index g = NF_BN_COLS_CHUNK / K;                                                    \
        for (nf_index r = 0; r < rows; r += g) {                                              \
            nf_index m = rows - r < g ? rows - r : g;                                         \
            AFF1(tmp, x + r * K, m, K, mh, a, b);                                         \
            nf_stream_copy(y + r * K, tmp, (size_t)(m * K) * sizeof(T));                      \
        }                                                                                     \
    } else {                                                                                  \
        for (nf_index r = 0; r < rows; r++)                                                   \
            for (nf_index c = 0; c < K; c += NF_BN_COLS_CHUNK) {                              \
                nf_index m = K - c < NF_BN_COLS_CHUNK ? K - c : NF_BN_COLS_CHUNK;             \
                AFF1(tmp, x + r * K + c, 1, m, mh + c, a + c, b + c);                         \
                nf_stream_copy(y + r * K + c, tmp, (size_t)m * sizeof(T));                    \
            }                                                                                 \
    }                                                                                         \
}
NF_DEF_BN_COLS_AFFINE(nf_bn_cols_affine_f32, float, nf_bn_cols_affine1_f32)
NF_DEF_BN_COLS_AFFINE(nf_bn_cols_affine_f64, double, nf_bn_cols_affine1_f64)

#define NF_DEF_BN_COLS_DX(NAME, T, DX1)                                                       \
static void NAME(T *restrict dx, const T *restrict dy, const T *restrict x, nf_index rows,    \
                 nf_index K, const T *mh, const T *ml, const T *k1, const T *c2, const T *k2, \
                 int stream)                                                                  \
{                                                                                             \
    if (!stream) { DX1(dx, dy, x, rows, K, mh, ml, k1, c2, k2); return; }                     \
    T tmp[NF_BN_CHUNK];                                                                          \
    if (K <= NF_BN_CHUNK) {                                                                      \
        nf_index g = NF_BN_CHUNK / K;                                                            \
        for (nf_index r = 0; r < rows; r += g) {                                              \
            nf_index m = rows - r < g ? rows - r : g;                                         \
            DX1(tmp, dy + r * K, x ? x + r * K : NULL, m, K, mh, ml, k1, c2, k2);             \
            nf_stream_copy(dx + r * K, tmp, (size_t)(m * K) * sizeof(T));                     \
        }                                                                                     \
    } else {                                                                                  \
        for (nf_index r = 0; r < rows; r++)                                                   \
            for (nf_index c = 0; c < K; c += NF_BN_CHUNK) {                                      \
                nf_index m = K - c < NF_BN_CHUNK ? K - c : NF_BN_CHUNK;                             \
                DX1(tmp, dy + r * K + c, x ? x + r * K + c : NULL, 1, m, mh + c, ml + c,      \
                    k1 + c, c2 + c, k2 + c);                                                  \
                nf_stream_copy(dx + r * K + c, tmp, (size_t)m * sizeof(T));                   \
            }                                                                                 \
    }                                                                                         \
}
NF_DEF_BN_COLS_DX(nf_bn_cols_dx_f32, float, nf_bn_cols_dx1_f32)
NF_DEF_BN_COLS_DX(nf_bn_cols_dx_f64, double, nf_bn_cols_dx1_f64)

/* Backward column sums over `rows` rows (rows <= NF_BLOCK: one column block), accumulated (+=)
 * into sdy[k] (sum dy) and, when x is given, sdyx[k] (sum dy * ((x - mh[k]) - ml[k])).  The
 * block's sums run in the input precision (tmp: 2*K values), row by row (two input streams; four
 * rows per step, eight streams, was 10% slower), and are added to the float64 sums once per
 * block: the order of additions depends only on the block. */
#define NF_DEF_BN_COLS_BWD_SUMS(NAME, T)                                                      \
NF_CLONES static void NAME(double *restrict sdy, double *restrict sdyx, T *restrict tmp,      \
                           const T *restrict dy, const T *restrict x, nf_index rows,          \
                           nf_index K, const T *restrict mh, const T *restrict ml)            \
{                                                                                             \
    T *restrict p1 = tmp, *restrict p2 = tmp + K;                                             \
    for (nf_index k = 0; k < K; k++) { p1[k] = 0; p2[k] = 0; }                                \
    for (nf_index r = 0; r < rows; r++) {                                                     \
        if (x)                                                                                \
            for (nf_index k = 0; k < K; k++) {                                                \
                p1[k] += dy[r * K + k];                                                       \
                p2[k] += dy[r * K + k] * ((x[r * K + k] - mh[k]) - ml[k]);                    \
            }                                                                                 \
        else                                                                                  \
            for (nf_index k = 0; k < K; k++) p1[k] += dy[r * K + k];                          \
    }                                                                                         \
    for (nf_index k = 0; k < K; k++) sdy[k] += (double)p1[k];                                 \
    if (x)                                                                                    \
        for (nf_index k = 0; k < K; k++) sdyx[k] += (double)p2[k];                            \
}
NF_DEF_BN_COLS_BWD_SUMS(nf_bn_cols_bwd_sums_f32, float)
NF_DEF_BN_COLS_BWD_SUMS(nf_bn_cols_bwd_sums_f64, double)

#endif /* NORMFFN_CHANNELS_H */
