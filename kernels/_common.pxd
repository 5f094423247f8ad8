# Shared declarations for the kernels: the row helpers of rows.h and the thread policy.
#
# Table of contents
#   nf_ln_*           LayerNorm row helpers: forward per row, backward per group of NF_G rows
#   nf_stream_*       non-temporal output stores for outputs >= the last-level cache (rows.h)
#   nf_reduce_blocks  fixed-order sum of float64 block partials (rows.h)
#   n_threads_for     how many OpenMP threads a kernel may use for `work` units

cdef extern from "rows.h" nogil:
    ctypedef Py_ssize_t nf_index
    int nf_omp_max_threads()
    size_t nf_stream_bytes()
    void nf_set_stream_bytes(size_t v)
    int NF_G
    void nf_stream_fence()
    void nf_reduce_blocks(double *work, nf_index nb, nf_index width, nf_index j0, nf_index j1)
    void nf_ln_fwd_row_f32(float *y, double *mean, double *rstd, const float *x,
                           const float *w, const float *b, nf_index n, double eps, int stream,
                           const float *next_x)
    void nf_ln_fwd_row_f64(double *y, double *mean, double *rstd, const double *x,
                           const double *w, const double *b, nf_index n, double eps, int stream,
                           const double *next_x)
    void nf_ln_bwd_rows_f32(float *dx, double *dw_acc, double *db_acc, const float *dy,
                            const float *x, const float *w, const double *mean, const double *rstd,
                            nf_index g, nf_index n, int stream, const float *next_dy,
                            const float *next_x, nf_index next_g)
    void nf_ln_bwd_rows_f64(double *dx, double *dw_acc, double *db_acc, const double *dy,
                            const double *x, const double *w, const double *mean,
                            const double *rstd, nf_index g, nf_index n, int stream,
                            const double *next_dy, const double *next_x, nf_index next_g)


cdef inline int n_threads_for(Py_ssize_t work, Py_ssize_t min_work_per_thread) noexcept nogil:
    """OpenMP threads for `work` units: honours OMP_NUM_THREADS and threadpoolctl (both set
    omp_get_max_threads), and gives each thread at least `min_work_per_thread` units so small
    problems do not pay the fork/join.  Results never depend on this number: every reduction is
    split into fixed blocks combined in a fixed order."""
    cdef int n = nf_omp_max_threads()
    cdef Py_ssize_t cap = work // min_work_per_thread if min_work_per_thread > 0 else work
    if cap < 1:
        cap = 1
    if n > cap:
        n = <int>cap
    return n if n >= 1 else 1
