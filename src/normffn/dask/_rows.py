"""Row-wise ops on dask arrays: LayerNorm, RMSNorm, the add-norms, the FFN and the FFN block.

Every row-wise op normalises or transforms the trailing *feature* axes of each row on its own,
so one block of whole rows is one call of the NumPy API:

* the row inputs (``x``, ``residual``; ``dy``, ``ds``) are rechunked so the feature axes are a
  single chunk (a chunking that splits a row is moved to whole rows first: that costs one
  rechunk of the input) and the lead axes share one chunking;
* forward: one task per block calls ``normffn.<op>_forward`` and keeps its ``(outputs, ctx)``;
  the outputs and the context's per-row statistics are lazy dask arrays over those tasks;
* backward: one task per block calls ``normffn.<op>_backward`` with that block's ``ctx``; the
  row gradient (``dx``/``dsum``) is a lazy dask array, each parameter gradient is a lazy float64
  sum of the per-block gradients in a fixed tree, cast to the input dtype at the end.

Row outputs are therefore bitwise identical to the NumPy call on the whole array.  Parameter
gradients differ from it only by how the rows are grouped: each block's gradient is the
kernel's (in the input dtype: for float32 rounded to float32 once per block), the blocks are
summed in float64.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace

import dask
import dask.array as da
import numpy as np

import normffn

from . import _buffers, _graph


@dataclass(frozen=True)
class RowOp:
    """How to run one NumPy op blockwise: its entry points' names, which arguments are row
    arrays, and how many trailing feature axes a row has."""

    name: str
    rows: tuple            # names of the row-array parameters of the forward, e.g. ("x",)
    nfeat: object          # callable(bound arguments) -> number of trailing feature axes
    grad_rows: tuple = ("dy",)   # row-array parameters of the backward besides ctx
    blas: bool = False     # the op calls BLAS (limit its threads too)
    x_like_outputs: int = 1  # forward outputs shaped like x (out=; 2: a tuple); 0: none

    def numpy(self, suffix: str):
        fn = getattr(normffn, self.name + suffix, None)
        if fn is None:
            raise NotImplementedError(f"normffn.{self.name}{suffix} is not available in this "
                                      f"build of normffn")
        return fn


def _nfeat_normalized(args) -> int:
    ns = args["normalized_shape"]
    return 1 if isinstance(ns, (int, np.integer)) else len(tuple(ns))


def _nfeat_one(args) -> int:
    return 1


OPS = {
    "layer_norm": RowOp("layer_norm", ("x",), _nfeat_normalized),
    "rms_norm": RowOp("rms_norm", ("x",), _nfeat_normalized),
    "add_layer_norm": RowOp("add_layer_norm", ("x", "residual"), _nfeat_normalized,
                            grad_rows=("dy", "ds"), x_like_outputs=2),
    "add_rms_norm": RowOp("add_rms_norm", ("x", "residual"), _nfeat_normalized,
                          grad_rows=("dy", "ds"), x_like_outputs=2),
    "ffn": RowOp("ffn", ("x",), _nfeat_one, blas=True, x_like_outputs=0),
    "ffn_block": RowOp("ffn_block", ("x",), _nfeat_one, blas=True),
}


# ---------------------------------------------------------------------------------------------
# tasks (module level: pickled by reference to distributed workers)
def _split_forward(res):
    """``(outputs, ctx)`` from a ``*_forward`` result: ``(y, ctx)``, ``((y, s), ctx)`` or
    ``(y, s, ctx)``."""
    outs, ctx = tuple(res[:-1]), res[-1]
    if len(outs) == 1 and isinstance(outs[0], tuple):
        outs = outs[0]
    return outs, ctx


def _reused_out(fname, x):
    """``out=`` for a forward of ``fname`` on block ``x``: x-shaped outputs from the buffer pool
    (_buffers), or None (the op allocates; also where the NumPy call will reject x)."""
    n = OPS[fname.removesuffix("_forward")].x_like_outputs
    if n == 0 or not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64):
        return None
    outs = tuple(_buffers.empty(x.shape, x.dtype) for _ in range(n))
    return outs[0] if n == 1 else outs


def _forward_task(fname, rows, params, threads, blas, *blocks):
    fn = getattr(normffn, fname)
    kwargs = dict(params)
    kwargs.update(zip(rows, blocks))
    kwargs["out"] = _reused_out(fname, blocks[0])
    with _graph.limit_threads(threads, blas):
        return _split_forward(fn(**kwargs))


def _backward_task(fname, grad_rows, needs, threads, blas, fw, *blocks):
    fn = getattr(normffn, fname)
    kwargs = {k: b for k, b in zip(grad_rows, blocks) if b is not None}
    if needs is not None:
        kwargs["needs"] = needs
    with _graph.limit_threads(threads, blas):
        return tuple(fn(ctx=fw[1], **kwargs))


def _plain_task(fname, rows, params, threads, blas, *blocks):
    fn = getattr(normffn, fname)
    kwargs = dict(params)
    kwargs.update(zip(rows, blocks))
    kwargs["out"] = _reused_out(fname, blocks[0])
    with _graph.limit_threads(threads, blas):
        return fn(**kwargs)


def _field_task(fw, name):
    return getattr(fw[1], name)


# ---------------------------------------------------------------------------------------------
def _as_dask(a, name: str):
    if isinstance(a, da.Array):
        return a
    if isinstance(a, np.ndarray):
        return da.from_array(a, chunks=a.shape or ())
    raise TypeError(f"{name} must be a dask.array.Array (or a numpy.ndarray), got "
                    f"{type(a).__name__}")


def _whole_rows(a: da.Array, nfeat: int, lead_chunks=None) -> da.Array:
    """``a`` with its trailing ``nfeat`` axes in one chunk (and the lead axes chunked as
    ``lead_chunks`` if given)."""
    nlead = a.ndim - nfeat
    lead = tuple(lead_chunks) if lead_chunks is not None else a.chunks[:nlead]
    return a.rechunk(lead + tuple((s,) for s in a.shape[nlead:]))


def _probe(a: da.Array, nlead: int) -> np.ndarray:
    """A zero-row NumPy stand-in of ``a`` (same dtype, trailing shape) for validating the
    arguments with the NumPy API before building a graph; a single row if there is no lead
    axis."""
    if nlead == 0:
        return np.zeros(a.shape, dtype=a.dtype)
    return np.zeros((0,) + a.shape[1:], dtype=a.dtype)


def _bind(fn, args, kwargs, public: str):
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{public}(): {e}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


class RowContext:
    """What ``normffn.dask.<op>_backward`` needs; returned by ``normffn.dask.<op>_forward``.

    Holds the lazy per-block forward results (each block's NumPy ``ctx``).  Per-row statistics
    of the NumPy context (``mean``, ``rstd``: shape ``x.shape[:nlead]``) are lazy dask arrays
    here; parameters (``weight``, ``w1``, ``eps``, ...) are the NumPy values the forward used.

    Computing the forward outputs and the gradients in one ``dask.compute(y, dx, dw, ...)`` runs
    each block's forward once; computing them separately runs it again, unless the context is
    kept in memory with :meth:`persist` first.

    Examples
    --------
    >>> import numpy as np
    >>> import dask.array as da
    >>> import normffn.dask as nd
    >>> y, ctx = nd.layer_norm_forward(da.ones((4, 3), chunks=(2, 3)), 3, np.ones(3))
    >>> ctx.shape, ctx.weight.tolist(), ctx.rstd.shape
    ((4, 3), [1.0, 1.0, 1.0], (4,))
    >>> ctx = ctx.persist()                  # keep the forward blocks for backward
    """

    def __init__(self, op, blocks, shape, dtype, nlead, out_shapes, probe_ctx, threads):
        self.op = op
        self.blocks = blocks            # dask array (lead axes) of per-block (outputs, ctx)
        self.shape = shape              # shape of x
        self.dtype = dtype
        self.nlead = nlead
        self.out_shapes = out_shapes    # shapes of the forward outputs (y, s, ...)
        self._probe_ctx = probe_ctx
        self._threads = threads

    def persist(self, **kwargs):
        """A copy whose per-block forward results are computed and kept (in the workers'
        memory on a cluster), so backward does not rerun the forward."""
        new = object.__new__(RowContext)
        new.__dict__.update(self.__dict__)
        new.blocks = self.blocks.persist(**kwargs)
        return new

    def __getattr__(self, name):
        if name.startswith("_") or name in ("op", "blocks", "shape", "dtype", "nlead",
                                            "out_shapes"):
            raise AttributeError(name)
        value = getattr(self._probe_ctx, name)
        lead_probe = (0,) + tuple(self.shape[1:self.nlead])
        per_row = (value.shape[:self.nlead] == lead_probe if self.nlead > 0
                   else value.ndim == 0) if isinstance(value, np.ndarray) else False
        if per_row:  # one value (or vector) per row: lazy, from the blocks' contexts
            rest = value.shape[self.nlead:]
            lead = _graph.lead_letters(self.nlead)
            feat = _graph.feat_letters(len(rest))
            return da.blockwise(_field_task, lead + feat, self.blocks, lead, name, None,
                                new_axes=dict(zip(feat, rest)), dtype=value.dtype,
                                meta=np.empty((0,) * (self.nlead + len(rest)), value.dtype),
                                name=f"ctx-{name}-{dask.base.tokenize(self.blocks.name)}")
        if isinstance(value, np.ndarray) and value.shape[:1] == (0,):
            raise AttributeError(f"ctx.{name} holds flattened rows; it is not available "
                                 f"lazily on a dask context")
        return value


def _prepare(op: RowOp, fn, args, kwargs, public):
    """Validate (by the NumPy API on zero-row stand-ins), rechunk the row inputs to whole rows
    with one lead chunking, and ship the other arguments.  Returns what the graph needs."""
    bound = _bind(fn, args, kwargs, public)
    if bound.get("out") is not None:
        raise ValueError(f"{public}(): out= is not supported on dask arrays (results are lazy; "
                         f"write them with dask.array.store)")
    bound.pop("out", None)
    rows = [_as_dask(bound.pop(r), r) for r in op.rows]
    nfeat = op.nfeat(bound)
    x = rows[0]
    if x.ndim < nfeat:
        raise ValueError(f"x has shape {x.shape}: fewer than the {nfeat} feature axes")
    nlead = x.ndim - nfeat
    params = {k: _graph.copy_param(v) for k, v in bound.items()}
    probe_rows = [_probe(r, nlead) for r in rows]
    for r in rows[1:]:
        if r.shape != x.shape:
            raise ValueError(f"row inputs have shapes {x.shape} and {r.shape}; expected equal")
    probe = fn(**params, **dict(zip(op.rows, probe_rows)))  # raises what the NumPy API raises
    first = _whole_rows(rows[0], nfeat)
    rows = [first] + [_whole_rows(r, nfeat, first.chunks[:nlead]) for r in rows[1:]]
    return rows, nlead, params, probe


def _row_output(blocks, path, nlead, shape, dtype, name):
    """The lazy row array ``pick(block, *path)`` (lead axes chunked as ``blocks``)."""
    lead = _graph.lead_letters(nlead)
    rest = shape[nlead:]
    feat = _graph.feat_letters(len(rest))
    return da.blockwise(_graph.pick, lead + feat, blocks, lead, *[a for p in path for a in (p, None)],
                        new_axes=dict(zip(feat, rest)), dtype=dtype,
                        meta=np.empty((0,) * len(shape), dtype=dtype),
                        name=f"{name}-{dask.base.tokenize(blocks.name, path)}")


def _blockwise_call(task, op, fname, rows, nlead, params, threads, name):
    """One task per block of whole rows: ``task(fname, rows, params, threads, blas, *blocks)``;
    its results (tuples) form a dask array over the lead axes."""
    lead = _graph.lead_letters(nlead)
    row_args = []
    for r in rows:
        row_args += [r, lead + _graph.feat_letters(r.ndim - nlead)]
    return da.blockwise(task, lead, fname, None, op.rows, None, _graph.ship(params, fname), None,
                        threads, None, op.blas, None, *row_args, concatenate=True, dtype=object,
                        meta=np.empty((0,) * nlead, dtype=object),
                        name=f"{name}-{dask.base.tokenize(fname, rows, params, threads)}")


def forward(opname: str, args, kwargs):
    """``normffn.dask.<op>_forward``: lazy outputs in the NumPy op's structure, and a
    :class:`RowContext`."""
    op = OPS[opname]
    fname = op.name + "_forward"
    fn = op.numpy("_forward")
    rows, nlead, params, probe = _prepare(op, fn, args, kwargs, f"normffn.dask.{fname}")
    probe_outs, probe_ctx = _split_forward(probe)
    threads = _graph.threads_setting()
    blocks = _blockwise_call(_forward_task, op, fname, rows, nlead, params, threads,
                             f"{fname}-blocks")
    lead_shape = rows[0].shape[:nlead]
    outs, shapes = [], []
    for i, p in enumerate(probe_outs):
        shape = lead_shape + p.shape[nlead:]
        outs.append(_row_output(blocks, (0, i), nlead, shape, p.dtype, f"{op.name}-out{i}"))
        shapes.append(shape)
    ctx = RowContext(op, blocks, rows[0].shape, rows[0].dtype, nlead, tuple(shapes), probe_ctx,
                     threads)
    nested = len(probe) == 2 and isinstance(probe[0], tuple)
    if nested:
        return tuple(outs), ctx
    return (*outs, ctx)


def plain(opname: str, args, kwargs):
    """``normffn.dask.<op>``: the NumPy op (keeps no context) blockwise, lazy."""
    op = OPS[opname]
    fn = op.numpy("")
    rows, nlead, params, probe = _prepare(op, fn, args, kwargs, f"normffn.dask.{op.name}")
    threads = _graph.threads_setting()
    probe_outs = probe if isinstance(probe, tuple) else (probe,)
    lead_shape = rows[0].shape[:nlead]
    if len(probe_outs) == 1:
        p = probe_outs[0]
        shape = lead_shape + p.shape[nlead:]
        lead = _graph.lead_letters(nlead)
        return da.blockwise(
            _plain_task, lead + _graph.feat_letters(len(shape) - nlead), op.name, None,
            op.rows, None, _graph.ship(params, op.name), None, threads, None, op.blas, None,
            *[a for r in rows for a in (r, lead + _graph.feat_letters(r.ndim - nlead))],
            concatenate=True, new_axes=dict(zip(_graph.feat_letters(len(shape) - nlead),
                                                shape[nlead:])),
            dtype=p.dtype, meta=np.empty((0,) * len(shape), dtype=p.dtype),
            name=f"{op.name}-{dask.base.tokenize(rows, params, threads)}")
    blocks = _blockwise_call(_plain_task, op, op.name, rows, nlead, params, threads,
                             f"{op.name}-blocks")
    return tuple(_row_output(blocks, (i,), nlead, lead_shape + p.shape[nlead:], p.dtype,
                             f"{op.name}-out{i}") for i, p in enumerate(probe_outs))


def backward(opname: str, grads_in: dict, ctx: RowContext, needs=None):
    """``normffn.dask.<op>_backward``: the row gradient lazy, parameter gradients as lazy
    fixed-tree float64 sums of the per-block gradients, cast to the input dtype."""
    op = OPS[opname]
    fname = op.name + "_backward"
    fn = op.numpy("_backward")
    public = f"normffn.dask.{fname}"
    if not isinstance(ctx, RowContext) or ctx.op.name != op.name:
        raise TypeError(f"{public}(): ctx must be the context returned by "
                        f"normffn.dask.{op.name}_forward, got {type(ctx).__name__}")
    nlead = ctx.nlead
    lead_chunks = ctx.blocks.chunks
    blocks_in, probes = [], {}
    for (gname, g), shape in zip(grads_in.items(), ctx.out_shapes):
        if g is None:
            blocks_in.append(None)
            continue
        g = _as_dask(g, gname)
        if g.shape != shape:
            raise ValueError(f"{public}(): {gname} has shape {g.shape}, expected {shape} (the "
                             f"forward output's)")
        blocks_in.append(_whole_rows(g, g.ndim - nlead, lead_chunks))
        probes[gname] = _probe(g, nlead)
    probe_kwargs = dict(probes)
    if needs is not None:
        probe_kwargs["needs"] = needs
    # raises what the NumPy API raises (a malformed needs included); each task then skips the
    # work of the gradients needs leaves out
    probe = fn(ctx=ctx._probe_ctx, **probe_kwargs)
    task_needs = None if needs is None else tuple(bool(n) for n in needs)
    want = task_needs if task_needs is not None else (True,) * len(probe)

    lead = _graph.lead_letters(nlead)
    args = [_backward_task, lead, fname, None, tuple(grads_in), None, task_needs, None,
            ctx._threads, None, op.blas, None, ctx.blocks, lead]
    for b in blocks_in:
        args += [b, None] if b is None else [b, lead + _graph.feat_letters(b.ndim - nlead)]
    blocks = da.blockwise(*args, concatenate=True, dtype=object,
                          meta=np.empty((0,) * nlead, dtype=object),
                          name=f"{fname}-blocks-{dask.base.tokenize(ctx.blocks.name, blocks_in, task_needs, ctx._threads)}")
    out = []
    for i, (p, w) in enumerate(zip(probe, want)):
        if p is None or not w:
            out.append(None)
        elif i == 0:  # the row gradient: dx, or dsum for the add-norms
            out.append(_row_output(blocks, (0,), nlead, ctx.shape[:nlead] + p.shape[nlead:],
                                   p.dtype, f"{op.name}-grad0"))
        else:
            parts = _graph.partials(blocks, (i,), nlead, p.shape, f"{op.name}-grad{i}-part")
            out.append(_graph.tree_sum(parts, nlead).astype(p.dtype))
    return tuple(out)
