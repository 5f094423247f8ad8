"""LayerNorm: ``y = (x - mean) / sqrt(var + eps) * weight + bias`` over the trailing dims.

Signatures follow ``torch.nn.functional.layer_norm``; arrays are NumPy arrays.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _checks
from ._workspace import workspace
from ._kernels import layer_norm as _kernel

__all__ = ["LayerNormContext", "layer_norm", "layer_norm_forward", "layer_norm_backward"]


@dataclass(frozen=True, eq=False)
class LayerNormContext:
    """What :func:`layer_norm_backward` needs; returned by :func:`layer_norm_forward`.

    Attributes
    ----------
    mean, rstd : ndarray of shape ``x.shape[:x.ndim - len(normalized_shape)]``
        Per-row mean and ``1 / sqrt(var + eps)`` (biased variance) — the same values as the
        2nd and 3rd outputs of ``torch.native_layer_norm``, squeezed.  Always float64: a
        float32 mean of a row of ``1e4 + noise`` is off by up to half an ulp of 1e4, which
        would cost backward (which recomputes ``xhat`` from it) three digits.
    normalized_shape : tuple of int
    eps : float
    x : ndarray, C-contiguous, shape of the forward input (backward recomputes ``xhat`` from it)
    weight, bias : ndarray of shape ``normalized_shape`` or None
    """

    x: np.ndarray
    weight: np.ndarray | None
    bias: np.ndarray | None
    normalized_shape: tuple
    eps: float
    mean: np.ndarray
    rstd: np.ndarray

    @property
    def shape(self) -> tuple:
        return self.x.shape

    @property
    def dtype(self) -> np.dtype:
        return self.x.dtype

    def _rows(self) -> tuple[int, int]:
        """(n, d), after checking the context is internally consistent (a hand-built or
        tampered context must raise, not reach the kernel)."""
        x = self.x
        if not isinstance(x, np.ndarray) or x.dtype not in _checks.FLOAT_DTYPES \
                or not x.flags.c_contiguous:
            raise ValueError("ctx.x must be the C-contiguous float array saved by the forward")
        k = len(self.normalized_shape)
        if x.ndim < k or tuple(x.shape[x.ndim - k:]) != tuple(self.normalized_shape):
            raise ValueError("ctx is inconsistent: x does not end in normalized_shape")
        lead = x.shape[:x.ndim - k]
        for name in ("mean", "rstd"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.dtype != np.float64 or a.shape != lead \
                    or not a.flags.c_contiguous:
                raise ValueError(f"ctx.{name} must be a C-contiguous float64 array of shape "
                                 f"{lead}")
        for name in ("weight", "bias"):
            a = getattr(self, name)
            if a is not None and (not isinstance(a, np.ndarray) or a.dtype != x.dtype
                                  or a.shape != tuple(self.normalized_shape)
                                  or not a.flags.c_contiguous):
                raise ValueError(f"ctx.{name} must be None or a C-contiguous {x.dtype} array "
                                 f"of shape {tuple(self.normalized_shape)}")
        return math.prod(lead), math.prod(self.normalized_shape)


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """LayerNorm forward, keeping what backward needs.

    Parameters
    ----------
    x : ndarray of shape (..., *normalized_shape), float32 or float64
        Any layout; a non-contiguous x is copied once (and that copy is kept for backward).
    normalized_shape : int or tuple of int
        The trailing dims to normalise over.
    weight, bias : ndarray of shape normalized_shape, same dtype as x, or None
    eps : float, >= 0 and finite
    out : ndarray of x's shape and dtype, C-contiguous, writeable, not overlapping an input
        Where to write y; reuse one across calls to avoid page-faulting a fresh output.

    Returns
    -------
    y : ndarray of x's shape and dtype
    ctx : LayerNormContext
        ``ctx.mean`` and ``ctx.rstd`` (float64) have shape
        ``x.shape[:x.ndim - len(normalized_shape)]``.

    Raises
    ------
    TypeError
        Non-float dtypes (int, bool, float16, complex, object) or mixed dtypes.
    ValueError
        0-d x, normalized_shape not matching x's trailing dims, wrong weight/bias shape,
        eps negative or not finite, a bad ``out``.
    """
    x = _checks.float_array(x, "x")
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension, got a 0-d array")
    dtype = x.dtype
    nshape = _checks.normalized_shape(normalized_shape, x.shape)
    weight = _checks.optional_param(weight, "weight", nshape, dtype)
    bias = _checks.optional_param(bias, "bias", nshape, dtype)
    eps = _checks.eps(eps)
    y = _checks.new_or_out(out, "out", x.shape, dtype, inputs=(x, weight, bias))

    lead = x.shape[:x.ndim - len(nshape)]
    n, d = math.prod(lead), math.prod(nshape)
    xc = np.ascontiguousarray(x)
    mean = np.empty(lead, dtype=np.float64)
    rstd = np.empty(lead, dtype=np.float64)
    if n > 0:
        _kernel.forward(y.reshape(n, d), mean.reshape(n), rstd.reshape(n), xc.reshape(n, d),
                        weight if weight is None else weight.reshape(d),
                        bias if bias is None else bias.reshape(d), eps)
    ctx = LayerNormContext(x=xc, weight=weight, bias=bias, normalized_shape=nshape, eps=eps,
                           mean=mean, rstd=rstd)
    return y, ctx


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """LayerNorm over the trailing ``normalized_shape`` dims (see :func:`layer_norm_forward`).

    ``y = (x - mean) * rstd * weight + bias`` with ``mean``/biased ``var`` over the trailing
    dims and ``rstd = 1 / sqrt(var + eps)``.  Returns y only.
    """
    return layer_norm_forward(x, normalized_shape, weight, bias, eps, out=out)[0]


def layer_norm_backward(dy, ctx, *, out=None):
    """Gradients of LayerNorm given ``dy = dL/dy``.

    Parameters
    ----------
    dy : ndarray of the forward output's shape and dtype (any layout)
    ctx : LayerNormContext from :func:`layer_norm_forward`
    out : optional preallocated ``dx`` (same rules as the forward ``out``)

    Returns
    -------
    dx : ndarray like x
    dweight, dbias : ndarray of shape normalized_shape, or None where weight/bias were None
        Reduced over rows in a fixed order: identical for any thread count.

    Maths: ``xhat = (x - mean) * rstd``, ``g = dy * weight``, ``c1 = mean(g * xhat)``,
    ``c2 = mean(g)`` over the normalised dims, ``dx = rstd * (g - xhat * c1 - c2)``.
    """
    ctx = _checks.context(ctx, LayerNormContext, "layer_norm")
    n, d = ctx._rows()
    dtype = ctx.dtype
    dy = _checks.grad_output(dy, ctx.shape, dtype)
    dx = _checks.new_or_out(out, "out", ctx.shape, dtype,
                            inputs=(dy, ctx.x, ctx.weight, ctx.mean, ctx.rstd))
    nshape = ctx.normalized_shape
    dweight = np.empty(nshape, dtype=dtype) if ctx.weight is not None else None
    dbias = np.empty(nshape, dtype=dtype) if ctx.bias is not None else None
    if n == 0:
        for g in (dweight, dbias):
            if g is not None:
                g.fill(0)
        return dx, dweight, dbias
    dyc = np.ascontiguousarray(dy)
    work = _kernel.scratch_size(n, d, dweight is not None, dbias is not None)
    _kernel.backward(dx.reshape(n, d),
                     None if dweight is None else dweight.reshape(d),
                     None if dbias is None else dbias.reshape(d),
                     dyc.reshape(n, d), ctx.x.reshape(n, d),
                     None if ctx.weight is None else ctx.weight.reshape(d),
                     ctx.mean.reshape(n), ctx.rstd.reshape(n),
                     workspace("layer_norm_backward", work) if work else None)
    return dx, dweight, dbias
