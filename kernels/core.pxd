# Declarations of the C core (core.h): what every kernel family shares.
#
# Table of contents
#   nf_index                 signed size type
#   nf_threads_for           OpenMP threads for an amount of work (the thread plan)
#   nf_max_threads           what a large call would use now (OMP_NUM_THREADS, threadpoolctl)
#   nf_set_max_threads       set that for the calling thread (omp_set_num_threads)
#   nf_stream_fence          after non-temporal stores, before anyone reads the output
#   nf_chan                  Chan/Welford merge of (count, mean, M2)
#   nf_reduce_blocks         fixed-order sum of float64 block partials
#   nf_split                 double -> hi + lo floats
#   nf_mean_split_f32/_f64   the float64 mean as the (hi, lo) pair values are centred with

cdef extern from "core.h" nogil:
    ctypedef Py_ssize_t nf_index
    int nf_threads_for(nf_index work, nf_index min_per_thread)
    int nf_max_threads()
    void nf_set_max_threads(int n)
    void nf_stream_fence()
    void nf_chan(double *n, double *mean, double *m2, double nb, double mb, double m2b)
    void nf_reduce_blocks(double *work, nf_index nb, nf_index width, nf_index j0, nf_index j1)
    void nf_split(double v, float *hi, float *lo)
    void nf_mean_split_f32(double mean, float *hi, float *lo)
    void nf_mean_split_f64(double mean, double *hi, double *lo)
