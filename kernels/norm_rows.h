/* norm_rows.h — the row-norm family: LayerNorm, RMSNorm and the residual add + norm (either),
 * forward per row, backward per block of rows.  One body serves the four ops.
 *
 * Contract: the Python check layer validated everything; nothing here re-checks.  Every (n, d)
 * buffer is C-contiguous, n >= 1, d >= 1, one float dtype (f64 says which); no output overlaps
 * an input; optional pointers are NULL when absent.  No GIL, no allocation, no policy: scratch
 * (block partials, the per-thread row buffer) is passed in, and whether outputs stream is the
 * caller's flag.  The OpenMP loops over rows, blocks and columns are in norm_rows.pxd.
 *
 * Which op is chosen by the arguments:
 *   mean != NULL  centre the row (LayerNorm); NULL: RMSNorm
 *   r    != NULL  normalise s = x + r (written to s) instead of x      (forward)
 *   ds   != NULL  add the gradient reaching s to dx                     (backward)
 *
 * Maths (per row of d values; mean and rstd are float64):
 *   add        s = x + r, rounded once in the input dtype (exactly numpy's x + r); below, x is s
 *   LayerNorm  mean = sum(x)/d,  var = sum((x - mean)^2)/d  (biased; two-pass, Chan-Golub-
 *              LeVeque corrected),  rstd = 1/sqrt(var + eps),  xhat = (x - mean) * rstd
 *   RMSNorm    rstd = 1/sqrt(sum(x^2)/d + eps),  xhat = x * rstd
 *   y = xhat * w + b  (b: LayerNorm only)
 * Backward (g = dy * w, or g = dy without weight):
 *   c1 = mean(g * xhat),  c2 = mean(g)  (LayerNorm only)
 *   dx = rstd * ((g - xhat * c1) - c2)  LayerNorm,   dx = rstd * (g - xhat * c1)  RMSNorm
 *   ds addend  dx += ds: with s = x + r carried on downstream, dL/dx = dL/dr = dnorm + ds
 *   dw = sum over rows of dy * xhat,  db = sum over rows of dy
 *
 * Numerics (core.h): blocked sums with NF_LANES accumulators; float32 rows centred as
 * ((x - mean_hi) - mean_lo) (nf_mean_split), so large offsets cost no accuracy; RMSNorm squares
 * in the input precision (no cancellation: every term is >= 0).  Backward works on groups of
 * NF_G rows; a block of rows (fixed by (n, d) only: nf_nr_bwd_plan) accumulates its float64
 * dw/db partials, and nf_nr_finish adds the blocks in block order — 1 and N threads agree
 * bitwise.  NaN/Inf stay in their row (dw/db: in their column).
 *
 * Memory: forward reads x (and r, writing s) from memory once, in the first sum; LayerNorm's
 * second pass (nf_ssd) and the y pass find the row in L1/L2 while the row `ahead` rows on is
 * prefetched.  Backward's stats pass reads dy and x; the dx pass finds them in L1/L2 and, one
 * cache line at a time, prefetches that line of a later group's dy, x and dx (dx to be
 * written: its read-for-ownership otherwise stalls the stores); with the residual, the forward
 * prefetches the later row's y and s lines too.  With `stream`, outputs are built in an L1
 * chunk (s in the per-thread row buffer) and copied out with non-temporal stores.
 *
 * Specialisation: the flags (CENTER, ADD, HAS_W, ACC_W, ACC_B, DX) are `const int` parameters of
 * always-inlined bodies, passed as literals, so each combination compiles to its own
 * branch-free loop.  Each entry point (NF_CLONES: one ISA dispatch per forward row or backward
 * group) holds only the combinations of one case: with the rarer ones in the same function GCC
 * compiled the common LayerNorm backward into ~9% more instructions (callgrind).  The backward
 * group entries take their buffers as restrict-qualified parameters, not through the argument
 * struct, so GCC sees the contract (no output overlaps an input).  Entry points, per SUF:
 *   nf_nr_fwd_{ln,rms,add_ln,add_rms}_SUF   one forward row
 *   nf_nr_fwd_{ln,add_ln}_short_f32   NF_NR_SHORT_G float32 LayerNorm rows, d <= NF_NR_SHORT_D
 *   nf_nr_bwd_ln_group_SUF       LayerNorm backward group: dx, dw iff w, db optional
 *   nf_nr_bwd_ln_nodw_group_SUF  the same with a weight whose dw is not wanted
 *   nf_nr_bwd_ln_sums_group_SUF  dw/db partials alone (no dx)
 *   nf_nr_bwd_ln_ds_group_SUF    LayerNorm backward with the ds addend (add_layer_norm, pre-LN)
 *   nf_nr_bwd_rms_group_SUF      RMSNorm backward, every case (ds or not, dx or not)
 * and, not dispatched: nf_nr_bwd_{ln,ln_nodw,ln_sums,ln_ds,rms}_SUF, the loop over one block's
 * groups calling the matching group entry; nf_nr_finish_SUF, columns of the partials
 * (block-order sum, cast into dw/db).  nf_nr_fwd_pick / nf_nr_bwd_pick (below) choose the row
 * and block functions for a call (the forward one with the rows each call covers).
 */
#ifndef NORMFFN_NORM_ROWS_H
#define NORMFFN_NORM_ROWS_H

#include "core.h"

/* ---------------------------------------------------------------- tuning (docs/tuning.md)
 * Changing NF_G or the block constants changes dw/db bits (they fix the summation order). */
#define NF_G 4                          /* rows per backward group (a layout choice, not timed) */
#define NF_NR_MIN_ELEMS_PER_THREAD 8192  /* fork/join threshold: LayerNorm fwd 2..64 x 768 */
#define NF_NR_SCRATCH_BUDGET (1 << 16)  /* blocks = budget / d, clamped below (scratch bound) */
#define NF_NR_MIN_BLOCKS 8              /* at least this many dw/db partial blocks */
#define NF_NR_MAX_BLOCKS 64             /* at most this many */
#define NF_NR_MIN_BLOCK_ROWS 16         /* and at least this many rows each (4 groups) */
#define NF_NR_PF_BYTES 8192             /* fwd prefetch >= this far ahead: 8192x768 f32, 2 thr */
#define NF_NR_PF_MAX_ROWS 16            /* ... and at most this many rows ahead */
#define NF_NR_BWD_PF_BYTES 65536        /* bwd prefetch: ~this far ahead in each array, */
#define NF_NR_BWD_PF_MAX_GROUPS 5       /* ... 1 to this many groups: 8192x768, 2048x4096 f32 */
#define NF_NR_REDUCE_CHUNK 512          /* columns per task in the partials' sum (not timed) */

/* ---------------------------------------------------------------- arguments
 * Untyped, so the OpenMP loops (norm_rows.pxd) are written once; f64 selects the body. */
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
} nf_nr_fwd_args;

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
    nf_index nb, rows_per_block, width;   /* the block plan (nf_nr_bwd_plan) */
    int stream, f64;
} nf_nr_bwd_args;

/* ---------------------------------------------------------------- plans */

/* Threads for `work` elements (forward, backward: n * d; the partials' sum: nb * width). */
static inline int nf_nr_threads(nf_index work)
{
    return nf_threads_for(work, NF_NR_MIN_ELEMS_PER_THREAD);
}

/* Forward prefetch distance in rows: >= NF_NR_PF_BYTES and 2 rows, <= NF_NR_PF_MAX_ROWS. */
static inline nf_index nf_nr_ahead(nf_index d, nf_index itemsize)
{
    nf_index a = NF_NR_PF_BYTES / (d * itemsize);
    if (a < 2) a = 2;
    if (a > NF_NR_PF_MAX_ROWS) a = NF_NR_PF_MAX_ROWS;
    return a;
}

/* Backward prefetch distance in groups: NF_NR_BWD_PF_BYTES of each array, within [1,
 * NF_NR_BWD_PF_MAX_GROUPS].  One thread, float32, dx prefetched for writing: 2048 x 4096 (1 group)
 * 3.6 us a row against 4.5 at 5 groups; 8192 x 768 and 65536 x 96 alike from 2 to 5. */
static inline nf_index nf_nr_bwd_ahead(nf_index d, nf_index itemsize)
{
    nf_index g = NF_NR_BWD_PF_BYTES / (NF_G * d * itemsize);
    if (g < 1) g = 1;
    if (g > NF_NR_BWD_PF_MAX_GROUPS) g = NF_NR_BWD_PF_MAX_GROUPS;
    return g;
}

/* The backward block plan, a function of (n, d) and which partials are wanted only: nb blocks
 * of rows_per_block rows (a whole number of NF_G-row groups), `width` float64 partials each. */
static inline void nf_nr_bwd_plan(nf_index n, nf_index d, int want_w, int want_b,
                                  nf_index *nb, nf_index *rows_per_block, nf_index *width)
{
    nf_index b = NF_NR_SCRATCH_BUDGET / d;
    if (b > NF_NR_MAX_BLOCKS) b = NF_NR_MAX_BLOCKS;
    if (b < NF_NR_MIN_BLOCKS) b = NF_NR_MIN_BLOCKS;
    if (b > n) b = n;
    nf_index r = (n + b - 1) / b;
    if (r < NF_NR_MIN_BLOCK_ROWS) r = NF_NR_MIN_BLOCK_ROWS;
    r = ((r + NF_G - 1) / NF_G) * NF_G;
    *rows_per_block = r;
    *nb = (n + r - 1) / r;
    *width = ((nf_index)(want_w != 0) + (nf_index)(want_b != 0)) * d;
}

/* float64 scratch elements a backward call needs (0 when no dw/db is wanted). */
static inline nf_index nf_nr_bwd_scratch(nf_index n, nf_index d, int want_w, int want_b)
{
    nf_index nb, rpb, width;
    if (n < 1 || d < 1) return 0;
    nf_nr_bwd_plan(n, d, want_w, want_b, &nb, &rpb, &width);
    return nb * width;
}

/* The backward entry points' cases (a literal at every use). */
enum { NF_NR_LN, NF_NR_LN_NODW, NF_NR_LN_SUMS, NF_NR_LN_DS, NF_NR_RMS };

/* ---------------------------------------------------------------- typed bodies */

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

/* ---------------------------------------------------------------- short float32 LayerNorm rows
 * Forward of float32 LayerNorm and add + LayerNorm rows, d <= NF_NR_SHORT_D, NF_NR_SHORT_G rows
 * per call (nf_nr_fwd_ln_short_f32, nf_nr_fwd_add_ln_short_f32).  The maths and the numerics of
 * nf_nr_fwd_body: the sum and the centred sums in float lanes (here 16: two 8-wide vectors, so
 * at most 8 terms a lane, as the blocked sums' 32 lanes over a 256-element block), converted to
 * float64 and added in a fixed tree; the d % 8 tail in float64; deviations formed as
 * ((x - mean_hi) - mean_lo); the same corrected two-pass variance, its divisions by d done as
 * products with 1/d (float64: a last-bit difference in mean and var); y by nf_nr_affine_f32.
 * A row's result does not depend on the group it falls in, and the two entries share the
 * arithmetic, so add_layer_norm(x, r) gives layer_norm(x + r)'s bits, as on long rows.
 *
 * Why a group: a short row's time is the latency of its dependency chain (sum, tree, divide,
 * mean split, centred sums, trees, divide, sqrt, divide, y), not its instruction count or its
 * bytes: at d = 96 the per-row body cost ~46 ns a row from L2 as from L3, twice a copy's time.
 * The group runs each phase (sums; centred sums; statistics; y) over all its rows before the
 * next, so the rows' chains overlap in the out-of-order window: ~30 ns a row (docs/tuning.md).
 *
 * Vectors are loaded by dereferencing an unaligned, may_alias vector type: a memcpy into a
 * vector local compiled, in the AVX2 clone, to two 16-byte stores and one 32-byte reload
 * (a failed store forward per load, 3x slower). */
#define NF_NR_SHORT_D 128
#define NF_NR_SHORT_G 8

typedef float nf_v8f __attribute__((vector_size(32)));
typedef float nf_v8f_u __attribute__((vector_size(32), aligned(4), may_alias));
typedef float nf_v4f __attribute__((vector_size(16)));
typedef double nf_v4d __attribute__((vector_size(32)));

#define nf_load_v8f(p) (*(const nf_v8f_u *)(p))

/* The 8 float lanes of *s in float64, added in a fixed tree.  (Vectors pass by pointer: by value
 * they would change the baseline clone's ABI.) */
NF_INLINE double nf_lanes_sum_v8f(const nf_v8f *s)
{
    nf_v4f lo = {(*s)[0], (*s)[1], (*s)[2], (*s)[3]}, hi = {(*s)[4], (*s)[5], (*s)[6], (*s)[7]};
    nf_v4d t = __builtin_convertvector(lo, nf_v4d) + __builtin_convertvector(hi, nf_v4d);
    return (t[0] + t[2]) + (t[1] + t[3]);
}

/* sum(v[0:d]) in 16 float lanes, then float64, of v = x, or (ADD) v = x + r rounded once and
 * stored to s[0:d] (as nf_sum_ex does for long rows: the add-norm's sum is the norm's on s). */
NF_INLINE double nf_short_sum(float *restrict s, const float *restrict x,
                              const float *restrict r, nf_index d, const int ADD)
{
    nf_v8f s0 = {0}, s1 = {0};
    nf_index j = 0;
    for (; j + 16 <= d; j += 16) {
        nf_v8f v0 = nf_load_v8f(x + j), v1 = nf_load_v8f(x + j + 8);
        if (ADD) {
            v0 += nf_load_v8f(r + j);
            v1 += nf_load_v8f(r + j + 8);
            *(nf_v8f_u *)(s + j) = v0;
            *(nf_v8f_u *)(s + j + 8) = v1;
        }
        s0 += v0;
        s1 += v1;
    }
    if (j + 8 <= d) {
        nf_v8f v0 = nf_load_v8f(x + j);
        if (ADD) {
            v0 += nf_load_v8f(r + j);
            *(nf_v8f_u *)(s + j) = v0;
        }
        s0 += v0;
        j += 8;
    }
    double tail = 0.0;
    for (; j < d; j++) {
        float v = ADD ? x[j] + r[j] : x[j];
        if (ADD) s[j] = v;
        tail += (double)v;
    }
    s0 += s1;
    return nf_lanes_sum_v8f(&s0) + tail;
}

/* sum(t^2) and (in *dev) sum(t) of t = (x - mh) - ml over x[0:d]; mean = mh + ml as a double
 * for the float64 tail. */
NF_INLINE double nf_short_ssd(const float *x, nf_index d, float mh, float ml, double mean,
                              double *dev)
{
    nf_v8f q0 = {0}, q1 = {0}, e0 = {0}, e1 = {0};
    nf_index j = 0;
    for (; j + 16 <= d; j += 16) {
        nf_v8f t0 = (nf_load_v8f(x + j) - mh) - ml, t1 = (nf_load_v8f(x + j + 8) - mh) - ml;
        e0 += t0;
        e1 += t1;
        q0 += t0 * t0;
        q1 += t1 * t1;
    }
    if (j + 8 <= d) {
        nf_v8f t0 = (nf_load_v8f(x + j) - mh) - ml;
        e0 += t0;
        q0 += t0 * t0;
        j += 8;
    }
    double dev_tail = 0.0, ssd_tail = 0.0;
    for (; j < d; j++) {
        double t = (double)x[j] - mean;
        dev_tail += t;
        ssd_tail += t * t;
    }
    e0 += e1;
    q0 += q1;
    *dev = nf_lanes_sum_v8f(&e0) + dev_tail;
    return nf_lanes_sum_v8f(&q0) + ssd_tail;
}

/* Rows [i0, i0 + NF_NR_SHORT_G) clipped to n; ADD: the rows of s = x + r (stored to s, built in
 * a local buffer when streamed), as nf_nr_fwd_body's add + LayerNorm — so add_layer_norm(x, r)
 * gives layer_norm(x + r)'s bits here too.  The mean split stays inside each row's sum
 * iteration: in a test build, a separate loop of the rows' splits, which GCC 12 vectorised over
 * the rows, gave low halves of 0 (docs/tuning.md). */
NF_INLINE void nf_nr_fwd_ln_short_body(const nf_nr_fwd_args *a, nf_index i0, const int ADD)
{
    enum { G = NF_NR_SHORT_G };
    const nf_index d = a->d;
    const nf_index g = a->n - i0 < G ? a->n - i0 : G;
    const float *x = (const float *)a->x + i0 * d;
    const float *w = (const float *)a->w, *b = (const float *)a->b;
    float *y = (float *)a->y + i0 * d;
    float sbuf[ADD ? G * NF_NR_SHORT_D : 1];   /* s when streamed */
    float *s = NULL;                            /* the rows normalised: x, or s = x + r */
    nf_index lds = d;
    if (ADD) {
        if (a->stream) { s = sbuf; lds = NF_NR_SHORT_D; } else s = (float *)a->s + i0 * d;
    }
    const float *src = ADD ? s : x;
    const float *res = ADD ? (const float *)a->r + i0 * d : NULL;   /* the residual rows */
    double mean0[G], dev[G], ssd[G], rstd[G];
    float mh[G], ml[G];

    /* the group `ahead` rows on (at least one group), into L1: the group's first pass then
     * loads from L1 (prefetching into L2 only, as the long rows do, was ~10% slower from L3) */
    nf_index p0 = i0 + (a->ahead > G ? a->ahead : G), p1 = p0 + G < a->n ? p0 + G : a->n;
    size_t pfbytes = p0 < p1 ? (size_t)((p1 - p0) * d) * sizeof(float) : 0;
    for (size_t o = 0; o < pfbytes; o += 64) {
        __builtin_prefetch((const char *)((const float *)a->x + p0 * d) + o, 0, 3);
        if (ADD) __builtin_prefetch((const char *)(res + (p0 - i0) * d) + o, 0, 3);
    }

    const double inv_d = 1.0 / (double)d;     /* multiplies instead of 4 divisions a row */
    for (nf_index r = 0; r < g; r++) {
        mean0[r] = nf_short_sum(ADD ? s + r * lds : NULL, x + r * d,
                                ADD ? res + r * d : NULL, d, ADD) * inv_d;
        nf_mean_split_f32(mean0[r], &mh[r], &ml[r]);
    }
    for (nf_index r = 0; r < g; r++)
        ssd[r] = nf_short_ssd(src + r * lds, d, mh[r], ml[r], mean0[r], &dev[r]);
    for (nf_index r = 0; r < g; r++) {
        double shift = dev[r] * inv_d;
        double mean = mean0[r] + shift;
        double var = (ssd[r] - dev[r] * shift) * inv_d;
        if (var < 0) var = 0;  /* cannot happen in exact arithmetic; guards rounding */
        rstd[r] = 1.0 / sqrt(var + a->eps);
        a->mean[i0 + r] = mean;
        a->rstd[i0 + r] = rstd[r];
        nf_mean_split_f32(mean, &mh[r], &ml[r]);
    }
    for (nf_index r = 0; r < g; r++) {
        if (a->stream) {
            float tmp[NF_NR_SHORT_D];
            nf_nr_affine_f32(tmp, src + r * lds, w, b, d, mh[r], ml[r], (float)rstd[r], 1);
            nf_stream_copy(y + r * d, tmp, (size_t)d * sizeof(float));
            if (ADD)
                nf_stream_copy((float *)a->s + (i0 + r) * d, src + r * lds,
                               (size_t)d * sizeof(float));
        } else {
            nf_nr_affine_f32(y + r * d, src + r * lds, w, b, d, mh[r], ml[r], (float)rstd[r], 1);
        }
    }
}

NF_CLONES static void nf_nr_fwd_ln_short_f32(const nf_nr_fwd_args *a, nf_index i0, int tid)
{
    (void)tid;
    nf_nr_fwd_ln_short_body(a, i0, 0);
}

NF_CLONES static void nf_nr_fwd_add_ln_short_f32(const nf_nr_fwd_args *a, nf_index i0, int tid)
{
    (void)tid;
    nf_nr_fwd_ln_short_body(a, i0, 1);
}

/* ---------------------------------------------------------------- choosing the entry point */

typedef void (*nf_nr_fwd_fn)(const nf_nr_fwd_args *a, nf_index i, int tid);
typedef void (*nf_nr_bwd_fn)(const nf_nr_bwd_args *a, nf_index blk);
typedef void (*nf_nr_finish_fn)(const nf_nr_bwd_args *a, nf_index j0, nf_index j1);

/* The forward function for a call and the rows each call covers (*step): fn(a, i, tid) runs rows
 * [i, i + *step) clipped to n, on thread tid, for i a multiple of *step. */
static inline nf_nr_fwd_fn nf_nr_fwd_pick(const nf_nr_fwd_args *a, nf_index *step)
{
    *step = 1;
    if (a->f64) {
        if (a->mean) return a->r ? nf_nr_fwd_add_ln_f64 : nf_nr_fwd_ln_f64;
        return a->r ? nf_nr_fwd_add_rms_f64 : nf_nr_fwd_rms_f64;
    }
    if (a->mean && a->d <= NF_NR_SHORT_D) {
        *step = NF_NR_SHORT_G;
        return a->r ? nf_nr_fwd_add_ln_short_f32 : nf_nr_fwd_ln_short_f32;
    }
    if (a->mean) return a->r ? nf_nr_fwd_add_ln_f32 : nf_nr_fwd_ln_f32;
    return a->r ? nf_nr_fwd_add_rms_f32 : nf_nr_fwd_rms_f32;
}

/* The backward block function for a call (block blk: fn(a, blk); a->nb etc. planned). */
static inline nf_nr_bwd_fn nf_nr_bwd_pick(const nf_nr_bwd_args *a)
{
    int f64 = a->f64;
    if (!a->mean) return f64 ? nf_nr_bwd_rms_f64 : nf_nr_bwd_rms_f32;
    if (!a->dx) return f64 ? nf_nr_bwd_ln_sums_f64 : nf_nr_bwd_ln_sums_f32;
    if (a->ds) return f64 ? nf_nr_bwd_ln_ds_f64 : nf_nr_bwd_ln_ds_f32;
    if (a->w && !a->dw) return f64 ? nf_nr_bwd_ln_nodw_f64 : nf_nr_bwd_ln_nodw_f32;
    return f64 ? nf_nr_bwd_ln_f64 : nf_nr_bwd_ln_f32;
}

static inline nf_nr_finish_fn nf_nr_finish_pick(const nf_nr_bwd_args *a)
{
    return a->f64 ? nf_nr_finish_f64 : nf_nr_finish_f32;
}

#endif /* NORMFFN_NORM_ROWS_H */
