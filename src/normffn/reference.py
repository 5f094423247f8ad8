"""Plain float64 NumPy references for every op, forward and backward.

Public: the test suite and users' comparison scripts check normffn (and other libraries)
against these.  They mirror the public API name for name and signature for signature, compute
everything in float64 whatever the input dtype, and return float64 arrays.  Clarity over speed:
no tricks, the textbook formulas with the literature's names.  They validate nothing; give them
what you would give the real op.

Every ``*_backward`` honours ``needs=`` (a tuple of bools aligned with the returned gradients;
False entries come back as None) and accepts ``out=`` (ignored: references allocate).  Fused
ops form ``s = x + residual`` in the input dtype (one rounding, as the op does), then normalise
``s`` in float64.

Gated FFNs (``activation="swiglu" | "geglu" | "reglu"``) take a packed first layer: ``w1`` is
``(d, 2h)``, its first h columns the gate and the last h the linear ("up") half; ``b1`` is
``(2h,)`` or None; ``w2`` is ``(h, d)``::

    g = x @ w1[:, :h] + b1[:h],  u = x @ w1[:, h:] + b1[h:]
    a = act(g) * u,              y = a @ w2 + b2

with act = silu (swiglu), gelu (erf; geglu) or relu (reglu).

The FFN sublayer (``ffn_block``) is the composition of the references above, nothing more::

    pre-LN:   xn = norm(x),          y = x + ffn(xn)
    post-LN:  s  = x + ffn(x),       y = norm(s)

with norm = ``layer_norm`` (``norm="layer"``) or ``rms_norm`` (``norm="rms"``, no bias) over
the last dim, and its backward chains the references' backwards.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

__all__ = ["layer_norm", "layer_norm_forward", "layer_norm_backward",
           "batch_norm", "batch_norm_forward", "batch_norm_backward",
           "ffn", "ffn_forward", "ffn_backward", "pack_gated",
           "rms_norm", "rms_norm_forward", "rms_norm_backward",
           "add_layer_norm", "add_layer_norm_forward", "add_layer_norm_backward",
           "add_rms_norm", "add_rms_norm_forward", "add_rms_norm_backward",
           "ffn_block", "ffn_block_forward", "ffn_block_backward"]

#: gated activation -> the activation of its gate
GATES = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _axes(x, normalized_shape):
    """The trailing axes ``normalized_shape`` covers."""
    k = 1 if np.ndim(normalized_shape) == 0 else len(normalized_shape)
    return tuple(range(x.ndim - k, x.ndim))


def _mask(grads, needs):
    """``grads`` with the entries ``needs`` marks False replaced by None."""
    if needs is None:
        return tuple(grads)
    return tuple(g if want else None for g, want in zip(grads, needs))


# ---------------------------------------------------------------- LayerNorm
def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """Returns ``(y, ctx)``; ``ctx`` has ``mean`` and ``rstd`` of shape x.shape[:-k]."""
    x = _f64(x)
    axes = _axes(x, normalized_shape)
    k = len(axes)
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


def layer_norm_backward(dy, ctx, *, out=None, needs=None):
    """Returns ``(dx, dweight, dbias)`` (None where weight/bias were None or not needed):
    ``g = dy * weight``, ``c1 = mean(g * xhat)``, ``c2 = mean(g)``,
    ``dx = rstd * (g - xhat * c1 - c2)``, ``dweight = sum dy * xhat``, ``dbias = sum dy``."""
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
    return _mask((dx, dweight, dbias), needs)


# ---------------------------------------------------------------- FFN (plain and gated)
def _ffn_act(activation, v):
    """``(act(v), act'(v))``; relu's derivative is ``None`` (its backward uses the mask v > 0)."""
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


def ffn_forward(x, w1, b1, w2, b2, activation="relu", recompute=False, *, out=None,
                hidden_out=None):
    """Returns ``(y, ctx)``, ``y = act(x @ w1 + b1) @ w2 + b2`` (gated: ``y = (act(g) * u)
    @ w2 + b2``, see the module docstring).

    ``ctx`` has ``v`` (the pre-activation, (n, h); gated: the packed [g | u], (n, 2h)), ``a``
    (the hidden activation, (n, h)), for gated activations ``g`` and ``u``, and ``dead_units``
    (relu: units whose output is 0 on every row; reglu: the same of the gate ``act(g)``; None
    otherwise).  ``recompute``, ``out`` and ``hidden_out`` change nothing here."""
    x = _f64(x)
    x2 = x.reshape(-1, x.shape[-1])
    v = x2 @ _f64(w1)
    if b1 is not None:
        v = v + _f64(b1)
    g = u = None
    if activation in GATES:
        h = v.shape[1] // 2
        g, u = v[:, :h], v[:, h:]
        s, _ = _ffn_act(GATES[activation], g)
        a = s * u
        dead = np.all(s == 0, axis=0) if activation == "reglu" else None
    else:
        a, _ = _ffn_act(activation, v)
        dead = np.all(a == 0, axis=0) if activation == "relu" else None
    y = a @ _f64(w2)
    if b2 is not None:
        y = y + _f64(b2)
    ctx = SimpleNamespace(x=x2, shape=x.shape, w1=_f64(w1), b1=_f64(b1), w2=_f64(w2),
                          b2=_f64(b2), activation=activation, v=v, g=g, u=u, a=a,
                          dead_units=dead)
    return y.reshape(x.shape), ctx


def ffn(x, w1, b1, w2, b2, activation="relu", *, out=None):
    return ffn_forward(x, w1, b1, w2, b2, activation)[0]


def ffn_backward(dy, ctx, *, out=None, needs=None):
    """Returns ``(dx, dw1, db1, dw2, db2)`` (db1/db2 None where b1/b2 were None; any None
    where ``needs`` says False).

    ``dA = dy @ w2^T``.  Plain: ``dH = dA * act'(v)`` (relu: dA where not a <= 0, as PyTorch's
    threshold_backward, so a NaN activation passes its gradient).  Gated: ``dg = dA * u *
    act'(g)`` (reglu: ``dA * u`` where g is not <= 0, else 0), ``du = dA * act(g)``,
    ``dH = [dg | du]``.  Then ``dx = dH @ w1^T``, ``dw1 = x^T @ dH``, ``db1 = sum dH``,
    ``dw2 = a^T @ dy``, ``db2 = sum dy`` over rows."""
    dy = _f64(dy).reshape(-1, ctx.w1.shape[0])
    dA = dy @ ctx.w2.T
    if ctx.activation in GATES:
        gate = GATES[ctx.activation]
        s, ds = _ffn_act(gate, ctx.g)
        dg = np.where(ctx.g <= 0, 0.0, dA * ctx.u) if gate == "relu" else dA * ctx.u * ds
        dH = np.concatenate([dg, dA * s], axis=1)
    else:
        _, deriv = _ffn_act(ctx.activation, ctx.v)
        dH = np.where(ctx.a <= 0, 0.0, dA) if ctx.activation == "relu" else dA * deriv
    dx = (dH @ ctx.w1.T).reshape(ctx.shape)
    dw1 = ctx.x.T @ dH
    dw2 = ctx.a.T @ dy
    db1 = dH.sum(axis=0) if ctx.b1 is not None else None
    db2 = dy.sum(axis=0) if ctx.b2 is not None else None
    return _mask((dx, dw1, db1, dw2, db2), needs)


def pack_gated(w_gate, w_up, b_gate=None, b_up=None, *, layout="math"):
    """``(w1, b1)``: ``w1 = [w_gate | w_up]`` of shape (d, 2h) (``layout="torch"``: the
    weights are (h, d), as ``nn.Linear.weight``), ``b1 = [b_gate | b_up]`` (zeros for a missing
    half; None when both are None)."""
    w_gate, w_up = _f64(w_gate), _f64(w_up)
    if layout == "torch":
        w_gate, w_up = w_gate.T, w_up.T
    h = w_gate.shape[1]
    w1 = np.concatenate([w_gate, w_up], axis=1)
    if b_gate is None and b_up is None:
        return w1, None
    zero = np.zeros(h)
    return w1, np.concatenate([zero if b_gate is None else _f64(b_gate),
                               zero if b_up is None else _f64(b_up)])


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


def rms_norm_backward(dy, ctx, *, out=None, needs=None):
    """Returns ``(dx, dweight)`` (dweight None without weight; either None where ``needs``
    says False): ``xhat = x * rstd``, ``g = dy * weight``, ``c1 = mean(g * xhat)``,
    ``dx = rstd * (g - xhat * c1)``, ``dweight = sum dy * xhat`` over rows."""
    dy = _f64(dy)
    axes = ctx.axes
    lead_axes = tuple(range(ctx.x.ndim - len(axes)))
    rstd = np.expand_dims(ctx.rstd, axes)
    xhat = ctx.x * rstd
    g = dy * ctx.weight if ctx.weight is not None else dy
    c1 = (g * xhat).mean(axis=axes, keepdims=True)
    dx = rstd * (g - xhat * c1)
    dweight = (dy * xhat).sum(axis=lead_axes) if ctx.weight is not None else None
    return _mask((dx, dweight), needs)


# ---------------------------------------------------------------- residual add + norm
def _add(x, residual):
    """``s = x + residual`` rounded once in the input dtype (as the op), as float64."""
    return _f64(np.asarray(x) + np.asarray(residual))


def add_layer_norm_forward(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *,
                           out=None):
    """Returns ``(y, s, ctx)``: ``s = x + residual``, ``y = layer_norm(s)``; ``ctx`` is
    :func:`layer_norm_forward`'s, computed from s (``ctx.mean``, ``ctx.rstd``)."""
    s = _add(x, residual)
    y, ctx = layer_norm_forward(s, normalized_shape, weight, bias, eps)
    return y, s, ctx


def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    return add_layer_norm_forward(x, residual, normalized_shape, weight, bias, eps)[:2]


def add_layer_norm_backward(dy, ctx, ds=None, *, out=None, needs=None):
    """Returns ``(dsum, dweight, dbias)``: ``dsum = layer_norm_backward(dy)[0] + ds``, the
    gradient of both x and residual (``needs`` as in :func:`layer_norm_backward`)."""
    dx, dw, db = layer_norm_backward(dy, ctx)
    if ds is not None:
        dx = dx + _f64(ds)
    return _mask((dx, dw, db), needs)


def add_rms_norm_forward(x, residual, normalized_shape, weight=None, eps=None, *, out=None):
    """Returns ``(y, s, ctx)``: ``s = x + residual``, ``y = rms_norm(s)`` (``eps=None``:
    ``np.finfo(x.dtype).eps``)."""
    if eps is None:
        eps = float(np.finfo(np.asarray(x).dtype).eps)
    s = _add(x, residual)
    y, ctx = rms_norm_forward(s, normalized_shape, weight, eps)
    return y, s, ctx


def add_rms_norm(x, residual, normalized_shape, weight=None, eps=None, *, out=None):
    return add_rms_norm_forward(x, residual, normalized_shape, weight, eps)[:2]


def add_rms_norm_backward(dy, ctx, ds=None, *, out=None, needs=None):
    """Returns ``(dsum, dweight)``: ``dsum = rms_norm_backward(dy)[0] + ds``."""
    dx, dw = rms_norm_backward(dy, ctx)
    if ds is not None:
        dx = dx + _f64(ds)
    return _mask((dx, dw), needs)


# ---------------------------------------------------------------- FFN sublayer
def _block_norm_forward(norm, x, weight, bias, eps):
    if norm == "rms":
        return rms_norm_forward(x, x.shape[-1], weight, eps)
    return layer_norm_forward(x, x.shape[-1], weight, bias, eps)


def _block_norm_backward(norm, dy, ctx):
    """``(dx, dweight, dbias)`` of the sublayer's norm (dbias None for RMSNorm)."""
    if norm == "rms":
        return rms_norm_backward(dy, ctx) + (None,)
    return layer_norm_backward(dy, ctx)


def ffn_block_forward(x, norm_weight, norm_bias, w1, b1, w2, b2, activation="relu", *,
                      norm="layer", placement="pre", eps=1e-5, recompute=False, out=None,
                      hidden_out=None):
    """Returns ``(y, ctx)``: pre-LN ``y = x + ffn(norm(x))``, post-LN ``y = norm(x + ffn(x))``
    (``eps=None`` with ``norm="rms"``: ``np.finfo(x.dtype).eps``).

    ``ctx`` has ``mean`` (None for RMSNorm) and ``rstd`` of shape x.shape[:-1] (of x pre-LN,
    of s post-LN), ``dead_units`` (relu, reglu; None otherwise), the pre-LN normalised input
    ``xn`` or the post-LN residual sum ``s`` (the other None), and the composed references'
    contexts ``norm_ctx`` and ``ffn_ctx``.  ``recompute``, ``out`` and ``hidden_out`` change
    nothing here."""
    if norm == "rms" and eps is None:
        eps = float(np.finfo(np.asarray(x).dtype).eps)
    x = _f64(x)
    xn = s = None
    if placement == "pre":
        xn, nctx = _block_norm_forward(norm, x, norm_weight, norm_bias, eps)
        f, fctx = ffn_forward(xn, w1, b1, w2, b2, activation)
        y = x + f
    else:
        f, fctx = ffn_forward(x, w1, b1, w2, b2, activation)
        s = x + f
        y, nctx = _block_norm_forward(norm, s, norm_weight, norm_bias, eps)
    ctx = SimpleNamespace(norm=norm, placement=placement, eps=eps, x=x, xn=xn, s=s,
                          mean=getattr(nctx, "mean", None), rstd=nctx.rstd,
                          dead_units=fctx.dead_units, norm_ctx=nctx, ffn_ctx=fctx)
    return y, ctx


def ffn_block(x, norm_weight, norm_bias, w1, b1, w2, b2, activation="relu", *, norm="layer",
              placement="pre", eps=1e-5, out=None):
    return ffn_block_forward(x, norm_weight, norm_bias, w1, b1, w2, b2, activation, norm=norm,
                             placement=placement, eps=eps)[0]


def ffn_block_backward(dy, ctx, *, out=None, needs=None):
    """Returns ``(dx, dnorm_weight, dnorm_bias, dw1, db1, dw2, db2)`` (None where the parameter
    was None, and where ``needs`` says False)::

        pre-LN:   (dxn, dw1, db1, dw2, db2) = ffn_backward(dy)
                  (dxnorm, dnorm_weight, dnorm_bias) = norm_backward(dxn);  dx = dy + dxnorm
        post-LN:  (ds, dnorm_weight, dnorm_bias) = norm_backward(dy)
                  (dxf, dw1, db1, dw2, db2) = ffn_backward(ds);  dx = ds + dxf
    """
    dy = _f64(dy)
    if ctx.placement == "pre":
        dxn, dw1, db1, dw2, db2 = ffn_backward(dy, ctx.ffn_ctx)
        dxnorm, dnw, dnb = _block_norm_backward(ctx.norm, dxn, ctx.norm_ctx)
        dx = dy + dxnorm
    else:
        ds, dnw, dnb = _block_norm_backward(ctx.norm, dy, ctx.norm_ctx)
        dxf, dw1, db1, dw2, db2 = ffn_backward(ds, ctx.ffn_ctx)
        dx = ds + dxf
    return _mask((dx, dnw, dnb, dw1, db1, dw2, db2), needs)


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


def batch_norm_backward(dy, ctx, *, out=None, needs=None):
    """Returns ``(dx, dweight, dbias)`` (None where weight/bias were None or not needed)."""
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
    return _mask((dx, dweight, dbias), needs)
