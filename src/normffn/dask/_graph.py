"""The pieces every ``normffn.dask`` op is built from: thread shares, parameters shipped once,
per-block calls of the NumPy API, and fixed-tree float64 sums of per-block partials.

Nothing here knows an op's maths: each task calls the public NumPy function on one block.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import sys
import threading

import dask
import dask.array as da
import numpy as np

# Blocks combined per node of every reduction tree (parameter gradients, BatchNorm statistics
# and sums).  A constant, not dask's ``split_every`` setting, so the tree — and therefore every
# float64 partial sum's rounding — is fixed by the chunking alone.
SPLIT_EVERY = 16

# dask config key holding the OpenMP/BLAS threads each task may use (None: the default share).
THREADS_KEY = "normffn.threads"


# ---------------------------------------------------------------------------------------------
# threads: each task uses its worker's share of the cores
def threads_setting():
    """The ``normffn.threads`` dask setting now (read when a graph is built and baked into its
    tasks, so it reaches every worker): a positive int, or None for the default share."""
    k = dask.config.get(THREADS_KEY, None)
    if k is None:
        return None
    k = int(k)
    if k < 1:
        raise ValueError(f"dask config {THREADS_KEY!r} must be a positive int or None, got {k}")
    return k


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _omp_num_threads(value):
    """The first level of an ``OMP_NUM_THREADS`` value if it is a positive int, else None."""
    try:
        k = int(str(value or "").split(",")[0])
    except ValueError:
        return None
    return k if k > 0 else None


@functools.lru_cache(maxsize=None)
def _env_threads():
    """``OMP_NUM_THREADS`` as this process was started with it (None if unset or not a positive
    int): how a launcher tells a process how many OpenMP threads it may use.  dask.distributed's
    nanny starts every worker process with 1 (``distributed.nanny.pre-spawn-environ``), since it
    runs as many worker threads per host as there are cores.

    Read from ``/proc/self/environ`` where there is one: the nanny also writes its settings into
    the *launching* process's ``os.environ`` (where they do not describe that process)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"OMP_NUM_THREADS="):
                    return _omp_num_threads(item.split(b"=", 1)[1].decode(errors="replace"))
        return None
    except OSError:
        return _omp_num_threads(os.environ.get("OMP_NUM_THREADS"))


def _distributed_threads():
    """Worker threads of every running ``dask.distributed`` worker in this process, if this task
    runs on one (``LocalCluster(processes=False)`` puts several workers in one process), else
    None."""
    if "distributed" not in sys.modules:
        return None
    from distributed import Worker, get_worker
    from distributed.core import Status
    try:
        me = get_worker()
    except ValueError:  # not inside a distributed worker
        return None
    live = (Status.running, Status.paused)
    total = sum(max(1, int(w.state.nthreads)) for w in list(Worker._instances)
                if w is not me and w.status in live)
    return total + max(1, int(me.state.nthreads))


def _scheduler_threads() -> int:
    """How many tasks this process may run at once under the scheduler running this task."""
    workers = _distributed_threads()
    if workers is not None:
        return workers
    workers = dask.config.get("num_workers", None)
    if threading.current_thread() is threading.main_thread():
        if multiprocessing.parent_process() is None:
            return 1  # the synchronous scheduler: tasks run one at a time in the caller's thread
        return int(workers or _cores())  # a worker of the "processes" scheduler
    return int(workers or _cores())  # a thread of the threaded scheduler's pool


def task_threads(setting) -> int:
    """Threads for the kernel call of one task: ``setting`` if given, else this process's share,
    ``cores // (tasks this process runs at once)``, at least 1 and at most the process's
    ``OMP_NUM_THREADS`` when that is set (a distributed worker process: 1, see
    :func:`_env_threads`), so worker processes x tasks x threads never exceed the cores."""
    if setting is not None:
        return setting
    share = max(1, _cores() // _scheduler_threads())
    cap = _env_threads()
    return share if cap is None else min(share, cap)


_controller = None
_blas_lock = threading.Lock()
_blas_state = {"depth": 0, "limiter": None}


def _get_controller():
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController
        import normffn._kernels.layer_norm  # noqa: F401  (load libgomp before scanning)
        _controller = ThreadpoolController()
    return _controller


class limit_threads:
    """Limit OpenMP (and, with ``blas=True``, BLAS) threads around one kernel call.

    OpenMP's limit is per calling thread (libgomp's nthreads ICV), so concurrent tasks each set
    and restore their own.  A BLAS pool such as OpenBLAS's is process-wide: the first task in
    sets it and the last one out restores it (tasks of one process all use the same share).
    """

    def __init__(self, setting, blas: bool = False):
        self.k = task_threads(setting)
        self.blas = blas

    def __enter__(self):
        ctl = _get_controller()
        self._omp = ctl.limit(limits=self.k, user_api="openmp")
        if self.blas:
            with _blas_lock:
                if _blas_state["depth"] == 0:
                    _blas_state["limiter"] = ctl.limit(limits=self.k, user_api="blas")
                _blas_state["depth"] += 1
        return self

    def __exit__(self, *exc):
        if self.blas:
            with _blas_lock:
                _blas_state["depth"] -= 1
                if _blas_state["depth"] == 0:
                    _blas_state["limiter"].restore_original_limits()
                    _blas_state["limiter"] = None
        self._omp.restore_original_limits()
        return False


# ---------------------------------------------------------------------------------------------
# graph helpers
def ship(obj, name: str):
    """``obj`` (parameters: NumPy arrays, scalars) as one graph key, so a cluster sends it to each
    worker once rather than inside every task."""
    return dask.delayed(obj, pure=True, traverse=False, name=f"{name}-params-"
                        f"{dask.base.tokenize(obj)}")


def copy_param(a):
    """A private copy of a NumPy argument (the graph runs later; the caller may update its array
    in place meanwhile).  Keeps the layout: a transposed weight stays a transposed view."""
    if isinstance(a, np.ndarray):
        return np.array(a, order="K", copy=True)
    return a


def lead_letters(n: int) -> str:
    return "abcdefghijklmnopqrstuvwxyz"[:n]


def feat_letters(n: int) -> str:
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n]


def pick(t, *path):
    """``t[path[0]][path[1]]...`` (a task's tuple result)."""
    for i in path:
        t = t[i]
    return t


def block_partial(t, path, nlead: int):
    """A per-block parameter partial as float64 of shape ``(1,) * nlead + g.shape``."""
    g = pick(t, *path)
    return np.asarray(g, dtype=np.float64).reshape((1,) * nlead + g.shape)


def tree_sum(parts: da.Array, nlead: int) -> da.Array:
    """Sum float64 per-block partials (one block of length 1 per lead axis, the partial's own
    axes whole) over the lead axes in a fixed tree of ``SPLIT_EVERY`` blocks per node."""
    if nlead == 0:
        return parts
    return parts.sum(axis=tuple(range(nlead)), dtype=np.float64, split_every=SPLIT_EVERY)


def partials(blocks: da.Array, path, nlead: int, shape: tuple, name: str) -> da.Array:
    """Per-block float64 partials ``pick(block, *path)`` laid out for :func:`tree_sum`."""
    lead = lead_letters(nlead)
    feat = feat_letters(len(shape))
    return da.blockwise(block_partial, lead + feat, blocks, lead, path=path, nlead=nlead,
                        new_axes=dict(zip(feat, shape)),
                        adjust_chunks={c: 1 for c in lead}, dtype=np.float64,
                        meta=np.empty((0,) * (nlead + len(shape)), dtype=np.float64),
                        name=f"{name}-{dask.base.tokenize(blocks.name, path)}")
