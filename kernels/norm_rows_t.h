/* norm_rows_t.h — the row-norm bodies, written once; norm_rows.h includes this file twice, with
 * T = float, SUF = f32 and T = double, SUF = f64.  No include guard, on purpose.
 * NF_T(name) expands to name_SUF.  The contract, the maths and the flags are in norm_rows.h. */

/* The value a row is normalised from: centred (LayerNorm) or as is (RMSNorm). */
NF_INLINE T NF_T(nf_nr_centre)(T v, T mh, T ml, const int CENTER)
{
    return CENTER ? (v - mh) - ml : v;
}

/* y[0:n] = (centre(x) * r) [* w] [+ b].  float64 rows have ml == 0.  One branch-free loop per
 * (w, b) combination, so each vectorises. */
NF_INLINE void NF_T(nf_nr_affine)(T *restrict y, const T *restrict x, const T *restrict w,
                                  const T *restrict b, nf_index n, T mh, T ml, T r,
                                  const int CENTER)
{
    if (w && b) {
        for (nf_index i = 0; i < n; i++)
            y[i] = (NF_T(nf_nr_centre)(x[i], mh, ml, CENTER) * r) * w[i] + b[i];
    } else if (w) {
        for (nf_index i = 0; i < n; i++)
            y[i] = (NF_T(nf_nr_centre)(x[i], mh, ml, CENTER) * r) * w[i];
    } else if (b) {
        for (nf_index i = 0; i < n; i++)
            y[i] = NF_T(nf_nr_centre)(x[i], mh, ml, CENTER) * r + b[i];
    } else {
        for (nf_index i = 0; i < n; i++)
            y[i] = NF_T(nf_nr_centre)(x[i], mh, ml, CENTER) * r;
    }
}

/* ================================================================ forward */

/* Row i (thread tid): statistics, then y (and s).  Prefetches row i + ahead meanwhile:
 * LayerNorm's x during its second pass (nf_ssd), RMSNorm's x and the residual during the y
 * pass, and with the residual (four arrays in flight) that row's y and s lines for writing
 * (one thread, add + LayerNorm 8192 x 768: 7-10% faster in the C harness; the plain forward's
 * single output stream gained nothing). */
NF_INLINE void NF_T(nf_nr_fwd_body)(const nf_nr_fwd_args *a, nf_index i, int tid,
                                    const int CENTER, const int ADD)
{
    const nf_index d = a->d;
    const nf_index nxt = i + a->ahead < a->n ? i + a->ahead : a->n - 1;
    const T *x = (const T *)a->x + i * d;
    const T *pf_x = (const T *)a->x + nxt * d;
    const T *pf_r = ADD ? (const T *)a->r + nxt * d : NULL;
    const T *w = (const T *)a->w, *b = CENTER ? (const T *)a->b : NULL;
    T *y = (T *)a->y + i * d;
    T *buf = NULL;                       /* where s is built: s itself, or the row buffer */
    if (ADD) buf = a->stream ? (T *)a->rowbuf + (nf_index)tid * d : (T *)a->s + i * d;
    const T *src = ADD ? buf : x;        /* the row that is normalised */

    double first = NF_T(nf_sum_ex)(buf, x, ADD ? (const T *)a->r + i * d : NULL, d, ADD,
                                   !CENTER);
    double rstd;
    T mh = 0, ml = 0;
    if (CENTER) {
        double mean0 = first / (double)d, dev;
        double ssd = NF_T(nf_ssd)(src, d, mean0, pf_x, &dev);
        double mean = mean0 + dev / (double)d;
        double var = (ssd - dev * (dev / (double)d)) / (double)d;
        if (var < 0) var = 0;  /* cannot happen in exact arithmetic; guards rounding */
        rstd = 1.0 / sqrt(var + a->eps);
        a->mean[i] = mean;
        NF_T(nf_mean_split)(mean, &mh, &ml);
    } else {
        rstd = 1.0 / sqrt(first / (double)d + a->eps);
    }
    a->rstd[i] = rstd;

    T tmp[NF_CHUNK];
    for (nf_index c = 0; c < d; c += NF_CHUNK) {
        nf_index m = d - c < NF_CHUNK ? d - c : NF_CHUNK;
        T *out = a->stream ? tmp : y + c;
        NF_T(nf_nr_affine)(out, src + c, w ? w + c : NULL, b ? b + c : NULL, m, mh, ml,
                           (T)rstd, CENTER);
        if (!CENTER) nf_prefetch_range(pf_x + c, 0, (size_t)m * sizeof(T));
        if (ADD) nf_prefetch_range(pf_r + c, 0, (size_t)m * sizeof(T));
        if (ADD && !a->stream) {
            nf_prefetch_range_w((T *)a->y + nxt * d + c, 0, (size_t)m * sizeof(T));
            nf_prefetch_range_w((T *)a->s + nxt * d + c, 0, (size_t)m * sizeof(T));
        }
        if (a->stream) nf_stream_copy(y + c, tmp, (size_t)m * sizeof(T));
    }
    if (ADD && a->stream) nf_stream_copy((T *)a->s + i * d, buf, (size_t)d * sizeof(T));
}

NF_CLONES static void NF_T(nf_nr_fwd_ln)(const nf_nr_fwd_args *a, nf_index i, int tid)
{
    NF_T(nf_nr_fwd_body)(a, i, tid, 1, 0);
}

NF_CLONES static void NF_T(nf_nr_fwd_rms)(const nf_nr_fwd_args *a, nf_index i, int tid)
{
    NF_T(nf_nr_fwd_body)(a, i, tid, 0, 0);
}

NF_CLONES static void NF_T(nf_nr_fwd_add_ln)(const nf_nr_fwd_args *a, nf_index i, int tid)
{
    NF_T(nf_nr_fwd_body)(a, i, tid, 1, 1);
}

NF_CLONES static void NF_T(nf_nr_fwd_add_rms)(const nf_nr_fwd_args *a, nf_index i, int tid)
{
    NF_T(nf_nr_fwd_body)(a, i, tid, 0, 1);
}

/* ================================================================ backward */

/* c1 = mean(g * xhat) and (CENTER) c2 = mean(g) of one row, blocked float64 sums as in
 * nf_sum_ex. */
NF_INLINE void NF_T(nf_nr_bwd_stats)(double *c1, double *c2, const T *restrict dy,
                                     const T *restrict x, const T *restrict w, nf_index n,
                                     T mh, T ml, T r, const int CENTER, const int HAS_W)
{
    double a1[NF_LANES] = {0}, a2[NF_LANES] = {0};
    nf_index i = 0;
    while (i + NF_LANES <= n) {
        T p1[NF_LANES] = {0}, p2[NF_LANES] = {0};
        nf_index end = i + NF_BLOCK < n ? i + NF_BLOCK : n;
        for (; i + NF_LANES <= end; i += NF_LANES)
            for (int k = 0; k < NF_LANES; k++) {
                T xh = NF_T(nf_nr_centre)(x[i + k], mh, ml, CENTER) * r;
                T g = HAS_W ? dy[i + k] * w[i + k] : dy[i + k];
                p1[k] += g * xh;
                if (CENTER) p2[k] += g;
            }
        for (int k = 0; k < NF_LANES; k++) {
            a1[k] += (double)p1[k];
            if (CENTER) a2[k] += (double)p2[k];
        }
    }
    double s1 = 0, s2 = 0;
    for (; i < n; i++) {
        T xh = NF_T(nf_nr_centre)(x[i], mh, ml, CENTER) * r;
        T g = HAS_W ? dy[i] * w[i] : dy[i];
        s1 += (double)g * (double)xh;
        s2 += (double)g;
    }
    *c1 = (s1 + nf_tree_sum(a1)) / (double)n;
    *c2 = CENTER ? (s2 + nf_tree_sum(a2)) / (double)n : 0.0;
}

/* Column j of G rows (row k at k*ld of dy, x, ds and k*ldx of dx): dx, and the rows' sums of
 * dy*xhat / dy added once (in the input precision over G <= NF_G terms, then float64) to the
 * block's dw/db partials.  DX: 0 no dx, 1 dx, 2 dx + ds. */
NF_INLINE void NF_T(nf_nr_bwd_elem)(T *restrict dx, nf_index ldx, double *restrict dw_acc,
                                    double *restrict db_acc, const T *restrict dy,
                                    const T *restrict x, const T *restrict ds, nf_index ld,
                                    const T *restrict w, nf_index j, const T *mh, const T *ml,
                                    const T *r, const T *c1, const T *c2, const int G,
                                    const int CENTER, const int HAS_W, const int ACC_W,
                                    const int ACC_B, const int DX)
{
    T wj = HAS_W ? w[j] : (T)1;
    T sw = 0, sb = 0;
    for (int k = 0; k < G; k++) {
        T dd = dy[k * ld + j];
        T xh = NF_T(nf_nr_centre)(x[k * ld + j], mh[k], ml[k], CENTER) * r[k];
        if (DX) {
            T g = HAS_W ? dd * wj : dd;
            T v = CENTER ? r[k] * ((g - xh * c1[k]) - c2[k]) : r[k] * (g - xh * c1[k]);
            if (DX == 2) v += ds[k * ld + j];
            dx[k * ldx + j] = v;
        }
        if (ACC_W) sw += dd * xh;
        if (ACC_B) sb += dd;
    }
    if (ACC_W) dw_acc[j] += (double)sw;
    if (ACC_B) db_acc[j] += (double)sb;
}

/* Columns [0, m) of G rows, one cache line at a time; each line step also prefetches the same
 * line of the pf_g rows at pf_dy/pf_x/pf_ds (a later group), so their stats pass finds them in
 * L2, and of pf_dx (their dx rows; NULL when dx is built in an L1 chunk): without that, the
 * read-for-ownership of the G interleaved dx rows' lines stalled the stores (one thread,
 * 8192 x 768 float32: 870 -> 553 ns a row, where an a + b over the three arrays takes 470;
 * docs/tuning.md).  GCC emits the write hint as prefetcht1 unless PREFETCHW is enabled; a
 * prefetchw build measured alike.  Full lines and the remainder are separate loops (the
 * full-line loop has a constant trip count).  The entry point's restrict parameters keep
 * distinct buffers apart; GCC versions the loop on the distance of dx's G rows (run-time stride
 * ldx), as the LayerNorm-only kernel's loop was. */
NF_INLINE void NF_T(nf_nr_bwd_cols)(T *restrict dx, nf_index ldx, double *restrict dw_acc,
                                    double *restrict db_acc, const T *restrict dy,
                                    const T *restrict x, const T *restrict ds, nf_index ld,
                                    const T *restrict w, nf_index m, const T *mh_, const T *ml_,
                                    const T *r_, const T *c1_, const T *c2_, const T *pf_dy,
                                    const T *pf_x, const T *pf_ds, T *pf_dx, nf_index pf_g,
                                    const int G,
                                    const int CENTER, const int HAS_W, const int ACC_W,
                                    const int ACC_B, const int DX)
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
            if (DX == 2) __builtin_prefetch(pf_ds + k * ld + jb, 0, 2);
            if (DX && pf_dx) __builtin_prefetch(pf_dx + k * ld + jb, 1, 2);
        }
        for (nf_index j = jb; j < jb + L; j++)
            NF_T(nf_nr_bwd_elem)(dx, ldx, dw_acc, db_acc, dy, x, ds, ld, w, j, mh, ml, r, c1, c2,
                                 G, CENTER, HAS_W, ACC_W, ACC_B, DX);
    }
    for (nf_index j = jb; j < m; j++)
        NF_T(nf_nr_bwd_elem)(dx, ldx, dw_acc, db_acc, dy, x, ds, ld, w, j, mh, ml, r, c1, c2,
                             G, CENTER, HAS_W, ACC_W, ACC_B, DX);
}

/* Rows [0, g) (g <= NF_G) at dy, x, ds, dx (row stride d; mean, rstd: their statistics):
 * per-row stats (only when dx is wanted), then the column pass in L1 chunks of NF_CHUNK
 * (streamed out through tmp with `stream`), adding to the partials aw/ab.  Prefetches the pg
 * rows starting pf rows on meanwhile.  Pointers the flags leave unused may be NULL. */
NF_INLINE void NF_T(nf_nr_bwd_group)(T *restrict dx, double *restrict aw, double *restrict ab,
                                     const T *restrict dy, const T *restrict x,
                                     const T *restrict ds, const T *restrict w,
                                     const double *restrict mean, const double *restrict rstd,
                                     nf_index g, nf_index d, int stream, nf_index pf,
                                     nf_index pg, const int CENTER, const int HAS_W,
                                     const int ACC_W, const int ACC_B, const int DX)
{
    const T *pf_dy = dy + pf * d, *pf_x = x + pf * d;
    const T *pf_ds = DX == 2 ? ds + pf * d : NULL;
    stream = DX && stream;
    T *pf_dx = DX && !stream ? dx + pf * d : NULL;
    T mh[NF_G], ml[NF_G], r[NF_G], c1[NF_G], c2[NF_G];
    for (nf_index k = 0; k < g; k++) {
        mh[k] = 0;
        ml[k] = 0;
        if (CENTER) NF_T(nf_mean_split)(mean[k], &mh[k], &ml[k]);
        r[k] = (T)rstd[k];
        c1[k] = 0;
        c2[k] = 0;
        if (DX) {
            double s1, s2;
            NF_T(nf_nr_bwd_stats)(&s1, &s2, dy + k * d, x + k * d, HAS_W ? w : NULL, d, mh[k],
                                  ml[k], r[k], CENTER, HAS_W);
            c1[k] = (T)s1;
            c2[k] = (T)s2;
        }
    }
    T tmp[NF_G * NF_CHUNK];
    for (nf_index c = 0; c < d; c += NF_CHUNK) {
        nf_index m = d - c < NF_CHUNK ? d - c : NF_CHUNK;
        T *out = DX ? (stream ? tmp : dx + c) : NULL;
        nf_index ldo = stream ? NF_CHUNK : d;
        double *awc = ACC_W ? aw + c : NULL, *abc = ACC_B ? ab + c : NULL;
        const T *wc = HAS_W ? w + c : NULL;
        const T *dsc = DX == 2 ? ds + c : NULL;
        const T *pds = DX == 2 ? pf_ds + c : NULL;
        if (g == NF_G) {
            NF_T(nf_nr_bwd_cols)(out, ldo, awc, abc, dy + c, x + c, dsc, d, wc, m, mh, ml, r,
                                 c1, c2, pf_dy + c, pf_x + c, pds, pf_dx ? pf_dx + c : NULL,
                                 pg, NF_G, CENTER, HAS_W, ACC_W, ACC_B, DX);
        } else {
            for (nf_index k = 0; k < g; k++)
                NF_T(nf_nr_bwd_cols)(DX ? out + k * ldo : NULL, ldo, awc, abc,
                                     dy + k * d + c, x + k * d + c,
                                     DX == 2 ? dsc + k * d : NULL, d, wc, m, mh + k, ml + k,
                                     r + k, c1 + k, c2 + k, pf_dy + c, pf_x + c, pds,
                                     pf_dx ? pf_dx + c : NULL, k == 0 ? pg : 0, 1, CENTER,
                                     HAS_W, ACC_W, ACC_B, DX);
        }
        if (stream)
            for (nf_index k = 0; k < g; k++)
                nf_stream_copy(dx + k * d + c, tmp + k * NF_CHUNK, (size_t)m * sizeof(T));
    }
}

/* One group with the flags as literals: the combinations the entry point's CASE allows (see
 * norm_rows.h), chosen from which of w, aw (dw), ab (db), dx, ds are given. */
NF_INLINE void NF_T(nf_nr_bwd_group_case)(T *restrict dx, double *restrict aw,
                                          double *restrict ab, const T *restrict dy,
                                          const T *restrict x, const T *restrict ds,
                                          const T *restrict w, const double *restrict mean,
                                          const double *restrict rstd, nf_index g, nf_index d,
                                          int stream, nf_index pf, nf_index pg,
                                          const int CASE)
{
    /* group(..., CENTER, HAS_W, ACC_W, ACC_B, DX) */
    if (CASE == NF_NR_LN) {                  /* dx; dw exactly when w */
        if (w && ab)
            NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                  1, 1, 1, 1, 1);
        else if (w)
            NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                  1, 1, 1, 0, 1);
        else if (ab)
            NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                  1, 0, 0, 1, 1);
        else
            NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                  1, 0, 0, 0, 1);
    } else if (CASE == NF_NR_LN_NODW) {      /* dx; w without dw */
        if (ab)
            NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                  1, 1, 0, 1, 1);
        else
            NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                  1, 1, 0, 0, 1);
    } else if (CASE == NF_NR_LN_SUMS) {      /* no dx: dw and/or db */
        if (aw && ab)
            NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                  1, 0, 1, 1, 0);
        else if (aw)
            NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                  1, 0, 1, 0, 0);
        else
            NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                  1, 0, 0, 1, 0);
    } else if (CASE == NF_NR_LN_DS) {        /* dx + ds */
        if (w && aw && ab)
            NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                  1, 1, 1, 1, 2);
        else if (w && aw)
            NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                  1, 1, 1, 0, 2);
        else if (w && ab)
            NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                  1, 1, 0, 1, 2);
        else if (w)
            NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                  1, 1, 0, 0, 2);
        else if (ab)
            NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                  1, 0, 0, 1, 2);
        else
            NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                  1, 0, 0, 0, 2);
    } else {                                 /* RMSNorm: no db; dx, dx + ds or none */
        const int dxm = !dx ? 0 : ds ? 2 : 1;
        if (dxm == 0) {
            if (w && aw)
                NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                      0, 1, 1, 0, 0);
            else if (w)
                NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                      0, 1, 0, 0, 0);
            else
                NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                      0, 0, 0, 0, 0);
        } else if (dxm == 1) {
            if (w && aw)
                NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                      0, 1, 1, 0, 1);
            else if (w)
                NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                      0, 1, 0, 0, 1);
            else
                NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                      0, 0, 0, 0, 1);
        } else {
            if (w && aw)
                NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                      0, 1, 1, 0, 2);
            else if (w)
                NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                      0, 1, 0, 0, 2);
            else
                NF_T(nf_nr_bwd_group)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                                      0, 0, 0, 0, 2);
        }
    }
}
/* The dispatched group entry points (NF_CLONES: one ISA dispatch per group), one per CASE, all
 * of type nf_nr_bwd_group_fn.  The buffers arrive as restrict-qualified parameters, so GCC sees
 * the contract (no output overlaps an input) in every combination's loops. */
typedef void (*NF_T(nf_nr_bwd_group_fn))(T *restrict dx, double *restrict aw,
                                         double *restrict ab, const T *restrict dy,
                                         const T *restrict x, const T *restrict ds,
                                         const T *restrict w, const double *restrict mean,
                                         const double *restrict rstd, nf_index g, nf_index d,
                                         int stream, nf_index pf, nf_index pg);

NF_CLONES static void NF_T(nf_nr_bwd_ln_group)(T *restrict dx, double *restrict aw,
                                               double *restrict ab, const T *restrict dy,
                                               const T *restrict x, const T *restrict ds,
                                               const T *restrict w, const double *restrict mean,
                                               const double *restrict rstd, nf_index g,
                                               nf_index d, int stream, nf_index pf, nf_index pg)
{
    NF_T(nf_nr_bwd_group_case)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                               NF_NR_LN);
}

NF_CLONES static void NF_T(nf_nr_bwd_ln_nodw_group)(T *restrict dx, double *restrict aw,
                                                    double *restrict ab, const T *restrict dy,
                                                    const T *restrict x, const T *restrict ds,
                                                    const T *restrict w,
                                                    const double *restrict mean,
                                                    const double *restrict rstd, nf_index g,
                                                    nf_index d, int stream, nf_index pf,
                                                    nf_index pg)
{
    NF_T(nf_nr_bwd_group_case)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                               NF_NR_LN_NODW);
}

NF_CLONES static void NF_T(nf_nr_bwd_ln_sums_group)(T *restrict dx, double *restrict aw,
                                                    double *restrict ab, const T *restrict dy,
                                                    const T *restrict x, const T *restrict ds,
                                                    const T *restrict w,
                                                    const double *restrict mean,
                                                    const double *restrict rstd, nf_index g,
                                                    nf_index d, int stream, nf_index pf,
                                                    nf_index pg)
{
    NF_T(nf_nr_bwd_group_case)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                               NF_NR_LN_SUMS);
}

NF_CLONES static void NF_T(nf_nr_bwd_ln_ds_group)(T *restrict dx, double *restrict aw,
                                                  double *restrict ab, const T *restrict dy,
                                                  const T *restrict x, const T *restrict ds,
                                                  const T *restrict w,
                                                  const double *restrict mean,
                                                  const double *restrict rstd, nf_index g,
                                                  nf_index d, int stream, nf_index pf,
                                                  nf_index pg)
{
    NF_T(nf_nr_bwd_group_case)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                               NF_NR_LN_DS);
}

NF_CLONES static void NF_T(nf_nr_bwd_rms_group)(T *restrict dx, double *restrict aw,
                                                double *restrict ab, const T *restrict dy,
                                                const T *restrict x, const T *restrict ds,
                                                const T *restrict w, const double *restrict mean,
                                                const double *restrict rstd, nf_index g,
                                                nf_index d, int stream, nf_index pf, nf_index pg)
{
    NF_T(nf_nr_bwd_group_case)(dx, aw, ab, dy, x, ds, w, mean, rstd, g, d, stream, pf, pg,
                               NF_NR_RMS);
}

/* Block blk: zero its partials, then its rows group by group through `group`, prefetching the
 * group nf_nr_bwd_ahead groups ahead (rows past n: none). */
NF_INLINE void NF_T(nf_nr_bwd_block)(const nf_nr_bwd_args *a, nf_index blk,
                                     NF_T(nf_nr_bwd_group_fn) group)
{
    const nf_index n = a->n, d = a->d, width = a->width;
    double *aw = NULL, *ab = NULL;
    if (width > 0) {
        memset(a->work + blk * width, 0, (size_t)width * sizeof(double));
        if (a->dw) aw = a->work + blk * width;
        if (a->db) ab = a->work + blk * width + (a->dw ? d : 0);
    }
    T *dx = (T *)a->dx;
    const T *dy = (const T *)a->dy, *x = (const T *)a->x, *ds = (const T *)a->ds;
    const nf_index ahead = nf_nr_bwd_ahead(d, (nf_index)sizeof(T));
    nf_index r0 = blk * a->rows_per_block;
    nf_index r1 = r0 + a->rows_per_block < n ? r0 + a->rows_per_block : n;
    for (nf_index i = r0; i < r1;) {
        nf_index g = r1 - i < NF_G ? r1 - i : NF_G;
        nf_index pf = i + g + (ahead - 1) * NF_G;
        nf_index pg = n - pf < NF_G ? n - pf : NF_G;
        if (pg < 0) { pg = 0; pf = i; }
        group(dx ? dx + i * d : NULL, aw, ab, dy + i * d, x + i * d, ds ? ds + i * d : NULL,
              (const T *)a->w, a->mean ? a->mean + i : NULL, a->rstd + i, g, d, a->stream,
              pf - i, pg);
        i += g;
    }
}

/* The block functions nf_nr_bwd_pick hands out: the block loop over one CASE's group entry. */
static void NF_T(nf_nr_bwd_ln)(const nf_nr_bwd_args *a, nf_index blk)
{
    NF_T(nf_nr_bwd_block)(a, blk, NF_T(nf_nr_bwd_ln_group));
}

static void NF_T(nf_nr_bwd_ln_nodw)(const nf_nr_bwd_args *a, nf_index blk)
{
    NF_T(nf_nr_bwd_block)(a, blk, NF_T(nf_nr_bwd_ln_nodw_group));
}

static void NF_T(nf_nr_bwd_ln_sums)(const nf_nr_bwd_args *a, nf_index blk)
{
    NF_T(nf_nr_bwd_block)(a, blk, NF_T(nf_nr_bwd_ln_sums_group));
}

static void NF_T(nf_nr_bwd_ln_ds)(const nf_nr_bwd_args *a, nf_index blk)
{
    NF_T(nf_nr_bwd_block)(a, blk, NF_T(nf_nr_bwd_ln_ds_group));
}

static void NF_T(nf_nr_bwd_rms)(const nf_nr_bwd_args *a, nf_index blk)
{
    NF_T(nf_nr_bwd_block)(a, blk, NF_T(nf_nr_bwd_rms_group));
}

/* Columns [j0, j1) of the partials summed over blocks in block order (nf_reduce_blocks), then
 * cast into dw (columns [0, d) of a block when dw is wanted) and db (the rest). */
static void NF_T(nf_nr_finish)(const nf_nr_bwd_args *a, nf_index j0, nf_index j1)
{
    double *work = a->work;
    const nf_index d = a->d;
    T *dw = (T *)a->dw, *db = (T *)a->db;
    nf_reduce_blocks(work, a->nb, a->width, j0, j1);
    for (nf_index j = j0; j < j1; j++) {
        if (dw && j < d) dw[j] = (T)work[j];
        else if (dw) db[j - d] = (T)work[j];
        else db[j] = (T)work[j];
    }
}
