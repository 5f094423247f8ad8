"""Plain float64 NumPy references for RMSNorm and the residual add + norm ops.

Same rules as :mod:`normffn.reference` (into which these merge): the public API name for name
and signature for signature, everything computed in float64, float64 results, no validation.
``s = x + residual`` is formed in the input dtype (as the op does, exactly one rounding), then
normalised in float64.  ``needs`` is honoured (False entries come back as None).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

__all__ = ["rms_norm", "rms_norm_forward", "rms_norm_backward",
           "add_layer_norm", "add_layer_norm_forward", "add_layer_norm_backward",
           "add_rms_norm", "add_rms_norm_forward", "add_rms_norm_backward"]


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _axes(x, normalized_shape):
    k = 1 if np.ndim(normalized_shape) == 0 else len(normalized_shape)
    return tuple(range(x.ndim - k, x.ndim))


def _needs(needs, n):
    return (True,) * n if needs is None else tuple(bool(v) for v in needs)


def _mask(grads, needs):
    return tuple(g if want else None for g, want in zip(grads, _needs(needs, len(grads))))


# ---------------------------------------------------------------- RMSNorm
def rms_norm_forward(x, normalized_shape, weight=None, eps=None, *, out=None):
    """Returns ``(y, ctx)``; ``y = x * rstd * weight``, ``rstd = 1/sqrt(mean(x^2) + eps)``
    over the trailing dims; ``eps=None`` means ``np.finfo(x.dtype).eps``.  ``ctx.rstd`` has
    shape x.shape[:-k]."""
    if eps is None:
        eps = float(np.finfo(np.asarray(x).dtype).eps)
    x = _f64(x)
    axes = _axes(x, normalized_shape)
    rstd = 1.0 / np.sqrt((x * x).mean(axis=axes, keepdims=True) + eps)
    y = x * rstd
    if weight is not None:
        y = y * _f64(weight)
    ctx = SimpleNamespace(x=x, weight=_f64(weight), axes=axes, eps=eps,
                          rstd=rstd.reshape(x.shape[:x.ndim - len(axes)]))
    return y, ctx


def rms_norm(x, normalized_shape, weight=None, eps=None, *, out=None):
    return rms_norm_forward(x, normalized_shape, weight, eps)[0]


def _rms_backward(dy, ctx):
    dy = _f64(dy)
    axes = ctx.axes
    lead_axes = tuple(range(ctx.x.ndim - len(axes)))
    rstd = np.expand_dims(ctx.rstd, axes)
    xhat = ctx.x * rstd
    g = dy * ctx.weight if ctx.weight is not None else dy
    c1 = (g * xhat).mean(axis=axes, keepdims=True)
    dx = rstd * (g - xhat * c1)
    dweight = (dy * xhat).sum(axis=lead_axes) if ctx.weight is not None else None
    return dx, dweight


def rms_norm_backward(dy, ctx, *, out=None, needs=None):
    """Returns ``(dx, dweight)`` (dweight None without weight): ``g = dy * weight``,
    ``c1 = mean(g * xhat)``, ``dx = rstd * (g - xhat * c1)``, ``dweight = sum dy * xhat``."""
    return _mask(_rms_backward(dy, ctx), needs)


# ---------------------------------------------------------------- residual add + norm
def _add(x, residual):
    """``x + residual`` in the input dtype (one rounding, as the op), as float64."""
    x, residual = np.asarray(x), np.asarray(residual)
    return _f64(x + residual), x.dtype


def add_layer_norm_forward(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *,
                           out=None):
    """Returns ``(y, s, ctx)``: ``s = x + residual``, ``y = layer_norm(s)``; ``ctx`` is
    :func:`normffn.reference.layer_norm_forward`'s, computed from s."""
    from .reference import layer_norm_forward
    s, _ = _add(x, residual)
    y, ctx = layer_norm_forward(s, normalized_shape, weight, bias, eps)
    return y, s, ctx


def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    return add_layer_norm_forward(x, residual, normalized_shape, weight, bias, eps)[:2]


def add_layer_norm_backward(dy, ctx, ds=None, *, out=None, needs=None):
    """Returns ``(dsum, dweight, dbias)``: ``dsum = layer_norm_backward(dy)[0] + ds``, the
    gradient of both x and residual."""
    from .reference import layer_norm_backward
    dx, dw, db = layer_norm_backward(dy, ctx)
    if ds is not None:
        dx = dx + _f64(ds)
    return _mask((dx, dw, db), needs)


def add_rms_norm_forward(x, residual, normalized_shape, weight=None, eps=None, *, out=None):
    """Returns ``(y, s, ctx)``: ``s = x + residual``, ``y = rms_norm(s)`` (``eps=None``:
    ``np.finfo(x.dtype).eps``)."""
    s, dtype = _add(x, residual)
    if eps is None:
        eps = float(np.finfo(dtype).eps)
    y, ctx = rms_norm_forward(s, normalized_shape, weight, eps)
    return y, s, ctx


def add_rms_norm(x, residual, normalized_shape, weight=None, eps=None, *, out=None):
    return add_rms_norm_forward(x, residual, normalized_shape, weight, eps)[:2]


def add_rms_norm_backward(dy, ctx, ds=None, *, out=None, needs=None):
    """Returns ``(dsum, dweight)``: ``dsum = rms_norm_backward(dy)[0] + ds``."""
    dx, dw = _rms_backward(dy, ctx)
    if ds is not None:
        dx = dx + _f64(ds)
    return _mask((dx, dw), needs)
