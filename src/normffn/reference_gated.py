"""Float64 references of the gated FFNs (SwiGLU, GeGLU, ReGLU), forward and backward.

To be merged into ``normffn.reference`` (whose ``ffn``, ``ffn_forward`` and ``ffn_backward``
then accept the gated activation names); until then these three functions take every
activation, delegating the plain ones to ``normffn.reference``.  Same conventions: float64
whatever the input dtype, no validation, the textbook formulas.

Packed first layer: ``w1`` is ``(d, 2h)``, its first h columns the gate and the last h the
linear ("up") half; ``b1`` is ``(2h,)`` or None; ``w2`` is ``(h, d)``::

    g = x @ w1[:, :h] + b1[:h],  u = x @ w1[:, h:] + b1[h:]
    a = act(g) * u,              y = a @ w2 + b2

with act = silu (swiglu), gelu (erf; geglu) or relu (reglu).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from . import reference as _ref

__all__ = ["GATES", "ffn", "ffn_forward", "ffn_backward"]

# gated activation -> the activation of its gate
GATES = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def ffn_forward(x, w1, b1, w2, b2, activation="relu", recompute=False):
    """Returns ``(y, ctx)``; for a gated activation ``ctx`` has ``v`` (the packed
    pre-activation [g | u], (n, 2h)), ``g``, ``u``, ``a`` ((n, h)) and ``dead_units`` (reglu:
    gate units that were 0 on every row; None otherwise).  ``recompute`` changes nothing here."""
    if activation not in GATES:
        return _ref.ffn_forward(x, w1, b1, w2, b2, activation, recompute)
    x = _f64(x)
    x2 = x.reshape(-1, x.shape[-1])
    v = x2 @ _f64(w1)
    if b1 is not None:
        v = v + _f64(b1)
    h = v.shape[1] // 2
    g, u = v[:, :h], v[:, h:]
    s, _ = _ref._ffn_act(GATES[activation], g)
    a = s * u
    y = a @ _f64(w2)
    if b2 is not None:
        y = y + _f64(b2)
    dead = np.all(s == 0, axis=0) if activation == "reglu" else None
    ctx = SimpleNamespace(x=x2, shape=x.shape, w1=_f64(w1), b1=_f64(b1), w2=_f64(w2),
                          b2=_f64(b2), activation=activation, v=v, g=g, u=u, a=a,
                          dead_units=dead)
    return y.reshape(x.shape), ctx


def ffn(x, w1, b1, w2, b2, activation="relu", *, out=None):
    return ffn_forward(x, w1, b1, w2, b2, activation)[0]


def ffn_backward(dy, ctx, *, out=None, needs=None):
    """Returns ``(dx, dw1, db1, dw2, db2)`` (db1/db2 None where b1/b2 were None; ``needs``
    ignored: everything is computed).

    Gated: ``dA = dy @ w2^T``; ``dg = dA * u * act'(g)`` (reglu: ``dA * u`` where g is not
    <= 0, else 0, as PyTorch's threshold_backward), ``du = dA * act(g)``, ``dZ = [dg | du]``;
    ``dx = dZ @ w1^T``, ``dw1 = x^T @ dZ``, ``db1 = sum dZ``, ``dw2 = a^T @ dy``,
    ``db2 = sum dy`` over rows."""
    if ctx.activation not in GATES:
        return _ref.ffn_backward(dy, ctx)
    dy = _f64(dy).reshape(-1, ctx.w1.shape[0])
    dA = dy @ ctx.w2.T
    gate = GATES[ctx.activation]
    s, ds = _ref._ffn_act(gate, ctx.g)
    if gate == "relu":
        dg = np.where(ctx.g <= 0, 0.0, dA * ctx.u)
    else:
        dg = dA * ctx.u * ds
    dZ = np.concatenate([dg, dA * s], axis=1)
    dx = (dZ @ ctx.w1.T).reshape(ctx.shape)
    dw1 = ctx.x.T @ dZ
    dw2 = ctx.a.T @ dy
    db1 = dZ.sum(axis=0) if ctx.b1 is not None else None
    db2 = dy.sum(axis=0) if ctx.b2 is not None else None
    return dx, dw1, db1, dw2, db2
