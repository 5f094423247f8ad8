"""BatchNorm's column kernel (channels-last and (N, C)) at every cache-line offset of its arrays.

The backward dx pass splits each row where the rest starts on a cache line when dx, dy and x
share one offset within a line (kernels/bn_channels.h, nf_bn_peel).
Only where the loop splits changes, so every result must be bitwise the one an aligned call
gives; checked over odd channel counts, short batches, non-finite values and 1 vs 2 threads.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import DTYPES, randn
from threadpoolctl import threadpool_limits

import normffn
from normffn import reference as ref
from normffn.testing import assert_close


def _at_offset(values: np.ndarray, offset: int) -> np.ndarray:
    """A C-contiguous copy of values starting `offset` bytes after a 64-byte boundary."""
    values = np.ascontiguousarray(values)
    buf = np.empty(values.nbytes + 128, np.uint8)
    start = (offset - buf.ctypes.data) % 64
    out = buf[start:start + values.nbytes].view(values.dtype).reshape(values.shape)
    out[...] = values
    assert out.ctypes.data % 64 == offset
    return out


def _channels_last(values: np.ndarray, offset: int) -> np.ndarray:
    """values (N, C, *spatial) as a channels-last view of a buffer at `offset`."""
    return np.moveaxis(_at_offset(np.moveaxis(values, 1, -1), offset), -1, 1)


def _place(values, offset, cl):
    return _channels_last(values, offset) if cl else _at_offset(values, offset)


def _run(x, dy, w, b, rm, rv, offset, cl):
    """Training forward + backward and eval forward + backward, outputs placed at `offset`."""
    y = _place(np.zeros(x.shape, x.dtype), offset, cl)
    ye = _place(np.zeros(x.shape, x.dtype), offset, cl)
    dx = _place(np.zeros(x.shape, x.dtype), offset, cl)
    dxe = _place(np.zeros(x.shape, x.dtype), offset, cl)
    out = []
    if x.shape[0] * int(np.prod(x.shape[2:])) > 1:       # training needs 2+ values per channel
        y2, ctx = normffn.batch_norm_forward(x, rm, rv, w, b, True, 0.1, out=y)
        dx2, dw, db = normffn.batch_norm_backward(dy, ctx, out=dx)
        assert y2 is y and dx2 is dx
        out += [y, ctx.mean, ctx.rstd, dx, dw, db, rm, rv]
    ye2, ctxe = normffn.batch_norm_forward(x, rm, rv, w, b, False, out=ye)
    dxe2, dwe, dbe = normffn.batch_norm_backward(dy, ctxe, out=dxe)
    assert ye2 is ye and dxe2 is dxe
    return out + [ye, dxe, dwe, dbe]


# (N, C, *spatial): C = 16, 64, 768 make a row whole cache lines (the split applies); 1, 3, 63,
# 65, 769 do not.  N = 1 runs eval only.
SHAPES = [(1, 768), (2, 64), (3, 65), (17, 16), (1000, 3), (17, 769), (1000, 63), (2, 1),
          (1000, 768), (3, 64, 3, 5), (2, 16, 7, 1), (2, 65, 2, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_offset_is_bitwise_the_aligned_call(rng, dtype, shape):
    C = shape[1]
    cl = len(shape) > 2
    values = randn(rng, shape, dtype) + 3
    dyv = randn(rng, shape, dtype)
    w, b = randn(rng, C, dtype), randn(rng, C, dtype)
    rm0, rv0 = randn(rng, C, dtype), (0.5 + rng.random(C)).astype(dtype)
    want = None
    for off_x in range(0, 64, 16):
        for off_y in (0, off_x, (off_x + 16) % 64):
            x, dy = _place(values, off_x, cl), _place(dyv, off_x, cl)
            got = _run(x, dy, w, b, rm0.copy(), rv0.copy(), off_y, cl)
            if want is None:
                want = got
                continue
            for a, e in zip(got, want):
                assert a.tobytes() == e.tobytes(), (off_x, off_y)


@pytest.mark.parametrize("shape", [(17, 768), (1000, 64), (4, 64, 5, 7)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_offset_matches_reference(rng, dtype, shape):
    C = shape[1]
    cl = len(shape) > 2
    values = randn(rng, shape, dtype) + 3
    x = _place(values, 16, cl)
    w, b = randn(rng, C, dtype), randn(rng, C, dtype)
    y = _place(np.zeros(shape, dtype), 16, cl)
    normffn.batch_norm(x, None, None, w, b, training=True, out=y)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    expect = ref.batch_norm(values.astype(np.float64), None, None, w.astype(np.float64),
                            b.astype(np.float64), training=True)
    assert_close(y, expect, context=f"offset 16, {shape}", **tol)


@pytest.mark.parametrize("shape", [(1000, 768), (3, 64, 6, 6), (17, 65)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_large_mean_small_variance(rng, dtype, shape):
    C = shape[1]
    cl = len(shape) > 2
    values = (1e4 + 0.1 * rng.standard_normal(shape)).astype(dtype)
    x = _place(values, 16, cl)
    y = _place(np.zeros(shape, dtype), 16, cl)
    normffn.batch_norm(x, None, None, None, None, training=True, out=y)
    expect = ref.batch_norm(values.astype(np.float64), None, None, None, None, training=True)
    tol = 5e-3 if dtype == np.float32 else 1e-9     # x's own rounding: 1e4 * 2^-24 / 0.1
    assert_close(y, expect, rtol=tol, atol=tol, context=f"offset data {shape}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("shape", [(17, 768), (1000, 64), (3, 64, 3, 5)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_nonfinite_stays_in_its_channel(rng, dtype, shape, bad):
    cl = len(shape) > 2
    values = randn(rng, shape, dtype)
    bad_c = 5          # inside the peeled head of a row 16 bytes into a line
    values[(2, bad_c) + (1,) * (len(shape) - 2)] = bad
    x = _place(values, 16, cl)
    y = _place(np.zeros(shape, dtype), 16, cl)
    normffn.batch_norm(x, None, None, None, None, training=True, out=y)
    assert np.isnan(y[:, bad_c]).all()
    assert np.isfinite(np.delete(y, bad_c, axis=1)).all()


@pytest.mark.parametrize("shape", [(4096, 64), (1000, 768), (8, 64, 12, 12)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_threads_bitwise_identical_at_an_offset(rng, dtype, shape):
    C = shape[1]
    cl = len(shape) > 2
    x = _place(randn(rng, shape, dtype) + 3, 16, cl)
    dy = _place(randn(rng, shape, dtype), 16, cl)
    w, b = randn(rng, C, dtype), randn(rng, C, dtype)
    rm, rv = randn(rng, C, dtype), (0.5 + rng.random(C)).astype(dtype)
    results = []
    for n in (1, 2):
        with threadpool_limits(limits=n, user_api="openmp"):
            results.append(_run(x, dy, w, b, rm.copy(), rv.copy(), 16, cl))
    for a1, a2 in zip(*results):
        assert a1.tobytes() == a2.tobytes()
