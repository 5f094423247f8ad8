/* bn_channels.h — the BatchNorm family: per-channel statistics, elementwise pass and backward
 * sums, written once for float and double in bn_channels_t.h (included twice below).
 *
 * Contract: pointers are valid for the sizes passed and sizes are >= 1 (the Python check layer
 * validated shapes, dtypes and contiguity; kernels/batch_norm.pyx passes only whole blocks);
 * outputs do not overlap inputs.  Nothing here takes the GIL, allocates or keeps state: scratch
 * (`tmp`) is passed in, and whether an output is streamed is the caller's `stream` flag.
 *
 * Maths, per channel c over its m = N*S values (S = prod(spatial)):
 *   mean = sum(x) / m,  M2 = sum((x - mean)^2),  var = M2 / m (biased),  rstd = 1/sqrt(var+eps)
 *   forward:   y  = (x - mean) * (rstd * weight) + bias
 *   backward:  sdy = sum(dy),  sdyx = sum(dy * (x - mean))
 *              training: dx = ((dy - c2) - (x - mean) * k1) * k2,
 *                        c2 = sdy/m,  k1 = rstd^2 * sdyx/m,  k2 = rstd * weight
 *              eval:     dx = dy * k2
 *              dweight = sdyx * rstd,  dbias = sdy
 *
 * Two shapes of work, one per memory layout (batch_norm.pyx picks):
 *  - rows:    a contiguous run of one channel's values (the row (n, c, :) of an (N, C, S) array);
 *             every value of the run shares the channel's scalars.
 *  - columns: a block of `rows` rows of a row-major (M, K) matrix (channels-last: K = C; or an
 *             (N, C, S) array with small S seen as (N, C*S)); column k has its own constants,
 *             passed as K-vectors, and inner loops run along k (contiguous, vectorised).
 *
 * Numerics (core.h's scheme):
 *  - Statistics of a block are a corrected two-pass sum while the block is in L1/L2 (x is read
 *    from memory once), with partial sums in the input precision over at most NF_BLOCK values
 *    and float64 beyond; blocks are merged with Chan's formula (nf_chan, nf_bn_cols_chan) in
 *    index order.  Block sizes depend only on the shape: results never depend on threads.
 *  - float32 values are centred as ((x - mean_hi) - mean_lo) (nf_mean_split): an offset of
 *    1e3..1e4 costs no accuracy.
 *
 * Contents (SUF = f32 | f64)
 *   nf_bn_row_stats_SUF       mean, M2 of one run (segments of NF_BN_SEG, Chan-merged)
 *   nf_bn_row_affine_SUF      y = ((x - mh) - ml) * a + b over one run (optionally streamed)
 *   nf_bn_row_bwd_sums_SUF    sdy, sdyx of one run
 *   nf_bn_row_dx_SUF          dx of one run (optionally streamed)
 *   nf_bn_block_rows          rows per column block (a function of K and the itemsize only)
 *   nf_bn_peel                columns peeled off each row so the rest is cache-line aligned
 *   nf_bn_cols_stats_SUF      column mean, M2 of one block
 *   nf_bn_cols_chan           Chan merge of a block's column statistics
 *   nf_bn_cols_affine_SUF     y of a block of rows (stored normally: the column kernel never
 *                             streams, it measured 0-15% slower with non-temporal stores)
 *   nf_bn_cols_bwd_sums_SUF   column sdy, sdyx of one block
 *   nf_bn_cols_dx_SUF         dx of a block of rows (stored normally, as above)
 */
#ifndef NORMFFN_BN_CHANNELS_H
#define NORMFFN_BN_CHANNELS_H

#include "core.h"

/* ---------------------------------------------------------------- tuning
 * Chosen by cache fit when the kernels were written (no recorded sweep; see docs/tuning.md). */
/* Runs longer than this are reduced in segments (16 KiB of float32: the second pass hits L1). */
#define NF_BN_SEG 4096
/* Column blocks hold about this many bytes of x (the block's second pass hits L2; docs/tuning.md:
 * 64 KiB -> 512 KiB made the one-thread statistics 1.4x and the training forward 5-10% faster). */
#define NF_BN_BLOCK_BYTES (512 * 1024)
/* Row unroll of the column reductions (fewer loads/stores of the K partial sums). */
#define NF_BN_RU 4

/* Rows per column block for row length K: a function of (K, itemsize) only, a multiple of
 * NF_BN_RU, at most NF_BLOCK (a block's partial sums then add at most NF_BLOCK values). */
static inline nf_index nf_bn_block_rows(nf_index K, size_t itemsize)
{
    nf_index r = (nf_index)(NF_BN_BLOCK_BYTES / ((size_t)K * itemsize));
    if (r > NF_BLOCK) r = NF_BLOCK;
    r -= r % NF_BN_RU;
    return r < NF_BN_RU ? NF_BN_RU : r;
}

/* Columns to peel off the front of every row so that the rest of each row starts on a cache
 * line, for a row-major (rows, K) elementwise pass over the arrays a, b (and c; may be NULL;
 * used by nf_bn_cols_dx):
 * when they share one offset within a cache line and a row is a whole number of lines, the
 * split (line-crossing) AVX-512 loads and stores of a misaligned row become aligned ones.
 * NumPy's large arrays start 16 bytes into a cache line here; see docs/tuning.md.  Otherwise 0.
 * Only where the loop splits changes: every value is computed by the same expression. */
static inline nf_index nf_bn_peel(const void *a, const void *b, const void *c, nf_index K,
                                  size_t itemsize)
{
    uintptr_t off = (uintptr_t)a & 63;
    if (((uintptr_t)b & 63) != off || (c && ((uintptr_t)c & 63) != off)
        || ((size_t)K * itemsize) % 64 != 0 || off % itemsize != 0)
        return 0;
    nf_index h = (nf_index)(((64 - off) & 63) / itemsize);
    return h < K ? h : 0;
}

/* nf_bn_cols_stats prefetches the next block (pfbytes bytes) spread over its two passes of
 * `rows` rows: after row r of pass p (0 or 1) it has requested this many bytes. */
NF_INLINE size_t nf_bn_pf_span(size_t pfbytes, nf_index rows, int pass, nf_index r)
{
    return pfbytes * (size_t)(pass * rows + r) / (size_t)(2 * rows);
}

/* Chan merge of a block of nb rows (bm, bm2) into the running (na rows; mean, m2), per column:
 * nf_chan vectorised over K columns that share the counts. */
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

/* ---------------------------------------------------------------- typed kernels */

#define T float
#define SUF f32
#include "bn_channels_t.h"
#undef T
#undef SUF

#define T double
#define SUF f64
#include "bn_channels_t.h"
#undef T
#undef SUF

#endif /* NORMFFN_BN_CHANNELS_H */
