# LayerNorm kernels: normalise each row of a (n, d) matrix.
#
# Contract (normffn/layer_norm.py's check layer guarantees it; nothing here re-checks):
#   * x, y, dy, dx are C-contiguous (n, d) of one float dtype, n >= 1, d >= 1, no output overlaps
#     an input; weight/bias are contiguous (d,) or None; mean/rstd are contiguous (n,) float64.
#   * `stream` (non-temporal output stores) is decided by the caller (normffn._tuning).
#   * The GIL is released once per call; all loops run without bounds checks.
# Layers: the row bodies are plain C in norm_rows.h (on core.h); this file owns the loops over
# rows and row blocks, the thread plan and the deterministic reduction of dweight/dbias.
# Threads: rows are split statically over OpenMP threads (each row is independent in forward and
# in dx).  dweight/dbias are reduced deterministically: rows are cut into a fixed number of
# blocks that depends only on (n, d) — never on the thread count — each block accumulates its
# partial sums in float64, and the partials are added in block order.  So 1 and N threads give
# bitwise-identical results.
import numpy as np

from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.string cimport memset

from core cimport nf_max_threads, nf_stream_fence, nf_reduce_blocks, nf_threads_for
from norm_rows cimport (NF_G, nf_ln_bwd_rows_f32, nf_ln_bwd_rows_f64, nf_ln_bwd_rows_nodw_f32,
                        nf_ln_bwd_rows_nodw_f64, nf_ln_bwd_sums_f32, nf_ln_bwd_sums_f64,
                        nf_ln_fwd_row_f32, nf_ln_fwd_row_f64)

# ---------------------------------------------------------------- tuning (docs/tuning.md)
# Fewer elements per thread than this and the fork/join costs more than it saves (no
# measurement recorded: re-measure before changing).
cdef Py_ssize_t MIN_ELEMS_PER_THREAD = 32768
# dweight/dbias partial blocks: SCRATCH_BUDGET // d, clamped to [MIN_BLOCKS, MAX_BLOCKS] (a
# scratch-size bound, not a timing; changing any of these changes dweight/dbias bits).
cdef Py_ssize_t SCRATCH_BUDGET = 1 << 16
cdef Py_ssize_t MIN_BLOCKS = 8
cdef Py_ssize_t MAX_BLOCKS = 64
# Forward prefetch distance PF_BYTES (>= 2 rows, <= PF_MAX_ROWS): 8192x768 f32, 2 threads.
cdef Py_ssize_t PF_BYTES = 8192
cdef Py_ssize_t PF_MAX_ROWS = 16
# Backward prefetch distance in NF_G-row groups: 8192x768 and 2048x4096 f32, 2 threads.
cdef Py_ssize_t BWD_PF_GROUPS = 5
# Columns per task when the partials are combined (not timed: a cache-friendly chunk).
cdef Py_ssize_t REDUCE_CHUNK = 512


cdef Py_ssize_t n_row_blocks(Py_ssize_t n, Py_ssize_t d) noexcept nogil:
    """Number of dweight/dbias partial blocks: a function of (n, d) only."""
    cdef Py_ssize_t nb = SCRATCH_BUDGET // d
    if nb > MAX_BLOCKS:
        nb = MAX_BLOCKS
    if nb < MIN_BLOCKS:
        nb = MIN_BLOCKS
    if nb > n:
        nb = n
    return nb


cdef Py_ssize_t block_rows(Py_ssize_t n, Py_ssize_t nb) noexcept nogil:
    """Rows per block: n/nb rounded up to a whole number of NF_G-row groups."""
    cdef Py_ssize_t r = (n + nb - 1) // nb
    return ((r + NF_G - 1) // NF_G) * NF_G


# ---------------------------------------------------------------- forward
# mean[i] = sum_j x[i, j] / d
# rstd[i] = 1 / sqrt(sum_j (x[i, j] - mean[i])^2 / d + eps)            (biased variance)
# y[i, j] = (x[i, j] - mean[i]) * rstd[i] * weight[j] + bias[j]
cdef int _forward(floating[:, ::1] y, double[::1] mean, double[::1] rstd,         # OUT
                  const floating[:, ::1] x,                                         # IN
                  const floating[::1] weight, const floating[::1] bias,             # IN or None
                  double eps, int stream) except -1:
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1], i, nxt
    cdef const floating *w = NULL
    cdef const floating *b = NULL
    cdef floating *yp = &y[0, 0]
    cdef double *mp = &mean[0]
    cdef double *rp = &rstd[0]
    cdef const floating *xp = &x[0, 0]
    if weight is not None:
        w = &weight[0]
    if bias is not None:
        b = &bias[0]
    cdef int nt = nf_threads_for(n * d, MIN_ELEMS_PER_THREAD)
    cdef Py_ssize_t ahead = PF_BYTES // (d * <Py_ssize_t>sizeof(floating))
    if ahead < 2:
        ahead = 2
    if ahead > PF_MAX_ROWS:
        ahead = PF_MAX_ROWS
    with nogil, parallel(num_threads=nt):
        for i in prange(n, schedule='static'):
            nxt = i + ahead if i + ahead < n else n - 1   # prefetched while row i is in L1
            if floating is float:
                nf_ln_fwd_row_f32(yp + i * d, mp + i, rp + i, xp + i * d, w, b, d, eps, stream,
                                  xp + nxt * d)
            else:
                nf_ln_fwd_row_f64(yp + i * d, mp + i, rp + i, xp + i * d, w, b, d, eps, stream,
                                  xp + nxt * d)
        if stream:
            nf_stream_fence()
    return 0


# ---------------------------------------------------------------- backward
# xhat = (x - mean) * rstd,   g = dy * weight   (g = dy without weight)
# c1 = mean_j(g * xhat),      c2 = mean_j(g)
# dx = rstd * (g - xhat * c1 - c2)
# dweight = sum_i dy * xhat,  dbias = sum_i dy
# Each output is optional (None: not computed; with dx None only the parameter sums run).
# Rows are cut into nb fixed blocks; block k accumulates its dweight/dbias partial in
# scratch[k] (float64) group by group (NF_G rows at a time); the partials are then added in
# block order, columns split over threads.
cdef int _backward(floating[:, ::1] dx,                                            # OUT or None
                   floating[::1] dweight, floating[::1] dbias,                       # OUT or None
                   const floating[:, ::1] dy, const floating[:, ::1] x,              # IN
                   const floating[::1] weight,                                       # IN or None
                   const double[::1] mean, const double[::1] rstd,                   # IN
                   double[::1] scratch, int stream) except -1:                       # WORK
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1]
    cdef Py_ssize_t i, j, g, gn, pf, blk, r0, r1, nb, rows_per_block, c, nc, j0, j1
    cdef const floating *w = NULL
    cdef floating *dxp = NULL
    cdef const floating *dyp = &dy[0, 0]
    cdef const floating *xp = &x[0, 0]
    cdef const double *mp = &mean[0]
    cdef const double *rp = &rstd[0]
    cdef floating *dwp = NULL
    cdef floating *dbp = NULL
    cdef double *work = NULL
    cdef double *acc_w
    cdef double *acc_b
    cdef bint need_w = dweight is not None, need_b = dbias is not None
    cdef Py_ssize_t width = (<Py_ssize_t>need_w + <Py_ssize_t>need_b) * d
    if dx is None and width == 0:
        return 0
    if dx is not None:
        dxp = &dx[0, 0]
    if weight is not None:
        w = &weight[0]
    if need_w:
        dwp = &dweight[0]
    if need_b:
        dbp = &dbias[0]

    nb = n_row_blocks(n, d)
    rows_per_block = block_rows(n, nb)
    nb = (n + rows_per_block - 1) // rows_per_block
    if width > 0:
        if scratch is None or scratch.shape[0] < nb * width:
            raise ValueError("layer_norm backward: scratch too small (see scratch_size)")
        work = &scratch[0]
    cdef int nt = nf_threads_for(n * d, MIN_ELEMS_PER_THREAD)
    with nogil, parallel(num_threads=nt):
        for blk in prange(nb, schedule='static'):
            acc_w = NULL
            acc_b = NULL
            if need_w:
                acc_w = work + blk * width
            if need_b:
                acc_b = work + blk * width + (d if need_w else 0)
            if width > 0:
                memset(work + blk * width, 0, width * sizeof(double))
            r0 = blk * rows_per_block
            r1 = r0 + rows_per_block
            if r1 > n:
                r1 = n
            i = r0
            while i < r1:
                g = r1 - i
                if g > NF_G:
                    g = NF_G
                pf = i + g + (BWD_PF_GROUPS - 1) * NF_G   # rows prefetched meanwhile
                gn = n - pf
                if gn > NF_G:
                    gn = NF_G
                if gn < 0:
                    gn = 0
                    pf = i
                if dxp == NULL:
                    if floating is float:
                        nf_ln_bwd_sums_f32(acc_w, acc_b, dyp + i * d, xp + i * d, mp + i, rp + i,
                                           g, d, dyp + pf * d, xp + pf * d, gn)
                    else:
                        nf_ln_bwd_sums_f64(acc_w, acc_b, dyp + i * d, xp + i * d, mp + i, rp + i,
                                           g, d, dyp + pf * d, xp + pf * d, gn)
                elif w != NULL and not need_w:
                    if floating is float:
                        nf_ln_bwd_rows_nodw_f32(dxp + i * d, acc_b, dyp + i * d, xp + i * d, w,
                                                mp + i, rp + i, g, d, stream,
                                                dyp + pf * d, xp + pf * d, gn)
                    else:
                        nf_ln_bwd_rows_nodw_f64(dxp + i * d, acc_b, dyp + i * d, xp + i * d, w,
                                                mp + i, rp + i, g, d, stream,
                                                dyp + pf * d, xp + pf * d, gn)
                elif floating is float:
                    nf_ln_bwd_rows_f32(dxp + i * d, acc_w, acc_b, dyp + i * d, xp + i * d, w,
                                       mp + i, rp + i, g, d, stream,
                                       dyp + pf * d, xp + pf * d, gn)
                else:
                    nf_ln_bwd_rows_f64(dxp + i * d, acc_w, acc_b, dyp + i * d, xp + i * d, w,
                                       mp + i, rp + i, g, d, stream,
                                       dyp + pf * d, xp + pf * d, gn)
                i = i + g
        if stream:
            nf_stream_fence()
    if width > 0:
        # Combine the block partials in block order: columns are split into fixed chunks, each
        # chunk summed over blocks 0..nb-1 in order into block 0, then cast.
        nc = (width + REDUCE_CHUNK - 1) // REDUCE_CHUNK
        with nogil:
            for c in prange(nc, schedule='static',
                            num_threads=nf_threads_for(nb * width, MIN_ELEMS_PER_THREAD)):
                j0 = c * REDUCE_CHUNK
                j1 = j0 + REDUCE_CHUNK
                if j1 > width:
                    j1 = width
                nf_reduce_blocks(work, nb, width, j0, j1)
                for j in range(j0, j1):
                    if need_w and j < d:
                        dwp[j] = <floating> work[j]
                    elif need_w:
                        dbp[j - d] = <floating> work[j]
                    else:
                        dbp[j] = <floating> work[j]
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
    cdef Py_ssize_t nb, rpb
    if n < 1 or d < 1:
        return 0
    nb = n_row_blocks(n, d)
    rpb = block_rows(n, nb)
    nb = (n + rpb - 1) // rpb
    return nb * (<Py_ssize_t>need_w + <Py_ssize_t>need_b) * d


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
