# RMSNorm kernels: normalise each row of a (n, d) matrix by its root mean square.
#
# Contract (normffn/rms_norm.py and _checks.py guarantee it; arrays.pxd re-checks only dtype,
# contiguity and element counts, for a few nanoseconds):
#   * x, y, dy, dx are C-contiguous (n, d) of one float dtype, n >= 1, d >= 1, no output overlaps
#     an input; weight/dweight are contiguous (d,) or None; rstd is contiguous (n,) float64;
#     scratch holds scratch_size(...) float64 values (or is None when no dweight is wanted).
#   * The GIL is released once per call.  Whether outputs are streamed (non-temporal stores) is
#     the caller's decision (normffn._tuning.stream_threshold), passed as `stream`.
# The row bodies and the OpenMP loops are shared with LayerNorm and the residual add + norm ops
# (norm_rows.h, norm_rows.pxd): rows over threads in forward; fixed row blocks with float64
# dweight partials added in block order in backward (1 and N threads agree bitwise).
cimport numpy as cnp
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from arrays cimport (data_in, data_out, float_type, matrix_shape, opt_in, opt_out,
                     work_out)
from norm_rows cimport (nf_nr_ahead, nf_nr_bwd_args, nf_nr_bwd_scratch, nf_nr_fwd_args,
                        nf_nr_threads, nr_backward, nr_forward)

cnp.import_array()


# ---------------------------------------------------------------- forward
# rstd[i] = 1 / sqrt(sum_j x[i, j]^2 / d + eps),   y[i, j] = x[i, j] * rstd[i] * weight[j]
# Buffers: y, x (n, d) of one float dtype; rstd (n,) float64, or None (not kept: scratch);
# weight (d,) or None.
def forward(y, rstd, x, weight, double eps, int stream):
    """y, rstd <- RMSNorm(x) over rows.  Arguments already validated (see module doc)."""
    cdef nf_nr_fwd_args a
    cdef int t = float_type(x)
    cdef double *stats = NULL
    memset(&a, 0, sizeof(a))
    matrix_shape(x, &a.n, &a.d)
    a.x = data_in(x, t, a.n * a.d, "x")
    a.y = data_out(y, t, a.n * a.d, "y")
    if a.n == 0:
        return
    a.w = opt_in(weight, t, a.d, "weight")
    if rstd is None:                     # statistics not kept: scratch
        stats = <double *>malloc(a.n * sizeof(double))
        if stats == NULL:
            raise MemoryError()
        a.rstd = stats
    else:
        a.rstd = <double *>data_out(rstd, cnp.NPY_FLOAT64, a.n, "rstd")
    a.f64 = t == cnp.NPY_FLOAT64
    a.ahead = nf_nr_ahead(a.d, 8 if a.f64 else 4)
    a.eps = eps
    a.stream = stream
    with nogil:
        nr_forward(&a, nf_nr_threads(a.n * a.d))
    free(stats)


# ---------------------------------------------------------------- backward
# xhat = x * rstd,  g = dy * weight (g = dy without weight),  c1 = mean_j(g * xhat)
# dx = rstd * (g - xhat * c1),  dweight = sum_i dy * xhat
# Buffers: dx, dy, x (n, d); dweight, weight (d,); rstd (n,) float64; dx and dweight optional.
def scratch_size(Py_ssize_t n, Py_ssize_t d, bint want_w):
    """float64 elements of scratch `backward` needs for the dweight partials."""
    return nf_nr_bwd_scratch(n, d, want_w, 0)


def backward(dx, dweight, dy, x, weight, rstd, scratch, int stream):
    """dx, dweight <- RMSNorm backward (either may be None: not computed).  Arguments already
    validated; dweight needs weight and scratch_size(n, d, True) float64 values of scratch."""
    cdef nf_nr_bwd_args a
    cdef int t = float_type(x)
    memset(&a, 0, sizeof(a))
    matrix_shape(x, &a.n, &a.d)
    a.dx = opt_out(dx, t, a.n * a.d, "dx")
    if dweight is not None:
        a.dw = data_out(dweight, t, a.d, "dweight")
        a.work = work_out(scratch, nf_nr_bwd_scratch(a.n, a.d, 1, 0), "scratch")
    a.dy = data_in(dy, t, a.n * a.d, "dy")
    a.x = data_in(x, t, a.n * a.d, "x")
    a.w = opt_in(weight, t, a.d, "weight")
    a.rstd = <const double *>data_in(rstd, cnp.NPY_FLOAT64, a.n, "rstd")
    a.stream = stream
    a.f64 = t == cnp.NPY_FLOAT64
    with nogil:
        nr_backward(&a)
