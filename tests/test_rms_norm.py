"""RMSNorm vs the float64 reference: values, gradients, hard inputs, hygiene, bad inputs."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import ADVERSARIAL, DTYPES, LAYOUTS, make_array, randn

from normffn import _tuning
from normffn import reference as ref
from normffn.rms_norm import RMSNormContext, rms_norm, rms_norm_backward, rms_norm_forward
from normffn.testing import assert_close, gradcheck

# (leading dims, normalized_shape): d = 1, 3, 769, multi-dim; 0, 1 and 3 leading dims
SHAPES = [
    ((), (769,)),
    ((5,), (1,)),
    ((7,), (3,)),
    ((9,), (769,)),
    ((2, 3, 4), (33,)),
    ((6,), (4, 5)),
    ((64,), (256,)),  # enough work to run on 2 threads
]
DT_IDS = lambda d: np.dtype(d).name  # noqa: E731


def _ids(shape):
    return f"lead{shape[0]}-ns{shape[1]}"


def _dw_atol(x, w, dtype):
    # dweight sums over rows: allow the float32 error to grow like sqrt(rows)
    return np.sqrt(max(1, x.size // w.size)) * 2e-5 if dtype == np.float32 else None


def _check_all(x, nshape, w, dy, dtype, context, eps=None):
    y, ctx = rms_norm_forward(x, nshape, w, eps)
    y_r, ctx_r = ref.rms_norm_forward(x, nshape, w, eps)
    assert y.dtype == dtype and y.shape == x.shape
    k = 1 if np.ndim(nshape) == 0 else len(nshape)
    assert ctx.rstd.shape == x.shape[:x.ndim - k] and ctx.rstd.dtype == np.float64
    assert_close(y, y_r, name="y", context=context)
    assert_close(ctx.rstd, ctx_r.rstd, dtype=dtype, name="rstd", context=context)
    dx, dw = rms_norm_backward(dy, ctx)
    dx_r, dw_r = ref.rms_norm_backward(dy, ctx_r)
    assert_close(dx, dx_r, name="dx", context=context)
    if w is None:
        assert dw is None
    else:
        assert dw.dtype == dtype and dw.shape == w.shape
        assert_close(dw, dw_r, name="dweight", context=context, atol=_dw_atol(x, w, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False], ids=["weight", "plain"])
def test_matches_reference(rng, threads, dtype, shape, layout, affine):
    lead, nshape = shape
    full = lead + nshape
    x = make_array(randn(rng, full, dtype), layout)
    dy = make_array(randn(rng, full, dtype), layout)
    w = randn(rng, nshape, dtype) if affine else None
    _check_all(x, nshape, w, dy, dtype, f"shape={full}, layout={layout}, threads={threads}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
@pytest.mark.parametrize("d", [3, 769, 4096])
def test_adversarial_rows(rng, dtype, case, d):
    x = ADVERSARIAL[case](rng, (6, d), dtype)
    dy = randn(rng, (6, d), dtype)
    _check_all(x, d, randn(rng, (d,), dtype), dy, dtype, f"case={case}, d={d}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_eps_default_and_explicit(rng, dtype):
    x = randn(rng, (4, 10), dtype)
    _, ctx = rms_norm_forward(x, 10)
    assert ctx.eps == float(np.finfo(dtype).eps)
    _check_all(x, 10, None, randn(rng, (4, 10), dtype), dtype, "eps=0.1", eps=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_zero_rows_are_finite(dtype):
    x = np.zeros((3, 50), dtype=dtype)
    w = np.linspace(-1, 1, 50).astype(dtype)
    y, ctx = rms_norm_forward(x, 50, w)
    assert np.all(y == 0) and np.all(np.isfinite(ctx.rstd))
    dx, dw = rms_norm_backward(np.ones_like(x), ctx)
    assert np.all(np.isfinite(dx)) and np.all(dw == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("d", [5, 769])
def test_nonfinite_stays_in_its_row(rng, dtype, bad, d):
    x = randn(rng, (8, d), dtype)
    x[3, d // 2] = bad
    dy = randn(rng, (8, d), dtype)
    w = randn(rng, (d,), dtype)
    y, ctx = rms_norm_forward(x, d, w)
    y_r, ctx_r = ref.rms_norm_forward(x, d, w)
    others = np.arange(8) != 3
    assert np.all(np.isfinite(y[others]))
    assert_close(y, y_r, name="y")
    dx, _ = rms_norm_backward(dy, ctx)
    dx_r, _ = ref.rms_norm_backward(dy, ctx_r)
    assert np.all(np.isfinite(dx[others]))
    assert_close(dx, dx_r, name="dx")


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("nshape", [(3,), (2, 4)])
def test_gradcheck(rng, affine, nshape):
    x = rng.standard_normal((4,) + nshape)
    dy = rng.standard_normal((4,) + nshape)
    w = rng.standard_normal(nshape) if affine else None
    _, ctx = rms_norm_forward(x, nshape, w, 1e-5)
    dx, dw = rms_norm_backward(dy, ctx)
    gradcheck(lambda x_, w_: rms_norm(x_, nshape, w_, 1e-5), [x, w], [dx, dw], dy,
              names=["x", "weight"])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(3, 5), (300, 769), (9, 2100)])
def test_two_threads_bitwise_equal_one(rng, dtype, shape):
    from threadpoolctl import threadpool_limits
    x, dy = randn(rng, shape, dtype), randn(rng, shape, dtype)
    w = randn(rng, shape[-1:], dtype)
    outs = []
    for nt in (1, 2):
        with threadpool_limits(limits=nt, user_api="openmp"):
            y, ctx = rms_norm_forward(x, shape[-1], w)
            outs.append((y, ctx.rstd) + rms_norm_backward(dy, ctx))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(5, 3), (37, 769), (9, 2100)])
def test_streaming_stores_path_is_bitwise_identical(rng, dtype, shape):
    x, dy = randn(rng, shape, dtype) * 3 + 1, randn(rng, shape, dtype)
    w = randn(rng, shape[-1:], dtype)
    plain = rms_norm_forward(x, shape[-1], w)
    plain_grads = rms_norm_backward(dy, plain[1])
    try:
        _tuning.set_stream_threshold(1)
        streamed = rms_norm_forward(x, shape[-1], w)
        streamed_grads = rms_norm_backward(dy, streamed[1])
    finally:
        _tuning.set_stream_threshold(None)
    np.testing.assert_array_equal(plain[0], streamed[0])
    for a, c in zip(plain_grads, streamed_grads):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("needs", list(itertools.product([True, False], repeat=2)))
def test_needs(rng, dtype, needs):
    x, dy = randn(rng, (40, 37), dtype), randn(rng, (40, 37), dtype)
    w = randn(rng, (37,), dtype)
    _, ctx = rms_norm_forward(x, 37, w)
    full = rms_norm_backward(dy, ctx)
    part = rms_norm_backward(dy, ctx, needs=needs)
    for want, a, b in zip(needs, full, part):
        if want:
            np.testing.assert_array_equal(a, b)   # skipping work changes no bit
        else:
            assert b is None


def test_out_reuse_and_no_input_modified(rng):
    x, dy = randn(rng, (6, 20), np.float32), randn(rng, (6, 20), np.float32)
    w = randn(rng, (20,), np.float32)
    copies = [a.copy() for a in (x, dy, w)]
    y_out, dx_out = np.empty_like(x), np.empty_like(x)
    for _ in range(2):
        y, ctx = rms_norm_forward(x, 20, w, out=y_out)
        dx, _ = rms_norm_backward(dy, ctx, out=dx_out)
        assert y is y_out and dx is dx_out
    np.testing.assert_array_equal(y, rms_norm(x, 20, w))
    for a, c in zip((x, dy, w), copies):
        np.testing.assert_array_equal(a, c)


def test_empty_leading_dims():
    x = np.empty((0, 8), np.float32)
    y, ctx = rms_norm_forward(x, 8, np.ones(8, np.float32))
    assert y.shape == (0, 8) and ctx.rstd.shape == (0,)
    dx, dw = rms_norm_backward(x, ctx)
    assert dx.shape == (0, 8) and np.all(dw == 0)


def test_errors(rng):
    x = randn(rng, (4, 6), np.float32)
    w = randn(rng, (6,), np.float32)
    with pytest.raises(TypeError, match="x must have dtype"):
        rms_norm(x.astype(np.int32), 6)
    with pytest.raises(TypeError, match="weight has dtype"):
        rms_norm(x, 6, w.astype(np.float64))
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(x, 6, w[:5])
    with pytest.raises(ValueError, match="normalized_shape"):
        rms_norm(x, 5)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, 6, w, -1.0)
    with pytest.raises(ValueError, match="0-d"):
        rms_norm(np.float32(1.0), 1)
    with pytest.raises(ValueError, match="overlaps"):
        rms_norm(x, 6, out=x)
    y, ctx = rms_norm_forward(x, 6, w)
    with pytest.raises(TypeError, match="ctx must be the RMSNormContext"):
        rms_norm_backward(x, object())
    with pytest.raises(ValueError, match="dy has shape"):
        rms_norm_backward(x[:3], ctx)
    with pytest.raises(TypeError, match="dy has dtype"):
        rms_norm_backward(x.astype(np.float64), ctx)
    with pytest.raises(ValueError, match="needs has 3 entries"):
        rms_norm_backward(x, ctx, needs=(True, True, True))
    with pytest.raises(TypeError, match="needs entry"):
        rms_norm_backward(x, ctx, needs=(1, True))
    import dataclasses
    bad = dataclasses.replace(ctx, rstd=ctx.rstd[:2])
    with pytest.raises(ValueError, match="ctx.rstd has shape"):
        rms_norm_backward(x, bad)
    bad = dataclasses.replace(ctx, weight=w.astype(np.float64))
    with pytest.raises(ValueError, match="ctx.weight has dtype"):
        rms_norm_backward(x, bad)
    assert isinstance(ctx, RMSNormContext)
