# Fused FFN kernels: y = act(x @ w1 + b1) @ w2 + b2, forward and backward, over blocks of rows.
#
# Contract (normffn/ffn.py and _checks.py guarantee it; nothing here re-checks):
#   * x, y, dy, dx are C-contiguous (n, d); the saved hidden is C-contiguous (n, h); scratch
#     blocks are C-contiguous (>= blk, h); n >= 1, 1 <= d, h < 2**31, one float dtype throughout,
#     no output overlaps an input.
#   * w1 (d, h) and w2 (h, d) have contiguous rows or contiguous columns (PyTorch's weight.T):
#     BLAS reads either directly, told which by a flag read from the strides (_blas.blas_layout).
#   * b1 (h,), b2 (d,) are contiguous or None; dw1/dw2 are C-contiguous like w1/w2's shapes.
#   * The GIL is released once per call.
#
# Blocking: rows go through in blocks of `blk` (chosen by the Python layer so a block of the
# hidden activation, blk x h, sits in the last-level cache; a relu forward that keeps its hidden
# needs no scratch and runs as one block of whole-matrix GEMMs).  Each block runs its GEMMs, and the
# elementwise work (bias + activation forward; activation derivative or ReLU mask, db1, db2
# backward) touches the block between two GEMMs, while it is still in cache.
#
# Threads: BLAS threads itself and is never called inside an OpenMP parallel region (OpenMP
# threads x BLAS threads never exceed the cores); the elementwise work runs between GEMMs under
# prange over fixed column tiles, on ew_threads threads (the Python layer passes 1: OpenBLAS's
# idle workers spin-yield after each GEMM and libgomp's spin after each region, so on 2 cores a
# 2-thread elementwise pass fights the BLAS threads and costs more than it saves).  A variant
# that split every GEMM by columns over an OpenMP team with one BLAS thread each was measured
# and dropped: alone it matched this one, beside other threaded libraries (OpenBLAS pools,
# torch's OpenMP) it lost badly.
# Determinism: every column is owned by one thread (a fixed tile), which walks the block's rows in order: db1/db2 (float64) and dead-unit flags are sums
# in row order, identical for any thread count.  dw1/dw2 are accumulated by BLAS block after
# block in block order (beta = 1); each element comes from GEMMs over the same k in the same
# order, so results depend on the thread count at most as
# far as the BLAS itself does (bitwise equal with scipy's OpenBLAS in the tests).
from cython cimport floating
from cython.parallel cimport parallel, prange

from _blas cimport blas_layout, flip, gemm
from _common cimport n_threads_for

import numpy as np

cdef extern from "activations.h" nogil:
    int NF_ACT_RELU
    void nf_ffn_act_fwd_f32(float *z, Py_ssize_t ldz, float *a, Py_ssize_t lda, const float *b1,
                            unsigned char *alive, Py_ssize_t m, Py_ssize_t w, int act)
    void nf_ffn_act_fwd_f64(double *z, Py_ssize_t ldz, double *a, Py_ssize_t lda,
                            const double *b1, unsigned char *alive, Py_ssize_t m, Py_ssize_t w,
                            int act)
    void nf_ffn_act_bwd_f32(float *g, Py_ssize_t ldg, float *h, Py_ssize_t ldh, const float *b1,
                            float *a_out, Py_ssize_t lda, double *db1_acc, Py_ssize_t m,
                            Py_ssize_t w, int act)
    void nf_ffn_act_bwd_f64(double *g, Py_ssize_t ldg, double *h, Py_ssize_t ldh,
                            const double *b1, double *a_out, Py_ssize_t lda, double *db1_acc,
                            Py_ssize_t m, Py_ssize_t w, int act)
    void nf_fill_rows_f32(float *y, Py_ssize_t ldy, const float *b, Py_ssize_t m, Py_ssize_t w)
    void nf_fill_rows_f64(double *y, Py_ssize_t ldy, const double *b, Py_ssize_t m,
                          Py_ssize_t w)
    void nf_colsum_f32(double *acc, const float *x, Py_ssize_t ldx, Py_ssize_t m, Py_ssize_t w)
    void nf_colsum_f64(double *acc, const double *x, Py_ssize_t ldx, Py_ssize_t m,
                       Py_ssize_t w)

# Columns per elementwise tile when several threads share the pass: each column belongs to one
# tile, and every tile walks its rows in order, so results never depend on the thread count.  On
# one thread the tile is the whole row (same per-column order, so the same results): one forward
# stream instead of 1 KB runs 8 KB apart.  Measured A/B at 8192x512x2048: forward unchanged,
# forward+backward 4% faster in one run (within this machine's noise, so: no slower).
cdef Py_ssize_t TILE = 256
# Below this many elements per thread the fork/join costs more than it saves.
cdef Py_ssize_t MIN_ELEMS_PER_THREAD = 32768


cdef inline Py_ssize_t tile_for(int nt, Py_ssize_t h, Py_ssize_t d) noexcept nogil:
    return TILE if nt > 1 else (h if h > d else d)


# ---------------------------------------------------------------- forward
# Per block of m rows (xb = x[r0:r0+m], shapes in rows x cols):
#   z  (m, h) = xb (m, d) @ w1 (d, h)                 GEMM 1, into the saved hidden or scratch
#   v  = z + b1,  a = act(v)                           elementwise, block in cache
#        saved hidden: relu keeps a (its mask is a > 0); other activations keep v (act' needs it)
#        and write a to scratch.  alive[j] |= a[:, j] != 0 (relu, ctx.dead_units = ~alive).
#   yb (m, d) = b2 (broadcast, written in the same parallel pass) + a (m, h) @ w2 (h, d)  GEMM 2
cdef int _forward(floating[:, ::1] y,                     # OUT (n, d)
                  floating[:, ::1] hidden,                # OUT (n, h) or None (not kept)
                  unsigned char[::1] alive,               # OUT (h,) zero-filled, or None
                  floating[:, ::1] scratch,               # (>= blk, h); None iff relu and hidden
                  const floating[:, ::1] x,               # IN  (n, d)
                  const floating[:, :] w1, const floating[::1] b1,    # IN (d, h), (h,) or None
                  const floating[:, :] w2, const floating[::1] b2,    # IN (h, d), (d,) or None
                  int act, Py_ssize_t blk, int ew_threads) except -1:
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1], h = w1.shape[1]
    cdef int ld1, ld2
    cdef char t1 = blas_layout(w1, &ld1), t2 = blas_layout(w2, &ld2)
    cdef const floating *w1p = &w1[0, 0]
    cdef const floating *w2p = &w2[0, 0]
    cdef const floating *b1p = NULL
    cdef const floating *b2p = NULL
    cdef const floating *xp = &x[0, 0]
    cdef floating *yp = &y[0, 0]
    cdef floating *hp = NULL
    cdef floating *sp = NULL
    cdef unsigned char *alp = NULL
    cdef floating *zp
    cdef floating *ap
    cdef floating *a_sep
    cdef floating beta2 = 0
    cdef Py_ssize_t r0, m, t, c0, w, tile, nth, ntd
    cdef int nt
    if b1 is not None:
        b1p = &b1[0]
    if b2 is not None:
        b2p = &b2[0]
        beta2 = 1
    if hidden is not None:
        hp = &hidden[0, 0]
    if scratch is not None:
        sp = &scratch[0, 0]
    if alive is not None:
        alp = &alive[0]
    with nogil:
        r0 = 0
        while r0 < n:
            m = n - r0 if n - r0 < blk else blk
            zp = hp + r0 * h if hp != NULL else sp
            # a goes to scratch only when the pre-activation is what we keep (not relu)
            a_sep = sp if (hp != NULL and act != NF_ACT_RELU) else NULL
            ap = a_sep if a_sep != NULL else zp
            gemm(c'N', t1, <int> m, <int> h, <int> d, <floating> 1, xp + r0 * d, <int> d,
                 w1p, ld1, <floating> 0, zp, <int> h)
            nt = n_threads_for(m * h, MIN_ELEMS_PER_THREAD)
            if ew_threads > 0 and nt > ew_threads:
                nt = ew_threads
            tile = tile_for(nt, h, d)
            nth = (h + tile - 1) // tile
            ntd = (d + tile - 1) // tile
            for t in prange(nth + ntd, schedule='static', num_threads=nt):
                if t < nth:
                    c0 = t * tile
                    w = h - c0 if h - c0 < tile else tile
                    if floating is float:
                        nf_ffn_act_fwd_f32(zp + c0, h, a_sep + c0 if a_sep != NULL else NULL, h,
                                           b1p + c0 if b1p != NULL else NULL,
                                           alp + c0 if alp != NULL else NULL, m, w, act)
                    else:
                        nf_ffn_act_fwd_f64(zp + c0, h, a_sep + c0 if a_sep != NULL else NULL, h,
                                           b1p + c0 if b1p != NULL else NULL,
                                           alp + c0 if alp != NULL else NULL, m, w, act)
                elif b2p != NULL:
                    c0 = (t - nth) * tile
                    w = d - c0 if d - c0 < tile else tile
                    if floating is float:
                        nf_fill_rows_f32(yp + r0 * d + c0, d, b2p + c0, m, w)
                    else:
                        nf_fill_rows_f64(yp + r0 * d + c0, d, b2p + c0, m, w)
            gemm(c'N', t2, <int> m, <int> d, <int> h, <floating> 1, ap, <int> h,
                 w2p, ld2, beta2, yp + r0 * d, <int> d)
            r0 = r0 + m
    return 0


# ---------------------------------------------------------------- backward
# Per block of m rows (xb, dyb, dxb the block's rows):
#   [recompute] z (m, h) = xb @ w1                      GEMM (forward's GEMM 1 again)
#   g  (m, h) = dyb (m, d) @ w2^T (d, h)                GEMM: dA
#   dH = g * act'(v)   (relu: g where a > 0)            elementwise, block in cache; also
#        a = act(v) where it is not saved, db1 += colsum(dH), db2 += colsum(dyb)
#   dw2 (h, d) += a^T (h, m) @ dyb (m, d)               GEMM (beta = 0 on the first block)
#   dxb (m, d)  = dH (m, h) @ w1^T (h, d)               GEMM
#   dw1 (d, h) += xb^T (d, m) @ dH (m, h)               GEMM (beta = 0 on the first block)
# With the hidden saved and relu, `hidden` is a and no block of a is rebuilt; dw2 = a^T @ dy is
# then one GEMM over all rows after the loop when `full_dw2` (fewer, larger GEMMs).
cdef int _backward(floating[:, ::1] dx,                                        # OUT (n, d)
                   floating[:, ::1] dw1, floating[:, ::1] dw2,                  # OUT (d,h), (h,d)
                   double[::1] db1_acc, double[::1] db2_acc,                    # OUT zeroed or None
                   floating[:, ::1] gbuf,                                       # scratch (>=blk, h)
                   floating[:, ::1] zbuf,                 # scratch (>=blk, h); None iff relu+saved
                   const floating[:, ::1] dy,                                   # IN (n, d)
                   const floating[:, ::1] hidden,         # IN (n, h): a (relu) or v; None: recomp.
                   const floating[:, ::1] x,                                    # IN (n, d)
                   const floating[:, :] w1, const floating[::1] b1,
                   const floating[:, :] w2,
                   int act, Py_ssize_t blk, bint full_dw2, int ew_threads) except -1:
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1], h = w1.shape[1]
    cdef int ld1, ld2
    cdef char t1 = blas_layout(w1, &ld1), t2 = blas_layout(w2, &ld2)
    cdef const floating *w1p = &w1[0, 0]
    cdef const floating *w2p = &w2[0, 0]
    cdef const floating *b1p = NULL
    cdef const floating *xp = &x[0, 0]
    cdef const floating *dyp = &dy[0, 0]
    cdef const floating *hp = NULL
    cdef floating *dxp = &dx[0, 0]
    cdef floating *dw1p = &dw1[0, 0]
    cdef floating *dw2p = &dw2[0, 0]
    cdef floating *gp = &gbuf[0, 0]
    cdef floating *zb = NULL
    cdef double *db1p = NULL
    cdef double *db2p = NULL
    cdef floating *hb          # the block's v or a, as the elementwise pass reads it
    cdef floating *a_out       # where the pass writes a (NULL: a is hb already)
    cdef const floating *bias  # added to hb by the pass (recompute only)
    cdef const floating *ap    # the block's a, for dw2
    cdef floating beta
    cdef Py_ssize_t r0, m, t, c0, w, tile, nth, ntd
    cdef int nt
    cdef bint recompute = hidden is None
    cdef bint dw2_in_loop = not (full_dw2 and not recompute and act == NF_ACT_RELU)
    if b1 is not None:
        b1p = &b1[0]
    if hidden is not None:
        hp = &hidden[0, 0]
    if zbuf is not None:
        zb = &zbuf[0, 0]
    if db1_acc is not None:
        db1p = &db1_acc[0]
    if db2_acc is not None:
        db2p = &db2_acc[0]
    with nogil:
        r0 = 0
        while r0 < n:
            m = n - r0 if n - r0 < blk else blk
            beta = 0 if r0 == 0 else 1
            if recompute:
                gemm(c'N', t1, <int> m, <int> h, <int> d, <floating> 1, xp + r0 * d, <int> d,
                     w1p, ld1, <floating> 0, zb, <int> h)
                hb = zb
                a_out = zb              # a replaces v in place
                bias = b1p
            else:
                hb = <floating *> hp + r0 * h   # read only: a_out is never hb here
                a_out = NULL if act == NF_ACT_RELU else zb
                bias = NULL
            ap = a_out if a_out != NULL else hb
            gemm(c'N', flip(t2), <int> m, <int> h, <int> d, <floating> 1, dyp + r0 * d, <int> d,
                 w2p, ld2, <floating> 0, gp, <int> h)
            nt = n_threads_for(m * h, MIN_ELEMS_PER_THREAD)
            if ew_threads > 0 and nt > ew_threads:
                nt = ew_threads
            tile = tile_for(nt, h, d)
            nth = (h + tile - 1) // tile
            ntd = (d + tile - 1) // tile
            for t in prange(nth + ntd, schedule='static', num_threads=nt):
                if t < nth:
                    c0 = t * tile
                    w = h - c0 if h - c0 < tile else tile
                    if floating is float:
                        nf_ffn_act_bwd_f32(gp + c0, h, hb + c0, h,
                                           bias + c0 if bias != NULL else NULL,
                                           a_out + c0 if a_out != NULL else NULL, h,
                                           db1p + c0 if db1p != NULL else NULL, m, w, act)
                    else:
                        nf_ffn_act_bwd_f64(gp + c0, h, hb + c0, h,
                                           bias + c0 if bias != NULL else NULL,
                                           a_out + c0 if a_out != NULL else NULL, h,
                                           db1p + c0 if db1p != NULL else NULL, m, w, act)
                elif db2p != NULL:
                    c0 = (t - nth) * tile
                    w = d - c0 if d - c0 < tile else tile
                    if floating is float:
                        nf_colsum_f32(db2p + c0, dyp + r0 * d + c0, d, m, w)
                    else:
                        nf_colsum_f64(db2p + c0, dyp + r0 * d + c0, d, m, w)
            if dw2_in_loop:
                gemm(c'T', c'N', <int> h, <int> d, <int> m, <floating> 1, ap, <int> h,
                     dyp + r0 * d, <int> d, beta, dw2p, <int> d)
            gemm(c'N', flip(t1), <int> m, <int> d, <int> h, <floating> 1, gp, <int> h,
                 w1p, ld1, <floating> 0, dxp + r0 * d, <int> d)
            gemm(c'T', c'N', <int> d, <int> h, <int> m, <floating> 1, xp + r0 * d, <int> d,
                 gp, <int> h, beta, dw1p, <int> h)
            r0 = r0 + m
        if not dw2_in_loop:
            gemm(c'T', c'N', <int> h, <int> d, <int> n, <floating> 1, hp, <int> h,
                 dyp, <int> d, <floating> 0, dw2p, <int> d)
    return 0


# ---------------------------------------------------------------- Python entry points
def forward(y, hidden, alive, scratch, x, w1, b1, w2, b2, int act, Py_ssize_t blk,
            int ew_threads):
    """y (and hidden, alive) <- the FFN forward.  Arguments already validated (module doc)."""
    if x.dtype == np.float32:
        _forward[float](y, hidden, alive, scratch, x, w1, b1, w2, b2, act, blk, ew_threads)
    else:
        _forward[double](y, hidden, alive, scratch, x, w1, b1, w2, b2, act, blk, ew_threads)


def backward(dx, dw1, dw2, db1_acc, db2_acc, gbuf, zbuf, dy, hidden, x, w1, b1, w2, int act,
             Py_ssize_t blk, bint full_dw2, int ew_threads):
    """dx, dw1, dw2, db1_acc, db2_acc <- the FFN backward.  Arguments already validated."""
    if x.dtype == np.float32:
        _backward[float](dx, dw1, dw2, db1_acc, db2_acc, gbuf, zbuf, dy, hidden, x, w1, b1, w2,
                         act, blk, full_dw2, ew_threads)
    else:
        _backward[double](dx, dw1, dw2, db1_acc, db2_acc, gbuf, zbuf, dy, hidden, x, w1, b1,
                          w2, act, blk, full_dw2, ew_threads)
