# Residual add + norm kernels: s = x + residual, y = LayerNorm(s) or RMSNorm(s), row by row, in
# one pass over memory per row (s is written while its first sum is taken; the norm then reads
# the row from L1/L2).  Backward: dsum = dnorm(dy) [+ ds], the gradient of both x and residual.
#
# Contract (normffn/add_norm.py and _checks.py guarantee it; nothing here re-checks):
#   * x, residual, y, s, dy, ds, dsum are C-contiguous (n, d) of one float dtype, n >= 1,
#     d >= 1, no output overlaps an input; weight/bias/dweight/dbias are contiguous (d,) or
#     None; mean/rstd are contiguous (n,) float64, mean None selects RMSNorm.
#   * rowbuf (streamed forward only) holds rowbuf_size(n, d) elements of x's dtype; scratch
#     holds scratch_size(...) float64 values (or is None when no dweight/dbias is wanted).
#   * The GIL is released once per call; `stream` (non-temporal stores) is the caller's choice.
# The row bodies and the OpenMP loops are norm_rows.h / norm_rows.pxd (shared with LayerNorm and
# RMSNorm).
from cython cimport floating
from libc.string cimport memset

from norm_rows cimport (nf_nr_ahead, nf_nr_bwd_args, nf_nr_bwd_scratch, nf_nr_fwd_args,
                        nf_nr_threads, nr_backward, nr_forward)


# ---------------------------------------------------------------- forward
# s = x + residual
# LayerNorm (mean given): mean, rstd of s (two-pass), y = (s - mean) * rstd * weight + bias
# RMSNorm (mean None):    rstd = 1 / sqrt(mean_j s^2 + eps), y = s * rstd * weight
cdef int _forward(floating[:, ::1] y, floating[:, ::1] s,                          # OUT
                  double[::1] mean, double[::1] rstd,                              # OUT (mean or None)
                  const floating[:, ::1] x, const floating[:, ::1] residual,       # IN
                  const floating[::1] weight, const floating[::1] bias,            # IN or None
                  double eps, int stream, floating[::1] rowbuf) except -1:         # WORK or None
    cdef nf_nr_fwd_args a
    cdef int nt
    memset(&a, 0, sizeof(a))
    a.y = &y[0, 0]
    a.s = &s[0, 0]
    if mean is not None:
        a.mean = &mean[0]
    a.rstd = &rstd[0]
    a.x = &x[0, 0]
    a.r = &residual[0, 0]
    if weight is not None:
        a.w = &weight[0]
    if bias is not None:
        a.b = &bias[0]
    a.n = x.shape[0]
    a.d = x.shape[1]
    a.ahead = nf_nr_ahead(a.d, sizeof(floating))
    a.eps = eps
    a.stream = stream
    a.f64 = floating is double
    nt = nf_nr_threads(a.n * a.d)
    if stream:
        a.rowbuf = &rowbuf[0]
        if nt > rowbuf.shape[0] // a.d:      # the thread limit changed since rowbuf_size
            nt = <int>(rowbuf.shape[0] // a.d)
    with nogil:
        nr_forward(&a, nt)
    return 0


# ---------------------------------------------------------------- backward
# xhat = (s - mean) * rstd (LayerNorm) or s * rstd (RMSNorm),  g = dy * weight
# c1 = mean_j(g * xhat),  c2 = mean_j(g) (LayerNorm only)
# dsum = rstd * ((g - xhat * c1) - c2) + ds    (RMSNorm: no c2; ds optional)
# dweight = sum_i dy * xhat,  dbias = sum_i dy
cdef int _backward(floating[:, ::1] dsum,                                         # OUT or None
                   floating[::1] dweight, floating[::1] dbias,                      # OUT or None
                   const floating[:, ::1] dy, const floating[:, ::1] s,             # IN
                   const floating[::1] weight,                                      # IN or None
                   const double[::1] mean, const double[::1] rstd,                  # IN (mean or None)
                   const floating[:, ::1] ds,                                       # IN or None
                   double[::1] scratch, int stream) except -1:                      # WORK
    cdef nf_nr_bwd_args a
    memset(&a, 0, sizeof(a))
    if dsum is not None:
        a.dx = &dsum[0, 0]
    if dweight is not None:
        a.dw = &dweight[0]
    if dbias is not None:
        a.db = &dbias[0]
    if dweight is not None or dbias is not None:
        a.work = &scratch[0]
    a.dy = &dy[0, 0]
    a.x = &s[0, 0]
    if ds is not None:
        a.ds = &ds[0, 0]
    if weight is not None:
        a.w = &weight[0]
    if mean is not None:
        a.mean = &mean[0]
    a.rstd = &rstd[0]
    a.n = s.shape[0]
    a.d = s.shape[1]
    a.stream = stream
    a.f64 = floating is double
    with nogil:
        nr_backward(&a)
    return 0


# ---------------------------------------------------------------- Python entry points
def rowbuf_size(Py_ssize_t n, Py_ssize_t d):
    """Elements of the row buffer a streamed `forward` needs (one row per thread)."""
    return nf_nr_threads(n * d) * d


def forward(y, s, mean, rstd, x, residual, weight, bias, double eps, int stream, rowbuf):
    """y, s, (mean), rstd <- norm(x + residual) over rows; mean None means RMSNorm (then bias
    is None).  Arguments already validated (see module doc)."""
    if x.dtype.itemsize == 4:
        _forward[float](y, s, mean, rstd, x, residual, weight, bias, eps, stream, rowbuf)
    else:
        _forward[double](y, s, mean, rstd, x, residual, weight, bias, eps, stream, rowbuf)


def scratch_size(Py_ssize_t n, Py_ssize_t d, bint want_w, bint want_b):
    """float64 elements of scratch `backward` needs for the dweight/dbias partials."""
    return nf_nr_bwd_scratch(n, d, want_w, want_b)


def backward(dsum, dweight, dbias, dy, s, weight, mean, rstd, ds, scratch, int stream):
    """dsum, dweight, dbias <- backward of norm(s) (+ ds); any output may be None (not
    computed); mean None means RMSNorm.  Arguments already validated (see module doc)."""
    if s.dtype.itemsize == 4:
        _backward[float](dsum, dweight, dbias, dy, s, weight, mean, rstd, ds, scratch, stream)
    else:
        _backward[double](dsum, dweight, dbias, dy, s, weight, mean, rstd, ds, scratch, stream)
