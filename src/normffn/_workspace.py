"""Reusable scratch buffers for kernels that need float64 partial sums.

A fresh large allocation costs a page fault per 4 KiB (≈ 2 µs each here) — for a backward pass
over 8192×768 that was ~10% of the kernel.  Each Python thread keeps its own buffer per key
(so concurrent calls never share one) and grows it on demand; buffers over ``MAX_CACHED_BYTES``
are not kept.
"""
from __future__ import annotations

import threading

import numpy as np

MAX_CACHED_BYTES = 64 << 20
_local = threading.local()


def workspace(key: str, count: int) -> np.ndarray:
    """A float64 array of at least ``count`` elements (contents undefined), owned by this
    Python thread until its next ``workspace(key, ...)`` call."""
    count = max(int(count), 1)
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    buf = cache.get(key)
    if buf is None or buf.size < count:
        buf = np.empty(count, dtype=np.float64)
        if buf.nbytes <= MAX_CACHED_BYTES:
            cache[key] = buf
    return buf[:count]
