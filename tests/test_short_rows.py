"""The short-row path of the row norms (d <= 128: groups of rows per kernel call): LayerNorm,
RMSNorm and the residual add + norm vs the float64 reference at row lengths around the lane
and group sizes, row counts that leave a partial group, hard inputs, thread-count and
streaming bitwise identity, non-contiguous inputs.  d = 129 is the first long-row length."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import ADVERSARIAL, DTYPES, make_array, randn
from threadpoolctl import threadpool_limits

import normffn
from normffn import _tuning
from normffn import reference as ref
from normffn.testing import assert_close

D_SHORT = [1, 2, 3, 7, 16, 31, 32, 33, 96, 127, 128, 129]
N_ROWS = [1, 3, 17, 1000]
DT_IDS = lambda d: np.dtype(d).name  # noqa: E731


def _sum_atol(nrows, dtype):
    # dweight/dbias sum over rows: allow the float32 error to grow like sqrt(rows)
    return np.sqrt(max(1, nrows)) * 2e-5 if dtype == np.float32 else None


def _check_layer(x, w, b, dy, dtype, context):
    d = x.shape[-1]
    y, ctx = normffn.layer_norm_forward(x, d, w, b)
    y_r, ctx_r = ref.layer_norm_forward(x, d, w, b)
    assert_close(y, y_r, name="y", context=context)
    assert_close(ctx.mean, ctx_r.mean, dtype=dtype, name="mean", context=context)
    assert_close(ctx.rstd, ctx_r.rstd, dtype=dtype, name="rstd", context=context)
    dx, dw, db = normffn.layer_norm_backward(dy, ctx)
    dx_r, dw_r, db_r = ref.layer_norm_backward(dy, ctx_r)
    assert_close(dx, dx_r, name="dx", context=context)
    atol = _sum_atol(x.shape[0], dtype)
    if w is not None:
        assert_close(dw, dw_r, name="dweight", context=context, atol=atol)
    if b is not None:
        assert_close(db, db_r, name="dbias", context=context, atol=atol)


def _check_rms(x, w, dy, dtype, context):
    d = x.shape[-1]
    y, ctx = normffn.rms_norm_forward(x, d, w)
    y_r, ctx_r = ref.rms_norm_forward(x, d, w)
    assert_close(y, y_r, name="y", context=context)
    assert_close(ctx.rstd, ctx_r.rstd, dtype=dtype, name="rstd", context=context)
    dx, dw = normffn.rms_norm_backward(dy, ctx)
    dx_r, dw_r = ref.rms_norm_backward(dy, ctx_r)
    assert_close(dx, dx_r, name="dx", context=context)
    if w is not None:
        assert_close(dw, dw_r, name="dweight", context=context,
                     atol=_sum_atol(x.shape[0], dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("d", D_SHORT)
@pytest.mark.parametrize("n", N_ROWS)
def test_layer_and_rms_match_reference(rng, dtype, d, n):
    x = randn(rng, (n, d), dtype) * 2 + 0.5
    dy = randn(rng, (n, d), dtype)
    w, b = randn(rng, (d,), dtype), randn(rng, (d,), dtype)
    ctx = f"{np.dtype(dtype).name} ({n}, {d})"
    _check_layer(x, w, b, dy, dtype, ctx + " weight+bias")
    _check_layer(x, None, None, dy, dtype, ctx + " plain")
    _check_layer(x, w, None, dy, dtype, ctx + " weight only")
    _check_rms(x, w, dy, dtype, ctx + " weight")
    _check_rms(x, None, dy, dtype, ctx + " plain")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("d", [1, 7, 32, 33, 96, 128, 129])
@pytest.mark.parametrize("n", [3, 17])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_add_norm_matches_reference(rng, dtype, d, n, norm):
    x, r = randn(rng, (n, d), dtype), randn(rng, (n, d), dtype) * 3
    dy, ds = randn(rng, (n, d), dtype), randn(rng, (n, d), dtype)
    w, b = randn(rng, (d,), dtype), randn(rng, (d,), dtype)
    context = f"{norm} {np.dtype(dtype).name} ({n}, {d})"
    if norm == "layer":
        y, s = normffn.add_layer_norm(x, r, d, w, b)
        y1, s1, ctx = normffn.add_layer_norm_forward(x, r, d, w, b)
        y_r, s_r, ctx_r = ref.add_layer_norm_forward(x, r, d, w, b)
        got = normffn.add_layer_norm_backward(dy, ctx, ds)
        want = ref.add_layer_norm_backward(dy, ctx_r, ds)
    else:
        y, s = normffn.add_rms_norm(x, r, d, w)
        y1, s1, ctx = normffn.add_rms_norm_forward(x, r, d, w)
        y_r, s_r, ctx_r = ref.add_rms_norm_forward(x, r, d, w)
        got = normffn.add_rms_norm_backward(dy, ctx, ds)
        want = ref.add_rms_norm_backward(dy, ctx_r, ds)
    np.testing.assert_array_equal(s, x + r)  # rounded once, as numpy does
    np.testing.assert_array_equal(y, y1)
    assert_close(y, y_r, name="y", context=context)
    names = ["dsum", "dweight", "dbias"]
    for name, g, e in zip(names, got, want):
        atol = None if name == "dsum" else _sum_atol(n, dtype)
        assert_close(g, e, name=name, context=context, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
@pytest.mark.parametrize("d", [3, 32, 96, 128])
def test_adversarial_rows(rng, dtype, case, d):
    """Rows of 1e4 + tiny noise, constant, tiny, huge values: as accurate as the long rows."""
    x = ADVERSARIAL[case](rng, (19, d), dtype)
    dy = randn(rng, (19, d), dtype)
    w, b = randn(rng, (d,), dtype), randn(rng, (d,), dtype)
    _check_layer(x, w, b, dy, dtype, f"case={case}, d={d}")
    _check_rms(x, w, dy, dtype, f"case={case}, d={d}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("d", [1, 5, 33, 96, 128])
def test_nonfinite_stays_in_its_row(rng, dtype, bad, d):
    n = 19                              # the bad row sits inside a group, beside good rows
    x = randn(rng, (n, d), dtype)
    x[9, d // 2] = bad
    dy = randn(rng, (n, d), dtype)
    w, b = randn(rng, (d,), dtype), randn(rng, (d,), dtype)
    others = np.arange(n) != 9
    y, ctx = normffn.layer_norm_forward(x, d, w, b)
    y_r, ctx_r = ref.layer_norm_forward(x, d, w, b)
    assert np.all(np.isfinite(y[others]))
    assert_close(y, y_r, name="y")
    dx, _, _ = normffn.layer_norm_backward(dy, ctx)
    assert np.all(np.isfinite(dx[others]))
    assert_close(dx, ref.layer_norm_backward(dy, ctx_r)[0], name="dx")
    y, ctx = normffn.rms_norm_forward(x, d, w)
    y_r, ctx_r = ref.rms_norm_forward(x, d, w)
    assert np.all(np.isfinite(y[others]))
    assert_close(y, y_r, name="y (rms)")
    dx, _ = normffn.rms_norm_backward(dy, ctx)
    assert np.all(np.isfinite(dx[others]))
    assert_close(dx, ref.rms_norm_backward(dy, ctx_r)[0], name="dx (rms)")


def _all_outputs(x, r, w, b, dy, ds):
    d = x.shape[-1]
    y, ctx = normffn.layer_norm_forward(x, d, w, b)
    out = [y, ctx.mean, ctx.rstd, *normffn.layer_norm_backward(dy, ctx)]
    y, ctx = normffn.rms_norm_forward(x, d, w)
    out += [y, ctx.rstd, *normffn.rms_norm_backward(dy, ctx)]
    y, s, ctx = normffn.add_layer_norm_forward(x, r, d, w, b)
    out += [y, s, *normffn.add_layer_norm_backward(dy, ctx, ds)]
    y, s, ctx = normffn.add_rms_norm_forward(x, r, d, w)
    out += [y, s, *normffn.add_rms_norm_backward(dy, ctx, ds)]
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(4001, 32), (1003, 96), (777, 128), (5000, 7)])
def test_threads_and_streaming_bitwise_identical(rng, dtype, shape):
    """1 and 2 threads, plain and streamed stores: the same bits, every op and output."""
    n, d = shape
    x, r = randn(rng, shape, dtype) + 3, randn(rng, shape, dtype)
    dy, ds = randn(rng, shape, dtype), randn(rng, shape, dtype)
    w, b = randn(rng, (d,), dtype), randn(rng, (d,), dtype)
    runs = []
    for threads, stream in [(1, False), (2, False), (2, True), (1, True)]:
        try:
            if stream:
                _tuning.set_stream_threshold(1)
            with threadpool_limits(limits=threads, user_api="openmp"):
                runs.append(_all_outputs(x, r, w, b, dy, ds))
        finally:
            _tuning.set_stream_threshold(None)
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("d", [5, 32, 96, 100, 128])
def test_row_result_does_not_depend_on_its_group(rng, dtype, d):
    """A row's y, mean and rstd are the same bits whether it sits in a full group, a partial
    one or alone (rows are computed G at a time; the slices below move every row's position)."""
    x = randn(rng, (41, d), dtype) * 3 + 1e3
    w, b = randn(rng, (d,), dtype), randn(rng, (d,), dtype)
    y, ctx = normffn.layer_norm_forward(x, d, w, b)
    for lo, hi in [(0, 1), (3, 4), (1, 10), (5, 41), (7, 40), (9, 26)]:
        ys, cs = normffn.layer_norm_forward(np.ascontiguousarray(x[lo:hi]), d, w, b)
        np.testing.assert_array_equal(ys, y[lo:hi])
        np.testing.assert_array_equal(cs.mean, ctx.mean[lo:hi])
        np.testing.assert_array_equal(cs.rstd, ctx.rstd[lo:hi])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("layout", ["strided", "transposed", "readonly"])
@pytest.mark.parametrize("d", [3, 32, 96])
def test_non_contiguous_inputs(rng, dtype, layout, d):
    values = randn(rng, (17, d), dtype) * 2 + 1
    dvalues = randn(rng, (17, d), dtype)
    w, b = randn(rng, (d,), dtype), randn(rng, (d,), dtype)
    x, dy = make_array(values, layout), make_array(dvalues, layout)
    y, ctx = normffn.layer_norm_forward(x, d, w, b)
    np.testing.assert_array_equal(y, normffn.layer_norm(values, d, w, b))
    assert_close(y, ref.layer_norm(values, d, w, b), name="y", context=layout)
    grads = normffn.layer_norm_backward(dy, ctx)
    _, ctx_c = normffn.layer_norm_forward(values, d, w, b)
    for g, c in zip(grads, normffn.layer_norm_backward(dvalues, ctx_c)):
        np.testing.assert_array_equal(g, c)
    y, ctx = normffn.rms_norm_forward(x, d, w)
    assert_close(y, ref.rms_norm(values, d, w), name="y (rms)", context=layout)
    _, ctx_c = normffn.rms_norm_forward(values, d, w)
    for g, c in zip(normffn.rms_norm_backward(dy, ctx), normffn.rms_norm_backward(dvalues, ctx_c)):
        np.testing.assert_array_equal(g, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_needs_match_the_full_backward(rng, dtype):
    """dx only, dweight/dbias only (the sums-only kernel) and the nodw case agree bitwise with
    the full backward on short rows, with a partial last group."""
    n, d = 1003, 96
    x, dy = randn(rng, (n, d), dtype) + 1, randn(rng, (n, d), dtype)
    w, b = randn(rng, (d,), dtype), randn(rng, (d,), dtype)
    _, ctx = normffn.layer_norm_forward(x, d, w, b)
    full = normffn.layer_norm_backward(dy, ctx)
    for needs in [(True, False, False), (False, True, True), (False, True, False),
                  (False, False, True), (True, False, True)]:
        got = normffn.layer_norm_backward(dy, ctx, needs=needs)
        for g, f, need in zip(got, full, needs):
            if need:
                np.testing.assert_array_equal(g, f, err_msg=f"needs={needs}")
