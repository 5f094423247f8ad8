# Machine-limit probes for `python -m normffn bench`: the copy bandwidth the kernels are
# measured against.  Not an op; users never import it.
#
# parallel_copy splits the buffer into one contiguous chunk per OpenMP thread and lets glibc's
# memcpy move each (it picks non-temporal stores for large chunks), so it reports the best copy
# rate this process can reach with the threads the kernels use.  Contract: dst and src are
# C-contiguous, the same size, and do not overlap (checked by the caller).
from cython.parallel cimport parallel, prange
from libc.string cimport memcpy

from core cimport nf_threads_for


def parallel_copy(unsigned char[::1] dst, const unsigned char[::1] src):
    cdef Py_ssize_t n = src.shape[0], k, lo, hi
    cdef unsigned char *d = &dst[0]
    cdef const unsigned char *s = &src[0]
    cdef int nt = nf_threads_for(n, 1 << 20)
    cdef Py_ssize_t chunk = (n + nt - 1) // nt
    with nogil:
        for k in prange(nt, schedule='static', num_threads=nt):
            lo = k * chunk
            hi = lo + chunk
            if hi > n:
                hi = n
            if hi > lo:
                memcpy(d + lo, s + lo, hi - lo)


# ---------------------------------------------------------------- vmath.h test hooks
# tests/test_vmath.py checks the vectorised math against float64/mpmath references through these:
# each runs the NF_CLONES array form (the vector code the FFN uses) over a contiguous array.
cdef extern from "vmath.h" nogil:
    void nf_vexp_array_f32(float *y, const float *x, Py_ssize_t n)
    void nf_vexp_array_f64(double *y, const double *x, Py_ssize_t n)
    void nf_vphi_array(double *y, double *p, const double *x, Py_ssize_t n)
    void nf_vact_array_f32(float *y, float *d, const float *x, Py_ssize_t n, int act)
    void nf_vact_array_f64(double *y, double *d, const double *x, Py_ssize_t n, int act)


def vexp_f32(float[::1] y, const float[::1] x):
    """y = exp(x), float32 (vmath.h nf_vexp_f32)."""
    with nogil:
        nf_vexp_array_f32(&y[0], &x[0], x.shape[0])


def vexp_f64(double[::1] y, const double[::1] x):
    """y = exp(x), float64 (vmath.h nf_vexp_f64)."""
    with nogil:
        nf_vexp_array_f64(&y[0], &x[0], x.shape[0])


def vphi(double[::1] y, double[::1] p, const double[::1] x):
    """y = Phi(x), p = phi(x) (vmath.h nf_vphi_d; accurate for float-valued x)."""
    with nogil:
        nf_vphi_array(&y[0], &p[0], &x[0], x.shape[0])


def vact_f32(float[::1] y, float[::1] d, const float[::1] x, int act):
    """y = act(x), d = act'(x) for act 1 (gelu), 2 (gelu_tanh), 3 (silu), float32."""
    with nogil:
        nf_vact_array_f32(&y[0], &d[0], &x[0], x.shape[0], act)


def vact_f64(double[::1] y, double[::1] d, const double[::1] x, int act):
    """y = act(x), d = act'(x) for act 1 (gelu), 2 (gelu_tanh), 3 (silu), float64."""
    with nogil:
        nf_vact_array_f64(&y[0], &d[0], &x[0], x.shape[0], act)
