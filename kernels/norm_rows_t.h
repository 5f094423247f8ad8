/* norm_rows_t.h — the row-norm bodies, written once; norm_rows.h includes this file twice, with
 * T = float, SUF = f32 and T = double, SUF = f64.  No include guard, on purpose.
 * NF_T(name) expands to name_SUF.  The contract and the maths are in norm_rows.h. */

/* ================================================================ LayerNorm forward */

/* y[0:n] = ((x - mh) - ml) * r [* w] [+ b].  float64 rows have ml == 0.  One branch-free loop
 * per (w, b) combination, so each vectorises. */
NF_INLINE void NF_T(nf_ln_affine)(T *restrict y, const T *restrict x, const T *restrict w,
                                  const T *restrict b, nf_index n, T mh, T ml, T r)
{
    if (w && b) {
        for (nf_index i = 0; i < n; i++) y[i] = (((x[i] - mh) - ml) * r) * w[i] + b[i];
    } else if (w) {
        for (nf_index i = 0; i < n; i++) y[i] = (((x[i] - mh) - ml) * r) * w[i];
    } else if (b) {
        for (nf_index i = 0; i < n; i++) y[i] = ((x[i] - mh) - ml) * r + b[i];
    } else {
        for (nf_index i = 0; i < n; i++) y[i] = ((x[i] - mh) - ml) * r;
    }
}

/* One row: *mean_out, *rstd_out, then y[0:n].  w, b may be NULL.  next_x is the row this thread
 * normalises next (prefetched during the second pass; may equal x).  With `stream`, y is built
 * NF_CHUNK elements at a time in L1 and copied out with non-temporal stores; the caller fences. */
NF_CLONES static void NF_T(nf_ln_fwd_row)(T *restrict y, double *mean_out, double *rstd_out,
                                         const T *restrict x, const T *restrict w,
                                         const T *restrict b, nf_index n, double eps,
                                         int stream, const T *next_x)
{
    double mean0 = NF_T(nf_sum)(x, n) / (double)n, dev;
    double ssd = NF_T(nf_ssd)(x, n, mean0, next_x, &dev);
    double mean = mean0 + dev / (double)n;
    double var = (ssd - dev * (dev / (double)n)) / (double)n;
    if (var < 0) var = 0;   /* cannot happen in exact arithmetic; guards rounding */
    double rstd = 1.0 / sqrt(var + eps);
    *mean_out = mean;
    *rstd_out = rstd;
    T mh, ml;
    NF_T(nf_mean_split)(mean, &mh, &ml);
    if (!stream) {
        NF_T(nf_ln_affine)(y, x, w, b, n, mh, ml, (T)rstd);
        return;
    }
    T tmp[NF_CHUNK];
    for (nf_index c = 0; c < n; c += NF_CHUNK) {
        nf_index m = n - c < NF_CHUNK ? n - c : NF_CHUNK;
        NF_T(nf_ln_affine)(tmp, x + c, w ? w + c : NULL, b ? b + c : NULL, m, mh, ml, (T)rstd);
        nf_stream_copy(y + c, tmp, (size_t)m * sizeof(T));
    }
}

/* ================================================================ LayerNorm backward */

/* One row's c1 = mean(g * xhat) and c2 = mean(g) (g = dy * w, or dy when w is NULL), blocked
 * float64 sums as in core.h's nf_sum. */
NF_INLINE void NF_T(nf_ln_bwd_stats)(double *c1, double *c2, const T *restrict dy,
                                     const T *restrict x, const T *restrict w, nf_index n,
                                     T mh, T ml, T r)
{
    double a1[NF_LANES] = {0}, a2[NF_LANES] = {0};
    nf_index i = 0;
    while (i + NF_LANES <= n) {
        T p1[NF_LANES] = {0}, p2[NF_LANES] = {0};
        nf_index end = i + NF_BLOCK < n ? i + NF_BLOCK : n;
        for (; i + NF_LANES <= end; i += NF_LANES)
            for (int k = 0; k < NF_LANES; k++) {
                T xh = ((x[i + k] - mh) - ml) * r;
                T g = w ? dy[i + k] * w[i + k] : dy[i + k];
                p1[k] += g * xh;
                p2[k] += g;
            }
        for (int k = 0; k < NF_LANES; k++) {
            a1[k] += (double)p1[k];
            a2[k] += (double)p2[k];
        }
    }
    double s1 = 0, s2 = 0;
    for (; i < n; i++) {
        T xh = ((x[i] - mh) - ml) * r;
        T g = w ? dy[i] * w[i] : dy[i];
        s1 += (double)g * (double)xh;
        s2 += (double)g;
    }
    *c1 = (s1 + nf_tree_sum(a1)) / (double)n;
    *c2 = (s2 + nf_tree_sum(a2)) / (double)n;
}

/* Column j of G rows (row k at dx[k*ldx], dy[k*ld], x[k*ld]).  Compile-time flags (the
 * callers pass constants, and always_inline makes each combination a branch-free loop):
 *   HAS_W  g = dy * w (else g = dy)          DX     write dx
 *   ACC_W  dw_acc[j] += sum_k dy * xhat      ACC_B  db_acc[j] += sum_k dy
 * The G <= NF_G terms of a column are summed in the input precision, then added in float64. */
NF_INLINE void NF_T(nf_ln_bwd_col)(T *restrict dx, nf_index ldx, double *restrict dw_acc,
                                   double *restrict db_acc, const T *restrict dy,
                                   const T *restrict x, nf_index ld, const T *restrict w,
                                   nf_index j, const T *mh, const T *ml, const T *r,
                                   const T *c1, const T *c2, const int G, const int HAS_W,
                                   const int DX, const int ACC_W, const int ACC_B)
{
    T wj = HAS_W ? w[j] : (T)1;
    T sw = 0, sb = 0;
    for (int k = 0; k < G; k++) {
        T d = dy[k * ld + j];
        T xh = ((x[k * ld + j] - mh[k]) - ml[k]) * r[k];
        if (DX) {
            T g = HAS_W ? d * wj : d;
            dx[k * ldx + j] = r[k] * ((g - xh * c1[k]) - c2[k]);
        }
        if (ACC_W) sw += d * xh;
        if (ACC_B) sb += d;
    }
    if (ACC_W) dw_acc[j] += (double)sw;
    if (ACC_B) db_acc[j] += (double)sb;
}

/* The dx pass over columns [0, m) of G rows, one cache line (L columns) at a time; each line
 * step also prefetches that line of pf_g rows at pf_dy/pf_x (a later group), so the later
 * group's stats pass finds them in L2.  Full lines and the remainder are separate loops (the
 * full-line loop has a constant trip count). */
NF_INLINE void NF_T(nf_ln_bwd_dx_body)(T *restrict dx, nf_index ldx, double *restrict dw_acc,
                                       double *restrict db_acc, const T *restrict dy,
                                       const T *restrict x, nf_index ld, const T *restrict w,
                                       nf_index m, const T *mh_, const T *ml_, const T *r_,
                                       const T *c1_, const T *c2_, const T *pf_dy,
                                       const T *pf_x, nf_index pf_g, const int G,
                                       const int HAS_W, const int DX, const int ACC_W,
                                       const int ACC_B)
{
    enum { L = 64 / sizeof(T) };
    T mh[NF_G], ml[NF_G], r[NF_G], c1[NF_G], c2[NF_G];
    for (int k = 0; k < G; k++) {
        mh[k] = mh_[k]; ml[k] = ml_[k]; r[k] = r_[k]; c1[k] = c1_[k]; c2[k] = c2_[k];
    }
    nf_index jb = 0;
    for (; jb + L <= m; jb += L) {
        for (nf_index k = 0; k < pf_g; k++) {
            __builtin_prefetch(pf_dy + k * ld + jb, 0, 2);
            __builtin_prefetch(pf_x + k * ld + jb, 0, 2);
        }
        for (nf_index j = jb; j < jb + L; j++)
            NF_T(nf_ln_bwd_col)(dx, ldx, dw_acc, db_acc, dy, x, ld, w, j, mh, ml, r, c1, c2, G,
                                HAS_W, DX, ACC_W, ACC_B);
    }
    for (nf_index j = jb; j < m; j++)
        NF_T(nf_ln_bwd_col)(dx, ldx, dw_acc, db_acc, dy, x, ld, w, j, mh, ml, r, c1, c2, G,
                            HAS_W, DX, ACC_W, ACC_B);
}

/* The dx pass for G rows: picks the nf_ln_bwd_dx_body instantiation.  NO_DW = 0: dw_acc is
 * given exactly when w is (the default: dweight exists iff weight does); NO_DW = 1: w is given
 * but dweight is not wanted.  db_acc NULL: no dbias. */
NF_INLINE void NF_T(nf_ln_bwd_dx)(T *restrict dx, nf_index ldx, double *restrict dw_acc,
                                  double *restrict db_acc, const T *restrict dy,
                                  const T *restrict x, nf_index ld, const T *restrict w,
                                  nf_index m, const T *mh, const T *ml, const T *r,
                                  const T *c1, const T *c2, const T *pf_dy, const T *pf_x,
                                  nf_index pf_g, const int G, const int NO_DW)
{
    if (NO_DW && db_acc)
        NF_T(nf_ln_bwd_dx_body)(dx, ldx, dw_acc, db_acc, dy, x, ld, w, m, mh, ml, r, c1, c2,
                                pf_dy, pf_x, pf_g, G, 1, 1, 0, 1);
    else if (NO_DW)
        NF_T(nf_ln_bwd_dx_body)(dx, ldx, dw_acc, db_acc, dy, x, ld, w, m, mh, ml, r, c1, c2,
                                pf_dy, pf_x, pf_g, G, 1, 1, 0, 0);
    else if (w && db_acc)
        NF_T(nf_ln_bwd_dx_body)(dx, ldx, dw_acc, db_acc, dy, x, ld, w, m, mh, ml, r, c1, c2,
                                pf_dy, pf_x, pf_g, G, 1, 1, 1, 1);
    else if (w)
        NF_T(nf_ln_bwd_dx_body)(dx, ldx, dw_acc, db_acc, dy, x, ld, w, m, mh, ml, r, c1, c2,
                                pf_dy, pf_x, pf_g, G, 1, 1, 1, 0);
    else if (db_acc)
        NF_T(nf_ln_bwd_dx_body)(dx, ldx, dw_acc, db_acc, dy, x, ld, w, m, mh, ml, r, c1, c2,
                                pf_dy, pf_x, pf_g, G, 0, 1, 0, 1);
    else
        NF_T(nf_ln_bwd_dx_body)(dx, ldx, dw_acc, db_acc, dy, x, ld, w, m, mh, ml, r, c1, c2,
                                pf_dy, pf_x, pf_g, G, 0, 1, 0, 0);
}

/* Backward for g (1..NF_G) consecutive rows of length n at dx/dy/x (row stride n): c1, c2 per
 * row, then the dx pass (see nf_ln_bwd_dx for NO_DW).  While a chunk of columns is in L1/L2, the
 * same chunk of the next_g rows at next_dy/next_x (next_g may be 0) is prefetched.  With
 * `stream`, dx is built per chunk in L1 and copied out with non-temporal stores; the caller
 * fences. */
NF_INLINE void NF_T(nf_ln_bwd_rows_body)(T *restrict dx, double *restrict dw_acc,
                                         double *restrict db_acc, const T *restrict dy,
                                         const T *restrict x, const T *restrict w,
                                         const double *mean, const double *rstd, nf_index g,
                                         nf_index n, int stream, const T *next_dy,
                                         const T *next_x, nf_index next_g, const int NO_DW)
{
    T mh[NF_G], ml[NF_G], r[NF_G], c1[NF_G], c2[NF_G];
    for (nf_index k = 0; k < g; k++) {
        double s1, s2;
        NF_T(nf_mean_split)(mean[k], &mh[k], &ml[k]);
        r[k] = (T)rstd[k];
        NF_T(nf_ln_bwd_stats)(&s1, &s2, dy + k * n, x + k * n, w, n, mh[k], ml[k], r[k]);
        c1[k] = (T)s1;
        c2[k] = (T)s2;
    }
    T tmp[NF_G * NF_CHUNK];
    for (nf_index c = 0; c < n; c += NF_CHUNK) {
        nf_index m = n - c < NF_CHUNK ? n - c : NF_CHUNK;
        T *out = stream ? tmp : dx + c;
        nf_index ldo = stream ? NF_CHUNK : n;
        double *aw = dw_acc ? dw_acc + c : NULL, *ab = db_acc ? db_acc + c : NULL;
        const T *wc = w ? w + c : NULL;
        if (g == NF_G) {
            NF_T(nf_ln_bwd_dx)(out, ldo, aw, ab, dy + c, x + c, n, wc, m, mh, ml, r, c1, c2,
                               next_dy + c, next_x + c, next_g, NF_G, NO_DW);
        } else {
            for (nf_index k = 0; k < g; k++)
                NF_T(nf_ln_bwd_dx)(out + k * ldo, ldo, aw, ab, dy + k * n + c, x + k * n + c, n,
                                   wc, m, mh + k, ml + k, r + k, c1 + k, c2 + k, next_dy + c,
                                   next_x + c, k == 0 ? next_g : 0, 1, NO_DW);
        }
        if (stream)
            for (nf_index k = 0; k < g; k++)
                nf_stream_copy(dx + k * n + c, tmp + k * NF_CHUNK, (size_t)m * sizeof(T));
    }
}

/* Backward for g rows with dweight exactly when there is a weight:
 *   w       NULL: no weight (g = dy); else dw_acc[0:n] += sum over the g rows of dy * xhat
 *   db_acc  NULL: no dbias;           else db_acc[0:n] += sum over the g rows of dy
 * Three entry points, not one with more branches: with the NO_DW instantiations in the same
 * function GCC compiled the common ones into ~9% more instructions (callgrind). */
NF_CLONES static void NF_T(nf_ln_bwd_rows)(T *restrict dx, double *restrict dw_acc,
                                          double *restrict db_acc, const T *restrict dy,
                                          const T *restrict x, const T *restrict w,
                                          const double *mean, const double *rstd, nf_index g,
                                          nf_index n, int stream, const T *next_dy,
                                          const T *next_x, nf_index next_g)
{
    NF_T(nf_ln_bwd_rows_body)(dx, dw_acc, db_acc, dy, x, w, mean, rstd, g, n, stream, next_dy,
                              next_x, next_g, 0);
}

/* As nf_ln_bwd_rows, for a weight w (not NULL) whose dweight is not wanted. */
NF_CLONES static void NF_T(nf_ln_bwd_rows_nodw)(T *restrict dx, double *restrict db_acc,
                                               const T *restrict dy, const T *restrict x,
                                               const T *restrict w, const double *mean,
                                               const double *rstd, nf_index g, nf_index n,
                                               int stream, const T *next_dy, const T *next_x,
                                               nf_index next_g)
{
    NF_T(nf_ln_bwd_rows_body)(dx, NULL, db_acc, dy, x, w, mean, rstd, g, n, stream, next_dy,
                              next_x, next_g, 1);
}

/* The parameter sums alone (no dx wanted) for g (1..NF_G) rows, as nf_ln_bwd_rows would add
 * them (same order, so the same bits): dw_acc and/or db_acc (at least one given).  No c1/c2
 * pass, no weight needed.  Prefetches the next_g rows as nf_ln_bwd_rows does. */
NF_CLONES static void NF_T(nf_ln_bwd_sums)(double *restrict dw_acc, double *restrict db_acc,
                                          const T *restrict dy, const T *restrict x,
                                          const double *mean, const double *rstd, nf_index g,
                                          nf_index n, const T *next_dy, const T *next_x,
                                          nf_index next_g)
{
    T mh[NF_G], ml[NF_G], r[NF_G], zero[NF_G] = {0};
    for (nf_index k = 0; k < g; k++) {
        NF_T(nf_mean_split)(mean[k], &mh[k], &ml[k]);
        r[k] = (T)rstd[k];
    }
    for (nf_index c = 0; c < n; c += NF_CHUNK) {
        nf_index m = n - c < NF_CHUNK ? n - c : NF_CHUNK;
        double *aw = dw_acc ? dw_acc + c : NULL, *ab = db_acc ? db_acc + c : NULL;
        for (nf_index k0 = 0; k0 < g; k0 += (g == NF_G ? NF_G : 1)) {
            const int full = g == NF_G;
            const T *dyk = dy + k0 * n + c, *xk = x + k0 * n + c;
            nf_index pg = k0 == 0 ? next_g : 0;
            if (full && aw && ab)
                NF_T(nf_ln_bwd_dx_body)(NULL, 0, aw, ab, dyk, xk, n, NULL, m, mh, ml, r, zero,
                                        zero, next_dy + c, next_x + c, pg, NF_G, 0, 0, 1, 1);
            else if (full && aw)
                NF_T(nf_ln_bwd_dx_body)(NULL, 0, aw, ab, dyk, xk, n, NULL, m, mh, ml, r, zero,
                                        zero, next_dy + c, next_x + c, pg, NF_G, 0, 0, 1, 0);
            else if (full)
                NF_T(nf_ln_bwd_dx_body)(NULL, 0, aw, ab, dyk, xk, n, NULL, m, mh, ml, r, zero,
                                        zero, next_dy + c, next_x + c, pg, NF_G, 0, 0, 0, 1);
            else if (aw && ab)
                NF_T(nf_ln_bwd_dx_body)(NULL, 0, aw, ab, dyk, xk, n, NULL, m, mh + k0, ml + k0,
                                        r + k0, zero, zero, next_dy + c, next_x + c, pg, 1, 0, 0,
                                        1, 1);
            else if (aw)
                NF_T(nf_ln_bwd_dx_body)(NULL, 0, aw, ab, dyk, xk, n, NULL, m, mh + k0, ml + k0,
                                        r + k0, zero, zero, next_dy + c, next_x + c, pg, 1, 0, 0,
                                        1, 0);
            else
                NF_T(nf_ln_bwd_dx_body)(NULL, 0, aw, ab, dyk, xk, n, NULL, m, mh + k0, ml + k0,
                                        r + k0, zero, zero, next_dy + c, next_x + c, pg, 1, 0, 0,
                                        0, 1);
        }
    }
}
