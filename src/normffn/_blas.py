"""Which BLAS the FFN kernels multiply with: scipy's, or one a front end registered.

normffn's GEMMs go through scipy's BLAS (``scipy.linalg.cython_blas``), as scikit-learn's do.
A front end living in a process that already multiplies with another BLAS can register that
one and run its own calls with it: ``normffn.torch`` registers the BLAS PyTorch calls (MKL in
the x86 wheels), so a training step has one BLAS and one thread pool instead of two sets of
worker threads taking turns on the same cores (docs/tuning.md, "normffn.torch in a training
step").

The choice is per thread and scoped (``with using("torch"): ...``): code outside the block, and
other threads (a Dask worker's), keep scipy's BLAS.  Both BLAS compute the same sums; results
differ only in rounding (the order of a GEMM's partial sums is the BLAS's own).

A BLAS is registered by the addresses of its Fortran-interface ``sgemm_``, ``dgemm_``,
``sgemv_`` and ``dgemv_`` (LP64: 32-bit ints, as scipy's).  Before it is used, ``register``
runs the FFN kernels with it on small problems that reach every GEMM layout and the one-row
``gemv`` path, and compares them with scipy's BLAS; a BLAS that disagrees is refused.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np

__all__ = ["SCIPY", "current", "on_openmp_pool", "register", "registered", "using"]

SCIPY = 0        # the kernels' slot of scipy's BLAS
_SLOT = 1        # the kernels' slot of a registered BLAS
_state = threading.local()
_registered: str | None = None
_addresses: tuple = ()


def current() -> int:
    """The BLAS slot this thread's FFN calls use (the kernels' ``blas`` argument)."""
    return getattr(_state, "slot", SCIPY)


def on_openmp_pool() -> bool:
    """Whether this thread's FFN calls multiply with a BLAS that threads on the process's
    OpenMP pool (a registered one, ``openmp=True``); False for scipy's OpenBLAS, whose own
    pthreads run its GEMMs."""
    return current() == _SLOT and bool(_addresses) and bool(_addresses[4])


def registered() -> tuple[str | None, tuple]:
    """``(name, (sgemm, dgemm, sgemv, dgemv, openmp))`` of the registered BLAS (the arguments
    ``register`` took), or ``(None, ())``."""
    return _registered, _addresses


def register(name: str, sgemm: int, dgemm: int, sgemv: int, dgemv: int, *,
             openmp: bool = False) -> None:
    """Register the BLAS whose routines are at these addresses under ``name``.

    ``openmp``: the BLAS threads on this process's OpenMP runtime (torch's MKL does, on torch's
    libgomp, which normffn's kernels share): the FFN's elementwise passes between its GEMMs then
    use that pool's threads too (with scipy's OpenBLAS, whose own threads would contend with
    them, those passes stay on one thread).

    Raises ValueError if an address is zero or the BLAS disagrees with scipy's on the check
    problems; the previous registration is then dropped.
    """
    global _registered, _addresses
    from ._kernels import ffn as _ffn_kernel

    _registered, _addresses = None, ()
    _ffn_kernel.register_blas(sgemm, dgemm, sgemv, dgemv, openmp)
    bad = _disagreement()
    if bad is not None:
        raise ValueError(f"BLAS {name!r} disagrees with scipy's on {bad}; not used")
    _registered, _addresses = name, (sgemm, dgemm, sgemv, dgemv, openmp)


@contextmanager
def using(name: str | None):
    """FFN calls of this thread inside the block multiply with the BLAS registered as ``name``
    (no change if ``name`` is None or not the registered one)."""
    if name is None or name != _registered:
        yield
        return
    before = current()
    _state.slot = _SLOT
    try:
        yield
    finally:
        _state.slot = before


def _disagreement() -> str | None:
    """Run the FFN forward and backward with both BLAS on problems reaching every GEMM layout
    (weights with contiguous rows and with contiguous columns, one row and several); return a
    description of the first case where they differ beyond rounding, or None."""
    from .ffn import run_backward, run_forward

    rng = np.random.default_rng(0)
    for dtype, tol in ((np.float32, 1e-4), (np.float64, 1e-10)):
        for n in (1, 5):
            d, h = 6, 7
            x = rng.standard_normal((n, d)).astype(dtype)
            dy = rng.standard_normal((n, d)).astype(dtype)
            w1 = rng.standard_normal((d, h)).astype(dtype)
            w2 = rng.standard_normal((h, d)).astype(dtype)
            b1 = rng.standard_normal(h).astype(dtype)
            for w1_, w2_ in ((w1, w2), (np.asfortranarray(w1), np.asfortranarray(w2))):
                results = []
                for slot in (SCIPY, _SLOT):
                    before = current()
                    _state.slot = slot
                    try:
                        y, hidden, _ = run_forward(x, w1_, b1, w2_, None, "gelu", training=True)
                        grads = run_backward(dy, x, hidden, w1_, b1, w2_, "gelu", (True,) * 3
                                             + (True, False))
                    finally:
                        _state.slot = before
                    results.append((y,) + grads[:4])
                for a, b in zip(*results):
                    scale = max(float(np.abs(a).max()), 1.0)
                    if not np.allclose(a, b, rtol=0, atol=tol * scale):
                        layout = "C" if w1_.flags.c_contiguous else "F"
                        return f"{np.dtype(dtype).name} n={n} weights {layout}-ordered"
    return None
