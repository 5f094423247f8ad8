"""BatchNorm vs the float64 reference: values, running stats, gradients, hard inputs, both
memory layouts, determinism, hygiene, bad inputs and failure atomicity."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import ADVERSARIAL, DTYPES, make_array, randn
from threadpoolctl import threadpool_limits

import normffn
from normffn import reference as ref
from normffn.testing import assert_close, gradcheck

# (N, C, *spatial): C = 1, 3, 769; S = 1, small (column kernel), large (row kernel); enough work
# for 2 threads in each kernel, and a few-channel case whose 2-thread run shares rows out.
SHAPES = [
    (5, 3),
    (2, 769),
    (9, 1),
    (4, 3, 7),          # small S: (N, C*S) column kernel
    (2, 5, 769),        # row kernel
    (3, 4, 2, 3),
    (2, 3, 5, 7),
    (4, 16, 33, 33),    # row kernel, 2 threads own whole channels
    (8, 3, 64, 64),     # row kernel, 3 channels on 2 threads: rows shared out
    (1024, 96),         # column kernel, 2 threads
]
LAYOUTS = ["contiguous", "channels_last", "strided", "transposed", "readonly"]


def _layout(values, layout):
    values = np.asarray(values)
    if layout == "channels_last":
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(values, 1, -1)), -1, 1)
    return make_array(values, layout)


def _is_cl(a):
    return np.moveaxis(a, 1, -1).flags.c_contiguous


def _params(rng, C, dtype, affine):
    if not affine:
        return None, None
    return randn(rng, C, dtype), randn(rng, C, dtype)


def _running(rng, C, dtype):
    return randn(rng, C, dtype), (0.5 + rng.random(C)).astype(dtype)


def _sum_atol(dtype, count):
    # dweight/dbias sum over N*S values: let the error grow like sqrt(count)
    return np.sqrt(count) * 2e-5 if dtype == np.float32 else None


def _check_all(x, rm, rv, w, b, training, dy, dtype, context, momentum=0.1):
    rm_r, rv_r = (None, None) if rm is None else (rm.astype(np.float64), rv.astype(np.float64))
    y, ctx = normffn.batch_norm_forward(x, rm, rv, w, b, training, momentum)
    y_r, ctx_r = ref.batch_norm_forward(x, rm_r, rv_r, w, b, training, momentum)
    C = x.shape[1]
    assert y.dtype == dtype and y.shape == x.shape
    assert ctx.mean.shape == ctx.rstd.shape == (C,)
    assert ctx.mean.dtype == ctx.rstd.dtype == np.float64
    assert_close(y, y_r, name="y", context=context)
    assert_close(ctx.mean, ctx_r.mean, dtype=dtype, name="mean", context=context)
    assert_close(ctx.rstd, ctx_r.rstd, dtype=dtype, name="rstd", context=context)
    if rm is not None:
        assert_close(rm, rm_r, name="running_mean", context=context)
        assert_close(rv, rv_r, name="running_var", context=context)
    dx, dw, db = normffn.batch_norm_backward(dy, ctx)
    dx_r, dw_r, db_r = ref.batch_norm_backward(dy, ctx_r)
    assert dx.shape == x.shape and dx.dtype == dtype
    assert_close(dx, dx_r, name="dx", context=context)
    count = x.size // max(C, 1)
    for g, g_r, p, name in ((dw, dw_r, w, "dweight"), (db, db_r, b, "dbias")):
        if p is None:
            assert g is None
        else:
            assert g.dtype == dtype and g.shape == (C,)
            assert_close(g, g_r, name=name, context=context, atol=_sum_atol(dtype, count))
    return y, dx


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_matches_reference(rng, threads, dtype, shape, layout, training, affine):
    x = _layout(randn(rng, shape, dtype) * 2 + 0.5, layout)
    C = shape[1]
    w, b = _params(rng, C, dtype, affine)
    rm, rv = _running(rng, C, dtype)
    dy = _layout(randn(rng, shape, dtype), layout)
    context = f"dtype={np.dtype(dtype).name} shape={shape} layout={layout} training={training}"
    y, dx = _check_all(x, rm, rv, w, b, training, dy, dtype, context)
    # the output keeps a channels-last input's layout; every other layout comes back C-ordered
    if layout == "channels_last":
        assert _is_cl(y) and _is_cl(dx)
    else:
        assert y.flags.c_contiguous and dx.flags.c_contiguous


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_training_without_running_stats_and_partial_affine(rng, dtype):
    x = randn(rng, (6, 4, 9), dtype)
    dy = randn(rng, x.shape, dtype)
    w, b = randn(rng, 4, dtype), randn(rng, 4, dtype)
    for ww, bb in ((w, None), (None, b), (None, None)):
        _check_all(x, None, None, ww, bb, True, dy, dtype, "no running stats")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_running_stats_over_steps(rng, dtype, momentum, layout):
    C = 5
    rm, rv = _running(rng, C, dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    rm_r, rv_r = rm.astype(np.float64), rv.astype(np.float64)
    for step in range(4):
        x = _layout((3 + step) * randn(rng, (4, C, 6, 5), dtype) + step, layout)
        normffn.batch_norm(x, rm, rv, training=True, momentum=momentum)
        ref.batch_norm(x, rm_r, rv_r, training=True, momentum=momentum)
        assert_close(rm, rm_r, name=f"running_mean step {step}")
        assert_close(rv, rv_r, name=f"running_var step {step}")
    if momentum == 0.0:
        assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0)
    if momentum == 1.0:       # the last batch's mean and unbiased variance
        xf = x.astype(np.float64)
        assert_close(rm, xf.mean(axis=(0, 2, 3)))
        assert_close(rv, xf.var(axis=(0, 2, 3), ddof=1))


def test_matches_torch_when_available(rng):
    torch = pytest.importorskip("torch")
    x = randn(rng, (4, 6, 5, 3), np.float32)
    w, b = randn(rng, 6, np.float32), randn(rng, 6, np.float32)
    rm, rv = _running(rng, 6, np.float32)
    rm_t, rv_t = torch.tensor(rm), torch.tensor(rv)
    for training in (True, False, True):
        y = normffn.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-3)
        y_t = torch.nn.functional.batch_norm(torch.tensor(x), rm_t, rv_t, torch.tensor(w),
                                             torch.tensor(b), training, 0.3, 1e-3)
        assert_close(y, y_t.numpy().astype(np.float64))
        assert_close(rm, rm_t.numpy().astype(np.float64), rtol=1e-6)
        assert_close(rv, rv_t.numpy().astype(np.float64), rtol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 5), (2, 3, 4, 20)], ids=str)
def test_gradcheck(rng, shape, affine, training):
    C = shape[1]
    x = randn(rng, shape, np.float64)
    w, b = _params(rng, C, np.float64, affine)
    rm, rv = _running(rng, C, np.float64)
    dy = randn(rng, shape, np.float64)
    y, ctx = normffn.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training)
    dx, dw, db = normffn.batch_norm_backward(dy, ctx)

    def fn(x_, w_, b_):
        return normffn.batch_norm(x_, rm.copy(), rv.copy(), w_, b_, training)

    gradcheck(fn, [x, w, b], [dx, dw, db], dy, names=["x", "weight", "bias"])


def _offset_1e3(rng, shape, dtype):
    return (1e3 + rng.standard_normal(shape)).astype(dtype)


CASES = dict(ADVERSARIAL, offset_1e3=_offset_1e3)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_adversarial_slabs(rng, dtype, case, layout):
    # 2 channels of 4 * 26000 = 104000 values each
    shape = (4, 2, 26000) if layout == "contiguous" else (4, 2, 200, 130)
    x = _layout(CASES[case](rng, shape, dtype), layout)
    w, b = randn(rng, 2, dtype), randn(rng, 2, dtype)
    dy = _layout(randn(rng, shape, dtype), layout)
    for training in (True, False):
        rm, rv = (x.mean(axis=(0, 2)).astype(dtype), x.var(axis=(0, 2)).astype(dtype)) \
            if x.ndim == 3 else (np.asarray(x.mean(axis=(0, 2, 3)), dtype),
                                 np.asarray(x.var(axis=(0, 2, 3)), dtype))
        _check_all(x, rm, rv, w, b, training, dy, dtype, f"{case} {layout} {training}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the reference's inf - inf
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("shape", [(6, 4, 50), (300, 4)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_nonfinite_stays_in_its_channel(rng, dtype, shape, bad, layout):
    values = randn(rng, shape, dtype)
    values[(2, 1) + (3,) * (len(shape) - 2)] = bad
    x = _layout(values, layout)
    rm, rv = _running(rng, 4, dtype)
    w, b = randn(rng, 4, dtype), randn(rng, 4, dtype)
    dy = randn(rng, shape, dtype)
    _check_all(x, rm, rv, w, b, True, dy, dtype, f"{bad} in channel 1")
    y = normffn.batch_norm(x, None, None, w, b, training=True)
    assert np.isnan(y[:, 1]).all()
    assert np.isfinite(np.delete(y, 1, axis=1)).all()
    assert np.isnan(rm[1]) and np.isfinite(np.delete(rm, 1)).all()


def _run_all(x, w, b, dy, rm, rv):
    y, ctx = normffn.batch_norm_forward(x, rm, rv, w, b, True, 0.1)
    dx, dw, db = normffn.batch_norm_backward(dy, ctx)
    ye, ctxe = normffn.batch_norm_forward(x, rm, rv, w, b, False)
    dxe, dwe, dbe = normffn.batch_norm_backward(dy, ctxe)
    return [y, ctx.mean, ctx.rstd, dx, dw, db, rm, rv, ye, dxe, dwe, dbe]


@pytest.mark.parametrize("shape,layout", [((8, 64, 16, 16), "contiguous"),
                                          ((8, 3, 64, 64), "contiguous"),
                                          ((4096, 48), "contiguous"),
                                          ((16, 8, 33, 2), "contiguous"),
                                          ((8, 32, 24, 24), "channels_last")], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_threads_bitwise_identical(rng, dtype, shape, layout):
    x = _layout(randn(rng, shape, dtype) + 3, layout)
    dy = _layout(randn(rng, shape, dtype), layout)
    C = shape[1]
    w, b = randn(rng, C, dtype), randn(rng, C, dtype)
    rm, rv = _running(rng, C, dtype)
    results = []
    for n in (1, 2):
        with threadpool_limits(limits=n, user_api="openmp"):
            results.append(_run_all(x, w, b, dy, rm.copy(), rv.copy()))
    for a1, a2 in zip(*results):
        assert a1.tobytes() == a2.tobytes()


@pytest.mark.parametrize("shape,layout", [((4, 16, 33, 33), "contiguous"),
                                          ((8, 3, 64, 64), "contiguous"),
                                          ((1024, 96), "contiguous"),
                                          ((4, 8, 9, 9), "channels_last")], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_streaming_stores_path_is_bitwise_identical(rng, dtype, shape, layout, monkeypatch):
    """Large outputs use non-temporal stores; force that path (both kernels) on small arrays."""
    import importlib

    bn_module = importlib.import_module("normffn.batch_norm")
    from normffn._kernels import batch_norm as k

    x = _layout(randn(rng, shape, dtype) + 3, layout)
    dy = _layout(randn(rng, shape, dtype), layout)
    C = shape[1]
    w, b = randn(rng, C, dtype), randn(rng, C, dtype)
    rm, rv = _running(rng, C, dtype)
    plain = _run_all(x, w, b, dy, rm.copy(), rv.copy())
    monkeypatch.setattr(bn_module, "_STREAM_COLUMNS", True)
    try:
        assert k.stream_bytes(1) == 1
        streamed = _run_all(x, w, b, dy, rm.copy(), rv.copy())
    finally:
        k.stream_bytes(0)
    for a1, a2 in zip(plain, streamed):
        assert a1.tobytes() == a2.tobytes()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_inputs_not_modified_and_out(rng, layout):
    shape = (4, 6, 5, 7)
    x = _layout(randn(rng, shape, np.float32), layout)
    dy = _layout(randn(rng, shape, np.float32), layout)
    w, b = randn(rng, 6, np.float32), randn(rng, 6, np.float32)
    rm, rv = _running(rng, 6, np.float32)
    saved = [a.copy() for a in (x, dy, w, b, rm, rv)]
    y0, ctx0 = normffn.batch_norm_forward(x, rm, rv, w, b, False)
    dx0, _, _ = normffn.batch_norm_backward(dy, ctx0)
    for a, s in zip((x, dy, w, b, rm, rv), saved):
        assert np.array_equal(a, s)
    # out= in y's layout: written in place, returned as is, same values
    cl = layout == "channels_last"
    new = (lambda: _layout(np.empty(shape, np.float32), "channels_last")) if cl \
        else (lambda: np.empty(shape, np.float32))
    out, dout = new(), new()
    y, ctx = normffn.batch_norm_forward(x, rm, rv, w, b, False, out=out)
    dx, _, _ = normffn.batch_norm_backward(dy, ctx, out=dout)
    assert y is out and dx is dout
    assert np.array_equal(y, y0) and np.array_equal(dx, dx0)
    if cl:   # a C-contiguous out for a channels-last x would need a layout change: rejected
        with pytest.raises(ValueError, match="out must be channels-last"):
            normffn.batch_norm(x, rm, rv, out=np.empty(shape, np.float32))


def test_empty_and_list_inputs(rng):
    rm, rv = np.zeros(3), np.ones(3)
    y = normffn.batch_norm(np.empty((0, 3, 4)), rm, rv)
    assert y.shape == (0, 3, 4)
    y = normffn.batch_norm(np.empty((5, 0, 4)), np.zeros(0), np.zeros(0), training=True)
    assert y.shape == (5, 0, 4)
    y = normffn.batch_norm([[1.0, 2.0], [3.0, 5.0]], None, None, training=True)
    assert_close(y, ref.batch_norm(np.array([[1.0, 2.0], [3.0, 5.0]]), None, None,
                                   training=True))


def _valid(rng, dtype=np.float32):
    return dict(x=randn(rng, (4, 3, 5), dtype), running_mean=np.zeros(3, dtype),
                running_var=np.ones(3, dtype), weight=np.ones(3, dtype),
                bias=np.zeros(3, dtype), training=True, momentum=0.1, eps=1e-5)


def _readonly(a):
    a = a.copy()
    a.setflags(write=False)
    return a


BAD = [
    # (argument overrides, exception, message fragment)
    (dict(x=np.zeros((4, 3, 5), np.int32)), TypeError, "x"),
    (dict(x=np.zeros(5, np.float32)), ValueError, "rank"),
    (dict(x=np.zeros((1, 3), np.float32)), ValueError, "more than 1 value per channel"),
    (dict(x=np.zeros((1, 3, 1, 1), np.float32)), ValueError, "more than 1 value per channel"),
    (dict(x=np.zeros((4, 2, 5), np.float32), weight=None, bias=None), ValueError,
     "running_mean has shape"),
    (dict(weight=np.ones(4, np.float32)), ValueError, "weight"),
    (dict(bias=np.ones(2, np.float32)), ValueError, "bias"),
    (dict(weight=np.ones(3, np.float64)), TypeError, "weight"),
    (dict(bias=np.ones(3, np.float64)), TypeError, "bias"),
    (dict(running_mean=np.zeros(3, np.float64)), TypeError, "running_mean"),
    (dict(running_var=np.ones(3, np.float64)), TypeError, "running_var"),
    (dict(running_mean=[0.0, 0.0, 0.0]), TypeError, "running_mean"),
    (dict(running_mean=np.zeros(4, np.float32)), ValueError, "running_mean"),
    (dict(running_var=np.ones(6, np.float32)[::2]), ValueError, "running_var"),
    (dict(running_mean=_readonly(np.zeros(3, np.float32))), ValueError, "running_mean"),
    (dict(running_var=_readonly(np.ones(3, np.float32))), ValueError, "running_var"),
    (dict(running_var=None), ValueError, "running_mean and running_var"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(momentum=float("nan")), ValueError, "momentum"),
    (dict(momentum=None), TypeError, "momentum"),
    (dict(momentum="0.1"), TypeError, "momentum"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps=-1e-5), ValueError, "eps"),
    (dict(eps=float("inf")), ValueError, "eps"),
    (dict(eps="1e-5"), TypeError, "eps"),
    (dict(training="yes"), TypeError, "training"),
    (dict(out=np.empty((4, 3, 5), np.float64)), ValueError, "out"),
    (dict(out=np.empty((4, 3, 4), np.float32)), ValueError, "out"),
    (dict(out=np.empty((4, 5, 3), np.float32).transpose(0, 2, 1)), ValueError, "out"),
    (dict(out=_readonly(np.empty((4, 3, 5), np.float32))), ValueError, "out"),
]


@pytest.mark.parametrize("override,exc,match", BAD,
                         ids=[f"{'-'.join(o)}-{i}" for i, (o, _, _) in enumerate(BAD)])
def test_rejects_bad_arguments_and_leaves_running_stats(rng, override, exc, match):
    kw = _valid(rng)
    kw.update(override)
    rm, rv = kw["running_mean"], kw["running_var"]
    saved = [None if a is None or not isinstance(a, np.ndarray) else a.copy() for a in (rm, rv)]
    with pytest.raises(exc, match=match):
        normffn.batch_norm(**kw)
    with pytest.raises(exc, match=match):
        normffn.batch_norm_forward(**kw)
    for a, s in zip((rm, rv), saved):
        if s is not None:
            assert np.array_equal(a, s)


def test_eval_rules(rng):
    x = randn(rng, (4, 3, 5), np.float32)
    with pytest.raises(ValueError, match="required when training=False"):
        normffn.batch_norm(x, None, None)
    # eps = 0 is allowed in eval; N*S == 1 too
    y = normffn.batch_norm(x[:1, :, :1], np.zeros(3, np.float32), np.ones(3, np.float32), eps=0)
    assert_close(y, x[:1, :, :1])


def test_overlapping_arguments_rejected(rng):
    x = randn(rng, (4, 3, 5), np.float32)
    buf = np.ones(6, np.float32)
    with pytest.raises(ValueError, match="overlap"):
        normffn.batch_norm(x, buf[:3], buf[:3], training=True)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match="out overlaps"):
        normffn.batch_norm(x, rm, rv, training=True, out=x)
    assert np.array_equal(rm, np.zeros(3)) and np.array_equal(rv, np.ones(3))


def test_backward_rejects_bad_dy_and_ctx(rng):
    x = randn(rng, (4, 3, 5), np.float32)
    _, ctx = normffn.batch_norm_forward(x, None, None, np.ones(3, np.float32), None, True)
    with pytest.raises(TypeError, match="ctx"):
        normffn.batch_norm_backward(x, object())
    with pytest.raises(ValueError, match="dy"):
        normffn.batch_norm_backward(np.zeros((4, 3, 4), np.float32), ctx)
    with pytest.raises(TypeError, match="dy"):
        normffn.batch_norm_backward(np.zeros((4, 3, 5)), ctx)
    with pytest.raises(ValueError, match="out"):
        normffn.batch_norm_backward(x, ctx, out=np.empty((4, 3, 5)))
    for field, value in (("mean", np.zeros(4)), ("rstd", np.zeros(3, np.float32)),
                         ("weight", np.ones(2, np.float32)), ("x", x[:, :, ::2]),
                         ("x", np.zeros(5, np.float32))):
        with pytest.raises(ValueError, match="ctx"):
            normffn.batch_norm_backward(x, dataclasses.replace(ctx, **{field: value}))
    # a hand-edited mean is used as given
    ctx2 = dataclasses.replace(ctx, mean=ctx.mean + 1)
    dx2, dw2, _ = normffn.batch_norm_backward(x, ctx2)
    _, ctx_r = ref.batch_norm_forward(x, None, None, np.ones(3), None, True)
    ctx_r.mean = ctx_r.mean + 1
    assert_close(dw2, ref.batch_norm_backward(x, ctx_r)[1], atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, channels_last", [((6, 3), False), ((4, 3, 20), False),
                                                  ((4, 3, 5, 5), True)])
def test_infinite_weight_gives_inf_like_the_reference(dtype, shape, channels_last):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape).astype(dtype) + 2
    if channels_last:
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    w = np.array([np.inf, -np.inf, 1.5], dtype)
    for training in (True, False):
        rm, rv = np.full(3, 2, dtype), np.ones(3, dtype)
        y = normffn.batch_norm(x, rm.copy(), rv.copy(), w, None, training)
        y_r = ref.batch_norm(x, rm.astype(np.float64), rv.astype(np.float64), w, None, training)
        assert_close(y, y_r, name="y", context=f"training={training}")
