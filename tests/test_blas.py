"""normffn._blas: a registered BLAS is checked before use, is used only inside ``using`` and only
by the thread that entered it, and gives the FFN the same results as scipy's."""
from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest
import scipy.linalg.cython_blas as cython_blas

import normffn
from normffn import _blas
from normffn._kernels import ffn as ffn_kernel

ROUTINES = ("sgemm", "dgemm", "sgemv", "dgemv")


def scipy_address(routine: str) -> int:
    """The address of scipy's own routine (its cython_blas capsule)."""
    capsule = cython_blas.__pyx_capi__[routine]
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))


@pytest.fixture
def restore_registration():
    """Put back whatever was registered (normffn.torch registers torch's BLAS on import)."""
    name, args = _blas.registered()
    yield
    if name is not None:
        *addresses, openmp = args
        _blas.register(name, *addresses, openmp=openmp)


def ffn_problem(dtype, n=7, d=5, h=9, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(dtype)
    w1 = np.asfortranarray(rng.standard_normal((d, h)).astype(dtype))
    w2 = rng.standard_normal((h, d)).astype(dtype)
    b1, b2 = rng.standard_normal(h).astype(dtype), rng.standard_normal(d).astype(dtype)
    dy = rng.standard_normal((n, d)).astype(dtype)
    return x, w1, b1, w2, b2, dy


def run(problem):
    x, w1, b1, w2, b2, dy = problem
    y, ctx = normffn.ffn_forward(x, w1, b1, w2, b2, "silu")
    return (y,) + normffn.ffn_backward(dy, ctx)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_registered_blas_is_used_inside_using_only(dtype, restore_registration):
    # scipy's own routines registered as another BLAS: the same products, bitwise
    _blas.register("again", *(scipy_address(r) for r in ROUTINES))
    assert _blas.registered()[0] == "again"
    problem = ffn_problem(dtype)
    plain = run(problem)
    assert _blas.current() == _blas.SCIPY
    with _blas.using("again"):
        assert _blas.current() != _blas.SCIPY
        inside = run(problem)
    assert _blas.current() == _blas.SCIPY
    for a, b in zip(plain, inside):
        np.testing.assert_array_equal(a, b)


def test_using_another_name_or_none_changes_nothing(restore_registration):
    _blas.register("again", *(scipy_address(r) for r in ROUTINES))
    for name in (None, "not-registered"):
        with _blas.using(name):
            assert _blas.current() == _blas.SCIPY


def test_using_is_per_thread(restore_registration):
    _blas.register("again", *(scipy_address(r) for r in ROUTINES))
    seen = []
    entered, release = threading.Event(), threading.Event()

    def other():
        entered.wait()
        seen.append(_blas.current())
        release.set()

    t = threading.Thread(target=other)
    t.start()
    with _blas.using("again"):
        entered.set()
        release.wait()
        mine = _blas.current()
    t.join()
    assert mine != _blas.SCIPY and seen == [_blas.SCIPY]


def test_a_blas_that_disagrees_is_refused(restore_registration):
    # sgemm where dgemm belongs: float64 products computed as float32 over the same buffers
    # (no out-of-bounds access: the float32 routine reads and writes half the bytes)
    swapped = [scipy_address(r) for r in ("sgemm", "sgemm", "sgemv", "dgemv")]
    with pytest.raises(ValueError, match="disagrees with scipy's"):
        _blas.register("broken", *swapped)
    assert _blas.registered() == (None, ())
    with _blas.using("broken"):
        assert _blas.current() == _blas.SCIPY


def test_zero_address_is_refused(restore_registration):
    with pytest.raises(ValueError, match="non-zero"):
        _blas.register("null", 0, 0, 0, 0)


def test_kernel_rejects_an_unknown_slot():
    x = np.ones((2, 3), np.float32)
    w1, w2, y = np.ones((3, 4), np.float32), np.ones((4, 3), np.float32), np.empty((2, 3),
                                                                                  np.float32)
    with pytest.raises(ValueError, match="blas=7"):
        ffn_kernel.forward(y, None, None, np.empty(8, np.float32), x, w1, None, w2, None, 1, 2,
                           None, 7)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "swiglu", "reglu"])
@pytest.mark.parametrize("n, d, h", [(300, 37, 600), (7000, 33, 20), (2000, 129, 77)])
@pytest.mark.parametrize("recompute", [False, True])
def test_threaded_passes_are_bitwise_the_one_thread_passes(activation, n, d, h, recompute,
                                                           restore_registration):
    """A BLAS registered with openmp=True splits the elementwise passes' columns over OpenMP
    threads: each column by one thread, rows in order, so every output and gradient is bitwise
    the one-thread result (here the same BLAS, scipy's, sits in both slots)."""
    from threadpoolctl import threadpool_limits

    _blas.register("threaded", *(scipy_address(r) for r in ROUTINES), openmp=True)
    rng = np.random.default_rng(1)
    hw = 2 * h if activation in ("swiglu", "reglu") else h
    x = rng.standard_normal((n, d)).astype(np.float32)
    w1 = np.asfortranarray((rng.standard_normal((d, hw)) / np.sqrt(d)).astype(np.float32))
    w2 = (rng.standard_normal((h, d)) / np.sqrt(h)).astype(np.float32)
    b1, b2 = rng.standard_normal(hw).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    dy = rng.standard_normal((n, d)).astype(np.float32)

    def run_all():
        y, ctx = normffn.ffn_forward(x, w1, b1, w2, b2, activation, recompute=recompute)
        return (y, normffn.ffn(x, w1, b1, w2, b2, activation)) + normffn.ffn_backward(dy, ctx)

    with threadpool_limits(limits=2, user_api="openmp"):
        one_thread = run_all()
        with _blas.using("threaded"):
            threaded = run_all()
    for i, (a, b) in enumerate(zip(one_thread, threaded)):
        np.testing.assert_array_equal(a, b, err_msg=f"output {i}")
