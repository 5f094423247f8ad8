"""Argument validation shared by every op.

The Cython kernels run without bounds checks and without the GIL: they trust their arguments.
This module is why they may.  Every public entry point passes its arguments through these
helpers before touching a kernel, and every failure is a ``TypeError`` (wrong kind of thing) or
``ValueError`` (right kind, wrong value) whose message names the argument and what was expected.
"""
from __future__ import annotations

import math
import numbers
import operator

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
F32, F64 = FLOAT_DTYPES
_ndarray = np.ndarray
_INF = math.inf
# np.may_share_memory without the __array_function__ dispatch (its arguments here are always
# ndarrays, for which the two are the same function): half the cost of a small call's check.
_may_share_memory = getattr(np.may_share_memory, "_implementation", np.may_share_memory)

# Kernels index with Py_ssize_t, but BLAS (cython_blas, LP64) takes 32-bit ints: sizes that feed
# a GEMM must stay below this.
INT32_MAX = 2**31 - 1

_EPS32 = float(np.finfo(np.float32).eps)
_EPS64 = float(np.finfo(np.float64).eps)


def float_array(a, name: str) -> np.ndarray:
    """Return ``a`` as an ndarray of dtype float32 or float64 (no copy if it already is one).

    Array-likes (lists, CPU tensors with ``__array__``) are converted; integer, bool, float16,
    complex, object and structured data are a ``TypeError``.
    """
    if type(a) is _ndarray:
        dt = a.dtype
        if (dt is F32 or dt is F64) and a.flags.aligned:
            return a
    if a is None:
        raise TypeError(f"{name} must be a float32 or float64 array, got None")
    if not isinstance(a, np.ndarray):
        try:
            a = np.asarray(a)
        except Exception as exc:  # noqa: BLE001 - report any conversion failure the same way
            raise TypeError(f"{name} must be a float32 or float64 array, got "
                            f"{type(a).__name__} ({exc})") from None
    dt = a.dtype
    if dt.kind != "f" or dt.itemsize not in (4, 8) or dt.fields is not None:
        raise TypeError(f"{name} must have dtype float32 or float64, got {dt}")
    if not dt.isnative or not a.flags.aligned:
        # kernels load whole elements: native byte order and element-aligned data (one copy)
        a = a.astype(dt.newbyteorder("="))
    return a


def same_dtype(dtype: np.dtype, name: str, a: np.ndarray) -> None:
    if a.dtype is not dtype and a.dtype != dtype:
        raise TypeError(f"{name} has dtype {a.dtype}, expected {dtype} (the dtype of x); "
                        "mixing dtypes is not supported")


def optional_param(a, name: str, shape: tuple, dtype: np.dtype) -> np.ndarray | None:
    """A per-feature parameter (weight, bias, running stats...): None, or an array of ``shape``
    and ``dtype``, returned C-contiguous (copied only if it is not)."""
    if a is None:
        return None
    if type(a) is _ndarray and a.dtype is dtype and a.shape == shape:
        f = a.flags
        if f.c_contiguous and f.aligned:
            return a
    a = float_array(a, name)
    same_dtype(dtype, name, a)
    if a.shape != tuple(shape):
        raise ValueError(f"{name} has shape {a.shape}, expected {tuple(shape)}")
    return np.ascontiguousarray(a)


def finite_float(value, name: str, *, low: float | None = None, low_inclusive: bool = True,
                 high: float | None = None) -> float:
    """A real scalar, finite, within [low, high] (or (low, high] if not low_inclusive)."""
    if type(value) is float:
        v = value
    else:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and (v < low or (v == low and not low_inclusive)):
        bound = f">= {low}" if low_inclusive else f"> {low}"
        raise ValueError(f"{name} must be {bound}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v}")
    return v


def eps(value, *, strictly_positive: bool = False, dtype: np.dtype | None = None) -> float:
    """``eps``: finite, >= 0 (> 0 if strictly_positive).  With ``dtype`` given, None means
    ``np.finfo(dtype).eps`` (RMSNorm's default, as ``torch.nn.functional.rms_norm``)."""
    if type(value) is float and (0.0 < value if strictly_positive else 0.0 <= value) \
            and value < _INF:
        return value
    if value is None and dtype is not None:
        if dtype is F32:
            return _EPS32
        if dtype is F64:
            return _EPS64
        return float(np.finfo(dtype).eps)
    return finite_float(value, "eps", low=0.0, low_inclusive=not strictly_positive)


def normalized_shape(value, x_shape: tuple) -> tuple:
    """Normalise ``normalized_shape`` (int or sequence of ints) and check it matches the
    trailing dims of x."""
    if type(value) is int:
        if value > 0 and x_shape and x_shape[-1] == value:
            return (value,)
    elif type(value) is tuple and len(value) == 1 and type(value[0]) is int:
        if value[0] > 0 and x_shape and x_shape[-1] == value[0]:
            return value
    if isinstance(value, (bool, np.bool_)):
        raise TypeError("normalized_shape must be an int or a tuple of ints, got bool")
    try:
        shape = (operator.index(value),)
    except TypeError:
        try:
            shape = tuple(operator.index(v) for v in value)
        except TypeError:
            raise TypeError("normalized_shape must be an int or a tuple of ints, got "
                            f"{value!r}") from None
    if len(shape) == 0:
        raise ValueError("normalized_shape must have at least one dimension, got ()")
    if any(s <= 0 for s in shape):
        raise ValueError(f"normalized_shape must contain positive sizes, got {shape}")
    if len(shape) > len(x_shape):
        raise ValueError(f"normalized_shape {shape} has more dims than x (shape {x_shape})")
    if tuple(x_shape[len(x_shape) - len(shape):]) != shape:
        raise ValueError(f"normalized_shape {shape} does not match the trailing dims of x "
                         f"(shape {x_shape})")
    return shape


def _overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    if not _may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=10_000))
    except np.exceptions.TooHardError:
        return True


def out_array(out, name: str, shape: tuple, dtype: np.dtype, inputs=(),
              transposed_ok: bool = False) -> np.ndarray:
    """Validate a caller-provided output buffer: ndarray of the exact shape and dtype,
    C-contiguous (or, with ``transposed_ok``, the transpose of a C-contiguous 2-D array: a
    weight gradient in ``nn.Linear``'s layout), writeable, not overlapping any of ``inputs``."""
    if type(out) is not _ndarray and not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype is not dtype and out.dtype != dtype:
        raise ValueError(f"{name} has dtype {out.dtype}, expected {dtype}")
    if out.shape != shape and out.shape != tuple(shape):
        raise ValueError(f"{name} has shape {out.shape}, expected {tuple(shape)}")
    f = out.flags
    if not f.c_contiguous and not (transposed_ok and f.f_contiguous):
        raise ValueError(f"{name} must be C-contiguous"
                         + (" or the transpose of a C-contiguous array" if transposed_ok else ""))
    if not f.writeable:
        raise ValueError(f"{name} must be writeable")
    if not f.aligned:
        raise ValueError(f"{name} must be aligned to its itemsize")
    # Two distinct arrays that both own their data hold separate allocations: disjoint without
    # asking numpy (a cheap answer for the common case of fresh, separately allocated buffers).
    owns = f.owndata
    for a in inputs:
        if a is None or (owns and a is not out and a.flags.owndata):
            continue
        if _overlaps(out, a):
            raise ValueError(f"{name} overlaps an input array; pass a separate buffer")
    return out


def fast_rows(x, normalized_shape):
    """For the fast paths: the row length d when ``x`` is an exact, C-contiguous, aligned ndarray
    of the float32/float64 dtype objects and ``normalized_shape`` an int or a 1-tuple of int equal
    to x's last dim (d >= 1); else None (the caller takes the general path)."""
    if type(x) is not _ndarray:
        return None
    ns = normalized_shape
    if type(ns) is tuple and len(ns) == 1:
        ns = ns[0]
    dt, shape = x.dtype, x.shape
    if type(ns) is not int or ns <= 0 or (dt is not F32 and dt is not F64) or not shape or \
            shape[-1] != ns:
        return None
    f = x.flags
    if not (f.c_contiguous and f.aligned):
        return None
    return ns


def fast_row_context(x, ns, rstd, more_stats: tuple, params: tuple) -> int:
    """The common case of a row-norm context's validate(): x an exact C-contiguous
    float32/float64 ndarray ending in the 1-D ``ns``, ``rstd`` and ``more_stats`` exact
    C-contiguous float64 ndarrays of x's leading shape, ``params`` None or exact C-contiguous
    ndarrays of x's dtype and shape ``ns`` (the row norms' ``Context._valid_fast``).  Nonzero
    only if the full check would pass: 2 when every array also owns its memory (an ``out=``
    that owns its own cannot overlap them), 1 otherwise."""
    if type(x) is not _ndarray or type(ns) is not tuple or len(ns) != 1:
        return 0
    d, shape, dt, f = ns[0], x.shape, x.dtype, x.flags
    if type(d) is not int or d <= 0 or not shape or shape[-1] != d or \
            (dt is not F32 and dt is not F64) or not f.c_contiguous:
        return 0
    owned = f.owndata
    lead = shape[:-1]
    for a in (rstd,) + more_stats:
        if type(a) is not _ndarray or a.dtype is not F64 or a.shape != lead:
            return 0
        f = a.flags
        if not f.c_contiguous:
            return 0
        owned = owned and f.owndata
    for a in params:
        if a is not None:
            if type(a) is not _ndarray or a.dtype is not dt or a.shape != ns:
                return 0
            f = a.flags
            if not f.c_contiguous:
                return 0
            owned = owned and f.owndata
    return 2 if owned else 1


def fast_param(a, shape: tuple, dtype: np.dtype):
    """For the fast paths: None when ``a`` needs the general path (anything but None or an
    exact, C-contiguous, aligned ndarray of ``shape`` and the ``dtype`` object, the case
    :func:`optional_param` returns as it is); otherwise whether ``a`` is absent or owns its
    memory (then an ``out=`` that owns its own cannot overlap it)."""
    if a is None:
        return True
    if type(a) is not _ndarray or a.dtype is not dtype or a.shape != shape:
        return None
    f = a.flags
    if not (f.c_contiguous and f.aligned):
        return None
    return f.owndata


def owned_c_array(flags) -> bool:
    """True when ``flags`` (an ndarray's) say C-contiguous, aligned, writeable and owning its
    memory: with inputs that own theirs, such an ``out=`` (not one of them) passes
    :func:`out_array` without an overlap test (separate allocations cannot overlap)."""
    return flags.carray and flags.owndata


def new_or_out(out, name: str, shape: tuple, dtype: np.dtype, inputs=()) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=dtype)
    return out_array(out, name, shape, dtype, inputs)


def context(ctx, cls, op: str):
    if not isinstance(ctx, cls):
        raise TypeError(f"ctx must be the {cls.__name__} returned by {op}_forward, got "
                        f"{type(ctx).__name__}")
    return ctx


def needs(value, names: tuple, exists: tuple) -> tuple:
    """A backward's ``needs=``: None (every gradient that exists) or a tuple (or list) of bools,
    one per entry of ``names`` (the returned gradients, in order).  Returns the bools and-ed with
    ``exists`` (a gradient of an absent parameter is never computed).  Raises TypeError for a
    value that is not a tuple/list or an entry that is not a bool, ValueError for a wrong
    length."""
    if value is None:
        return tuple(map(bool, exists))
    spelled = f"{len(names)} bools ({', '.join(names)})"
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"needs must be a tuple of {spelled} or None, got "
                        f"{type(value).__name__}")
    if len(value) != len(names):
        raise ValueError(f"needs has {len(value)} entries, expected {spelled}")
    for name, v in zip(names, value):
        if not isinstance(v, (bool, np.bool_)):
            raise TypeError(f"needs entry for {name} must be a bool, got {type(v).__name__}")
    return tuple(bool(v) and bool(e) for v, e in zip(value, exists))


def row_input(x, nshape, name: str = "x"):
    """The input of a row norm: a float array of >= 1 dim whose trailing dims are ``nshape``
    (an int or tuple: the op's ``normalized_shape``).  Returns ``(x, nshape, lead)``, nshape a
    tuple and lead the shape of the per-row statistics (n = prod(lead) rows of d =
    prod(nshape))."""
    if type(x) is _ndarray and type(nshape) is int and nshape > 0:
        dt = x.dtype
        shape = x.shape
        if (dt is F32 or dt is F64) and shape and shape[-1] == nshape and x.flags.aligned:
            return x, (nshape,), shape[:-1]
    x = float_array(x, name)
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension, got a 0-d array")
    nshape = normalized_shape(nshape, x.shape)
    return x, nshape, x.shape[:x.ndim - len(nshape)]


def grad_output(dy, ctx_shape: tuple, dtype: np.dtype, name: str = "dy") -> np.ndarray:
    if type(dy) is _ndarray and dy.dtype is dtype and dy.shape == ctx_shape and \
            (dtype is F32 or dtype is F64) and dy.flags.aligned:
        return dy
    dy = float_array(dy, name)
    same_dtype(dtype, name, dy)
    if dy.shape != tuple(ctx_shape):
        raise ValueError(f"{name} has shape {dy.shape}, expected {tuple(ctx_shape)} "
                         "(the shape of the forward output)")
    return dy


def blas_matrix(a: np.ndarray) -> np.ndarray:
    """Return the 2-D float array ``a`` in a layout BLAS reads directly — rows contiguous
    (C order) or columns contiguous (F order, e.g. PyTorch's ``weight.T``), the other stride a
    positive multiple of the itemsize no smaller than the contiguous extent and below 2**31
    elements — without a copy when ``a`` already is one, else as a C-contiguous copy."""
    return a if blas_layout(a) else np.ascontiguousarray(a)


def blas_layout(a: np.ndarray) -> bool:
    """True when BLAS reads the 2-D array ``a`` in place (the test :func:`blas_matrix` makes)."""
    rows, cols = a.shape
    f = a.flags
    if f.c_contiguous or f.f_contiguous:
        return rows <= INT32_MAX and cols <= INT32_MAX
    it = a.itemsize
    s0, s1 = a.strides
    return (s1 == it and s0 > 0 and s0 % it == 0 and cols <= s0 // it <= INT32_MAX) or \
        (s0 == it and s1 > 0 and s1 % it == 0 and rows <= s1 // it <= INT32_MAX)


def gemm_size(value: int, name: str) -> int:
    """A matrix dimension that reaches BLAS (scipy's cython_blas takes 32-bit ints)."""
    if value > INT32_MAX:
        raise ValueError(f"{name} = {value} is too large: BLAS (LP64) takes sizes below 2**31")
    return value
