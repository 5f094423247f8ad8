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
from .rms_norm import lead_shape, param_shape

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
    s : ndarray
        C-contiguous, the forward's ``x + residual`` (the array returned as ``s``).
    mean, rstd : ndarray of shape ``s.shape[:s.ndim - len(normalized_shape)]``, float64
        Statistics of s, as :class:`normffn.LayerNormContext`'s.
    weight, bias : ndarray of shape normalized_shape, or None
        As given to the forward.
    normalized_shape : tuple of int
        The normalised trailing dims.
    eps : float
        As given to the forward.

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> x, r = np.ones((2, 4)), np.arange(8.0).reshape(2, 4)
    >>> y, s, ctx = normffn.add_layer_norm_forward(x, r, 4)
    >>> ctx.s is s, ctx.mean.tolist()
    (True, [2.5, 6.5])
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

    def _valid_fast(self) -> int:
        """The common case of :meth:`validate` (see ``Context._valid_fast``)."""
        return _checks.fast_row_context(self.s, self.normalized_shape, self.rstd, (self.mean,),
                                (self.weight, self.bias))


@dataclass(frozen=True, eq=False)
class AddRMSNormContext(_AddNormContext):
    """What :func:`add_rms_norm_backward` needs; returned by :func:`add_rms_norm_forward`.

    Attributes
    ----------
    s : ndarray
        C-contiguous, the forward's ``x + residual`` (the array returned as ``s``).
    rstd : ndarray of shape ``s.shape[:s.ndim - len(normalized_shape)]``, float64
        ``1 / sqrt(mean(s**2) + eps)`` per row.
    weight : ndarray of shape normalized_shape, or None
        As given to the forward.
    normalized_shape : tuple of int
        The normalised trailing dims.
    eps : float
        As used by the forward (``None`` resolved to the dtype's machine epsilon).

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> y, s, ctx = normffn.add_rms_norm_forward(np.ones((1, 4)), np.ones((1, 4)), 4, eps=0.0)
    >>> ctx.rstd.tolist()
    [0.5]
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

    def _valid_fast(self) -> int:
        """The common case of :meth:`validate` (see ``Context._valid_fast``)."""
        return _checks.fast_row_context(self.s, self.normalized_shape, self.rstd, (),
                                        (self.weight,))


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

    One pass over memory per row: the kernel writes ``s`` while it takes the row's first sum and
    normalises the row from cache.

    Parameters
    ----------
    x, residual : ndarray of shape ``(..., *normalized_shape)``
        One dtype (float32 or float64).  Any layout (a non-contiguous one is copied once).
    normalized_shape : int or tuple of int
        The trailing dims to normalise over.
    weight, bias : ndarray of shape normalized_shape, same dtype, or None
        The affine parameters.
    eps : float, >= 0 and finite
        Added to the variance.
    out : None or a pair ``(y_out, s_out)``
        Arrays of x's shape and dtype (C-contiguous, writeable, not overlapping an input or each
        other).

    Returns
    -------
    y : ndarray
        ``(s - mean) * rstd * weight + bias``.
    s : ndarray
        ``x + residual`` rounded once in the input dtype (exactly numpy's ``x + residual``).
    ctx : AddLayerNormContext
        Keeps s; ``ctx.mean``, ``ctx.rstd`` float64.

    Raises
    ------
    TypeError
        Non-float or mixed dtypes, ``out`` not a pair.
    ValueError
        residual of another shape, normalized_shape not matching, wrong weight/bias shape, eps
        negative or not finite, a bad ``out`` array.

    See Also
    --------
    add_layer_norm, add_layer_norm_backward, normffn.reference.add_layer_norm_forward

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((4, 8)).astype(np.float32)
    >>> r = rng.standard_normal((4, 8)).astype(np.float32)
    >>> y, s, ctx = normffn.add_layer_norm_forward(x, r, 8)
    >>> bool(np.array_equal(s, x + r))
    True
    >>> bool(np.allclose(y, normffn.layer_norm(s, 8), atol=1e-6))
    True
    """
    return _forward(x, residual, normalized_shape, weight, bias, eps, out, rms=False)


def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """Residual add + LayerNorm: ``(y, s)`` with ``s = x + residual`` and ``y = layer_norm(s)``.

    The pre-LN transformer's ``s`` is the residual stream it carries on; both are returned.
    Keeps nothing for backward (see :func:`add_layer_norm_forward`).

    Parameters
    ----------
    x, residual : ndarray of shape ``(..., *normalized_shape)``
        One dtype (float32 or float64), any layout.
    normalized_shape : int or tuple of int
        The trailing dims to normalise over.
    weight, bias : ndarray of shape normalized_shape, same dtype, or None
        The affine parameters.
    eps : float, >= 0 and finite
        Added to the variance.
    out : None or a pair ``(y_out, s_out)``
        Preallocated outputs (x's shape and dtype, C-contiguous, writeable, not overlapping an
        input or each other).

    Returns
    -------
    y : ndarray
        ``layer_norm(s)``.
    s : ndarray
        ``x + residual``, rounded once in the input dtype.

    Raises
    ------
    TypeError
        Non-float or mixed dtypes, ``out`` not a pair.
    ValueError
        As :func:`add_layer_norm_forward`.

    See Also
    --------
    add_layer_norm_forward, add_rms_norm

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> x = np.arange(6, dtype=np.float32).reshape(2, 3)
    >>> y, s = normffn.add_layer_norm(x, np.ones_like(x), 3)
    >>> s.tolist()
    [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    >>> y.astype(float).round(4).tolist()
    [[-1.2247, 0.0, 1.2247], [-1.2247, 0.0, 1.2247]]
    """
    return _forward(x, residual, normalized_shape, weight, bias, eps, out, rms=False)[:2]


def add_layer_norm_backward(dy, ctx, ds=None, *, out=None, needs=None):
    """Gradients of :func:`add_layer_norm_forward`.

    Parameters
    ----------
    dy : ndarray
        The gradient reaching y (forward output's shape and dtype).
    ctx : AddLayerNormContext
        From :func:`add_layer_norm_forward`.
    ds : ndarray like dy, or None
        The gradient reaching s from downstream (pre-LN: the residual stream).  None for
        post-LN.
    out : ndarray, optional
        Preallocated ``dsum``.
    needs : None or (bool, bool, bool)
        Which of ``(dsum, dweight, dbias)`` to compute; False entries are returned as None and
        their work is skipped.

    Returns
    -------
    dsum : ndarray like s
        ``layer_norm_backward(dy)[0] + ds``: the gradient of both x and residual.
    dweight, dbias : ndarray of shape normalized_shape, or None
        None for an absent parameter or one not needed.

    Raises
    ------
    TypeError
        ``ctx`` is not an AddLayerNormContext, dy or ds of another dtype, ``needs`` malformed.
    ValueError
        dy or ds of the wrong shape, a bad ``out``, an inconsistent context.

    See Also
    --------
    add_layer_norm_forward, normffn.reference.add_layer_norm_backward

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> rng = np.random.default_rng(0)
    >>> x, r, w = rng.standard_normal((3, 5)), rng.standard_normal((3, 5)), rng.standard_normal(5)
    >>> y, s, ctx = normffn.add_layer_norm_forward(x, r, 5, w)
    >>> dy, ds = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    >>> dsum, dw, db = normffn.add_layer_norm_backward(dy, ctx, ds)
    >>> db is None                                        # no bias was given
    True
    >>> _, lctx = normffn.layer_norm_forward(s, 5, w)
    >>> bool(np.allclose(dsum, normffn.layer_norm_backward(dy, lctx)[0] + ds))
    True
    """
    return _backward(dy, ctx, ds, out, needs, AddLayerNormContext, "add_layer_norm",
                     ("dsum", "dweight", "dbias"))


# ---------------------------------------------------------------- public API: RMSNorm
def add_rms_norm_forward(x, residual, normalized_shape, weight=None, eps=None, *, out=None):
    """``s = x + residual``, ``y = rms_norm(s)``, keeping what backward needs.

    As :func:`add_layer_norm_forward`, without bias: ``y = s * rstd * weight`` with
    ``rstd = 1 / sqrt(mean(s**2) + eps)``.

    Parameters
    ----------
    x, residual : ndarray of shape ``(..., *normalized_shape)``
        One dtype (float32 or float64), any layout.
    normalized_shape : int or tuple of int
        The trailing dims to normalise over.
    weight : ndarray of shape normalized_shape, same dtype, or None
        The scale.
    eps : float >= 0 and finite, or None
        None means ``np.finfo(x.dtype).eps``.
    out : None or a pair ``(y_out, s_out)``
        Preallocated outputs, as in :func:`add_layer_norm_forward`.

    Returns
    -------
    y : ndarray
        ``rms_norm(s)``.
    s : ndarray
        ``x + residual``, rounded once in the input dtype.
    ctx : AddRMSNormContext
        Keeps s; ``ctx.rstd`` float64.

    Raises
    ------
    TypeError
        Non-float or mixed dtypes, ``out`` not a pair.
    ValueError
        As :func:`add_layer_norm_forward`.

    See Also
    --------
    add_rms_norm, add_rms_norm_backward, normffn.reference.add_rms_norm_forward

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> x = np.array([[1.0, 2.0]]); r = np.array([[2.0, 2.0]])
    >>> y, s, ctx = normffn.add_rms_norm_forward(x, r, 2, eps=0.0)
    >>> s.tolist(), np.round(y, 4).tolist()             # s = [3, 4], rms = sqrt(12.5)
    ([[3.0, 4.0]], [[0.8485, 1.1314]])
    """
    return _forward(x, residual, normalized_shape, weight, None, eps, out, rms=True)


def add_rms_norm(x, residual, normalized_shape, weight=None, eps=None, *, out=None):
    """Residual add + RMSNorm: ``(y, s)`` with ``s = x + residual`` and ``y = rms_norm(s)``.

    Keeps nothing for backward (see :func:`add_rms_norm_forward`).

    Parameters
    ----------
    x, residual : ndarray of shape ``(..., *normalized_shape)``
        One dtype (float32 or float64), any layout.
    normalized_shape : int or tuple of int
        The trailing dims to normalise over.
    weight : ndarray of shape normalized_shape, same dtype, or None
        The scale.
    eps : float >= 0 and finite, or None
        None means ``np.finfo(x.dtype).eps``.
    out : None or a pair ``(y_out, s_out)``
        Preallocated outputs, as in :func:`add_layer_norm_forward`.

    Returns
    -------
    y : ndarray
        ``rms_norm(s)``.
    s : ndarray
        ``x + residual``, rounded once in the input dtype.

    Raises
    ------
    TypeError
        Non-float or mixed dtypes, ``out`` not a pair.
    ValueError
        As :func:`add_layer_norm_forward`.

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> rng = np.random.default_rng(0)
    >>> x, r = rng.standard_normal((2, 8)), rng.standard_normal((2, 8))
    >>> y, s = normffn.add_rms_norm(x, r, 8)
    >>> bool(np.allclose(y, normffn.rms_norm(x + r, 8)))
    True
    """
    return _forward(x, residual, normalized_shape, weight, None, eps, out, rms=True)[:2]


def add_rms_norm_backward(dy, ctx, ds=None, *, out=None, needs=None):
    """Gradients of :func:`add_rms_norm_forward`.

    Parameters
    ----------
    dy : ndarray
        The gradient reaching y (forward output's shape and dtype).
    ctx : AddRMSNormContext
        From :func:`add_rms_norm_forward`.
    ds : ndarray like dy, or None
        The gradient reaching s from downstream (pre-LN), or None.
    out : ndarray, optional
        Preallocated ``dsum``.
    needs : None or (bool, bool)
        Which of ``(dsum, dweight)`` to compute; False entries are returned as None.

    Returns
    -------
    dsum : ndarray like s
        ``rms_norm_backward(dy)[0] + ds``: the gradient of both x and residual.
    dweight : ndarray of shape normalized_shape, or None
        None without weight or when not needed.

    Raises
    ------
    TypeError
        ``ctx`` is not an AddRMSNormContext, dy or ds of another dtype, ``needs`` malformed.
    ValueError
        dy or ds of the wrong shape, a bad ``out``, an inconsistent context.

    See Also
    --------
    add_layer_norm_backward, normffn.reference.add_rms_norm_backward

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> rng = np.random.default_rng(0)
    >>> x, r, w = rng.standard_normal((3, 4)), rng.standard_normal((3, 4)), np.ones(4)
    >>> y, s, ctx = normffn.add_rms_norm_forward(x, r, 4, w)
    >>> dy = rng.standard_normal((3, 4))
    >>> dsum, dw = normffn.add_rms_norm_backward(dy, ctx)            # post-LN: ds=None
    >>> _, rctx = normffn.rms_norm_forward(s, 4, w)
    >>> bool(np.allclose(dsum, normffn.rms_norm_backward(dy, rctx)[0]))
    True
    """
    return _backward(dy, ctx, ds, out, needs, AddRMSNormContext, "add_rms_norm",
                     ("dsum", "dweight"))
