"""Plain float64 NumPy references for every op, forward and backward.

Public: the test suite and users' comparison scripts check normffn (and other libraries)
against these.  They mirror the public API name for name and signature for signature, compute
everything in float64 whatever the input dtype, and return float64 arrays.  Clarity over speed:
no tricks, the textbook formulas with the literature's names.  They validate nothing; give them
what you would give the real op.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

__all__ = ["layer_norm", "layer_norm_forward", "layer_norm_backward"]


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


# ---------------------------------------------------------------- LayerNorm
def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """Returns ``(y, ctx)``; ``ctx`` has ``mean`` and ``rstd`` of shape x.shape[:-k]."""
    x = _f64(x)
    k = 1 if np.ndim(normalized_shape) == 0 else len(normalized_shape)
    axes = tuple(range(x.ndim - k, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)          # biased, two-pass
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * rstd
    y = xhat
    if weight is not None:
        y = y * _f64(weight)
    if bias is not None:
        y = y + _f64(bias)
    ctx = SimpleNamespace(x=x, weight=_f64(weight), bias=_f64(bias), axes=axes, eps=eps,
                          mean=mean.reshape(x.shape[:x.ndim - k]),
                          rstd=rstd.reshape(x.shape[:x.ndim - k]))
    return y, ctx


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    return layer_norm_forward(x, normalized_shape, weight, bias, eps)[0]


def layer_norm_backward(dy, ctx, *, out=None):
    """Returns ``(dx, dweight, dbias)`` (None where weight/bias were None)."""
    dy = _f64(dy)
    axes = ctx.axes
    lead_axes = tuple(range(ctx.x.ndim - len(axes)))
    mean = np.expand_dims(ctx.mean, axes)
    rstd = np.expand_dims(ctx.rstd, axes)
    xhat = (ctx.x - mean) * rstd
    g = dy * ctx.weight if ctx.weight is not None else dy
    c1 = (g * xhat).mean(axis=axes, keepdims=True)
    c2 = g.mean(axis=axes, keepdims=True)
    dx = rstd * (g - xhat * c1 - c2)
    dweight = (dy * xhat).sum(axis=lead_axes) if ctx.weight is not None else None
    dbias = dy.sum(axis=lead_axes) if ctx.bias is not None else None
    return dx, dweight, dbias
