"""Fused FFN: y = act(x @ w1 + b1) @ w2 + b2 against normffn.reference, forward and backward."""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import normffn
from normffn import reference as ref
from normffn.testing import assert_close, gradcheck

from conftest import DTYPES

F = sys.modules["normffn.ffn"]   # the module (normffn.ffn is the function)
ACTS = ["relu", "gelu", "gelu_tanh", "silu"]
SIZES = [(1, 3), (3, 1), (65, 259), (259, 65)]        # (d, h)
LEADS = [(), (1,), (2, 5)]
GRAD_NAMES = ["dx", "dw1", "db1", "dw2", "db2"]


def make_params(rng, d, h, dtype, *, layout="C", bias=(True, True)):
    """x-independent parameters scaled so activations stay O(1); layout "F" gives PyTorch-style
    transposed weights (w = weight.T with weight C-contiguous)."""
    w1 = rng.standard_normal((d, h)) / np.sqrt(d)
    w2 = rng.standard_normal((h, d)) / np.sqrt(h)
    if layout == "F":
        w1, w2 = np.asfortranarray(w1), np.asfortranarray(w2)
    b1 = 0.5 * rng.standard_normal(h) if bias[0] else None
    b2 = 0.5 * rng.standard_normal(d) if bias[1] else None
    cast = (lambda a: None if a is None else a.astype(dtype, order="K"))
    return cast(w1), cast(b1), cast(w2), cast(b2)


def grad_tol(dtype):
    # grads are sums over rows and hidden units: allow a few more float32 ulps than y
    return dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else {}


def check_all(x, params, act, recompute, dy, label):
    y, ctx = normffn.ffn_forward(x, *params, activation=act, recompute=recompute)
    yr, cr = ref.ffn_forward(x, *params, activation=act)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, yr, name="y", context=label)
    grads = normffn.ffn_backward(dy, ctx)
    grads_r = ref.ffn_backward(dy, cr)
    for name, g, gr in zip(GRAD_NAMES, grads, grads_r):
        if gr is None:
            assert g is None, name
            continue
        assert g.dtype == x.dtype and g.shape == gr.shape, name
        assert_close(g, gr, name=name, context=label, **grad_tol(x.dtype))
    if act == "relu":
        np.testing.assert_array_equal(ctx.dead_units, cr.dead_units)
    else:
        assert ctx.dead_units is None
    return y, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("d,h", SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("lead", LEADS, ids=lambda v: "lead" + "x".join(map(str, v)))
@pytest.mark.parametrize("layout", ["C", "F"])
def test_matches_reference(rng, dtype, act, d, h, lead, layout):
    params = make_params(rng, d, h, dtype, layout=layout)
    x = rng.standard_normal(lead + (d,)).astype(dtype)
    dy = rng.standard_normal(lead + (d,)).astype(dtype)
    label = f"act={act} lead={lead} d={d} h={h} layout={layout}"
    y0, g0 = check_all(x, params, act, False, dy, label)
    y1, g1 = check_all(x, params, act, True, dy, label + " recompute")
    # recompute changes only where the hidden comes from, not the maths
    np.testing.assert_array_equal(y0, y1)
    for name, a, b in zip(GRAD_NAMES, g0, g1):
        if a is not None:
            assert_close(a, b, name=name, context="recompute on/off", rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(normffn.ffn(x, *params, activation=act), y0)


@pytest.mark.parametrize("bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_biases_none(rng, bias, act):
    params = make_params(rng, 65, 259, np.float64, bias=bias)
    x = rng.standard_normal((7, 65))
    dy = rng.standard_normal((7, 65))
    _, grads = check_all(x, params, act, False, dy, f"bias={bias}")
    assert (grads[2] is None) == (not bias[0]) and (grads[4] is None) == (not bias[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("recompute", [False, True])
def test_many_blocks(rng, monkeypatch, dtype, act, recompute):
    """Small blocks (ragged split of 301 rows) reach the block loop, dw accumulation over blocks
    and the full-dw2 path; results match the reference and the one-block run."""
    params = make_params(rng, 65, 259, dtype, layout="F")
    x = rng.standard_normal((301, 65)).astype(dtype)
    dy = rng.standard_normal((301, 65)).astype(dtype)
    y_one, g_one = check_all(x, params, act, recompute, dy, "one block")
    monkeypatch.setattr(F, "_MIN_BLOCK_ROWS", 1)
    small = 37 * 259 * np.dtype(dtype).itemsize
    for budget in ("_BLOCK_BYTES", "_INFERENCE_BLOCK_BYTES", "_RECOMPUTE_BLOCK_BYTES"):
        monkeypatch.setattr(F, budget, small)
    assert F._block_rows(301, 259, np.dtype(dtype).itemsize, small) < 301
    y_blk, g_blk = check_all(x, params, act, recompute, dy, "blocks")
    # not bitwise: BLAS may round a row differently in a GEMM of another shape
    assert_close(y_blk, y_one, name="y", context="blocked vs one block")
    assert_close(normffn.ffn(x, *params, act), y_one, name="y", context="ffn in blocks")
    for name, a, b in zip(GRAD_NAMES, g_one, g_blk):
        if a is not None:
            assert_close(b, a, name=name, context="blocked vs one block", **grad_tol(dtype))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("recompute", [False, True])
def test_gradcheck(rng, act, recompute):
    d, h = 5, 7
    w1, b1, w2, b2 = make_params(rng, d, h, np.float64)
    x = rng.standard_normal((2, 3, d))
    dy = rng.standard_normal((2, 3, d))
    _, ctx = normffn.ffn_forward(x, w1, b1, w2, b2, act, recompute=recompute)
    grads = normffn.ffn_backward(dy, ctx)
    fn = (lambda x_, w1_, b1_, w2_, b2_: normffn.ffn(x_, w1_, b1_, w2_, b2_, act))
    order = [0, 1, 2, 3, 4]
    gradcheck(fn, [x, w1, b1, w2, b2], [grads[i] for i in order], dy,
              names=["x", "w1", "b1", "w2", "b2"], rtol=1e-5, atol=1e-7)


def test_dead_units(rng):
    d, h = 9, 20
    w1, b1, w2, b2 = make_params(rng, d, h, np.float32)
    b1[[2, 5, 11]] = -100.0     # never let through
    x = rng.standard_normal((50, d)).astype(np.float32)
    _, ctx = normffn.ffn_forward(x, w1, b1, w2, b2)
    _, cr = ref.ffn_forward(x, w1, b1, w2, b2)
    assert ctx.dead_units.dtype == bool and ctx.dead_units.shape == (h,)
    np.testing.assert_array_equal(ctx.dead_units, cr.dead_units)
    assert ctx.dead_units[[2, 5, 11]].all() and ctx.dead_units.sum() == cr.dead_units.sum()
    _, ctx_r = normffn.ffn_forward(x, w1, b1, w2, b2, recompute=True)
    np.testing.assert_array_equal(ctx_r.dead_units, cr.dead_units)


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
@pytest.mark.parametrize("recompute", [False, True])
def test_zero_rows(rng, lead, recompute):
    w1, b1, w2, b2 = make_params(rng, 4, 6, np.float32)
    x = np.empty(lead + (4,), np.float32)
    assert normffn.ffn(x, w1, b1, w2, b2).shape == x.shape
    y, ctx = normffn.ffn_forward(x, w1, b1, w2, b2, recompute=recompute)
    assert y.shape == x.shape and ctx.dead_units.all()
    dx, dw1, db1, dw2, db2 = normffn.ffn_backward(np.empty_like(x), ctx)
    assert dx.shape == x.shape
    for g, shape in ((dw1, (4, 6)), (db1, (6,)), (dw2, (6, 4)), (db2, (4,))):
        assert g.shape == shape and g.dtype == np.float32 and not g.any()


@pytest.mark.parametrize("act", ACTS)
def test_nan_propagates(rng, act):
    d, h = 6, 10
    params = make_params(rng, d, h, np.float32)
    x = rng.standard_normal((5, d)).astype(np.float32)
    x[2, 3] = np.nan
    dy = rng.standard_normal((5, d)).astype(np.float32)
    y, _ = check_all(x, params, act, False, dy, "NaN in x[2, 3]")
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, axis=0)).all()
    check_all(x, params, act, True, dy, "NaN in x[2, 3], recompute")


def test_inputs_not_modified(rng):
    x = rng.standard_normal((2, 8, 5)).astype(np.float32)
    params = make_params(rng, 5, 12, np.float32, layout="F")
    dy = rng.standard_normal((2, 8, 5)).astype(np.float32)
    before = [None if a is None else a.copy() for a in (x, *params, dy)]
    for act in ACTS:
        for rec in (False, True):
            normffn.ffn(x, *params, activation=act)
            _, ctx = normffn.ffn_forward(x, *params, activation=act, recompute=rec)
            hidden = None if ctx.hidden is None else ctx.hidden.copy()
            normffn.ffn_backward(dy, ctx)
            if hidden is not None:
                np.testing.assert_array_equal(ctx.hidden, hidden)
    for a, b in zip((x, *params, dy), before):
        if a is not None:
            np.testing.assert_array_equal(a, b)


def test_weights_not_copied(rng):
    """C- and F-ordered weights reach BLAS as they are; other layouts are copied once."""
    x = rng.standard_normal((4, 5))
    w1c, b1, w2f, b2 = make_params(rng, 5, 7, np.float64)
    w2f = np.asfortranarray(w2f)
    _, ctx = normffn.ffn_forward(x, w1c, b1, w2f, b2)
    assert ctx.w1 is w1c and ctx.w2 is w2f
    torch_like = np.ascontiguousarray(w1c.T).T          # Linear.weight.T
    big = np.zeros((10, 7))
    big[::2] = w1c                                        # rows contiguous, row stride 14
    odd = np.repeat(w1c[:, :, None], 2, axis=2)[:, :, 0]  # neither axis contiguous
    for w in (torch_like, big[::2], odd):
        y, ctx = normffn.ffn_forward(x, w, b1, w2f, b2)
        assert_close(y, ref.ffn(x, w1c, b1, w2f, b2))
    assert normffn.ffn_forward(x, big[::2], b1, w2f, b2)[1].w1.base is big


def test_out(rng):
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    params = make_params(rng, 5, 6, np.float32)
    out = np.full(x.shape, np.nan, np.float32)
    assert normffn.ffn(x, *params, out=out) is out
    np.testing.assert_array_equal(out, normffn.ffn(x, *params))
    with pytest.raises(ValueError, match="out"):
        normffn.ffn(x, *params, out=np.empty((3, 4, 6), np.float32))
    with pytest.raises(ValueError, match="out"):
        normffn.ffn(x, *params, out=np.empty(x.shape, np.float64))
    with pytest.raises(ValueError, match="overlaps"):
        normffn.ffn(x, *params, out=x)


def test_threads_identical(rng):
    """1 and 2 OpenMP threads give bitwise-identical results (BLAS threads left as they are):
    the elementwise passes sum rows in order on one thread."""
    params = make_params(rng, 65, 600, np.float32)
    x = rng.standard_normal((300, 65)).astype(np.float32)
    dy = rng.standard_normal((300, 65)).astype(np.float32)
    results = []
    for n in (1, 2):
        with threadpool_limits(limits=n, user_api="openmp"):
            out = []
            for act in ("relu", "gelu"):
                y, ctx = normffn.ffn_forward(x, *params, activation=act)
                out += [y, *normffn.ffn_backward(dy, ctx)]
            results.append(out)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_blas_threads_restored(rng):
    """The caller's BLAS thread count is the same after every entry point."""
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    before = blas_threads()
    params = make_params(rng, 65, 600, np.float32)
    x = rng.standard_normal((300, 65)).astype(np.float32)
    _, ctx = normffn.ffn_forward(x, *params)
    normffn.ffn_backward(x, ctx)
    normffn.ffn(x, *params)
    assert blas_threads() == before


def test_threads_fixture_matches_reference(rng, threads):
    params = make_params(rng, 33, 140, np.float64, layout="F")
    x = rng.standard_normal((257, 33))
    dy = rng.standard_normal((257, 33))
    check_all(x, params, "gelu_tanh", False, dy, f"threads={threads}")


# ---------------------------------------------------------------- bad inputs
def _good(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    w1, b1, w2, b2 = make_params(rng, 4, 6, np.float32)
    return dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2)


BAD = [
    # (what to change, exception, the argument the message must name)
    (dict(x=np.float32(1.0)), ValueError, "x"),
    (dict(x=np.zeros((3, 4), np.int64)), TypeError, "x"),
    (dict(x=np.zeros((3, 5), np.float32)), ValueError, "w1"),
    (dict(x=np.zeros((3, 0), np.float32)), ValueError, "x"),
    (dict(w1=np.zeros((4, 0), np.float32)), ValueError, "w1"),
    (dict(w1=np.zeros((4, 6), np.float64)), TypeError, "w1"),
    (dict(w1=np.zeros(24, np.float32)), ValueError, "w1"),
    (dict(w1=np.zeros((5, 6), np.float32)), ValueError, "w1"),
    (dict(w2=np.zeros((6, 5), np.float32)), ValueError, "w2"),
    (dict(w2=np.zeros((4, 6), np.float32)), ValueError, "w2"),
    (dict(w2=np.zeros((6, 4), np.float16)), TypeError, "w2"),
    (dict(b1=np.zeros(5, np.float32)), ValueError, "b1"),
    (dict(b1=np.zeros(6, np.float64)), TypeError, "b1"),
    (dict(b2=np.zeros(6, np.float32)), ValueError, "b2"),
    (dict(b2=np.zeros((1, 4), np.float32)), ValueError, "b2"),
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(activation=None), TypeError, "activation"),
]


@pytest.mark.parametrize("change,exc,name", BAD,
                         ids=[f"{next(iter(c))}-{e.__name__}" for c, e, _ in BAD])
@pytest.mark.parametrize("entry", ["ffn", "ffn_forward"])
def test_bad_inputs(rng, change, exc, name, entry):
    args = _good(rng)
    change = dict(change)
    act = change.pop("activation", "relu") if "activation" in change else "relu"
    args.update(change)
    with pytest.raises(exc, match=name):
        getattr(normffn, entry)(args["x"], args["w1"], args["b1"], args["w2"], args["b2"],
                                activation=act)


def test_bad_recompute_and_dy(rng):
    a = _good(rng)
    with pytest.raises(TypeError, match="recompute"):
        normffn.ffn_forward(a["x"], a["w1"], a["b1"], a["w2"], a["b2"], recompute="yes")
    _, ctx = normffn.ffn_forward(a["x"], a["w1"], a["b1"], a["w2"], a["b2"])
    with pytest.raises(ValueError, match="dy"):
        normffn.ffn_backward(np.zeros((3, 5), np.float32), ctx)
    with pytest.raises(ValueError, match="dy"):
        normffn.ffn_backward(np.zeros((4,), np.float32), ctx)
    with pytest.raises(TypeError, match="dy"):
        normffn.ffn_backward(np.zeros((3, 4), np.float64), ctx)
    with pytest.raises(TypeError, match="ctx"):
        normffn.ffn_backward(np.zeros((3, 4), np.float32), object())


@pytest.mark.parametrize("field,value", [
    ("hidden", None), ("hidden", np.zeros((3, 5), np.float32)),
    ("w2", np.zeros((6, 5), np.float32)), ("b1", np.zeros(2, np.float32)),
    ("activation", "tanh"), ("x", np.zeros((3, 4), np.float64)),
    ("w1", np.zeros((4, 12), np.float32)[:, ::2]), ("recompute", True),
])
def test_tampered_context(rng, field, value):
    a = _good(rng)
    _, ctx = normffn.ffn_forward(a["x"], a["w1"], a["b1"], a["w2"], a["b2"])
    bad = dataclasses.replace(ctx, **{field: value})
    with pytest.raises(ValueError, match="ctx"):
        normffn.ffn_backward(np.zeros((3, 4), np.float32), bad)


def test_extra_memory_is_blocks(rng, monkeypatch):
    """Beyond its outputs, ffn() holds one (block, h) scratch and recompute=True two — never an
    (n, h) buffer; recompute=False keeps the (n, h) hidden (tracemalloc sees NumPy's buffers)."""
    import tracemalloc

    n, d, h = 4096, 16, 512
    block = 1 << 20                               # 256 rows of h float64
    for budget in ("_BLOCK_BYTES", "_INFERENCE_BLOCK_BYTES", "_RECOMPUTE_BLOCK_BYTES"):
        monkeypatch.setattr(F, budget, block)
    w1, b1, w2, b2 = make_params(rng, d, h, np.float64)
    x = rng.standard_normal((n, d))
    dy = rng.standard_normal((n, d))
    slack = 64 << 10                               # small vectors: biases, flags, float64 sums

    def extra(fn):
        tracemalloc.start()
        try:
            outs = fn()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return peak - sum(a.nbytes for a in outs if a is not None)

    def train(recompute):
        y, ctx = normffn.ffn_forward(x, w1, b1, w2, b2, recompute=recompute)
        return (y, *normffn.ffn_backward(dy, ctx))

    assert extra(lambda: [normffn.ffn(x, w1, b1, w2, b2)]) <= block + slack
    assert extra(lambda: train(True)) <= 2 * block + slack
    kept = extra(lambda: train(False))              # the hidden, plus at most one dA block
    assert n * h * 8 <= kept <= n * h * 8 + block + slack


# ---------------------------------------------------------------- needs, out=, hidden_out=
NEEDS = [(True, False, False, False, False), (False, True, False, False, False),
         (False, False, True, False, False), (False, False, False, True, False),
         (False, False, False, False, True), (False, True, True, True, True),
         (True, False, True, False, True), (False, False, False, True, True),
         (False, False, False, False, False)]


@pytest.mark.parametrize("needs", NEEDS, ids=lambda n: "".join("1" if v else "0" for v in n))
@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("blocks", [False, True], ids=["one-block", "blocks"])
def test_needs(rng, monkeypatch, needs, act, recompute, blocks):
    """A gradient not asked for is None; those asked for are bitwise what a full backward gives
    (the same GEMMs and passes run for them)."""
    if blocks:
        monkeypatch.setattr(F, "_MIN_BLOCK_ROWS", 1)
        for budget in ("_BLOCK_BYTES", "_INFERENCE_BLOCK_BYTES", "_RECOMPUTE_BLOCK_BYTES"):
            monkeypatch.setattr(F, budget, 37 * 259 * 4)
    params = make_params(rng, 65, 259, np.float32, layout="F")
    x = rng.standard_normal((301, 65)).astype(np.float32)
    dy = rng.standard_normal((301, 65)).astype(np.float32)
    _, ctx = normffn.ffn_forward(x, *params, activation=act, recompute=recompute)
    full = normffn.ffn_backward(dy, ctx)
    part = normffn.ffn_backward(dy, ctx, needs=needs)
    for name, need, a, b in zip(GRAD_NAMES, needs, full, part):
        if need:
            np.testing.assert_array_equal(b, a, err_msg=name)
        else:
            assert b is None, name


def test_needs_missing_bias_and_errors(rng):
    w1, _, w2, _ = make_params(rng, 4, 6, np.float64)
    x = rng.standard_normal((3, 4))
    _, ctx = normffn.ffn_forward(x, w1, None, w2, None)
    grads = normffn.ffn_backward(x, ctx, needs=(True,) * 5)
    assert grads[2] is None and grads[4] is None and grads[0] is not None
    with pytest.raises(ValueError, match="needs"):
        normffn.ffn_backward(x, ctx, needs=(True,) * 4)
    with pytest.raises(TypeError, match="needs"):
        normffn.ffn_backward(x, ctx, needs=(1, True, True, True, True))


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("recompute", [False, True])
def test_training_step_buffers(rng, act, recompute):
    """A training loop reuses y, the hidden and every gradient buffer across steps; results are
    bitwise those of fresh allocations, and the buffers are the ones returned."""
    params = make_params(rng, 65, 130, np.float32, layout="F")
    shape = (4, 25, 65)
    y_buf = np.empty(shape, np.float32)
    g_buf = (np.empty(shape, np.float32), np.empty((65, 130), np.float32),
             np.empty(130, np.float32), None, np.empty(65, np.float32))
    hidden = None
    for step in range(3):
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        y_ref, ctx_ref = normffn.ffn_forward(x, *params, activation=act, recompute=recompute)
        g_ref = normffn.ffn_backward(dy, ctx_ref)
        y, ctx = normffn.ffn_forward(x, *params, activation=act, recompute=recompute,
                                     out=y_buf, hidden_out=hidden)
        assert y is y_buf
        np.testing.assert_array_equal(y, y_ref)
        if not recompute:
            assert hidden is None or ctx.hidden is hidden
            np.testing.assert_array_equal(ctx.hidden, ctx_ref.hidden)
            hidden = ctx.hidden
        grads = normffn.ffn_backward(dy, ctx, out=g_buf)
        for name, g, buf, gr in zip(GRAD_NAMES, grads, g_buf, g_ref):
            if buf is not None:
                assert g is buf, name
            np.testing.assert_array_equal(g, gr, err_msg=name)


def test_out_buffers_rejected(rng):
    params = make_params(rng, 4, 6, np.float32)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    _, ctx = normffn.ffn_forward(x, *params)
    good = [np.empty((3, 4), np.float32), np.empty((4, 6), np.float32),
            np.empty(6, np.float32), np.empty((6, 4), np.float32), np.empty(4, np.float32)]
    for i, bad in [(0, np.empty((3, 5), np.float32)), (1, np.empty((4, 6), np.float64)),
                   (2, np.empty(7, np.float32)), (3, np.empty((6, 8), np.float32)[:, ::2]),
                   (4, x[0]), (0, ctx.x), (3, ctx.hidden.reshape(6, 3).T.copy().T)]:
        out = list(good)
        out[i] = bad
        with pytest.raises(ValueError, match=rf"out\[{i}\]"):
            normffn.ffn_backward(x, ctx, out=tuple(out))
    out = list(good)
    out[4] = good[0][0]                                       # overlaps out[0]
    with pytest.raises(ValueError, match="overlaps"):
        normffn.ffn_backward(x, ctx, out=tuple(out))
    with pytest.raises(ValueError, match="out"):
        normffn.ffn_backward(x, ctx, out=tuple(good[:4]))
    # forward buffers
    with pytest.raises(ValueError, match="hidden_out"):
        normffn.ffn_forward(x, *params, hidden_out=np.empty((3, 5), np.float32))
    with pytest.raises(ValueError, match="hidden_out"):
        normffn.ffn_forward(x, *params, recompute=True, hidden_out=np.empty((3, 6), np.float32))
    buf = np.empty(30, np.float32)                             # out and hidden_out overlap
    with pytest.raises(ValueError, match="hidden_out"):
        normffn.ffn_forward(x, *params, out=buf[:12].reshape(3, 4),
                            hidden_out=buf[10:28].reshape(3, 6))
    with pytest.raises(ValueError, match="out"):
        normffn.ffn_forward(x, *params, out=np.empty((3, 5), np.float32))


# ---------------------------------------------------------------- gated activations (issue #12)
from normffn import reference as refg  # noqa: E402

GATED = ["swiglu", "geglu", "reglu"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["relu", "gelu", "swiglu", "reglu"])
@pytest.mark.parametrize("recompute", [False, True])
def test_weight_grads_into_transposed_outs(rng, dtype, act, recompute):
    """dw1/dw2 given as transposed views of C-contiguous arrays (nn.Linear's layout) receive
    the same gradients as C-contiguous buffers, in that layout; odd sizes, several blocks."""
    d, h, n = 7, 5, 769
    gated = act in ("swiglu", "reglu")
    params = make_gated(rng, d, h, dtype) if gated else make_params(rng, d, h, dtype)
    hw = params[0].shape[1]
    x = rng.standard_normal((n, d)).astype(dtype)
    dy = rng.standard_normal((n, d)).astype(dtype)
    _, ctx = normffn.ffn_forward(x, *params, activation=act, recompute=recompute)
    want = normffn.ffn_backward(dy, ctx)
    lin1, lin2 = np.full((hw, d), np.nan, dtype), np.full((d, h), np.nan, dtype)
    got = normffn.ffn_backward(dy, ctx, out=(None, lin1.T, None, lin2.T, None))
    assert got[1].base is lin1 and got[3].base is lin2
    for g, w, name in zip(got, want, ("dx", "dw1", "db1", "dw2", "db2")):
        assert_close(g, w, name=name, **grad_tol(dtype))
    # only dw2 (the whole-matrix GEMM after the loop for relu), only dw1
    for needs in ((False, False, False, True, False), (False, True, False, False, False)):
        lin1[...], lin2[...] = np.nan, np.nan
        got = normffn.ffn_backward(dy, ctx, out=(None, lin1.T, None, lin2.T, None), needs=needs)
        i = needs.index(True)
        assert_close(got[i], want[i], **grad_tol(dtype))


def test_ffn_block_weight_grads_into_transposed_outs(rng):
    d, h, n = 6, 4, 33
    dtype = np.float64
    w1, b1, w2, b2 = make_params(rng, d, h, dtype)
    nw = (1 + 0.1 * rng.standard_normal(d)).astype(dtype)
    x = rng.standard_normal((n, d)).astype(dtype)
    dy = rng.standard_normal((n, d)).astype(dtype)
    for placement in ("pre", "post"):
        _, ctx = normffn.ffn_block_forward(x, nw, None, w1, b1, w2, b2, "relu",
                                           placement=placement)
        want = normffn.ffn_block_backward(dy, ctx)
        lin1, lin2 = np.empty((h, d), dtype), np.empty((d, h), dtype)
        got = normffn.ffn_block_backward(dy, ctx,
                                         out=(None, None, None, lin1.T, None, lin2.T, None))
        assert got[3].base is lin1 and got[5].base is lin2
        for g, w in zip(got, want):
            if w is not None:
                assert_close(g, w)


def make_gated(rng, d, h, dtype, *, layout="C", bias=(True, True)):
    """Packed gated parameters: w1 (d, 2h) = [gate | up], b1 (2h,), w2 (h, d), b2 (d,);
    layout "torch" packs nn.Linear-shaped (h, d) weights with pack_gated (w1 is then F-ordered)
    and gives w2 as down_proj.weight.T."""
    wg = rng.standard_normal((d, h)) / np.sqrt(d)
    wu = rng.standard_normal((d, h)) / np.sqrt(d)
    w2 = rng.standard_normal((h, d)) / np.sqrt(h)
    bg, bu = (0.5 * rng.standard_normal(h), 0.5 * rng.standard_normal(h)) if bias[0] else (None,
                                                                                           None)
    b2 = 0.5 * rng.standard_normal(d) if bias[1] else None
    cast = (lambda a: None if a is None else a.astype(dtype))
    wg, wu, bg, bu, w2, b2 = map(cast, (wg, wu, bg, bu, w2, b2))
    if layout == "torch":
        w1, b1 = F.pack_gated(np.ascontiguousarray(wg.T), np.ascontiguousarray(wu.T), bg, bu,
                              layout="torch")
        w2 = np.ascontiguousarray(w2.T).T
    else:
        w1, b1 = F.pack_gated(wg, wu, bg, bu)
    return w1, b1, w2, b2


def check_gated(x, params, act, recompute, dy, label):
    y, ctx = normffn.ffn_forward(x, *params, activation=act, recompute=recompute)
    yr, cr = refg.ffn_forward(x, *params, activation=act)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, yr, name="y", context=label)
    grads = normffn.ffn_backward(dy, ctx)
    for name, g, gr in zip(GRAD_NAMES, grads, refg.ffn_backward(dy, cr)):
        if gr is None:
            assert g is None, name
            continue
        assert g.dtype == x.dtype and g.shape == gr.shape, name
        assert_close(g, gr, name=name, context=label, **grad_tol(x.dtype))
    if act == "reglu":
        np.testing.assert_array_equal(ctx.dead_units, cr.dead_units)
    else:
        assert ctx.dead_units is None
    h = params[2].shape[0]
    assert ctx.hidden is None if recompute else ctx.hidden.shape == (x.size // x.shape[-1], 2 * h)
    return y, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("act", GATED)
@pytest.mark.parametrize("d,h", SIZES + [(769, 3)], ids=lambda v: str(v))
@pytest.mark.parametrize("lead", LEADS, ids=lambda v: "lead" + "x".join(map(str, v)))
@pytest.mark.parametrize("layout", ["C", "torch"])
def test_gated_matches_reference(rng, dtype, act, d, h, lead, layout):
    params = make_gated(rng, d, h, dtype, layout=layout)
    x = rng.standard_normal(lead + (d,)).astype(dtype)
    dy = rng.standard_normal(lead + (d,)).astype(dtype)
    label = f"act={act} lead={lead} d={d} h={h} layout={layout}"
    y0, g0 = check_gated(x, params, act, False, dy, label)
    y1, g1 = check_gated(x, params, act, True, dy, label + " recompute")
    np.testing.assert_array_equal(y0, y1)
    for name, a, b in zip(GRAD_NAMES, g0, g1):
        assert_close(a, b, name=name, context="recompute on/off", rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(normffn.ffn(x, *params, activation=act), y0)


@pytest.mark.parametrize("bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("act", GATED)
def test_gated_biases_none(rng, bias, act):
    params = make_gated(rng, 65, 130, np.float64, bias=bias)
    x = rng.standard_normal((7, 65))
    dy = rng.standard_normal((7, 65))
    _, grads = check_gated(x, params, act, False, dy, f"bias={bias}")
    assert (grads[2] is None) == (not bias[0]) and (grads[4] is None) == (not bias[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("act", GATED)
@pytest.mark.parametrize("recompute", [False, True])
def test_gated_many_blocks(rng, monkeypatch, dtype, act, recompute):
    params = make_gated(rng, 65, 130, dtype, layout="torch")
    x = rng.standard_normal((301, 65)).astype(dtype)
    dy = rng.standard_normal((301, 65)).astype(dtype)
    y_one, g_one = check_gated(x, params, act, recompute, dy, "one block")
    monkeypatch.setattr(F, "_MIN_BLOCK_ROWS", 1)
    for budget in ("_BLOCK_BYTES", "_INFERENCE_BLOCK_BYTES", "_RECOMPUTE_BLOCK_BYTES"):
        monkeypatch.setattr(F, budget, 37 * 260 * np.dtype(dtype).itemsize)
    y_blk, g_blk = check_gated(x, params, act, recompute, dy, "blocks")
    assert_close(y_blk, y_one, name="y", context="blocked vs one block")
    assert_close(normffn.ffn(x, *params, act), y_one, name="y", context="ffn in blocks")
    for name, a, b in zip(GRAD_NAMES, g_one, g_blk):
        assert_close(b, a, name=name, context="blocked vs one block", **grad_tol(dtype))


@pytest.mark.parametrize("act", GATED)
@pytest.mark.parametrize("recompute", [False, True])
def test_gated_gradcheck(rng, act, recompute):
    d, h = 5, 7
    w1, b1, w2, b2 = make_gated(rng, d, h, np.float64)
    x = rng.standard_normal((2, 3, d))
    if act == "reglu":   # keep the gate away from its kink at 0
        b1[:h] += np.sign(b1[:h]) * 0.5
    dy = rng.standard_normal((2, 3, d))
    _, ctx = normffn.ffn_forward(x, w1, b1, w2, b2, act, recompute=recompute)
    grads = normffn.ffn_backward(dy, ctx)
    fn = (lambda x_, w1_, b1_, w2_, b2_: normffn.ffn(x_, w1_, b1_, w2_, b2_, act))
    gradcheck(fn, [x, w1, b1, w2, b2], list(grads), dy,
              names=["x", "w1", "b1", "w2", "b2"], rtol=1e-5, atol=1e-7)


def test_reglu_dead_units(rng):
    d, h = 9, 20
    w1, b1, w2, b2 = make_gated(rng, d, h, np.float32)
    b1[[2, 5, 11]] = -100.0           # gates that never open
    b1[h + 3] = -100.0                # an up unit: not a gate, never "dead"
    x = rng.standard_normal((50, d)).astype(np.float32)
    for recompute in (False, True):
        _, ctx = normffn.ffn_forward(x, w1, b1, w2, b2, "reglu", recompute=recompute)
        _, cr = refg.ffn_forward(x, w1, b1, w2, b2, "reglu")
        assert ctx.dead_units.dtype == bool and ctx.dead_units.shape == (h,)
        np.testing.assert_array_equal(ctx.dead_units, cr.dead_units)
        assert ctx.dead_units[[2, 5, 11]].all() and not ctx.dead_units[3]
    assert normffn.ffn_forward(x, w1, b1, w2, b2, "swiglu")[1].dead_units is None


@pytest.mark.parametrize("act", GATED)
def test_gated_nan_propagates(rng, act):
    params = make_gated(rng, 6, 10, np.float32)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    x[2, 3] = np.nan
    dy = rng.standard_normal((5, 6)).astype(np.float32)
    y, _ = check_gated(x, params, act, False, dy, "NaN in x[2, 3]")
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, axis=0)).all()
    check_gated(x, params, act, True, dy, "NaN in x[2, 3], recompute")


def test_gated_torch_layout_not_copied(rng):
    """pack_gated(layout="torch") gives the transposed view of the packed nn.Linear weight;
    it and down_proj.weight.T reach BLAS as they are."""
    d, h = 5, 7
    wg, wu = rng.standard_normal((h, d)), rng.standard_normal((h, d))   # gate_proj, up_proj
    w1, b1 = F.pack_gated(wg, wu, layout="torch")
    assert b1 is None and w1.shape == (d, 2 * h) and w1.flags.f_contiguous
    np.testing.assert_array_equal(w1.T, np.concatenate([wg, wu]))
    w2 = np.ascontiguousarray(rng.standard_normal((d, h))).T             # down_proj.weight.T
    x = rng.standard_normal((4, d))
    y, ctx = normffn.ffn_forward(x, w1, None, w2, None, "swiglu")
    assert ctx.w1 is w1 and ctx.w2 is w2
    s = x @ wg.T
    assert_close(y, (s / (1 + np.exp(-s)) * (x @ wu.T)) @ w2)


def test_pack_gated(rng):
    wg, wu = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    w1, b1 = F.pack_gated(wg, wu)
    assert w1.flags.c_contiguous and b1 is None
    np.testing.assert_array_equal(w1, np.hstack([wg, wu]))
    w1, b1 = F.pack_gated(wg, wu, None, np.arange(3.0))
    np.testing.assert_array_equal(b1, [0, 0, 0, 0, 1, 2])
    w1t, b1t = F.pack_gated(wg.T, wu.T, np.ones(3), None, layout="torch")   # (h, d) each
    np.testing.assert_array_equal(w1t, np.hstack([wg, wu]))
    assert w1t.T.flags.c_contiguous
    np.testing.assert_array_equal(b1t, [1, 1, 1, 0, 0, 0])
    with pytest.raises(ValueError, match="w_up"):
        F.pack_gated(wg, wu[:, :2])
    with pytest.raises(TypeError, match="w_up"):
        F.pack_gated(wg, wu.astype(np.float32))
    with pytest.raises(ValueError, match="b_gate"):
        F.pack_gated(wg, wu, np.ones(4))
    with pytest.raises(ValueError, match="layout"):
        F.pack_gated(wg, wu, layout="hf")


def _good_gated(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    w1, b1, w2, b2 = make_gated(rng, 4, 6, np.float32)
    return dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2)


BAD_GATED = [
    (dict(w1=np.zeros((4, 11), np.float32)), "w1"),          # odd width
    (dict(w1=np.zeros((4, 6), np.float32)), "w2"),           # (d, h): w2 must then be (3, d)
    (dict(b1=np.zeros(6, np.float32)), "b1"),                # length h, not 2h
    (dict(b1=np.zeros(13, np.float32)), "b1"),
    (dict(w2=np.zeros((12, 4), np.float32)), "w2"),          # (2h, d)
]


@pytest.mark.parametrize("change,name", BAD_GATED, ids=[n for _, n in BAD_GATED])
@pytest.mark.parametrize("entry", ["ffn", "ffn_forward"])
def test_gated_bad_shapes(rng, change, name, entry):
    args = _good_gated(rng) | change
    with pytest.raises(ValueError, match=name):
        getattr(normffn, entry)(args["x"], args["w1"], args["b1"], args["w2"], args["b2"],
                                activation="swiglu")


@pytest.mark.parametrize("needs", NEEDS, ids=lambda n: "".join("1" if v else "0" for v in n))
@pytest.mark.parametrize("recompute", [False, True])
def test_gated_needs_and_buffers(rng, needs, recompute):
    params = make_gated(rng, 65, 130, np.float32, layout="torch")
    x = rng.standard_normal((301, 65)).astype(np.float32)
    dy = rng.standard_normal((301, 65)).astype(np.float32)
    _, ctx = normffn.ffn_forward(x, *params, activation="swiglu", recompute=recompute)
    full = normffn.ffn_backward(dy, ctx)
    bufs = tuple(np.full_like(g, np.nan) for g in full)
    part = normffn.ffn_backward(dy, ctx, needs=needs, out=bufs)
    for name, need, a, b, buf in zip(GRAD_NAMES, needs, full, part, bufs):
        if need:
            assert b is buf
            np.testing.assert_array_equal(b, a, err_msg=name)
        else:
            assert b is None and np.isnan(buf).all(), name
    if not recompute:
        y2, ctx2 = normffn.ffn_forward(x, *params, activation="swiglu", hidden_out=ctx.hidden)
        assert ctx2.hidden is ctx.hidden


def test_gated_extra_memory_is_blocks(rng, monkeypatch):
    """recompute=True keeps no (n, 2h) buffer: two blocks of scratch at most."""
    import tracemalloc

    n, d, h = 4096, 16, 256
    block = 1 << 20                               # 256 rows of 2h float64
    for budget in ("_BLOCK_BYTES", "_INFERENCE_BLOCK_BYTES", "_RECOMPUTE_BLOCK_BYTES"):
        monkeypatch.setattr(F, budget, block)
    w1, b1, w2, b2 = make_gated(rng, d, h, np.float64)
    x = rng.standard_normal((n, d))
    dy = rng.standard_normal((n, d))
    slack = 64 << 10

    def extra(fn):
        tracemalloc.start()
        try:
            outs = fn()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return peak - sum(a.nbytes for a in outs if a is not None)

    def train(recompute):
        y, ctx = normffn.ffn_forward(x, w1, b1, w2, b2, "swiglu", recompute=recompute)
        return (y, *normffn.ffn_backward(dy, ctx))

    assert extra(lambda: [normffn.ffn(x, w1, b1, w2, b2, "swiglu")]) <= block + slack
    assert extra(lambda: train(True)) <= 2 * block + slack
    kept = extra(lambda: train(False))        # the (n, 2h) hidden, dA block, a block
    assert n * 2 * h * 8 <= kept <= n * 2 * h * 8 + 2 * block + slack
