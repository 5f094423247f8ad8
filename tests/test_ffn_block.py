"""The fused FFN sublayer (pre/post-LN, LayerNorm/RMSNorm, every activation) against the
composition of the reference ops (normffn.reference), forward and backward."""
from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from normffn import reference as ref
from normffn.ffn_block import ffn_block, ffn_block_backward, ffn_block_forward
from normffn.testing import assert_close, gradcheck

from conftest import DTYPES, make_array

FB = importlib.import_module("normffn.ffn_block")
FFN = importlib.import_module("normffn.ffn")
ACTS = ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "reglu"]
GATED = ("swiglu", "geglu", "reglu")
NORMS = ["layer", "rms"]
PLACEMENTS = ["pre", "post"]
GRAD_NAMES = ["dx", "dnorm_weight", "dnorm_bias", "dw1", "db1", "dw2", "db2"]


def make_params(rng, d, h, dtype, act, norm, *, layout="C", bias=True):
    """(norm_weight, norm_bias, w1, b1, w2, b2), scaled so activations stay O(1); gated
    activations get the packed w1 (d, 2h); layout "F": PyTorch-style transposed weights."""
    hw = 2 * h if act in GATED else h
    nw = 1 + 0.2 * rng.standard_normal(d)
    nb = 0.2 * rng.standard_normal(d) if norm == "layer" and bias else None
    w1 = rng.standard_normal((d, hw)) / np.sqrt(d)
    w2 = rng.standard_normal((h, d)) / np.sqrt(h)
    if layout == "F":
        w1, w2 = np.asfortranarray(w1), np.asfortranarray(w2)
    b1 = 0.3 * rng.standard_normal(hw) if bias else None
    b2 = 0.3 * rng.standard_normal(d) if bias else None
    cast = (lambda a: None if a is None else a.astype(dtype, order="K"))
    return tuple(cast(p) for p in (nw, nb, w1, b1, w2, b2))


def tol(dtype):
    # a norm, two GEMMs and a residual: a few more float32 ulps than one op
    return dict(rtol=2e-4, atol=2e-4) if dtype == np.float32 else {}


def check_all(x, params, act, norm, placement, recompute, dy, label, **kw):
    """Forward and backward against the reference; returns (y, ctx, grads)."""
    y, ctx = ffn_block_forward(x, *params, act, norm=norm, placement=placement,
                               recompute=recompute, **kw)
    yr, cr = ref.ffn_block_forward(x, *params, act, norm=norm, placement=placement, **kw)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, yr, name="y", context=label, **tol(x.dtype))
    assert ctx.rstd.shape == x.shape[:-1] and ctx.rstd.dtype == np.float64
    assert_close(ctx.rstd, cr.rstd, name="rstd", context=label, **tol(x.dtype))
    if norm == "rms":
        assert ctx.mean is None
    else:
        assert ctx.mean.shape == x.shape[:-1]
        assert_close(ctx.mean, cr.mean, name="mean", context=label, **tol(x.dtype))
    if act in ("relu", "reglu"):
        np.testing.assert_array_equal(ctx.dead_units, cr.dead_units)
    else:
        assert ctx.dead_units is None
    grads = ffn_block_backward(dy, ctx)
    grads_r = ref.ffn_block_backward(dy, cr)
    assert len(grads) == 7
    for name, g, gr in zip(GRAD_NAMES, grads, grads_r):
        if gr is None:
            assert g is None, name
            continue
        assert g.dtype == x.dtype and g.shape == gr.shape, name
        assert_close(g, gr, name=name, context=label, **tol(x.dtype))
    return y, ctx, grads


# ---------------------------------------------------------------- against the reference
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", NORMS)
def test_matches_reference(rng, norm, placement, act, dtype):
    params = make_params(rng, 33, 47, dtype, act, norm)
    x = rng.standard_normal((2, 5, 33)).astype(dtype)
    dy = rng.standard_normal((2, 5, 33)).astype(dtype)
    label = f"{norm} {placement} {act}"
    y0, c0, g0 = check_all(x, params, act, norm, placement, False, dy, label)
    y1, c1, g1 = check_all(x, params, act, norm, placement, True, dy, label + " recompute")
    # recompute changes where xn and the hidden come from, not the maths
    np.testing.assert_array_equal(y0, y1)
    assert c1.hidden is None and c1.xn is None
    assert (c0.xn is not None) == (placement == "pre") and (c0.s is not None) == (
        placement == "post")
    for name, a, b in zip(GRAD_NAMES, g0, g1):
        if a is not None:
            assert_close(b, a, name=name, context="recompute on/off", rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(
        ffn_block(x, *params, act, norm=norm, placement=placement), y0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("shape", [(1,), (1, 1), (3, 1), (1, 3), (3, 3), (2, 769), (7, 769)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("act,h", [("relu", 3), ("gelu", 1), ("swiglu", 5)])
def test_odd_sizes_and_leading_dims(rng, norm, placement, act, h, shape, dtype):
    d = shape[-1]
    params = make_params(rng, d, h, dtype, act, norm)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    for recompute in (False, True):
        check_all(x, params, act, norm, placement, recompute, dy,
                  f"{norm} {placement} {act} shape={shape} h={h} recompute={recompute}")


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", NORMS)
def test_zero_rows(rng, norm, placement):
    params = make_params(rng, 6, 4, np.float64, "relu", norm)
    x = np.empty((0, 6))
    y, ctx = ffn_block_forward(x, *params, norm=norm, placement=placement)
    assert y.shape == (0, 6) and ctx.rstd.shape == (0,)
    assert ctx.dead_units.all()
    grads = ffn_block_backward(np.empty((0, 6)), ctx)
    assert grads[0].shape == (0, 6)
    for g in grads[1:]:
        assert g is None or not g.any()


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", NORMS)
def test_biases_and_weights_none(rng, norm, placement):
    params = make_params(rng, 17, 9, np.float64, "gelu", norm, bias=False)
    params = (None,) + params[1:]          # no norm weight either
    x = rng.standard_normal((4, 17))
    dy = rng.standard_normal((4, 17))
    _, _, grads = check_all(x, params, "gelu", norm, placement, False, dy, "no params")
    assert [g is None for g in grads] == [False, True, True, False, True, False, True]


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", NORMS)
def test_torch_layout_weights(rng, norm, placement):
    params = make_params(rng, 33, 47, np.float32, "silu", norm, layout="F")
    x = rng.standard_normal((6, 33)).astype(np.float32)
    dy = rng.standard_normal((6, 33)).astype(np.float32)
    _, ctx, _ = check_all(x, params, "silu", norm, placement, False, dy, "F weights")
    assert ctx.w1 is params[2] and ctx.w2 is params[4]      # read in place, not copied


@pytest.mark.parametrize("act", ["relu", "silu", "swiglu"])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", NORMS)
def test_many_blocks(rng, monkeypatch, norm, placement, recompute, act):
    """Small FFN blocks (ragged split of 301 rows): the residual is added block by block under
    the second GEMM, and post-LN's dx accumulates onto ds in place across blocks."""
    dtype = np.float64
    params = make_params(rng, 17, 29, dtype, act, norm, layout="F")
    x = rng.standard_normal((301, 17)).astype(dtype)
    dy = rng.standard_normal((301, 17)).astype(dtype)
    y_one, _, g_one = check_all(x, params, act, norm, placement, recompute, dy, "one block")
    monkeypatch.setattr(FFN, "_MIN_BLOCK_ROWS", 1)
    hw = params[2].shape[1]
    small = 37 * hw * np.dtype(dtype).itemsize
    for budget in ("_BLOCK_BYTES", "_INFERENCE_BLOCK_BYTES", "_RECOMPUTE_BLOCK_BYTES"):
        monkeypatch.setattr(FFN, budget, small)
    assert FFN._block_rows(301, hw, 8, small) < 301
    y_blk, _, g_blk = check_all(x, params, act, norm, placement, recompute, dy, "blocks")
    assert_close(y_blk, y_one, name="y", context="blocked vs one block")
    assert_close(ffn_block(x, *params, act, norm=norm, placement=placement), y_one, name="y",
                 context="ffn_block in blocks")
    for name, a, b in zip(GRAD_NAMES, g_one, g_blk):
        if a is not None:
            assert_close(b, a, name=name, context="blocked vs one block")


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("act", ["relu", "gelu_tanh", "swiglu", "reglu"])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck(rng, norm, placement, recompute, act):
    d, h = 5, 7
    params = make_params(rng, d, h, np.float64, act, norm)
    x = rng.standard_normal((2, 3, d))
    dy = rng.standard_normal((2, 3, d))
    _, ctx = ffn_block_forward(x, *params, act, norm=norm, placement=placement,
                               recompute=recompute)
    grads = ffn_block_backward(dy, ctx)

    def fn(*a):
        return ffn_block(*a, act, norm=norm, placement=placement)

    gradcheck(fn, [x, *params], grads, dy, names=["x", "norm_weight", "norm_bias", "w1", "b1",
                                                  "w2", "b2"], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- needs= and out=
NEEDS = [(True, False, False, False, False, False, False),
         (False, True, True, False, False, False, False),
         (False, False, False, True, False, False, False),
         (False, False, False, False, False, True, True),
         (False, True, False, True, True, False, False),
         (True, False, False, False, False, True, False),
         (False,) * 7]


@pytest.mark.parametrize("needs", NEEDS, ids=lambda v: "".join("1" if b else "0" for b in v))
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("act", ["relu", "geglu"])
def test_needs(rng, act, norm, placement, recompute, needs):
    params = make_params(rng, 19, 23, np.float64, act, norm)
    x = rng.standard_normal((9, 19))
    dy = rng.standard_normal((9, 19))
    _, ctx = ffn_block_forward(x, *params, act, norm=norm, placement=placement,
                               recompute=recompute)
    full = ffn_block_backward(dy, ctx)
    part = ffn_block_backward(dy, ctx, needs=needs)
    for name, want, a, b in zip(GRAD_NAMES, needs, full, part):
        if not want or a is None:
            assert b is None, name
        else:
            np.testing.assert_allclose(b, a, rtol=1e-13, atol=1e-13, err_msg=name)


def test_needs_errors(rng):
    params = make_params(rng, 8, 4, np.float64, "relu", "layer")
    x = rng.standard_normal((3, 8))
    _, ctx = ffn_block_forward(x, *params)
    with pytest.raises(ValueError, match="needs"):          # wrong length: a wrong value
        ffn_block_backward(x, ctx, needs=(True,) * 6)
    for bad in ["all", (1, 1, 1, 1, 1, 1, 1)]:              # not a tuple of bools: a wrong kind
        with pytest.raises(TypeError, match="needs"):
            ffn_block_backward(x, ctx, needs=bad)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", NORMS)
def test_out(rng, norm, placement):
    params = make_params(rng, 33, 47, np.float32, "gelu", norm)
    x = rng.standard_normal((2, 6, 33)).astype(np.float32)
    dy = rng.standard_normal((2, 6, 33)).astype(np.float32)
    y_ref, ctx = ffn_block_forward(x, *params, "gelu", norm=norm, placement=placement)
    out = np.full_like(x, np.nan)
    y, ctx2 = ffn_block_forward(x, *params, "gelu", norm=norm, placement=placement, out=out)
    assert y is out
    np.testing.assert_array_equal(y, y_ref)
    out = np.full_like(x, np.nan)
    assert ffn_block(x, *params, "gelu", norm=norm, placement=placement, out=out) is out
    np.testing.assert_array_equal(out, y_ref)
    g_ref = ffn_block_backward(dy, ctx)
    bufs = tuple(None if g is None else np.full_like(g, np.nan) for g in g_ref)
    g = ffn_block_backward(dy, ctx2, out=bufs)
    for name, a, b, buf in zip(GRAD_NAMES, g_ref, g, bufs):
        if a is None:
            assert b is None
            continue
        assert b is buf, name
        np.testing.assert_array_equal(b, a, err_msg=name)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("act", ["relu", "swiglu"])
def test_training_step_reuses_hidden(rng, act, placement):
    """hidden_out= takes the previous step's ctx.hidden: same results, no fresh (n, h)."""
    params = make_params(rng, 16, 12, np.float64, act, "rms")
    x = rng.standard_normal((7, 16))
    dy = rng.standard_normal((7, 16))
    y0, c0 = ffn_block_forward(x, *params, act, norm="rms", placement=placement)
    g0 = ffn_block_backward(dy, c0)
    buf = c0.hidden
    y1, c1 = ffn_block_forward(x, *params, act, norm="rms", placement=placement,
                               hidden_out=buf)
    assert c1.hidden is buf
    np.testing.assert_array_equal(y1, y0)
    for a, b in zip(g0, ffn_block_backward(dy, c1)):
        if a is not None:
            np.testing.assert_array_equal(b, a)
    with pytest.raises(ValueError, match="hidden_out"):
        ffn_block_forward(x, *params, act, norm="rms", placement=placement, recompute=True,
                          hidden_out=buf)
    base = np.empty(x.size + buf.size)
    out, hid = base[:x.size].reshape(x.shape), base[x.size - 1:-1].reshape(buf.shape)
    with pytest.raises(ValueError, match="hidden_out overlaps"):
        ffn_block_forward(x, *params, act, norm="rms", placement=placement, out=out,
                          hidden_out=hid)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_training_step_reuses_kept(rng, placement):
    """kept_out= takes the previous step's ctx.xn (pre) or ctx.s (post): same results."""
    params = make_params(rng, 16, 12, np.float32, "relu", "layer")
    x = rng.standard_normal((2, 7, 16)).astype(np.float32)
    dy = rng.standard_normal((2, 7, 16)).astype(np.float32)
    y0, c0 = ffn_block_forward(x, *params, "relu", placement=placement)
    g0 = ffn_block_backward(dy, c0)
    buf = c0.xn if placement == "pre" else c0.s
    y1, c1 = ffn_block_forward(x, *params, "relu", placement=placement, kept_out=buf)
    kept = c1.xn if placement == "pre" else c1.s
    assert kept is buf
    np.testing.assert_array_equal(y1, y0)
    for a, b in zip(g0, ffn_block_backward(dy, c1)):
        if a is not None:
            np.testing.assert_array_equal(b, a)
    with pytest.raises(ValueError, match="kept_out"):
        ffn_block_forward(x, *params, "relu", placement=placement, kept_out=buf[:, :3])
    with pytest.raises(ValueError, match="kept_out"):
        ffn_block_forward(x, *params, "relu", placement=placement, kept_out=x)
    with pytest.raises(ValueError, match="kept_out overlaps"):
        ffn_block_forward(x, *params, "relu", placement=placement, out=buf, kept_out=buf)
    if placement == "pre":
        with pytest.raises(ValueError, match="kept_out must be None with recompute"):
            ffn_block_forward(x, *params, "relu", placement=placement, recompute=True,
                              kept_out=buf)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_recompute_keeps_no_hidden(rng, placement):
    """recompute=True: the context holds x, the statistics and (post-LN) s — nothing n x h,
    and pre-LN not even xn."""
    params = make_params(rng, 16, 64, np.float32, "swiglu", "layer")
    x = rng.standard_normal((50, 16)).astype(np.float32)
    _, ctx = ffn_block_forward(x, *params, "swiglu", placement=placement, recompute=True)
    kept = [getattr(ctx, f.name) for f in ctx._fields if f.name not in ("w1", "w2")]
    big = sum(a.nbytes for a in kept if isinstance(a, np.ndarray) and a.size >= x.size)
    assert big == x.nbytes * (1 if placement == "pre" else 2)


def test_out_rejected(rng):
    params = make_params(rng, 8, 4, np.float64, "relu", "layer")
    x = rng.standard_normal((3, 8))
    with pytest.raises(ValueError, match="overlaps"):
        ffn_block(x, *params, out=x)
    with pytest.raises(ValueError, match="out"):
        ffn_block(x, *params, out=np.empty((3, 9)))
    _, ctx = ffn_block_forward(x, *params)
    with pytest.raises(ValueError, match="7"):
        ffn_block_backward(x, ctx, out=(None,) * 5)
    with pytest.raises(ValueError, match="overlaps"):
        ffn_block_backward(x, ctx, out=(ctx.x,) + (None,) * 6)


# ---------------------------------------------------------------- hygiene
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", NORMS)
def test_threads_identical(rng, norm, placement, recompute):
    """1 and 2 OpenMP threads give bitwise-identical results (BLAS threads as they are)."""
    params = make_params(rng, 96, 64, np.float32, "silu", norm)
    x = rng.standard_normal((300, 96)).astype(np.float32)
    dy = rng.standard_normal((300, 96)).astype(np.float32)
    res = []
    for n in (1, 2):
        with threadpool_limits(limits=n, user_api="openmp"):
            y, ctx = ffn_block_forward(x, *params, "silu", norm=norm, placement=placement,
                                       recompute=recompute)
            res.append((y, ctx.rstd) + ffn_block_backward(dy, ctx))
    for a, b in zip(*res):
        if a is not None:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_norm_threads_with_scipy_blas(rng, monkeypatch, placement):
    """With scipy's BLAS the sublayer's norm passes run on one OpenMP thread (its GEMMs are
    OpenBLAS's pthreads); the caller's thread count is restored afterwards, on errors too."""
    from normffn._kernels import layer_norm as omp

    seen = []
    real = FB.run_add_norm_backward

    def spy(*args):
        seen.append(omp.max_threads())
        return real(*args)

    monkeypatch.setattr(FB, "run_add_norm_backward", spy)
    params = make_params(rng, 32, 16, np.float32, "relu", "layer")
    x = rng.standard_normal((40, 32)).astype(np.float32)
    with threadpool_limits(limits=2, user_api="openmp"):
        y, ctx = ffn_block_forward(x, *params, "relu", placement=placement)
        ffn_block_backward(x, ctx)
        assert seen == [1] and omp.max_threads() == 2

        def boom(*args):
            raise RuntimeError("boom")

        monkeypatch.setattr(FB, "layer_norm_run_forward", boom)
        with pytest.raises(RuntimeError, match="boom"):
            ffn_block_forward(x, *params, "relu", placement=placement)
        assert omp.max_threads() == 2


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", NORMS)
def test_inputs_not_modified(rng, norm, placement):
    params = make_params(rng, 16, 8, np.float32, "relu", norm)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    dy = rng.standard_normal((5, 16)).astype(np.float32)
    keep = [None if a is None else a.copy() for a in (x, dy) + params]
    _, ctx = ffn_block_forward(x, *params, norm=norm, placement=placement)
    ffn_block_backward(dy, ctx)
    ffn_block(x, *params, norm=norm, placement=placement)
    for a, k in zip((x, dy) + params, keep):
        if a is not None:
            np.testing.assert_array_equal(a, k)


@pytest.mark.parametrize("layout", ["strided", "transposed", "readonly"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_input_layouts(rng, placement, layout):
    """x and dy in any layout (copied once to C order); the result does not depend on it."""
    params = make_params(rng, 12, 10, np.float64, "silu", "layer")
    x = rng.standard_normal((6, 12))
    dy = rng.standard_normal((6, 12))
    y0, c0 = ffn_block_forward(x, *params, "silu", placement=placement)
    g0 = ffn_block_backward(dy, c0)
    xl, dyl = make_array(x, layout), make_array(dy, layout)
    y1, c1 = ffn_block_forward(xl, *params, "silu", placement=placement)
    g1 = ffn_block_backward(dyl, c1)
    np.testing.assert_array_equal(y1, y0)
    for a, b in zip(g0, g1):
        np.testing.assert_array_equal(b, a)
    np.testing.assert_array_equal(ffn_block(x.tolist(), *params, "silu", placement=placement),
                                  y0)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_nan_row(rng, placement):
    """A NaN in one row of x reaches only that row of y (the norm and both GEMMs are row-local)."""
    params = make_params(rng, 16, 8, np.float64, "gelu", "layer")
    x = rng.standard_normal((4, 16))
    x[2, 3] = np.nan
    y = ffn_block(x, *params, "gelu", placement=placement)
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, axis=0)).all()
    yr = ref.ffn_block(x, *params, "gelu", placement=placement)
    assert_close(y, yr, name="y")


def test_rms_eps(rng):
    """eps=None means the dtype's machine epsilon for RMSNorm; the default 1e-5 is kept."""
    params = make_params(rng, 8, 4, np.float32, "relu", "rms")
    x = (1e-3 * rng.standard_normal((3, 8))).astype(np.float32)
    _, ctx = ffn_block_forward(x, *params, norm="rms", eps=None)
    assert ctx.eps == float(np.finfo(np.float32).eps)
    _, ctx5 = ffn_block_forward(x, *params, norm="rms")
    assert ctx5.eps == 1e-5
    assert_close(ffn_block(x, *params, norm="rms", eps=None),
                 ref.ffn_block(x, *params, norm="rms", eps=None), name="y", **tol(np.float32))


# ---------------------------------------------------------------- bad arguments
def _good(rng):
    params = make_params(rng, 8, 4, np.float64, "relu", "layer")
    return dict(x=rng.standard_normal((3, 8)), norm_weight=params[0], norm_bias=params[1],
                w1=params[2], b1=params[3], w2=params[4], b2=params[5])


BAD = [
    ({"placement": "middle"}, ValueError, "placement"),
    ({"placement": None}, TypeError, "placement"),
    ({"norm": "group"}, ValueError, "norm"),
    ({"norm": 1}, TypeError, "norm"),
    ({"norm": "rms"}, ValueError, "norm_bias must be None"),
    ({"norm_weight": np.ones(7)}, ValueError, r"norm_weight has shape \(7,\), expected \(8,\)"),
    ({"norm_bias": np.ones((1, 8))}, ValueError, "norm_bias has shape"),
    ({"norm_weight": np.ones(8, np.float32)}, TypeError, "norm_weight"),
    ({"eps": -1.0}, ValueError, "eps"),
    ({"eps": None}, TypeError, "eps"),
    ({"activation": "tanh"}, ValueError, "activation"),
    ({"w1": np.ones((7, 4))}, ValueError, "w1"),
    ({"w2": np.ones((4, 7))}, ValueError, "w2"),
    ({"recompute": 1}, TypeError, "recompute"),
]


@pytest.mark.parametrize("change,exc,match", BAD, ids=[str(list(c)[0]) + "=" + repr(
    list(c.values())[0])[:12] for c, _, _ in BAD])
@pytest.mark.parametrize("entry", ["forward", "op"])
def test_bad_arguments(rng, change, exc, match, entry):
    args = _good(rng)
    change = dict(change)
    kw = {k: change.pop(k) for k in list(change) if k in ("placement", "norm", "eps",
                                                           "activation", "recompute")}
    args.update(change)
    if "recompute" in kw and entry == "op":
        pytest.skip("ffn_block has no recompute")
    keep = {k: None if v is None else v.copy() for k, v in args.items()}
    out = np.full((3, 8), 7.0)
    fn = ffn_block_forward if entry == "forward" else ffn_block
    with pytest.raises(exc, match=match):
        fn(*args.values(), out=out, **kw)
    np.testing.assert_array_equal(out, 7.0)           # nothing written
    for k, v in args.items():
        if v is not None:
            np.testing.assert_array_equal(v, keep[k])


def test_bad_backward(rng):
    args = _good(rng)
    _, ctx = ffn_block_forward(*args.values())
    with pytest.raises(TypeError, match="FFNBlockContext"):
        ffn_block_backward(args["x"], object())
    with pytest.raises(ValueError, match="dy has shape"):
        ffn_block_backward(np.ones((3, 7)), ctx)
    with pytest.raises(TypeError, match="dtype"):
        ffn_block_backward(args["x"].astype(np.float32), ctx)


@pytest.mark.parametrize("field,value", [
    ("xn", None), ("rstd", np.ones(2)), ("mean", None), ("norm", "group"),
    ("placement", "post"), ("hidden", None), ("norm_weight", np.ones(7)),
    ("eps", float("nan"))])
def test_tampered_context(rng, field, value):
    args = _good(rng)
    _, ctx = ffn_block_forward(*args.values())
    bad = dataclasses.replace(ctx, **{field: value})
    with pytest.raises(ValueError, match="ctx"):
        ffn_block_backward(args["x"], bad)
