# Declarations of the row-norm bodies (norm_rows.h; contract and maths there).
#
# Table of contents
#   NF_G                 rows per backward group
#   nf_ln_fwd_row_*      LayerNorm forward, one row: mean, rstd, y
#   nf_ln_bwd_rows_*     LayerNorm backward, 1..NF_G rows: dx and (each optional) the rows'
#                        float64 dweight/dbias partials
#   nf_ln_bwd_rows_nodw_* the same for a weight whose dweight is not wanted
#   nf_ln_bwd_sums_*     the dweight/dbias partials alone (no dx wanted), bitwise as above

from core cimport nf_index

cdef extern from "norm_rows.h" nogil:
    int NF_G
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
    void nf_ln_bwd_sums_f32(double *dw_acc, double *db_acc, const float *dy, const float *x,
                            const double *mean, const double *rstd, nf_index g, nf_index n,
                            const float *next_dy, const float *next_x, nf_index next_g)
    void nf_ln_bwd_sums_f64(double *dw_acc, double *db_acc, const double *dy, const double *x,
                            const double *mean, const double *rstd, nf_index g, nf_index n,
                            const double *next_dy, const double *next_x, nf_index next_g)
    void nf_ln_bwd_rows_nodw_f32(float *dx, double *db_acc, const float *dy, const float *x,
                                 const float *w, const double *mean, const double *rstd,
                                 nf_index g, nf_index n, int stream, const float *next_dy,
                                 const float *next_x, nf_index next_g)
    void nf_ln_bwd_rows_nodw_f64(double *dx, double *db_acc, const double *dy, const double *x,
                                 const double *w, const double *mean, const double *rstd,
                                 nf_index g, nf_index n, int stream, const double *next_dy,
                                 const double *next_x, nf_index next_g)
