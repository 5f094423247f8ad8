# LayerNorm kernels: normalise each row of a (n, d) matrix.
#
# Contract (normffn/layer_norm.py's check layer guarantees it; arrays.pxd re-checks only dtype,
# contiguity and element counts, for a few nanoseconds):
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
cimport numpy as cnp
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from arrays cimport (data_in, data_out, float_type, matrix_shape, opt_in, opt_out,
                     work_out)
from core cimport nf_index, nf_max_threads, nf_set_max_threads
from norm_rows cimport (nf_nr_ahead, nf_nr_bwd_args, nf_nr_bwd_scratch, nf_nr_fwd_args,
                        nf_nr_threads, nr_backward, nr_forward)

cnp.import_array()


# ---------------------------------------------------------------- forward
# mean[i] = sum_j x[i, j] / d
# rstd[i] = 1 / sqrt(sum_j (x[i, j] - mean[i])^2 / d + eps)            (biased variance)
# y[i, j] = (x[i, j] - mean[i]) * rstd[i] * weight[j] + bias[j]
# Buffers: y, x (n, d) of one float dtype; mean, rstd (n,) float64, or both None (not kept:
# scratch); weight, bias (d,) or None.
def forward(y, mean, rstd, x, weight, bias, double eps, bint stream):
    """y, mean, rstd <- LayerNorm(x) over rows; `stream`: write y with non-temporal stores.
    Arguments already validated (see module doc)."""
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
    a.b = opt_in(bias, t, a.d, "bias")
    if mean is None and rstd is None:    # statistics not kept: scratch
        stats = <double *>malloc(2 * a.n * sizeof(double))
        if stats == NULL:
            raise MemoryError()
        a.mean = stats
        a.rstd = stats + a.n
    else:
        a.mean = <double *>data_out(mean, cnp.NPY_FLOAT64, a.n, "mean")
        a.rstd = <double *>data_out(rstd, cnp.NPY_FLOAT64, a.n, "rstd")
    a.f64 = t == cnp.NPY_FLOAT64
    a.ahead = nf_nr_ahead(a.d, 8 if a.f64 else 4)
    a.eps = eps
    a.stream = stream
    with nogil:
        nr_forward(&a, nf_nr_threads(a.n * a.d))
    free(stats)


# ---------------------------------------------------------------- backward
# xhat = (x - mean) * rstd,   g = dy * weight   (g = dy without weight)
# c1 = mean_j(g * xhat),      c2 = mean_j(g)
# dx = rstd * (g - xhat * c1 - c2)
# dweight = sum_i dy * xhat,  dbias = sum_i dy
# Buffers: dx, dy, x (n, d); dweight, dbias, weight (d,); mean, rstd (n,) float64; each output
# optional (None: not computed; with dx None only the parameter sums run).
# Rows are cut into fixed blocks (norm_rows.h: nf_nr_bwd_plan); block k accumulates its
# dweight/dbias partial in scratch[k] (float64) group by group (NF_G rows at a time); the
# partials are then added in block order, columns split over threads.
def scratch_size(Py_ssize_t n, Py_ssize_t d, bint need_w, bint need_b):
    """float64 elements of scratch `backward` needs for dweight/dbias partials."""
    return nf_nr_bwd_scratch(n, d, need_w, need_b)


def backward(dx, dweight, dbias, dy, x, weight, mean, rstd, scratch, bint stream):
    """dx, dweight, dbias <- LayerNorm backward; each output may be None (not computed).
    Arguments already validated; `scratch` holds at least scratch_size(...) float64 values (or
    is None when neither dweight nor dbias is wanted); `stream`: write dx with non-temporal
    stores."""
    cdef nf_nr_bwd_args a
    cdef int t = float_type(x)
    if dx is None and dweight is None and dbias is None:
        return
    memset(&a, 0, sizeof(a))
    matrix_shape(x, &a.n, &a.d)
    if dweight is not None or dbias is not None:
        a.work = work_out(scratch, nf_nr_bwd_scratch(a.n, a.d, dweight is not None,
                                                     dbias is not None), "scratch")
    a.dx = opt_out(dx, t, a.n * a.d, "dx")
    a.dw = opt_out(dweight, t, a.d, "dweight")
    a.db = opt_out(dbias, t, a.d, "dbias")
    a.dy = data_in(dy, t, a.n * a.d, "dy")
    a.x = data_in(x, t, a.n * a.d, "x")
    a.w = opt_in(weight, t, a.d, "weight")
    a.mean = <const double *>data_in(mean, cnp.NPY_FLOAT64, a.n, "mean")
    a.rstd = <const double *>data_in(rstd, cnp.NPY_FLOAT64, a.n, "rstd")
    a.stream = stream
    a.f64 = t == cnp.NPY_FLOAT64
    with nogil:
        nr_backward(&a)


def max_threads():
    """The OpenMP thread count a large kernel call would use now (OMP_NUM_THREADS,
    threadpoolctl)."""
    return nf_max_threads()


def set_max_threads(int n):
    """Set the calling thread's OpenMP thread count for later kernel calls (other threads keep
    theirs); returns the previous one.  n < 1 counts as 1."""
    cdef int before = nf_max_threads()
    nf_set_max_threads(n if n >= 1 else 1)
    return before
