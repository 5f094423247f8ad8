# Fused FFN kernels: y = act(x @ w1 + b1) @ w2 + b2, forward and backward, over blocks of rows.
#
# Contract (normffn/ffn.py and _checks.py guarantee it; nothing here re-checks):
#   * x, y, dy, dx are C-contiguous (n, d); the saved hidden is C-contiguous (n, hw); n >= 1,
#     1 <= d, hw < 2**31, one float dtype throughout, no output overlaps an input (one
#     exception: backward's dx may be dy itself when dx_acc is set; see _backward).
#   * hw is w1's width: h (the hidden units) for a plain activation, 2h for a gated one, whose
#     pre-activation rows are packed [gate | up] (ffn_elementwise.h).  w2 is (h, d).
#   * w1 (d, hw) and w2 (h, d) have contiguous rows or contiguous columns (PyTorch's weight.T):
#     BLAS reads either directly, told which by a flag read from the strides (_blas.blas_layout).
#   * b1 (hw,), b2 (d,) are contiguous or None; dw1 (d, hw) and dw2 (h, d) have contiguous rows
#     or contiguous columns (the transpose of a C-contiguous array: nn.Linear's weight layout,
#     which autograd then keeps without a copy); each GEMM writes them in their own layout.
#   * Scratch (1-D, from normffn._workspace) holds at least the elements each function states.
#   * The GIL is released once per call.
#
# Blocking: rows go through in blocks of `blk` (chosen by the Python layer so a block of the
# hidden activation, blk x hw, sits in the last-level cache; a relu forward that keeps its hidden
# needs no scratch and runs as one block of whole-matrix GEMMs).  Each block runs its GEMMs, and
# the elementwise work (bias + activation forward; activation derivative or ReLU mask, db1, db2
# backward) touches the block between two GEMMs, while it is still in cache.
#
# BLAS: the caller picks it per call (the `blas` slot: scipy's, or one registered by a front end;
# see _blas.pxd); every GEMM of the call uses that one.
# Threads: BLAS threads itself.  The elementwise passes between two GEMMs run on the calling
# thread with scipy's BLAS (a second OpenMP team between OpenBLAS's threaded GEMMs fights its
# still-spinning pthreads on a 2-core machine and measured slower; docs/tuning.md).  With a
# registered BLAS that runs on this process's OpenMP pool (torch's MKL), the same OpenMP workers
# take turns, and each pass splits the block's columns over them (_cols: each column by one
# thread, rows in order, so sums and outputs are bitwise those of one thread).  OpenMP threads x
# BLAS threads never exceed what BLAS uses alone.
# Determinism: the elementwise pass walks each block's rows in order, so db1/db2 (float64) and
# the dead-unit flags are sums in row order; dw1/dw2 are accumulated by BLAS block after block in
# block order (beta = 1); each element comes from GEMMs over the same k in the same order, so
# results depend on the thread count at most as far as the BLAS itself does (bitwise equal with
# scipy's OpenBLAS in the tests).
from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memset

from _blas cimport Blas, blas_layout, dgemm_t, dgemv_t, flip, gemm, scipy_blas, sgemm_t, sgemv_t
from core cimport nf_threads_for
from ffn_elementwise cimport (NF_ACT_GEGLU, NF_ACT_GELU, NF_ACT_GELU_TANH, NF_ACT_REGLU,
                              NF_ACT_RELU, NF_ACT_SILU, NF_ACT_SWIGLU,
                              nf_add_rows_f32, nf_add_rows_f64,
                              nf_colsum_f32, nf_colsum_f64, nf_ffn_activate_f32,
                              nf_ffn_activate_f64, nf_ffn_bwd_f32, nf_ffn_bwd_f64,
                              nf_ffn_fwd_f32, nf_ffn_fwd_f64, nf_fill_rows_f32, nf_fill_rows_f64,
                              nf_round_sums_f32, nf_round_sums_f64)

import numpy as np

# activation name -> code of ffn_elementwise.h (the Python layer's list of valid names)
ACTIVATION_CODES = {"relu": NF_ACT_RELU, "gelu": NF_ACT_GELU, "gelu_tanh": NF_ACT_GELU_TANH,
                    "silu": NF_ACT_SILU,
                    "reglu": NF_ACT_REGLU, "geglu": NF_ACT_GEGLU, "swiglu": NF_ACT_SWIGLU}
# the gated ones: w1 is (d, 2h) = [gate | up]
GATED = ("reglu", "geglu", "swiglu")

cdef Py_ssize_t INT32_MAX = 2147483647


# ---------------------------------------------------------------- elementwise passes
# Each runs the ffn_elementwise.h function over columns [0, w) of a block of m rows, on `nt`
# threads: thread t takes the columns [_col(t), _col(t + 1)) (pointers offset to its first
# column, leading dimensions unchanged).  nt == 1: one call over the whole block.

cdef Py_ssize_t _MIN_ELEMS_PER_THREAD = 1 << 16    # below this a pass stays on one thread

cdef inline int _pass_threads(bint threaded, Py_ssize_t m, Py_ssize_t w) noexcept nogil:
    return nf_threads_for(m * w, _MIN_ELEMS_PER_THREAD) if threaded else 1


cdef inline Py_ssize_t _col(Py_ssize_t w, int t, int nt) noexcept nogil:
    """First column of thread t's slice of [0, w): whole 64-byte lines of float32 (multiples of
    16 elements) so no two threads write one cache line; the last slice ends at w."""
    if t >= nt:
        return w
    return (w * t // nt) & ~(<Py_ssize_t> 15)


cdef inline void _fwd_cols(floating *z, Py_ssize_t ldz, floating *a, Py_ssize_t lda,
                           const floating *b1, unsigned char *dead, Py_ssize_t m,
                           Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t h, int act) noexcept nogil:
    if c1 <= c0:
        return
    if floating is float:
        nf_ffn_fwd_f32(z + c0, ldz, a + c0 if a != NULL else NULL, lda,
                       b1 + c0 if b1 != NULL else NULL, dead + c0 if dead != NULL else NULL,
                       m, c1 - c0, h, act)
    else:
        nf_ffn_fwd_f64(z + c0, ldz, a + c0 if a != NULL else NULL, lda,
                       b1 + c0 if b1 != NULL else NULL, dead + c0 if dead != NULL else NULL,
                       m, c1 - c0, h, act)


cdef void _fwd_pass(floating *z, Py_ssize_t ldz, floating *a, Py_ssize_t lda,
                    const floating *b1, unsigned char *dead, Py_ssize_t m, Py_ssize_t h,
                    int act, int nt) noexcept nogil:
    """v = z + b1, a = act(v) (nf_ffn_fwd) over the block's h hidden columns."""
    cdef int t
    if nt <= 1:
        _fwd_cols(z, ldz, a, lda, b1, dead, m, 0, h, h, act)
        return
    for t in prange(nt, num_threads=nt, schedule='static'):
        _fwd_cols(z, ldz, a, lda, b1, dead, m, _col(h, t, nt), _col(h, t + 1, nt), h, act)


cdef inline void _bwd_cols(floating *g, Py_ssize_t ldg, floating *z, Py_ssize_t ldz,
                           const floating *b1, floating *a_out, Py_ssize_t lda, double *s1,
                           Py_ssize_t m, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t h,
                           int act) noexcept nogil:
    if c1 <= c0:
        return
    if floating is float:
        nf_ffn_bwd_f32(g + c0, ldg, z + c0, ldz, b1 + c0 if b1 != NULL else NULL,
                       a_out + c0 if a_out != NULL else NULL, lda,
                       s1 + c0 if s1 != NULL else NULL, m, c1 - c0, h, act)
    else:
        nf_ffn_bwd_f64(g + c0, ldg, z + c0, ldz, b1 + c0 if b1 != NULL else NULL,
                       a_out + c0 if a_out != NULL else NULL, lda,
                       s1 + c0 if s1 != NULL else NULL, m, c1 - c0, h, act)


cdef void _bwd_pass(floating *g, Py_ssize_t ldg, floating *z, Py_ssize_t ldz,
                    const floating *b1, floating *a_out, Py_ssize_t lda, double *s1,
                    Py_ssize_t m, Py_ssize_t h, int act, int nt) noexcept nogil:
    """dH = dA * act'(v), a = act(v) where asked, db1 sums (nf_ffn_bwd) over the h columns."""
    cdef int t
    if nt <= 1:
        _bwd_cols(g, ldg, z, ldz, b1, a_out, lda, s1, m, 0, h, h, act)
        return
    for t in prange(nt, num_threads=nt, schedule='static'):
        _bwd_cols(g, ldg, z, ldz, b1, a_out, lda, s1, m, _col(h, t, nt), _col(h, t + 1, nt), h,
                  act)


cdef inline void _activate_cols(floating *a, Py_ssize_t lda, const floating *z, Py_ssize_t ldz,
                                const floating *b1, Py_ssize_t m, Py_ssize_t c0, Py_ssize_t c1,
                                Py_ssize_t h, int act) noexcept nogil:
    if c1 <= c0:
        return
    if floating is float:
        nf_ffn_activate_f32(a + c0, lda, z + c0, ldz, b1 + c0 if b1 != NULL else NULL, m,
                            c1 - c0, h, act)
    else:
        nf_ffn_activate_f64(a + c0, lda, z + c0, ldz, b1 + c0 if b1 != NULL else NULL, m,
                            c1 - c0, h, act)


cdef void _activate_pass(floating *a, Py_ssize_t lda, const floating *z, Py_ssize_t ldz,
                         const floating *b1, Py_ssize_t m, Py_ssize_t h, int act,
                         int nt) noexcept nogil:
    """a = act(z + b1) alone (nf_ffn_activate) over the h columns."""
    cdef int t
    if nt <= 1:
        _activate_cols(a, lda, z, ldz, b1, m, 0, h, h, act)
        return
    for t in prange(nt, num_threads=nt, schedule='static'):
        _activate_cols(a, lda, z, ldz, b1, m, _col(h, t, nt), _col(h, t + 1, nt), h, act)


cdef inline void _rows_cols(floating *y, const floating *r, const floating *b, Py_ssize_t m,
                            Py_ssize_t d, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    if c1 <= c0:
        return
    if floating is float:
        if r != NULL:
            nf_add_rows_f32(y + c0, d, r + c0, d, b + c0 if b != NULL else NULL, m, c1 - c0)
        else:
            nf_fill_rows_f32(y + c0, d, b + c0, m, c1 - c0)
    else:
        if r != NULL:
            nf_add_rows_f64(y + c0, d, r + c0, d, b + c0 if b != NULL else NULL, m, c1 - c0)
        else:
            nf_fill_rows_f64(y + c0, d, b + c0, m, c1 - c0)


cdef void _rows_pass(floating *y, const floating *r, const floating *b, Py_ssize_t m,
                     Py_ssize_t d, int nt) noexcept nogil:
    """y rows (m x d, C-contiguous) = r + b (nf_add_rows; r may be the only term) or b
    (nf_fill_rows, r NULL)."""
    cdef int t
    if nt <= 1:
        _rows_cols(y, r, b, m, d, 0, d)
        return
    for t in prange(nt, num_threads=nt, schedule='static'):
        _rows_cols(y, r, b, m, d, _col(d, t, nt), _col(d, t + 1, nt))


cdef inline void _colsum_cols(double *acc, const floating *x, Py_ssize_t m, Py_ssize_t d,
                              Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    if c1 <= c0:
        return
    if floating is float:
        nf_colsum_f32(acc + c0, x + c0, d, m, c1 - c0)
    else:
        nf_colsum_f64(acc + c0, x + c0, d, m, c1 - c0)


cdef void _colsum_pass(double *acc, const floating *x, Py_ssize_t m, Py_ssize_t d,
                       int nt) noexcept nogil:
    """acc[j] += sum of the m rows' x[:, j] (x C-contiguous, m x d), rows in order."""
    cdef int t
    if nt <= 1:
        _colsum_cols(acc, x, m, d, 0, d)
        return
    for t in prange(nt, num_threads=nt, schedule='static'):
        _colsum_cols(acc, x, m, d, _col(d, t, nt), _col(d, t + 1, nt))


# ---------------------------------------------------------------- forward
# Per block of m rows (xb = x[r0:r0+m], shapes in rows x cols):
#   z  (m, hw) = xb (m, d) @ w1 (d, hw)              GEMM 1, into the saved hidden or scratch
#   v  = z + b1,  a (m, h) = act(v)                   elementwise, block in cache
#        (gated: v = [g | u], a = act(g) * u)
#        saved hidden: relu keeps a (its mask is a > 0); other activations keep v (act' needs it)
#        and write a to scratch.  Not saved: a replaces z in scratch (its first h columns).
#        dead[j] &= a[:, j] == 0 (relu; reglu: its gate; ctx.dead_units).
#   yb (m, d)  = b2 (broadcast) + a (m, h) @ w2 (h, d)                               GEMM 2
#        with a residual res (ffn_block): yb = (resb + b2) + a @ w2, resb written into yb just
#        before the GEMM accumulates onto it (the residual add costs no pass of its own)
cdef int _forward(floating[:, ::1] y,                     # OUT (n, d)
                  floating[:, ::1] hidden,                # OUT (n, hw) or None (not kept)
                  unsigned char[::1] dead,                # OUT (h,) or None
                  floating[::1] scratch,                  # blk*hw, or blk*h when hidden is kept;
                                                          #   None iff relu and hidden is kept
                  const floating[:, ::1] x,               # IN  (n, d)
                  const floating[:, :] w1, const floating[::1] b1,    # IN (d, hw), (hw,) or None
                  const floating[:, :] w2, const floating[::1] b2,    # IN (h, d), (d,) or None
                  const floating[:, ::1] res,             # IN (n, d) or None: added to y
                  int act, Py_ssize_t blk, const Blas *bl, bint threaded) except -1:
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1], hw = w1.shape[1], h = w2.shape[0]
    cdef int ld1, ld2
    cdef char t1 = blas_layout(w1, &ld1), t2 = blas_layout(w2, &ld2)
    cdef const floating *w1p = &w1[0, 0]
    cdef const floating *w2p = &w2[0, 0]
    cdef const floating *b1p = NULL
    cdef const floating *b2p = NULL
    cdef const floating *xp = &x[0, 0]
    cdef const floating *resp = NULL
    cdef floating *yp = &y[0, 0]
    cdef floating *hp = NULL
    cdef floating *sp = NULL
    cdef unsigned char *deadp = NULL
    cdef floating *zp          # the block's GEMM-1 output (ld hw)
    cdef floating *a_apart     # where a goes when z keeps v (ld h), else NULL
    cdef floating *ap          # the block's a, for GEMM 2
    cdef Py_ssize_t lda
    cdef floating beta2 = 0
    cdef Py_ssize_t r0, m
    if b1 is not None:
        b1p = &b1[0]
    if b2 is not None:
        b2p = &b2[0]
        beta2 = 1
    if res is not None:
        resp = &res[0, 0]
        beta2 = 1
    if hidden is not None:
        hp = &hidden[0, 0]
    if scratch is not None:
        sp = &scratch[0]
    if dead is not None:
        deadp = &dead[0]
    with nogil:
        if deadp != NULL:
            memset(deadp, 1, h)
        r0 = 0
        while r0 < n:
            m = n - r0 if n - r0 < blk else blk
            zp = hp + r0 * hw if hp != NULL else sp
            a_apart = sp if (hp != NULL and act != NF_ACT_RELU) else NULL
            ap = a_apart if a_apart != NULL else zp
            lda = h if a_apart != NULL else hw
            gemm(bl, c'N', t1, <int> m, <int> hw, <int> d, <floating> 1, xp + r0 * d, <int> d,
                 w1p, ld1, <floating> 0, zp, <int> hw)
            _fwd_pass(zp, hw, a_apart, h, b1p, deadp, m, h, act,
                      _pass_threads(threaded, m, h))
            if resp != NULL or b2p != NULL:
                _rows_pass(yp + r0 * d, resp + r0 * d if resp != NULL else NULL, b2p, m, d,
                           _pass_threads(threaded, m, d))
            gemm(bl, c'N', t2, <int> m, <int> d, <int> h, <floating> 1, ap, <int> lda,
                 w2p, ld2, beta2, yp + r0 * d, <int> d)
            r0 = r0 + m
    return 0


cdef inline void _dw_gemm(const Blas *bl, char layout, Py_ssize_t p, Py_ssize_t q, Py_ssize_t m,
                          const floating *a, Py_ssize_t lda, const floating *b, floating beta,
                          floating *dw, int ld) noexcept nogil:
    """dw (p, q) (+)= a^T (p, m) @ b (m, q): a's rows (p used) lda apart, b C-contiguous (m, q);
    dw in the layout blas_layout read (`layout`, leading dimension `ld`): for 'T' (a transposed
    view) this computes dw^T (q, p) = b^T @ a, the same sums written in that layout."""
    if layout == c'N':
        gemm(bl, c'T', c'N', <int> p, <int> q, <int> m, <floating> 1, a, <int> lda, b, <int> q,
             beta, dw, ld)
    else:
        gemm(bl, c'T', c'N', <int> q, <int> p, <int> m, <floating> 1, b, <int> q, a, <int> lda,
             beta, dw, ld)


# ---------------------------------------------------------------- backward
# Per block of m rows (xb, dyb, dxb the block's rows); each step runs only if an output it feeds
# is wanted (an output passed as None is not computed):
#   [recompute] z (m, hw) = xb @ w1                     GEMM (forward's GEMM 1 again)
#   g  (m, h)  = dyb (m, d) @ w2^T (d, h)               GEMM: dA            (dx, dw1 or db1)
#   dH = g * act'(v)   (relu: g where a > 0)            elementwise, block in cache; also
#        a = act(v) where it is not saved (dw2), db1 += colsum(dH), db2 += colsum(dyb)
#        gated: g is written into gbuf's first h columns (ld hw = 2h) and the pass turns it
#        into dH = [dA * u * act'(g) | dA * act(g)] (m, 2h) in place
#   dw2 (h, d) += a^T (h, m) @ dyb (m, d)               GEMM (beta = 0 on the first block)
#   dxb (m, d)  = dH (m, hw) @ w1^T (hw, d)             GEMM
#   dw1 (d, hw) += xb^T (d, m) @ dH (m, hw)             GEMM (beta = 0 on the first block)
#   (a dw given as a transposed view gets the transposed product: dw1^T += dH^T @ xb,
#   dw2^T += dyb^T @ a — the same sums of the same products, written in that layout)
# With relu and the hidden saved, `hidden` is a itself: no block of a is rebuilt, and
# dw2 = a^T @ dy is one GEMM over all rows after the loop (fewer, larger GEMMs; measured faster)
# whenever n fits BLAS's int.  db1/db2 are float64 sums in `sums`, rounded once at the end.
# dx_acc (ffn_block's post-LN residual): dxb = dxb + dH @ w1^T, dx holding the addend on entry
# and possibly being dy itself (each block reads its dy rows before its dx GEMM writes them;
# the whole-dw2 GEMM, which reads every row of dy, then runs before the loop).
cdef int _backward(floating[:, ::1] dx,                   # OUT (n, d) or None
                   floating[:, :] dw1,                    # OUT (d, hw) or None
                   floating[::1] db1,                     # OUT (hw,) or None
                   floating[:, :] dw2,                    # OUT (h, d) or None
                   floating[::1] db2,                     # OUT (d,) or None
                   double[::1] sums,                      # scratch hw + d; None iff no db1, db2
                   floating[::1] gbuf,                    # scratch blk*hw; None iff no dx/dw1/db1
                   floating[::1] zbuf,                    # scratch: recompute blk*hw; saved,
                                                          #   not relu, dw2: blk*h; else None
                   const floating[:, ::1] dy,             # IN (n, d)
                   const floating[:, ::1] hidden,         # IN (n, hw): a (relu) or v; None: recompute
                   const floating[:, ::1] x,              # IN (n, d)
                   const floating[:, :] w1, const floating[::1] b1,
                   const floating[:, :] w2,
                   int act, Py_ssize_t blk,
                   bint dx_acc,                           # dx += (not =) dH @ w1^T
                   const Blas *bl, bint threaded) except -1:
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1], hw = w1.shape[1], h = w2.shape[0]
    cdef int ld1, ld2, ldg1 = 0, ldg2 = 0
    cdef char t1 = blas_layout(w1, &ld1), t2 = blas_layout(w2, &ld2)
    cdef char tg1 = c'N', tg2 = c'N'     # dw1's / dw2's layout ('T': a transposed view)
    cdef const floating *w1p = &w1[0, 0]
    cdef const floating *w2p = &w2[0, 0]
    cdef const floating *b1p = NULL
    cdef const floating *xp = &x[0, 0]
    cdef const floating *dyp = &dy[0, 0]
    cdef const floating *hp = NULL
    cdef floating *dxp = NULL
    cdef floating *dw1p = NULL
    cdef floating *dw2p = NULL
    cdef floating *db1p = NULL
    cdef floating *db2p = NULL
    cdef floating *gp = NULL
    cdef floating *zb = NULL
    cdef double *s1 = NULL       # db1's float64 sums (hw)
    cdef double *s2 = NULL       # db2's float64 sums (d)
    cdef floating *hb          # the block's z, v or a, as the elementwise pass reads it (ld hw)
    cdef floating *a_out       # where the pass writes a (NULL: a is hb already, or not needed)
    cdef Py_ssize_t lda        # a_out's row stride
    cdef const floating *bias  # added to hb by the pass (recompute only)
    cdef const floating *ap    # the block's a, for dw2
    cdef Py_ssize_t ldap
    cdef floating beta
    cdef floating beta_dx = 1 if dx_acc else 0
    cdef Py_ssize_t r0, m
    cdef bint recompute = hidden is None
    cdef bint need_dh, need_a, dw2_whole
    if b1 is not None:
        b1p = &b1[0]
    if hidden is not None:
        hp = &hidden[0, 0]
    if dx is not None:
        dxp = &dx[0, 0]
    if dw1 is not None:
        dw1p = &dw1[0, 0]
        tg1 = blas_layout(dw1, &ldg1)
    if dw2 is not None:
        dw2p = &dw2[0, 0]
        tg2 = blas_layout(dw2, &ldg2)
    if db1 is not None:
        db1p = &db1[0]
    if db2 is not None:
        db2p = &db2[0]
    if gbuf is not None:
        gp = &gbuf[0]
    if zbuf is not None:
        zb = &zbuf[0]
    if sums is not None:
        if db1p != NULL:
            s1 = &sums[0]
        if db2p != NULL:
            s2 = &sums[hw]
    need_dh = dxp != NULL or dw1p != NULL or db1p != NULL
    need_a = dw2p != NULL
    dw2_whole = need_a and not recompute and act == NF_ACT_RELU and n <= INT32_MAX
    with nogil:
        if s1 != NULL:
            memset(s1, 0, hw * sizeof(double))
        if s2 != NULL:
            memset(s2, 0, d * sizeof(double))
        if dw2_whole and dx_acc:
            _dw_gemm(bl, tg2, h, d, n, hp, hw, dyp, 0, dw2p, ldg2)
        r0 = 0
        while r0 < n:
            m = n - r0 if n - r0 < blk else blk
            beta = 0 if r0 == 0 else 1
            hb = NULL
            a_out = NULL
            lda = h
            bias = NULL
            if recompute:
                if need_dh or need_a:
                    gemm(bl, c'N', t1, <int> m, <int> hw, <int> d, <floating> 1, xp + r0 * d,
                         <int> d, w1p, ld1, <floating> 0, zb, <int> hw)
                    hb = zb
                    a_out = zb          # a replaces z in place
                    lda = hw
                    bias = b1p
            else:
                hb = <floating *> hp + r0 * hw     # read only: a_out is never hb here
                if need_a and act != NF_ACT_RELU:
                    a_out = zb
            ap = a_out if a_out != NULL else hb
            ldap = lda if a_out != NULL else hw
            if need_dh:
                gemm(bl, c'N', flip(t2), <int> m, <int> h, <int> d, <floating> 1, dyp + r0 * d,
                     <int> d, w2p, ld2, <floating> 0, gp, <int> hw)
                _bwd_pass(gp, hw, hb, hw, bias, a_out, lda, s1, m, h, act,
                          _pass_threads(threaded, m, h))
            elif a_out != NULL:
                _activate_pass(a_out, lda, hb, hw, bias, m, h, act, _pass_threads(threaded, m, h))
            if s2 != NULL:
                _colsum_pass(s2, dyp + r0 * d, m, d, _pass_threads(threaded, m, d))
            if need_a and not dw2_whole:
                _dw_gemm(bl, tg2, h, d, m, ap, ldap, dyp + r0 * d, beta, dw2p, ldg2)
            if dxp != NULL:
                gemm(bl, c'N', flip(t1), <int> m, <int> d, <int> hw, <floating> 1, gp, <int> hw,
                     w1p, ld1, beta_dx, dxp + r0 * d, <int> d)
            if dw1p != NULL:
                _dw_gemm(bl, tg1, d, hw, m, xp + r0 * d, d, gp, beta, dw1p, ldg1)
            r0 = r0 + m
        if dw2_whole and not dx_acc:
            _dw_gemm(bl, tg2, h, d, n, hp, hw, dyp, 0, dw2p, ldg2)
        if floating is float:
            if s1 != NULL:
                nf_round_sums_f32(db1p, s1, hw)
            if s2 != NULL:
                nf_round_sums_f32(db2p, s2, d)
        else:
            if s1 != NULL:
                nf_round_sums_f64(db1p, s1, hw)
            if s2 != NULL:
                nf_round_sums_f64(db2p, s2, d)
    return 0


# ---------------------------------------------------------------- Python entry points
# The BLAS a call multiplies with: slot 0 is scipy's (always there); slot 1 is one a caller
# registered (register_blas), e.g. normffn.torch's: the BLAS PyTorch itself calls.
cdef Blas _BLAS[2]
_BLAS[0] = scipy_blas()
cdef bint _slot1_registered = False
cdef bint _slot1_openmp = False       # slot 1's BLAS runs on this process's OpenMP pool


def register_blas(size_t sgemm, size_t dgemm, size_t sgemv, size_t dgemv, bint openmp=False):
    """Slot 1 <- the BLAS whose sgemm_/dgemm_/sgemv_/dgemv_ (Fortran interface, LP64 ints)
    are at these addresses; `openmp`: it threads on this process's OpenMP pool, so the
    elementwise passes of its calls may use that pool too.  The caller vouches for the
    addresses (normffn._blas checks the routines on a small product before it lets any kernel
    use them)."""
    global _slot1_registered, _slot1_openmp
    if not (sgemm and dgemm and sgemv and dgemv):
        raise ValueError("register_blas: every routine's address must be non-zero")
    _BLAS[1].sgemm = <sgemm_t> sgemm
    _BLAS[1].dgemm = <dgemm_t> dgemm
    _BLAS[1].sgemv = <sgemv_t> sgemv
    _BLAS[1].dgemv = <dgemv_t> dgemv
    _slot1_registered = True
    _slot1_openmp = openmp


cdef const Blas *_blas_of(int slot) except NULL:
    if slot == 0 or (slot == 1 and _slot1_registered):
        return &_BLAS[slot]
    raise ValueError(f"kernel argument blas={slot}: no BLAS registered in that slot")


def forward(y, hidden, dead, scratch, x, w1, b1, w2, b2, int act, Py_ssize_t blk, res=None,
            int blas=0):
    """y (and hidden, dead) <- the FFN forward, plus `res` ((n, d) or None) if given, with the
    BLAS of slot `blas`.  Arguments already validated (module doc); `dead` is a bool array
    viewed as uint8."""
    cdef const Blas *bl = _blas_of(blas)
    cdef bint threaded = blas == 1 and _slot1_openmp
    if x.dtype == np.float32:
        _forward[float](y, hidden, dead, scratch, x, w1, b1, w2, b2, res, act, blk, bl,
                        threaded)
    else:
        _forward[double](y, hidden, dead, scratch, x, w1, b1, w2, b2, res, act, blk, bl,
                         threaded)


def backward(dx, dw1, db1, dw2, db2, sums, gbuf, zbuf, dy, hidden, x, w1, b1, w2, int act,
             Py_ssize_t blk, bint dx_acc=False, int blas=0):
    """dx, dw1, db1, dw2, db2 (those not None) <- the FFN backward, with the BLAS of slot
    `blas`; with `dx_acc` dx is accumulated onto (it holds an addend, and may be dy itself).
    Arguments already validated (module doc)."""
    cdef const Blas *bl = _blas_of(blas)
    cdef bint threaded = blas == 1 and _slot1_openmp
    if x.dtype == np.float32:
        _backward[float](dx, dw1, db1, dw2, db2, sums, gbuf, zbuf, dy, hidden, x, w1, b1, w2,
                         act, blk, dx_acc, bl, threaded)
    else:
        _backward[double](dx, dw1, db1, dw2, db2, sums, gbuf, zbuf, dy, hidden, x, w1, b1, w2,
                          act, blk, dx_acc, bl, threaded)
