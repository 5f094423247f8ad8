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

__all__ = ["layer_norm", "layer_norm_forward", "layer_norm_backward",
           "batch_norm", "batch_norm_forward", "batch_norm_backward"]
__all__ += ["ffn", "ffn_forward", "ffn_backward"]


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


# ---------------------------------------------------------------- LayerNorm
def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """Returns ``(y, ctx)``; ``ctx`` has ``mean`` and ``rstd`` of shape x.shape[:-k]."""
    x = _f64(x)
    k = 1 if np.ndim(normalized_shape) == 0 else len(normalized_shape)
    axes = tuple(range(x.ndim - k, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    mean = mean + (x - mean).mean(axis=axes, keepdims=True)         # corrected two-pass mean
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


# ---------------------------------------------------------------- FFN
def _ffn_act(activation, v):
    """``(act(v), act'(v))``; relu's derivative is ``None`` (its backward uses the mask a > 0)."""
    from scipy.special import erfc
    if activation == "relu":
        return np.maximum(v, 0.0), None                               # NaN stays NaN
    if activation == "gelu":                                          # v * Phi(v), exact
        cdf = 0.5 * erfc(-v / np.sqrt(2.0))
        pdf = np.exp(-0.5 * v * v) / np.sqrt(2.0 * np.pi)
        return v * cdf, cdf + v * pdf
    if activation == "gelu_tanh":                                     # tanh approximation
        c = np.sqrt(2.0 / np.pi)
        u = c * (v + 0.044715 * v ** 3)
        t = np.tanh(u)
        return 0.5 * v * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * c * (
            1.0 + 3 * 0.044715 * v * v)
    if activation == "silu":                                          # v * sigmoid(v)
        s = 1.0 / (1.0 + np.exp(-v))
        return v * s, s * (1.0 + v * (1.0 - s))
    raise ValueError(activation)


def ffn_forward(x, w1, b1, w2, b2, activation="relu", recompute=False):
    """Returns ``(y, ctx)``, ``y = act(x @ w1 + b1) @ w2 + b2``; ``ctx`` has ``v`` (the
    pre-activation), ``a`` (the activation), both (n, h), and ``dead_units`` (relu: units whose
    output is 0 on every row; None otherwise).  ``recompute`` changes nothing here."""
    x = _f64(x)
    x2 = x.reshape(-1, x.shape[-1])
    v = x2 @ _f64(w1)
    if b1 is not None:
        v = v + _f64(b1)
    a, _ = _ffn_act(activation, v)
    y = a @ _f64(w2)
    if b2 is not None:
        y = y + _f64(b2)
    dead = np.all(a == 0, axis=0) if activation == "relu" else None
    ctx = SimpleNamespace(x=x2, shape=x.shape, w1=_f64(w1), b1=_f64(b1), w2=_f64(w2),
                          b2=_f64(b2), activation=activation, v=v, a=a, dead_units=dead)
    return y.reshape(x.shape), ctx


def ffn(x, w1, b1, w2, b2, activation="relu", *, out=None):
    return ffn_forward(x, w1, b1, w2, b2, activation)[0]


def ffn_backward(dy, ctx):
    """Returns ``(dx, dw1, db1, dw2, db2)`` (db1/db2 None where b1/b2 were None).

    ``dA = dy @ w2^T``; ``dH = dA * act'(v)`` (relu: dA where not a <= 0, as PyTorch's
    threshold_backward, so a NaN activation passes its gradient); ``dx = dH @ w1^T``,
    ``dw1 = x^T @ dH``, ``db1 = sum dH``, ``dw2 = a^T @ dy``, ``db2 = sum dy`` over rows."""
    dy = _f64(dy).reshape(-1, ctx.w1.shape[0])
    dA = dy @ ctx.w2.T
    _, deriv = _ffn_act(ctx.activation, ctx.v)
    dH = np.where(ctx.a <= 0, 0.0, dA) if ctx.activation == "relu" else dA * deriv
    dx = (dH @ ctx.w1.T).reshape(ctx.shape)
    dw1 = ctx.x.T @ dH
    dw2 = ctx.a.T @ dy
    db1 = dH.sum(axis=0) if ctx.b1 is not None else None
    db2 = dy.sum(axis=0) if ctx.b2 is not None else None
    return dx, dw1, db1, dw2, db2


# ---------------------------------------------------------------- BatchNorm
def batch_norm_forward(x, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5, *, out=None):
    """Returns ``(y, ctx)``; ``ctx`` has ``mean`` and ``rstd`` of shape (C,) (batch stats in
    training, running stats in eval).  In training, given running stats are updated in place
    (``(1 - momentum) * old + momentum * new``, unbiased variance), as PyTorch does."""
    x = _f64(x)
    C = x.shape[1]
    axes = (0,) + tuple(range(2, x.ndim))                 # every axis but the channels
    shape = (1, C) + (1,) * (x.ndim - 2)                  # (C,) broadcast against x
    if training:
        count = x.size // C
        mean = x.mean(axis=axes)
        mean = mean + (x - mean.reshape(shape)).mean(axis=axes)          # corrected two-pass mean
        var = ((x - mean.reshape(shape)) ** 2).mean(axis=axes)          # biased, two-pass
        if running_mean is not None:
            unbiased = var * count / (count - 1)
            running_mean[...] = (1 - momentum) * _f64(running_mean) + momentum * mean
            running_var[...] = (1 - momentum) * _f64(running_var) + momentum * unbiased
    else:
        mean = _f64(running_mean).copy()
        var = _f64(running_var).copy()
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(shape)) * rstd.reshape(shape)
    y = xhat
    if weight is not None:
        y = y * _f64(weight).reshape(shape)
    if bias is not None:
        y = y + _f64(bias).reshape(shape)
    ctx = SimpleNamespace(x=x, weight=_f64(weight), bias=_f64(bias), axes=axes, shape=shape,
                          training=bool(training), eps=eps, mean=mean, rstd=rstd)
    return y, ctx


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, out=None):
    return batch_norm_forward(x, running_mean, running_var, weight, bias, training, momentum,
                              eps)[0]


def batch_norm_backward(dy, ctx, *, out=None):
    """Returns ``(dx, dweight, dbias)`` (None where weight/bias were None)."""
    dy = _f64(dy)
    axes, shape = ctx.axes, ctx.shape
    mean, rstd = ctx.mean.reshape(shape), ctx.rstd.reshape(shape)
    xhat = (ctx.x - mean) * rstd
    g = dy * ctx.weight.reshape(shape) if ctx.weight is not None else dy
    if ctx.training:            # mean and rstd depend on x
        c1 = (g * xhat).mean(axis=axes, keepdims=True)
        c2 = g.mean(axis=axes, keepdims=True)
        dx = rstd * (g - xhat * c1 - c2)
    else:                       # running stats are constants
        dx = rstd * g
    dweight = (dy * xhat).sum(axis=axes) if ctx.weight is not None else None
    dbias = dy.sum(axis=axes) if ctx.bias is not None else None
    return dx, dweight, dbias
