# Raw data pointers of the ndarrays a kernel entry point receives.
#
# Typed memoryviews cost ~0.2 us per argument to acquire and release; a small LayerNorm call
# has six of them, more than its arithmetic (docs/architecture.md "Small calls").  The check
# layer has already validated every argument, so the entry points take plain ndarrays and read
# their data pointers here, behind one last guard that costs a few nanoseconds: the exact dtype,
# C-contiguity, the element count and, for outputs, writeability.  A caller inside the package
# that broke the contract gets a ValueError, never a read out of bounds.
#
# Table of contents
#   data_in / data_out        pointer to a validated input / output array
#   opt_in / opt_out          the same for an optional array (None -> NULL)
#   work_out                  pointer to float64 scratch of at least a given size
#   float_type                NPY_FLOAT32 or NPY_FLOAT64 for x's dtype (anything else raises)
#   matrix_shape              (n, d) of a 2-D x (call float_type(x) first)
#
# Modules that cimport this call `cnp.import_array()` once at import.
cimport numpy as cnp

from core cimport nf_index


cdef inline int _guard(object a, int typenum, Py_ssize_t size, bint out, str name,
                       bint at_least=False) except -1:
    if not cnp.PyArray_Check(a):
        raise ValueError(f"kernel argument {name}: expected an ndarray, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef Py_ssize_t have = cnp.PyArray_SIZE(arr)
    if (cnp.PyArray_TYPE(arr) != typenum or not cnp.PyArray_IS_C_CONTIGUOUS(arr)
            or (have < size if at_least else have != size)
            or (out and not cnp.PyArray_ISWRITEABLE(arr))):
        raise ValueError(f"kernel argument {name}: expected a C-contiguous"
                         f"{' writeable' if out else ''} array of {size} elements of type "
                         f"{typenum}, got {a.dtype} {a.shape} (the check layer let it by)")
    return 0


cdef inline const void *data_in(object a, int typenum, Py_ssize_t size, str name) except NULL:
    _guard(a, typenum, size, False, name)
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline void *data_out(object a, int typenum, Py_ssize_t size, str name) except NULL:
    _guard(a, typenum, size, True, name)
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline const void *opt_in(object a, int typenum, Py_ssize_t size, str name) except? NULL:
    if a is None:
        return NULL
    return data_in(a, typenum, size, name)


cdef inline double *work_out(object a, Py_ssize_t at_least, str name) except NULL:
    _guard(a, cnp.NPY_FLOAT64, at_least, True, name, True)
    return <double *>cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline void *opt_out(object a, int typenum, Py_ssize_t size, str name) except? NULL:
    if a is None:
        return NULL
    return data_out(a, typenum, size, name)


cdef inline int float_type(object x) except -1:
    if not cnp.PyArray_Check(x):
        raise ValueError(f"kernel argument x: expected an ndarray, got {type(x).__name__}")
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>x)
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
        raise ValueError(f"kernel argument x: expected float32 or float64, got "
                         f"{x.dtype}")
    return t


cdef inline int matrix_shape(object x, nf_index *n, nf_index *d) except -1:
    if cnp.PyArray_NDIM(<cnp.ndarray>x) != 2:
        raise ValueError(f"kernel argument x: expected a 2-D array, got shape {x.shape}")
    n[0] = cnp.PyArray_DIM(<cnp.ndarray>x, 0)
    d[0] = cnp.PyArray_DIM(<cnp.ndarray>x, 1)
    return 0
