# Row-major GEMM over a Fortran BLAS — scipy's (scipy.linalg.cython_blas), as scikit-learn's
# sklearn/utils/_cython_blas.pyx calls it, or another a front end registers (ffn.pyx's slots).
#
# Table of contents
#   Blas          the four BLAS routines a kernel calls, as function pointers with the Fortran
#                 (LP64) interface; scipy_blas() fills one with scipy's.  A caller may pass
#                 another BLAS of the same interface (normffn.torch passes the one PyTorch
#                 itself multiplies with: one BLAS and one thread pool per process)
#   gemm          C (m, n) = alpha op(A) op(B) + beta C, all row-major: swaps the operands and
#                 calls the column-major sgemm/dgemm (C^T = op(B)^T op(A)^T), no copy; a
#                 single row (m == 1) is a matrix-vector product: sgemv/dgemv
#   blas_layout   how BLAS should read a 2-D memoryview: 'N' (rows contiguous) or 'T' (columns
#                 contiguous), and its leading dimension, read from the strides
#   flip          'N' <-> 'T' (to use the transpose of a matrix described by blas_layout)
#
# Both are LP64: sizes and leading dimensions are C ints.  The Python layer rejects (or copies)
# anything that would not fit; nothing here re-checks.
from cython cimport floating
from scipy.linalg.cython_blas cimport dgemm, dgemv, sgemm, sgemv

ctypedef void (*sgemm_t)(char *ta, char *tb, int *m, int *n, int *k, float *alpha, float *a,
                         int *lda, float *b, int *ldb, float *beta, float *c,
                         int *ldc) noexcept nogil
ctypedef void (*dgemm_t)(char *ta, char *tb, int *m, int *n, int *k, double *alpha, double *a,
                         int *lda, double *b, int *ldb, double *beta, double *c,
                         int *ldc) noexcept nogil
ctypedef void (*sgemv_t)(char *trans, int *m, int *n, float *alpha, float *a, int *lda,
                         float *x, int *incx, float *beta, float *y, int *incy) noexcept nogil
ctypedef void (*dgemv_t)(char *trans, int *m, int *n, double *alpha, double *a, int *lda,
                         double *x, int *incx, double *beta, double *y, int *incy) noexcept nogil

ctypedef struct Blas:
    sgemm_t sgemm
    dgemm_t dgemm
    sgemv_t sgemv
    dgemv_t dgemv


cdef inline Blas scipy_blas() noexcept nogil:
    cdef Blas b
    b.sgemm = sgemm
    b.dgemm = dgemm
    b.sgemv = sgemv
    b.dgemv = dgemv
    return b


cdef inline void gemm(const Blas *blas, char ta, char tb, int m, int n, int k,
                      floating alpha, const floating *A, int lda,
                      const floating *B, int ldb,
                      floating beta, floating *C, int ldc) noexcept nogil:
    """Row-major C[m, n] = alpha * op(A)[m, k] @ op(B)[k, n] + beta * C (op: c'N' or c'T').

    A row-major matrix is its column-major transpose, so this is the column-major
    C^T = op(B)^T op(A)^T: B goes first.  (The casts drop const: scipy's pxd has none.)

    One row (m == 1: a one-token FFN call, its backward's dx and dhidden) goes to gemv: a GEMM
    packs all of op(B) into its own layout before multiplying, which for one row costs more than
    the product itself (OpenBLAS, 768 x 3072 float32: ~1.3 ms against ~0.15 ms)."""
    cdef char tv
    cdef int rows, cols, incx, one = 1
    if m == 1:
        # C[0, :] = alpha op(B)^T x + beta C[0, :], x = op(A)[0, :] (stride 1, or lda for 'T').
        # Column-major, B's storage is op(B)^T for tb = 'N' (n x k) and op(B) for 'T' (k x n).
        tv = c'N' if tb == c'N' else c'T'
        rows = n if tb == c'N' else k
        cols = k if tb == c'N' else n
        incx = 1 if ta == c'N' else lda
        if floating is float:
            blas.sgemv(&tv, &rows, &cols, &alpha, <float *> B, &ldb, <float *> A, &incx,
                       &beta, C, &one)
        else:
            blas.dgemv(&tv, &rows, &cols, &alpha, <double *> B, &ldb, <double *> A, &incx,
                       &beta, C, &one)
        return
    if floating is float:
        blas.sgemm(&tb, &ta, &n, &m, &k, &alpha, <float *> B, &ldb, <float *> A, &lda,
                   &beta, C, &ldc)
    else:
        blas.dgemm(&tb, &ta, &n, &m, &k, &alpha, <double *> B, &ldb, <double *> A, &lda,
                   &beta, C, &ldc)


cdef inline char blas_layout(const floating[:, :] a, int *ld) noexcept nogil:
    """c'N' if a's rows are contiguous (row-major; ld = row stride), c'T' if its columns are
    (a is then the row-major transpose of a C-contiguous matrix, e.g. torch's weight.T;
    ld = column stride).  Size-1 axes carry arbitrary strides in NumPy: ld is then the smallest
    BLAS accepts.  The Python layer (_checks.blas_matrix) guarantees one case applies."""
    cdef Py_ssize_t rows = a.shape[0], cols = a.shape[1], sz = sizeof(floating)
    if cols == 1 or a.strides[1] == sz:
        ld[0] = <int> (a.strides[0] // sz if rows > 1 else cols)
        if ld[0] < cols:
            ld[0] = <int> cols
        return c'N'
    ld[0] = <int> (a.strides[1] // sz if cols > 1 else rows)
    if ld[0] < rows:
        ld[0] = <int> rows
    return c'T'


cdef inline char flip(char t) noexcept nogil:
    return c'T' if t == c'N' else c'N'
