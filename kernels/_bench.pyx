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
