"""Output buffers that tasks on ``dask.distributed`` workers reuse instead of fresh memory.

A task returns a new array for every chunk.  glibc serves a large allocation (a 64 MiB chunk)
from freshly mapped pages and unmaps it when it is freed, so every task paid page faults and
the kernel's zeroing for its output: on the 2-core development VM a LayerNorm task on a
``LocalCluster`` worker took 21.6 ms per 64 MiB chunk, 17.7 ms with this module
(``benchmarks/dask_scale.py``).  The memory stays in the worker process instead, for normffn's
own outputs only, without changing the process's malloc settings:

* :func:`empty` hands out an array over a buffer from a per-process pool (or a new one);
* the array is built on a small ctypes object over the buffer, which every view of the array
  keeps alive; when the last view is gone that object dies and a ``weakref.finalize`` returns
  the buffer to the pool — never earlier, whatever a consumer slices or keeps;
* the pool keeps at most ``MAX_IDLE`` idle buffers of each size (more are freed): a worker holds
  at most a couple of chunks beyond what its tasks use.

Only on a ``dask.distributed`` worker (a long-lived process whose job is these tasks) and only
for arrays of at least ``MIN_BYTES`` (malloc reuses small blocks itself).  Elsewhere — the
threaded or synchronous scheduler in a user's own process — :func:`empty` is ``numpy.empty``,
so nothing is held after ``compute()``.
"""
from __future__ import annotations

import ctypes
import math
import sys
import threading
import weakref

import numpy as np

MIN_BYTES = 4 << 20      # smaller outputs: numpy.empty
MAX_IDLE = 2             # idle buffers kept per size

_lock = threading.Lock()
_idle: dict[int, list[np.ndarray]] = {}


def _on_worker() -> bool:
    distributed = sys.modules.get("distributed")   # not imported: not on a worker
    if distributed is None:
        return False
    try:
        distributed.get_worker()
    except ValueError:
        return False
    return True


def _release(raw: np.ndarray) -> None:
    with _lock:
        idle = _idle.setdefault(raw.nbytes, [])
        if len(idle) < MAX_IDLE:
            idle.append(raw)


def pooled(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array over a pooled buffer (whatever the process)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    with _lock:
        idle = _idle.get(nbytes)
        raw = idle.pop() if idle else None
    if raw is None:
        raw = np.empty(nbytes, np.uint8)
    owner = (ctypes.c_char * nbytes).from_address(raw.ctypes.data)
    weakref.finalize(owner, _release, raw).atexit = False   # holds raw until owner dies
    return np.frombuffer(owner, dtype=dtype).reshape(shape)


def empty(shape, dtype) -> np.ndarray:
    """A task's output array: :func:`pooled` on a worker for large arrays, else numpy.empty."""
    dtype = np.dtype(dtype)
    if math.prod(shape) * dtype.itemsize < MIN_BYTES or not _on_worker():
        return np.empty(shape, dtype)
    return pooled(shape, dtype)


def idle_bytes() -> int:
    """Bytes the pool holds idle."""
    with _lock:
        return sum(size * len(idle) for size, idle in _idle.items())


def release() -> None:
    """Free every idle buffer (buffers in use return to the pool when their arrays are gone)."""
    with _lock:
        _idle.clear()
