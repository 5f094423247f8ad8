"""Reusable scratch buffers: float64 partial sums of the norms' backward, the FFN's hidden blocks.

A fresh large allocation costs a page fault per 4 KiB (≈ 2 µs each here) — for a backward pass
over 8192×768 that was ~10% of the kernel, and the FFN's 16 MB hidden-block scratch cost as
much as its elementwise pass.  Each Python thread keeps its own buffer per (key, dtype) (so
concurrent calls never share one) and grows it on demand; buffers over ``MAX_CACHED_BYTES`` are
not kept.
"""
from __future__ import annotations

import threading

import numpy as np

MAX_CACHED_BYTES = 64 << 20
_local = threading.local()


def workspace(key: str, count: int, dtype=np.float64) -> np.ndarray:
    """A 1-D array of at least ``count`` elements of ``dtype`` (contents undefined), owned by
    this Python thread until its next ``workspace(key, ...)`` call with the same dtype."""
    count = max(int(count), 1)
    dtype = np.dtype(dtype)
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    buf = cache.get((key, dtype))
    if buf is None or buf.size < count:
        buf = np.empty(count, dtype=dtype)
        if buf.nbytes <= MAX_CACHED_BYTES:
            cache[(key, dtype)] = buf
    return buf[:count]
