"""Shared test machinery: dtypes, layouts, thread counts and the hard inputs, listed once."""
from __future__ import annotations

import os

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

DTYPES = [np.float32, np.float64]
LAYOUTS = ["contiguous", "strided", "transposed", "readonly"]
THREADS = [1, 2]


def make_array(values: np.ndarray, layout: str) -> np.ndarray:
    """Return an array equal to ``values`` with the given memory layout.

    contiguous: C order.  strided: a view taking every other element of a larger buffer along
    the last axis.  transposed: a transposed view of a C-contiguous array of the reversed shape
    (so F-ordered for 2-D).  readonly: C order with the write flag off.
    """
    values = np.asarray(values)
    if layout == "contiguous":
        return np.ascontiguousarray(values)
    if layout == "strided":
        if values.ndim == 0:
            return values.copy()
        big = np.empty(values.shape[:-1] + (2 * values.shape[-1],), dtype=values.dtype)
        big.fill(np.nan)  # poison the gaps: reading them shows up as NaN
        view = big[..., ::2]
        view[...] = values
        return view
    if layout == "transposed":
        base = np.ascontiguousarray(np.transpose(values))
        return np.transpose(base)
    if layout == "readonly":
        a = np.array(values, copy=True)
        a.setflags(write=False)
        return a
    raise ValueError(layout)


def _offset(rng, shape, dtype):
    return (1e4 + 0.1 * rng.standard_normal(shape)).astype(dtype)


def _shifted(rng, shape, dtype):
    return (-2.3 + 0.5 * rng.standard_normal(shape)).astype(dtype)


def _constant(rng, shape, dtype):
    return np.full(shape, 3.25, dtype=dtype)


def _tiny(rng, shape, dtype):
    return (1e-3 * rng.standard_normal(shape)).astype(dtype)


def _huge(rng, shape, dtype):
    return (1e6 * rng.standard_normal(shape)).astype(dtype)


# The hard cases: name -> f(rng, shape, dtype).  NaN/Inf cases are separate (they need the
# caller to say where the bad value goes).
ADVERSARIAL = {
    "offset_1e4": _offset,
    "shifted": _shifted,
    "constant": _constant,
    "tiny": _tiny,
    "huge": _huge,
}


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(params=THREADS, ids=lambda n: f"threads{n}")
def threads(request):
    """Run the test body with OpenMP limited to 1 or 2 threads (threadpoolctl)."""
    with threadpool_limits(limits=request.param, user_api="openmp"):
        yield request.param


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def child_env(**extra) -> dict:
    """Environment for a child Python process that must import the very normffn this process
    imported (the installed package in CI, a source tree with built extensions in development):
    its parent directory goes first on PYTHONPATH."""
    import normffn
    root = os.path.dirname(os.path.dirname(os.path.abspath(normffn.__file__)))
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
