# Declarations of the BatchNorm family, kernels/bn_channels.h (the maths and contract are there).
#
# Table of contents
#   nf_bn_block_rows       rows per column block (a function of K and the itemsize only)
#   nf_bn_cols_chan        Chan merge of a block's column statistics
#   nf_bn_row_*            one channel's contiguous run (an (n, c, :) row of an (N, C, S) array)
#   nf_bn_cols_*           a block of rows of a row-major (M, K) matrix, one constant per column

from core cimport nf_index

cdef extern from "bn_channels.h" nogil:
    nf_index nf_bn_block_rows(nf_index K, size_t itemsize)
    void nf_bn_cols_chan(double *mean, double *m2, double na, const double *bm,
                         const double *bm2, double nb, nf_index K)

    void nf_bn_row_stats_f32(const float *x, nf_index n, double *mean, double *m2,
                             const float *pf)
    void nf_bn_row_stats_f64(const double *x, nf_index n, double *mean, double *m2,
                             const double *pf)
    void nf_bn_row_affine_f32(float *y, const float *x, nf_index n, float mh, float ml,
                              float a, float b, int stream)
    void nf_bn_row_affine_f64(double *y, const double *x, nf_index n, double mh, double ml,
                              double a, double b, int stream)
    void nf_bn_row_bwd_sums_f32(double *sdy, double *sdyx, const float *dy, const float *x,
                                nf_index n, float mh, float ml, const float *pf_dy,
                                const float *pf_x)
    void nf_bn_row_bwd_sums_f64(double *sdy, double *sdyx, const double *dy, const double *x,
                                nf_index n, double mh, double ml, const double *pf_dy,
                                const double *pf_x)
    void nf_bn_row_dx_f32(float *dx, const float *dy, const float *x, nf_index n, float mh,
                          float ml, float k1, float c2, float k2, int stream)
    void nf_bn_row_dx_f64(double *dx, const double *dy, const double *x, nf_index n, double mh,
                          double ml, double k1, double c2, double k2, int stream)

    void nf_bn_cols_stats_f32(double *bm, double *bm2, float *tmp, const float *x,
                              nf_index rows, nf_index K, const float *pf, size_t pfbytes)
    void nf_bn_cols_stats_f64(double *bm, double *bm2, double *tmp, const double *x,
                              nf_index rows, nf_index K, const double *pf, size_t pfbytes)
    void nf_bn_cols_affine_f32(float *y, const float *x, nf_index rows, nf_index K,
                               const float *mh, const float *a, const float *b)
    void nf_bn_cols_affine_f64(double *y, const double *x, nf_index rows, nf_index K,
                               const double *mh, const double *a, const double *b)
    void nf_bn_cols_bwd_sums_f32(double *sdy, double *sdyx, float *tmp, const float *dy,
                                 const float *x, nf_index rows, nf_index K, const float *mh,
                                 const float *ml)
    void nf_bn_cols_bwd_sums_f64(double *sdy, double *sdyx, double *tmp, const double *dy,
                                 const double *x, nf_index rows, nf_index K, const double *mh,
                                 const double *ml)
    void nf_bn_cols_dx_f32(float *dx, const float *dy, const float *x, nf_index rows,
                           nf_index K, const float *mh, const float *ml, const float *k1,
                           const float *c2, const float *k2)
    void nf_bn_cols_dx_f64(double *dx, const double *dy, const double *x, nf_index rows,
                           nf_index K, const double *mh, const double *ml, const double *k1,
                           const double *c2, const double *k2)
