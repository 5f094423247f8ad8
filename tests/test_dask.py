"""normffn.dask: the NumPy API on dask arrays.

Row-wise outputs must be bitwise identical to the NumPy call on the whole array for any chunking
(split feature axes included); parameter gradients and BatchNorm statistics close to it and
bitwise reproducible across schedulers (synchronous, threads, a 2-process LocalCluster).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

import normffn  # noqa: E402
import normffn.dask as nd  # noqa: E402
from normffn.dask import _graph  # noqa: E402

DTYPES = [np.float32, np.float64]
SCHEDULERS = ["sync", "threads"]
# float64 sums of per-block gradients vs the whole-array kernel: one rounding per block
GRAD_RTOL = {np.float32: 2e-5, np.float64: 1e-12}


def _rng(seed=0):
    return np.random.default_rng(seed)


def _arr(shape, dtype, seed=0, offset=0.0):
    return (offset + _rng(seed).standard_normal(shape)).astype(dtype)


def _close(got, want, dtype, what):
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    assert err <= GRAD_RTOL[dtype] * scale, f"{what} {np.dtype(dtype)}: max abs err {err:.3g}"


def _equal(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert np.array_equal(got, want, equal_nan=True), \
        f"{what}: not bitwise equal, max abs diff {np.nanmax(np.abs(got - want)):.3g}"


def test_core_does_not_import_dask():
    code = "import sys, normffn; assert 'dask' not in sys.modules, 'normffn imported dask'"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(normffn.__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ---------------------------------------------------------------------------------------------
# LayerNorm
LN_CASES = [  # (x shape, normalized_shape, chunks)
    ((257, 96), 96, (64, 96)),             # row chunks only
    ((257, 96), 96, (100, 40)),            # the feature axis split: rechunked to whole rows
    ((6, 37, 8, 12), (8, 12), (4, 10, 3, 5)),  # two lead axes, two normalised axes, all split
    ((5, 3, 64), 64, (5, 3, 64)),          # one block
    ((64,), 64, (16,)),                    # no lead axis: one row
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,nshape,chunks", LN_CASES)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_layer_norm_matches_numpy(dtype, shape, nshape, chunks, scheduler):
    ns = (nshape,) if isinstance(nshape, int) else nshape
    x = _arr(shape, dtype, 1, offset=3.0)
    w, b = _arr(ns, dtype, 2), _arr(ns, dtype, 3)
    dy = _arr(shape, dtype, 4)
    xd = da.from_array(x, chunks=chunks)
    dyd = da.from_array(dy, chunks=chunks[::-1] if len(chunks) == 2 else chunks)

    y_plain = nd.layer_norm(xd, nshape, w, b, 1e-5)
    y, ctx = nd.layer_norm_forward(xd, nshape, w, b, 1e-5)
    dx, dw, db = nd.layer_norm_backward(dyd, ctx)
    got = dask.compute(y_plain, y, ctx.mean, ctx.rstd, dx, dw, db, scheduler=scheduler)

    yr, cr = normffn.layer_norm_forward(x, nshape, w, b, 1e-5)
    dxr, dwr, dbr = normffn.layer_norm_backward(dy, cr)
    for g, r, name in zip(got[:5], (yr, yr, cr.mean, cr.rstd, dxr),
                          ("y", "y(forward)", "mean", "rstd", "dx")):
        _equal(g, r, name)
    assert got[5].dtype == dtype and got[6].dtype == dtype
    _close(got[5], dwr, dtype, "dweight")
    _close(got[6], dbr, dtype, "dbias")


def test_layer_norm_without_params_and_needs():
    x, dy = _arr((100, 32), np.float32, 1), _arr((100, 32), np.float32, 2)
    xd, dyd = da.from_array(x, chunks=30), da.from_array(dy, chunks=30)
    y, ctx = nd.layer_norm_forward(xd, 32)
    dx, dw, db = nd.layer_norm_backward(dyd, ctx)
    assert dw is None and db is None
    _equal(dx.compute(), normffn.layer_norm_backward(dy, normffn.layer_norm_forward(x, 32)[1])[0],
           "dx")
    w = _arr(32, np.float32, 3)
    y, ctx = nd.layer_norm_forward(xd, 32, w)
    dx, dw, db = nd.layer_norm_backward(dyd, ctx, needs=(False, True, False))
    assert dx is None and db is None and dw.shape == (32,)


def test_parameters_are_captured_when_called():
    x = _arr((64, 16), np.float64, 1)
    w = np.ones(16)
    y = nd.layer_norm(da.from_array(x, chunks=16), 16, w)
    w[:] = 5.0  # the graph runs later; it must use the weight as it was
    _equal(y.compute(), normffn.layer_norm(x, 16, np.ones(16)), "y")


def test_errors_are_raised_when_called():
    xd = da.zeros((10, 8), chunks=5, dtype=np.float32)
    with pytest.raises(ValueError, match="weight"):
        nd.layer_norm(xd, 8, np.ones(7, np.float32))
    with pytest.raises(TypeError):
        nd.layer_norm(xd, 8, np.ones(8, np.float64))
    with pytest.raises(TypeError):
        nd.layer_norm(da.zeros((10, 8), chunks=5, dtype=np.int32), 8)
    with pytest.raises(ValueError, match="out="):
        nd.layer_norm(xd, 8, out=np.empty((10, 8), np.float32))
    y, ctx = nd.layer_norm_forward(xd, 8)
    with pytest.raises(ValueError, match="shape"):
        nd.layer_norm_backward(da.zeros((10, 9), chunks=5, dtype=np.float32), ctx)
    with pytest.raises(TypeError):
        nd.layer_norm_backward(da.zeros((10, 8), chunks=5, dtype=np.float32), object())
    with pytest.raises(ValueError, match="training"):
        nd.batch_norm(da.zeros((1, 3), dtype=np.float32), None, None, training=True)


# ---------------------------------------------------------------------------------------------
# FFN
GATED = ["swiglu", "geglu", "reglu"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"] + GATED)
def test_ffn_matches_numpy(dtype, activation):
    d, h = 48, 80
    hw = 2 * h if activation in GATED else h     # gated: w1 packed (d, 2h) = [gate | up]
    # blocks of >= 64 rows: OpenBLAS's small-matrix kernels (tiny M*N*K, transposed operand)
    # round differently from its blocked ones, so tiny blocks can differ in the last bit
    x = _arr((3, 128, d), dtype, 1)
    w1, w2 = 0.2 * _arr((d, hw), dtype, 2), 0.2 * _arr((h, d), dtype, 3)
    b1, b2 = _arr(hw, dtype, 4), _arr(d, dtype, 5)
    dy = _arr(x.shape, dtype, 6)
    xd = da.from_array(x, chunks=(2, 64, 20))       # the feature axis split too
    w2t = np.asfortranarray(w2)                      # a transposed-layout weight, as from torch
    y_plain = nd.ffn(xd, w1, b1, w2t, b2, activation)
    y, ctx = nd.ffn_forward(xd, w1, b1, w2t, b2, activation)
    grads = nd.ffn_backward(da.from_array(dy, chunks=(3, 50, d)), ctx)
    got = dask.compute(y_plain, y, *grads, scheduler="threads")
    yr, cr = normffn.ffn_forward(x, w1, b1, w2t, b2, activation)
    gr = normffn.ffn_backward(dy, cr)
    _equal(got[0], normffn.ffn(x, w1, b1, w2t, b2, activation), "y")
    _equal(got[1], yr, "y(forward)")
    _equal(got[2], gr[0], "dx")
    for g, r, name in zip(got[3:], gr[1:], ("dw1", "db1", "dw2", "db2")):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        _close(g, r, dtype, name)


# ---------------------------------------------------------------------------------------------
# BatchNorm
BN_CASES = [  # (x shape, chunks)
    ((9, 6, 5, 7), (4, 4, 2, 3)),     # NCHW, every axis split
    ((300, 10), (64, 3)),             # (N, C)
    ((7, 4, 33), (7, 4, 10)),         # (N, C, L)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,chunks", BN_CASES)
def test_batch_norm_training_matches_numpy(dtype, shape, chunks):
    C = shape[1]
    x = _arr(shape, dtype, 1, offset=1e3)           # a large offset: stats must be stable
    w, b = _arr(C, dtype, 2), _arr(C, dtype, 3)
    dy = _arr(shape, dtype, 4)
    rm, rv = _arr(C, dtype, 5), np.abs(_arr(C, dtype, 6)) + 0.5
    rm_np, rv_np = rm.copy(), rv.copy()
    xd = da.from_array(x, chunks=chunks)
    y, ctx = nd.batch_norm_forward(xd, rm, rv, w, b, True, 0.3, 1e-5)
    yr, cr = normffn.batch_norm_forward(x, rm_np, rv_np, w, b, True, 0.3, 1e-5)
    tol = 1e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(ctx.mean, cr.mean, rtol=1e-12 if dtype == np.float64 else 1e-9)
    np.testing.assert_allclose(ctx.rstd, cr.rstd, rtol=tol)
    np.testing.assert_allclose(rm, rm_np, rtol=tol)       # updated in place, NumPy's formula
    np.testing.assert_allclose(rv, rv_np, rtol=tol)
    np.testing.assert_allclose(y.compute(), yr, atol=50 * tol)
    dx, dw, db = nd.batch_norm_backward(da.from_array(dy, chunks=chunks[::-1]), ctx)
    dxr, dwr, dbr = normffn.batch_norm_backward(dy, cr)
    got = dask.compute(dx, dw, db)
    np.testing.assert_allclose(got[0], dxr, atol=50 * tol)
    np.testing.assert_allclose(got[1], dwr, rtol=50 * tol, atol=50 * tol)
    np.testing.assert_allclose(got[2], dbr, rtol=50 * tol, atol=50 * tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(9, 6, 5, 7), (300, 10)])
def test_batch_norm_one_chunk_is_the_one_call(dtype, shape):
    """One block: the phases (partial_stats -> merge -> finalize -> update_running_stats ->
    apply; backward_sums -> backward_apply) give exactly the one-call NumPy results."""
    C = shape[1]
    x, dy = _arr(shape, dtype, 1, offset=1e3), _arr(shape, dtype, 2)
    w, b = _arr(C, dtype, 3), _arr(C, dtype, 4)
    rm, rv = _arr(C, dtype, 5), np.abs(_arr(C, dtype, 6)) + 0.5
    rm_np, rv_np = rm.copy(), rv.copy()
    y, ctx = nd.batch_norm_forward(da.from_array(x, chunks=shape), rm, rv, w, b, True, 0.3)
    yr, cr = normffn.batch_norm_forward(x, rm_np, rv_np, w, b, True, 0.3)
    _equal(ctx.mean, cr.mean, "mean")
    _equal(ctx.rstd, cr.rstd, "rstd")
    _equal(rm, rm_np, "running_mean")
    _equal(rv, rv_np, "running_var")
    _equal(y.compute(), yr, "y")
    got = dask.compute(*nd.batch_norm_backward(da.from_array(dy, chunks=shape), ctx))
    for g, r, name in zip(got, normffn.batch_norm_backward(dy, cr), ("dx", "dweight", "dbias")):
        _equal(g, r, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_eval_bitwise(dtype):
    shape, C = (9, 6, 5, 7), 6
    x, dy = _arr(shape, dtype, 1), _arr(shape, dtype, 2)
    w, b = _arr(C, dtype, 3), _arr(C, dtype, 4)
    rm, rv = _arr(C, dtype, 5), np.abs(_arr(C, dtype, 6)) + 0.5
    y, ctx = nd.batch_norm_forward(da.from_array(x, chunks=(4, 4, 2, 3)), rm, rv, w, b)
    yr, cr = normffn.batch_norm_forward(x, rm, rv, w, b)
    _equal(y.compute(), yr, "y(eval)")
    _equal(ctx.mean, cr.mean, "mean")
    _equal(ctx.rstd, cr.rstd, "rstd")
    dx, dw, db = dask.compute(*nd.batch_norm_backward(da.from_array(dy, chunks=4), ctx))
    dxr, dwr, dbr = normffn.batch_norm_backward(dy, cr)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(dx, dxr, rtol=tol, atol=tol)
    np.testing.assert_allclose(dw, dwr, rtol=tol, atol=tol)
    np.testing.assert_allclose(db, dbr, rtol=tol, atol=tol)


def test_batch_norm_statistics_deterministic_and_exact():
    """Merged statistics of a hard input (1e4 + noise) against float64 NumPy; the same bits
    for repeated runs and for both schedulers."""
    x = _arr((64, 3, 16, 16), np.float32, 7, offset=1e4)
    xd = da.from_array(x, chunks=(5, 2, 7, 16))
    s1 = nd._batch_norm.batch_statistics(xd).compute(scheduler="sync")
    s2 = nd._batch_norm.batch_statistics(xd).compute(scheduler="threads")
    _equal(s1, s2, "stats across schedulers")
    x64 = np.moveaxis(x, 1, 0).reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(s1[:, 0], x64.shape[1])
    # The statistics are the kernel's (normffn.batch_norm.partial_stats: the one-call forward's
    # own block statistics): float64 sums of float32 data, the deviations x - mean formed in
    # float32 against a split mean.  Against NumPy's all-float64 two-pass statistics: the mean
    # a few 1e-14 apart, M2 a few 1e-9 (float32's resolution is 6e-8).
    m2_64 = ((x64 - x64.mean(axis=1, keepdims=True)) ** 2).sum(1)
    np.testing.assert_allclose(s1[:, 1], x64.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(s1[:, 2], m2_64, rtol=1e-8)
    _, cr = normffn.batch_norm_forward(x, None, None, training=True)
    np.testing.assert_allclose(s1[:, 1], cr.mean, rtol=1e-13)
    np.testing.assert_allclose(1 / np.sqrt(s1[:, 2] / s1[:, 0] + 1e-5), cr.rstd, rtol=1e-8)


# ---------------------------------------------------------------------------------------------
# RMSNorm and the residual add + norms
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_matches_numpy(dtype, scheduler, eps):
    x, dy, w = _arr((90, 40), dtype, 1), _arr((90, 40), dtype, 2), _arr(40, dtype, 3)
    xd = da.from_array(x, chunks=(25, 15))             # the feature axis split: rechunked
    y_plain = nd.rms_norm(xd, 40, w, eps)
    y, ctx = nd.rms_norm_forward(xd, 40, w, eps)
    dx, dw = nd.rms_norm_backward(da.from_array(dy, chunks=30), ctx)
    got = dask.compute(y_plain, y, ctx.rstd, dx, dw, scheduler=scheduler)
    yr, cr = normffn.rms_norm_forward(x, 40, w, eps)
    dxr, dwr = normffn.rms_norm_backward(dy, cr)
    for g, r, name in zip(got[:4], (yr, yr, cr.rstd, dxr), ("y", "y(forward)", "rstd", "dx")):
        _equal(g, r, name)
    assert got[4].dtype == dtype
    _close(got[4], dwr, dtype, "dweight")


def test_rms_norm_multi_axis_and_needs():
    x, dy = _arr((6, 5, 4, 8), np.float32, 1), _arr((6, 5, 4, 8), np.float32, 2)
    w = _arr((4, 8), np.float32, 3)
    xd = da.from_array(x, chunks=(4, 2, 3, 5))
    y, ctx = nd.rms_norm_forward(xd, (4, 8), w)
    dx, dw = nd.rms_norm_backward(da.from_array(dy, chunks=3), ctx, needs=(True, False))
    assert dw is None
    yr, cr = normffn.rms_norm_forward(x, (4, 8), w)
    _equal(y.compute(), yr, "y")
    _equal(dx.compute(), normffn.rms_norm_backward(dy, cr)[0], "dx")
    dx, dw = nd.rms_norm_backward(da.from_array(dy, chunks=3), ctx, needs=(False, True))
    assert dx is None
    _close(dw.compute(), normffn.rms_norm_backward(dy, cr)[1], np.float32, "dweight")
    dx, dw = nd.rms_norm_backward(da.from_array(dy, chunks=3),
                                  nd.rms_norm_forward(xd, (4, 8))[1])
    assert dw is None                                      # no weight: no dweight
    with pytest.raises(ValueError, match="needs"):
        nd.rms_norm_backward(da.from_array(dy, chunks=3), ctx, needs=(True,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True])
def test_add_norm_matches_numpy(dtype, rms):
    n, d = 90, 40
    x, r = _arr((n, d), dtype, 1, offset=2.0), _arr((n, d), dtype, 2)
    dy, ds = _arr((n, d), dtype, 3), _arr((n, d), dtype, 4)
    w, b = _arr(d, dtype, 5), _arr(d, dtype, 6)
    # x and residual chunked differently (residual takes x's rows), the feature axis split
    xd, rd = da.from_array(x, chunks=(25, 15)), da.from_array(r, chunks=20)
    if rms:
        plain, fwd, bwd = nd.add_rms_norm, nd.add_rms_norm_forward, nd.add_rms_norm_backward
        np_fwd, np_bwd = normffn.add_rms_norm_forward, normffn.add_rms_norm_backward
        params = (w, None)
    else:
        plain, fwd, bwd = nd.add_layer_norm, nd.add_layer_norm_forward, nd.add_layer_norm_backward
        np_fwd, np_bwd = normffn.add_layer_norm_forward, normffn.add_layer_norm_backward
        params = (w, b, 1e-5)
    y_plain, s_plain = plain(xd, rd, d, *params)
    y, s, ctx = fwd(da.from_array(x, chunks=30), da.from_array(r, chunks=30), d, *params)
    grads = bwd(da.from_array(dy, chunks=30), ctx, da.from_array(ds, chunks=45))
    post = bwd(da.from_array(dy, chunks=30), ctx)           # post-LN: no ds
    got = dask.compute(y_plain, s_plain, y, s, ctx.rstd, *grads, post[0], scheduler="threads")
    yr, sr, cr = np_fwd(x, r, d, *params)
    gr = np_bwd(dy, cr, ds)
    for g, ref, name in zip(got[:5] + (got[5], got[-1]),
                            (yr, sr, yr, sr, cr.rstd, gr[0], np_bwd(dy, cr)[0]),
                            ("y", "s", "y(forward)", "s(forward)", "rstd", "dsum", "dsum(no ds)")):
        _equal(g, ref, name)
    if not rms:
        _equal(ctx.mean.compute(), cr.mean, "mean")
    for g, ref, name in zip(got[6:-1], gr[1:], ("dweight", "dbias")):
        assert g.dtype == dtype
        _close(g, ref, dtype, name)
    dsum, *rest = bwd(da.from_array(dy, chunks=30), ctx, None,
                      needs=(False,) + (True,) * (len(gr) - 1))
    assert dsum is None and all(g is not None for g in rest)


# ---------------------------------------------------------------------------------------------
# FFN block (issue #13): runs where this build has normffn.ffn_block
def test_ffn_block_guarded_until_available():
    if nd.available("ffn_block"):
        pytest.skip("normffn.ffn_block exists: covered by test_ffn_block_matches_numpy")
    xd = da.zeros((4, 8), chunks=2, dtype=np.float32)
    w1, w2 = np.zeros((8, 16), np.float32), np.zeros((16, 8), np.float32)
    for call in (lambda: nd.ffn_block(xd, None, None, w1, None, w2, None),
                 lambda: nd.ffn_block_forward(xd, None, None, w1, None, w2, None)):
        with pytest.raises(NotImplementedError, match="ffn_block"):
            call()


@pytest.mark.skipif(not nd.available("ffn_block"), reason="normffn.ffn_block not in this build")
@pytest.mark.parametrize("norm,placement", [("layer", "pre"), ("rms", "post")])
def test_ffn_block_matches_numpy(norm, placement):
    dtype, d, h = np.float64, 48, 80
    x, dy = _arr((3, 128, d), dtype, 1), _arr((3, 128, d), dtype, 2)
    nw = _arr(d, dtype, 3)
    nb = _arr(d, dtype, 4) if norm == "layer" else None
    w1, w2 = 0.2 * _arr((d, h), dtype, 5), 0.2 * _arr((h, d), dtype, 6)
    b1, b2 = _arr(h, dtype, 7), _arr(d, dtype, 8)
    kw = dict(norm=norm, placement=placement, eps=1e-5)
    args = (nw, nb, w1, b1, w2, b2, "gelu")
    xd = da.from_array(x, chunks=(2, 64, 20))
    y_plain = nd.ffn_block(xd, *args, **kw)
    y, ctx = nd.ffn_block_forward(xd, *args, **kw)
    grads = nd.ffn_block_backward(da.from_array(dy, chunks=(3, 64, d)), ctx)
    got = dask.compute(y_plain, y, *grads, scheduler="threads")
    yr, cr = normffn.ffn_block_forward(x, *args, **kw)
    gr = normffn.ffn_block_backward(dy, cr)
    _equal(got[0], normffn.ffn_block(x, *args, **kw), "y")
    _equal(got[1], yr, "y(forward)")
    _equal(got[2], gr[0], "dx")
    for g, r in zip(got[3:], gr[1:]):
        assert (g is None) == (r is None)
        if r is not None:
            _close(g, r, dtype, "parameter gradient")


# ---------------------------------------------------------------------------------------------
# threads
def _task_share(block):
    from threadpoolctl import threadpool_info
    with _graph.limit_threads(None):
        omp = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "openmp"]
    return np.array([[_graph.task_threads(None), min(omp) if omp else -1]])


def _capped(k):
    cap = _graph._env_threads()
    return k if cap is None else min(k, cap)


def test_thread_share_per_scheduler():
    cores = _graph._cores()
    x = da.zeros((4, 1), chunks=1)
    sync = x.map_blocks(_task_share, dtype=int, chunks=(1, 2)).compute(scheduler="sync")
    assert (sync == _capped(cores)).all()
    with dask.config.set(num_workers=2):
        thr = x.map_blocks(_task_share, dtype=int, chunks=(1, 2)).compute(scheduler="threads")
    assert (thr == _capped(max(1, cores // 2))).all()
    with dask.config.set({_graph.THREADS_KEY: 3}):
        assert _graph.threads_setting() == 3
    with dask.config.set({_graph.THREADS_KEY: 0}), pytest.raises(ValueError):
        _graph.threads_setting()


def test_thread_share_never_exceeds_omp_num_threads(monkeypatch):
    monkeypatch.setattr(_graph, "_env_threads", lambda: 1)
    assert _graph.task_threads(None) == 1
    assert _graph.task_threads(2) == 2               # an explicit setting wins
    assert _graph._omp_num_threads("3,2") == 3       # nested levels: the first one
    for bad in (None, "", "0", "-1", "many"):
        assert _graph._omp_num_threads(bad) is None


def test_thread_share_reads_the_start_environment():
    """OMP_NUM_THREADS as the process started: a later os.environ change (distributed's nanny
    writes its worker settings into the launching process's) does not move the share."""
    code = ("import os; from normffn.dask import _graph; "
            "os.environ['OMP_NUM_THREADS'] = '1'; print(_graph._env_threads())")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(normffn.__file__)))
    for start, want in ((None, "None"), ("3", "3")):
        env.pop("OMP_NUM_THREADS", None)
        if start is not None:
            env["OMP_NUM_THREADS"] = start
        out = subprocess.run([sys.executable, "-c", code], check=True, env=env,
                             capture_output=True, text=True).stdout.strip()
        if os.path.exists("/proc/self/environ"):
            assert out == want


def test_thread_share_counts_every_worker_in_the_process():
    """LocalCluster(processes=False): 2 workers x 1 thread share this process's cores."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster, set_as_default=False) as c:
        shares = c.compute(da.zeros((4, 1), chunks=1).map_blocks(
            _task_share, dtype=int, chunks=(1, 2)), sync=True)
    assert (shares == _capped(max(1, _graph._cores() // 2))).all()


# ---------------------------------------------------------------------------------------------
# reused output buffers (normffn.dask._buffers)
def test_buffer_returns_to_the_pool_only_when_every_view_is_gone():
    import gc
    from normffn.dask import _buffers
    _buffers.release()
    shape, nbytes = (512, 1024), 512 * 1024 * 4
    a = _buffers.pooled(shape, np.float32)
    a[...] = 7.0
    view = a[100:200]          # a consumer keeps a slice; the array itself goes
    addr = a.ctypes.data
    del a
    gc.collect()
    assert _buffers.idle_bytes() == 0
    b = _buffers.pooled(shape, np.float32)       # must not be the buffer the slice still uses
    assert b.ctypes.data != addr
    b[...] = -1.0
    assert (view == 7.0).all()
    del view
    gc.collect()
    assert _buffers.idle_bytes() == nbytes
    c = _buffers.pooled(shape, np.float32)       # reused
    assert c.ctypes.data == addr and c.flags.c_contiguous and c.flags.writeable
    del b, c
    gc.collect()
    assert _buffers.idle_bytes() == _buffers.MAX_IDLE * nbytes    # two idle, no more
    held = [_buffers.pooled(shape, np.float32) for _ in range(_buffers.MAX_IDLE + 3)]
    del held
    gc.collect()
    assert _buffers.idle_bytes() == _buffers.MAX_IDLE * nbytes
    assert nd.release_buffers() == _buffers.MAX_IDLE * nbytes
    assert _buffers.idle_bytes() == 0


def test_outputs_outside_a_worker_are_plain_arrays():
    from normffn.dask import _buffers
    _buffers.release()
    x = _arr((1200, 1024), np.float32, 5)                   # 4.7 MiB chunks
    y = nd.layer_norm(da.from_array(x, chunks=(1200, 1024)), 1024).compute(scheduler="sync")
    _equal(y, normffn.layer_norm(x, 1024), "y")
    assert _buffers.idle_bytes() == 0


# ---------------------------------------------------------------------------------------------
# a real cluster: 2 worker processes, 1 thread each
@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    src = os.path.dirname(os.path.dirname(normffn.__file__))
    saved = dict(os.environ)  # the nanny also writes its worker settings into os.environ
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = src + (os.pathsep + old if old else "")  # workers import normffn
    try:
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, \
                distributed.Client(cluster, set_as_default=False) as c:
            yield c
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_cluster_results_match_local(client):
    x = _arr((400, 64), np.float32, 1, offset=2.0)
    dy = _arr((400, 64), np.float32, 2)
    w, b = _arr(64, np.float32, 3), _arr(64, np.float32, 4)
    xd, dyd = da.from_array(x, chunks=(50, 32)), da.from_array(dy, chunks=50)

    def graph():
        y, ctx = nd.layer_norm_forward(xd, 64, w, b)
        return (y, *nd.layer_norm_backward(dyd, ctx))

    local = dask.compute(*graph(), scheduler="threads")
    remote = client.compute(list(graph()), sync=True)
    for g, r, name in zip(remote, local, ("y", "dx", "dweight", "dbias")):
        _equal(g, r, name)
    _equal(remote[0], normffn.layer_norm(x, 64, w, b), "y vs numpy")
    shares = client.compute(da.zeros((2, 1), chunks=1).map_blocks(
        _task_share, dtype=int, chunks=(1, 2)), sync=True)
    # 2 single-thread worker processes: the nanny sets OMP_NUM_THREADS=1 in each, so each task
    # runs 1 thread and the 2 processes never run more threads than there are cores
    workers_env = client.run(lambda: os.environ.get("OMP_NUM_THREADS"))
    assert set(workers_env.values()) == {"1"}
    assert (shares == 1).all()


def _seeded_block(seed, block_id=None):
    """A (1200, 1024) float32 block made where the task runs (no data in the graph)."""
    return _arr((1200, 1024), np.float32, seed + block_id[0], offset=3.0)


def _idle_bytes():
    from normffn.dask import _buffers
    return _buffers.idle_bytes()


def test_cluster_reuses_output_buffers(client):
    """Chunks of >= 4 MiB: workers build y (and s) in reused buffers; results stay bitwise
    those of NumPy, computed twice (the second time from buffers the first released)."""
    w, b = _arr(1024, np.float32, 8), _arr(1024, np.float32, 9)
    xd, rd = (da.map_blocks(_seeded_block, seed, dtype=np.float32,
                            chunks=((1200, 1200), (1024,))) for seed in (6, 16))
    x = np.concatenate([_seeded_block(6, block_id=(i, 0)) for i in range(2)])   # built here too
    r = np.concatenate([_seeded_block(16, block_id=(i, 0)) for i in range(2)])
    want_y = normffn.layer_norm(x, 1024, w, b)
    want_ay, want_s = normffn.add_layer_norm(x, r, 1024, w, b)
    for _ in range(2):
        y, (ay, s) = client.compute([nd.layer_norm(xd, 1024, w, b),
                                     nd.add_layer_norm(xd, rd, 1024, w, b)], sync=True)
        _equal(y, want_y, "y")
        _equal(ay, want_ay, "add_layer_norm y")
        _equal(s, want_s, "add_layer_norm s")
    idle = client.run(_idle_bytes)
    assert sum(idle.values()) > 0, idle
    freed = client.run(nd.release_buffers)
    assert freed == idle
    assert set(client.run(_idle_bytes).values()) == {0}


def test_cluster_batch_norm_training(client):
    x = _arr((16, 4, 6, 6), np.float64, 3, offset=10.0)
    xd = da.from_array(x, chunks=(5, 3, 6, 4))
    rm1, rv1, rm2, rv2 = np.zeros(4), np.ones(4), np.zeros(4), np.ones(4)
    with dask.config.set(scheduler=client):
        y1, c1 = nd.batch_norm_forward(xd, rm1, rv1, training=True)
        y1 = y1.compute()
    y2, c2 = nd.batch_norm_forward(xd, rm2, rv2, training=True)
    _equal(c1.mean, c2.mean, "mean")
    _equal(c1.rstd, c2.rstd, "rstd")
    _equal(rm1, rm2, "running_mean")
    _equal(rv1, rv2, "running_var")
    _equal(y1, y2.compute(scheduler="sync"), "y")
