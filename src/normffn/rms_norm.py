"""RMSNorm: ``y = x / sqrt(mean(x**2) + eps) * weight`` over the trailing dims.

Signatures follow ``torch.nn.functional.rms_norm``; arrays are NumPy arrays.

Layers (see docs/architecture.md): ``check_*`` validates and returns kernel-shaped arrays,
``run_*`` trusts its arguments (2-D ``(n, d)`` C-contiguous views) and calls the kernel — fused
ops (``add_rms_norm``, ``ffn_block``) call the ``run_*`` functions on row blocks without
validating again — and the public functions compose the two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _checks, _tuning
from ._checks import F64, _ndarray
from ._context import Context, Field
from ._kernels import rms_norm as _kernel
from ._workspace import workspace

__all__ = ["RMSNormContext", "rms_norm", "rms_norm_forward", "rms_norm_backward",
           "check_rms_norm", "run_rms_norm_forward", "run_rms_norm_backward"]


# ---------------------------------------------------------------- shapes (add_norm uses them)
def lead_shape(ctx) -> tuple:
    """Leading (row) dims of a row-norm context: its input shape minus normalized_shape."""
    return ctx.shape[:len(ctx.shape) - len(ctx.normalized_shape)]


def param_shape(ctx) -> tuple:
    return tuple(ctx.normalized_shape)


# ---------------------------------------------------------------- context
@dataclass(frozen=True, eq=False)
class RMSNormContext(Context):
    """What :func:`rms_norm_backward` needs; returned by :func:`rms_norm_forward`.

    Attributes
    ----------
    rstd : ndarray of shape ``x.shape[:x.ndim - len(normalized_shape)]``, float64
        ``1 / sqrt(mean(x**2) + eps)`` per row.
    normalized_shape : tuple of int
        The normalised trailing dims.
    eps : float
        As used by the forward (``None`` was resolved to the dtype's machine epsilon).
    x : ndarray
        C-contiguous (backward recomputes ``xhat = x * rstd`` from it).
    weight : ndarray of shape normalized_shape, or None
        As given to the forward.

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> _, ctx = normffn.rms_norm_forward(np.full((2, 4), 3.0), 4)
    >>> np.round(ctx.rstd, 6).tolist(), bool(ctx.eps == np.finfo(np.float64).eps)
    ([0.333333, 0.333333], True)
    """

    x: np.ndarray
    weight: np.ndarray | None
    normalized_shape: tuple
    eps: float
    rstd: np.ndarray

    _op = "rms_norm"
    _fields = (
        Field("x", kind="input"),
        Field("weight", kind="like_x", shape=param_shape, optional=True),
        Field("rstd", kind="float64", shape=lead_shape),
    )

    def _valid_fast(self) -> int:
        """The common case of :meth:`validate` (see ``Context._valid_fast``)."""
        return _checks.fast_row_context(self.x, self.normalized_shape, self.rstd, (),
                                        (self.weight,))

    def _extra_checks(self) -> None:
        k = len(self.normalized_shape)
        if self.x.ndim < k or tuple(self.x.shape[self.x.ndim - k:]) != self.normalized_shape:
            raise ValueError("ctx is inconsistent: x does not end in normalized_shape")


# ---------------------------------------------------------------- check / run
def check_rms_norm(x, normalized_shape, weight=None, eps=None, *, out=None):
    """Validate the forward arguments.  Returns ``(x, nshape, weight, eps, y)`` with x
    C-contiguous, weight C-contiguous or None, eps a float, y the output (``out`` or new)."""
    x, nshape, _ = _checks.row_input(x, normalized_shape)
    dtype = x.dtype
    weight = _checks.optional_param(weight, "weight", nshape, dtype)
    eps = _checks.eps(eps, dtype=dtype)
    y = _checks.new_or_out(out, "out", x.shape, dtype, inputs=(x, weight))
    return np.ascontiguousarray(x), nshape, weight, eps, y


def run_rms_norm_forward(x2, weight, eps, y2, rstd):
    """RMSNorm of the rows of ``x2`` into ``y2`` and ``rstd``.  Trusts its arguments: x2, y2
    C-contiguous (n, d) of one dtype, n >= 0; weight (d,) or None; rstd (n,) float64."""
    if x2.shape[0] > 0:
        _kernel.forward(y2, rstd, x2, weight, eps, _tuning.stream_for(y2))
    return y2, rstd


def run_rms_norm_backward(dy2, x2, weight, rstd, dx2, dweight):
    """RMSNorm backward of the rows of ``x2`` into ``dx2`` and ``dweight`` (either None: not
    computed; dweight needs weight).  Trusts its arguments (shapes as in
    :func:`run_rms_norm_forward`, dy2 C-contiguous)."""
    n, d = x2.shape
    if n == 0:
        if dweight is not None:
            dweight.fill(0)
        return dx2, dweight
    if dx2 is None and dweight is None:
        return dx2, dweight
    work = _kernel.scratch_size(n, d, dweight is not None)
    _kernel.backward(dx2, dweight, dy2, x2, weight, rstd,
                     workspace("rms_norm_backward", work) if work else None,
                     _tuning.stream_for(dy2) if dx2 is not None else 0)
    return dx2, dweight


# ---------------------------------------------------------------- fast paths
def _fast_forward(x, ns, weight, eps, out, keep: bool):
    """:func:`rms_norm_forward` (``keep``: returns ``(y, ctx)``) or :func:`rms_norm` (returns
    y) for the common call, or None for any other.  Common: x an exact, C-contiguous, aligned
    ndarray of the float32/float64 dtype objects; ``ns`` an int or a 1-tuple of int equal to
    x's last dim; weight None or such an array of shape (d,) and x's dtype; eps None or a float
    in [0, inf).  These are check_rms_norm's checks, passed; on None nothing has been allocated
    and the general path decides.  ``out`` is checked by the general path's helper unless it
    is an owned C array and so are the inputs (then it cannot overlap them)."""
    d = _checks.fast_rows(x, ns)
    if d is None:
        return None
    dt, shape = x.dtype, x.shape
    if eps is None:
        eps = _checks.eps(None, dtype=dt)
    elif type(eps) is not float or not 0.0 <= eps < math.inf:
        return None
    f = x.flags
    pshape = (d,)
    w_owned = _checks.fast_param(weight, pshape, dt)
    if w_owned is None:
        return None
    owned = f.owndata and w_owned    # both own their memory: a distinct out is disjoint
    if out is None:
        y = np.empty(shape, dt)
    else:
        y = out
        if not (owned and type(out) is _ndarray and out.dtype is dt and out.shape == shape) or \
                not _checks.owned_c_array(out.flags) or out is x or out is weight:
            y = _checks.out_array(out, "out", shape, dt, (x, weight))
    lead = shape[:-1]
    rstd = np.empty(lead, F64) if keep else None    # not kept: the kernel uses scratch
    if x.size:
        if len(lead) == 1:
            _kernel.forward(y, rstd, x, weight, eps, _tuning.stream_for(y))
        else:
            n = math.prod(lead)
            _kernel.forward(y.reshape(n, d), None if rstd is None else rstd.reshape(n),
                            x.reshape(n, d), weight, eps, _tuning.stream_for(y))
    if not keep:
        return y
    return y, RMSNormContext._build({"x": x, "weight": weight, "normalized_shape": pshape,
                                     "eps": eps, "rstd": rstd})


def _fast_backward(dy, ctx, out):
    """:func:`rms_norm_backward` with ``needs=None`` for the common call, or None for any
    other: ctx an exact RMSNormContext passing ``_valid_fast`` (the whole of ``validate``), dy
    an exact, C-contiguous, aligned ndarray of ctx.x's dtype object and shape.  ``out`` is
    checked by the general path's helper (same errors)."""
    if type(ctx) is not RMSNormContext or type(dy) is not _ndarray:
        return None
    valid = ctx._valid_fast()
    if not valid:
        return None
    x, weight, rstd = ctx.x, ctx.weight, ctx.rstd
    shape, dt = x.shape, x.dtype
    if dy.dtype is not dt or dy.shape != shape:
        return None
    f = dy.flags
    if not (f.c_contiguous and f.aligned):
        return None
    if out is None:
        dx = np.empty(shape, dt)
    else:
        dx = out
        if not (valid == 2 and f.owndata and type(out) is _ndarray and out.dtype is dt and
                out.shape == shape and _checks.owned_c_array(out.flags)) or \
                out is dy or out is x or out is weight:
            dx = _checks.out_array(out, "out", shape, dt, (dy, x, weight, rstd))
    d = shape[-1]
    dweight = None if weight is None else np.empty(d, dt)
    if len(shape) == 2:
        run_rms_norm_backward(dy, x, weight, rstd, dx, dweight)
    else:
        n = rstd.size
        run_rms_norm_backward(dy.reshape(n, d), x.reshape(n, d), weight, rstd.reshape(n),
                              dx.reshape(n, d), dweight)
    return dx, dweight


# ---------------------------------------------------------------- public API
_GRAD_NAMES = ("dx", "dweight")

def rms_norm_forward(x, normalized_shape, weight=None, eps=None, *, out=None):
    """RMSNorm forward, keeping what backward needs.

    ``y = x * rstd * weight`` with ``rstd = 1 / sqrt(mean(x**2) + eps)`` over the trailing
    ``normalized_shape`` dims of each row (float64 statistics).

    Parameters
    ----------
    x : ndarray of shape ``(..., *normalized_shape)``, float32 or float64
        Any layout; a non-contiguous x is copied once (and that copy is kept for backward).
    normalized_shape : int or tuple of int
        The trailing dims to normalise over.
    weight : ndarray of shape normalized_shape, same dtype as x, or None
        The scale (``None``: none).
    eps : float >= 0 and finite, or None
        None means ``np.finfo(x.dtype).eps``, as ``torch.nn.functional.rms_norm``.
    out : ndarray of x's shape and dtype, C-contiguous, writeable, not overlapping an input
        Where to write y.

    Returns
    -------
    y : ndarray of x's shape and dtype
        ``x * rstd * weight`` (``out`` when given).
    ctx : RMSNormContext
        ``ctx.rstd = 1 / sqrt(mean(x**2) + eps)`` (float64) has shape
        ``x.shape[:x.ndim - len(normalized_shape)]``.

    Raises
    ------
    TypeError
        Non-float or mixed dtypes.
    ValueError
        0-d x, normalized_shape not matching x's trailing dims, wrong weight shape, eps
        negative or not finite, a bad ``out``.

    See Also
    --------
    rms_norm, rms_norm_backward, normffn.reference.rms_norm_forward

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> x = np.array([[3.0, 4.0], [1.0, -1.0]], dtype=np.float32)
    >>> y, ctx = normffn.rms_norm_forward(x, 2, eps=0.0)
    >>> np.round(ctx.rstd, 6).tolist()                   # 1 / sqrt(12.5), 1 / sqrt(1)
    [0.282843, 1.0]
    >>> y.astype(float).round(4).tolist()
    [[0.8485, 1.1314], [1.0, -1.0]]
    """
    fast = _fast_forward(x, normalized_shape, weight, eps, out, True)
    if fast is not None:
        return fast
    x, nshape, weight, eps, y = check_rms_norm(x, normalized_shape, weight, eps, out=out)
    lead = x.shape[:x.ndim - len(nshape)]
    rstd = np.empty(lead, dtype=F64)
    if len(lead) == 1 and len(nshape) == 1:     # already (n, d) and (d,): no views to make
        run_rms_norm_forward(x, weight, eps, y, rstd)
    else:
        n, d = math.prod(lead), math.prod(nshape)
        run_rms_norm_forward(x.reshape(n, d), None if weight is None else weight.reshape(d),
                             eps, y.reshape(n, d), rstd.reshape(n))
    return y, RMSNormContext._build({"x": x, "weight": weight, "normalized_shape": nshape,
                                     "eps": eps, "rstd": rstd})


def rms_norm(x, normalized_shape, weight=None, eps=None, *, out=None):
    """RMSNorm over the trailing ``normalized_shape`` dims, as ``torch.nn.functional.rms_norm``.

    ``y = x / sqrt(mean(x**2) + eps) * weight``, the statistic computed in float64.  Keeps
    nothing for backward (see :func:`rms_norm_forward`).

    Parameters
    ----------
    x : ndarray of shape ``(..., *normalized_shape)``, float32 or float64
        Any layout.
    normalized_shape : int or tuple of int
        The trailing dims to normalise over.
    weight : ndarray of shape normalized_shape, same dtype as x, or None
        The scale (``None``: none).
    eps : float >= 0 and finite, or None
        None means ``np.finfo(x.dtype).eps``, as PyTorch.
    out : ndarray of x's shape and dtype, C-contiguous, writeable, not overlapping an input
        Where to write y.

    Returns
    -------
    y : ndarray of x's shape and dtype
        ``out`` when given.

    Raises
    ------
    TypeError
        Non-float or mixed dtypes.
    ValueError
        0-d x, normalized_shape not matching x's trailing dims, wrong weight shape, eps
        negative or not finite, a bad ``out``.

    See Also
    --------
    rms_norm_forward, rms_norm_backward, normffn.reference.rms_norm

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    >>> w = np.linspace(0.5, 1.5, 16, dtype=np.float32)
    >>> y = normffn.rms_norm(x, 16, w)
    >>> y.shape, y.dtype
    ((3, 16), dtype('float32'))
    >>> bool(np.allclose(y, normffn.reference.rms_norm(x, 16, w), atol=1e-6))
    True
    """
    fast = _fast_forward(x, normalized_shape, weight, eps, out, False)
    if fast is not None:
        return fast
    return rms_norm_forward(x, normalized_shape, weight, eps, out=out)[0]


def rms_norm_backward(dy, ctx, *, out=None, needs=None):
    """Gradients of RMSNorm given ``dy = dL/dy``.

    With ``xhat = x * rstd`` and ``g = dy * weight``: ``c1 = mean(g * xhat)`` over the normalised
    dims, ``dx = rstd * (g - xhat * c1)``, and ``dweight = sum(dy * xhat)`` over the rows.

    Parameters
    ----------
    dy : ndarray of the forward output's shape and dtype
        Any layout.
    ctx : RMSNormContext
        From :func:`rms_norm_forward`.
    out : ndarray, optional
        Preallocated ``dx`` (same rules as the forward ``out``).
    needs : None or (bool, bool)
        Which of ``(dx, dweight)`` to compute; False entries are returned as None and their
        work is skipped.

    Returns
    -------
    dx : ndarray like x, or None
        None when not needed.
    dweight : ndarray of shape normalized_shape, or None
        None without weight or when not needed.  Reduced over rows in a fixed order: identical
        for any thread count.

    Raises
    ------
    TypeError
        ``ctx`` is not an RMSNormContext, dy has the wrong dtype, ``needs`` is malformed.
    ValueError
        dy of the wrong shape, a bad ``out`` (or an ``out`` when dx is not needed), a context
        that is not what the forward saved.

    See Also
    --------
    rms_norm_forward, normffn.reference.rms_norm_backward

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> rng = np.random.default_rng(1)
    >>> x, w = rng.standard_normal((5, 6)), rng.standard_normal(6)
    >>> y, ctx = normffn.rms_norm_forward(x, 6, w)
    >>> dy = rng.standard_normal(y.shape)
    >>> dx, dw = normffn.rms_norm_backward(dy, ctx)
    >>> _, rctx = normffn.reference.rms_norm_forward(x, 6, w)
    >>> rdx, rdw = normffn.reference.rms_norm_backward(dy, rctx)
    >>> bool(np.allclose(dx, rdx)), bool(np.allclose(dw, rdw))
    (True, True)
    """
    if needs is None:
        fast = _fast_backward(dy, ctx, out)
        if fast is not None:
            return fast
    ctx = _checks.context(ctx, RMSNormContext, "rms_norm")
    ctx.validate()
    x, weight, rstd, nshape = ctx.x, ctx.weight, ctx.rstd, ctx.normalized_shape
    want_dx, want_dw = _checks.needs(needs, _GRAD_NAMES, (True, weight is not None))
    shape, dtype = x.shape, x.dtype
    dy = _checks.grad_output(dy, shape, dtype)
    dx = None
    if want_dx:
        dx = _checks.new_or_out(out, "out", shape, dtype, inputs=(dy, x, weight, rstd))
    elif out is not None:
        raise ValueError("out is given but dx is not needed (needs[0] is False)")
    dweight = np.empty(nshape, dtype=dtype) if want_dw else None
    if len(shape) == 2 and len(nshape) == 1:   # already (n, d) and (d,): no views to make
        run_rms_norm_backward(np.ascontiguousarray(dy), x, weight, rstd, dx, dweight)
        return dx, dweight
    n, d = ctx.rstd.size, math.prod(ctx.normalized_shape)
    run_rms_norm_backward(np.ascontiguousarray(dy).reshape(n, d), ctx.x.reshape(n, d),
                          None if ctx.weight is None else ctx.weight.reshape(d),
                          ctx.rstd.reshape(n), None if dx is None else dx.reshape(n, d),
                          None if dweight is None else dweight.reshape(d))
    return dx, dweight
