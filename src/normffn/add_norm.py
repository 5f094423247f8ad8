"""Residual add + norm, fused: ``s = x + residual``, ``y = layer_norm(s)`` or ``rms_norm(s)``.

``s`` is the residual stream a pre-LN transformer block carries on; both are returned.  The
kernel writes ``s`` while it takes the row's first sum and normalises the row from L1/L2: one
pass over memory per row.  Backward takes the gradient reaching ``y`` and, optionally, the one
reaching ``s`` from downstream (``ds``), and returns ``dsum`` — the gradient of both ``x`` and
``residual`` (they are equal) — with the norm's parameter gradients.  Post-LN is ``ds=None``.

Layers as in :mod:`normffn.rms_norm`: ``check_*`` validates, ``run_*`` trusts its arguments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _checks, _tuning
from ._context import Context, Field
from ._kernels import add_norm as _kernel
from ._workspace import workspace
from .rms_norm import _valid_fast_rows, lead_shape, param_shape

__all__ = ["AddLayerNormContext", "AddRMSNormContext",
           "add_layer_norm", "add_layer_norm_forward", "add_layer_norm_backward",
           "add_rms_norm", "add_rms_norm_forward", "add_rms_norm_backward",
           "check_add_norm", "run_add_norm_forward", "run_add_norm_backward"]


# ---------------------------------------------------------------- contexts
class _AddNormContext(Context):
    """Shared by both add + norm contexts: the saved input is ``s`` (x and residual are not
    kept); ``ctx.x`` is an alias of it for the base class."""

    @property
    def x(self) -> np.ndarray:
        return self.s

    def _extra_checks(self) -> None:
        k = len(self.normalized_shape)
        if self.s.ndim < k or tuple(self.s.shape[self.s.ndim - k:]) != self.normalized_shape:
            raise ValueError("ctx is inconsistent: s does not end in normalized_shape")


@dataclass(frozen=True, eq=False)
class AddLayerNormContext(_AddNormContext):
    """What :func:`add_layer_norm_backward` needs; returned by :func:`add_layer_norm_forward`.

    Attributes
    ----------
    s : ndarray, C-contiguous, the forward's ``x + residual`` (the array returned as ``s``)
    mean, rstd : ndarray of shape ``s.shape[:s.ndim - len(normalized_shape)]``, float64
        Statistics of s, as :class:`normffn.layer_norm.LayerNormContext`'s.
    weight, bias : ndarray of shape normalized_shape, or None
    normalized_shape : tuple of int
    eps : float
    """

    s: np.ndarray
    weight: np.ndarray | None
    bias: np.ndarray | None
    normalized_shape: tuple
    eps: float
    mean: np.ndarray
    rstd: np.ndarray

    _op = "add_layer_norm"
    _fields = (
        Field("s", kind="input"),
        Field("weight", kind="like_x", shape=param_shape, optional=True),
        Field("bias", kind="like_x", shape=param_shape, optional=True),
        Field("mean", kind="float64", shape=lead_shape),
        Field("rstd", kind="float64", shape=lead_shape),
    )

    def _valid_fast(self) -> bool:
        """The common case of :meth:`validate` (see ``Context._valid_fast``)."""
        return _valid_fast_rows(self.s, self.normalized_shape, self.rstd, (self.mean,),
                                (self.weight, self.bias))


@dataclass(frozen=True, eq=False)
class AddRMSNormContext(_AddNormContext):
    """What :func:`add_rms_norm_backward` needs; returned by :func:`add_rms_norm_forward`.

    Attributes
    ----------
    s : ndarray, C-contiguous, the forward's ``x + residual`` (the array returned as ``s``)
    rstd : ndarray of shape ``s.shape[:s.ndim - len(normalized_shape)]``, float64
    weight : ndarray of shape normalized_shape, or None
    normalized_shape : tuple of int
    eps : float
    """

    s: np.ndarray
    weight: np.ndarray | None
    normalized_shape: tuple
    eps: float
    rstd: np.ndarray

    _op = "add_rms_norm"
    _fields = (
        Field("s", kind="input"),
        Field("weight", kind="like_x", shape=param_shape, optional=True),
        Field("rstd", kind="float64", shape=lead_shape),
    )

    def _valid_fast(self) -> bool:
        """The common case of :meth:`validate` (see ``Context._valid_fast``)."""
        return _valid_fast_rows(self.s, self.normalized_shape, self.rstd, (), (self.weight,))


# ---------------------------------------------------------------- check / run
def _out_pair(out, shape, dtype, inputs):
    if out is None:
        return np.empty(shape, dtype=dtype), np.empty(shape, dtype=dtype)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("out must be a pair (y_out, s_out) of arrays, got "
                        f"{type(out).__name__}" + (f" of length {len(out)}"
                                                   if isinstance(out, (tuple, list)) else ""))
    y = _checks.out_array(out[0], "out[0] (y)", shape, dtype, inputs)
    s = _checks.out_array(out[1], "out[1] (s)", shape, dtype, inputs + (y,))
    return y, s


def check_add_norm(x, residual, normalized_shape, weight=None, bias=None, eps=None, *,
                   out=None, rms=False):
    """Validate the forward arguments of add_layer_norm (``rms=False``; bias allowed, eps
    required) or add_rms_norm (``rms=True``; bias must be None, eps None means the dtype's
    machine epsilon).  Returns ``(x, residual, nshape, weight, bias, eps, y, s)`` with x and
    residual C-contiguous and y, s the outputs (``out`` or new)."""
    x, nshape, _ = _checks.row_input(x, normalized_shape)
    dtype = x.dtype
    residual = _checks.float_array(residual, "residual")
    _checks.same_dtype(dtype, "residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"residual has shape {residual.shape}, expected {x.shape} (the shape "
                         "of x)")
    weight = _checks.optional_param(weight, "weight", nshape, dtype)
    bias = None if rms else _checks.optional_param(bias, "bias", nshape, dtype)
    eps = _checks.eps(eps, dtype=dtype if rms else None)
    y, s = _out_pair(out, x.shape, dtype, (x, residual, weight, bias))
    return (np.ascontiguousarray(x), np.ascontiguousarray(residual), nshape, weight, bias, eps,
            y, s)


def run_add_norm_forward(x2, r2, weight, bias, eps, y2, s2, mean, rstd):
    """``s2 = x2 + r2``, ``y2 = norm(s2)`` row by row: LayerNorm when ``mean`` is an array,
    RMSNorm when it is None (bias must then be None).  Trusts its arguments: x2, r2, y2, s2
    C-contiguous (n, d) of one dtype, n >= 0; weight/bias (d,) or None; mean/rstd (n,) float64."""
    n, d = x2.shape
    if n > 0:
        stream = _tuning.stream_for(y2)
        rowbuf = workspace("add_norm_row", _kernel.rowbuf_size(n, d), x2.dtype) \
            if stream else None
        _kernel.forward(y2, s2, mean, rstd, x2, r2, weight, bias, eps, stream, rowbuf)
    return y2, s2


def run_add_norm_backward(dy2, s2, weight, mean, rstd, ds2, dsum2, dweight, dbias):
    """``dsum2 = dnorm(dy2) + ds2`` and the parameter gradients (any output None: not computed;
    ds2 None: no addend; mean None: RMSNorm).  Trusts its arguments (shapes as in
    :func:`run_add_norm_forward`; dweight needs weight)."""
    n, d = s2.shape
    if n == 0:
        for g in (dweight, dbias):
            if g is not None:
                g.fill(0)
        return dsum2, dweight, dbias
    if dsum2 is None and dweight is None and dbias is None:
        return dsum2, dweight, dbias
    work = _kernel.scratch_size(n, d, dweight is not None, dbias is not None)
    _kernel.backward(dsum2, dweight, dbias, dy2, s2, weight, mean, rstd, ds2,
                     workspace("add_norm_backward", work) if work else None,
                     _tuning.stream_for(dy2) if dsum2 is not None else 0)
    return dsum2, dweight, dbias


def _forward(x, residual, normalized_shape, weight, bias, eps, out, rms):
    x, residual, nshape, weight, bias, eps, y, s = check_add_norm(
        x, residual, normalized_shape, weight, bias, eps, out=out, rms=rms)
    lead = x.shape[:x.ndim - len(nshape)]
    mean = None if rms else np.empty(lead, dtype=np.float64)
    rstd = np.empty(lead, dtype=np.float64)
    if len(lead) == 1 and len(nshape) == 1:     # already (n, d) and (d,): no views to make
        run_add_norm_forward(x, residual, weight, bias, eps, y, s, mean, rstd)
    else:
        n, d = math.prod(lead), math.prod(nshape)
        run_add_norm_forward(x.reshape(n, d), residual.reshape(n, d),
                             None if weight is None else weight.reshape(d),
                             None if bias is None else bias.reshape(d), eps,
                             y.reshape(n, d), s.reshape(n, d),
                             None if mean is None else mean.reshape(n), rstd.reshape(n))
    if rms:
        ctx = AddRMSNormContext._build({"s": s, "weight": weight, "normalized_shape": nshape,
                                        "eps": eps, "rstd": rstd})
    else:
        ctx = AddLayerNormContext._build({"s": s, "weight": weight, "bias": bias,
                                          "normalized_shape": nshape, "eps": eps,
                                          "mean": mean, "rstd": rstd})
    return y, s, ctx


def _backward(dy, ctx, ds, out, needs, cls, op, names):
    ctx = _checks.context(ctx, cls, op)
    ctx.validate()
    params = (ctx.weight, getattr(ctx, "bias", None))[:len(names) - 1]   # add_rms: no bias
    wants = _checks.needs(needs, names, (True,) + tuple(p is not None for p in params))
    dtype = ctx.dtype
    dy = _checks.grad_output(dy, ctx.shape, dtype)
    if ds is not None:
        ds = np.ascontiguousarray(_checks.grad_output(ds, ctx.shape, dtype, name="ds"))
    dsum = None
    if wants[0]:
        dsum = _checks.new_or_out(out, "out", ctx.shape, dtype,
                                  inputs=(dy, ds, ctx.s, ctx.rstd, getattr(ctx, "mean", None))
                                  + params)
    elif out is not None:
        raise ValueError("out is given but dsum is not needed (needs[0] is False)")
    grads = [np.empty(ctx.normalized_shape, dtype=dtype) if want else None for want in wants[1:]]
    n, d = ctx.rstd.size, math.prod(ctx.normalized_shape)
    mean = getattr(ctx, "mean", None)
    run_add_norm_backward(np.ascontiguousarray(dy).reshape(n, d), ctx.s.reshape(n, d),
                          None if ctx.weight is None else ctx.weight.reshape(d),
                          None if mean is None else mean.reshape(n), ctx.rstd.reshape(n),
                          None if ds is None else ds.reshape(n, d),
                          None if dsum is None else dsum.reshape(n, d),
                          *[None if g is None else g.reshape(d) for g in grads] +
                          [None] * (2 - len(grads)))
    return (dsum, *grads)


# ---------------------------------------------------------------- public API: LayerNorm
def add_layer_norm_forward(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *,
                           out=None):
    """``s = x + residual``, ``y = layer_norm(s)``, keeping what backward needs.

    Parameters
    ----------
    x, residual : ndarray of shape (..., *normalized_shape), one dtype (float32 or float64)
        Any layout (a non-contiguous one is copied once).
    normalized_shape : int or tuple of int
    weight, bias : ndarray of shape normalized_shape, same dtype, or None
    eps : float, >= 0 and finite
    out : None or a pair ``(y_out, s_out)`` of arrays of x's shape and dtype (C-contiguous,
        writeable, not overlapping an input or each other)

    Returns
    -------
    y : ndarray, ``(s - mean) * rstd * weight + bias``
    s : ndarray, ``x + residual`` rounded once in the input dtype (exactly numpy's ``x + r``)
    ctx : AddLayerNormContext (keeps s; ``ctx.mean``, ``ctx.rstd`` float64)

    Raises
    ------
    TypeError
        Non-float or mixed dtypes, ``out`` not a pair.
    ValueError
        residual of another shape, normalized_shape not matching, wrong weight/bias shape, eps
        negative or not finite, a bad ``out`` array.
    """
    return _forward(x, residual, normalized_shape, weight, bias, eps, out, rms=False)


def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """``(y, s)`` with ``s = x + residual``, ``y = layer_norm(s)`` (see
    :func:`add_layer_norm_forward`)."""
    return _forward(x, residual, normalized_shape, weight, bias, eps, out, rms=False)[:2]


def add_layer_norm_backward(dy, ctx, ds=None, *, out=None, needs=None):
    """Gradients of :func:`add_layer_norm_forward`.

    Parameters
    ----------
    dy : ndarray, the gradient reaching y (forward output's shape and dtype)
    ctx : AddLayerNormContext
    ds : ndarray like dy, or None — the gradient reaching s from downstream (pre-LN)
    out : optional preallocated ``dsum``
    needs : None or (bool, bool, bool) for ``(dsum, dweight, dbias)``; False -> None, skipped

    Returns
    -------
    dsum : ndarray like s — ``layer_norm_backward(dy)[0] + ds``, the gradient of both x and
        residual
    dweight, dbias : ndarray of shape normalized_shape, or None (absent parameter, not needed)
    """
    return _backward(dy, ctx, ds, out, needs, AddLayerNormContext, "add_layer_norm",
                     ("dsum", "dweight", "dbias"))


# ---------------------------------------------------------------- public API: RMSNorm
def add_rms_norm_forward(x, residual, normalized_shape, weight=None, eps=None, *, out=None):
    """``s = x + residual``, ``y = rms_norm(s)``, keeping what backward needs.

    As :func:`add_layer_norm_forward`, without bias; ``y = s * rstd * weight`` with
    ``rstd = 1 / sqrt(mean(s**2) + eps)``; ``eps=None`` means ``np.finfo(x.dtype).eps``.
    Returns ``(y, s, ctx)`` with ctx an :class:`AddRMSNormContext`.
    """
    return _forward(x, residual, normalized_shape, weight, None, eps, out, rms=True)


def add_rms_norm(x, residual, normalized_shape, weight=None, eps=None, *, out=None):
    """``(y, s)`` with ``s = x + residual``, ``y = rms_norm(s)`` (see
    :func:`add_rms_norm_forward`)."""
    return _forward(x, residual, normalized_shape, weight, None, eps, out, rms=True)[:2]


def add_rms_norm_backward(dy, ctx, ds=None, *, out=None, needs=None):
    """Gradients of :func:`add_rms_norm_forward`: ``(dsum, dweight)``, ``dsum =
    rms_norm_backward(dy)[0] + ds``; ``needs`` is None or (bool, bool).  See
    :func:`add_layer_norm_backward`."""
    return _backward(dy, ctx, ds, out, needs, AddRMSNormContext, "add_rms_norm",
                     ("dsum", "dweight"))
