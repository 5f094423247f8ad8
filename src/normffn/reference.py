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
    """Float64 LayerNorm forward: ``(y, ctx)``, the textbook formulas.

    ``mean`` is the corrected two-pass mean, ``var`` the biased two-pass variance over the
    trailing dims, ``rstd = 1 / sqrt(var + eps)``, ``y = (x - mean) * rstd * weight + bias``.

    Parameters
    ----------
    x, normalized_shape, weight, bias, eps
        As :func:`normffn.layer_norm_forward`; converted to float64.
    out : ignored
        References allocate.

    Returns
    -------
    y : ndarray, float64
        The normalised output.
    ctx : types.SimpleNamespace
        ``x``, ``weight``, ``bias`` (float64), ``axes``, ``eps``, ``mean`` and ``rstd`` of shape
        ``x.shape[:-k]`` (``k = len(normalized_shape)``).

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> y, ctx = reference.layer_norm_forward(np.float32([[0, 1, 2]]), 3)
    >>> y.dtype, ctx.mean.tolist(), np.round(y, 4).tolist()
    (dtype('float64'), [1.0], [[-1.2247, 0.0, 1.2247]])
    """
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
    """Float64 LayerNorm: :func:`layer_norm_forward` without the context.

    Parameters
    ----------
    x, normalized_shape, weight, bias, eps
        As :func:`normffn.layer_norm`.
    out : ignored
        References allocate.

    Returns
    -------
    y : ndarray, float64

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> from normffn import reference
    >>> x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    >>> y_ref = reference.layer_norm(x, 6)
    >>> y_ref.dtype
    dtype('float64')
    >>> normffn.testing.assert_close(normffn.layer_norm(x, 6), y_ref).nonfinite_match
    True
    """
    return layer_norm_forward(x, normalized_shape, weight, bias, eps)[0]


def layer_norm_backward(dy, ctx, *, out=None, needs=None):
    """Float64 LayerNorm backward: ``(dx, dweight, dbias)``.

    ``xhat = (x - mean) * rstd``, ``g = dy * weight``, ``c1 = mean(g * xhat)``,
    ``c2 = mean(g)``, ``dx = rstd * (g - xhat * c1 - c2)``, ``dweight = sum dy * xhat``,
    ``dbias = sum dy`` (sums over the rows).

    Parameters
    ----------
    dy : array_like
        The gradient of y.
    ctx : types.SimpleNamespace
        From :func:`layer_norm_forward` (this module's).
    out : ignored
        References allocate.
    needs : tuple of 3 bools, optional
        False entries are returned as None.

    Returns
    -------
    dx : ndarray, float64
    dweight, dbias : ndarray or None
        None where weight/bias were None or not needed.

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> x = np.array([[0.0, 1.0, 2.0]])
    >>> _, ctx = reference.layer_norm_forward(x, 3, np.ones(3), np.zeros(3))
    >>> dx, dw, db = reference.layer_norm_backward(np.ones((1, 3)), ctx)
    >>> np.round(dx, 12).tolist(), db.tolist()     # a constant dy moves nothing
    ([[0.0, 0.0, 0.0]], [1.0, 1.0, 1.0])
    """
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
    """Float64 FFN forward: ``(y, ctx)`` with ``y = act(x @ w1 + b1) @ w2 + b2``.

    Gated: ``y = (act(g) * u) @ w2 + b2`` with ``g, u`` the two halves of ``x @ w1 + b1`` (see the
    module docstring).

    Parameters
    ----------
    x, w1, b1, w2, b2, activation
        As :func:`normffn.ffn_forward`; converted to float64.
    recompute, out, hidden_out : ignored
        They change nothing here.

    Returns
    -------
    y : ndarray, float64
    ctx : types.SimpleNamespace
        ``v`` (the pre-activation, (n, h); gated: the packed [g | u], (n, 2h)), ``a`` (the
        hidden activation, (n, h)), for gated activations ``g`` and ``u``, and ``dead_units``
        (relu: units whose output is 0 on every row; reglu: the same of the gate ``act(g)``;
        None otherwise).

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> x = np.array([[1.0, -1.0]])
    >>> w1 = np.array([[1.0, 1.0], [1.0, -1.0]])
    >>> y, ctx = reference.ffn_forward(x, w1, None, np.eye(2), None)
    >>> y.tolist(), ctx.dead_units.tolist()       # relu([0, 2])
    ([[0.0, 2.0]], [True, False])
    """
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
    """Float64 FFN: :func:`ffn_forward` without the context.

    Parameters
    ----------
    x, w1, b1, w2, b2, activation
        As :func:`normffn.ffn`.
    out : ignored
        References allocate.

    Returns
    -------
    y : ndarray, float64

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> reference.ffn(np.array([[2.0]]), np.array([[1.0]]), None, np.array([[3.0]]), None,
    ...               "silu").round(6).tolist()                 # 3 * 2 * sigmoid(2)
    [[5.284782]]
    """
    return ffn_forward(x, w1, b1, w2, b2, activation)[0]


def ffn_backward(dy, ctx, *, out=None, needs=None):
    """Float64 FFN backward: ``(dx, dw1, db1, dw2, db2)``.

    ``dA = dy @ w2^T``.  Plain: ``dH = dA * act'(v)`` (relu: dA where not a <= 0, as PyTorch's
    threshold_backward, so a NaN activation passes its gradient).  Gated: ``dg = dA * u *
    act'(g)`` (reglu: ``dA * u`` where g is not <= 0, else 0), ``du = dA * act(g)``,
    ``dH = [dg | du]``.  Then ``dx = dH @ w1^T``, ``dw1 = x^T @ dH``, ``db1 = sum dH``,
    ``dw2 = a^T @ dy``, ``db2 = sum dy`` over rows.

    Parameters
    ----------
    dy : array_like
        The gradient of y.
    ctx : types.SimpleNamespace
        From :func:`ffn_forward` (this module's).
    out : ignored
        References allocate.
    needs : tuple of 5 bools, optional
        False entries are returned as None.

    Returns
    -------
    dx, dw1, db1, dw2, db2 : ndarray or None
        float64; db1/db2 None where b1/b2 were None.

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> x, w1, w2 = np.array([[1.0, 2.0]]), np.eye(2), np.eye(2)
    >>> y, ctx = reference.ffn_forward(x, w1, np.zeros(2), w2, None)
    >>> dx, dw1, db1, dw2, db2 = reference.ffn_backward(np.ones((1, 2)), ctx)
    >>> dx.tolist(), db1.tolist(), db2 is None
    ([[1.0, 1.0]], [1.0, 1.0], True)
    """
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
    """Float64 :func:`normffn.pack_gated`: ``(w1, b1)``.

    ``w1 = [w_gate | w_up]`` of shape (d, 2h) (``layout="torch"``: the weights are (h, d), as
    ``nn.Linear.weight``), ``b1 = [b_gate | b_up]`` (zeros for a missing half; None when both
    are None).

    Parameters
    ----------
    w_gate, w_up, b_gate, b_up, layout
        As :func:`normffn.pack_gated`.

    Returns
    -------
    w1 : ndarray of shape (d, 2h), float64
    b1 : ndarray of shape (2h,), float64, or None

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> w1, b1 = reference.pack_gated(np.zeros((2, 1)), np.ones((2, 1)), b_gate=np.ones(1))
    >>> w1.tolist(), b1.tolist()
    ([[0.0, 1.0], [0.0, 1.0]], [1.0, 0.0])
    """
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
    """Float64 RMSNorm forward: ``(y, ctx)``.

    ``y = x * rstd * weight``, ``rstd = 1 / sqrt(mean(x^2) + eps)`` over the trailing dims;
    ``eps=None`` means ``np.finfo(x.dtype).eps`` (of the input's dtype).

    Parameters
    ----------
    x, normalized_shape, weight, eps
        As :func:`normffn.rms_norm_forward`; converted to float64.
    out : ignored
        References allocate.

    Returns
    -------
    y : ndarray, float64
    ctx : types.SimpleNamespace
        ``ctx.rstd`` has shape ``x.shape[:-k]``.

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> y, ctx = reference.rms_norm_forward(np.array([[3.0, 4.0]]), 2, eps=0.0)
    >>> np.round(ctx.rstd ** -2, 12).tolist()      # mean(x**2)
    [12.5]
    """
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
    """Float64 RMSNorm: :func:`rms_norm_forward` without the context.

    Parameters
    ----------
    x, normalized_shape, weight, eps
        As :func:`normffn.rms_norm`.
    out : ignored
        References allocate.

    Returns
    -------
    y : ndarray, float64

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> reference.rms_norm(np.array([[2.0, -2.0]]), 2, eps=0.0).tolist()
    [[1.0, -1.0]]
    """
    return rms_norm_forward(x, normalized_shape, weight, eps)[0]


def rms_norm_backward(dy, ctx, *, out=None, needs=None):
    """Float64 RMSNorm backward: ``(dx, dweight)``.

    ``xhat = x * rstd``, ``g = dy * weight``, ``c1 = mean(g * xhat)``,
    ``dx = rstd * (g - xhat * c1)``, ``dweight = sum dy * xhat`` over rows.

    Parameters
    ----------
    dy : array_like
        The gradient of y.
    ctx : types.SimpleNamespace
        From :func:`rms_norm_forward` (this module's).
    out : ignored
        References allocate.
    needs : tuple of 2 bools, optional
        False entries are returned as None.

    Returns
    -------
    dx : ndarray, float64
    dweight : ndarray or None
        None without weight or where not needed.

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> x = np.array([[2.0, -2.0]])
    >>> _, ctx = reference.rms_norm_forward(x, 2, eps=0.0)
    >>> dx, dw = reference.rms_norm_backward(x, ctx)              # dy parallel to x
    >>> np.round(dx, 12).tolist(), dw
    ([[0.0, 0.0]], None)
    """
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
    """Float64 residual add + LayerNorm: ``(y, s, ctx)``.

    ``s = x + residual`` rounded once in the input dtype (as the op does), then
    ``y = layer_norm(s)`` in float64.

    Parameters
    ----------
    x, residual, normalized_shape, weight, bias, eps
        As :func:`normffn.add_layer_norm_forward`.
    out : ignored
        References allocate.

    Returns
    -------
    y, s : ndarray, float64
    ctx : types.SimpleNamespace
        :func:`layer_norm_forward`'s, computed from s (``ctx.mean``, ``ctx.rstd``).

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> x = np.float32([[1e8, 1.0]])
    >>> y, s, ctx = reference.add_layer_norm_forward(x, np.float32([[0.0, 1.0]]), 2)
    >>> s.dtype, s.tolist()                        # float32 addition, returned as float64
    (dtype('float64'), [[100000000.0, 2.0]])
    """
    s = _add(x, residual)
    y, ctx = layer_norm_forward(s, normalized_shape, weight, bias, eps)
    return y, s, ctx


def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """Float64 residual add + LayerNorm: ``(y, s)``, :func:`add_layer_norm_forward` without the
    context.

    Parameters
    ----------
    x, residual, normalized_shape, weight, bias, eps
        As :func:`normffn.add_layer_norm`.
    out : ignored
        References allocate.

    Returns
    -------
    y, s : ndarray, float64

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> y, s = reference.add_layer_norm(np.zeros((1, 2)), np.array([[1.0, 3.0]]), 2, eps=0.0)
    >>> y.tolist(), s.tolist()
    ([[-1.0, 1.0]], [[1.0, 3.0]])
    """
    return add_layer_norm_forward(x, residual, normalized_shape, weight, bias, eps)[:2]


def add_layer_norm_backward(dy, ctx, ds=None, *, out=None, needs=None):
    """Float64 residual add + LayerNorm backward: ``(dsum, dweight, dbias)``.

    ``dsum = layer_norm_backward(dy)[0] + ds``, the gradient of both x and residual.

    Parameters
    ----------
    dy : array_like
        The gradient of y.
    ctx : types.SimpleNamespace
        From :func:`add_layer_norm_forward` (this module's).
    ds : array_like or None
        The gradient reaching s from downstream.
    out : ignored
        References allocate.
    needs : tuple of 3 bools, optional
        As in :func:`layer_norm_backward`.

    Returns
    -------
    dsum : ndarray, float64
    dweight, dbias : ndarray or None

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> _, _, ctx = reference.add_layer_norm_forward(np.zeros((1, 2)), np.array([[1.0, 3.0]]), 2)
    >>> dsum, dw, db = reference.add_layer_norm_backward(np.zeros((1, 2)), ctx,
    ...                                                  ds=np.ones((1, 2)))
    >>> dsum.tolist(), dw, db
    ([[1.0, 1.0]], None, None)
    """
    dx, dw, db = layer_norm_backward(dy, ctx)
    if ds is not None:
        dx = dx + _f64(ds)
    return _mask((dx, dw, db), needs)


def add_rms_norm_forward(x, residual, normalized_shape, weight=None, eps=None, *, out=None):
    """Float64 residual add + RMSNorm: ``(y, s, ctx)``.

    ``s = x + residual`` rounded once in the input dtype, ``y = rms_norm(s)`` in float64
    (``eps=None``: ``np.finfo(x.dtype).eps``).

    Parameters
    ----------
    x, residual, normalized_shape, weight, eps
        As :func:`normffn.add_rms_norm_forward`.
    out : ignored
        References allocate.

    Returns
    -------
    y, s : ndarray, float64
    ctx : types.SimpleNamespace
        :func:`rms_norm_forward`'s, computed from s.

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> y, s, ctx = reference.add_rms_norm_forward(np.ones((1, 2)), np.ones((1, 2)), 2, eps=0.0)
    >>> y.tolist(), ctx.rstd.tolist()
    ([[1.0, 1.0]], [0.5])
    """
    if eps is None:
        eps = float(np.finfo(np.asarray(x).dtype).eps)
    s = _add(x, residual)
    y, ctx = rms_norm_forward(s, normalized_shape, weight, eps)
    return y, s, ctx


def add_rms_norm(x, residual, normalized_shape, weight=None, eps=None, *, out=None):
    """Float64 residual add + RMSNorm: ``(y, s)``, :func:`add_rms_norm_forward` without the
    context.

    Parameters
    ----------
    x, residual, normalized_shape, weight, eps
        As :func:`normffn.add_rms_norm`.
    out : ignored
        References allocate.

    Returns
    -------
    y, s : ndarray, float64

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> y, s = reference.add_rms_norm(np.array([[1.0, -3.0]]), np.array([[1.0, 1.0]]), 2, eps=0.0)
    >>> y.tolist()
    [[1.0, -1.0]]
    """
    return add_rms_norm_forward(x, residual, normalized_shape, weight, eps)[:2]


def add_rms_norm_backward(dy, ctx, ds=None, *, out=None, needs=None):
    """Float64 residual add + RMSNorm backward: ``(dsum, dweight)``.

    ``dsum = rms_norm_backward(dy)[0] + ds``.

    Parameters
    ----------
    dy : array_like
        The gradient of y.
    ctx : types.SimpleNamespace
        From :func:`add_rms_norm_forward` (this module's).
    ds : array_like or None
        The gradient reaching s from downstream.
    out : ignored
        References allocate.
    needs : tuple of 2 bools, optional
        False entries are returned as None.

    Returns
    -------
    dsum : ndarray, float64
    dweight : ndarray or None

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> _, _, ctx = reference.add_rms_norm_forward(np.ones((1, 2)), np.ones((1, 2)), 2)
    >>> reference.add_rms_norm_backward(np.zeros((1, 2)), ctx, np.ones((1, 2)))[0].tolist()
    [[1.0, 1.0]]
    """
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
                      hidden_out=None, kept_out=None):
    """Float64 FFN sublayer forward: ``(y, ctx)``, composed from the references above.

    Pre-LN ``y = x + ffn(norm(x))``, post-LN ``y = norm(x + ffn(x))`` (``eps=None`` with
    ``norm="rms"``: ``np.finfo(x.dtype).eps``).

    Parameters
    ----------
    x, norm_weight, norm_bias, w1, b1, w2, b2, activation, norm, placement, eps
        As :func:`normffn.ffn_block_forward`.
    recompute, out, hidden_out, kept_out : ignored
        They change nothing here.

    Returns
    -------
    y : ndarray, float64
    ctx : types.SimpleNamespace
        ``mean`` (None for RMSNorm) and ``rstd`` of shape ``x.shape[:-1]`` (of x pre-LN, of s
        post-LN), ``dead_units`` (relu, reglu; None otherwise), the pre-LN normalised input
        ``xn`` or the post-LN residual sum ``s`` (the other None), and the composed references'
        contexts ``norm_ctx`` and ``ffn_ctx``.

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> x = np.array([[1.0, 3.0]])
    >>> y, ctx = reference.ffn_block_forward(x, None, None, np.zeros((2, 2)), None,
    ...                                      np.zeros((2, 2)), None, eps=0.0)
    >>> y.tolist(), np.round(ctx.xn, 12).tolist()       # the FFN adds 0
    ([[1.0, 3.0]], [[-1.0, 1.0]])
    """
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
    """Float64 FFN sublayer: :func:`ffn_block_forward` without the context.

    Parameters
    ----------
    x, norm_weight, norm_bias, w1, b1, w2, b2, activation, norm, placement, eps
        As :func:`normffn.ffn_block`.
    out : ignored
        References allocate.

    Returns
    -------
    y : ndarray, float64

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> y = reference.ffn_block(np.array([[1.0, 3.0]]), None, None, np.zeros((2, 2)), None,
    ...                         np.zeros((2, 2)), None, placement="post", eps=0.0)
    >>> np.round(y, 12).tolist()
    [[-1.0, 1.0]]
    """
    return ffn_block_forward(x, norm_weight, norm_bias, w1, b1, w2, b2, activation, norm=norm,
                             placement=placement, eps=eps)[0]


def ffn_block_backward(dy, ctx, *, out=None, needs=None):
    """Float64 FFN sublayer backward: ``(dx, dnorm_weight, dnorm_bias, dw1, db1, dw2, db2)``.

    None where the parameter was None, and where ``needs`` says False::

        pre-LN:   (dxn, dw1, db1, dw2, db2) = ffn_backward(dy)
                  (dxnorm, dnorm_weight, dnorm_bias) = norm_backward(dxn);  dx = dy + dxnorm
        post-LN:  (ds, dnorm_weight, dnorm_bias) = norm_backward(dy)
                  (dxf, dw1, db1, dw2, db2) = ffn_backward(ds);  dx = ds + dxf

    Parameters
    ----------
    dy : array_like
        The gradient of y.
    ctx : types.SimpleNamespace
        From :func:`ffn_block_forward` (this module's).
    out : ignored
        References allocate.
    needs : tuple of 7 bools, optional
        False entries are returned as None.

    Returns
    -------
    tuple of 7 (ndarray or None)
        float64 gradients.

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> x = np.array([[1.0, 3.0]])
    >>> _, ctx = reference.ffn_block_forward(x, None, None, np.zeros((2, 2)), None,
    ...                                      np.zeros((2, 2)), None)
    >>> grads = reference.ffn_block_backward(np.ones((1, 2)), ctx)
    >>> grads[0].tolist(), grads[1], grads[3].shape           # pre-LN: dx = dy + ...
    ([[1.0, 1.0]], None, (2, 2))
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
    """Float64 BatchNorm forward: ``(y, ctx)``.

    Normalises per channel (axis 1) over ``(N, *spatial)``: with the batch mean and biased
    variance in training, with the running stats in eval.  In training, given running stats are
    updated in place (``(1 - momentum) * old + momentum * new``, unbiased variance), as PyTorch
    does.

    Parameters
    ----------
    x, running_mean, running_var, weight, bias, training, momentum, eps
        As :func:`normffn.batch_norm_forward`.
    out : ignored
        References allocate.

    Returns
    -------
    y : ndarray, float64
    ctx : types.SimpleNamespace
        ``mean`` and ``rstd`` of shape (C,) (batch stats in training, running stats in eval).

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> rm, rv = np.zeros(1), np.ones(1)
    >>> y, ctx = reference.batch_norm_forward(np.array([[1.0], [3.0]]), rm, rv, training=True,
    ...                                       eps=0.0)
    >>> y.tolist(), rm.tolist(), np.round(rv, 12).tolist()
    ([[-1.0], [1.0]], [0.2], [1.1])
    """
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
    """Float64 BatchNorm: :func:`batch_norm_forward` without the context.

    Parameters
    ----------
    x, running_mean, running_var, weight, bias, training, momentum, eps
        As :func:`normffn.batch_norm`.
    out : ignored
        References allocate.

    Returns
    -------
    y : ndarray, float64

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> reference.batch_norm(np.array([[3.0]]), np.array([1.0]), np.array([4.0]), eps=0.0).tolist()
    [[1.0]]
    """
    return batch_norm_forward(x, running_mean, running_var, weight, bias, training, momentum,
                              eps)[0]


def batch_norm_backward(dy, ctx, *, out=None, needs=None):
    """Float64 BatchNorm backward: ``(dx, dweight, dbias)``.

    Per channel, ``xhat = (x - mean) * rstd``, ``g = dy * weight``; training:
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``, eval: ``dx = g * rstd``;
    ``dweight = sum(dy * xhat)``, ``dbias = sum(dy)``.

    Parameters
    ----------
    dy : array_like
        The gradient of y.
    ctx : types.SimpleNamespace
        From :func:`batch_norm_forward` (this module's).
    out : ignored
        References allocate.
    needs : tuple of 3 bools, optional
        False entries are returned as None.

    Returns
    -------
    dx : ndarray, float64
    dweight, dbias : ndarray or None
        None where weight/bias were None or not needed.

    Examples
    --------
    >>> import numpy as np
    >>> from normffn import reference
    >>> _, ctx = reference.batch_norm_forward(np.array([[1.0], [3.0]]), None, None, np.ones(1),
    ...                                       np.zeros(1), training=True)
    >>> dx, dw, db = reference.batch_norm_backward(np.ones((2, 1)), ctx)
    >>> np.round(dx, 12).tolist(), db.tolist()
    ([[0.0], [0.0]], [2.0])
    """
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
