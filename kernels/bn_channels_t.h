/* bn_channels_t.h — the BatchNorm kernels, written once; bn_channels.h includes this file twice,
 * with T = float, SUF = f32 and T = double, SUF = f64 (contract and maths: bn_channels.h).
 * No include guard, on purpose.  NF_T(name) expands to name_SUF. */

/* ================================================================ rows (contiguous channel runs) */

/* mean and M2 = sum((x - mean)^2) of x[0:n]: two-pass per NF_BN_SEG segment (the second pass
 * finds the segment in L1), segments Chan-merged in order.  The sums are the core's blocked ones
 * (nf_sum, nf_ssd), so the hot loops stay in the input precision.  Meanwhile pf[0:n] (the next
 * run this thread reads — a strided jump the hardware prefetcher cannot guess; may equal x) is
 * prefetched. */
NF_CLONES static void NF_T(nf_bn_row_stats)(const T *x, nf_index n, double *mean, double *m2,
                                            const T *pf)
{
    double cn = 0, cm = 0, cm2 = 0;
    for (nf_index s = 0; s < n; s += NF_BN_SEG) {
        nf_index m = n - s < NF_BN_SEG ? n - s : NF_BN_SEG;
        double bm = NF_T(nf_sum)(x + s, m) / (double)m, dev;
        double bm2 = NF_T(nf_ssd)(x + s, m, bm, pf + s, &dev);
        nf_chan(&cn, &cm, &cm2, (double)m, bm + dev / (double)m, bm2 - dev * (dev / (double)m));
    }
    *mean = cm;
    *m2 = cm2;
}

/* y[0:n] = ((x - mh) - ml) * a + b */
NF_CLONES static void NF_T(nf_bn_row_affine1)(T *restrict y, const T *restrict x, nf_index n,
                                              T mh, T ml, T a, T b)
{
    for (nf_index i = 0; i < n; i++) y[i] = (((x[i] - mh) - ml) * a) + b;
}

/* The same, built in L1 chunks of NF_CHUNK values and streamed out when `stream` (no
 * read-for-ownership of y). */
static void NF_T(nf_bn_row_affine)(T *restrict y, const T *restrict x, nf_index n, T mh, T ml,
                                   T a, T b, int stream)
{
    if (!stream) { NF_T(nf_bn_row_affine1)(y, x, n, mh, ml, a, b); return; }
    T tmp[NF_CHUNK];
    for (nf_index c = 0; c < n; c += NF_CHUNK) {
        nf_index m = n - c < NF_CHUNK ? n - c : NF_CHUNK;
        NF_T(nf_bn_row_affine1)(tmp, x + c, m, mh, ml, a, b);
        nf_stream_copy(y + c, tmp, (size_t)m * sizeof(T));
    }
}

/* Backward sums of one run: *sdy = sum(dy), *sdyx = sum(dy * ((x - mh) - ml)) (x may be NULL:
 * then only sdy, and *sdyx = 0).  Blocked as the core's sums: NF_LANES partials in the input
 * precision over NF_BLOCK values, flushed to float64 lanes, then a fixed tree.  Meanwhile the
 * next run this thread reads (pf_dy, pf_x; may equal dy, x) is prefetched. */
NF_CLONES static void NF_T(nf_bn_row_bwd_sums)(double *sdy, double *sdyx, const T *restrict dy,
                                               const T *restrict x, nf_index n, T mh, T ml,
                                               const T *pf_dy, const T *pf_x)
{
    double a1[NF_LANES] = {0}, a2[NF_LANES] = {0};
    double s1 = 0, s2 = 0;
    nf_index i = 0;
    if (x) {
        while (i + NF_LANES <= n) {
            T p1[NF_LANES] = {0}, p2[NF_LANES] = {0};
            nf_index end = i + NF_BLOCK < n ? i + NF_BLOCK : n;
            for (; i + NF_LANES <= end; i += NF_LANES) {
                nf_prefetch_range(pf_dy + i, 0, NF_LANES * sizeof(T));
                nf_prefetch_range(pf_x + i, 0, NF_LANES * sizeof(T));
                for (int k = 0; k < NF_LANES; k++) {
                    T xc = (x[i + k] - mh) - ml;
                    p1[k] += dy[i + k];
                    p2[k] += dy[i + k] * xc;
                }
            }
            for (int k = 0; k < NF_LANES; k++) { a1[k] += (double)p1[k]; a2[k] += (double)p2[k]; }
        }
        for (; i < n; i++) {
            T xc = (x[i] - mh) - ml;
            s1 += (double)dy[i];
            s2 += (double)dy[i] * (double)xc;
        }
    } else {
        while (i + NF_LANES <= n) {
            T p1[NF_LANES] = {0};
            nf_index end = i + NF_BLOCK < n ? i + NF_BLOCK : n;
            for (; i + NF_LANES <= end; i += NF_LANES) {
                nf_prefetch_range(pf_dy + i, 0, NF_LANES * sizeof(T));
                for (int k = 0; k < NF_LANES; k++) p1[k] += dy[i + k];
            }
            for (int k = 0; k < NF_LANES; k++) a1[k] += (double)p1[k];
        }
        for (; i < n; i++) s1 += (double)dy[i];
    }
    *sdy = s1 + nf_tree_sum(a1);
    *sdyx = s2 + nf_tree_sum(a2);
}

/* dx[0:n] = ((dy - c2) - ((x - mh) - ml) * k1) * k2   (training)
 * dx[0:n] = dy * k2                                   (x == NULL: eval) */
NF_CLONES static void NF_T(nf_bn_row_dx1)(T *restrict dx, const T *restrict dy,
                                          const T *restrict x, nf_index n, T mh, T ml, T k1,
                                          T c2, T k2)
{
    if (x) {
        for (nf_index i = 0; i < n; i++)
            dx[i] = ((dy[i] - c2) - ((x[i] - mh) - ml) * k1) * k2;
    } else {
        for (nf_index i = 0; i < n; i++) dx[i] = dy[i] * k2;
    }
}

/* The same, built in L1 chunks and streamed out when `stream`. */
static void NF_T(nf_bn_row_dx)(T *restrict dx, const T *restrict dy, const T *restrict x,
                               nf_index n, T mh, T ml, T k1, T c2, T k2, int stream)
{
    if (!stream) { NF_T(nf_bn_row_dx1)(dx, dy, x, n, mh, ml, k1, c2, k2); return; }
    T tmp[NF_CHUNK];
    for (nf_index c = 0; c < n; c += NF_CHUNK) {
        nf_index m = n - c < NF_CHUNK ? n - c : NF_CHUNK;
        NF_T(nf_bn_row_dx1)(tmp, dy + c, x ? x + c : NULL, m, mh, ml, k1, c2, k2);
        nf_stream_copy(dx + c, tmp, (size_t)m * sizeof(T));
    }
}

/* ================================================================ columns ((rows, K) blocks) */

/* Block statistics of x[0:rows, 0:K] (row stride K, rows <= NF_BLOCK): bm[k] = column mean,
 * bm2[k] = column M2.  Corrected two-pass over the block (the second pass finds it in L1/L2),
 * with the column sums in the input precision (at most NF_BLOCK terms each, NF_BN_RU rows per
 * step) and only the per-block results in float64.  The centring uses the float64 block mean
 * split into hi + lo.  tmp: 4*K values of T.  Meanwhile the pfbytes bytes at pf (the next block
 * this thread reads; pfbytes may be 0) are prefetched, half during each pass, so memory keeps
 * streaming while the block is re-read from cache. */
NF_CLONES static void NF_T(nf_bn_cols_stats)(double *restrict bm, double *restrict bm2,
                                             T *restrict tmp, const T *restrict x, nf_index rows,
                                             nf_index K, const T *pf, size_t pfbytes)
{
    T *restrict s = tmp, *restrict q = tmp + K, *restrict mh = tmp + 2 * K,
      *restrict ml = tmp + 3 * K;
    nf_index r = 0;
    for (nf_index k = 0; k < K; k++) s[k] = 0;
    for (; r + NF_BN_RU <= rows; r += NF_BN_RU) {
        const T *x0 = x + r * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
        nf_prefetch_range(pf, nf_bn_pf_span(pfbytes, rows, 0, r),
                          nf_bn_pf_span(pfbytes, rows, 0, r + NF_BN_RU));
        for (nf_index k = 0; k < K; k++) s[k] += (x0[k] + x1[k]) + (x2[k] + x3[k]);
    }
    nf_prefetch_range(pf, nf_bn_pf_span(pfbytes, rows, 0, r), nf_bn_pf_span(pfbytes, rows, 1, 0));
    for (; r < rows; r++)
        for (nf_index k = 0; k < K; k++) s[k] += x[r * K + k];
    for (nf_index k = 0; k < K; k++) {
        double m = (double)s[k] / (double)rows;
        bm[k] = m;
        NF_T(nf_mean_split)(m, &mh[k], &ml[k]);
        s[k] = 0;
        q[k] = 0;
    }
    for (r = 0; r + NF_BN_RU <= rows; r += NF_BN_RU) {
        const T *x0 = x + r * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
        nf_prefetch_range(pf, nf_bn_pf_span(pfbytes, rows, 1, r),
                          nf_bn_pf_span(pfbytes, rows, 1, r + NF_BN_RU));
        for (nf_index k = 0; k < K; k++) {
            T t0 = (x0[k] - mh[k]) - ml[k], t1 = (x1[k] - mh[k]) - ml[k];
            T t2 = (x2[k] - mh[k]) - ml[k], t3 = (x3[k] - mh[k]) - ml[k];
            s[k] += (t0 + t1) + (t2 + t3);
            q[k] += (t0 * t0 + t1 * t1) + (t2 * t2 + t3 * t3);
        }
    }
    nf_prefetch_range(pf, nf_bn_pf_span(pfbytes, rows, 1, r), pfbytes);
    for (; r < rows; r++)
        for (nf_index k = 0; k < K; k++) {
            T t = (x[r * K + k] - mh[k]) - ml[k];
            s[k] += t;
            q[k] += t * t;
        }
    for (nf_index k = 0; k < K; k++) {         /* corrected two-pass (see nf_ssd) */
        double d = (double)s[k];
        bm[k] += d / (double)rows;
        bm2[k] = (double)q[k] - d * (d / (double)rows);
    }
}

/* y[r, k] = (x[r, k] - mh[k]) * a[k] + b[k] over `rows` rows of length K, one row at a time
 * (loading the K-vectors once per NF_BN_RU rows instead measured slower; so did, within noise,
 * splitting rows at nf_bn_peel here).  The caller folds the low part of the split mean into b
 * (b = bias - ml * a, in float64): x - mh is exact near the mean (Sterbenz), so offset data
 * keeps its accuracy with three K-vectors instead of four. */
NF_CLONES static void NF_T(nf_bn_cols_affine)(T *restrict y, const T *restrict x, nf_index rows,
                                              nf_index K, const T *restrict mh,
                                              const T *restrict a, const T *restrict b)
{
    for (nf_index r = 0; r < rows; r++)
        for (nf_index k = 0; k < K; k++)
            y[r * K + k] = ((x[r * K + k] - mh[k]) * a[k]) + b[k];
}

/* dx[r, k] = ((dy - c2[k]) - ((x - mh[k]) - ml[k]) * k1[k]) * k2[k]   (training)
 * dx[r, k] = dy * k2[k]                                              (x == NULL: eval)
 * Rows split at nf_bn_peel (backward 0.93-0.98x at (100352, 64), docs/tuning.md). */
NF_INLINE void NF_T(nf_bn_cols_dx_span)(T *restrict dx, const T *restrict dy,
                                        const T *restrict x, nf_index k0, nf_index k1e,
                                        const T *restrict mh, const T *restrict ml,
                                        const T *restrict k1, const T *restrict c2,
                                        const T *restrict k2)
{
    if (x) {
        for (nf_index k = k0; k < k1e; k++)
            dx[k] = ((dy[k] - c2[k]) - ((x[k] - mh[k]) - ml[k]) * k1[k]) * k2[k];
    } else {
        for (nf_index k = k0; k < k1e; k++) dx[k] = dy[k] * k2[k];
    }
}

NF_CLONES static void NF_T(nf_bn_cols_dx)(T *restrict dx, const T *restrict dy,
                                          const T *restrict x, nf_index rows, nf_index K,
                                          const T *restrict mh, const T *restrict ml,
                                          const T *restrict k1, const T *restrict c2,
                                          const T *restrict k2)
{
    nf_index h = nf_bn_peel(dx, dy, x, K, sizeof(T));
    for (nf_index r = 0; r < rows; r++) {
        const T *xr = x ? x + r * K : NULL;
        NF_T(nf_bn_cols_dx_span)(dx + r * K, dy + r * K, xr, 0, h, mh, ml, k1, c2, k2);
        NF_T(nf_bn_cols_dx_span)(dx + r * K, dy + r * K, xr, h, K, mh, ml, k1, c2, k2);
    }
}

/* Backward column sums over `rows` rows (rows <= NF_BLOCK: one column block), accumulated (+=)
 * into sdy[k] (sum dy) and, when x is given, sdyx[k] (sum dy * ((x - mh[k]) - ml[k])).  The
 * block's sums run in the input precision (tmp: 2*K values of T), one row per step, and are
 * added to the float64 sums once per block: the order of additions depends only on the block. */
NF_CLONES static void NF_T(nf_bn_cols_bwd_sums)(double *restrict sdy, double *restrict sdyx,
                                                T *restrict tmp, const T *restrict dy,
                                                const T *restrict x, nf_index rows, nf_index K,
                                                const T *restrict mh, const T *restrict ml)
{
    T *restrict p1 = tmp, *restrict p2 = tmp + K;
    for (nf_index k = 0; k < K; k++) { p1[k] = 0; p2[k] = 0; }
    for (nf_index r = 0; r < rows; r++) {
        if (x)
            for (nf_index k = 0; k < K; k++) {
                p1[k] += dy[r * K + k];
                p2[k] += dy[r * K + k] * ((x[r * K + k] - mh[k]) - ml[k]);
            }
        else
            for (nf_index k = 0; k < K; k++) p1[k] += dy[r * K + k];
    }
    for (nf_index k = 0; k < K; k++) sdy[k] += (double)p1[k];
    if (x)
        for (nf_index k = 0; k < K; k++) sdyx[k] += (double)p2[k];
}
