/* rms_rows.h — row bodies of RMSNorm and of the residual add + norm (LayerNorm or RMSNorm).
 *
 * Contract: the Python check layer validated everything; nothing here re-checks.  Every (n, d)
 * buffer is C-contiguous, n >= 1, d >= 1, one float dtype (f64 says which); no output overlaps
 * an input; optional pointers are NULL when absent.  No GIL, no allocation: scratch (the block
 * partials, the per-thread row buffer) is passed in.  The OpenMP loops are in rms_rows.pxd.
 *
 * One body serves four ops, chosen by which pointers are set:
 *   mean != NULL  centre the row (LayerNorm); NULL: RMSNorm
 *   r    != NULL  normalise s = x + r (written to s) instead of x
 *
 * Maths (per row of d values; "mean" below is the float64 row mean):
 *   s     = x + r                     exact in the input dtype (one rounding, as numpy's x + r)
 *   LayerNorm:  mean = sum(s)/d,  var = sum((s - mean)^2)/d (two-pass, Chan-Golub-LeVeque
 *               corrected),  rstd = 1/sqrt(var + eps),  xhat = (s - mean) * rstd
 *   RMSNorm:    rstd = 1/sqrt(sum(s^2)/d + eps),  xhat = s * rstd
 *   y     = xhat * w [+ b]
 * Backward (g = dy * w, or dy without weight):
 *   c1 = mean(g * xhat),  c2 = mean(g) (LayerNorm only)
 *   dx = rstd * ((g - xhat * c1) - c2)  [+ ds]   LayerNorm
 *   dx = rstd * (g - xhat * c1)         [+ ds]   RMSNorm
 *   dw = sum_rows dy * xhat,  db = sum_rows dy
 *
 * Numerics and memory (those of the LayerNorm kernel, core.h):
 *  - Forward, one row per call: the first pass reads x (and r, writing s) from memory and sums
 *    s (LayerNorm) or s^2 (RMSNorm) in blocks (NF_LANES partial sums in the input precision over
 *    NF_BLOCK elements, flushed to float64); LayerNorm's second pass (sum of squared deviations)
 *    and the y pass find the row in L1/L2.  Meanwhile the row `ahead` rows on is prefetched.
 *    With `stream`, y and s are built in L1 (s in a per-thread row buffer) and written with
 *    non-temporal stores.
 *  - float32 rows are centred as ((s - mean_hi) - mean_lo) (core.h), so large offsets cost no
 *    accuracy.  RMSNorm squares in the input precision (no cancellation: all terms are >= 0).
 *  - Backward: rows in groups of NF_RN_G; a block of rows_per_block rows (fixed by (n, d) only)
 *    accumulates its float64 dweight/dbias partials; nf_rn_finish adds the blocks in block order.
 *    So 1 and N threads give bitwise-identical results.
 *  - The centred path with r == NULL and ds == NULL is the LayerNorm kernel's arithmetic,
 *    operation for operation (the tests check add_layer_norm against layer_norm bitwise).
 *  - NaN/Inf stay in their row (dweight/dbias: in their column).
 */
#ifndef NORMFFN_RMS_ROWS_H
#define NORMFFN_RMS_ROWS_H

#include "core.h"

/* ---------------------------------------------------------------- tuning
 * LayerNorm's values (kernels/layer_norm.pyx, measured there at 8192x768 and 2048x4096
 * float32, 2 threads); not re-measured for these ops. */
#define NF_RN_G 4                         /* rows per backward group */
#define NF_RN_MIN_ELEMS_PER_THREAD 32768  /* below this per thread, fork/join costs more */
#define NF_RN_SCRATCH_BUDGET (1 << 16)    /* float64 partials per row of x, at most ... */
#define NF_RN_MIN_BLOCKS 8                /* ... but at least this many blocks ... */
#define NF_RN_MAX_BLOCKS 64               /* ... and at most this many */
#define NF_RN_PF_BYTES 8192               /* forward prefetches >= this many bytes ahead */
#define NF_RN_PF_MAX_ROWS 16
#define NF_RN_BWD_PF_GROUPS 5             /* backward prefetches this many groups ahead */
#define NF_RN_REDUCE_CHUNK 512            /* columns per task when block partials are summed */

/* ---------------------------------------------------------------- arguments
 * Untyped, so the OpenMP loops (rms_rows.pxd) are written once; f64 selects the body. */
typedef struct {
    void *y;               /* OUT (n, d) */
    void *s;               /* OUT (n, d) x + r; NULL without r */
    double *mean;          /* OUT (n,); NULL: RMSNorm */
    double *rstd;          /* OUT (n,) */
    const void *x;         /* IN (n, d) */
    const void *r;         /* IN (n, d) residual, or NULL */
    const void *w, *b;     /* IN (d,) or NULL; b only with mean */
    void *rowbuf;          /* WORK threads * d: where s is built when streamed (r and stream) */
    nf_index n, d;
    nf_index ahead;        /* rows between a row and the one prefetched meanwhile */
    double eps;
    int stream, f64;
} nf_rn_fwd_args;

typedef struct {
    void *dx;              /* OUT (n, d), or NULL: dx not wanted */
    void *dw, *db;         /* OUT (d,) finished dweight / dbias, or NULL: not wanted */
    double *work;          /* WORK nb * width float64 block partials (NULL when width == 0) */
    const void *dy;        /* IN (n, d) */
    const void *x;         /* IN (n, d) the normalised input (s for the add ops) */
    const void *ds;        /* IN (n, d) added to dx, or NULL */
    const void *w;         /* IN (d,) or NULL; dw needs it */
    const double *mean;    /* IN (n,); NULL: RMSNorm */
    const double *rstd;    /* IN (n,) */
    nf_index n, d;
    nf_index nb, rows_per_block, width;   /* the block plan (nf_rn_bwd_plan) */
    int stream, f64;
} nf_rn_bwd_args;

/* ---------------------------------------------------------------- plans */

/* Threads for a forward or backward call over n rows of d. */
static inline int nf_rn_threads(nf_index n, nf_index d)
{
    return nf_threads_for(n * d, NF_RN_MIN_ELEMS_PER_THREAD);
}

/* Forward prefetch distance in rows: >= NF_RN_PF_BYTES and 2 rows, <= NF_RN_PF_MAX_ROWS. */
static inline nf_index nf_rn_ahead(nf_index d, nf_index itemsize)
{
    nf_index a = NF_RN_PF_BYTES / (d * itemsize);
    if (a < 2) a = 2;
    if (a > NF_RN_PF_MAX_ROWS) a = NF_RN_PF_MAX_ROWS;
    return a;
}

/* The backward block plan, a function of (n, d) and which partials are wanted only: nb blocks
 * of rows_per_block rows (a whole number of groups), `width` float64 partials per block. */
static inline void nf_rn_bwd_plan(nf_index n, nf_index d, int want_w, int want_b,
                                  nf_index *nb, nf_index *rows_per_block, nf_index *width)
{
    nf_index b = NF_RN_SCRATCH_BUDGET / d;
    if (b > NF_RN_MAX_BLOCKS) b = NF_RN_MAX_BLOCKS;
    if (b < NF_RN_MIN_BLOCKS) b = NF_RN_MIN_BLOCKS;
    if (b > n) b = n;
    nf_index r = (n + b - 1) / b;
    r = ((r + NF_RN_G - 1) / NF_RN_G) * NF_RN_G;
    *rows_per_block = r;
    *nb = (n + r - 1) / r;
    *width = ((nf_index)(want_w != 0) + (nf_index)(want_b != 0)) * d;
}

/* float64 scratch elements a backward call needs (0 when no dw/db is wanted). */
static inline nf_index nf_rn_bwd_scratch(nf_index n, nf_index d, int want_w, int want_b)
{
    nf_index nb, rpb, width;
    if (n < 1 || d < 1) return 0;
    nf_rn_bwd_plan(n, d, want_w, want_b, &nb, &rpb, &width);
    return nb * width;
}

/* ---------------------------------------------------------------- typed bodies */

#define T float
#define SUF f32
#include "rms_rows_t.h"
#undef T
#undef SUF

#define T double
#define SUF f64
#include "rms_rows_t.h"
#undef T
#undef SUF

/* ---------------------------------------------------------------- untyped entry points */

/* Row i (thread tid) of a forward call. */
static inline void nf_rn_fwd_row(const nf_rn_fwd_args *a, nf_index i, int tid)
{
    if (a->f64) nf_rn_fwd_row_f64(a, i, tid);
    else nf_rn_fwd_row_f32(a, i, tid);
}

/* Block blk of a backward call: dx of its rows and its dw/db partials. */
static inline void nf_rn_bwd_block(const nf_rn_bwd_args *a, nf_index blk)
{
    if (a->f64) nf_rn_bwd_block_f64(a, blk);
    else nf_rn_bwd_block_f32(a, blk);
}

/* Columns [j0, j1) of the partials: summed over blocks in block order, cast into dw/db. */
static inline void nf_rn_finish(const nf_rn_bwd_args *a, nf_index j0, nf_index j1)
{
    if (a->f64) nf_rn_finish_f64(a, j0, j1);
    else nf_rn_finish_f32(a, j0, j1);
}

#endif /* NORMFFN_RMS_ROWS_H */
