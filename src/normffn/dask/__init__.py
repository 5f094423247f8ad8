"""normffn on dask arrays: the NumPy API's signatures, dask arrays in and out.

``pip install ".[dask]"`` (``dask[array]``, ``distributed``).  Works on any dask scheduler —
synchronous, threads, processes or a ``dask.distributed`` cluster — and gives the same results
on each (the graph, including every reduction tree, depends only on the chunking).

Row-wise ops — ``layer_norm``, ``rms_norm``, ``add_layer_norm``, ``add_rms_norm``, ``ffn``
(every activation), ``ffn_block`` and their ``*_forward`` / ``*_backward``:

* lazy, one NumPy call per block of whole rows.  **Chunks that split the feature axes (the
  normalised axes, or the FFN's last axis) are rechunked to whole rows first**; the lead axes
  keep their chunking (and row inputs given together, ``x`` and ``residual`` or ``dy`` and
  ``ds``, take the first one's).
* Row outputs (``y``, ``s``, ``dx``, ``dsum``, the context's ``mean``/``rstd``) are bitwise
  identical to the NumPy call on the whole array.
* Backward: the row gradient is lazy; parameter gradients (``dweight``, ``dbias``, ``dw1``, …)
  are lazy float64 sums, in a fixed tree, of the per-block gradients the NumPy backward returns.
  Precision: each block's gradient is the kernel's, in the input dtype (float32 inputs: one
  float32 rounding per block), the blocks are summed in float64 and the sum is cast to the
  input dtype — within one float32 rounding per block of the whole-array call, and
  deterministic for a fixed chunking.
* Weights and other parameters are NumPy arrays, copied when the op is called and shipped as
  one graph key (a cluster sends them to each worker once).  ``out=`` is not supported (write
  results with ``dask.array.store``).
* Compute outputs and gradients together (``dask.compute(y, dx, dw)``), or ``ctx.persist()``,
  so each block's forward runs once.

BatchNorm — ``batch_norm``, ``batch_norm_forward``, ``batch_norm_backward`` (see
:mod:`normffn.dask._batch_norm`): any chunking of any axis, ``(N, C)`` and ``(N, C, *spatial)``.
Training computes exact global statistics when called, updates the NumPy running stats in place
as the NumPy API does, and returns a lazy output.

Threads: each task limits normffn's OpenMP threads (and the BLAS's, for the FFN ops) to its
share of the worker's cores: ``cores // tasks the worker runs at once`` (at least 1) — 1 on the
threaded scheduler with one thread per core, all cores on the synchronous scheduler, and
``cores // threads_per_worker`` on a distributed worker.  Set it explicitly with the dask setting
``normffn.threads`` (``dask.config.set({"normffn.threads": 2})`` while building the graph; the
value is baked into the graph's tasks, so it reaches every worker).

Memory: on a ``dask.distributed`` worker the forward row outputs of 4 MiB and more (``y``, and
``s`` of the add-norms) are built in buffers the worker reuses once nothing references an
earlier output, instead of fresh pages per task; each worker keeps at most two idle buffers per
chunk size (``release_buffers`` frees them).  Elsewhere outputs come from ``numpy.empty``.
"""
from __future__ import annotations

from . import _buffers, _rows
from ._batch_norm import (BatchNormDaskContext, batch_norm, batch_norm_backward,
                          batch_norm_forward)
from ._graph import SPLIT_EVERY, THREADS_KEY
from ._rows import RowContext

__all__ = [
    "layer_norm", "layer_norm_forward", "layer_norm_backward",
    "rms_norm", "rms_norm_forward", "rms_norm_backward",
    "add_layer_norm", "add_layer_norm_forward", "add_layer_norm_backward",
    "add_rms_norm", "add_rms_norm_forward", "add_rms_norm_backward",
    "ffn", "ffn_forward", "ffn_backward",
    "ffn_block", "ffn_block_forward", "ffn_block_backward",
    "batch_norm", "batch_norm_forward", "batch_norm_backward",
    "RowContext", "BatchNormDaskContext", "SPLIT_EVERY", "THREADS_KEY", "available",
    "release_buffers",
]


def release_buffers() -> int:
    """Free the idle output buffers this process keeps for reuse (see "Memory" above); run it
    on every worker with ``client.run(normffn.dask.release_buffers)``.

    Returns
    -------
    int
        The bytes freed.

    Examples
    --------
    >>> import normffn.dask as nd
    >>> nd.release_buffers()      # outside a worker nothing is pooled
    0
    """
    freed = _buffers.idle_bytes()
    _buffers.release()
    return freed


def available(name: str) -> bool:
    """Whether ``normffn.dask.<name>`` can run: the NumPy op it wraps exists in this build.

    Parameters
    ----------
    name : str
        An op name, such as ``"ffn_block"``.

    Returns
    -------
    bool

    Examples
    --------
    >>> import normffn.dask as nd
    >>> nd.available("layer_norm"), nd.available("no_such_op")
    (True, False)
    """
    import normffn
    return hasattr(normffn, name)


# ---- LayerNorm
def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """:func:`normffn.layer_norm` on dask arrays: lazy, bitwise identical to the NumPy call.

    Each block of whole rows runs one NumPy call; chunks that split the feature axes are
    rechunked to whole rows first.

    Parameters
    ----------
    x : dask.array.Array of shape ``(..., *normalized_shape)``
        float32 or float64.
    normalized_shape, weight, bias, eps
        As :func:`normffn.layer_norm`; weight and bias are NumPy arrays.
    out : None
        Not supported on dask arrays.

    Returns
    -------
    y : dask.array.Array
        Lazy, x's shape and dtype, chunked like x's leading axes.

    Raises
    ------
    TypeError, ValueError
        As the NumPy function, raised when the op is called (the arguments are validated on a
        zero-row stand-in); ``out=`` is a ValueError (write results with ``dask.array.store``).

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import normffn, normffn.dask as nd
    >>> x = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    >>> y = nd.layer_norm(da.from_array(x, chunks=(2, 4)), 8)      # rechunked to (2, 8)
    >>> y.chunks
    ((2, 2, 2), (8,))
    >>> bool(np.array_equal(y.compute(), normffn.layer_norm(x, 8)))
    True
    """
    return _rows.plain("layer_norm", (x, normalized_shape, weight, bias, eps), {"out": out})


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """:func:`normffn.layer_norm_forward` on a dask array: ``(y, ctx)``, y lazy.

    Parameters
    ----------
    x : dask.array.Array of shape ``(..., *normalized_shape)``
        float32 or float64.
    normalized_shape, weight, bias, eps
        As :func:`normffn.layer_norm_forward`; weight and bias are NumPy arrays.
    out : None
        Not supported on dask arrays.

    Returns
    -------
    y : dask.array.Array
        Lazy, bitwise identical to the NumPy call.
    ctx : RowContext
        ``ctx.mean`` and ``ctx.rstd`` are lazy float64 dask arrays of shape
        ``x.shape[:-len(normalized_shape)]``.

    Raises
    ------
    TypeError, ValueError
        As the NumPy function, when the op is called.

    Examples
    --------
    >>> import numpy as np
    >>> import dask
    >>> import dask.array as da
    >>> import normffn.dask as nd
    >>> x = da.from_array(np.arange(12.0).reshape(4, 3), chunks=(2, 3))
    >>> y, ctx = nd.layer_norm_forward(x, 3)
    >>> mean, rstd = dask.compute(ctx.mean, ctx.rstd)
    >>> mean.tolist()
    [1.0, 4.0, 7.0, 10.0]
    """
    return _rows.forward("layer_norm", (x, normalized_shape, weight, bias, eps), {"out": out})


def layer_norm_backward(dy, ctx, *, needs=None):
    """:func:`normffn.layer_norm_backward` on dask arrays: ``(dx, dweight, dbias)``.

    Parameters
    ----------
    dy : dask.array.Array
        The gradient of y (y's shape and dtype); rechunked to ctx's rows.
    ctx : RowContext
        From :func:`layer_norm_forward`.
    needs : tuple of 3 bools, optional
        Which gradients to compute; False entries are None.

    Returns
    -------
    dx : dask.array.Array or None
        Lazy.
    dweight, dbias : dask.array.Array or None
        Lazy fixed-tree float64 sums of per-block gradients, cast to the input dtype (None where
        weight/bias were None or ``needs`` says so).

    Raises
    ------
    TypeError
        ``ctx`` is not a RowContext of this op.

    Examples
    --------
    >>> import numpy as np
    >>> import dask
    >>> import dask.array as da
    >>> import normffn, normffn.dask as nd
    >>> rng = np.random.default_rng(0)
    >>> x, dy, w = rng.standard_normal((8, 4)), rng.standard_normal((8, 4)), np.ones(4)
    >>> y, ctx = nd.layer_norm_forward(da.from_array(x, chunks=(4, 4)), 4, w)
    >>> dx, dw, db = nd.layer_norm_backward(da.from_array(dy, chunks=(4, 4)), ctx)
    >>> dx, dw = dask.compute(dx, dw)                    # one pass: each forward block runs once
    >>> _, np_ctx = normffn.layer_norm_forward(x, 4, w)
    >>> ref_dx, ref_dw, _ = normffn.layer_norm_backward(dy, np_ctx)
    >>> bool(np.array_equal(dx, ref_dx)), bool(np.allclose(dw, ref_dw)), db
    (True, True, None)
    """
    return _rows.backward("layer_norm", {"dy": dy}, ctx, needs)


# ---- RMSNorm
def rms_norm(x, normalized_shape, weight=None, eps=None, *, out=None):
    """:func:`normffn.rms_norm` on dask arrays: lazy, bitwise identical to the NumPy call.

    Each block of whole rows runs one NumPy call; chunks that split the feature axes are
    rechunked to whole rows first.

    Parameters
    ----------
    x : dask.array.Array of shape ``(..., *normalized_shape)``
        float32 or float64.
    normalized_shape, weight, eps
        As :func:`normffn.rms_norm`; weight a NumPy array.
    out : None
        Not supported on dask arrays.

    Returns
    -------
    y : dask.array.Array
        Lazy.

    Raises
    ------
    TypeError, ValueError
        As the NumPy function, raised when the op is called (the arguments are validated on a
        zero-row stand-in); ``out=`` is a ValueError (write results with ``dask.array.store``).

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import normffn, normffn.dask as nd
    >>> x = np.random.default_rng(0).standard_normal((4, 6))
    >>> y = nd.rms_norm(da.from_array(x, chunks=(1, 6)), 6)
    >>> bool(np.array_equal(y.compute(), normffn.rms_norm(x, 6)))
    True
    """
    return _rows.plain("rms_norm", (x, normalized_shape, weight, eps), {"out": out})


def rms_norm_forward(x, normalized_shape, weight=None, eps=None, *, out=None):
    """:func:`normffn.rms_norm_forward` on a dask array: ``(y, ctx)``, y lazy.

    Parameters
    ----------
    x : dask.array.Array of shape ``(..., *normalized_shape)``
        float32 or float64.
    normalized_shape, weight, eps
        As :func:`normffn.rms_norm_forward`.
    out : None
        Not supported on dask arrays.

    Returns
    -------
    y : dask.array.Array
        Lazy.
    ctx : RowContext
        ``ctx.rstd`` is a lazy float64 dask array of shape ``x.shape[:-len(normalized_shape)]``.

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import normffn.dask as nd
    >>> y, ctx = nd.rms_norm_forward(da.ones((4, 2), chunks=(2, 2)), 2, eps=0.0)
    >>> ctx.rstd.compute().tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    return _rows.forward("rms_norm", (x, normalized_shape, weight, eps), {"out": out})


def rms_norm_backward(dy, ctx, *, needs=None):
    """:func:`normffn.rms_norm_backward` on dask arrays: ``(dx, dweight)``.

    Parameters
    ----------
    dy : dask.array.Array
        The gradient of y.
    ctx : RowContext
        From :func:`rms_norm_forward`.
    needs : tuple of 2 bools, optional
        Which gradients to compute.

    Returns
    -------
    dx : dask.array.Array or None
        Lazy.
    dweight : dask.array.Array or None
        A lazy fixed-tree float64 sum of per-block gradients (None without weight or where
        ``needs`` says so).

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import normffn.dask as nd
    >>> x = da.from_array(np.random.default_rng(0).standard_normal((4, 3)), chunks=(2, 3))
    >>> y, ctx = nd.rms_norm_forward(x, 3, np.ones(3))
    >>> dx, dw = nd.rms_norm_backward(da.ones_like(x), ctx)
    >>> dx.shape, dw.shape
    ((4, 3), (3,))
    """
    return _rows.backward("rms_norm", {"dy": dy}, ctx, needs)


# ---- residual add + norm: forward returns (y, s), s = x + residual
def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *,
                   out=None):
    """:func:`normffn.add_layer_norm` on dask arrays: lazy, bitwise identical to the NumPy call.

    Each block of whole rows runs one NumPy call; chunks that split the feature axes are
    rechunked to whole rows first.

    Parameters
    ----------
    x, residual : dask.array.Array of shape ``(..., *normalized_shape)``
        One dtype; ``residual`` takes ``x``'s row chunking.
    normalized_shape, weight, bias, eps
        As :func:`normffn.add_layer_norm`.
    out : None
        Not supported on dask arrays.

    Returns
    -------
    y, s : dask.array.Array
        Lazy; ``s = x + residual``.

    Raises
    ------
    TypeError, ValueError
        As the NumPy function, raised when the op is called (the arguments are validated on a
        zero-row stand-in); ``out=`` is a ValueError (write results with ``dask.array.store``).

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import normffn, normffn.dask as nd
    >>> x, r = da.ones((4, 3), chunks=(2, 3)), da.arange(12.0, chunks=6).reshape(4, 3)
    >>> y, s = nd.add_layer_norm(x, r, 3)
    >>> s[0].compute().tolist()
    [1.0, 2.0, 3.0]
    """
    return _rows.plain("add_layer_norm", (x, residual, normalized_shape, weight, bias, eps),
                       {"out": out})


def add_layer_norm_forward(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *,
                           out=None):
    """:func:`normffn.add_layer_norm_forward` on dask arrays: ``(y, s, ctx)``, y and s lazy.

    Parameters
    ----------
    x, residual : dask.array.Array of shape ``(..., *normalized_shape)``
        One dtype; ``residual`` takes ``x``'s row chunking.
    normalized_shape, weight, bias, eps
        As :func:`normffn.add_layer_norm_forward`.
    out : None
        Not supported on dask arrays.

    Returns
    -------
    y, s : dask.array.Array
        Lazy, bitwise identical to the NumPy call.
    ctx : RowContext
        ``ctx.mean``, ``ctx.rstd`` lazy float64.

    Examples
    --------
    >>> import dask.array as da
    >>> import normffn.dask as nd
    >>> y, s, ctx = nd.add_layer_norm_forward(da.zeros((2, 2), chunks=1), da.ones((2, 2)), 2)
    >>> ctx.mean.compute().tolist()
    [1.0, 1.0]
    """
    return _rows.forward("add_layer_norm", (x, residual, normalized_shape, weight, bias, eps),
                         {"out": out})


def add_layer_norm_backward(dy, ctx, ds=None, *, needs=None):
    """:func:`normffn.add_layer_norm_backward` on dask arrays: ``(dsum, dweight, dbias)``.

    Parameters
    ----------
    dy : dask.array.Array
        The gradient reaching y.
    ctx : RowContext
        From :func:`add_layer_norm_forward`.
    ds : dask.array.Array or None
        The gradient reaching ``s`` from elsewhere.
    needs : tuple of 3 bools, optional
        Which gradients to compute.

    Returns
    -------
    dsum : dask.array.Array or None
        Lazy; the gradient of both x and residual.
    dweight, dbias : dask.array.Array or None
        Lazy fixed-tree float64 sums of per-block gradients.

    Examples
    --------
    >>> import dask.array as da
    >>> import normffn.dask as nd
    >>> y, s, ctx = nd.add_layer_norm_forward(da.zeros((2, 2), chunks=1), da.ones((2, 2)), 2)
    >>> dsum, dw, db = nd.add_layer_norm_backward(da.zeros((2, 2)), ctx, ds=da.ones((2, 2)))
    >>> dsum.compute().tolist(), dw
    ([[1.0, 1.0], [1.0, 1.0]], None)
    """
    return _rows.backward("add_layer_norm", {"dy": dy, "ds": ds}, ctx, needs)


def add_rms_norm(x, residual, normalized_shape, weight=None, eps=None, *, out=None):
    """:func:`normffn.add_rms_norm` on dask arrays: lazy, bitwise identical to the NumPy call.

    Each block of whole rows runs one NumPy call; chunks that split the feature axes are
    rechunked to whole rows first.

    Parameters
    ----------
    x, residual : dask.array.Array of shape ``(..., *normalized_shape)``
        One dtype.
    normalized_shape, weight, eps
        As :func:`normffn.add_rms_norm`.
    out : None
        Not supported on dask arrays.

    Returns
    -------
    y, s : dask.array.Array
        Lazy.

    Raises
    ------
    TypeError, ValueError
        As the NumPy function, raised when the op is called (the arguments are validated on a
        zero-row stand-in); ``out=`` is a ValueError (write results with ``dask.array.store``).

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import normffn, normffn.dask as nd
    >>> y, s = nd.add_rms_norm(da.ones((2, 2), chunks=1), da.ones((2, 2)), 2, eps=0.0)
    >>> y.compute().tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    return _rows.plain("add_rms_norm", (x, residual, normalized_shape, weight, eps),
                       {"out": out})


def add_rms_norm_forward(x, residual, normalized_shape, weight=None, eps=None, *, out=None):
    """:func:`normffn.add_rms_norm_forward` on dask arrays: ``(y, s, ctx)``.

    Parameters
    ----------
    x, residual : dask.array.Array of shape ``(..., *normalized_shape)``
        One dtype.
    normalized_shape, weight, eps
        As :func:`normffn.add_rms_norm_forward`.
    out : None
        Not supported on dask arrays.

    Returns
    -------
    y, s : dask.array.Array
        Lazy.
    ctx : RowContext
        ``ctx.rstd`` lazy float64.

    Examples
    --------
    >>> import dask.array as da
    >>> import normffn.dask as nd
    >>> y, s, ctx = nd.add_rms_norm_forward(da.ones((2, 2)), da.ones((2, 2)), 2, eps=0.0)
    >>> ctx.rstd.compute().tolist()
    [0.5, 0.5]
    """
    return _rows.forward("add_rms_norm", (x, residual, normalized_shape, weight, eps),
                         {"out": out})


def add_rms_norm_backward(dy, ctx, ds=None, *, needs=None):
    """:func:`normffn.add_rms_norm_backward` on dask arrays: ``(dsum, dweight)``.

    Parameters
    ----------
    dy : dask.array.Array
        The gradient reaching y.
    ctx : RowContext
        From :func:`add_rms_norm_forward`.
    ds : dask.array.Array or None
        The gradient reaching ``s`` from elsewhere.
    needs : tuple of 2 bools, optional
        Which gradients to compute.

    Returns
    -------
    dsum : dask.array.Array or None
        Lazy.
    dweight : dask.array.Array or None
        A lazy fixed-tree float64 sum.

    Examples
    --------
    >>> import dask.array as da
    >>> import normffn.dask as nd
    >>> y, s, ctx = nd.add_rms_norm_forward(da.ones((2, 2)), da.ones((2, 2)), 2)
    >>> nd.add_rms_norm_backward(da.zeros((2, 2)), ctx, da.ones((2, 2)))[0].compute().tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    return _rows.backward("add_rms_norm", {"dy": dy, "ds": ds}, ctx, needs)


# ---- FFN (every activation, gated ones with the packed (d, 2h) w1)
def ffn(x, w1, b1, w2, b2, activation="relu", *, out=None):
    """:func:`normffn.ffn` on dask arrays: lazy, bitwise identical to the NumPy call.

    Each block of whole rows runs one NumPy call; chunks that split the feature axes are
    rechunked to whole rows first.  Bitwise identical as long as the BLAS rounds each row the
    same whatever the block's row count.  OpenBLAS does, except in its small-matrix kernels (tiny
    ``rows * d * h`` with a transposed weight; in the tests, blocks under 32 rows at d=48,
    h=80): keep blocks of whole chunks of many rows, as any useful chunking has.

    Parameters
    ----------
    x : dask.array.Array of shape (..., d)
        float32 or float64.
    w1, b1, w2, b2, activation
        As :func:`normffn.ffn`; NumPy arrays, shipped once per worker.
    out : None
        Not supported on dask arrays.

    Returns
    -------
    y : dask.array.Array of shape (..., d)
        Lazy.

    Raises
    ------
    TypeError, ValueError
        As the NumPy function, raised when the op is called (the arguments are validated on a
        zero-row stand-in); ``out=`` is a ValueError (write results with ``dask.array.store``).

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import normffn, normffn.dask as nd
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((64, 8))
    >>> w1, w2 = rng.standard_normal((8, 16)), rng.standard_normal((16, 8))
    >>> y = nd.ffn(da.from_array(x, chunks=(32, 8)), w1, None, w2, None, "gelu")
    >>> bool(np.allclose(y.compute(), normffn.ffn(x, w1, None, w2, None, "gelu")))
    True
    """
    return _rows.plain("ffn", (x, w1, b1, w2, b2, activation), {"out": out})


def ffn_forward(x, w1, b1, w2, b2, activation="relu", recompute=False):
    """:func:`normffn.ffn_forward` on a dask array: ``(y, ctx)``.

    Each block's context (with its hidden activation unless ``recompute=True``) lives where the
    block was computed.

    Parameters
    ----------
    x : dask.array.Array of shape (..., d)
        float32 or float64.
    w1, b1, w2, b2, activation, recompute
        As :func:`normffn.ffn_forward`.

    Returns
    -------
    y : dask.array.Array
        Lazy.
    ctx : RowContext
        The per-block contexts.

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import normffn.dask as nd
    >>> x = da.ones((4, 2), chunks=(2, 2))
    >>> y, ctx = nd.ffn_forward(x, np.eye(2), None, np.eye(2), None)
    >>> y.compute().tolist()
    [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    """
    return _rows.forward("ffn", (x, w1, b1, w2, b2, activation, recompute), {})


def ffn_backward(dy, ctx, *, needs=None):
    """:func:`normffn.ffn_backward` on dask arrays: ``(dx, dw1, db1, dw2, db2)``.

    Parameters
    ----------
    dy : dask.array.Array
        The gradient of y.
    ctx : RowContext
        From :func:`ffn_forward`.
    needs : tuple of 5 bools, optional
        Which gradients to compute.

    Returns
    -------
    dx : dask.array.Array or None
        Lazy.
    dw1, db1, dw2, db2 : dask.array.Array or None
        Lazy fixed-tree float64 sums of per-block gradients.

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import normffn.dask as nd
    >>> x = da.ones((4, 2), chunks=(2, 2))
    >>> y, ctx = nd.ffn_forward(x, np.eye(2), np.zeros(2), np.eye(2), None)
    >>> dx, dw1, db1, dw2, db2 = nd.ffn_backward(da.ones((4, 2), chunks=(2, 2)), ctx)
    >>> db1.compute().tolist(), db2
    ([4.0, 4.0], None)
    """
    return _rows.backward("ffn", {"dy": dy}, ctx, needs)


# ---- FFN sublayer (issue #13): runs where this build has normffn.ffn_block
def ffn_block(x, norm_weight, norm_bias, w1, b1, w2, b2, activation="relu", *, norm="layer",
              placement="pre", eps=1e-5, out=None):
    """:func:`normffn.ffn_block` on dask arrays: lazy, bitwise identical to the NumPy call.

    Each block of whole rows runs one NumPy call; chunks that split the feature axes are
    rechunked to whole rows first.  The BLAS caveat of :func:`ffn` applies.
    NotImplementedError where this build has no ``normffn.ffn_block`` (see :func:`available`).

    Parameters
    ----------
    x : dask.array.Array of shape (..., d)
        float32 or float64.
    norm_weight, norm_bias, w1, b1, w2, b2, activation, norm, placement, eps
        As :func:`normffn.ffn_block`.
    out : None
        Not supported on dask arrays.

    Returns
    -------
    y : dask.array.Array
        Lazy.

    Raises
    ------
    TypeError, ValueError
        As the NumPy function, raised when the op is called (the arguments are validated on a
        zero-row stand-in); ``out=`` is a ValueError (write results with ``dask.array.store``).

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import normffn, normffn.dask as nd
    >>> x = np.random.default_rng(0).standard_normal((64, 4))
    >>> args = (np.ones(4), None, np.eye(4), None, np.eye(4), None)
    >>> y = nd.ffn_block(da.from_array(x, chunks=(32, 4)), *args, norm="rms")
    >>> bool(np.allclose(y.compute(), normffn.ffn_block(x, *args, norm="rms")))
    True
    """
    return _rows.plain("ffn_block", (x, norm_weight, norm_bias, w1, b1, w2, b2, activation),
                       {"norm": norm, "placement": placement, "eps": eps, "out": out})


def ffn_block_forward(x, norm_weight, norm_bias, w1, b1, w2, b2, activation="relu", *,
                      norm="layer", placement="pre", eps=1e-5, recompute=False):
    """:func:`normffn.ffn_block_forward` on a dask array: ``(y, ctx)``.

    Parameters
    ----------
    x : dask.array.Array of shape (..., d)
        float32 or float64.
    norm_weight, norm_bias, w1, b1, w2, b2, activation, norm, placement, eps, recompute
        As :func:`normffn.ffn_block_forward`.

    Returns
    -------
    y : dask.array.Array
        Lazy.
    ctx : RowContext
        ``ctx.rstd`` (and ``ctx.mean`` for LayerNorm) lazy float64.

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import normffn.dask as nd
    >>> x = da.from_array(np.array([[1.0, 3.0], [2.0, 2.0]]), chunks=(1, 2))
    >>> y, ctx = nd.ffn_block_forward(x, None, None, np.eye(2), None, np.eye(2), None)
    >>> ctx.mean.compute().tolist()
    [2.0, 2.0]
    """
    return _rows.forward("ffn_block", (x, norm_weight, norm_bias, w1, b1, w2, b2, activation),
                         {"norm": norm, "placement": placement, "eps": eps,
                          "recompute": recompute})


def ffn_block_backward(dy, ctx, *, needs=None):
    """:func:`normffn.ffn_block_backward` on dask arrays.

    Parameters
    ----------
    dy : dask.array.Array
        The gradient of y.
    ctx : RowContext
        From :func:`ffn_block_forward`.
    needs : tuple of 7 bools, optional
        Which gradients to compute.

    Returns
    -------
    dx : dask.array.Array or None
        Lazy.
    dnorm_weight, dnorm_bias, dw1, db1, dw2, db2 : dask.array.Array or None
        Lazy fixed-tree float64 sums of per-block gradients.

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import normffn.dask as nd
    >>> x = da.from_array(np.array([[1.0, 3.0], [2.0, 2.0]]), chunks=(1, 2))
    >>> y, ctx = nd.ffn_block_forward(x, np.ones(2), None, np.eye(2), None, np.eye(2), None)
    >>> grads = nd.ffn_block_backward(da.ones((2, 2), chunks=(1, 2)), ctx)
    >>> len(grads), grads[0].shape, grads[2]
    (7, (2, 2), None)
    """
    return _rows.backward("ffn_block", {"dy": dy}, ctx, needs)
