"""BatchNorm on dask arrays: channels on axis 1, any chunking of any axis.

Training, in three phases over the blocks (the same phases ``normffn.batch_norm`` exposes):

1. per block, per channel: ``(count, mean, M2)`` in float64 (``partial_stats``);
2. merged in a fixed tree of :data:`~normffn.dask.SPLIT_EVERY` blocks per node with Chan's
   formulas (``merge_stats``), then ``finalize_stats`` -> ``(mean, var_biased, rstd)``.  This is
   computed when ``batch_norm`` is called (the running stats, NumPy arrays, are updated in
   place then by ``update_running_stats``, as the NumPy forward updates them); only per-block
   statistics (3 floats per channel per block) cross the network;
3. per block, lazily: ``y = (x - mean) * rstd * weight + bias`` (``apply``).

Backward: the two channel sums ``sum(dy)`` and ``sum(dy * (x - mean))`` as lazy fixed-tree
float64 reductions of per-block sums (``backward_sums``), then ``dx`` per block
(``backward_apply``); ``dweight = sum(dy * (x - mean)) * rstd``, ``dbias = sum(dy)``.

Eval: each block is ``normffn.batch_norm(..., training=False)`` on its channels, bitwise
identical to the NumPy call on the whole array.

The phases are ``normffn.batch_norm``'s own (the module; the package attribute of that name is
the function), so one chunk gives exactly the one-call results and the running stats are
updated by the same ``update_running_stats`` the NumPy forward calls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

import normffn
from normffn.batch_norm import (apply, backward_apply, backward_sums, finalize_stats,
                                merge_stats, partial_stats, update_running_stats)

from . import _graph


# ---------------------------------------------------------------------------------------------
# tasks
def _stats_task(x, threads):
    """One block's partial statistics as an array of shape (1, Cb, 1, ..., 1, 3)."""
    with _graph.limit_threads(threads):
        count, mean, m2 = partial_stats(x)
    cb = x.shape[1]
    p = np.stack([np.broadcast_to(np.asarray(a, np.float64), (cb,)) for a in (count, mean, m2)],
                 axis=-1)
    return p.reshape((1, cb) + (1,) * (x.ndim - 2) + (3,))


def _identity(p, axis=None, keepdims=False):
    return p


def _merge_task(p, axis=None, keepdims=False):
    """Merge the partials of a stacked (.., Cb, .., 3) array over ``axis`` in C order."""
    axis = tuple(a % p.ndim for a in ((axis,) if isinstance(axis, int) else axis))
    moved = np.moveaxis(p, 1, -2)                  # (..reduced.., Cb, 3)
    flat = moved.reshape(-1, moved.shape[-2], 3)
    n, m, m2 = merge_stats([(q[:, 0], q[:, 1], q[:, 2]) for q in flat])
    out = np.stack([np.broadcast_to(np.asarray(a, np.float64), (p.shape[1],))
                    for a in (n, m, m2)], axis=-1)
    if keepdims:
        return out.reshape((1, p.shape[1]) + (1,) * (p.ndim - 3) + (3,))
    return out


def _apply_task(x, mean, rstd, weight, bias, threads):
    with _graph.limit_threads(threads):
        return apply(x, mean, rstd, weight, bias)


def _eval_task(x, running_mean, running_var, weight, bias, eps, threads):
    with _graph.limit_threads(threads):
        return normffn.batch_norm(x, running_mean.copy(), running_var.copy(), weight, bias,
                                  training=False, eps=eps)


def _sums_task(dy, x, mean, threads):
    with _graph.limit_threads(threads):
        sdy, sdyx = backward_sums(dy, x, mean)
    p = np.stack([sdy, sdyx], axis=-1)
    return p.reshape((1, x.shape[1]) + (1,) * (x.ndim - 2) + (2,))


def _dx_task(dy, x, mean, rstd, weight, sums, count, training, threads):
    if sums is None:   # eval: dx = dy * rstd * weight, the sums are not read
        sdy = sdyx = np.zeros(x.shape[1])
    else:
        sdy, sdyx = np.ascontiguousarray(sums[:, 0]), np.ascontiguousarray(sums[:, 1])
    with _graph.limit_threads(threads):
        return backward_apply(dy, x, mean, rstd, weight, sdy, sdyx, count, training)


# ---------------------------------------------------------------------------------------------
def _letters(ndim):
    return _graph.lead_letters(ndim)


def _per_channel(a, chunks, name):
    """A NumPy (C,) array (or None) as a dask array chunked like x's channel axis."""
    if a is None:
        return None
    return da.from_array(np.array(a, copy=True), chunks=(chunks,), name=f"{name}-"
                         f"{dask.base.tokenize(a, chunks)}")


def _pc(arr, ind):
    """blockwise (array, index) pair for an optional per-channel argument."""
    return (arr, None) if arr is None else (arr, ind)


def _channel_reduce(parts: da.Array, k: int, name: str) -> da.Array:
    """Sum per-block (1, Cb, 1.., k) float64 partials over every axis but the channels in a fixed
    tree: a lazy (C, k) array."""
    axes = (0,) + tuple(range(2, parts.ndim - 1))
    return parts.sum(axis=axes, dtype=np.float64, split_every=_graph.SPLIT_EVERY)


def batch_statistics(x: da.Array, threads=None) -> da.Array:
    """Lazy (C, 3) float64 ``(count, mean, M2)`` of ``x`` over all axes but 1: per-block
    partials merged in a fixed tree (``da.reduction`` with Chan's merge)."""
    ind = _letters(x.ndim)
    parts = da.blockwise(_stats_task, ind + "Z", x, ind, threads, None,
                         new_axes={"Z": 3},
                         adjust_chunks={c: 1 for i, c in enumerate(ind) if i != 1},
                         dtype=np.float64, meta=np.empty((0,) * (x.ndim + 1)),
                         name=f"bn-partial-stats-{dask.base.tokenize(x.name, threads)}")
    axes = (0,) + tuple(range(2, x.ndim))
    return da.reduction(parts, chunk=_identity, combine=_merge_task, aggregate=_merge_task,
                        axis=axes, keepdims=False, dtype=np.float64,
                        split_every=_graph.SPLIT_EVERY, concatenate=True, meta=np.empty((0, 3)))


@dataclass(frozen=True, eq=False)
class BatchNormDaskContext:
    """What :func:`batch_norm_backward` needs; returned by :func:`batch_norm_forward`.

    Attributes
    ----------
    x : dask.array.Array
        The input.
    weight, bias : ndarray or None
        Copies of the parameters.
    eps : float
        As given.
    training : bool
        As given.
    mean, rstd : ndarray of shape (C,), float64
        NumPy arrays — training: the exact batch statistics (computed when the forward was
        called); eval: the running mean and ``1 / sqrt(running_var + eps)``.
    count : float
        The values per channel, ``N * prod(spatial)``.
    threads : int or None
        The ``normffn.threads`` setting the graph was built with.
    """

    x: da.Array
    weight: np.ndarray | None
    bias: np.ndarray | None
    eps: float
    training: bool
    mean: np.ndarray
    rstd: np.ndarray
    count: float
    threads: object = None

    @property
    def shape(self):
        return self.x.shape

    @property
    def dtype(self):
        return self.x.dtype


def _validate(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """Run the NumPy API on a small stand-in (2 rows per channel, copies of the running stats)
    so every argument error is raised now, as the NumPy call raises it."""
    if not isinstance(x, da.Array):
        if isinstance(x, np.ndarray):
            x = da.from_array(x, chunks=x.shape)
        else:
            raise TypeError(f"x must be a dask.array.Array (or a numpy.ndarray), got "
                            f"{type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, C, *spatial) with rank >= 2, got shape "
                         f"{x.shape}")
    if training and math.prod(x.shape) // max(x.shape[1], 1) <= 1:
        raise ValueError(f"training needs more than 1 value per channel, got x of shape "
                         f"{x.shape} ({math.prod(x.shape) // max(x.shape[1], 1)} value(s) per "
                         f"channel)")
    probe = np.zeros((2, x.shape[1]) + (1,) * (x.ndim - 2), dtype=x.dtype)
    rm = None if running_mean is None else running_mean
    if isinstance(rm, np.ndarray):
        rm = rm.copy()
    rv = None if running_var is None else running_var
    if isinstance(rv, np.ndarray):
        rv = rv.copy()
    normffn.batch_norm_forward(probe, rm, rv, weight, bias, training, momentum, eps)
    return x


def batch_norm_forward(x, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5, *, out=None):
    """:func:`normffn.batch_norm_forward` on a dask array: ``(y, ctx)``, y lazy.

    Training: the batch statistics are computed now (one pass over x on the current scheduler;
    per-block float64 ``(count, mean, M2)`` merged in a fixed tree) and ``running_mean`` /
    ``running_var`` (NumPy arrays) are updated in place exactly as the NumPy API updates them.
    Eval: nothing is computed until y is.  Any chunking of any axis.

    Parameters
    ----------
    x : dask.array.Array of shape ``(N, C, *spatial)``
        float32 or float64, any chunking.
    running_mean, running_var : ndarray of shape (C,), or both None
        NumPy arrays, updated in place in training.
    weight, bias, training, momentum, eps
        As :func:`normffn.batch_norm_forward`.
    out : None
        Not supported on dask arrays.

    Returns
    -------
    y : dask.array.Array
        Lazy.
    ctx : BatchNormDaskContext
        ``ctx.mean``, ``ctx.rstd`` NumPy float64 (C,).

    Raises
    ------
    TypeError, ValueError
        As the NumPy function (validated on a small stand-in before anything runs); ``out=``
        is a ValueError.

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import normffn, normffn.dask as nd
    >>> x = np.random.default_rng(0).standard_normal((16, 3, 4))
    >>> rm, rv = np.zeros(3), np.ones(3)
    >>> y, ctx = nd.batch_norm_forward(da.from_array(x, chunks=(4, 1, 2)), rm, rv, training=True)
    >>> bool(np.allclose(rm, 0.1 * x.mean(axis=(0, 2))))          # updated at call time
    True
    >>> bool(np.allclose(y.compute(), normffn.batch_norm(x, None, None, training=True)))
    True
    """
    if out is not None:
        raise ValueError("normffn.dask.batch_norm_forward(): out= is not supported on dask "
                         "arrays (results are lazy; write them with dask.array.store)")
    x = _validate(x, running_mean, running_var, weight, bias, training, momentum, eps)
    training = bool(training)
    momentum, eps = float(momentum), float(eps)
    threads = _graph.threads_setting()
    dtype = x.dtype
    C = x.shape[1]
    N, S = x.shape[0], math.prod(x.shape[2:])
    cchunks = x.chunks[1]
    ind = _letters(x.ndim)
    cind = ind[1]
    weight = _graph.copy_param(weight)
    bias = _graph.copy_param(bias)
    w = _per_channel(weight, cchunks, "bn-weight")
    b = _per_channel(bias, cchunks, "bn-bias")

    if training:
        stats = batch_statistics(x, threads).compute()
        count, mean_m, m2 = stats[:, 0], stats[:, 1], stats[:, 2]
        mean64, var64, rstd64 = finalize_stats(count, mean_m, m2, eps)
        if running_mean is not None:   # the one-call forward's update, with its int count
            update_running_stats(running_mean, running_var, mean64, var64, N * S, momentum)
        y = da.blockwise(_apply_task, ind, x, ind, _per_channel(mean64, cchunks, "bn-mean"),
                         cind, _per_channel(rstd64, cchunks, "bn-rstd"), cind, *_pc(w, cind),
                         *_pc(b, cind), threads, None, dtype=dtype,
                         meta=np.empty((0,) * x.ndim, dtype=dtype),
                         name=f"bn-apply-{dask.base.tokenize(x.name, mean64, rstd64, w, b)}")
    else:
        mean64 = running_mean.astype(np.float64)
        var64 = running_var.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            rstd64 = 1.0 / np.sqrt(var64 + eps)
        rm = _per_channel(running_mean, cchunks, "bn-running-mean")
        rv = _per_channel(running_var, cchunks, "bn-running-var")
        y = da.blockwise(_eval_task, ind, x, ind, rm, cind, rv, cind, *_pc(w, cind),
                         *_pc(b, cind), eps, None, threads, None, dtype=dtype,
                         meta=np.empty((0,) * x.ndim, dtype=dtype),
                         name=f"bn-eval-{dask.base.tokenize(x.name, rm, rv, w, b, eps)}")
    ctx = BatchNormDaskContext(x=x, weight=weight, bias=bias, eps=eps, training=training,
                               mean=mean64, rstd=rstd64, count=float(N * S), threads=threads)
    return y, ctx


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, out=None):
    """:func:`normffn.batch_norm` on a dask array (see :func:`batch_norm_forward`); returns y.

    Parameters
    ----------
    x : dask.array.Array of shape ``(N, C, *spatial)``
        Any chunking.
    running_mean, running_var, weight, bias, training, momentum, eps
        As :func:`batch_norm_forward`.
    out : None
        Not supported on dask arrays.

    Returns
    -------
    y : dask.array.Array
        Lazy.

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import normffn.dask as nd
    >>> x = da.from_array(np.array([[3.0], [5.0]]), chunks=1)
    >>> nd.batch_norm(x, np.array([1.0]), np.array([4.0]), eps=0.0).compute().tolist()
    [[1.0], [2.0]]
    """
    return batch_norm_forward(x, running_mean, running_var, weight, bias, training, momentum,
                              eps, out=out)[0]


def batch_norm_backward(dy, ctx, *, needs=None):
    """:func:`normffn.batch_norm_backward` on dask arrays: ``(dx, dweight, dbias)``, all lazy.

    The channel sums ``sum(dy)`` and ``sum(dy * (x - mean))`` are fixed-tree float64 reductions
    of per-block sums; ``dweight = (sum(dy * (x - mean)) * rstd).astype(dtype)``,
    ``dbias = sum(dy).astype(dtype)`` as in the NumPy API.  dx (training) depends on both sums,
    so computing it reads x and dy twice.

    Parameters
    ----------
    dy : dask.array.Array
        The gradient of y.
    ctx : BatchNormDaskContext
        From :func:`batch_norm_forward`.
    needs : tuple of 3 bools, optional
        (dx, dweight, dbias); False entries are None.

    Returns
    -------
    dx, dweight, dbias : dask.array.Array or None
        Lazy.

    Raises
    ------
    TypeError
        ``ctx`` is not a BatchNormDaskContext.

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import normffn.dask as nd
    >>> x = da.from_array(np.random.default_rng(0).standard_normal((8, 2)), chunks=(4, 2))
    >>> y, ctx = nd.batch_norm_forward(x, None, None, np.ones(2), np.zeros(2), training=True)
    >>> dx, dw, db = nd.batch_norm_backward(da.ones((8, 2), chunks=(4, 2)), ctx)
    >>> db.compute().tolist()
    [8.0, 8.0]
    """
    if not isinstance(ctx, BatchNormDaskContext):
        raise TypeError(f"ctx must be the context returned by normffn.dask.batch_norm_forward, "
                        f"got {type(ctx).__name__}")
    x = ctx.x
    if not isinstance(dy, da.Array):
        if isinstance(dy, np.ndarray):
            dy = da.from_array(dy, chunks=x.chunks)
        else:
            raise TypeError(f"dy must be a dask.array.Array, got {type(dy).__name__}")
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape}, expected {x.shape} (the forward output's)")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy has dtype {dy.dtype}, expected {x.dtype} (x's dtype)")
    want = (True, True, True) if needs is None else tuple(bool(n) for n in needs)
    if len(want) != 3:
        raise ValueError(f"needs has {len(want)} entries, expected 3 (dx, dweight, dbias)")
    want_dw = want[1] and ctx.weight is not None
    want_db = want[2] and ctx.bias is not None
    dy = dy.rechunk(x.chunks)
    ind = _letters(x.ndim)
    cind = ind[1]
    cchunks = x.chunks[1]
    threads = ctx.threads
    mean = _per_channel(ctx.mean, cchunks, "bn-mean")
    sums = None
    if want_dw or want_db or (want[0] and ctx.training):
        parts = da.blockwise(_sums_task, ind + "Z", dy, ind, x, ind, mean, cind, threads, None,
                             new_axes={"Z": 2},
                             adjust_chunks={c: 1 for i, c in enumerate(ind) if i != 1},
                             dtype=np.float64, meta=np.empty((0,) * (x.ndim + 1)),
                             name=f"bn-backward-sums-{dask.base.tokenize(dy.name, x.name, mean)}")
        sums = _channel_reduce(parts, 2, "bn-backward-sums")     # lazy (C, 2)
    dx = dw = db = None
    if want[0]:
        dx = da.blockwise(_dx_task, ind, dy, ind, x, ind, mean, cind,
                          _per_channel(ctx.rstd, cchunks, "bn-rstd"), cind,
                          *_pc(_per_channel(ctx.weight, cchunks, "bn-weight"), cind),
                          *((sums, cind + "Z") if ctx.training else (None, None)),
                          ctx.count, None, ctx.training, None, threads, None,
                          concatenate=True, dtype=x.dtype,
                          meta=np.empty((0,) * x.ndim, dtype=x.dtype),
                          name=f"bn-dx-{dask.base.tokenize(dy.name, x.name, ctx.mean, ctx.rstd, ctx.training)}")
    if want_dw:
        rstd = da.from_array(ctx.rstd, chunks=(cchunks,))
        dw = (sums[:, 1] * rstd).astype(x.dtype)
    if want_db:
        db = sums[:, 0].astype(x.dtype)
    return dx, dw, db
