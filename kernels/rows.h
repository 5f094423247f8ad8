/* rows.h — SIMD-friendly row helpers shared by the normalisation kernels.
 *
 * Contract: every pointer is valid for `n` elements (the Python layer validated shapes,
 * dtypes and contiguity); `n >= 1`.  The helpers are plain C that GCC auto-vectorises; each is
 * compiled three times (x86-64-v4 = AVX-512, x86-64-v3 = AVX2+FMA, and the portable baseline)
 * with `target_clones` and picked at load time, so the wheel still runs on any x86-64 CPU.
 * Dispatch happens once per row (or group of rows): the per-pass helpers are always_inline.
 *
 * Numerics:
 *  - Sums use NF_LANES independent accumulators (several vector registers), blocked: partial
 *    sums in the input precision over NF_BLOCK elements, then float64 (see NF_BLOCK), then a
 *    fixed tree.  The error does not grow with n, and the order is fixed.
 *  - Variances are two-pass (sum of squared deviations from the mean, with the Chan-Golub-LeVeque
 *    correction of the mean): rows are in L1/L2 by the second pass, so stability costs
 *    arithmetic, not memory traffic, and the mean is accurate to ~eps*std, not eps*|mean|.
 *  - float32 values are centred as ((x - mean_hi) - mean_lo) with mean split into two
 *    floats: x - mean_hi is exact when x is near the mean (Sterbenz), so a row of 1e4 + tiny noise
 *    normalises as accurately as in float64, without converting every element to double.
 *  - No -ffast-math: NaN and Inf propagate through every helper.
 */
#ifndef NORMFFN_ROWS_H
#define NORMFFN_ROWS_H

#include <stddef.h>
#include <math.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(NORMFFN_NO_CLONES) && !defined(__SANITIZE_ADDRESS__)
#define NF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NF_CLONES
#endif

/* Helpers that are only called from a cloned row function: inlined into each clone, so one
 * dispatch per row picks the ISA for all of them. */
#define NF_INLINE static inline __attribute__((always_inline))

#define NF_LANES 32   /* independent accumulators (nf_tree_sum assumes 32) */

/* Sum acc[0:NF_LANES] pairwise (a fixed tree: deterministic, short dependency chain). */
static inline __attribute__((always_inline)) double nf_tree_sum(double *acc)
{
#define NF_HALVE(W) for (int k = 0; k < (W); k++) acc[k] += acc[k + (W)]
    NF_HALVE(16); NF_HALVE(8); NF_HALVE(4); NF_HALVE(2); NF_HALVE(1);
#undef NF_HALVE
    return acc[0];
}

/* Prefetch the NF_LANES elements at p into L2 (one call per NF_LANES-element step of a loop
 * that streams through another row): used to pull the next row in while this one is in L1. */
#define NF_PREFETCH_LANES(p, T)                                                              \
    do {                                                                                     \
        for (size_t o_ = 0; o_ < NF_LANES * sizeof(T); o_ += 64)                             \
            __builtin_prefetch((const char *)(p) + o_, 0, 2);                                 \
    } while (0)

/* Prefetch bytes [from, to) of the buffer at p into L2, one call per cache line.  Used by
 * kernels that walk each block twice (the second time from cache): spread over the work on this
 * block, it keeps memory busy fetching the next one.  Prefetches never fault, but callers still
 * keep [from, to) inside the buffer. */
static inline __attribute__((always_inline)) void nf_prefetch_range(const void *p, size_t from,
                                                                    size_t to)
{
    for (size_t o = from & ~(size_t)63; o < to; o += 64)
        __builtin_prefetch((const char *)p + o, 0, 2);
}

#ifdef _OPENMP
#include <omp.h>
static inline int nf_omp_max_threads(void) { return omp_get_max_threads(); }
#else
static inline int nf_omp_max_threads(void) { return 1; }
#endif

typedef ptrdiff_t nf_index;

/* Split a double into hi + lo floats with hi + lo == v to ~2^-48 relative. */
static inline void nf_split(double v, float *hi, float *lo)
{
    float h = (float)v;
    *hi = h;
    *lo = (float)(v - (double)h);
}

/* ---------------------------------------------------------------- sums */

/* Sums are blocked: NF_LANES partial sums in the input precision over a block of NF_BLOCK
 * elements, then flushed into NF_LANES float64 accumulators, then a fixed tree.  A float32 sum's
 * error is then ~(NF_BLOCK/NF_LANES) ulps of the block — it does not grow with n — and the hot
 * loop stays in float32 SIMD (converting every element to double would halve its width). */
#define NF_BLOCK 256

#define NF_DEF_SUM(NAME, T)                                                  \
NF_INLINE double NAME(const T *x, nf_index n)                                \
{                                                                            \
    double acc[NF_LANES] = {0};                                              \
    nf_index i = 0;                                                          \
    while (i + NF_LANES <= n) {                                              \
        T p[NF_LANES] = {0};                                                 \
        nf_index end = i + NF_BLOCK < n ? i + NF_BLOCK : n;                  \
        for (; i + NF_LANES <= end; i += NF_LANES)                           \
            for (int k = 0; k < NF_LANES; k++) p[k] += x[i + k];             \
        for (int k = 0; k < NF_LANES; k++) acc[k] += (double)p[k];           \
    }                                                                        \
    double s = 0.0;                                                          \
    for (; i < n; i++) s += (double)x[i];                                    \
    return s + nf_tree_sum(acc);                                             \
}
NF_DEF_SUM(nf_sum_f32, float)
NF_DEF_SUM(nf_sum_f64, double)

/* Returns sum((x - mean)^2) and stores sum(x - mean) in *dev (the corrected two-pass
 * algorithm of Chan, Golub & LeVeque: mean + dev/n is the mean with the first pass's rounding
 * error removed, and ssd - dev^2/n the matching sum of squares).  x - mean is formed in the
 * input precision from mean split into hi + lo (exact near the mean).  Meanwhile prefetches
 * pf[0:n] (the next row; may equal x). */
#define NF_DEF_SSD(NAME, T)                                                  \
NF_INLINE double NAME(const T *x, nf_index n, double mean,                  \
                             const T *pf, double *dev)                       \
{                                                                            \
    double acc[NF_LANES] = {0}, accd[NF_LANES] = {0};                        \
    T mh, ml;                                                                \
    if (sizeof(T) == sizeof(float)) { float h, l; nf_split(mean, &h, &l); mh = h; ml = l; } \
    else { mh = (T)mean; ml = 0; }                                           \
    nf_index i = 0;                                                          \
    while (i + NF_LANES <= n) {                                              \
        T p[NF_LANES] = {0}, pd[NF_LANES] = {0};                             \
        nf_index end = i + NF_BLOCK < n ? i + NF_BLOCK : n;                  \
        for (; i + NF_LANES <= end; i += NF_LANES) {                         \
            NF_PREFETCH_LANES(pf + i, T);                                    \
            for (int k = 0; k < NF_LANES; k++) {                             \
                T t = (x[i + k] - mh) - ml;                                  \
                pd[k] += t;                                                  \
                p[k] += t * t;                                               \
            }                                                                \
        }                                                                    \
        for (int k = 0; k < NF_LANES; k++) {                                 \
            acc[k] += (double)p[k];                                          \
            accd[k] += (double)pd[k];                                        \
        }                                                                    \
    }                                                                        \
    if (i < n) __builtin_prefetch(pf + i, 0, 2);                             \
    double s = 0.0, sd = 0.0;                                                \
    for (; i < n; i++) { double t = (double)x[i] - mean; sd += t; s += t * t; } \
    *dev = sd + nf_tree_sum(accd);                                           \
    return s + nf_tree_sum(acc);                                             \
}
NF_DEF_SSD(nf_ssd_f32, float)
NF_DEF_SSD(nf_ssd_f64, double)

/* ---------------------------------------------------------------- streaming stores */

/* Outputs of at least a quarter of the last-level cache are written with non-temporal stores: a
 * streaming store skips the read-for-ownership an ordinary store pays (a norm's traffic drops
 * from read x + read y + write y to read x + write y), and output plus input that large would
 * mostly leave the cache anyway.  Measured here (32 MiB L3, 2 threads, LayerNorm 4096x768 and
 * up) streaming was 15-25% faster.  Smaller outputs are stored normally: they stay in cache for
 * whoever reads them next. */
/* Rows are produced in L1-sized chunks, then streamed out. */
#define NF_CHUNK 1024

#include <stdio.h>
#include <unistd.h>
static size_t nf_stream_override = 0;   /* per extension module; 0 = the L3 size */
static inline void nf_set_stream_bytes(size_t v) { nf_stream_override = v; }
static size_t nf_stream_bytes(void)
{
    /* Benign race: every thread computes the same value. */
    static size_t cached = 0;
    if (nf_stream_override) return nf_stream_override;
    if (!cached) {
        long l3 = -1;
        /* sysfs first: glibc's sysconf misreports AMD's L3 under some hypervisors (320 MB). */
        FILE *f = fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r");
        if (f) {
            long v; char unit = 0;
            if (fscanf(f, "%ld%c", &v, &unit) >= 1)
                l3 = unit == 'K' ? v << 10 : unit == 'M' ? v << 20 : v;
            fclose(f);
        }
#ifdef _SC_LEVEL3_CACHE_SIZE
        if (l3 <= 0) l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
        if (!(l3 > (1L << 20) && l3 < (1L << 30))) l3 = 32L << 20;
        cached = (size_t)l3 / 4;
    }
    return cached;
}

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#include <stdint.h>
#include <string.h>
/* dst[0:nbytes] = src[0:nbytes] with non-temporal stores (SSE2: every x86-64 has it).
 * The caller issues nf_stream_fence() before another thread or the caller reads dst. */
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
#include <string.h>
static inline void nf_stream_copy(void *dst, const void *src, size_t nbytes) { memcpy(dst, src, nbytes); }
static inline void nf_stream_fence(void) {}
#endif

/* ---------------------------------------------------------------- LayerNorm rows */

/* Write y[0:n] = ((x - mh) - ml) * r [* w] [+ b] for float32, (x - mh) * r ... for float64
 * (ml == 0 there).  T is the element type. */
#define NF_DEF_AFFINE(NAME, T)                                                                \
NF_INLINE void NAME(T *restrict y, const T *restrict x, const T *restrict w,                  \
                           const T *restrict b, nf_index n, T mh, T ml, T r)                  \
{                                                                                             \
    if (w && b) {                                                                             \
        for (nf_index i = 0; i < n; i++) y[i] = (((x[i] - mh) - ml) * r) * w[i] + b[i];       \
    } else if (w) {                                                                           \
        for (nf_index i = 0; i < n; i++) y[i] = (((x[i] - mh) - ml) * r) * w[i];              \
    } else if (b) {                                                                           \
        for (nf_index i = 0; i < n; i++) y[i] = ((x[i] - mh) - ml) * r + b[i];                \
    } else {                                                                                  \
        for (nf_index i = 0; i < n; i++) y[i] = ((x[i] - mh) - ml) * r;                       \
    }                                                                                         \
}
NF_DEF_AFFINE(nf_affine_f32, float)
NF_DEF_AFFINE(nf_affine_f64, double)

/* One LayerNorm row: mean, rstd (two-pass, float64 sums), then y.  With `stream`, y is built in
 * an L1 chunk and streamed out (see nf_stream_bytes).  The first pass reads x from memory; the
 * second (in L1/L2) prefetches next_x, the next row this thread will normalise. */
#define NF_DEF_LN_FWD(NAME, T, SUM, SSD, AFFINE)                                              \
NF_CLONES static void NAME(T *restrict y, double *mean_out, double *rstd_out, const T *restrict x,      \
                 const T *restrict w, const T *restrict b, nf_index n, double eps, int stream, \
                 const T *next_x)                                                             \
{                                                                                             \
    double mean0 = SUM(x, n) / (double)n, dev;                                                \
    double ssd = SSD(x, n, mean0, next_x, &dev);                                              \
    double mean = mean0 + dev / (double)n;                                                    \
    double var = (ssd - dev * (dev / (double)n)) / (double)n;                                 \
    if (var < 0) var = 0; /* cannot happen in exact arithmetic; guards rounding */            \
    double rstd = 1.0 / sqrt(var + eps);                                                      \
    *mean_out = mean;                                                                         \
    *rstd_out = rstd;                                                                         \
    T mh, ml;                                                                                 \
    if (sizeof(T) == sizeof(float)) { float h, l; nf_split(mean, &h, &l); mh = h; ml = l; }   \
    else { mh = (T)mean; ml = 0; }                                                            \
    if (!stream) { AFFINE(y, x, w, b, n, mh, ml, (T)rstd); return; }                          \
    T tmp[NF_CHUNK];                                                                          \
    for (nf_index c = 0; c < n; c += NF_CHUNK) {                                              \
        nf_index m = n - c < NF_CHUNK ? n - c : NF_CHUNK;                                     \
        AFFINE(tmp, x + c, w ? w + c : NULL, b ? b + c : NULL, m, mh, ml, (T)rstd);           \
        nf_stream_copy(y + c, tmp, (size_t)m * sizeof(T));                                    \
    }                                                                                         \
}
NF_DEF_LN_FWD(nf_ln_fwd_row_f32, float, nf_sum_f32, nf_ssd_f32, nf_affine_f32)
NF_DEF_LN_FWD(nf_ln_fwd_row_f64, double, nf_sum_f64, nf_ssd_f64, nf_affine_f64)

/* LayerNorm backward, per row:
 *   xhat = (x - mean) * rstd,  g = dy * w   (g = dy without weight)
 *   c1 = mean(g * xhat),  c2 = mean(g),  dx = rstd * (g - xhat * c1 - c2)
 * The row's c1, c2 come from one pass over dy and x (float64 sums); dx is then written in a
 * second pass that finds dy and x in L1/L2.
 *
 * dweight/dbias: rows come in groups of NF_G; the second pass walks the group's rows
 * column by column and adds sum_k dy*xhat and sum_k dy to the block's float64 accumulators
 * dw_acc/db_acc once per group (not once per row), in row order.  dw_acc is used exactly when
 * w is given (dweight exists iff weight does); a NULL db_acc skips dbias. */
#define NF_G 4

#define NF_DEF_LN_BWD_STATS(NAME, T)                                                          \
NF_INLINE void NAME(double *c1, double *c2, const T *restrict dy, const T *restrict x,        \
                           const T *restrict w, nf_index n, T mh, T ml, T r)                  \
{                                                                                             \
    double a1[NF_LANES] = {0}, a2[NF_LANES] = {0};                                            \
    nf_index i = 0;                                                                           \
    while (i + NF_LANES <= n) {                                                               \
        T p1[NF_LANES] = {0}, p2[NF_LANES] = {0};                                             \
        nf_index end = i + NF_BLOCK < n ? i + NF_BLOCK : n;                                   \
        for (; i + NF_LANES <= end; i += NF_LANES)                                            \
            for (int k = 0; k < NF_LANES; k++) {                                              \
                T xh = ((x[i + k] - mh) - ml) * r;                                            \
                T g = w ? dy[i + k] * w[i + k] : dy[i + k];                                   \
                p1[k] += g * xh;                                                              \
                p2[k] += g;                                                                   \
            }                                                                                 \
        for (int k = 0; k < NF_LANES; k++) { a1[k] += (double)p1[k]; a2[k] += (double)p2[k]; }\
    }                                                                                         \
    double s1 = 0, s2 = 0;                                                                    \
    for (; i < n; i++) {                                                                      \
        T xh = ((x[i] - mh) - ml) * r;                                                        \
        T g = w ? dy[i] * w[i] : dy[i];                                                       \
        s1 += (double)g * (double)xh;                                                         \
        s2 += (double)g;                                                                      \
    }                                                                                         \
    *c1 = (s1 + nf_tree_sum(a1)) / (double)n;                                                 \
    *c2 = (s2 + nf_tree_sum(a2)) / (double)n;                                                 \
}
NF_DEF_LN_BWD_STATS(nf_ln_bwd_stats_f32, float)
NF_DEF_LN_BWD_STATS(nf_ln_bwd_stats_f64, double)

/* dx for G rows over columns [0, m) (row k at dx[k*ldx], dy[k*ld], x[k*ld]); with HAS_W, w is
 * the weight and the group's column sums of dy*xhat go to dw_acc; with HAS_B, those of dy go to
 * db_acc.  G, HAS_W, HAS_B are compile-time constants after inlining, so each instantiation is a
 * branch-free loop that GCC vectorises.  Columns go one cache line at a time; each line step
 * also prefetches the same line of the next group's rows (pf_dy/pf_x, pf_g rows), so the next
 * group's first pass finds them in L2. */
#define NF_LN_BWD_DX_ELEM(T, j)                                                                \
    do {                                                                                      \
        T wj = HAS_W ? w[j] : (T)1;                                                           \
        T sw = 0, sb = 0;     /* G <= 4 terms in the input precision, then float64 */         \
        for (int k = 0; k < G; k++) {                                                         \
            T d = dy[k * ld + (j)];                                                           \
            T xh = ((x[k * ld + (j)] - mh[k]) - ml[k]) * r[k];                                \
            T g = HAS_W ? d * wj : d;                                                         \
            dx[k * ldx + (j)] = r[k] * ((g - xh * c1[k]) - c2[k]);                            \
            if (HAS_W) sw += d * xh;                                                          \
            if (HAS_B) sb += d;                                                               \
        }                                                                                     \
        if (HAS_W) dw_acc[j] += (double)sw;                                                   \
        if (HAS_B) db_acc[j] += (double)sb;                                                   \
    } while (0)

#define NF_DEF_LN_BWD_DX_BODY(NAME, T)                                                        \
static inline __attribute__((always_inline)) void NAME(                                       \
    T *restrict dx, nf_index ldx, double *restrict dw_acc, double *restrict db_acc,           \
    const T *restrict dy, const T *restrict x, nf_index ld, const T *restrict w, nf_index m,  \
    const T *mh_, const T *ml_, const T *r_, const T *c1_, const T *c2_,                      \
    const T *pf_dy, const T *pf_x, nf_index pf_g,                                             \
    const int G, const int HAS_W, const int HAS_B)                                            \
{                                                                                             \
    enum { L = 64 / sizeof(T) };                                                              \
    T mh[NF_G], ml[NF_G], r[NF_G], c1[NF_G], c2[NF_G];                                        \
    for (int k = 0; k < G; k++) {                                                             \
        mh[k] = mh_[k]; ml[k] = ml_[k]; r[k] = r_[k]; c1[k] = c1_[k]; c2[k] = c2_[k];         \
    }                                                                                         \
    nf_index jb = 0;                                                                          \
    for (; jb + L <= m; jb += L) {                                                            \
        for (nf_index k = 0; k < pf_g; k++) {                                                 \
            __builtin_prefetch(pf_dy + k * ld + jb, 0, 2);                                    \
            __builtin_prefetch(pf_x + k * ld + jb, 0, 2);                                     \
        }                                                                                     \
        for (nf_index j = jb; j < jb + L; j++) NF_LN_BWD_DX_ELEM(T, j);                          \
    }                                                                                         \
    for (nf_index j = jb; j < m; j++) NF_LN_BWD_DX_ELEM(T, j);                                   \
}
NF_DEF_LN_BWD_DX_BODY(nf_ln_bwd_dx_body_f32, float)
NF_DEF_LN_BWD_DX_BODY(nf_ln_bwd_dx_body_f64, double)

#define NF_DEF_LN_BWD_DX(NAME, T, BODY, G)                                                    \
NF_INLINE void NAME(T *restrict dx, nf_index ldx, double *restrict dw_acc,                    \
                           double *restrict db_acc, const T *restrict dy, const T *restrict x,\
                           nf_index ld, const T *restrict w, nf_index m,                      \
                           const T *mh, const T *ml, const T *r, const T *c1, const T *c2,    \
                           const T *pf_dy, const T *pf_x, nf_index pf_g)                      \
{                                                                                             \
    if (w && db_acc)                                                                          \
        BODY(dx, ldx, dw_acc, db_acc, dy, x, ld, w, m, mh, ml, r, c1, c2, pf_dy, pf_x, pf_g, G, 1, 1);           \
    else if (w)                                                                               \
        BODY(dx, ldx, dw_acc, db_acc, dy, x, ld, w, m, mh, ml, r, c1, c2, pf_dy, pf_x, pf_g, G, 1, 0);           \
    else if (db_acc)                                                                          \
        BODY(dx, ldx, dw_acc, db_acc, dy, x, ld, w, m, mh, ml, r, c1, c2, pf_dy, pf_x, pf_g, G, 0, 1);           \
    else                                                                                      \
        BODY(dx, ldx, dw_acc, db_acc, dy, x, ld, w, m, mh, ml, r, c1, c2, pf_dy, pf_x, pf_g, G, 0, 0);           \
}
NF_DEF_LN_BWD_DX(nf_ln_bwd_dx1_f32, float, nf_ln_bwd_dx_body_f32, 1)
NF_DEF_LN_BWD_DX(nf_ln_bwd_dx1_f64, double, nf_ln_bwd_dx_body_f64, 1)
NF_DEF_LN_BWD_DX(nf_ln_bwd_dxG_f32, float, nf_ln_bwd_dx_body_f32, NF_G)
NF_DEF_LN_BWD_DX(nf_ln_bwd_dxG_f64, double, nf_ln_bwd_dx_body_f64, NF_G)

/* Backward for g (1..NF_G) consecutive rows of length n starting at dx/dy/x (row stride n).
 * While the dx pass works on a chunk (in L1/L2), the same chunk of the next group's dy and x
 * (next_g rows at next_dy/next_x; next_g may be 0) is prefetched. */
#define NF_DEF_LN_BWD(NAME, T, STATS, DX1, DXG)                                               \
NF_CLONES static void NAME(T *restrict dx, double *restrict dw_acc, double *restrict db_acc,            \
                 const T *restrict dy, const T *restrict x, const T *restrict w,              \
                 const double *mean, const double *rstd, nf_index g, nf_index n, int stream,  \
                 const T *next_dy, const T *next_x, nf_index next_g)                          \
{                                                                                             \
    T mh[NF_G], ml[NF_G], r[NF_G], c1[NF_G], c2[NF_G];                                        \
    for (nf_index k = 0; k < g; k++) {                                                        \
        double s1, s2;                                                                        \
        if (sizeof(T) == sizeof(float)) {                                                     \
            float h, l; nf_split(mean[k], &h, &l); mh[k] = h; ml[k] = l;                      \
        } else { mh[k] = (T)mean[k]; ml[k] = 0; }                                             \
        r[k] = (T)rstd[k];                                                                    \
        STATS(&s1, &s2, dy + k * n, x + k * n, w, n, mh[k], ml[k], r[k]);                     \
        c1[k] = (T)s1; c2[k] = (T)s2;                                                         \
    }                                                                                         \
    T tmp[NF_G * NF_CHUNK];                                                                   \
    for (nf_index c = 0; c < n; c += NF_CHUNK) {                                              \
        nf_index m = n - c < NF_CHUNK ? n - c : NF_CHUNK;                                     \
        T *out = stream ? tmp : dx + c;                                                       \
        nf_index ldo = stream ? NF_CHUNK : n;                                                 \
        double *aw = dw_acc ? dw_acc + c : NULL, *ab = db_acc ? db_acc + c : NULL;            \
        const T *wc = w ? w + c : NULL;                                                       \
        if (g == NF_G) {                                                                      \
            DXG(out, ldo, aw, ab, dy + c, x + c, n, wc, m, mh, ml, r, c1, c2,                 \
                next_dy + c, next_x + c, next_g);                                             \
        } else {                                                                              \
            for (nf_index k = 0; k < g; k++)                                                  \
                DX1(out + k * ldo, ldo, aw, ab, dy + k * n + c, x + k * n + c, n, wc, m,      \
                    mh + k, ml + k, r + k, c1 + k, c2 + k,                                    \
                    next_dy + c, next_x + c, k == 0 ? next_g : 0);                            \
        }                                                                                     \
        if (stream)                                                                           \
            for (nf_index k = 0; k < g; k++)                                                  \
                nf_stream_copy(dx + k * n + c, tmp + k * NF_CHUNK, (size_t)m * sizeof(T));    \
    }                                                                                         \
}
NF_DEF_LN_BWD(nf_ln_bwd_rows_f32, float, nf_ln_bwd_stats_f32, nf_ln_bwd_dx1_f32, nf_ln_bwd_dxG_f32)
NF_DEF_LN_BWD(nf_ln_bwd_rows_f64, double, nf_ln_bwd_stats_f64, nf_ln_bwd_dx1_f64, nf_ln_bwd_dxG_f64)

/* ---------------------------------------------------------------- block reductions */

/* work holds nb blocks of `width` float64 partial sums (block b at work + b*width).  Adds blocks
 * 1..nb-1 into block 0, in block order, for columns [j0, j1): the fixed order that makes the
 * result independent of how columns are split over threads. */
NF_CLONES static void nf_reduce_blocks(double *work, nf_index nb, nf_index width,
                                       nf_index j0, nf_index j1)
{
    for (nf_index b = 1; b < nb; b++) {
        const double *restrict src = work + b * width;
        double *restrict dst = work;
        for (nf_index j = j0; j < j1; j++) dst[j] += src[j];
    }
}

#endif /* NORMFFN_ROWS_H */
