"""Residual add + norm (LayerNorm and RMSNorm) vs the float64 reference, and vs the unfused ops."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from conftest import ADVERSARIAL, DTYPES, LAYOUTS, make_array, randn
from threadpoolctl import threadpool_limits

from normffn import _tuning
from normffn import reference as ref
from normffn.add_norm import (AddLayerNormContext, AddRMSNormContext, add_layer_norm,
                              add_layer_norm_backward, add_layer_norm_forward, add_rms_norm,
                              add_rms_norm_backward, add_rms_norm_forward)
from normffn.layer_norm import layer_norm_backward, layer_norm_forward
from normffn.rms_norm import rms_norm_backward, rms_norm_forward
from normffn.testing import assert_close, gradcheck

SHAPES = [
    ((), (769,)),
    ((5,), (1,)),
    ((7,), (3,)),
    ((9,), (769,)),
    ((2, 3, 4), (33,)),
    ((6,), (4, 5)),
    ((64,), (256,)),
]
DT_IDS = lambda d: np.dtype(d).name  # noqa: E731
KINDS = ["layer", "rms"]


def _ops(kind):
    """(forward, backward, reference forward, reference backward, names of the grads)."""
    if kind == "layer":
        return (add_layer_norm_forward, add_layer_norm_backward, ref.add_layer_norm_forward,
                ref.add_layer_norm_backward, ("dsum", "dweight", "dbias"))
    return (add_rms_norm_forward, add_rms_norm_backward, ref.add_rms_norm_forward,
            ref.add_rms_norm_backward, ("dsum", "dweight"))


def _params(kind, rng, nshape, dtype, affine):
    if not affine:
        return ()
    w = randn(rng, nshape, dtype)
    return (w, randn(rng, nshape, dtype)) if kind == "layer" else (w,)


def _check_all(kind, x, r, nshape, params, dy, ds, dtype, context):
    fwd, bwd, rfwd, rbwd, names = _ops(kind)
    y, s, ctx = fwd(x, r, nshape, *params)
    y_r, s_r, ctx_r = rfwd(x, r, nshape, *params)
    assert y.dtype == s.dtype == dtype and y.shape == s.shape == x.shape
    np.testing.assert_array_equal(s, np.asarray(x) + np.asarray(r))   # exact in the dtype
    assert ctx.s is s
    assert_close(y, y_r, name="y", context=context)
    assert_close(ctx.rstd, ctx_r.rstd, dtype=dtype, name="rstd", context=context)
    if kind == "layer":
        assert_close(ctx.mean, ctx_r.mean, dtype=dtype, name="mean", context=context)
    grads = bwd(dy, ctx, ds)
    grads_r = rbwd(dy, ctx_r, ds)
    assert len(grads) == len(names)
    nrows = max(1, x.size // max(1, int(np.prod(nshape))))
    for name, g, g_r, p in zip(names, grads, grads_r, (x,) + params + (None,) * 2):
        if p is None:
            assert g is None, name
            continue
        atol = np.sqrt(nrows) * 2e-5 if dtype == np.float32 and name != "dsum" else None
        assert g.dtype == dtype and g.shape == np.shape(p)
        assert_close(g, g_r, name=name, context=context, atol=atol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"lead{s[0]}-ns{s[1]}")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("with_ds", [True, False], ids=["ds", "nods"])
def test_matches_reference(rng, threads, kind, dtype, shape, layout, affine, with_ds):
    lead, nshape = shape
    full = lead + nshape
    x, r, dy = (make_array(randn(rng, full, dtype), layout) for _ in range(3))
    ds = make_array(randn(rng, full, dtype), layout) if with_ds else None
    params = _params(kind, rng, nshape, dtype, affine)
    _check_all(kind, x, r, nshape, params, dy, ds, dtype,
               f"{kind} shape={full} layout={layout} ds={with_ds} threads={threads}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
@pytest.mark.parametrize("d", [3, 769, 4096])
def test_adversarial_rows(rng, kind, dtype, case, d):
    # the adversarial values split between x and residual: s is the hard row
    s = ADVERSARIAL[case](rng, (6, d), dtype)
    x = randn(rng, (6, d), dtype) * dtype(0.25)
    r = s - x
    _check_all(kind, x, r, d, _params(kind, rng, (d,), dtype, True), randn(rng, (6, d), dtype),
               randn(rng, (6, d), dtype), dtype, f"{kind} case={case} d={d}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_zero_rows_are_finite(kind, dtype):
    fwd, bwd, *_ = _ops(kind)
    x = np.zeros((3, 50), dtype=dtype)
    y, s, ctx = fwd(x, x.copy(), 50, *_params(kind, np.random.default_rng(0), (50,), dtype,
                                              True))
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(ctx.rstd))
    assert all(np.all(np.isfinite(g)) for g in bwd(np.ones_like(x), ctx, np.ones_like(x)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("d", [5, 769])
def test_nan_stays_in_its_row(rng, kind, dtype, d):
    fwd, bwd, rfwd, rbwd, _ = _ops(kind)
    x, r, dy = (randn(rng, (8, d), dtype) for _ in range(3))
    r[3, d // 2] = np.nan
    params = _params(kind, rng, (d,), dtype, True)
    y, s, ctx = fwd(x, r, d, *params)
    y_r, _, ctx_r = rfwd(x, r, d, *params)
    others = np.arange(8) != 3
    assert np.all(np.isfinite(y[others])) and np.all(np.isfinite(s[others]))
    assert_close(y, y_r, name="y")
    dsum = bwd(dy, ctx, dy)[0]
    assert np.all(np.isfinite(dsum[others]))
    assert_close(dsum, rbwd(dy, ctx_r, dy)[0], name="dsum")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(7, 3), (19, 96), (9, 100), (37, 769), (9, 2100)])
def test_bitwise_equal_to_unfused_ops(rng, dtype, shape):
    """add_X_norm(x, r) == X_norm(x + r), and without ds its backward == X_norm_backward: the
    fused body runs the unfused ops' arithmetic operation for operation."""
    d = shape[-1]
    x, r, dy = (randn(rng, shape, dtype) * 2 + 1 for _ in range(3))
    w, b = randn(rng, (d,), dtype), randn(rng, (d,), dtype)
    y, s, ctx = add_layer_norm_forward(x, r, d, w, b)
    y1, ctx1 = layer_norm_forward(x + r, d, w, b)
    for a, c in [(y, y1), (ctx.mean, ctx1.mean), (ctx.rstd, ctx1.rstd)] + \
            list(zip(add_layer_norm_backward(dy, ctx), layer_norm_backward(dy, ctx1))):
        np.testing.assert_array_equal(a, c)
    y, s, ctx = add_rms_norm_forward(x, r, d, w)
    y1, ctx1 = rms_norm_forward(x + r, d, w)
    for a, c in [(y, y1), (ctx.rstd, ctx1.rstd)] + \
            list(zip(add_rms_norm_backward(dy, ctx), rms_norm_backward(dy, ctx1))):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("nshape", [(3,), (2, 4)])
def test_gradcheck(rng, kind, affine, nshape):
    fwd, bwd, *_ = _ops(kind)
    x, r, dy, ds = (rng.standard_normal((4,) + nshape) for _ in range(4))
    params = _params(kind, rng, nshape, np.float64, affine)
    _, _, ctx = fwd(x, r, nshape, *params, eps=1e-5)
    grads = bwd(dy, ctx, ds)

    def f(x_, r_, *p):                       # L = sum(y * dy) + sum(s * ds)
        y, s, _ = fwd(x_, r_, nshape, *p, eps=1e-5)
        return np.concatenate([y.ravel(), s.ravel()])

    both = np.concatenate([dy.ravel(), ds.ravel()])
    gradcheck(f, [x, r, *params], [grads[0], grads[0], *grads[1:1 + len(params)]], both,
              names=["x", "residual", "weight", "bias"][:2 + len(params)])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(3, 5), (300, 769), (9, 2100)])
def test_two_threads_bitwise_equal_one(rng, kind, dtype, shape):
    fwd, bwd, *_ = _ops(kind)
    x, r, dy, ds = (randn(rng, shape, dtype) for _ in range(4))
    params = _params(kind, rng, shape[-1:], dtype, True)
    outs = []
    for nt in (1, 2):
        with threadpool_limits(limits=nt, user_api="openmp"):
            y, s, ctx = fwd(x, r, shape[-1], *params)
            outs.append((y, s, ctx.rstd) + bwd(dy, ctx, ds))
    for a, c in zip(*outs):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(5, 3), (37, 769), (9, 2100)])
def test_streaming_stores_path_is_bitwise_identical(rng, kind, dtype, shape):
    fwd, bwd, *_ = _ops(kind)
    x, r, dy, ds = (randn(rng, shape, dtype) for _ in range(4))
    params = _params(kind, rng, shape[-1:], dtype, True)
    plain = fwd(x, r, shape[-1], *params)
    plain = plain[:2] + bwd(dy, plain[2], ds)
    try:
        _tuning.set_stream_threshold(1)
        streamed = fwd(x, r, shape[-1], *params)
        streamed = streamed[:2] + bwd(dy, streamed[2], ds)
    finally:
        _tuning.set_stream_threshold(None)
    for a, c in zip(plain, streamed):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_ds", [True, False])
def test_needs(rng, kind, with_ds):
    fwd, bwd, _, _, names = _ops(kind)
    x, r, dy, ds = (randn(rng, (40, 37), np.float32) for _ in range(4))
    _, _, ctx = fwd(x, r, 37, *_params(kind, rng, (37,), np.float32, True))
    ds = ds if with_ds else None
    full = bwd(dy, ctx, ds)
    for needs in itertools.product([True, False], repeat=len(names)):
        part = bwd(dy, ctx, ds, needs=needs)
        for want, a, b in zip(needs, full, part):
            if want:
                np.testing.assert_array_equal(a, b)
            else:
                assert b is None


@pytest.mark.parametrize("kind", KINDS)
def test_out_pair_reuse_and_no_input_modified(rng, kind):
    fwd, bwd, *_ = _ops(kind)
    x, r, dy, ds = (randn(rng, (6, 20), np.float32) for _ in range(4))
    params = _params(kind, rng, (20,), np.float32, True)
    copies = [a.copy() for a in (x, r, dy, ds) + params]
    y_out, s_out, d_out = (np.empty_like(x) for _ in range(3))
    for _ in range(2):
        y, s, ctx = fwd(x, r, 20, *params, out=(y_out, s_out))
        dsum = bwd(dy, ctx, ds, out=d_out)[0]
        assert y is y_out and s is s_out and dsum is d_out
    y1, s1, _ = fwd(x, r, 20, *params)
    np.testing.assert_array_equal(y, y1)
    np.testing.assert_array_equal(s, s1)
    for a, c in zip((x, r, dy, ds) + params, copies):
        np.testing.assert_array_equal(a, c)


def test_public_pairs_and_defaults(rng):
    x, r = randn(rng, (4, 8), np.float64), randn(rng, (4, 8), np.float64)
    y, s = add_layer_norm(x, r, 8)
    np.testing.assert_array_equal(y, add_layer_norm_forward(x, r, 8)[0])
    y, s = add_rms_norm(x, r, 8)
    _, _, ctx = add_rms_norm_forward(x, r, 8)
    assert ctx.eps == float(np.finfo(np.float64).eps)
    assert isinstance(ctx, AddRMSNormContext) and ctx.x is ctx.s


@pytest.mark.parametrize("kind", KINDS)
def test_errors_and_nothing_modified(rng, kind):
    fwd, bwd, *_ = _ops(kind)
    x, r = randn(rng, (4, 6), np.float32), randn(rng, (4, 6), np.float32)
    params = _params(kind, rng, (6,), np.float32, True)
    y_out, s_out = np.full_like(x, 7), np.full_like(x, 7)
    with pytest.raises(ValueError, match="residual has shape"):
        fwd(x, r[:3], 6, *params)
    with pytest.raises(TypeError, match="residual has dtype"):
        fwd(x, r.astype(np.float64), 6, *params)
    with pytest.raises(TypeError, match="residual must have dtype"):
        fwd(x, r.astype(np.int64), 6, *params)
    with pytest.raises(TypeError, match="out must be a pair"):
        fwd(x, r, 6, *params, out=y_out)
    with pytest.raises(TypeError, match="out must be a pair"):
        fwd(x, r, 6, *params, out=(y_out,))
    with pytest.raises(ValueError, match=r"out\[1\] \(s\) overlaps"):
        fwd(x, r, 6, *params, out=(y_out, y_out))
    with pytest.raises(ValueError, match=r"out\[0\] \(y\) overlaps"):
        fwd(x, r, 6, *params, out=(x, s_out))
    with pytest.raises(ValueError, match=r"out\[1\] \(s\) has shape"):
        fwd(x, r, 6, *params, out=(y_out, s_out[:2]))
    with pytest.raises(ValueError, match="weight has shape"):
        fwd(x, r, 6, params[0][:5])
    with pytest.raises(ValueError, match="eps"):
        fwd(x, r, 6, *params, -1.0)
    assert np.all(y_out == 7) and np.all(s_out == 7)
    _, _, ctx = fwd(x, r, 6, *params)
    with pytest.raises(ValueError, match="ds has shape"):
        bwd(x, ctx, r[:2])
    with pytest.raises(TypeError, match="ds has dtype"):
        bwd(x, ctx, r.astype(np.float64))
    other = add_rms_norm_forward(x, r, 6)[2] if kind == "layer" else \
        add_layer_norm_forward(x, r, 6)[2]
    with pytest.raises(TypeError, match="ctx must be the"):
        bwd(x, other)
    with pytest.raises(TypeError, match="ctx must be the"):
        bwd(x, rms_norm_forward(x, 6)[1])
    with pytest.raises(ValueError, match="needs has"):
        bwd(x, ctx, needs=(True,))
    with pytest.raises(ValueError, match="ctx.rstd has shape"):
        bwd(x, dataclasses.replace(ctx, rstd=ctx.rstd[:1]))
    with pytest.raises(ValueError, match="ctx.s has dtype"):
        bwd(x, dataclasses.replace(ctx, s=ctx.s.astype(np.int32)))
    d_out = np.full_like(x, 7)
    with pytest.raises(ValueError, match="ds has shape"):
        bwd(x, ctx, r[:2], out=d_out)
    assert np.all(d_out == 7)
    if kind == "layer":
        with pytest.raises(ValueError, match="bias has shape"):
            fwd(x, r, 6, params[0], params[1][:2])
        assert isinstance(ctx, AddLayerNormContext)
