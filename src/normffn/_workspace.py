"""Scratch buffers for every kernel: the one scratch policy (kernels never malloc).

Why cache at all: a fresh large allocation page-faults on first touch (measured: ~10% of a
LayerNorm backward at 8192×768; see docs/tuning.md).

The policy:

* ``workspace(role, count, dtype)`` returns a 1-D array of at least ``count`` elements, owned by
  the calling Python thread until its next ``workspace`` call with the same ``(role, dtype)``.
  Each thread keeps one buffer per ``(role, dtype)``, so concurrent calls never share one; a
  buffer grows on demand (the smaller one is dropped).
* A buffer larger than ``MAX_BUFFER_BYTES`` is never kept, and the buffers kept by *all* threads
  together never exceed the workspace limit (``DEFAULT_LIMIT_BYTES``; change it with
  ``set_workspace_limit(nbytes)`` or the environment variable ``NORMFFN_WORKSPACE_LIMIT`` read
  at import).  A request that would go over the limit gets a fresh, uncached array: correct,
  just slower.
* A thread's buffers are released when the thread ends (they live in thread-local storage), so
  a process with many short-lived worker threads (Dask, a web server) cannot grow without
  bound.  ``release()`` drops the calling thread's buffers now.
* ``cached_bytes()`` reports the bytes kept by all live threads (for tests and diagnostics).
"""
from __future__ import annotations

import os
import threading
import weakref

import numpy as np

__all__ = ["workspace", "cached_bytes", "workspace_limit", "set_workspace_limit", "release",
           "MAX_BUFFER_BYTES", "DEFAULT_LIMIT_BYTES"]

# Largest single buffer kept (the FFN's hidden block at the bench shapes is 16 MB).
MAX_BUFFER_BYTES = 64 << 20
# Default cap on the bytes kept across all threads: four full-size buffers.
DEFAULT_LIMIT_BYTES = 256 << 20

_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)


def _env_limit() -> int | None:
    text = os.environ.get("NORMFFN_WORKSPACE_LIMIT", "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"NORMFFN_WORKSPACE_LIMIT must be an integer number of bytes, "
                         f"got {text!r}") from None
    if value < 0:
        raise ValueError(f"NORMFFN_WORKSPACE_LIMIT must be >= 0, got {value}")
    return value


class _ThreadCache:
    """One thread's buffers.  Only that thread mutates ``buffers``; ``nbytes`` is read by
    others under ``_lock``."""

    __slots__ = ("buffers", "nbytes", "__weakref__")

    def __init__(self):
        self.buffers: dict = {}
        self.nbytes = 0


_lock = threading.Lock()
_local = threading.local()
# Every live thread's cache; an entry disappears when its thread ends (the thread-local that
# holds the only strong reference is cleared then).
_caches: weakref.WeakSet = weakref.WeakSet()
_limit = _env_limit()
if _limit is None:
    _limit = DEFAULT_LIMIT_BYTES


def _total_locked() -> int:
    return sum(c.nbytes for c in list(_caches))


def _this_thread() -> _ThreadCache:
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = _ThreadCache()
        with _lock:
            _caches.add(cache)
    return cache


def workspace(role: str, count: int, dtype=np.float64) -> np.ndarray:
    """A 1-D array of at least ``count`` elements of ``dtype`` (contents undefined), owned by
    this Python thread until its next ``workspace(role, ...)`` call with the same dtype.

    ``role`` names what the buffer is for (e.g. ``"layer_norm_backward"``); one buffer is kept
    per (role, dtype) per thread, within the limits described in the module doc."""
    if type(count) is not int:
        count = int(count)
    if count < 1:
        count = 1
    if dtype is _F64 or dtype is _F32:
        pass
    elif dtype is np.float64:
        dtype = _F64
    elif dtype is np.float32:
        dtype = _F32
    elif not isinstance(dtype, np.dtype):
        dtype = np.dtype(dtype)
    try:
        cache = _local.cache
    except AttributeError:
        cache = _this_thread()
    key = (role, dtype)
    buf = cache.buffers.get(key)
    if buf is not None:
        size = buf.shape[0]
        if size == count:
            return buf
        if size > count:
            return buf[:count]
    buf = np.empty(count, dtype=dtype)
    with _lock:
        old = cache.buffers.pop(key, None)
        if old is not None:
            cache.nbytes -= old.nbytes
        if buf.nbytes <= MAX_BUFFER_BYTES and _total_locked() + buf.nbytes <= _limit:
            cache.buffers[key] = buf
            cache.nbytes += buf.nbytes
    return buf[:count]


def release() -> None:
    """Drop the calling thread's cached buffers (arrays already handed out stay valid)."""
    cache = getattr(_local, "cache", None)
    if cache is not None:
        with _lock:
            cache.buffers.clear()
            cache.nbytes = 0


def cached_bytes() -> int:
    """Bytes of scratch currently kept by all live threads."""
    with _lock:
        return _total_locked()


def workspace_limit() -> int:
    """The cap on :func:`cached_bytes` now in force."""
    return _limit


def set_workspace_limit(nbytes: int | None) -> int:
    """Set the cap on the scratch bytes kept across all threads (``None``: the default,
    ``DEFAULT_LIMIT_BYTES`` or ``NORMFFN_WORKSPACE_LIMIT``; ``0``: keep nothing).  If the
    buffers kept now exceed the new cap, every thread's cache is dropped (arrays already handed
    out stay valid).  Returns the cap."""
    global _limit
    if nbytes is None:
        env = _env_limit()
        value = DEFAULT_LIMIT_BYTES if env is None else env
    else:
        value = int(nbytes)
        if value < 0:
            raise ValueError(f"nbytes must be >= 0 or None, got {value}")
    with _lock:
        _limit = value
        if _total_locked() > value:
            for cache in list(_caches):
                cache.buffers.clear()
                cache.nbytes = 0
    return _limit
