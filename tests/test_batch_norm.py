"""BatchNorm vs the float64 reference: values, running stats, gradients, hard inputs, both
memory layouts, determinism, hygiene, bad inputs and failure atomicity."""
from __future__ import annotations

import dataclasses
import importlib

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
def test_streaming_stores_path_is_bitwise_identical(rng, dtype, shape, layout):
    """Large outputs use non-temporal stores (rows kernel; the column kernel never streams):
    force that path on small arrays with the documented threshold setting."""
    from normffn import _tuning

    x = _layout(randn(rng, shape, dtype) + 3, layout)
    dy = _layout(randn(rng, shape, dtype), layout)
    C = shape[1]
    w, b = randn(rng, C, dtype), randn(rng, C, dtype)
    rm, rv = _running(rng, C, dtype)
    plain = _run_all(x, w, b, dy, rm.copy(), rv.copy())
    try:
        assert _tuning.set_stream_threshold(1) == 1
        streamed = _run_all(x, w, b, dy, rm.copy(), rv.copy())
    finally:
        _tuning.set_stream_threshold(None)
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


# ---------------------------------------------------------------- phases (normffn.batch_norm)
# the package exports the function normffn.batch_norm, which shadows the module's attribute
bn = importlib.import_module("normffn.batch_norm")

PHASE_CASES = [((6, 5), "contiguous"), ((4, 3, 7), "contiguous"), ((3, 4, 40), "contiguous"),
               ((8, 3, 64, 64), "contiguous"), ((4, 16, 33, 33), "contiguous"),
               ((4, 6, 5, 7), "channels_last"), ((2, 769), "contiguous")]


def _one_call(x, w, b, dy, training=True):
    C = x.shape[1]
    rm, rv = np.zeros(C, x.dtype), np.ones(C, x.dtype)
    y, ctx = normffn.batch_norm_forward(x, rm, rv, w, b, training, 0.1)
    return y, ctx, rm, rv, normffn.batch_norm_backward(dy, ctx)


@pytest.mark.parametrize("shape,layout", PHASE_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_phases_on_one_chunk_are_the_one_call_bitwise(rng, dtype, shape, layout):
    x = _layout(randn(rng, shape, dtype) * 3 + 2, layout)
    dy = _layout(randn(rng, shape, dtype), layout)
    C = shape[1]
    w, b = randn(rng, C, dtype), randn(rng, C, dtype)
    y, ctx, rm, rv, (dx, dw, db) = _one_call(x, w, b, dy)
    count, mean, m2 = bn.merge_stats([bn.partial_stats(x)])
    assert count == x.size // C
    mean, var, rstd = bn.finalize_stats(count, mean, m2, 1e-5)
    assert mean.tobytes() == ctx.mean.tobytes() and rstd.tobytes() == ctx.rstd.tobytes()
    rm2, rv2 = np.zeros(C, dtype), np.ones(C, dtype)
    bn.update_running_stats(rm2, rv2, mean, var, count, 0.1)
    assert rm2.tobytes() == rm.tobytes() and rv2.tobytes() == rv.tobytes()
    y2 = bn.apply(x, mean, rstd, w, b)
    assert y2.tobytes() == y.tobytes() and _is_cl(y2) == _is_cl(y)
    sdy, sdyx = bn.backward_sums(dy, x, mean)
    assert (sdyx * rstd).astype(dtype).tobytes() == dw.tobytes()
    assert sdy.astype(dtype).tobytes() == db.tobytes()
    dx2 = bn.backward_apply(dy, x, mean, rstd, w, sdy, sdyx, count, True)
    assert dx2.tobytes() == dx.tobytes()


def _split(a, axis, k):
    """k chunks of a along axis, each in a's layout (C-contiguous or channels-last)."""
    cl = _is_cl(a) and not a.flags.c_contiguous
    return [_layout(np.ascontiguousarray(c), "channels_last") if cl else np.ascontiguousarray(c)
            for c in np.array_split(a, k, axis=axis)]


@pytest.mark.parametrize("shape,layout,axis", [((9, 4, 50), "contiguous", 0),
                                               ((9, 4, 50), "contiguous", 2),
                                               ((7, 3, 10, 12), "contiguous", 3),
                                               ((1000, 24), "contiguous", 0),
                                               ((6, 5, 8, 9), "channels_last", 0),
                                               ((6, 5, 8, 9), "channels_last", 2)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_phases_over_chunks_match_the_one_call(rng, dtype, shape, layout, axis):
    x = _layout(randn(rng, shape, dtype) * 2 + 1e3 * (dtype == np.float64) + 5, layout)
    dy = _layout(randn(rng, shape, dtype), layout)
    C = shape[1]
    w, b = randn(rng, C, dtype), randn(rng, C, dtype)
    y, ctx, rm, rv, (dx, dw, db) = _one_call(x, w, b, dy)
    _, ctx_r = ref.batch_norm_forward(x, None, None, w, b, True)
    xs, dys = _split(x, axis, 3), _split(dy, axis, 3)
    parts = [bn.partial_stats(c) for c in xs]
    count, mean, m2 = bn.merge_stats(parts)
    assert count == x.size // C
    mean, var, rstd = bn.finalize_stats(count, mean, m2, 1e-5)
    # statistics in float64: a few ulps of the one-call ones (only the merge order differs)
    np.testing.assert_allclose(mean, ctx.mean, rtol=1e-6 if dtype == np.float32 else 1e-13,
                               atol=1e-7 if dtype == np.float32 else 1e-13)
    np.testing.assert_allclose(rstd, ctx.rstd, rtol=1e-6 if dtype == np.float32 else 1e-12)
    assert_close(mean, ctx_r.mean, dtype=dtype, name="mean")
    assert_close(rstd, ctx_r.rstd, dtype=dtype, name="rstd")
    rm2, rv2 = np.zeros(C, dtype), np.ones(C, dtype)
    bn.update_running_stats(rm2, rv2, mean, var, count, 0.1)
    assert_close(rm2, rm, name="running_mean")
    assert_close(rv2, rv, name="running_var")
    y2 = np.concatenate([bn.apply(c, mean, rstd, w, b) for c in xs], axis=axis)
    assert_close(y2, y, name="y")
    sums = [bn.backward_sums(d, c, mean) for d, c in zip(dys, xs)]
    sdy = sums[0][0] + sums[1][0] + sums[2][0]
    sdyx = sums[0][1] + sums[1][1] + sums[2][1]
    count_ = x.size // C
    assert_close((sdyx * rstd).astype(dtype), dw, name="dweight",
                 atol=_sum_atol(dtype, count_))
    assert_close(sdy.astype(dtype), db, name="dbias", atol=_sum_atol(dtype, count_))
    dx2 = np.concatenate([bn.backward_apply(d, c, mean, rstd, w, sdy, sdyx, count, True)
                          for d, c in zip(dys, xs)], axis=axis)
    assert_close(dx2, dx, name="dx")
    assert_close(dx2, ref.batch_norm_backward(dy, ctx_r)[0], name="dx vs reference")


def test_merge_stats_is_ordered_and_accepts_per_channel_counts(rng):
    parts = [bn.partial_stats(randn(rng, (n, 3, 5), np.float64) + n) for n in (2, 7, 1, 4)]
    c1, m1, q1 = bn.merge_stats(parts)
    c2, m2, q2 = bn.merge_stats([(np.full(3, c), m, q) for c, m, q in parts])
    assert c1 == 70.0 and np.array_equal(c2, np.full(3, 70.0))
    assert m1.tobytes() == m2.tobytes() and q1.tobytes() == q2.tobytes()
    again = bn.merge_stats(parts)
    assert again[1].tobytes() == m1.tobytes() and again[2].tobytes() == q1.tobytes()
    # an empty chunk changes nothing
    empty = bn.partial_stats(np.empty((0, 3, 5)))
    assert empty[0] == 0.0
    with_empty = bn.merge_stats(parts[:2] + [empty] + parts[2:])
    assert with_empty[1].tobytes() == m1.tobytes() and with_empty[2].tobytes() == q1.tobytes()
    with pytest.raises(ValueError):
        bn.merge_stats([])


def test_eval_rstd_is_numpys_bitwise(rng):
    x = randn(rng, (4, 5, 6), np.float32)
    rv = (rng.random(5) * 3).astype(np.float32)
    rv[0] = 0
    _, ctx = normffn.batch_norm_forward(x, np.zeros(5, np.float32), rv, eps=1e-3)
    assert ctx.rstd.tobytes() == (1.0 / np.sqrt(rv.astype(np.float64) + 1e-3)).tobytes()


NEEDS = [(True, True, True), (True, False, False), (False, True, True), (False, True, False),
         (False, False, True), (True, False, True), (False, False, False)]


@pytest.mark.parametrize("needs", NEEDS, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout", [((4, 16, 33, 33), "contiguous"),
                                          ((8, 3, 64, 64), "contiguous"),
                                          ((64, 12), "contiguous"),
                                          ((4, 6, 5, 7), "channels_last")], ids=str)
def test_backward_needs_skips_what_is_not_needed(rng, shape, layout, training, needs):
    dtype = np.float32
    x = _layout(randn(rng, shape, dtype) + 1, layout)
    dy = _layout(randn(rng, shape, dtype), layout)
    C = shape[1]
    w, b = randn(rng, C, dtype), randn(rng, C, dtype)
    _, ctx = normffn.batch_norm_forward(x, np.zeros(C, dtype), np.ones(C, dtype), w, b,
                                        training)
    full = normffn.batch_norm_backward(dy, ctx)
    out = np.full_like(full[0], 7.0)
    got = normffn.batch_norm_backward(dy, ctx, out=out, needs=needs)
    for g, f, need in zip(got, full, needs):
        if need:
            assert g.tobytes() == f.tobytes()
        else:
            assert g is None
    if not needs[0]:
        assert np.all(out == 7.0)
    # gradients of absent parameters are None whatever needs says
    _, ctx0 = normffn.batch_norm_forward(x, np.zeros(C, dtype), np.ones(C, dtype), None, None,
                                         training)
    dx, dw, db = normffn.batch_norm_backward(dy, ctx0, needs=needs)
    assert dw is None and db is None and (dx is not None) == needs[0]


@pytest.mark.parametrize("needs,exc", [((True, True), ValueError), ((1, 0, 0), ValueError),
                                       (True, TypeError)])
def test_backward_rejects_bad_needs(rng, needs, exc):
    x = randn(rng, (4, 3, 5), np.float32)
    _, ctx = normffn.batch_norm_forward(x, None, None, training=True)
    with pytest.raises(exc, match="needs"):
        normffn.batch_norm_backward(x, ctx, needs=needs)


def test_context_uses_the_shared_validator(rng):
    from normffn._context import Context

    x = randn(rng, (4, 3, 5), np.float32)
    _, ctx = normffn.batch_norm_forward(x, None, None, training=True)
    assert isinstance(ctx, Context)
    ctx.validate()
    with pytest.raises(ValueError, match="ctx.training"):
        dataclasses.replace(ctx, training="yes").validate()


def test_phases_reject_bad_arguments(rng):
    x = randn(rng, (4, 3, 5), np.float32)
    with pytest.raises(ValueError, match="rank"):
        bn.partial_stats(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="mean"):
        bn.apply(x, np.zeros(4), np.ones(3))
    with pytest.raises(TypeError, match="weight"):
        bn.apply(x, np.zeros(3), np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="dy"):
        bn.backward_sums(x[:, :, :4], x, np.zeros(3))
    with pytest.raises(ValueError, match="count"):
        bn.backward_apply(x, x, np.zeros(3), np.ones(3), None, np.zeros(3), np.zeros(3), 0.0,
                          True)
