"""Float64 references of the FFN sublayer (``ffn_block``), forward and backward.

To be folded into :mod:`normffn.reference`.  Same conventions: the public API name for name and
signature for signature, float64 whatever the input dtype, no validation, and built only by
composing the references of the ops the sublayer is made of::

    pre-LN:   xn = norm(x),          y = x + ffn(xn)
    post-LN:  s  = x + ffn(x),       y = norm(s)

with norm = ``layer_norm`` (``norm="layer"``) or ``rms_norm`` (``norm="rms"``, no bias; ``eps``
None means ``np.finfo(x.dtype).eps`` of the input dtype) and ffn any activation, gated ones with
the packed ``w1`` (d, 2h).  Backward chains the references' backwards::

    pre-LN:   (dxn, dw1, db1, dw2, db2) = ffn_backward(dy);  (dxnorm, dnw, dnb) = norm_backward(dxn)
              dx = dy + dxnorm
    post-LN:  (ds, dnw, dnb) = norm_backward(dy);  (dxf, dw1, db1, dw2, db2) = ffn_backward(ds)
              dx = ds + dxf
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from . import reference as _ref

# Names from normffn.reference where they are already merged, else from the side files.
try:
    from .reference import rms_norm_backward, rms_norm_forward
except ImportError:  # pragma: no cover - until reference_norms.py is merged
    from .reference_norms import rms_norm_backward, rms_norm_forward
try:  # the gated side file is the superset (every activation) while it exists
    from .reference_gated import ffn_backward as _ffn_backward, ffn_forward as _ffn_forward
except ImportError:  # pragma: no cover - after the merge normffn.reference has every activation
    from .reference import ffn_backward as _ffn_backward, ffn_forward as _ffn_forward

__all__ = ["ffn_block", "ffn_block_forward", "ffn_block_backward"]


def _norm_forward(norm, x, weight, bias, eps):
    d = np.shape(x)[-1]
    if norm == "rms":
        return rms_norm_forward(x, d, weight, eps)
    return _ref.layer_norm_forward(x, d, weight, bias, eps)


def _norm_backward(norm, dy, ctx):
    if norm == "rms":
        dx, dw = rms_norm_backward(dy, ctx)
        return dx, dw, None
    return _ref.layer_norm_backward(dy, ctx)


def ffn_block_forward(x, norm_weight, norm_bias, w1, b1, w2, b2, activation="relu", *,
                      norm="layer", placement="pre", eps=1e-5, recompute=False, out=None,
                      hidden_out=None):
    """Returns ``(y, ctx)``; ``ctx`` has ``mean`` (None for RMS) and ``rstd`` of shape
    x.shape[:-1], ``dead_units`` (relu, reglu; None otherwise), the pre-LN normalised input
    ``xn`` or the post-LN residual sum ``s``, and the composed ops' contexts.  ``recompute``
    and ``hidden_out`` change nothing here."""
    x0 = np.asarray(x)
    if norm == "rms" and eps is None:
        eps = float(np.finfo(x0.dtype).eps)
    x = np.asarray(x0, dtype=np.float64)
    if placement == "pre":
        xn, nctx = _norm_forward(norm, x, norm_weight, norm_bias, eps)
        f, fctx = _ffn_forward(xn, w1, b1, w2, b2, activation)
        y, s = x + f, None
    else:
        xn = None
        f, fctx = _ffn_forward(x, w1, b1, w2, b2, activation)
        s = x + f
        y, nctx = _norm_forward(norm, s, norm_weight, norm_bias, eps)
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
    was None, and where ``needs`` says False)."""
    dy = np.asarray(dy, dtype=np.float64)
    if ctx.placement == "pre":
        dxn, dw1, db1, dw2, db2 = _ffn_backward(dy, ctx.ffn_ctx)
        dxnorm, dnw, dnb = _norm_backward(ctx.norm, dxn, ctx.norm_ctx)
        dx = dy + dxnorm
    else:
        ds, dnw, dnb = _norm_backward(ctx.norm, dy, ctx.norm_ctx)
        dxf, dw1, db1, dw2, db2 = _ffn_backward(ds, ctx.ffn_ctx)
        dx = ds + dxf
    grads = (dx, dnw, dnb, dw1, db1, dw2, db2)
    if needs is None:
        return grads
    return tuple(g if want else None for g, want in zip(grads, needs))
