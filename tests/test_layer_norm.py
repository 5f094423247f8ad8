"""LayerNorm vs the float64 reference: values, gradients, hard inputs, hygiene, bad inputs."""
from __future__ import annotations

import importlib
import itertools

import numpy as np
import pytest
from conftest import ADVERSARIAL, DTYPES, LAYOUTS, make_array, randn

import normffn
from normffn import reference as ref
from normffn.testing import assert_close, gradcheck

# (leading dims, normalized_shape): d = 1, 3, 769, multi-dim; 0, 1 and 3 leading dims
SHAPES = [
    ((), (769,)),
    ((5,), (1,)),
    ((7,), (3,)),
    ((9,), (769,)),
    ((2, 3, 4), (33,)),
    ((6,), (4, 5)),
    ((3,), (2, 3, 7)),
    ((64,), (256,)),  # enough work to run on 2 threads
]


def _ids(shape):
    lead, ns = shape
    return f"lead{lead}-ns{ns}"


def _params(rng, nshape, dtype, affine):
    if not affine:
        return None, None
    return randn(rng, nshape, dtype), randn(rng, nshape, dtype)


def _check_all(x, nshape, w, b, dy, dtype, context):
    y, ctx = normffn.layer_norm_forward(x, nshape, w, b)
    y_r, ctx_r = ref.layer_norm_forward(x, nshape, w, b)
    assert y.dtype == dtype and y.shape == x.shape
    k = 1 if np.ndim(nshape) == 0 else len(nshape)
    assert ctx.mean.shape == ctx.rstd.shape == x.shape[:x.ndim - k]
    assert_close(y, y_r, name="y", context=context)
    assert_close(ctx.mean, ctx_r.mean, dtype=dtype, name="mean", context=context)
    assert_close(ctx.rstd, ctx_r.rstd, dtype=dtype, name="rstd", context=context)
    dx, dw, db = normffn.layer_norm_backward(dy, ctx)
    dx_r, dw_r, db_r = ref.layer_norm_backward(dy, ctx_r)
    assert_close(dx, dx_r, name="dx", context=context)
    if w is None:
        assert dw is None
    else:
        # dweight/dbias sum over rows: allow the error to grow like sqrt(rows)
        nrows = max(1, x.size // w.size)
        assert dw.dtype == dtype and dw.shape == w.shape
        assert_close(dw, dw_r, name="dweight", context=context,
                     atol=np.sqrt(nrows) * 2e-5 if dtype == np.float32 else None)
    if b is None:
        assert db is None
    else:
        nrows = max(1, x.size // b.size)
        assert_close(db, db_r, name="dbias", context=context,
                     atol=np.sqrt(nrows) * 2e-5 if dtype == np.float32 else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_matches_reference(rng, threads, dtype, shape, layout, affine):
    lead, nshape = shape
    full = lead + nshape
    x = make_array(randn(rng, full, dtype), layout)
    dy = make_array(randn(rng, full, dtype), layout)
    w, b = _params(rng, nshape, dtype, affine)
    _check_all(x, nshape, w, b, dy, dtype,
               f"shape={full}, layout={layout}, affine={affine}, threads={threads}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_weight_only_and_bias_only(rng, dtype):
    x = randn(rng, (10, 17), dtype)
    dy = randn(rng, (10, 17), dtype)
    w = randn(rng, (17,), dtype)
    _check_all(x, 17, w, None, dy, dtype, "weight only")
    _check_all(x, 17, None, w, dy, dtype, "bias only")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
@pytest.mark.parametrize("d", [3, 769, 4096])
def test_adversarial_rows(rng, dtype, case, d):
    x = ADVERSARIAL[case](rng, (6, d), dtype)
    dy = randn(rng, (6, d), dtype)
    w, b = _params(rng, (d,), dtype, True)
    _check_all(x, d, w, b, dy, dtype, f"case={case}, d={d}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_constant_row_gives_bias(dtype):
    x = np.full((3, 50), 7.5, dtype=dtype)
    w = np.linspace(-1, 1, 50).astype(dtype)
    b = np.linspace(2, 3, 50).astype(dtype)
    y = normffn.layer_norm(x, 50, w, b)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y, np.broadcast_to(b, y.shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("d", [5, 769])
def test_nonfinite_stays_in_its_row(rng, dtype, bad, d):
    x = randn(rng, (8, d), dtype)
    x[3, d // 2] = bad
    dy = randn(rng, (8, d), dtype)
    w, b = _params(rng, (d,), dtype, True)
    y, ctx = normffn.layer_norm_forward(x, d, w, b)
    y_r, ctx_r = ref.layer_norm_forward(x, d, w, b)
    others = np.arange(8) != 3
    assert np.all(np.isfinite(y[others]))
    assert not np.any(np.isfinite(y[3]) & ~np.isfinite(y_r[3]))
    assert_close(y, y_r, name="y")  # NaN/Inf exactly where the reference has them
    dx, _, _ = normffn.layer_norm_backward(dy, ctx)
    dx_r, _, _ = ref.layer_norm_backward(dy, ctx_r)
    assert np.all(np.isfinite(dx[others]))
    assert_close(dx, dx_r, name="dx")


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("nshape", [(3,), (2, 4)])
def test_gradcheck(rng, affine, nshape):
    lead = (4,)
    x = rng.standard_normal(lead + nshape)
    dy = rng.standard_normal(lead + nshape)
    w, b = _params(rng, nshape, np.float64, affine)
    _, ctx = normffn.layer_norm_forward(x, nshape, w, b)
    dx, dw, db = normffn.layer_norm_backward(dy, ctx)

    def f(x_, w_, b_):
        return normffn.layer_norm(x_, nshape, w_, b_)

    gradcheck(f, [x, w, b], [dx, dw, db], dy, names=["x", "weight", "bias"], max_elements=None)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(3, 769), (1000, 64), (257, 4100)])
def test_threads_bitwise_identical(rng, dtype, shape):
    from threadpoolctl import threadpool_limits

    x = randn(rng, shape, dtype) + 3
    dy = randn(rng, shape, dtype)
    d = shape[-1]
    w, b = _params(rng, (d,), dtype, True)
    results = []
    for n in (1, 2):
        with threadpool_limits(limits=n, user_api="openmp"):
            y, ctx = normffn.layer_norm_forward(x, d, w, b)
            grads = normffn.layer_norm_backward(dy, ctx)
        results.append((y, ctx.mean, ctx.rstd) + grads)
    for a, c in zip(*results):
        np.testing.assert_array_equal(a, c)


def test_threadpoolctl_reaches_the_kernels():
    from threadpoolctl import threadpool_info, threadpool_limits

    assert any(i["user_api"] == "openmp" for i in threadpool_info()), \
        "normffn's OpenMP runtime is invisible to threadpoolctl"
    with threadpool_limits(limits=1, user_api="openmp"):
        from normffn._kernels import layer_norm as k
        assert k.max_threads() == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_inputs_not_modified_and_out(rng, dtype):
    x = randn(rng, (20, 30), dtype)
    w, b = _params(rng, (30,), dtype, True)
    dy = randn(rng, (20, 30), dtype)
    copies = [a.copy() for a in (x, w, b, dy)]
    out = np.empty_like(x)
    y, ctx = normffn.layer_norm_forward(x, 30, w, b, out=out)
    assert y is out
    dxo = np.empty_like(x)
    dx, _, _ = normffn.layer_norm_backward(dy, ctx, out=dxo)
    assert dx is dxo
    for a, c in zip((x, w, b, dy), copies):
        np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(out, normffn.layer_norm(x, 30, w, b))


def test_zero_rows():
    x = np.empty((0, 7), np.float32)
    w = np.ones(7, np.float32)
    y, ctx = normffn.layer_norm_forward(x, 7, w, w)
    assert y.shape == (0, 7) and ctx.mean.shape == (0,)
    dx, dw, db = normffn.layer_norm_backward(np.empty((0, 7), np.float32), ctx)
    assert dx.shape == (0, 7)
    np.testing.assert_array_equal(dw, 0)
    np.testing.assert_array_equal(db, 0)


def test_one_dim_input_and_list_input():
    x = np.arange(5, dtype=np.float64)
    y, ctx = normffn.layer_norm_forward(x, 5)
    assert ctx.mean.shape == ()
    assert_close(y, ref.layer_norm(x, 5))
    assert_close(normffn.layer_norm([[1.0, 2.0, 4.0]], 3), ref.layer_norm([[1.0, 2.0, 4.0]], 3))


def test_big_endian_input(rng):
    x = randn(rng, (4, 9), np.float64).astype(">f8")
    assert_close(normffn.layer_norm(x, 9), ref.layer_norm(x, 9))


# ---------------------------------------------------------------- bad inputs
X32 = np.ones((4, 6), np.float32)


@pytest.mark.parametrize("bad_dtype", [np.int32, np.int64, np.bool_, np.float16, np.complex64,
                                       object])
def test_rejects_non_float_x(bad_dtype):
    with pytest.raises(TypeError, match="x must have dtype float32 or float64"):
        normffn.layer_norm(np.ones((4, 6), dtype=bad_dtype), 6)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(weight=np.ones(6, np.float64)), TypeError, "weight has dtype float64"),
        (dict(bias=np.ones(6, np.int64)), TypeError, "bias must have dtype"),
        (dict(weight=np.ones(5, np.float32)), ValueError, r"weight has shape \(5,\), expected \(6,\)"),
        (dict(bias=np.ones((1, 6), np.float32)), ValueError, "bias has shape"),
        (dict(eps=-1e-5), ValueError, "eps must be >= 0"),
        (dict(eps=float("nan")), ValueError, "eps must be finite"),
        (dict(eps=float("inf")), ValueError, "eps must be finite"),
        (dict(eps="1e-5"), TypeError, "eps must be a real number"),
        (dict(eps=True), TypeError, "eps must be a real number"),
        (dict(normalized_shape=7), ValueError, "does not match the trailing dims"),
        (dict(normalized_shape=(2, 4, 6)), ValueError, "more dims than x"),
        (dict(normalized_shape=()), ValueError, "at least one dimension"),
        (dict(normalized_shape=0), ValueError, "positive sizes"),
        (dict(normalized_shape=2.5), TypeError, "normalized_shape must be an int"),
        (dict(normalized_shape="6"), TypeError, "normalized_shape must be an int"),
        (dict(out=np.empty((4, 6), np.float64)), ValueError, "out has dtype float64"),
        (dict(out=np.empty((4, 5), np.float32)), ValueError, "out has shape"),
        (dict(out=np.empty((6, 4), np.float32).T), ValueError, "out must be C-contiguous"),
        (dict(out=[0.0] * 24), TypeError, "out must be a numpy.ndarray"),
    ],
)
def test_rejects_bad_arguments(kwargs, exc, match):
    args = dict(normalized_shape=6)
    args.update(kwargs)
    ns = args.pop("normalized_shape")
    with pytest.raises(exc, match=match):
        normffn.layer_norm(X32, ns, **args)


def test_rejects_0d_none_and_zero_width():
    with pytest.raises(ValueError, match="0-d"):
        normffn.layer_norm(np.float32(1.0), 1)
    with pytest.raises(TypeError, match="x must be a float32 or float64 array, got None"):
        normffn.layer_norm(None, 1)
    with pytest.raises(ValueError, match="positive sizes"):
        normffn.layer_norm(np.ones((3, 0), np.float32), 0)


def test_rejects_readonly_and_overlapping_out():
    ro = np.empty((4, 6), np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="out must be writeable"):
        normffn.layer_norm(X32, 6, out=ro)
    x = np.ones((4, 6), np.float32)
    with pytest.raises(ValueError, match="overlaps an input"):
        normffn.layer_norm(x, 6, out=x)
    w = np.ones(6, np.float32)
    buf = np.ones(30, np.float32)
    with pytest.raises(ValueError, match="overlaps an input"):
        normffn.layer_norm(buf[6:].reshape(4, 6), 6, w, out=buf[:24].reshape(4, 6))


def test_backward_rejects_bad_dy_and_ctx():
    y, ctx = normffn.layer_norm_forward(X32, 6, np.ones(6, np.float32))
    with pytest.raises(TypeError, match="dy has dtype float64"):
        normffn.layer_norm_backward(np.ones((4, 6)), ctx)
    with pytest.raises(ValueError, match=r"dy has shape \(4, 5\)"):
        normffn.layer_norm_backward(np.ones((4, 5), np.float32), ctx)
    with pytest.raises(TypeError, match="ctx must be the LayerNormContext"):
        normffn.layer_norm_backward(np.ones((4, 6), np.float32), object())
    with pytest.raises(TypeError, match="dy must have dtype"):
        normffn.layer_norm_backward(np.ones((4, 6), np.int32), ctx)
    with pytest.raises(ValueError, match="out has shape"):
        normffn.layer_norm_backward(np.ones((4, 6), np.float32), ctx,
                                    out=np.empty((4, 7), np.float32))
    # a tampered context must raise, never reach the kernel
    import dataclasses
    dy = np.ones((4, 6), np.float32)
    for field, value, match in [
        ("mean", np.zeros(3, np.float32), "ctx.mean has dtype float32, expected float64"),
        ("mean", np.zeros(3), r"ctx.mean has shape \(3,\), expected \(4,\)"),
        ("rstd", np.zeros((8,))[::2], "ctx.rstd is not in the memory layout"),
        ("weight", np.zeros(5, np.float32), r"ctx.weight has shape \(5,\), expected \(6,\)"),
        ("weight", np.zeros(6), "ctx.weight has dtype float64, expected float32"),
        ("bias", [0.0] * 6, "ctx.bias must be a numpy.ndarray"),
        ("x", np.ones((6, 4), np.float32).T, "ctx.x is not in the memory layout"),
        ("x", np.ones((4, 5), np.float32), "does not end in normalized_shape"),
        ("x", None, "ctx.x is None"),
        ("normalized_shape", (6.0,), "normalized_shape must be a tuple of positive ints"),
    ]:
        bad = dataclasses.replace(ctx, **{field: value})
        with pytest.raises(ValueError, match=match):
            normffn.layer_norm_backward(dy, bad)


@pytest.mark.parametrize("n_calls", [300])
def test_no_refcount_growth(n_calls):
    import sys

    x = np.ones((8, 16), np.float32)
    w = np.ones(16, np.float32)
    before = [sys.getrefcount(a) for a in (x, w)]
    for _ in range(n_calls):
        y, ctx = normffn.layer_norm_forward(x, 16, w, w)
        normffn.layer_norm_backward(y, ctx)
    del y, ctx
    assert [sys.getrefcount(a) for a in (x, w)] == before


def test_every_combination_of_none(rng):
    for has_w, has_b in itertools.product([False, True], repeat=2):
        x = randn(rng, (3, 5), np.float64)
        w = randn(rng, (5,), np.float64) if has_w else None
        b = randn(rng, (5,), np.float64) if has_b else None
        _check_all(x, 5, w, b, randn(rng, (3, 5), np.float64), np.float64, f"{has_w}{has_b}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(5, 3), (37, 769), (9, 2100)])
def test_streaming_stores_path_is_bitwise_identical(rng, dtype, shape):
    """Large outputs use non-temporal stores; force that path on small arrays."""
    from normffn import _tuning

    x = randn(rng, shape, dtype) * 3 + 1
    dy = randn(rng, shape, dtype)
    d = shape[-1]
    w, b = _params(rng, (d,), dtype, True)
    plain = normffn.layer_norm_forward(x, d, w, b)
    plain_grads = normffn.layer_norm_backward(dy, plain[1])
    try:
        assert _tuning.set_stream_threshold(1) == 1
        streamed = normffn.layer_norm_forward(x, d, w, b)
        streamed_grads = normffn.layer_norm_backward(dy, streamed[1])
        # dx only, streamed, beside the parameter sums only
        dx_only = normffn.layer_norm_backward(dy, streamed[1], needs=(True, False, False))
    finally:
        _tuning.set_stream_threshold(None)
    np.testing.assert_array_equal(plain[0], streamed[0])
    for a, c in zip(plain_grads, streamed_grads):
        np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(dx_only[0], plain_grads[0])


# ---------------------------------------------------------------- needs, check/run
NEEDS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(5, 3), (37, 769), (130, 64)])
@pytest.mark.parametrize("affine", ["wb", "w", "b", "none"])
def test_needs_skip_work_and_match_the_full_backward(rng, threads, dtype, shape, affine):
    """Every needs combination gives the full backward's arrays, bitwise, and None elsewhere;
    dx is untouched when not needed."""
    d = shape[-1]
    x = randn(rng, shape, dtype) * 2 + 1
    dy = randn(rng, shape, dtype)
    w = randn(rng, (d,), dtype) if "w" in affine else None
    b = randn(rng, (d,), dtype) if "b" in affine else None
    _, ctx = normffn.layer_norm_forward(x, d, w, b)
    full = normffn.layer_norm_backward(dy, ctx)
    for needs in NEEDS:
        out = np.full(shape, 7.0, dtype)
        got = normffn.layer_norm_backward(dy, ctx, out=out, needs=needs)
        exists = (True, w is not None, b is not None)
        for name, g, f, need, ex in zip(("dx", "dweight", "dbias"), got, full, needs, exists):
            if need and ex:
                np.testing.assert_array_equal(g, f, err_msg=f"{name} needs={needs}")
            else:
                assert g is None, f"{name} needs={needs}"
        if needs[0]:
            assert got[0] is out
        else:
            assert np.all(out == 7.0), f"dx written with needs={needs}"


def test_needs_rejects_malformed():
    _, ctx = normffn.layer_norm_forward(X32, 6)
    for bad, exc, match in [((True, True), ValueError, "needs has 2 entries, expected 3 bools"),
                            ((1, 0, 0), TypeError, "needs entry for dx must be a bool"),
                            ("xyz", TypeError, "needs must be a tuple of 3 bools"),
                            (True, TypeError, "needs must be a tuple of 3 bools"),
                            ((True, None, True), TypeError, "needs entry for dweight")]:
        with pytest.raises(exc, match=match):
            normffn.layer_norm_backward(X32, ctx, needs=bad)


def test_needs_on_zero_rows():
    x = np.empty((0, 7), np.float64)
    w = np.ones(7)
    _, ctx = normffn.layer_norm_forward(x, 7, w, w)
    dx, dw, db = normffn.layer_norm_backward(x, ctx, needs=(False, True, False))
    assert dx is None and db is None
    np.testing.assert_array_equal(dw, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_run_layer_matches_public_api(rng, dtype):
    """The run functions fused ops call: kernel-shaped arrays in, the public results out."""
    ln = importlib.import_module("normffn.layer_norm")

    x = randn(rng, (3, 4, 40), dtype)
    w, b = _params(rng, (40,), dtype, True)
    dy = randn(rng, (3, 4, 40), dtype)
    y, ctx = normffn.layer_norm_forward(x, 40, w, b, eps=1e-3)
    a = ln.check_forward(x, 40, w, b, 1e-3)
    assert a.x2.shape == (12, 40) and a.w1.shape == (40,) and a.lead == (3, 4)
    y2, mean, rstd = ln.run_forward(a.x2, a.w1, a.b1, a.eps)
    np.testing.assert_array_equal(y2.reshape(x.shape), y)
    np.testing.assert_array_equal(mean.reshape(3, 4), ctx.mean)
    np.testing.assert_array_equal(rstd.reshape(3, 4), ctx.rstd)
    grads = normffn.layer_norm_backward(dy, ctx)
    bargs = ln.check_backward(dy, ctx)
    dx2, dw, db = ln.run_backward(bargs.dy2, bargs.x2, bargs.w1, bargs.mean, bargs.rstd)
    np.testing.assert_array_equal(dx2.reshape(x.shape), grads[0])
    np.testing.assert_array_equal(dw, grads[1])
    np.testing.assert_array_equal(db, grads[2])
    # dbias is a plain sum of dy: the run layer computes it with or without a bias
    _, _, db2 = ln.run_backward(bargs.dy2, bargs.x2, None, bargs.mean, bargs.rstd,
                                need_dx=False, need_dweight=False)
    np.testing.assert_array_equal(db2, grads[2])


def test_context_is_a_context():
    from normffn._context import Context

    _, ctx = normffn.layer_norm_forward(X32, 6)
    assert isinstance(ctx, Context)
    ctx.validate()
    assert ctx.rows() == (4, 6)
