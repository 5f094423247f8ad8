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
"""
from __future__ import annotations

from . import _rows
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
]


def available(name: str) -> bool:
    """True if ``normffn.dask.<name>`` can run: the NumPy op it wraps exists in this build
    (``ffn_block`` arrives with its own issue)."""
    import normffn
    return hasattr(normffn, name)


# ---- LayerNorm
def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """``normffn.layer_norm`` on a dask array: lazy, bitwise identical to the NumPy call."""
    return _rows.plain("layer_norm", (x, normalized_shape, weight, bias, eps), {"out": out})


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """``normffn.layer_norm_forward`` on a dask array: ``(y, ctx)``, y lazy; ``ctx.mean`` and
    ``ctx.rstd`` are lazy float64 dask arrays of shape ``x.shape[:-len(normalized_shape)]``."""
    return _rows.forward("layer_norm", (x, normalized_shape, weight, bias, eps), {"out": out})


def layer_norm_backward(dy, ctx, *, needs=None):
    """``normffn.layer_norm_backward``: ``(dx, dweight, dbias)``; dx lazy, dweight/dbias lazy
    fixed-tree float64 sums of per-block gradients (None where weight/bias were None or
    ``needs`` says so)."""
    return _rows.backward("layer_norm", {"dy": dy}, ctx, needs)


# ---- RMSNorm
def rms_norm(x, normalized_shape, weight=None, eps=None, *, out=None):
    """``normffn.rms_norm`` on a dask array: lazy, bitwise identical to the NumPy call."""
    return _rows.plain("rms_norm", (x, normalized_shape, weight, eps), {"out": out})


def rms_norm_forward(x, normalized_shape, weight=None, eps=None, *, out=None):
    """``normffn.rms_norm_forward`` on a dask array: ``(y, ctx)``, y lazy; ``ctx.rstd`` is a
    lazy float64 dask array of shape ``x.shape[:-len(normalized_shape)]``."""
    return _rows.forward("rms_norm", (x, normalized_shape, weight, eps), {"out": out})


def rms_norm_backward(dy, ctx, *, needs=None):
    """``normffn.rms_norm_backward``: ``(dx, dweight)``; dx lazy, dweight a lazy fixed-tree
    float64 sum of per-block gradients (None without weight or where ``needs`` says so)."""
    return _rows.backward("rms_norm", {"dy": dy}, ctx, needs)


# ---- residual add + norm: forward returns (y, s), s = x + residual
def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *,
                   out=None):
    """``normffn.add_layer_norm`` on dask arrays: ``(y, s)``, both lazy and bitwise identical
    to the NumPy call (``residual`` takes ``x``'s row chunking)."""
    return _rows.plain("add_layer_norm", (x, residual, normalized_shape, weight, bias, eps),
                       {"out": out})


def add_layer_norm_forward(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *,
                           out=None):
    """``normffn.add_layer_norm_forward`` on dask arrays: ``(y, s, ctx)``, y and s lazy."""
    return _rows.forward("add_layer_norm", (x, residual, normalized_shape, weight, bias, eps),
                         {"out": out})


def add_layer_norm_backward(dy, ctx, ds=None, *, needs=None):
    """``normffn.add_layer_norm_backward``: ``(dsum, dweight, dbias)``; ``ds`` is the gradient
    reaching ``s`` from elsewhere (or None)."""
    return _rows.backward("add_layer_norm", {"dy": dy, "ds": ds}, ctx, needs)


def add_rms_norm(x, residual, normalized_shape, weight=None, eps=None, *, out=None):
    """``normffn.add_rms_norm`` on dask arrays: ``(y, s)``, both lazy."""
    return _rows.plain("add_rms_norm", (x, residual, normalized_shape, weight, eps),
                       {"out": out})


def add_rms_norm_forward(x, residual, normalized_shape, weight=None, eps=None, *, out=None):
    """``normffn.add_rms_norm_forward`` on dask arrays: ``(y, s, ctx)``."""
    return _rows.forward("add_rms_norm", (x, residual, normalized_shape, weight, eps),
                         {"out": out})


def add_rms_norm_backward(dy, ctx, ds=None, *, needs=None):
    """``normffn.add_rms_norm_backward``: ``(dsum, dweight)``."""
    return _rows.backward("add_rms_norm", {"dy": dy, "ds": ds}, ctx, needs)


# ---- FFN (every activation, gated ones with the packed (d, 2h) w1)
def ffn(x, w1, b1, w2, b2, activation="relu", *, out=None):
    """``normffn.ffn`` on a dask array of shape (..., d): lazy, bitwise identical to the NumPy
    call as long as the BLAS rounds each row the same whatever the block's row count.
    OpenBLAS does, except in its small-matrix kernels (tiny ``rows * d * h`` with a transposed
    weight; in the tests, blocks under 32 rows at d=48, h=80): keep blocks of whole chunks of
    many rows, as any useful chunking has."""
    return _rows.plain("ffn", (x, w1, b1, w2, b2, activation), {"out": out})


def ffn_forward(x, w1, b1, w2, b2, activation="relu", recompute=False):
    """``normffn.ffn_forward`` on a dask array: ``(y, ctx)``.  Each block's context (with its
    hidden activation unless ``recompute=True``) lives where the block was computed."""
    return _rows.forward("ffn", (x, w1, b1, w2, b2, activation, recompute), {})


def ffn_backward(dy, ctx, *, needs=None):
    """``normffn.ffn_backward``: ``(dx, dw1, db1, dw2, db2)``; dx lazy, the rest lazy
    fixed-tree float64 sums of per-block gradients."""
    return _rows.backward("ffn", {"dy": dy}, ctx, needs)


# ---- FFN sublayer (issue #13): runs where this build has normffn.ffn_block
def ffn_block(x, norm_weight, norm_bias, w1, b1, w2, b2, activation="relu", *, norm="layer",
              placement="pre", eps=1e-5, out=None):
    """``normffn.ffn_block`` on a dask array of shape (..., d): lazy (the BLAS caveat of
    :func:`ffn` applies).  NotImplementedError where this build has no ``normffn.ffn_block``
    (see :func:`available`)."""
    return _rows.plain("ffn_block", (x, norm_weight, norm_bias, w1, b1, w2, b2, activation),
                       {"norm": norm, "placement": placement, "eps": eps, "out": out})


def ffn_block_forward(x, norm_weight, norm_bias, w1, b1, w2, b2, activation="relu", *,
                      norm="layer", placement="pre", eps=1e-5, recompute=False):
    """``normffn.ffn_block_forward`` on a dask array: ``(y, ctx)``."""
    return _rows.forward("ffn_block", (x, norm_weight, norm_bias, w1, b1, w2, b2, activation),
                         {"norm": norm, "placement": placement, "eps": eps,
                          "recompute": recompute})


def ffn_block_backward(dy, ctx, *, needs=None):
    """``normffn.ffn_block_backward``: ``(dx, dnorm_weight, dnorm_bias, dw1, db1, dw2, db2)``;
    dx lazy, the parameter gradients lazy fixed-tree float64 sums of per-block gradients."""
    return _rows.backward("ffn_block", {"dy": dy}, ctx, needs)
