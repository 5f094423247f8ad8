# LayerNorm kernels: normalise each row of a (n, d) matrix.
#
# Contract (normffn/layer_norm.py's check layer guarantees it; nothing here re-checks):
#   * x, y, dy, dx are C-contiguous (n, d) of one float dtype, n >= 1, d >= 1, no output overlaps
#     an input; weight/bias are contiguous (d,) or None; mean/rstd are contiguous (n,) float64.
#   * `stream` (non-temporal output stores) is decided by the caller (normffn._tuning).
#   * The GIL is released once per call; all loops run without bounds checks.
# Layers: the row bodies, the thread plan and the backward's block plan are plain C in
# norm_rows.h (on core.h), the OpenMP loops in norm_rows.pxd — shared with RMSNorm and the
# residual add + norm ops; this file fills in one call's arguments.
# Threads: rows are split statically over OpenMP threads (each row is independent in forward and
# in dx).  dweight/dbias are reduced deterministically: rows are cut into a fixed number of
# blocks that depends only on (n, d) — never on the thread count — each block accumulates its
# partial sums in float64, and the partials are added in block order.  So 1 and N threads give
# bitwise-identical results.
from cython cimport floating
from libc.string cimport memset

import numpy as np

from core cimport nf_max_threads
from norm_rows cimport (nf_nr_ahead, nf_nr_bwd_args, nf_nr_bwd_scratch, nf_nr_fwd_args,
                        nf_nr_threads, nr_backward, nr_forward)


# ---------------------------------------------------------------- forward
# mean[i] = sum_j x[i, j] / d
# rstd[i] = 1 / sqrt(sum_j (x[i, j] - mean[i])^2 / d + eps)            (biased variance)
# y[i, j] = (x[i, j] - mean[i]) * rstd[i] * weight[j] + bias[j]
cdef int _forward(floating[:, ::1] y, double[::1] mean, double[::1] rstd,         # OUT
                  const floating[:, ::1] x,                                         # IN
                  const floating[::1] weight, const floating[::1] bias,             # IN or None
                  double eps, int stream) except -1:
    cdef nf_nr_fwd_args a
    memset(&a, 0, sizeof(a))
    a.y = &y[0, 0]
    a.mean = &mean[0]
    a.rstd = &rstd[0]
    a.x = &x[0, 0]
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
    with nogil:
        nr_forward(&a, nf_nr_threads(a.n * a.d))
    return 0


# ---------------------------------------------------------------- backward
# xhat = (x - mean) * rstd,   g = dy * weight   (g = dy without weight)
# c1 = mean_j(g * xhat),      c2 = mean_j(g)
# dx = rstd * (g - xhat * c1 - c2)
# dweight = sum_i dy * xhat,  dbias = sum_i dy
# Each output is optional (None: not computed; with dx None only the parameter sums run).
# Rows are cut into fixed blocks (norm_rows.h: nf_nr_bwd_plan); block k accumulates its
# dweight/dbias partial in scratch[k] (float64) group by group (NF_G rows at a time); the
# partials are then added in block order, columns split over threads.
cdef int _backward(floating[:, ::1] dx,                                            # OUT or None
                   floating[::1] dweight, floating[::1] dbias,                       # OUT or None
                   const floating[:, ::1] dy, const floating[:, ::1] x,              # IN
                   const floating[::1] weight,                                       # IN or None
                   const double[::1] mean, const double[::1] rstd,                   # IN
                   double[::1] scratch, int stream) except -1:                       # WORK
    cdef nf_nr_bwd_args a
    cdef bint need_w = dweight is not None, need_b = dbias is not None
    if dx is None and not need_w and not need_b:
        return 0
    memset(&a, 0, sizeof(a))
    a.n = x.shape[0]
    a.d = x.shape[1]
    if need_w or need_b:
        if scratch is None or scratch.shape[0] < nf_nr_bwd_scratch(a.n, a.d, need_w, need_b):
            raise ValueError("layer_norm backward: scratch too small (see scratch_size)")
        a.work = &scratch[0]
    if dx is not None:
        a.dx = &dx[0, 0]
    if need_w:
        a.dw = &dweight[0]
    if need_b:
        a.db = &dbias[0]
    a.dy = &dy[0, 0]
    a.x = &x[0, 0]
    if weight is not None:
        a.w = &weight[0]
    a.mean = &mean[0]
    a.rstd = &rstd[0]
    a.stream = stream
    a.f64 = floating is double
    with nogil:
        nr_backward(&a)
    return 0


# ---------------------------------------------------------------- Python entry points
def forward(y, mean, rstd, x, weight, bias, double eps, bint stream):
    """y, mean, rstd <- LayerNorm(x) over rows; `stream`: write y with non-temporal stores.
    Arguments already validated (see module doc)."""
    if x.dtype == np.float32:
        _forward[float](y, mean, rstd, x, weight, bias, eps, stream)
    else:
        _forward[double](y, mean, rstd, x, weight, bias, eps, stream)


def scratch_size(Py_ssize_t n, Py_ssize_t d, bint need_w, bint need_b):
    """float64 elements of scratch `backward` needs for dweight/dbias partials."""
    return nf_nr_bwd_scratch(n, d, need_w, need_b)


def backward(dx, dweight, dbias, dy, x, weight, mean, rstd, scratch, bint stream):
    """dx, dweight, dbias <- LayerNorm backward; each output may be None (not computed).
    Arguments already validated; `scratch` holds at least scratch_size(...) float64 values (or
    is None when neither dweight nor dbias is wanted); `stream`: write dx with non-temporal
    stores."""
    if x.dtype == np.float32:
        _backward[float](dx, dweight, dbias, dy, x, weight, mean, rstd, scratch, stream)
    else:
        _backward[double](dx, dweight, dbias, dy, x, weight, mean, rstd, scratch, stream)


def max_threads():
    """The OpenMP thread count a large kernel call would use now (OMP_NUM_THREADS,
    threadpoolctl)."""
    return nf_max_threads()
