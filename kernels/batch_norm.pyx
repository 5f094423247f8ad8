# BatchNorm kernels: normalise each channel of x over the batch (and spatial) axes.
#
# Contract (normffn/batch_norm.py's check layer guarantees it; nothing here re-checks):
#   * Two views of the data, chosen by the Python layer from x's strides (no copy):
#       "rows"    x, y, dy, dx C-contiguous (N, C, S): channel c is N contiguous runs of S values
#                 (PyTorch's NCHW with S = H*W).
#       "columns" x, y, dy, dx C-contiguous (M, K): row-major, column k belongs to channel k // S
#                 (channels-last: M = N*H*W rows of K = C channels, S = 1; also (N, C) input, and
#                 (N, C, S) with a small S seen as (N, C*S)).
#   * N, C, S, M, K >= 1; no output overlaps an input; weight/bias contiguous (C,) or None.
#   * Statistics travel in float64 (C,) arrays; results come out finished: mean, var (biased),
#     rstd = 1/sqrt(var + eps) in forward, dx, dweight = sdyx*rstd, dbias = sdy in backward.
#   * Scratch comes from the caller (normffn._workspace), sized by scratch_sizes(): `consts`
#     (per-channel or per-column constants, x's dtype) and `parts` (float64 block partials).
#   * `stream` (rows view only; the Python layer decides from normffn._tuning.stream_threshold)
#     writes outputs with non-temporal stores.  The columns view never streams.
#   * The GIL is released once per call; all loops run without bounds checks.
#
# Layers: bn_channels.h computes one run or one block; this file splits the work over threads
# and merges the partials; batch_norm.py checks arguments, allocates and runs the phases.
#
# The phases (what normffn.batch_norm exposes for chunked data, e.g. Dask):
#   stats          per-channel (mean, M2) of one chunk          -> merged across chunks (Chan)
#   apply          y from given float64 (mean, rstd)
#   backward_sums  per-channel sdy, sdyx of one chunk           -> summed across chunks
#   backward_apply dx from given (mean, rstd, sdy, sdyx, count)
# The one-call kernels (forward, backward) are the same pieces, fused where that saves a pass
# over memory: with enough channels each thread owns whole channels and normalises a channel's
# slab right after its statistics, while the slab is still in L2.
#
# Threads and determinism.  Every reduction is cut into blocks fixed by the shape alone — one
# block per (n, c) run (segments of NF_BN_SEG within long runs) in the rows view, blocks of
# nf_bn_block_rows (<= NF_BLOCK) rows grouped into a fixed number of parts in the columns view —
# and blocks are merged (Chan, or plain float64 sums in backward) in index order.  Which thread
# computes a block never changes its value, so 1 and N threads are bitwise identical.
#   rows view: with enough channels (own_channels) each thread owns whole channels (prange over
#     c); otherwise the (n, c) runs are shared out and their partials merged in the same order.
#   columns view: thread t takes a fixed run of row parts for the statistics and the same rows,
#     in one forward sweep, for the elementwise pass.
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport isinf, sqrt

from core cimport (nf_chan, nf_index, nf_mean_split_f32, nf_mean_split_f64, nf_stream_fence,
                  nf_threads_for)
from bn_channels cimport *

# ---------------------------------------------------------------- tuning
# Fork/join threshold shared with the LayerNorm kernels (set when they were written; no sweep).
cdef Py_ssize_t MIN_ELEMS_PER_THREAD = 32768
# Columns view: at most MAX_PARTS row parts (each holds 2*K float64 partials) and PART_BUDGET
# float64 partials in all (design limits on scratch, not measured optima).
cdef Py_ssize_t MAX_PARTS = 16
cdef Py_ssize_t PART_BUDGET = 1 << 20


# ---------------------------------------------------------------- per-channel constants
cdef inline double rstd_of(double var, double eps) noexcept nogil:
    """The one place rstd is formed (bitwise what NumPy's 1.0 / np.sqrt(var + eps) gives)."""
    return 1.0 / sqrt(var + eps)


cdef inline void mean_split(double v, floating *hi, floating *lo) noexcept nogil:
    if floating is float:
        nf_mean_split_f32(v, hi, lo)
    else:
        nf_mean_split_f64(v, hi, lo)


cdef inline void fwd_consts(floating *mh, floating *ml, floating *a, floating *b,
                            double mean, double rstd, const floating *weight,
                            const floating *bias, Py_ssize_t c) noexcept nogil:
    """y = ((x - mh) - ml) * a + b  with  a = rstd * weight[c],  b = bias[c]."""
    mean_split(mean, mh, ml)
    a[0] = <floating>(rstd * weight[c]) if weight != NULL else <floating>rstd
    b[0] = bias[c] if bias != NULL else 0


cdef inline void bwd_consts(floating *mh, floating *ml, floating *k1, floating *c2, floating *k2,
                            double mean, double rstd, double sdy, double sdyx, double count,
                            bint training, const floating *weight, Py_ssize_t c) noexcept nogil:
    """dx = ((dy - c2) - ((x - mh) - ml) * k1) * k2 with c2 = sdy/count,
    k1 = rstd^2 * sdyx/count, k2 = rstd * weight[c]; eval: dx = dy * k2."""
    mean_split(mean, mh, ml)
    k2[0] = <floating>(rstd * weight[c]) if weight != NULL else <floating>rstd
    if training:
        c2[0] = <floating>(sdy / count)
        k1[0] = <floating>(rstd * rstd * (sdyx / count))
    else:
        c2[0] = 0
        k1[0] = 0


# ---------------------------------------------------------------- typed wrappers of the C family
cdef inline void row_stats(const floating *x, Py_ssize_t n, double *mean, double *m2,
                           const floating *pf) noexcept nogil:
    if floating is float:
        nf_bn_row_stats_f32(x, n, mean, m2, pf)
    else:
        nf_bn_row_stats_f64(x, n, mean, m2, pf)


cdef inline void row_affine(floating *y, const floating *x, Py_ssize_t n, floating mh,
                            floating ml, floating a, floating b, int stream) noexcept nogil:
    if floating is float:
        nf_bn_row_affine_f32(y, x, n, mh, ml, a, b, stream)
    else:
        nf_bn_row_affine_f64(y, x, n, mh, ml, a, b, stream)


cdef inline void row_bwd_sums(double *sdy, double *sdyx, const floating *dy, const floating *x,
                              Py_ssize_t n, floating mh, floating ml, const floating *pf_dy,
                              const floating *pf_x) noexcept nogil:
    if floating is float:
        nf_bn_row_bwd_sums_f32(sdy, sdyx, dy, x, n, mh, ml, pf_dy, pf_x)
    else:
        nf_bn_row_bwd_sums_f64(sdy, sdyx, dy, x, n, mh, ml, pf_dy, pf_x)


cdef inline void row_dx(floating *dx, const floating *dy, const floating *x, Py_ssize_t n,
                        floating mh, floating ml, floating k1, floating c2, floating k2,
                        int stream) noexcept nogil:
    if floating is float:
        nf_bn_row_dx_f32(dx, dy, x, n, mh, ml, k1, c2, k2, stream)
    else:
        nf_bn_row_dx_f64(dx, dy, x, n, mh, ml, k1, c2, k2, stream)


cdef inline void col_stats(double *bm, double *bm2, double *tmp, const floating *x,
                           Py_ssize_t rows, Py_ssize_t K, const floating *pf,
                           size_t pfbytes) noexcept nogil:
    # tmp: 4*K values of floating (the caller reserves 4*K doubles)
    if floating is float:
        nf_bn_cols_stats_f32(bm, bm2, <float *>tmp, x, rows, K, pf, pfbytes)
    else:
        nf_bn_cols_stats_f64(bm, bm2, <double *>tmp, x, rows, K, pf, pfbytes)


cdef inline void col_affine(floating *y, const floating *x, Py_ssize_t rows, Py_ssize_t K,
                            const floating *k) noexcept nogil:
    # k holds the K-vectors mh, a, b - ml * a back to back
    if floating is float:
        nf_bn_cols_affine_f32(y, x, rows, K, k, k + K, k + 2 * K)
    else:
        nf_bn_cols_affine_f64(y, x, rows, K, k, k + K, k + 2 * K)


cdef inline void col_bwd_sums(double *sdy, double *sdyx, double *tmp, const floating *dy,
                              const floating *x, Py_ssize_t rows, Py_ssize_t K,
                              const floating *k) noexcept nogil:
    # tmp: 2*K values of floating; k holds the K-vectors mh, ml
    if floating is float:
        nf_bn_cols_bwd_sums_f32(sdy, sdyx, <float *>tmp, dy, x, rows, K, k, k + K)
    else:
        nf_bn_cols_bwd_sums_f64(sdy, sdyx, <double *>tmp, dy, x, rows, K, k, k + K)


cdef inline void col_dx(floating *dx, const floating *dy, const floating *x, Py_ssize_t rows,
                        Py_ssize_t K, const floating *k) noexcept nogil:
    # k holds the K-vectors mh, ml, k1, c2, k2 back to back
    if floating is float:
        nf_bn_cols_dx_f32(dx, dy, x, rows, K, k, k + K, k + 2 * K, k + 3 * K, k + 4 * K)
    else:
        nf_bn_cols_dx_f64(dx, dy, x, rows, K, k, k + K, k + 2 * K, k + 3 * K, k + 4 * K)


cdef inline bint own_channels(Py_ssize_t C, int nt) noexcept nogil:
    """Rows view: does each thread take whole channels?  (Results are the same either way.)"""
    return nt == 1 or C >= 8 * nt or C % nt == 0


cdef inline void _param_grads(floating *dweight, floating *dbias, const double *sdy,
                              const double *sdyx, const double *rstd,
                              Py_ssize_t C) noexcept nogil:
    """dweight = sdyx * rstd, dbias = sdy, rounded to x's dtype (either may be NULL)."""
    cdef Py_ssize_t c
    for c in range(C):
        if dweight != NULL:
            dweight[c] = <floating>(sdyx[c] * rstd[c])
        if dbias != NULL:
            dbias[c] = <floating>sdy[c]


# ================================================================ rows view
# mean[c] = sum_{n,s} x[n, c, s] / (N*S)                   (merged per run, runs in n order)
# M2[c]   = sum_{n,s} (x[n, c, s] - mean[c])^2             (Chan merge of the runs' M2)
# y[n, c, s] = (x[n, c, s] - mean[c]) * rstd[c] * weight[c] + bias[c]
cdef void _rows_channel_stats(double *mean, double *m2, const floating *x, Py_ssize_t N,
                              Py_ssize_t C, Py_ssize_t S, Py_ssize_t c) noexcept nogil:
    """(mean, M2) of channel c: its N runs merged in n order; prefetches the next run."""
    cdef double cn = 0, cm = 0, cm2 = 0, rm, rm2
    cdef Py_ssize_t n
    for n in range(N):
        row_stats(x + (n * C + c) * S, S, &rm, &rm2,
                  x + ((n + 1 if n + 1 < N else n) * C + c) * S)
        nf_chan(&cn, &cm, &cm2, <double>S, rm, rm2)
    mean[0] = cm
    m2[0] = cm2


cdef void _rows_channel_train(floating *y, double *mean, double *var, double *rstd,
                              const floating *x, const floating *w, const floating *b,
                              double eps, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t c,
                              int stream) noexcept nogil:
    """Training forward of one whole channel: statistics, then y while the slab is in L2."""
    cdef double cm, cm2, r
    cdef floating mh, ml, a, bb
    cdef Py_ssize_t n
    _rows_channel_stats(&cm, &cm2, x, N, C, S, c)
    mean[c] = cm
    var[c] = cm2 / <double>(N * S)
    r = rstd_of(var[c], eps)
    rstd[c] = r
    fwd_consts(&mh, &ml, &a, &bb, cm, r, w, b, c)
    for n in range(N - 1, -1, -1):       # last runs first: they are the most recently read
        row_affine(y + (n * C + c) * S, x + (n * C + c) * S, S, mh, ml, a, bb, stream)


cdef void _rows_stats(double *mp, double *m2p, const floating *xp, double *part,
                      Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int nt) noexcept nogil:
    """Per-channel (mean, M2); part: 2*N*C doubles unless own_channels(C, nt)."""
    cdef Py_ssize_t c, n, r
    cdef double cn, cm, cm2
    if own_channels(C, nt):
        for c in prange(C, schedule='static', num_threads=nt):
            _rows_channel_stats(&mp[c], &m2p[c], xp, N, C, S, c)
        return
    for r in prange(N * C, schedule='static', num_threads=nt):
        row_stats(xp + r * S, S, &part[2 * r], &part[2 * r + 1],
                  xp + (r + 1 if r + 1 < N * C else r) * S)
    for c in range(C):
        cn = 0
        cm = 0
        cm2 = 0
        for n in range(N):
            nf_chan(&cn, &cm, &cm2, <double>S, part[2 * (n * C + c)], part[2 * (n * C + c) + 1])
        mp[c] = cm
        m2p[c] = cm2


cdef void _rows_apply(floating *yp, const floating *xp, const double *mp, const double *rp,
                      const floating *w, const floating *b, floating *k, Py_ssize_t N,
                      Py_ssize_t C, Py_ssize_t S, int nt, int stream) noexcept nogil:
    """y from (mean, rstd); k: 4*C constants of scratch."""
    cdef Py_ssize_t c, r
    for c in range(C):
        fwd_consts(&k[4 * c], &k[4 * c + 1], &k[4 * c + 2], &k[4 * c + 3], mp[c], rp[c], w, b, c)
    for r in prange(N * C, schedule='static', num_threads=nt):
        c = r % C
        row_affine(yp + r * S, xp + r * S, S, k[4 * c], k[4 * c + 1], k[4 * c + 2],
                   k[4 * c + 3], stream)


# ---- rows view, backward
# xhat = (x - mean) * rstd,  g = dy * weight (dy without weight)
# training: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (means over n, s per channel)
#              = ((dy - c2) - (x - mean) * k1) * k2   (bwd_consts)
# eval:     dx = dy * k2
# sdy[c] = sum dy,  sdyx[c] = sum dy * (x - mean)
cdef void _rows_channel_sums(double *sdy, double *sdyx, const floating *dy, const floating *x,
                             double mean, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                             Py_ssize_t c) noexcept nogil:
    """Backward sums of channel c (x may be NULL: sdyx = 0), runs added in n order."""
    cdef double s1 = 0, s2 = 0, a1, a2
    cdef floating mh, ml
    cdef Py_ssize_t n, nx
    mean_split(mean, &mh, &ml)
    for n in range(N):
        nx = (n + 1 if n + 1 < N else n) * C + c
        row_bwd_sums(&a1, &a2, dy + (n * C + c) * S,
                     x + (n * C + c) * S if x != NULL else NULL, S, mh, ml,
                     dy + nx * S, x + nx * S if x != NULL else dy + nx * S)
        s1 = s1 + a1
        s2 = s2 + a2
    sdy[0] = s1
    sdyx[0] = s2


cdef void _rows_channel_bwd(floating *dx, double *sdy, double *sdyx, const floating *dy,
                            const floating *xs, const floating *x, const floating *w,
                            const double *mean, const double *rstd, double count, Py_ssize_t N,
                            Py_ssize_t C, Py_ssize_t S, Py_ssize_t c, bint training, bint sums,
                            bint need_dx, int stream) noexcept nogil:
    """Backward of one whole channel: its sums (else sdy[c], sdyx[c] as given), then dx while
    dy and x are in L2."""
    cdef floating mh, ml, k1, c2, k2
    cdef Py_ssize_t n
    if sums:
        _rows_channel_sums(&sdy[c], &sdyx[c], dy, xs, mean[c], N, C, S, c)
    if not need_dx:
        return
    bwd_consts(&mh, &ml, &k1, &c2, &k2, mean[c], rstd[c], sdy[c], sdyx[c], count, training, w,
               c)
    for n in range(N - 1, -1, -1):
        row_dx(dx + (n * C + c) * S, dy + (n * C + c) * S,
               x + (n * C + c) * S if training else NULL, S, mh, ml, k1, c2, k2, stream)


cdef void _rows_sums(double *s1p, double *s2p, const floating *dyp, const floating *xs,
                     const double *mp, double *part, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                     int nt) noexcept nogil:
    """Per-channel sdy, sdyx (xs may be NULL); part: 2*N*C doubles unless own_channels."""
    cdef Py_ssize_t c, n, r, nx
    cdef double s1, s2
    cdef floating mh, ml
    if own_channels(C, nt):
        for c in prange(C, schedule='static', num_threads=nt):
            _rows_channel_sums(&s1p[c], &s2p[c], dyp, xs, mp[c], N, C, S, c)
        return
    for r in prange(N * C, schedule='static', num_threads=nt):
        nx = r + 1 if r + 1 < N * C else r
        mean_split(mp[r % C], &mh, &ml)
        row_bwd_sums(&part[2 * r], &part[2 * r + 1], dyp + r * S,
                     xs + r * S if xs != NULL else NULL, S, mh, ml, dyp + nx * S,
                     xs + nx * S if xs != NULL else dyp + nx * S)
    for c in range(C):
        s1 = 0
        s2 = 0
        for n in range(N):
            s1 = s1 + part[2 * (n * C + c)]
            s2 = s2 + part[2 * (n * C + c) + 1]
        s1p[c] = s1
        s2p[c] = s2


cdef void _rows_dx(floating *dxp, const floating *dyp, const floating *xp, const floating *w,
                   const double *mp, const double *rp, const double *s1p, const double *s2p,
                   double count, bint training, floating *k, Py_ssize_t N, Py_ssize_t C,
                   Py_ssize_t S, int nt, int stream) noexcept nogil:
    """dx from (mean, rstd, sdy, sdyx, count); k: 5*C constants of scratch."""
    cdef Py_ssize_t c, r
    for c in range(C):
        bwd_consts(&k[5 * c], &k[5 * c + 1], &k[5 * c + 2], &k[5 * c + 3], &k[5 * c + 4],
                   mp[c], rp[c], s1p[c], s2p[c], count, training, w, c)
    for r in prange(N * C, schedule='static', num_threads=nt):
        c = r % C
        row_dx(dxp + r * S, dyp + r * S, xp + r * S if training else NULL, S,
               k[5 * c], k[5 * c + 1], k[5 * c + 2], k[5 * c + 3], k[5 * c + 4], stream)


# ================================================================ columns view
# Rows are cut into blocks of RB = nf_bn_block_rows(K) rows; blocks are grouped into P parts
# (P depends on the shape only).  Statistics: each part merges its blocks' column (mean, M2) in
# block order (Chan); parts are merged in part order per column, then the S columns of each
# channel in column order.  Backward sums: the same structure with plain float64 sums.  The
# elementwise passes run over blocks with one constant vector per column.
# Thread t of nt takes parts [t*P//nt, (t+1)*P//nt): the same rows in every pass.  The bounds
# are assigned directly in each prange body (never through a pointer): Cython makes a prange
# variable thread-private only when the body assigns it.
cdef Py_ssize_t n_parts(Py_ssize_t nb, Py_ssize_t K) noexcept nogil:
    """Row parts of the column reductions: a function of the shape only."""
    cdef Py_ssize_t p = MAX_PARTS
    if p * K > PART_BUDGET:
        p = PART_BUDGET // K
    if p > nb:
        p = nb
    return p if p >= 1 else 1


cdef inline size_t block_bytes(Py_ssize_t M, Py_ssize_t K, Py_ssize_t RB, Py_ssize_t blk,
                               Py_ssize_t end, size_t itemsize) noexcept nogil:
    """Bytes of column block blk (of RB rows of K values; the last one may be short), or 0 if
    blk is past end (the caller's last block)."""
    if blk >= end:
        return 0
    return <size_t>((M - blk * RB if M - blk * RB < RB else RB) * K) * itemsize


cdef struct ColPlan:
    Py_ssize_t M, K, S, C, RB, nb, P
    int nt


cdef ColPlan col_plan(Py_ssize_t M, Py_ssize_t K, Py_ssize_t S, size_t itemsize) noexcept nogil:
    cdef ColPlan pl
    pl.M = M
    pl.K = K
    pl.S = S
    pl.C = K // S
    pl.RB = nf_bn_block_rows(K, itemsize)
    pl.nb = (M + pl.RB - 1) // pl.RB
    pl.P = n_parts(pl.nb, K)
    pl.nt = nf_threads_for(M * K, MIN_ELEMS_PER_THREAD)
    if pl.nt > pl.P:
        pl.nt = <int>pl.P
    return pl


cdef void _cols_part_stats(double *pm, double *pm2, double *tm, double *tm2, double *tmp,
                           const floating *x, Py_ssize_t M, Py_ssize_t K, Py_ssize_t RB,
                           Py_ssize_t b0, Py_ssize_t b1) noexcept nogil:
    """Column (mean, M2) of blocks [b0, b1) merged in block order into pm, pm2."""
    cdef Py_ssize_t blk, r0, rows
    cdef double na = 0
    for blk in range(b0, b1):
        r0 = blk * RB
        rows = M - r0 if M - r0 < RB else RB
        col_stats(tm, tm2, tmp, x + r0 * K, rows, K, x + (r0 + rows) * K,
                  block_bytes(M, K, RB, blk + 1, b1, sizeof(floating)))
        nf_bn_cols_chan(pm, pm2, na, tm, tm2, <double>rows, K)
        na = na + rows


cdef void _cols_stats(double *mp, double *m2p, const floating *xp, double *scratch,
                      ColPlan pl) noexcept nogil:
    """Per-channel (mean, M2); scratch: (8*P + 2)*K doubles (per part: mean, M2, a block's
    mean and M2 and its 4*K-value temp; then the merged columns)."""
    cdef Py_ssize_t M = pl.M, K = pl.K, S = pl.S, nb = pl.nb, P = pl.P, RB = pl.RB
    cdef Py_ssize_t t, p, p0, p1, c, s, r0, rows
    cdef double *colm = scratch + 8 * P * K
    cdef double *colm2 = colm + K
    cdef double cn, cm, cm2, na
    for t in prange(pl.nt, schedule='static', num_threads=pl.nt):
        p0 = t * P // pl.nt
        p1 = (t + 1) * P // pl.nt
        for p in range(p0, p1):
            _cols_part_stats(scratch + 8 * p * K, scratch + (8 * p + 1) * K,
                             scratch + (8 * p + 2) * K, scratch + (8 * p + 3) * K,
                             scratch + (8 * p + 4) * K, xp, M, K, RB, p * nb // P,
                             (p + 1) * nb // P)
    na = 0
    for p in range(P):
        r0 = (p * nb // P) * RB
        rows = ((p + 1) * nb // P) * RB
        if rows > M:
            rows = M
        rows = rows - r0
        nf_bn_cols_chan(colm, colm2, na, scratch + 8 * p * K, scratch + (8 * p + 1) * K,
                        <double>rows, K)
        na = na + rows
    for c in range(pl.C):
        cn = 0
        cm = 0
        cm2 = 0
        for s in range(S):
            nf_chan(&cn, &cm, &cm2, <double>M, colm[c * S + s], colm2[c * S + s])
        mp[c] = cm
        m2p[c] = cm2


cdef void _cols_apply(floating *yp, const floating *xp, const double *mp, const double *rp,
                      const floating *w, const floating *b, floating *k,
                      ColPlan pl) noexcept nogil:
    """y from (mean, rstd); k: 3*K constants of scratch."""
    cdef Py_ssize_t M = pl.M, K = pl.K, S = pl.S, nb = pl.nb, P = pl.P, RB = pl.RB
    cdef Py_ssize_t t, p0, p1, c, s, j, r0, rows
    cdef floating mh, ml, a, bb
    for c in range(pl.C):
        fwd_consts(&mh, &ml, &a, &bb, mp[c], rp[c], w, b, c)
        # fold mean_lo into b; not with an infinite scale (an Inf weight), where the fold
        # would turn (x - mean) * inf + b into inf - inf = NaN instead of the reference's +-inf
        if not isinf(<double>a):
            bb = <floating>(<double>bb - <double>ml * <double>a)
        for s in range(S):
            j = c * S + s
            k[j] = mh
            k[K + j] = a
            k[2 * K + j] = bb
    # one forward sweep per thread over its own rows (the hardware prefetcher follows it)
    for t in prange(pl.nt, schedule='static', num_threads=pl.nt):
        p0 = t * P // pl.nt
        p1 = (t + 1) * P // pl.nt
        r0 = (p0 * nb // P) * RB
        rows = ((p1 * nb // P) * RB if (p1 * nb // P) * RB < M else M) - r0
        col_affine(yp + r0 * K, xp + r0 * K, rows, K, k)


cdef void _cols_part_sums(double *s1, double *s2, double *tmp, const floating *dy,
                          const floating *x, Py_ssize_t M, Py_ssize_t K, Py_ssize_t RB,
                          Py_ssize_t b0, Py_ssize_t b1, const floating *k) noexcept nogil:
    cdef Py_ssize_t j, blk, r0, rows
    for j in range(K):
        s1[j] = 0
        s2[j] = 0
    for blk in range(b0, b1):
        r0 = blk * RB
        rows = M - r0 if M - r0 < RB else RB
        col_bwd_sums(s1, s2, tmp, dy + r0 * K, x + r0 * K if x != NULL else NULL, rows, K, k)


cdef void _cols_sums(double *s1p, double *s2p, const floating *dyp, const floating *xs,
                     const double *mp, double *scratch, floating *k, ColPlan pl) noexcept nogil:
    """Per-channel sdy, sdyx (xs may be NULL); scratch: 4*P*K doubles (per part: two sums and
    a 2*K-value temp); k: the first 2*K constants (mh, ml per column) are written here."""
    cdef Py_ssize_t M = pl.M, K = pl.K, S = pl.S, nb = pl.nb, P = pl.P, RB = pl.RB
    cdef Py_ssize_t t, p, p0, p1, c, s
    cdef double s1, s2
    cdef floating mh, ml
    for c in range(pl.C):
        mean_split(mp[c], &mh, &ml)
        for s in range(S):
            k[c * S + s] = mh
            k[K + c * S + s] = ml
    for t in prange(pl.nt, schedule='static', num_threads=pl.nt):
        p0 = t * P // pl.nt
        p1 = (t + 1) * P // pl.nt
        for p in range(p0, p1):
            _cols_part_sums(scratch + 4 * p * K, scratch + (4 * p + 1) * K,
                            scratch + (4 * p + 2) * K, dyp, xs, M, K, RB,
                            p * nb // P, (p + 1) * nb // P, k)
    for c in range(pl.C):
        s1 = 0
        s2 = 0
        for s in range(S):
            for p in range(P):
                s1 = s1 + scratch[4 * p * K + c * S + s]
                s2 = s2 + scratch[(4 * p + 1) * K + c * S + s]
        s1p[c] = s1
        s2p[c] = s2


cdef void _cols_dx(floating *dxp, const floating *dyp, const floating *xp, const floating *w,
                   const double *mp, const double *rp, const double *s1p, const double *s2p,
                   double count, bint training, floating *k, ColPlan pl) noexcept nogil:
    """dx from (mean, rstd, sdy, sdyx, count); k: 5*K constants of scratch."""
    cdef Py_ssize_t M = pl.M, K = pl.K, S = pl.S, nb = pl.nb, P = pl.P, RB = pl.RB
    cdef Py_ssize_t t, p0, p1, c, s, j, r0, rows
    cdef floating mh, ml, k1, c2, k2
    for c in range(pl.C):
        bwd_consts(&mh, &ml, &k1, &c2, &k2, mp[c], rp[c], s1p[c], s2p[c], count, training, w, c)
        for s in range(S):
            j = c * S + s
            k[j] = mh
            k[K + j] = ml
            k[2 * K + j] = k1
            k[3 * K + j] = c2
            k[4 * K + j] = k2
    # one forward sweep per thread over the rows of its sums (as in the forward pass)
    for t in prange(pl.nt, schedule='static', num_threads=pl.nt):
        p0 = t * P // pl.nt
        p1 = (t + 1) * P // pl.nt
        r0 = (p0 * nb // P) * RB
        rows = ((p1 * nb // P) * RB if (p1 * nb // P) * RB < M else M) - r0
        col_dx(dxp + r0 * K, dyp + r0 * K, xp + r0 * K if training else NULL, rows, K, k)


# ================================================================ typed drivers
# One driver per entry point; `x` selects the view (3-D rows, 2-D columns).  Pointers of absent
# arrays are NULL.  Each releases the GIL once.
cdef inline const floating *ptr(const floating[::1] a) noexcept:
    return &a[0] if a is not None else NULL


cdef int _forward(floating[::1] y, double[::1] mean, double[::1] var, double[::1] rstd,
                  const floating[::1] x, const floating[::1] weight, const floating[::1] bias,
                  double eps, bint training, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                  bint rows_view, int stream, floating[::1] consts,
                  double[::1] parts) except -1:
    """Training: mean, var, rstd, y <- x.  Eval: rstd <- var; y <- x with (mean, rstd).
    Rows view: x is (N, C, S); columns view: x is (N, C*S) (N = M rows, S columns/channel)."""
    cdef floating *yp = &y[0]
    cdef const floating *xp = &x[0]
    cdef const floating *w = ptr[floating](weight)
    cdef const floating *b = ptr[floating](bias)
    cdef double *mp = &mean[0]
    cdef double *vp = &var[0]
    cdef double *rp = &rstd[0]
    cdef floating *k = &consts[0]
    cdef double *part = &parts[0]
    cdef Py_ssize_t c
    cdef int nt
    cdef ColPlan pl
    with nogil:
        if rows_view:
            nt = nf_threads_for(N * C * S, MIN_ELEMS_PER_THREAD)
            if training and own_channels(C, nt):
                for c in prange(C, schedule='static', num_threads=nt):
                    _rows_channel_train(yp, mp, vp, rp, xp, w, b, eps, N, C, S, c, stream)
            else:
                if training:
                    _rows_stats(mp, vp, xp, part, N, C, S, nt)
                    for c in range(C):
                        vp[c] = vp[c] / <double>(N * S)
                for c in range(C):
                    rp[c] = rstd_of(vp[c], eps)
                _rows_apply(yp, xp, mp, rp, w, b, k, N, C, S, nt, stream)
            if stream:
                nf_stream_fence()
        else:
            pl = col_plan(N, C * S, S, sizeof(floating))
            if training:
                _cols_stats(mp, vp, xp, part, pl)
                for c in range(C):
                    vp[c] = vp[c] / <double>(N * S)
            for c in range(C):
                rp[c] = rstd_of(vp[c], eps)
            _cols_apply(yp, xp, mp, rp, w, b, k, pl)
    return 0


cdef int _stats(double[::1] mean, double[::1] m2, const floating[::1] x, Py_ssize_t N,
                Py_ssize_t C, Py_ssize_t S, bint rows_view, double[::1] parts) except -1:
    cdef const floating *xp = &x[0]
    with nogil:
        if rows_view:
            _rows_stats(&mean[0], &m2[0], xp, &parts[0], N, C, S,
                        nf_threads_for(N * C * S, MIN_ELEMS_PER_THREAD))
        else:
            _cols_stats(&mean[0], &m2[0], xp, &parts[0], col_plan(N, C * S, S, sizeof(floating)))
    return 0


cdef int _apply(floating[::1] y, const floating[::1] x, const double[::1] mean,
                const double[::1] rstd, const floating[::1] weight, const floating[::1] bias,
                Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint rows_view, int stream,
                floating[::1] consts) except -1:
    cdef floating *yp = &y[0]
    cdef const floating *xp = &x[0]
    cdef const floating *w = ptr[floating](weight)
    cdef const floating *b = ptr[floating](bias)
    with nogil:
        if rows_view:
            _rows_apply(yp, xp, &mean[0], &rstd[0], w, b, &consts[0], N, C, S,
                        nf_threads_for(N * C * S, MIN_ELEMS_PER_THREAD), stream)
            if stream:
                nf_stream_fence()
        else:
            _cols_apply(yp, xp, &mean[0], &rstd[0], w, b, &consts[0],
                        col_plan(N, C * S, S, sizeof(floating)))
    return 0


cdef int _backward(floating[::1] dx, floating[::1] dweight, floating[::1] dbias,
                   double[::1] sdy, double[::1] sdyx, const floating[::1] dy,
                   const floating[::1] x, const floating[::1] weight, const double[::1] mean,
                   const double[::1] rstd, double count, bint training, bint sums, bint need_x,
                   bint need_dx, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint rows_view,
                   int stream, floating[::1] consts, double[::1] parts) except -1:
    """sdy, sdyx (when `sums`; with x when `need_x`), then dx (when need_dx), dweight, dbias
    (where given).  `count` is the number of values per channel of the whole batch (N*S for
    the one-call backward; the phases pass the total over every chunk)."""
    cdef floating *dxp = &dx[0] if need_dx else NULL
    cdef floating *dwp = &dweight[0] if dweight is not None else NULL
    cdef floating *dbp = &dbias[0] if dbias is not None else NULL
    cdef const floating *dyp = &dy[0]
    cdef const floating *xp = &x[0]
    cdef const floating *xs = xp if need_x else NULL    # x for the sums
    cdef const floating *w = ptr[floating](weight)
    cdef double *s1p = &sdy[0]
    cdef double *s2p = &sdyx[0]
    cdef const double *mp = &mean[0]
    cdef const double *rp = &rstd[0]
    cdef floating *k = &consts[0]
    cdef double *part = &parts[0]
    cdef Py_ssize_t c
    cdef int nt
    cdef ColPlan pl
    with nogil:
        if rows_view:
            nt = nf_threads_for(N * C * S, MIN_ELEMS_PER_THREAD)
            if own_channels(C, nt):
                for c in prange(C, schedule='static', num_threads=nt):
                    _rows_channel_bwd(dxp, s1p, s2p, dyp, xs, xp, w, mp, rp, count, N, C, S, c,
                                      training, sums, need_dx, stream)
            else:
                if sums:
                    _rows_sums(s1p, s2p, dyp, xs, mp, part, N, C, S, nt)
                if need_dx:
                    _rows_dx(dxp, dyp, xp, w, mp, rp, s1p, s2p, count, training, k, N, C, S,
                             nt, stream)
            if stream and need_dx:
                nf_stream_fence()
        else:
            pl = col_plan(N, C * S, S, sizeof(floating))
            if sums:
                _cols_sums(s1p, s2p, dyp, xs, mp, part, k, pl)
            if need_dx:
                _cols_dx(dxp, dyp, xp, w, mp, rp, s1p, s2p, count, training, k, pl)
        _param_grads(dwp, dbp, s1p, s2p, rp, C)
    return 0


# ================================================================ Python entry points
# Arrays arrive as the kernel views (3-D (N, C, S) rows, 2-D (M, C*S) columns), validated and
# allocated by normffn.batch_norm; `S` is the spatial size per channel of the columns view.
def _shape(x, Py_ssize_t S):
    """(N, C, S, rows_view) of a kernel view."""
    if x.ndim == 3:
        return x.shape[0], x.shape[1], x.shape[2], True
    return x.shape[0], x.shape[1] // S, S, False


def scratch_sizes(x, Py_ssize_t S):
    """(consts, parts): the scratch a call on the kernel view x needs — constants in x's dtype,
    float64 partials — for any entry point."""
    N, C, S, rows_view = _shape(x, S)
    if rows_view:
        return 5 * C, 2 * N * C
    cdef ColPlan pl = col_plan(N, C * S, S, x.dtype.itemsize)
    return 5 * C * S, (8 * pl.P + 2) * C * S


def _flat(a):
    return None if a is None else a.reshape(-1)


def forward(y, mean, var, rstd, x, weight, bias, double eps, bint training, Py_ssize_t S,
            int stream, consts, parts):
    """One-call forward.  Training: mean, var (biased), rstd, y <- x.  Eval: rstd <- var, then
    y <- x with (mean, rstd)."""
    N, C, S, rows_view = _shape(x, S)
    if x.dtype.itemsize == 4:
        _forward[float](_flat(y), mean, var, rstd, _flat(x), weight, bias, eps, training, N, C,
                        S, rows_view, stream, consts, parts)
    else:
        _forward[double](_flat(y), mean, var, rstd, _flat(x), weight, bias, eps, training, N, C,
                         S, rows_view, stream, consts, parts)


def stats(mean, m2, x, Py_ssize_t S, parts):
    """Phase 1: per-channel mean and M2 of x (the one-call training forward's numbers)."""
    N, C, S, rows_view = _shape(x, S)
    if x.dtype.itemsize == 4:
        _stats[float](mean, m2, _flat(x), N, C, S, rows_view, parts)
    else:
        _stats[double](mean, m2, _flat(x), N, C, S, rows_view, parts)


def apply(y, x, mean, rstd, weight, bias, Py_ssize_t S, int stream, consts):
    """Phase 3: y <- x with given float64 (mean, rstd)."""
    N, C, S, rows_view = _shape(x, S)
    if x.dtype.itemsize == 4:
        _apply[float](_flat(y), _flat(x), mean, rstd, weight, bias, N, C, S, rows_view, stream,
                      consts)
    else:
        _apply[double](_flat(y), _flat(x), mean, rstd, weight, bias, N, C, S, rows_view, stream,
                       consts)


def backward(dx, dweight, dbias, sdy, sdyx, dy, x, weight, mean, rstd, double count,
             bint training, bint sums, bint need_x, Py_ssize_t S, int stream, consts, parts):
    """sdy, sdyx (if `sums`; sdyx needs `need_x`; without `sums` they are read as given, so
    the caller zero-fills them), then dx (if dx is not None), dweight and dbias (where not
    None).  The one-call backward passes count = N*S; backward_apply passes
    sums=False with the merged sums of every chunk; backward_sums passes dx = None."""
    N, C, S, rows_view = _shape(x, S)
    need_dx = dx is not None
    if x.dtype.itemsize == 4:
        _backward[float](_flat(dx), dweight, dbias, sdy, sdyx, _flat(dy), _flat(x), weight, mean,
                         rstd, count, training, sums, need_x, need_dx, N, C, S, rows_view,
                         stream, consts, parts)
    else:
        _backward[double](_flat(dx), dweight, dbias, sdy, sdyx, _flat(dy), _flat(x), weight,
                          mean, rstd, count, training, sums, need_x, need_dx, N, C, S,
                          rows_view, stream, consts, parts)


def rstd_from_var(out, var, double eps):
    """out <- 1 / sqrt(var + eps) (float64 (C,) arrays): the kernels' own formula."""
    cdef double[::1] o = out
    cdef const double[::1] v = var
    cdef Py_ssize_t c
    for c in range(o.shape[0]):
        o[c] = rstd_of(v[c], eps)


def chan_merge(double[::1] n, double[::1] mean, double[::1] m2, const double[::1] nb,
               const double[::1] mb, const double[::1] m2b):
    """(n, mean, m2) <- Chan merge with (nb, mb, m2b), per channel, in place (parts with
    nb == 0 are skipped)."""
    cdef Py_ssize_t c
    for c in range(n.shape[0]):
        if nb[c] != 0:
            nf_chan(&n[c], &mean[c], &m2[c], nb[c], mb[c], m2b[c])
