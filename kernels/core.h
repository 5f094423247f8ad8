/* core.h — the C core every kernel family builds on.
 *
 * Contract: pointers are valid for the sizes passed (the Python check layer validated shapes,
 * dtypes and contiguity); sizes are >= 1 unless a function says otherwise.  Nothing here takes
 * the GIL or allocates.
 *
 * Build rules (setup.py): -O3, never -ffast-math (NaN/Inf must propagate), -ffp-contract=off (no
 * FMA contraction: every ISA path rounds identically).  Hot functions are compiled per ISA with
 * NF_CLONES (GCC target_clones: AVX-512 = x86-64-v4, AVX2 = x86-64-v3, baseline) and picked at
 * load time; helpers they call are NF_INLINE, so one dispatch covers a whole row or group of
 * rows.
 *
 * Contents
 *   NF_CLONES, NF_INLINE      ISA dispatch, forced inlining into the dispatched caller
 *   nf_index                  signed size type (Py_ssize_t)
 *   NF_LANES, NF_BLOCK        the blocked-sum scheme (below)
 *   NF_CHUNK                  L1 chunk through which streamed outputs are built
 *   nf_tree_sum               fixed pairwise sum of NF_LANES float64 accumulators
 *   nf_split                  double -> hi + lo floats
 *   nf_prefetch_range(_w)     prefetch a byte range into L2 (_w: to be written)
 *   nf_stream_copy/_fence     non-temporal stores (no read-for-ownership)
 *   nf_threads_for            the thread plan: OpenMP threads for a given amount of work
 *   nf_max_threads / nf_set_max_threads   the calling thread's OpenMP thread count
 *   nf_chan                   Chan et al. merge of (count, mean, M2)
 *   nf_reduce_blocks          fixed-order sum of float64 block partials
 * Typed, stamped once per dtype from core_t.h (SUF = f32 for float, f64 for double):
 *   nf_sum_ex_SUF             blocked sum of x, x*x, x + r or (x + r)^2 (storing x + r)
 *   nf_sum_SUF                blocked sum of x
 *   nf_ssd_SUF                corrected two-pass sum of squared deviations
 *   nf_mean_split_SUF         the float64 mean as the (hi, lo) pair a row is centred with
 *
 * Numerics (used by every norm):
 *  - Sums use NF_LANES independent accumulators, blocked: partial sums in the input precision
 *    over NF_BLOCK elements, then float64, then a fixed tree.  A float32 sum's error is then
 *    ~(NF_BLOCK/NF_LANES) ulps of a block — it does not grow with n — and the order is fixed.
 *  - Variances are two-pass with the Chan-Golub-LeVeque correction of the mean.
 *  - float32 values are centred as ((x - mean_hi) - mean_lo): x - mean_hi is exact near the mean
 *    (Sterbenz), so a row of 1e4 + tiny noise normalises as accurately as in float64.
 */
#ifndef NORMFFN_CORE_H
#define NORMFFN_CORE_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* ---------------------------------------------------------------- dispatch */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(NORMFFN_NO_CLONES) && !defined(__SANITIZE_ADDRESS__)
#define NF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NF_CLONES
#endif

#define NF_INLINE static inline __attribute__((always_inline))

typedef ptrdiff_t nf_index;

/* Independent accumulators of the blocked sums (nf_tree_sum is written for 32).  NF_LANES and
 * NF_BLOCK fix the summation order: changing either changes results' bits. */
#define NF_LANES 32
_Static_assert(NF_LANES == 32, "nf_tree_sum is written for 32 lanes");
/* Elements summed in the input precision before a flush to float64. */
#define NF_BLOCK 256
/* Full blocks a blocked sum works on at once (nf_ssd in float64: half as many), so the adds of
 * independent partials overlap: 4 x 32 float lanes are 8 zmm registers.  Not part of the
 * summation order: results do not depend on it. */
#define NF_MAX_NB 4
/* Streamed outputs are built in L1 chunks of this many elements, then copied out. */
#define NF_CHUNK 1024

/* Type-generic names: NF_T(nf_sum) is nf_sum_f32 or nf_sum_f64 inside a *_t.h template. */
#define NF_CAT_(a, b) a##_##b
#define NF_CAT(a, b) NF_CAT_(a, b)
#define NF_T(name) NF_CAT(name, SUF)

/* ---------------------------------------------------------------- small helpers */

/* Sum acc[0:NF_LANES] pairwise: a fixed tree (deterministic, short dependency chain).  The
 * five halvings are written out: as a nested loop GCC kept the outer loop and the tree cost
 * ~4x the instructions (callgrind, LayerNorm rows). */
NF_INLINE double nf_tree_sum(double *acc)
{
    for (int k = 0; k < 16; k++) acc[k] += acc[k + 16];
    for (int k = 0; k < 8; k++) acc[k] += acc[k + 8];
    for (int k = 0; k < 4; k++) acc[k] += acc[k + 4];
    for (int k = 0; k < 2; k++) acc[k] += acc[k + 2];
    acc[0] += acc[1];
    return acc[0];
}

/* Split a double into hi + lo floats with hi + lo == v to ~2^-48 relative. */
static inline void nf_split(double v, float *hi, float *lo)
{
    float h = (float)v;
    *hi = h;
    *lo = (float)(v - (double)h);
}

/* Prefetch bytes [from, to) of the buffer at p into L2, one call per cache line.  Prefetches
 * never fault, but callers keep [from, to) inside the buffer. */
NF_INLINE void nf_prefetch_range(const void *p, size_t from, size_t to)
{
    for (size_t o = from & ~(size_t)63; o < to; o += 64)
        __builtin_prefetch((const char *)p + o, 0, 2);
}

/* The same for lines about to be written (an output): the stores then find them in cache
 * instead of each waiting on its read-for-ownership. */
NF_INLINE void nf_prefetch_range_w(void *p, size_t from, size_t to)
{
    for (size_t o = from & ~(size_t)63; o < to; o += 64)
        __builtin_prefetch((char *)p + o, 1, 2);
}

/* ---------------------------------------------------------------- thread plan */

#ifdef _OPENMP
#include <omp.h>
static inline int nf_max_threads(void) { return omp_get_max_threads(); }
/* The calling thread's OpenMP thread count for later calls (its own ICV: other threads keep
 * theirs), as threadpoolctl sets it. */
static inline void nf_set_max_threads(int n) { omp_set_num_threads(n); }
#else
static inline int nf_max_threads(void) { return 1; }
static inline void nf_set_max_threads(int n) { (void)n; }
#endif

/* OpenMP threads for `work` units: honours OMP_NUM_THREADS and threadpoolctl (both set
 * omp_get_max_threads) and gives each thread at least `min_per_thread` units, so small problems
 * do not pay the fork/join.  Results never depend on this number: every reduction is split into
 * blocks fixed by the shape and combined in a fixed order. */
static inline int nf_threads_for(nf_index work, nf_index min_per_thread)
{
    int n = nf_max_threads();
    nf_index cap = min_per_thread > 0 ? work / min_per_thread : work;
    if (cap < 1) cap = 1;
    if (n > cap) n = (int)cap;
    return n >= 1 ? n : 1;
}

/* ---------------------------------------------------------------- streaming stores */

/* Outputs larger than a share of the last-level cache are written with non-temporal stores: a
 * streaming store skips the read-for-ownership an ordinary store pays (a norm's traffic drops
 * from read x + read y + write y to read x + write y).  Which outputs stream is decided by the
 * Python run layer (normffn._tuning.stream_threshold) and passed to kernels as a flag. */
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
/* dst[0:nbytes] = src[0:nbytes] with non-temporal stores (SSE2: every x86-64 has it).  The
 * caller issues nf_stream_fence() before another thread or the caller reads dst. */
static inline void nf_stream_copy(void *dst, const void *src, size_t nbytes)
{
    char *d = (char *)dst;
    const char *s = (const char *)src;
    size_t head = (16 - ((uintptr_t)d & 15)) & 15;
    if (head > nbytes) head = nbytes;
    if (head) { memcpy(d, s, head); d += head; s += head; nbytes -= head; }
    size_t i = 0;
    for (; i + 64 <= nbytes; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(s + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + i + 48));
        _mm_stream_si128((__m128i *)(d + i), a);
        _mm_stream_si128((__m128i *)(d + i + 16), b);
        _mm_stream_si128((__m128i *)(d + i + 32), c);
        _mm_stream_si128((__m128i *)(d + i + 48), e);
    }
    for (; i + 16 <= nbytes; i += 16)
        _mm_stream_si128((__m128i *)(d + i), _mm_loadu_si128((const __m128i *)(s + i)));
    if (i < nbytes) memcpy(d + i, s + i, nbytes - i);
}
static inline void nf_stream_fence(void) { _mm_sfence(); }
#else
static inline void nf_stream_copy(void *dst, const void *src, size_t nbytes) { memcpy(dst, src, nbytes); }
static inline void nf_stream_fence(void) {}
#endif

/* ---------------------------------------------------------------- merges of partial results */

/* Chan et al. merge of a block's (nb, mb, m2b) into the running (n, mean, m2). */
static inline void nf_chan(double *n, double *mean, double *m2, double nb, double mb, double m2b)
{
    if (*n == 0) { *n = nb; *mean = mb; *m2 = m2b; return; }
    double nn = *n + nb, d = mb - *mean;
    *mean += d * (nb / nn);
    *m2 += m2b + d * d * (*n * nb / nn);
    *n = nn;
}

/* work holds nb blocks of `width` float64 partial sums (block b at work + b*width).  Adds blocks
 * 1..nb-1 into block 0, in block order, for columns [j0, j1): the fixed order that makes the
 * result independent of how columns are split over threads. */
NF_CLONES static inline void nf_reduce_blocks(double *work, nf_index nb, nf_index width,
                                       nf_index j0, nf_index j1)
{
    for (nf_index b = 1; b < nb; b++) {
        const double *restrict src = work + b * width;
        double *restrict dst = work;
        for (nf_index j = j0; j < j1; j++) dst[j] += src[j];
    }
}

/* ---------------------------------------------------------------- typed helpers */

#define T float
#define SUF f32
#include "core_t.h"
#undef T
#undef SUF

#define T double
#define SUF f64
#include "core_t.h"
#undef T
#undef SUF

#endif /* NORMFFN_CORE_H */
