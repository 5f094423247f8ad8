/* rows.h — SIMD-friendly row helpers shared by the normalisation kernels.
 *
 * Contract: every pointer is valid for `n` elements (the Python layer validated shapes,
 * dtypes and contiguity); `n >= 1`.  The helpers are plain C that GCC auto-vectorises; each is
 * compiled three times (x86-64-v4 = AVX-512, x86-64-v3 = AVX2+FMA, and the portable baseline)
 * with `target_clones` and picked at load time, so the wheel still runs on any x86-64 CPU.
 *
 * Numerics:
 *  - Sums use NF_LANES independent accumulators (several vector registers), which both hides
 *    add latency and makes the summation error grow like n/NF_LANES instead of n.  float32 data
 *    is summed in float64.
 *  - Variances are two-pass (sum of squared deviations from the mean): rows are in L1/L2 by the
 *    second pass, so stability costs arithmetic, not memory traffic.
 *  - float32 outputs are computed as ((x - mean_hi) - mean_lo) * rstd with mean split into two
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

#define NF_LANES 16

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

#define NF_DEF_SUM(NAME, T)                                                  \
NF_CLONES static double NAME(const T *x, nf_index n)                         \
{                                                                            \
    double acc[NF_LANES] = {0};                                              \
    nf_index i = 0;                                                          \
    for (; i + NF_LANES <= n; i += NF_LANES)                                 \
        for (int k = 0; k < NF_LANES; k++) acc[k] += (double)x[i + k];       \
    double s = 0.0;                                                          \
    for (; i < n; i++) s += (double)x[i];                                    \
    for (int k = 0; k < NF_LANES; k++) s += acc[k];                          \
    return s;                                                                \
}
NF_DEF_SUM(nf_sum_f32, float)
NF_DEF_SUM(nf_sum_f64, double)

/* sum((x - mean)^2) */
#define NF_DEF_SSD(NAME, T)                                                  \
NF_CLONES static double NAME(const T *x, nf_index n, double mean)            \
{                                                                            \
    double acc[NF_LANES] = {0};                                              \
    nf_index i = 0;                                                          \
    for (; i + NF_LANES <= n; i += NF_LANES)                                 \
        for (int k = 0; k < NF_LANES; k++) {                                 \
            double t = (double)x[i + k] - mean;                              \
            acc[k] += t * t;                                                 \
        }                                                                    \
    double s = 0.0;                                                          \
    for (; i < n; i++) { double t = (double)x[i] - mean; s += t * t; }       \
    for (int k = 0; k < NF_LANES; k++) s += acc[k];                          \
    return s;                                                                \
}
NF_DEF_SSD(nf_ssd_f32, float)
NF_DEF_SSD(nf_ssd_f64, double)

/* ---------------------------------------------------------------- streaming stores */

/* Outputs at least as large as the last-level cache are written with non-temporal stores: they
 * would not stay in cache anyway, and a streaming store skips the read-for-ownership an
 * ordinary store pays (a norm's traffic drops from read x + read y + write y to read x +
 * write y).  Smaller outputs are stored normally: they stay in cache for whoever reads them
 * next, and measured here that beats streaming. */
#include <unistd.h>
static size_t nf_stream_bytes(void)
{
    static size_t cached = 0;
    if (!cached) {
        long l3 = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
        l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
        cached = l3 > (1L << 20) ? (size_t)l3 : ((size_t)32 << 20);
    }
    return cached;
}
/* Rows are produced in L1-sized chunks, then streamed out. */
#define NF_CHUNK 1024

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
NF_CLONES static void NAME(T *restrict y, const T *restrict x, const T *restrict w,           \
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
 * an L1 chunk and streamed out (see NF_STREAM_BYTES). */
#define NF_DEF_LN_FWD(NAME, T, SUM, SSD, AFFINE)                                              \
static void NAME(T *restrict y, double *mean_out, double *rstd_out, const T *restrict x,      \
                 const T *restrict w, const T *restrict b, nf_index n, double eps, int stream) \
{                                                                                             \
    double mean = SUM(x, n) / (double)n;                                                      \
    double var = SSD(x, n, mean) / (double)n;                                                 \
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
NF_CLONES static void NAME(double *c1, double *c2, const T *restrict dy, const T *restrict x, \
                           const T *restrict w, nf_index n, T mh, T ml, T r)                  \
{                                                                                             \
    double a1[NF_LANES] = {0}, a2[NF_LANES] = {0};                                            \
    nf_index i = 0;                                                                           \
    for (; i + NF_LANES <= n; i += NF_LANES)                                                  \
        for (int k = 0; k < NF_LANES; k++) {                                                  \
            T xh = ((x[i + k] - mh) - ml) * r;                                                \
            T g = w ? dy[i + k] * w[i + k] : dy[i + k];                                       \
            a1[k] += (double)g * (double)xh;                                                  \
            a2[k] += (double)g;                                                               \
        }                                                                                     \
    double s1 = 0, s2 = 0;                                                                    \
    for (; i < n; i++) {                                                                      \
        T xh = ((x[i] - mh) - ml) * r;                                                        \
        T g = w ? dy[i] * w[i] : dy[i];                                                       \
        s1 += (double)g * (double)xh;                                                         \
        s2 += (double)g;                                                                      \
    }                                                                                         \
    for (int k = 0; k < NF_LANES; k++) { s1 += a1[k]; s2 += a2[k]; }                          \
    *c1 = s1 / (double)n;                                                                     \
    *c2 = s2 / (double)n;                                                                     \
}
NF_DEF_LN_BWD_STATS(nf_ln_bwd_stats_f32, float)
NF_DEF_LN_BWD_STATS(nf_ln_bwd_stats_f64, double)

/* dx for G rows over columns [0, m) (row k at dx[k*ldx], dy[k*ld], x[k*ld]); with HAS_W, w is
 * the weight and the group's column sums of dy*xhat go to dw_acc; with HAS_B, those of dy go to
 * db_acc.  G, HAS_W, HAS_B are compile-time constants after inlining, so each instantiation is a
 * branch-free loop over j that GCC vectorises. */
#define NF_DEF_LN_BWD_DX_BODY(NAME, T)                                                        \
static inline __attribute__((always_inline)) void NAME(                                       \
    T *restrict dx, nf_index ldx, double *restrict dw_acc, double *restrict db_acc,           \
    const T *restrict dy, const T *restrict x, nf_index ld, const T *restrict w, nf_index m,  \
    const T *mh_, const T *ml_, const T *r_, const T *c1_, const T *c2_,                      \
    const int G, const int HAS_W, const int HAS_B)                                            \
{                                                                                             \
    T mh[NF_G], ml[NF_G], r[NF_G], c1[NF_G], c2[NF_G];                                        \
    for (int k = 0; k < G; k++) {                                                             \
        mh[k] = mh_[k]; ml[k] = ml_[k]; r[k] = r_[k]; c1[k] = c1_[k]; c2[k] = c2_[k];         \
    }                                                                                         \
    for (nf_index j = 0; j < m; j++) {                                                        \
        T wj = HAS_W ? w[j] : (T)1;                                                           \
        double sw = 0, sb = 0;                                                                \
        for (int k = 0; k < G; k++) {                                                         \
            T d = dy[k * ld + j];                                                             \
            T xh = ((x[k * ld + j] - mh[k]) - ml[k]) * r[k];                                  \
            T g = HAS_W ? d * wj : d;                                                         \
            dx[k * ldx + j] = r[k] * ((g - xh * c1[k]) - c2[k]);                              \
            if (HAS_W) sw += (double)d * (double)xh;                                          \
            if (HAS_B) sb += (double)d;                                                       \
        }                                                                                     \
        if (HAS_W) dw_acc[j] += sw;                                                           \
        if (HAS_B) db_acc[j] += sb;                                                           \
    }                                                                                         \
}
NF_DEF_LN_BWD_DX_BODY(nf_ln_bwd_dx_body_f32, float)
NF_DEF_LN_BWD_DX_BODY(nf_ln_bwd_dx_body_f64, double)

#define NF_DEF_LN_BWD_DX(NAME, T, BODY, G)                                                    \
NF_CLONES static void NAME(T *restrict dx, nf_index ldx, double *restrict dw_acc,             \
                           double *restrict db_acc, const T *restrict dy, const T *restrict x,\
                           nf_index ld, const T *restrict w, nf_index m,                      \
                           const T *mh, const T *ml, const T *r, const T *c1, const T *c2)    \
{                                                                                             \
    if (w && db_acc)                                                                          \
        BODY(dx, ldx, dw_acc, db_acc, dy, x, ld, w, m, mh, ml, r, c1, c2, G, 1, 1);           \
    else if (w)                                                                               \
        BODY(dx, ldx, dw_acc, db_acc, dy, x, ld, w, m, mh, ml, r, c1, c2, G, 1, 0);           \
    else if (db_acc)                                                                          \
        BODY(dx, ldx, dw_acc, db_acc, dy, x, ld, w, m, mh, ml, r, c1, c2, G, 0, 1);           \
    else                                                                                      \
        BODY(dx, ldx, dw_acc, db_acc, dy, x, ld, w, m, mh, ml, r, c1, c2, G, 0, 0);           \
}
NF_DEF_LN_BWD_DX(nf_ln_bwd_dx1_f32, float, nf_ln_bwd_dx_body_f32, 1)
NF_DEF_LN_BWD_DX(nf_ln_bwd_dx1_f64, double, nf_ln_bwd_dx_body_f64, 1)
NF_DEF_LN_BWD_DX(nf_ln_bwd_dxG_f32, float, nf_ln_bwd_dx_body_f32, NF_G)
NF_DEF_LN_BWD_DX(nf_ln_bwd_dxG_f64, double, nf_ln_bwd_dx_body_f64, NF_G)

/* Backward for g (1..NF_G) consecutive rows of length n starting at dx/dy/x (row stride n). */
#define NF_DEF_LN_BWD(NAME, T, STATS, DX1, DXG)                                               \
static void NAME(T *restrict dx, double *restrict dw_acc, double *restrict db_acc,            \
                 const T *restrict dy, const T *restrict x, const T *restrict w,              \
                 const double *mean, const double *rstd, nf_index g, nf_index n, int stream)  \
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
            DXG(out, ldo, aw, ab, dy + c, x + c, n, wc, m, mh, ml, r, c1, c2);                \
        } else {                                                                              \
            for (nf_index k = 0; k < g; k++)                                                  \
                DX1(out + k * ldo, ldo, aw, ab, dy + k * n + c, x + k * n + c, n, wc, m,      \
                    mh + k, ml + k, r + k, c1 + k, c2 + k);                                   \
        }                                                                                     \
        if (stream)                                                                           \
            for (nf_index k = 0; k < g; k++)                                                  \
                nf_stream_copy(dx + k * n + c, tmp + k * NF_CHUNK, (size_t)m * sizeof(T));    \
    }                                                                                         \
}
NF_DEF_LN_BWD(nf_ln_bwd_rows_f32, float, nf_ln_bwd_stats_f32, nf_ln_bwd_dx1_f32, nf_ln_bwd_dxG_f32)
NF_DEF_LN_BWD(nf_ln_bwd_rows_f64, double, nf_ln_bwd_stats_f64, nf_ln_bwd_dx1_f64, nf_ln_bwd_dxG_f64)

#endif /* NORMFFN_ROWS_H */
