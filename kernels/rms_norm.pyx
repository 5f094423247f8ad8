# RMSNorm kernels: normalise each row of a (n, d) matrix by its root mean square.
#
# Contract (normffn/rms_norm.py and _checks.py guarantee it; nothing here re-checks):
#   * x, y, dy, dx are C-contiguous (n, d) of one float dtype, n >= 1, d >= 1, no output overlaps
#     an input; weight/dweight are contiguous (d,) or None; rstd is contiguous (n,) float64;
#     scratch holds scratch_size(...) float64 values (or is None when no dweight is wanted).
#   * The GIL is released once per call.  Whether outputs are streamed (non-temporal stores) is
#     the caller's decision (normffn._tuning.stream_threshold), passed as `stream`.
# The row bodies and the OpenMP loops are shared with LayerNorm and the residual add + norm ops
# (norm_rows.h, norm_rows.pxd): rows over threads in forward; fixed row blocks with float64
# dweight partials added in block order in backward (1 and N threads agree bitwise).
from cython cimport floating
from libc.string cimport memset

from norm_rows cimport (nf_nr_ahead, nf_nr_bwd_args, nf_nr_bwd_scratch, nf_nr_fwd_args,
                        nf_nr_threads, nr_backward, nr_forward)


# ---------------------------------------------------------------- forward
# rstd[i] = 1 / sqrt(sum_j x[i, j]^2 / d + eps)
# y[i, j] = x[i, j] * rstd[i] * weight[j]
cdef int _forward(floating[:, ::1] y, double[::1] rstd,                          # OUT
                  const floating[:, ::1] x, const floating[::1] weight,          # IN (w or None)
                  double eps, int stream) except -1:
    cdef nf_nr_fwd_args a
    memset(&a, 0, sizeof(a))
    a.y = &y[0, 0]
    a.rstd = &rstd[0]
    a.x = &x[0, 0]
    if weight is not None:
        a.w = &weight[0]
    a.n = x.shape[0]
    a.d = x.shape[1]
    a.ahead = nf_nr_ahead(a.d, sizeof(floating))
    a.eps = eps
    a.stream = stream
    a.f64 = floating is double
    with nogil:
        nr_forward(&a, nf_nr_threads(a.n * a.d))
    return 0


# ---------------------------------------------------------------- backward
# xhat = x * rstd,  g = dy * weight (dy without weight),  c1 = mean_j(g * xhat)
# dx = rstd * (g - xhat * c1),  dweight = sum_i dy * xhat
cdef int _backward(floating[:, ::1] dx, floating[::1] dweight,                   # OUT or None
                   const floating[:, ::1] dy, const floating[:, ::1] x,          # IN
                   const floating[::1] weight, const double[::1] rstd,           # IN (w or None)
                   double[::1] scratch, int stream) except -1:                   # WORK
    cdef nf_nr_bwd_args a
    memset(&a, 0, sizeof(a))
    if dx is not None:
        a.dx = &dx[0, 0]
    if dweight is not None:
        a.dw = &dweight[0]
        a.work = &scratch[0]
    a.dy = &dy[0, 0]
    a.x = &x[0, 0]
    if weight is not None:
        a.w = &weight[0]
    a.rstd = &rstd[0]
    a.n = x.shape[0]
    a.d = x.shape[1]
    a.stream = stream
    a.f64 = floating is double
    with nogil:
        nr_backward(&a)
    return 0


# ---------------------------------------------------------------- Python entry points
def forward(y, rstd, x, weight, double eps, int stream):
    """y, rstd <- RMSNorm(x) over rows.  Arguments already validated (see module doc)."""
    if x.dtype.itemsize == 4:
        _forward[float](y, rstd, x, weight, eps, stream)
    else:
        _forward[double](y, rstd, x, weight, eps, stream)


def scratch_size(Py_ssize_t n, Py_ssize_t d, bint want_w):
    """float64 elements of scratch `backward` needs for the dweight partials."""
    return nf_nr_bwd_scratch(n, d, want_w, 0)


def backward(dx, dweight, dy, x, weight, rstd, scratch, int stream):
    """dx, dweight <- RMSNorm backward (either may be None: not computed).  Arguments already
    validated; dweight needs weight and scratch_size(n, d, True) float64 values of scratch."""
    if x.dtype.itemsize == 4:
        _backward[float](dx, dweight, dy, x, weight, rstd, scratch, stream)
    else:
        _backward[double](dx, dweight, dy, x, weight, rstd, scratch, stream)
