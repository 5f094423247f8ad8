"""The small-call fast paths (issue 17, item 4) change cost, never results or checks.

Common calls (exact C-contiguous ndarrays of the float32/float64 dtype objects, an int or 1-tuple
normalized_shape, a float eps, needs=None) take fast paths in the op modules, contexts are
validated by a per-class predicate before the table walk, and ``out=`` skips the overlap test
when every array owns its memory.  These tests pin that: the fast path is taken, gives bitwise
what the general path gives, and everything the general path rejects is still rejected with the
same message.  No timings here.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import normffn
from normffn import _tuning, _workspace

LN = sys.modules["normffn.layer_norm"]
RMS = sys.modules["normffn.rms_norm"]
FFN = sys.modules["normffn.ffn"]

SHAPES = [(1, 768), (4, 768), (64, 768), (3, 5, 769), (769,)]
DTYPES = [np.float32, np.float64]


def _data(rng, shape, dtype):
    d = shape[-1]
    x = (1e4 + 0.1 * rng.standard_normal(shape)).astype(dtype)   # adversarial: large mean
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal(d).astype(dtype)
    b = rng.standard_normal(d).astype(dtype)
    return x, dy, w, b


def _strided(a):
    """An equal array that is not C-contiguous (takes the general path)."""
    big = np.full(a.shape[:-1] + (2 * a.shape[-1],), np.nan, a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


def _foreign_dtype(a):
    """An equal C-contiguous array whose dtype object is not numpy's canonical one (as after
    unpickling): equal to float32/float64, so valid, but not what the fast paths test for."""
    b = pickle.loads(pickle.dumps(a))
    assert b.dtype == a.dtype and b.dtype is not np.dtype(a.dtype)
    return b


def _same(a, b):
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def _spy(monkeypatch, module, name):
    """Count calls of module.name (a general-path function)."""
    calls = []
    real = getattr(module, name)

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(module, name, spy)
    return calls


# ---------------------------------------------------------------- fast == general, bitwise
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_fast_path_is_bitwise_the_general_path(rng, shape, dtype, monkeypatch):
    x, dy, w, b = _data(rng, shape, dtype)
    d = shape[-1]
    calls = _spy(monkeypatch, LN, "check_forward")
    bcalls = _spy(monkeypatch, LN, "check_backward")
    y, ctx = normffn.layer_norm_forward(x, d, w, b)
    y1 = normffn.layer_norm(x, (d,), w, b, 1e-5)
    grads = normffn.layer_norm_backward(dy, ctx)
    assert not calls and not bcalls                      # the fast paths were taken
    for variant in (dict(x=_strided(x)), dict(x=_foreign_dtype(x)), dict(ns=np.int64(d)),
                    dict(ns=[d]), dict(eps=np.float64(1e-5)), dict(w=_strided(w))):
        args = dict(x=x, ns=d, w=w, eps=1e-5) | variant
        yg, ctxg = normffn.layer_norm_forward(args["x"], args["ns"], args["w"], b,
                                              args["eps"])
        _same(y, yg)
        _same(y1, yg)
        _same(ctx.mean, ctxg.mean)
        _same(ctx.rstd, ctxg.rstd)
        assert ctxg.normalized_shape == ctx.normalized_shape == (d,)
        for g, gg in zip(grads, normffn.layer_norm_backward(_strided(dy), ctxg,
                                                            needs=(True, True, True))):
            _same(g, gg)
    assert len(calls) == 6 and len(bcalls) == 6          # ... and these the general path
    # a context built by hand (the dataclass constructor) is the same context
    hand = LN.LayerNormContext(**{f.name: getattr(ctx, f.name)
                                  for f in dataclasses.fields(ctx)})
    for g, gg in zip(grads, normffn.layer_norm_backward(dy, hand)):
        _same(g, gg)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_fast_path_is_bitwise_the_general_path(rng, shape, dtype, eps, monkeypatch):
    x, dy, w, _ = _data(rng, shape, dtype)
    d = shape[-1]
    calls = _spy(monkeypatch, RMS, "check_rms_norm")
    y, ctx = normffn.rms_norm_forward(x, d, w, eps)
    y1 = normffn.rms_norm(x, (d,), w, eps)
    grads = normffn.rms_norm_backward(dy, ctx)
    assert not calls
    for variant in (dict(x=_strided(x)), dict(x=_foreign_dtype(x)), dict(ns=np.int64(d))):
        args = dict(x=x, ns=d) | variant
        yg, ctxg = normffn.rms_norm_forward(args["x"], args["ns"], w, eps)
        _same(y, yg)
        _same(y1, yg)
        _same(ctx.rstd, ctxg.rstd)
        assert ctxg.eps == ctx.eps
        for g, gg in zip(grads, normffn.rms_norm_backward(_strided(dy), ctxg,
                                                          needs=(True, True))):
            _same(g, gg)
    assert len(calls) == 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 4, 0])
def test_ffn_fast_validate_is_bitwise_the_general_path(rng, rows, dtype):
    d, h = 96, 160
    x = rng.standard_normal((rows, d)).astype(dtype)
    dy = rng.standard_normal((rows, d)).astype(dtype)
    w1 = (rng.standard_normal((d, h)) / 10).astype(dtype)
    w2 = (rng.standard_normal((h, d)) / 10).astype(dtype)
    b1, b2 = np.zeros(h, dtype), rng.standard_normal(d).astype(dtype)
    y, ctx = normffn.ffn_forward(x, w1, b1, w2, b2, "gelu")
    assert ctx._valid_fast()
    grads = normffn.ffn_backward(dy, ctx)
    yg, ctxg = normffn.ffn_forward(_strided(x), _foreign_dtype(w1), b1, w2, b2, "gelu")
    _same(y, yg)
    _same(normffn.ffn(x, w1, b1, w2, b2, "gelu"), y)
    for g, gg in zip(grads, normffn.ffn_backward(_strided(dy), ctxg,
                                                 needs=(True,) * 5)):
        _same(g, gg)


# ---------------------------------------------------------------- contexts
def test_built_context_is_an_ordinary_frozen_dataclass(rng):
    x, dy, w, b = _data(rng, (4, 768), np.float32)
    _, ctx = normffn.layer_norm_forward(x, 768, w, b)
    same = LN.LayerNormContext(**{f.name: getattr(ctx, f.name)
                                  for f in dataclasses.fields(ctx)})
    assert repr(same) == repr(ctx)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.eps = 1.0
    assert dataclasses.replace(ctx, eps=1e-3).eps == 1e-3
    _, fctx = normffn.ffn_forward(x, np.ones((768, 8), np.float32), None,
                                  np.ones((8, 768), np.float32), None, "relu")
    assert fctx.dead_units.shape == (8,) and fctx.activation == "relu"


def _forged_layer_norm(ctx):
    """(how, forged ctx, expected message) — each must be rejected as before."""
    n = ctx.mean.shape[0]
    x = ctx.x
    out = [
        ("mean replaced", dataclasses.replace(ctx, mean=np.zeros(n + 1)),
         "ctx.mean has shape"),
        ("rstd float32", dataclasses.replace(ctx, rstd=ctx.rstd.astype(np.float32)),
         "ctx.rstd has dtype float32, expected float64"),
        ("x strided", dataclasses.replace(ctx, x=_strided(x)),
         "ctx.x is not in the memory layout"),
        ("weight wrong dtype", dataclasses.replace(ctx, weight=ctx.weight.astype(np.float64)),
         "ctx.weight has dtype float64"),
        ("normalized_shape", dataclasses.replace(ctx, normalized_shape=(x.shape[-1] + 1,)),
         "ctx is inconsistent"),
        ("weight a list", dataclasses.replace(ctx, weight=list(ctx.weight)),
         "ctx.weight must be a numpy.ndarray"),
    ]
    mutated = dataclasses.replace(ctx, mean=ctx.mean.copy())
    object.__setattr__(mutated, "mean", np.zeros((n, 2)))             # bypasses frozen
    out.append(("field set behind frozen", mutated, "ctx.mean has shape"))
    inplace = dataclasses.replace(ctx, rstd=ctx.rstd.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inplace.rstd.shape = (n, 1)                                   # the array itself altered
    out.append(("array reshaped in place", inplace, "ctx.rstd has shape"))
    return out


def test_forged_or_mutated_context_is_still_rejected(rng):
    x, dy, w, b = _data(rng, (4, 768), np.float32)
    _, ctx = normffn.layer_norm_forward(x, 768, w, b)
    for how, bad, message in _forged_layer_norm(ctx):
        assert not bad._valid_fast(), how
        with pytest.raises(ValueError, match=message):
            normffn.layer_norm_backward(dy, bad)
        with pytest.raises(ValueError, match=message):
            bad.validate()
    # the original is untouched by all this and still accepted
    assert ctx._valid_fast()
    normffn.layer_norm_backward(dy, ctx)
    with pytest.raises(TypeError, match="ctx must be the LayerNormContext"):
        normffn.layer_norm_backward(dy, normffn.rms_norm_forward(x, 768, w)[1])


def test_forged_rms_and_ffn_contexts_are_still_rejected(rng):
    x, dy, w, _ = _data(rng, (4, 768), np.float32)
    _, ctx = normffn.rms_norm_forward(x, 768, w)
    for bad, message in [
            (dataclasses.replace(ctx, rstd=np.zeros(5)), "ctx.rstd has shape"),
            (dataclasses.replace(ctx, normalized_shape=(767,)), "ctx"),
            (dataclasses.replace(ctx, x=x.astype(np.float64)), "ctx.weight has dtype")]:
        assert not bad._valid_fast()
        with pytest.raises(ValueError, match=message):
            normffn.rms_norm_backward(dy, bad)
    w1, w2 = np.ones((768, 16), np.float32), np.ones((16, 768), np.float32)
    _, fctx = normffn.ffn_forward(x, w1, None, w2, None, "gelu")
    for bad, message in [
            (dataclasses.replace(fctx, hidden=None), "ctx.hidden is None"),
            (dataclasses.replace(fctx, recompute=True), "must be None when ctx.recompute"),
            (dataclasses.replace(fctx, hidden=fctx.hidden[:2]), "ctx.hidden has shape"),
            (dataclasses.replace(fctx, activation="swish"), "ctx.activation must be one of"),
            (dataclasses.replace(fctx, w1=np.ones((768, 16, 1), np.float32)), "ctx.w1"),
            (dataclasses.replace(fctx, w2=np.ones((16, 768), np.float64)), "ctx.w2 has dtype")]:
        assert not bad._valid_fast()
        with pytest.raises(ValueError, match=message):
            normffn.ffn_backward(dy, bad)
    # a np.bool_ flag is not the fast predicate's case but still a valid context
    ok = dataclasses.replace(fctx, recompute=np.False_)
    assert not ok._valid_fast()
    ok.validate()


# ---------------------------------------------------------------- out=
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_out_buffers(rng, op):
    x, dy, w, b = _data(rng, (4, 768), np.float32)
    fwd = getattr(normffn, f"{op}_forward")
    bwd = getattr(normffn, f"{op}_backward")
    args = (x, 768, w, b) if op == "layer_norm" else (x, 768, w)
    y, ctx = fwd(*args)
    grads = bwd(dy, ctx)
    out = np.empty_like(x)
    assert fwd(*args, out=out)[0] is out
    _same(out, y)
    assert getattr(normffn, op)(*args, out=out) is out
    _same(out, y)
    dx = np.full_like(x, np.nan)
    assert bwd(dy, ctx, out=dx)[0] is dx
    _same(dx, grads[0])
    # a buffer that does not own its memory (a view) takes the exact overlap test: accepted
    big = np.empty((8, 768), np.float32)
    view = big[4:]
    assert fwd(*args, out=view)[0] is view
    _same(view, y)
    assert bwd(dy, ctx, out=view)[0] is view
    _same(view, grads[0])
    # rejected as before: overlapping an input, aliasing memory, read-only, wrong dtype
    alias = np.ndarray(x.shape, x.dtype, buffer=x)                   # x's memory, another object
    ro = np.empty_like(x)
    ro.setflags(write=False)
    cases = [(x, "overlaps an input"), (alias, "overlaps an input"),
             (ro, "must be writeable"), (np.empty(x.shape), "has dtype float64"),
             (np.empty((4, 769), np.float32), "has shape")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            fwd(*args, out=bad)
    for bad, message in [(dy, "overlaps an input"), (ctx.x, "overlaps an input"),
                         (np.ndarray(dy.shape, dy.dtype, buffer=dy), "overlaps an input")]:
        with pytest.raises(ValueError, match=message):
            bwd(dy, ctx, out=bad)
    w_in_out = np.empty((768,), np.float32)
    with pytest.raises(ValueError, match="overlaps an input"):
        fwd(w_in_out, 768, w_in_out, out=w_in_out)


# ---------------------------------------------------------------- threads, streaming, scratch
def test_kernels_read_the_thread_count_per_call():
    """No thread count is cached in Python: each kernel call asks OpenMP, so threadpoolctl
    limits (and their end) take effect at once."""
    before = LN._kernel.max_threads()
    with threadpool_limits(limits=1, user_api="openmp"):
        assert LN._kernel.max_threads() == 1
    assert LN._kernel.max_threads() == before


def test_omp_num_threads_reaches_the_fast_path_in_a_child():
    code = ("import numpy as np, normffn, sys; "
            "m = sys.modules['normffn.layer_norm']; "
            "x = np.ones((4, 768), np.float32); normffn.layer_norm(x, 768); "
            "print(m._kernel.max_threads())")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "1"


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_paths_are_thread_count_independent(rng, dtype):
    x, dy, w, b = _data(rng, (256, 768), dtype)
    res = []
    for n in (1, 2):
        with threadpool_limits(limits=n, user_api="openmp"):
            y, ctx = normffn.layer_norm_forward(x, 768, w, b)
            r, rctx = normffn.rms_norm_forward(x, 768, w)
            res.append((y, ctx.mean, ctx.rstd, *normffn.layer_norm_backward(dy, ctx),
                        r, *normffn.rms_norm_backward(dy, rctx)))
    for a, b_ in zip(*res):
        _same(a, b_)


def test_stream_threshold_setter_reaches_the_cached_threshold(rng):
    x, dy, w, b = _data(rng, (4, 768), np.float32)
    y = normffn.layer_norm(x, 768, w, b)
    try:
        assert _tuning.set_stream_threshold(1) == 1
        assert _tuning.stream_for(y) == 1
        _same(normffn.layer_norm(x, 768, w, b), y)       # the streaming stores, same values
    finally:
        _tuning.set_stream_threshold(None)
    assert _tuning.stream_for(y) == int(y.nbytes >= _tuning.stream_threshold())


def test_workspace_dtype_spellings_share_one_buffer():
    _workspace.release()
    a = _workspace.workspace("small_calls", 64, np.float64)
    for spelling in (np.dtype(np.float64), "float64", "f8"):
        assert np.shares_memory(_workspace.workspace("small_calls", 64, spelling), a)
    assert _workspace.workspace("small_calls", 0).shape == (1,)
    assert _workspace.workspace("small_calls", np.int64(10)).shape == (10,)
    _workspace.release()


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_backward_out_overlap_still_checked_for_views(op):
    """The backward's out= fast path skips the overlap test only when every array owns its
    memory (_valid_fast() == 2); a context over views still rejects an overlapping out."""
    fwd, bwd = getattr(normffn, op + "_forward"), getattr(normffn, op + "_backward")
    rng = np.random.default_rng(0)
    big = rng.standard_normal((2, 4, 8)).astype(np.float32)
    x = big[0]                                   # a view: does not own its memory
    y, ctx = fwd(x, 8)
    assert ctx._valid_fast() == 1
    with pytest.raises(ValueError, match="overlaps"):
        bwd(np.ones_like(x), ctx, out=big[0])    # out is x's memory
    _, owned = fwd(x.copy(), 8)
    assert owned._valid_fast() == 2
    dy = rng.standard_normal((4, 8)).astype(np.float32)
    out = np.empty_like(dy)
    got = bwd(dy, owned, out=out)
    np.testing.assert_array_equal(got[0], bwd(dy, owned)[0])
    assert got[0] is out
