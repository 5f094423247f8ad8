# Declarations of ffn_elementwise.h: the FFN's elementwise work between its GEMMs.
#
# Table of contents (each name exists as _f32 for float and _f64 for double)
#   NF_ACT_*             activation codes; a gated code is its gate's code | NF_ACT_GATED
#   nf_ffn_fwd           v = z + b1, a = act(v) (in place, or v kept and a written apart);
#                        dead-unit flags
#   nf_ffn_bwd           dH = dA * act'(v) (relu: dA where a is not <= 0), a = act(v) where
#                        asked, db1 column sums
#   nf_ffn_activate      a = act(z + b1) alone (backward with no gradient through the hidden)
#   nf_fill_rows         y[i, :] = b2 (the second GEMM accumulates onto it)
#   nf_add_rows          y[i, :] = r[i, :] + b2 (a residual the second GEMM accumulates onto)
#   nf_colsum            acc[j] += sum_i x[i, j], rows in order, float64
#   nf_round_sums        out[j] = acc[j] rounded to the dtype (finished db1, db2)
# The activation passes take a column range: w columns from the pointers given (w = h: the whole
# block), h locating a gated row's up half; ffn.pyx splits a block's columns over threads.
from core cimport nf_index

cdef extern from "ffn_elementwise.h" nogil:
    int NF_ACT_RELU, NF_ACT_GELU, NF_ACT_GELU_TANH, NF_ACT_SILU
    int NF_ACT_GATED, NF_ACT_REGLU, NF_ACT_GEGLU, NF_ACT_SWIGLU

    void nf_ffn_fwd_f32(float *z, nf_index ldz, float *a, nf_index lda, const float *b1,
                        unsigned char *dead, nf_index m, nf_index w, nf_index h, int act)
    void nf_ffn_fwd_f64(double *z, nf_index ldz, double *a, nf_index lda, const double *b1,
                        unsigned char *dead, nf_index m, nf_index w, nf_index h, int act)
    void nf_ffn_bwd_f32(float *g, nf_index ldg, float *z, nf_index ldz, const float *b1,
                        float *a_out, nf_index lda, double *db1_acc, nf_index m, nf_index w,
                        nf_index h, int act)
    void nf_ffn_bwd_f64(double *g, nf_index ldg, double *z, nf_index ldz, const double *b1,
                        double *a_out, nf_index lda, double *db1_acc, nf_index m, nf_index w,
                        nf_index h, int act)
    void nf_ffn_activate_f32(float *a, nf_index lda, const float *z, nf_index ldz,
                             const float *b1, nf_index m, nf_index w, nf_index h, int act)
    void nf_ffn_activate_f64(double *a, nf_index lda, const double *z, nf_index ldz,
                             const double *b1, nf_index m, nf_index w, nf_index h, int act)
    void nf_fill_rows_f32(float *y, nf_index ldy, const float *b, nf_index m, nf_index w)
    void nf_fill_rows_f64(double *y, nf_index ldy, const double *b, nf_index m, nf_index w)
    void nf_add_rows_f32(float *y, nf_index ldy, const float *r, nf_index ldr, const float *b,
                         nf_index m, nf_index w)
    void nf_add_rows_f64(double *y, nf_index ldy, const double *r, nf_index ldr,
                         const double *b, nf_index m, nf_index w)
    void nf_colsum_f32(double *acc, const float *x, nf_index ldx, nf_index m, nf_index w)
    void nf_colsum_f64(double *acc, const double *x, nf_index ldx, nf_index m, nf_index w)
    void nf_round_sums_f32(float *out, const double *acc, nf_index w)
    void nf_round_sums_f64(double *out, const double *acc, nf_index w)
