/* norm_rows.h — row-norm bodies: LayerNorm forward per row, backward per group of NF_G rows.
 *
 * Contract: the caller (kernels/layer_norm.pyx, after the Python check layer) passes rows of a
 * C-contiguous (n_rows, n) matrix of one float dtype, n >= 1, outputs not overlapping inputs;
 * optional vectors (w, b, accumulators, dx) are NULL when absent.  Nothing here allocates, takes
 * the GIL or decides policy: whether outputs stream and how rows are split over threads and
 * blocks is the caller's.
 *
 * Maths (per row of length n; mean and rstd are float64):
 *   forward    mean = sum(x)/n,  var = sum((x - mean)^2)/n  (biased),  rstd = 1/sqrt(var + eps)
 *              y = (x - mean) * rstd * w + b
 *   backward   xhat = (x - mean) * rstd,  g = dy * w  (g = dy without w)
 *              c1 = mean(g * xhat),  c2 = mean(g),  dx = rstd * (g - xhat * c1 - c2)
 *              dw += sum over rows of dy * xhat,  db += sum over rows of dy  (float64 partials)
 *
 * Numerics (core.h): blocked sums with NF_LANES accumulators, the corrected two-pass variance,
 * float32 rows centred as ((x - mean_hi) - mean_lo) via nf_mean_split.
 *
 * Memory traffic: forward reads x from memory once (the sum); the second pass (nf_ssd) and the
 * affine pass find it in L1/L2 while prefetching the next row the thread will normalise.
 * Backward's stats pass reads dy and x; the dx pass finds them in L1/L2 and, one cache line at a
 * time, prefetches the same line of a later group's rows.  With `stream`, outputs are built in an
 * L1 chunk of NF_CHUNK elements and copied out with non-temporal stores (core.h).
 *
 * Each body is written once in norm_rows_t.h and stamped for float (SUF = f32) and double
 * (SUF = f64) below.  The entry points, per SUF:
 *   nf_ln_fwd_row_SUF         one forward row
 *   nf_ln_bwd_rows_SUF        backward for 1..NF_G rows: dx, dweight iff w, dbias optional
 *   nf_ln_bwd_rows_nodw_SUF   the same with a weight whose dweight is not wanted
 *   nf_ln_bwd_sums_SUF        the dweight/dbias partials alone (no dx wanted)
 * All are NF_CLONES (one ISA dispatch per row or group); everything they call is NF_INLINE.
 */
#ifndef NORMFFN_NORM_ROWS_H
#define NORMFFN_NORM_ROWS_H

#include "core.h"

/* Rows per backward group: the dx pass walks NF_G rows column by column, so each column's
 * dweight/dbias partial is added to its float64 accumulator once per group, not once per row. */
#define NF_G 4

#define T float
#define SUF f32
#include "norm_rows_t.h"
#undef T
#undef SUF

#define T double
#define SUF f64
#include "norm_rows_t.h"
#undef T
#undef SUF

#endif /* NORMFFN_NORM_ROWS_H */
