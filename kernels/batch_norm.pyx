# BatchNorm kernels: normalise each channel of x over the batch (and spatial) axes.
#
# Contract (normffn/batch_norm.py and _checks.py guarantee it; nothing here re-checks):
#   * Two views of the data, chosen by the Python layer from x's strides (no copy):
#       "rows"    x, y, dy, dx C-contiguous (N, C, S): channel c is N contiguous runs of S values
#                 (PyTorch's NCHW with S = H*W).
#       "columns" x, y, dy, dx C-contiguous (M, K): row-major, column k belongs to channel k // S
#                 (channels-last: M = N*H*W rows of K = C channels, S = 1; also (N, C) input, and
#                 (N, C, S) with a small S seen as (N, C*S)).
#   * N, C, S, M, K >= 1; no output overlaps an input; weight/bias contiguous (C,) or None.
#   * Statistics travel in float64: mean/var (C,) float64 are outputs in training (batch mean and
#     biased variance) and inputs in eval (the running stats); backward takes float64 mean/rstd
#     and returns the float64 per-channel sums sum(dy) and sum(dy * (x - mean)).
#   * The GIL is released once per call; all loops run without bounds checks.
#
# Threads and determinism.  Every reduction is cut into blocks fixed by the shape alone — one
# block per (n, c) row (segments of NF_BN_SEG within long rows) in the rows view, blocks of
# nf_bn_block_rows (<= NF_BLOCK) rows grouped into a fixed number of parts in the columns view —
# each block's statistics come from a corrected two-pass sum while the block is in cache, with
# partial sums in the input precision over at most NF_BLOCK values and float64 beyond (rows.h's
# scheme: the hot loops stay float32 SIMD), and blocks are merged (Chan/Welford, or plain
# float64 sums in backward) in index order.  Which thread computes
# a block never changes its value, so 1 and N threads are bitwise identical.
#   rows view: with enough channels each thread owns whole channels (prange over c): it computes
#     the channel's statistics, then normalises the channel's slab while it is still in L2
#     (≈ 400 KB at 32x64x56x56), so x is read from memory once.  With few channels (C < 8 per
#     thread and not a multiple of the thread count) the (n, c) rows are shared out instead,
#     and the per-row partials are merged in the same order.
#   columns view: thread t takes a fixed run of row parts (p0..p1) for the statistics and
#     the same rows, in one forward sweep, for the elementwise pass: x is read twice (the
#     statistics need every row first).
# With `stream` (the Python layer decides: outputs >= stream_bytes(), rows view), outputs are
# written with non-temporal stores (no read-for-ownership; rows.h).
import numpy as np

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport isinf, sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from _common cimport n_threads_for, nf_set_stream_bytes, nf_stream_bytes, nf_stream_fence
from _channels cimport *

# Below this many elements per thread the fork/join costs more than it saves.
cdef Py_ssize_t MIN_ELEMS_PER_THREAD = 32768
# Columns view: the statistics are computed by at most this many row parts (each holds 2*K
# float64 partials), and at most PART_BUDGET float64 partials in all.
cdef Py_ssize_t MAX_PARTS = 16
cdef Py_ssize_t PART_BUDGET = 1 << 20


cdef inline void split(double v, floating *hi, floating *lo) noexcept nogil:
    """v = hi + lo (float32: hi + lo carries ~48 bits; float64: lo = 0)."""
    if floating is float:
        hi[0] = <float>v
        lo[0] = <float>(v - <double>hi[0])
    else:
        hi[0] = v
        lo[0] = 0


cdef inline void fwd_consts(floating *mh, floating *ml, floating *a, floating *b,
                            double mean, double var, double eps,
                            const floating *weight, const floating *bias,
                            Py_ssize_t c) noexcept nogil:
    """y = ((x - mh) - ml) * a + b  with  a = rstd * weight[c],  b = bias[c]."""
    cdef double rstd = 1.0 / sqrt(var + eps)
    split(mean, mh, ml)
    a[0] = <floating>(rstd * weight[c]) if weight != NULL else <floating>rstd
    b[0] = bias[c] if bias != NULL else 0


cdef inline void bwd_consts(floating *mh, floating *ml, floating *k1, floating *c2, floating *k2,
                            double mean, double rstd, double sdy, double sdyx, double count,
                            bint training, const floating *weight, Py_ssize_t c) noexcept nogil:
    """dx = ((dy - c2) - ((x - mh) - ml) * k1) * k2 with c2 = mean(dy),
    k1 = rstd^2 * mean(dy * (x - mean)), k2 = rstd * weight[c]; eval: dx = dy * k2."""
    split(mean, mh, ml)
    k2[0] = <floating>(rstd * weight[c]) if weight != NULL else <floating>rstd
    if training:
        c2[0] = <floating>(sdy / count)
        k1[0] = <floating>(rstd * rstd * (sdyx / count))
    else:
        c2[0] = 0
        k1[0] = 0


cdef inline void row_stats(const floating *x, Py_ssize_t n, double *mean, double *m2,
                           const floating *pf) noexcept nogil:
    """mean and M2 of x[0:n]; prefetches pf[0:n] (the next row to read) meanwhile."""
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
    """Prefetches pf_dy[0:n] and pf_x[0:n] (the next row to read) meanwhile."""
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


cdef inline bint own_channels(Py_ssize_t C, int nt) noexcept nogil:
    """Rows view: does each thread take whole channels?  (Results are the same either way.)"""
    return nt == 1 or C >= 8 * nt or C % nt == 0


# ================================================================ rows view, forward
# mean[c] = sum_{n,s} x[n, c, s] / (N*S)                   (merged per row, rows in n order)
# var[c]  = sum_{n,s} (x[n, c, s] - mean[c])^2 / (N*S)     (biased; Chan merge of row M2s)
# y[n, c, s] = (x[n, c, s] - mean[c]) * rstd[c] * weight[c] + bias[c],  rstd = 1/sqrt(var+eps)
cdef void _rows_channel_train(floating *y, double *mean, double *var, const floating *x,
                              const floating *w, const floating *b, double eps, Py_ssize_t N,
                              Py_ssize_t C, Py_ssize_t S, Py_ssize_t c,
                              int stream) noexcept nogil:
    """Training forward of one whole channel: statistics, then y while the slab is in L2."""
    cdef double cn = 0, cm = 0, cm2 = 0, rm, rm2
    cdef floating mh, ml, a, bb
    cdef Py_ssize_t n
    for n in range(N):
        row_stats(x + (n * C + c) * S, S, &rm, &rm2,
                  x + ((n + 1 if n + 1 < N else n) * C + c) * S)
        nf_chan(&cn, &cm, &cm2, <double>S, rm, rm2)
    mean[c] = cm
    var[c] = cm2 / cn
    fwd_consts(&mh, &ml, &a, &bb, cm, cm2 / cn, eps, w, b, c)
    for n in range(N - 1, -1, -1):       # last rows first: they are the most recently read
        row_affine(y + (n * C + c) * S, x + (n * C + c) * S, S, mh, ml, a, bb, stream)


cdef int _forward_rows(floating[:, :, ::1] y, double[::1] mean, double[::1] var,     # OUT (train)
                       const floating[:, :, ::1] x,                                   # IN
                       const floating[::1] weight, const floating[::1] bias,          # IN or None
                       double eps, bint training, int stream) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef Py_ssize_t c, n, r
    cdef floating *yp = &y[0, 0, 0]
    cdef const floating *xp = &x[0, 0, 0]
    cdef const floating *w = NULL
    cdef const floating *b = NULL
    cdef double *mp = &mean[0]
    cdef double *vp = &var[0]
    cdef double cn, cm, cm2
    cdef double *part = NULL
    cdef floating *k = NULL
    if weight is not None:
        w = &weight[0]
    if bias is not None:
        b = &bias[0]
    cdef int nt = n_threads_for(N * C * S, MIN_ELEMS_PER_THREAD)
    cdef bint own = training and own_channels(C, nt)
    if not own:
        # per-channel constants (mh, ml, a, b) and, in training, the per-row (mean, M2)
        k = <floating *> malloc(4 * C * sizeof(floating))
        if training:
            part = <double *> malloc(2 * N * C * sizeof(double))
        if k == NULL or (training and part == NULL):
            free(k)
            free(part)
            raise MemoryError("batch_norm: cannot allocate scratch")
    with nogil:
        if own:
            for c in prange(C, schedule='static', num_threads=nt):
                _rows_channel_train(yp, mp, vp, xp, w, b, eps, N, C, S, c, stream)
        else:
            if training:
                for r in prange(N * C, schedule='static', num_threads=nt):
                    row_stats(xp + r * S, S, &part[2 * r], &part[2 * r + 1],
                              xp + (r + 1 if r + 1 < N * C else r) * S)
                for c in range(C):
                    cn = 0
                    cm = 0
                    cm2 = 0
                    for n in range(N):
                        nf_chan(&cn, &cm, &cm2, <double>S, part[2 * (n * C + c)],
                                part[2 * (n * C + c) + 1])
                    mp[c] = cm
                    vp[c] = cm2 / cn
            for c in range(C):
                fwd_consts(&k[4 * c], &k[4 * c + 1], &k[4 * c + 2], &k[4 * c + 3], mp[c], vp[c],
                           eps, w, b, c)
            for r in prange(N * C, schedule='static', num_threads=nt):
                c = r % C
                row_affine(yp + r * S, xp + r * S, S, k[4 * c], k[4 * c + 1], k[4 * c + 2],
                           k[4 * c + 3], stream)
        if stream:
            nf_stream_fence()
    free(k)
    free(part)
    return 0


# ================================================================ rows view, backward
# xhat = (x - mean) * rstd,  g = dy * weight (dy without weight)
# training: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (means over n, s per channel)
#              = ((dy - c2) - (x - mean) * k1) * k2,  c2 = mean(dy),
#                k1 = rstd^2 * mean(dy * (x - mean)),  k2 = rstd * weight
# eval:     dx = dy * k2
# sdy[c] = sum dy,  sdyx[c] = sum dy * (x - mean)   (dbias = sdy, dweight = rstd * sdyx)
cdef void _rows_channel_bwd(floating *dx, double *sdy, double *sdyx, const floating *dy,
                            const floating *x, const floating *w, const double *mean,
                            const double *rstd, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                            Py_ssize_t c, bint training, bint sums,
                            int stream) noexcept nogil:
    """Backward of one whole channel: its sums, then dx while dy and x are in L2."""
    cdef double s1 = 0, s2 = 0, a1, a2
    cdef floating mh, ml, k1, c2, k2
    cdef Py_ssize_t n, nx
    split(mean[c], &mh, &ml)
    if sums:
        for n in range(N):
            nx = (n + 1 if n + 1 < N else n) * C + c
            row_bwd_sums(&a1, &a2, dy + (n * C + c) * S,
                         x + (n * C + c) * S if x != NULL else NULL, S, mh, ml,
                         dy + nx * S, x + nx * S if x != NULL else dy + nx * S)
            s1 = s1 + a1
            s2 = s2 + a2
    sdy[c] = s1
    sdyx[c] = s2
    bwd_consts(&mh, &ml, &k1, &c2, &k2, mean[c], rstd[c], s1, s2, <double>(N * S), training,
               w, c)
    for n in range(N - 1, -1, -1):
        row_dx(dx + (n * C + c) * S, dy + (n * C + c) * S,
               x + (n * C + c) * S if training else NULL, S, mh, ml, k1, c2, k2, stream)


cdef void _rows_row_bwd_sums(double *part, const floating *dy, const floating *x,
                             const double *mean, Py_ssize_t r, Py_ssize_t R, Py_ssize_t C,
                             Py_ssize_t S) noexcept nogil:
    """Backward sums of row r = (n, c) into part[2r], part[2r + 1]."""
    cdef floating mh, ml
    cdef Py_ssize_t nx = r + 1 if r + 1 < R else r
    split(mean[r % C], &mh, &ml)
    row_bwd_sums(&part[2 * r], &part[2 * r + 1], dy + r * S, x + r * S if x != NULL else NULL,
                 S, mh, ml, dy + nx * S, x + nx * S if x != NULL else dy + nx * S)


cdef int _backward_rows(floating[:, :, ::1] dx, double[::1] sdy, double[::1] sdyx,   # OUT
                        const floating[:, :, ::1] dy, const floating[:, :, ::1] x,     # IN
                        const floating[::1] weight,                                    # IN or None
                        const double[::1] mean, const double[::1] rstd,                # IN
                        bint training, bint need_x, bint sums, int stream) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef Py_ssize_t c, n, r
    cdef floating *dxp = &dx[0, 0, 0]
    cdef const floating *dyp = &dy[0, 0, 0]
    cdef const floating *xp = &x[0, 0, 0]
    cdef const floating *xs = xp if need_x else NULL    # x for the sums
    cdef const floating *w = NULL
    cdef double *s1p = &sdy[0]
    cdef double *s2p = &sdyx[0]
    cdef const double *mp = &mean[0]
    cdef const double *rp = &rstd[0]
    cdef double s1, s2
    cdef double *part = NULL
    cdef floating *k = NULL
    if weight is not None:
        w = &weight[0]
    cdef int nt = n_threads_for(N * C * S, MIN_ELEMS_PER_THREAD)
    cdef bint own = own_channels(C, nt)
    if not own:
        k = <floating *> malloc(5 * C * sizeof(floating))
        part = <double *> malloc(2 * N * C * sizeof(double))
        if k == NULL or part == NULL:
            free(k)
            free(part)
            raise MemoryError("batch_norm_backward: cannot allocate scratch")
    with nogil:
        if own:
            for c in prange(C, schedule='static', num_threads=nt):
                _rows_channel_bwd(dxp, s1p, s2p, dyp, xs, w, mp, rp, N, C, S, c, training,
                                  sums, stream)
        else:
            if sums:
                for r in prange(N * C, schedule='static', num_threads=nt):
                    _rows_row_bwd_sums(part, dyp, xs, mp, r, N * C, C, S)
            else:
                memset(part, 0, 2 * N * C * sizeof(double))
            for c in range(C):
                s1 = 0
                s2 = 0
                for n in range(N):
                    s1 = s1 + part[2 * (n * C + c)]
                    s2 = s2 + part[2 * (n * C + c) + 1]
                s1p[c] = s1
                s2p[c] = s2
                bwd_consts(&k[5 * c], &k[5 * c + 1], &k[5 * c + 2], &k[5 * c + 3],
                           &k[5 * c + 4], mp[c], rp[c], s1, s2, <double>(N * S), training, w, c)
            for r in prange(N * C, schedule='static', num_threads=nt):
                c = r % C
                row_dx(dxp + r * S, dyp + r * S, xp + r * S if training else NULL, S,
                       k[5 * c], k[5 * c + 1], k[5 * c + 2], k[5 * c + 3], k[5 * c + 4], stream)
        if stream:
            nf_stream_fence()
    free(k)
    free(part)
    return 0


# ================================================================ columns view
# Rows are cut into blocks of RB = nf_bn_block_rows(K) rows; blocks are grouped into P parts
# (P depends on the shape only).  Training forward: each part merges its blocks' column
# (mean, M2) in block order (Chan); parts are merged in part order per column, then the S
# columns of each channel in column order.  Backward: the same structure with plain float64
# sums.  The elementwise pass then runs over blocks with one constant vector per column.
cdef inline void col_stats(double *bm, double *bm2, double *tmp, const floating *x,
                           Py_ssize_t rows, Py_ssize_t K, const floating *pf,
                           size_t pfbytes) noexcept nogil:
    # tmp: 4*K floating values of scratch (2*K doubles hold them for either type);
    # prefetches pf[0:pfbytes] (the next block) meanwhile
    if floating is float:
        nf_bn_cols_stats_f32(bm, bm2, <float *>tmp, x, rows, K, pf, pfbytes)
    else:
        nf_bn_cols_stats_f64(bm, bm2, <double *>tmp, x, rows, K, pf, pfbytes)


cdef inline void col_affine(floating *y, const floating *x, Py_ssize_t rows, Py_ssize_t K,
                            const floating *k, int stream) noexcept nogil:
    # k holds the K-vectors mh, a, b - ml * a back to back
    if floating is float:
        nf_bn_cols_affine_f32(y, x, rows, K, k, k + K, k + 2 * K, stream)
    else:
        nf_bn_cols_affine_f64(y, x, rows, K, k, k + K, k + 2 * K, stream)


cdef inline void col_bwd_sums(double *sdy, double *sdyx, double *tmp, const floating *dy,
                              const floating *x, Py_ssize_t rows, Py_ssize_t K,
                              const floating *k) noexcept nogil:
    # tmp: 2*K floating values of scratch (2*K doubles hold them for either type)
    if floating is float:
        nf_bn_cols_bwd_sums_f32(sdy, sdyx, <float *>tmp, dy, x, rows, K, k, k + K)
    else:
        nf_bn_cols_bwd_sums_f64(sdy, sdyx, <double *>tmp, dy, x, rows, K, k, k + K)


cdef inline void col_dx(floating *dx, const floating *dy, const floating *x, Py_ssize_t rows,
                        Py_ssize_t K, const floating *k, int stream) noexcept nogil:
    # k holds the K-vectors mh, ml, k1, c2, k2 back to back
    if floating is float:
        nf_bn_cols_dx_f32(dx, dy, x, rows, K, k, k + K, k + 2 * K, k + 3 * K, k + 4 * K, stream)
    else:
        nf_bn_cols_dx_f64(dx, dy, x, rows, K, k, k + K, k + 2 * K, k + 3 * K, k + 4 * K, stream)


cdef Py_ssize_t n_parts(Py_ssize_t nb, Py_ssize_t K) noexcept nogil:
    """Row parts of the column reductions: a function of the shape only."""
    cdef Py_ssize_t p = MAX_PARTS
    if p * K > PART_BUDGET:
        p = PART_BUDGET // K
    if p > nb:
        p = nb
    return p if p >= 1 else 1


# Thread t of nt takes parts [p0, p1): the same rows in every pass.  The bounds are assigned
# directly in each prange body (never through a pointer): Cython makes a prange variable
# thread-private only when the body assigns it, and a helper writing through &p0 shared them
# between threads (a data race ASan found).


cdef inline size_t block_bytes(Py_ssize_t M, Py_ssize_t K, Py_ssize_t RB, Py_ssize_t blk,
                               Py_ssize_t end, size_t itemsize) noexcept nogil:
    """Bytes of column block blk (of RB rows of K values; the last one may be short), or 0 if
    blk is past end (the caller's last block)."""
    if blk >= end:
        return 0
    return <size_t>((M - blk * RB if M - blk * RB < RB else RB) * K) * itemsize


cdef void _cols_part_stats(double *pm, double *pm2, double *tm, double *tm2, double *tmp,
                           const floating *x,
                           Py_ssize_t M, Py_ssize_t K, Py_ssize_t RB, Py_ssize_t b0,
                           Py_ssize_t b1) noexcept nogil:
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


cdef int _forward_cols(floating[:, ::1] y, double[::1] mean, double[::1] var,        # OUT (train)
                       const floating[:, ::1] x,                                      # IN
                       const floating[::1] weight, const floating[::1] bias,          # IN or None
                       double eps, bint training, Py_ssize_t S, int stream) except -1:
    cdef Py_ssize_t M = x.shape[0], K = x.shape[1], C = K // S
    cdef Py_ssize_t RB = nf_bn_block_rows(K, sizeof(floating))
    cdef Py_ssize_t nb = (M + RB - 1) // RB
    cdef Py_ssize_t P = n_parts(nb, K)
    cdef Py_ssize_t p, c, s, j, r0, rows
    cdef floating *yp = &y[0, 0]
    cdef const floating *xp = &x[0, 0]
    cdef const floating *w = NULL
    cdef const floating *b = NULL
    cdef double *mp = &mean[0]
    cdef double *vp = &var[0]
    cdef double cn, cm, cm2, na
    cdef double *scratch = NULL
    cdef floating *k = <floating *> malloc(4 * K * sizeof(floating))
    cdef floating mh, ml, a, bb
    if weight is not None:
        w = &weight[0]
    if bias is not None:
        b = &bias[0]
    if training:
        # per part: mean, M2 (K each) and a block temp (2K doubles + 4K floating: 6K);
        # then the merged columns (2K)
        scratch = <double *> malloc((8 * P + 2) * K * sizeof(double))
    if k == NULL or (training and scratch == NULL):
        free(k)
        free(scratch)
        raise MemoryError("batch_norm: cannot allocate scratch")
    cdef double *colm = scratch + 8 * P * K if training else NULL
    cdef double *colm2 = colm + K if training else NULL
    cdef int nt = n_threads_for(M * K, MIN_ELEMS_PER_THREAD)
    if nt > P:
        nt = <int>P
    cdef Py_ssize_t t, p0, p1
    with nogil:
        if training:
            for t in prange(nt, schedule='static', num_threads=nt):
                p0 = t * P // nt
                p1 = (t + 1) * P // nt
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
                nf_bn_cols_chan(colm, colm2, na, scratch + 8 * p * K,
                                scratch + (8 * p + 1) * K, <double>rows, K)
                na = na + rows
            for c in range(C):
                cn = 0
                cm = 0
                cm2 = 0
                for s in range(S):
                    nf_chan(&cn, &cm, &cm2, <double>M, colm[c * S + s], colm2[c * S + s])
                mp[c] = cm
                vp[c] = cm2 / cn
        for c in range(C):
            fwd_consts(&mh, &ml, &a, &bb, mp[c], vp[c], eps, w, b, c)
            # fold mean_lo into b; not with an infinite scale (an Inf weight), where the fold
            # would turn (x - mean) * inf + b into inf - inf = NaN instead of the reference's +-inf
            if not isinf(<double>a):
                bb = <floating>(<double>bb - <double>ml * <double>a)
            for s in range(S):
                j = c * S + s
                k[j] = mh
                k[K + j] = a
                k[2 * K + j] = bb
        # one forward sweep per thread over its own rows (walking blocks backwards to reuse
        # what the statistics left in cache measured no better: the hardware prefetcher follows
        # a forward stream, and y's read-for-ownership misses either way)
        for t in prange(nt, schedule='static', num_threads=nt):
            p0 = t * P // nt
            p1 = (t + 1) * P // nt
            r0 = (p0 * nb // P) * RB
            rows = ((p1 * nb // P) * RB if (p1 * nb // P) * RB < M else M) - r0
            col_affine(yp + r0 * K, xp + r0 * K, rows, K, k, stream)
        if stream:
            nf_stream_fence()
    free(k)
    free(scratch)
    return 0


cdef void _cols_part_bwd_sums(double *s1, double *s2, double *tmp, const floating *dy,
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


cdef int _backward_cols(floating[:, ::1] dx, double[::1] sdy, double[::1] sdyx,      # OUT
                        const floating[:, ::1] dy, const floating[:, ::1] x,          # IN
                        const floating[::1] weight,                                   # IN or None
                        const double[::1] mean, const double[::1] rstd,               # IN
                        bint training, bint need_x, bint sums, Py_ssize_t S,
                        int stream) except -1:
    cdef Py_ssize_t M = x.shape[0], K = x.shape[1], C = K // S
    cdef Py_ssize_t RB = nf_bn_block_rows(K, sizeof(floating))
    cdef Py_ssize_t nb = (M + RB - 1) // RB
    cdef Py_ssize_t P = n_parts(nb, K)
    cdef Py_ssize_t p, c, s, j, r0, rows
    cdef floating *dxp = &dx[0, 0]
    cdef const floating *dyp = &dy[0, 0]
    cdef const floating *xp = &x[0, 0]
    cdef const floating *xs = xp if need_x else NULL
    cdef const floating *w = NULL
    cdef double *s1p = &sdy[0]
    cdef double *s2p = &sdyx[0]
    cdef const double *mp = &mean[0]
    cdef const double *rp = &rstd[0]
    cdef double s1, s2
    cdef floating mh, ml, k1, c2, k2
    # per part: sum(dy), sum(dy * (x - mean)) and a block temp (K doubles each, 2K for the temp)
    cdef double *scratch = <double *> malloc(4 * P * K * sizeof(double))
    cdef floating *k = <floating *> malloc(5 * K * sizeof(floating))
    if weight is not None:
        w = &weight[0]
    if k == NULL or scratch == NULL:
        free(k)
        free(scratch)
        raise MemoryError("batch_norm_backward: cannot allocate scratch")
    cdef int nt = n_threads_for(M * K, MIN_ELEMS_PER_THREAD)
    if nt > P:
        nt = <int>P
    cdef Py_ssize_t t, p0, p1
    with nogil:
        for c in range(C):
            split(mp[c], &mh, &ml)
            for s in range(S):
                k[c * S + s] = mh
                k[K + c * S + s] = ml
        if sums:
            for t in prange(nt, schedule='static', num_threads=nt):
                p0 = t * P // nt
                p1 = (t + 1) * P // nt
                for p in range(p0, p1):
                    _cols_part_bwd_sums(scratch + 4 * p * K, scratch + (4 * p + 1) * K,
                                        scratch + (4 * p + 2) * K, dyp, xs, M, K, RB,
                                        p * nb // P, (p + 1) * nb // P, k)
        else:
            memset(scratch, 0, 4 * P * K * sizeof(double))
        for c in range(C):
            s1 = 0
            s2 = 0
            for s in range(S):
                for p in range(P):
                    s1 = s1 + scratch[4 * p * K + c * S + s]
                    s2 = s2 + scratch[(4 * p + 1) * K + c * S + s]
            s1p[c] = s1
            s2p[c] = s2
            bwd_consts(&mh, &ml, &k1, &c2, &k2, mp[c], rp[c], s1, s2, <double>(M * S),
                       training, w, c)
            for s in range(S):
                j = c * S + s
                k[2 * K + j] = k1
                k[3 * K + j] = c2
                k[4 * K + j] = k2
        # one forward sweep per thread over the rows of its sums (as in the forward pass)
        for t in prange(nt, schedule='static', num_threads=nt):
            p0 = t * P // nt
            p1 = (t + 1) * P // nt
            r0 = (p0 * nb // P) * RB
            rows = ((p1 * nb // P) * RB if (p1 * nb // P) * RB < M else M) - r0
            col_dx(dxp + r0 * K, dyp + r0 * K, xp + r0 * K if training else NULL, rows, K, k,
                   stream)
        if stream:
            nf_stream_fence()
    free(k)
    free(scratch)
    return 0


# ---------------------------------------------------------------- Python entry points
def forward(y, mean, var, x, weight, bias, double eps, bint training, Py_ssize_t S, int stream):
    """y (and, in training, mean/var) <- BatchNorm(x).  x is 3-D (N, C, S): rows view; 2-D
    (M, C*S): columns view.  Arguments already validated (see module doc)."""
    if x.ndim == 3:
        if x.dtype == np.float32:
            _forward_rows[float](y, mean, var, x, weight, bias, eps, training, stream)
        else:
            _forward_rows[double](y, mean, var, x, weight, bias, eps, training, stream)
    else:
        if x.dtype == np.float32:
            _forward_cols[float](y, mean, var, x, weight, bias, eps, training, S, stream)
        else:
            _forward_cols[double](y, mean, var, x, weight, bias, eps, training, S, stream)


def backward(dx, sdy, sdyx, dy, x, weight, mean, rstd, bint training, bint need_x,
             bint sums, Py_ssize_t S, int stream):
    """dx, sum(dy), sum(dy * (x - mean)) <- BatchNorm backward.  Arguments already validated."""
    if x.ndim == 3:
        if x.dtype == np.float32:
            _backward_rows[float](dx, sdy, sdyx, dy, x, weight, mean, rstd, training, need_x,
                                  sums, stream)
        else:
            _backward_rows[double](dx, sdy, sdyx, dy, x, weight, mean, rstd, training, need_x,
                                   sums, stream)
    else:
        if x.dtype == np.float32:
            _backward_cols[float](dx, sdy, sdyx, dy, x, weight, mean, rstd, training, need_x,
                                  sums, S, stream)
        else:
            _backward_cols[double](dx, sdy, sdyx, dy, x, weight, mean, rstd, training, need_x,
                                   sums, S, stream)


def stream_bytes(value=None):
    """Outputs of at least this many bytes may get non-temporal stores (default: a quarter of
    the L3 size, rows.h's nf_stream_bytes).  Pass a value to override it for this module (tests
    use 1 to exercise the streaming path on small arrays); 0 restores the default.  Returns the
    threshold now in force."""
    if value is not None:
        nf_set_stream_bytes(<size_t>value)
    return nf_stream_bytes()
