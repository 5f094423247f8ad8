"""LayerNorm: ``y = (x - mean) / sqrt(var + eps) * weight + bias`` over the trailing dims.

Signatures follow ``torch.nn.functional.layer_norm``; arrays are NumPy arrays.

Layers (see docs/architecture.md):

* ``check_forward`` / ``check_backward`` validate the caller's arguments (via ``_checks``) and
  return them in kernel shape: C-contiguous ``(n, d)`` matrices, ``(d,)`` parameters, ``(n,)``
  float64 statistics.
* ``run_forward`` / ``run_backward`` trust their arguments: they allocate what is missing,
  decide streaming (``_tuning.stream_threshold``), take scratch from ``_workspace`` and call the
  kernel.  Fused ops (add_layer_norm, ffn_block) call them directly, without validating again.
* ``layer_norm``, ``layer_norm_forward``, ``layer_norm_backward`` compose the two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import _checks, _tuning
from ._checks import F64, _ndarray
from ._context import Context, Field
from ._kernels import layer_norm as _kernel
from ._workspace import workspace

__all__ = ["LayerNormContext", "layer_norm", "layer_norm_forward", "layer_norm_backward",
           "check_forward", "run_forward", "check_backward", "run_backward"]


def _lead(ctx) -> tuple:
    """The leading (row) dims of ctx.x; raises if x does not end in normalized_shape."""
    ns = ctx.normalized_shape
    if not isinstance(ns, tuple) or not all(isinstance(s, int) and s > 0 for s in ns):
        raise ValueError(f"ctx.normalized_shape must be a tuple of positive ints, got {ns!r}")
    x, k = ctx.x, len(ns)
    if x.ndim < k or tuple(x.shape[x.ndim - k:]) != ns:
        raise ValueError(f"ctx is inconsistent: ctx.x has shape {x.shape}, which does not end "
                         f"in normalized_shape {ns}")
    return x.shape[:x.ndim - k]


@dataclass(frozen=True, eq=False)
class LayerNormContext(Context):
    """What :func:`layer_norm_backward` needs; returned by :func:`layer_norm_forward`.

    A frozen dataclass.  Its statistics are public so comparison scripts can check them against
    other libraries.

    Attributes
    ----------
    mean, rstd : ndarray of shape ``x.shape[:x.ndim - len(normalized_shape)]``
        Per-row mean and ``1 / sqrt(var + eps)`` (biased variance) — the same values as the
        2nd and 3rd outputs of ``torch.native_layer_norm``, squeezed.  Always float64: a
        float32 mean of a row of ``1e4 + noise`` is off by up to half an ulp of 1e4, which
        would cost backward (which recomputes ``xhat`` from it) three digits.
    normalized_shape : tuple of int
        The normalised trailing dims.
    eps : float
        As given to the forward.
    x : ndarray
        C-contiguous, the forward input's shape (backward recomputes ``xhat`` from it).
    weight, bias : ndarray of shape ``normalized_shape``, or None
        As given to the forward.

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> x = np.arange(6, dtype=np.float32).reshape(2, 3)
    >>> _, ctx = normffn.layer_norm_forward(x, 3)
    >>> ctx.mean.tolist(), ctx.normalized_shape, ctx.shape, ctx.dtype
    ([1.0, 4.0], (3,), (2, 3), dtype('float32'))
    """

    x: np.ndarray
    weight: np.ndarray | None
    bias: np.ndarray | None
    normalized_shape: tuple
    eps: float
    mean: np.ndarray
    rstd: np.ndarray

    _op = "layer_norm"
    _fields = (
        Field("x", kind="input"),
        Field("mean", kind="float64", shape=_lead),
        Field("rstd", kind="float64", shape=_lead),
        Field("weight", kind="like_x", shape=lambda c: c.normalized_shape, optional=True),
        Field("bias", kind="like_x", shape=lambda c: c.normalized_shape, optional=True),
    )

    def _valid_fast(self) -> int:
        """The common case of :meth:`validate` (see ``Context._valid_fast``): a 1-D
        normalized_shape, every array an exact ndarray of the expected dtype, shape, layout;
        2 when every array also owns its memory."""
        return _checks.fast_row_context(self.x, self.normalized_shape, self.rstd, (self.mean,),
                                        (self.weight, self.bias))

    def rows(self) -> tuple[int, int]:
        """(n, d): the number of rows and the row length the kernels see."""
        return math.prod(_lead(self)), math.prod(self.normalized_shape)


# ---------------------------------------------------------------- forward
class ForwardArgs(NamedTuple):
    """:func:`check_forward`'s result.  ``x2``, ``w1``, ``b1``, ``y2`` are kernel-shaped views
    of ``x``, ``weight``, ``bias``, ``y``; ``lead`` is the shape of ``mean``/``rstd``."""

    x: np.ndarray            # C-contiguous, the caller's shape (what the context keeps)
    weight: np.ndarray | None
    bias: np.ndarray | None
    nshape: tuple
    eps: float
    y: np.ndarray            # the output: the caller's ``out`` or a new array
    lead: tuple
    x2: np.ndarray           # (n, d)
    w1: np.ndarray | None    # (d,)
    b1: np.ndarray | None    # (d,)
    y2: np.ndarray           # (n, d)


def check_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, out=None) -> ForwardArgs:
    """Validate LayerNorm forward arguments and return them in kernel shape (see ForwardArgs).

    A non-contiguous ``x`` is copied once (that copy is what backward reads).  Raises as
    :func:`layer_norm_forward` documents; on error nothing has been written.
    """
    x, nshape, lead = _checks.row_input(x, normalized_shape)
    dtype = x.dtype
    weight = _checks.optional_param(weight, "weight", nshape, dtype)
    bias = _checks.optional_param(bias, "bias", nshape, dtype)
    eps = _checks.eps(eps)
    y = _checks.new_or_out(out, "out", x.shape, dtype, inputs=(x, weight, bias))
    x = np.ascontiguousarray(x)
    if len(lead) == 1 and len(nshape) == 1:     # already (n, d) and (d,): no views to make
        return ForwardArgs(x, weight, bias, nshape, eps, y, lead, x, weight, bias, y)
    n, d = math.prod(lead), math.prod(nshape)
    return ForwardArgs(x, weight, bias, nshape, eps, y, lead, x.reshape(n, d),
                       None if weight is None else weight.reshape(d),
                       None if bias is None else bias.reshape(d), y.reshape(n, d))


def run_forward(x2, weight, bias, eps, y2=None, mean=None, rstd=None):
    """LayerNorm over the rows of ``x2``.  Trusts its arguments (no checks).

    x2 : C-contiguous (n, d) float32/float64, n >= 0, d >= 1
    weight, bias : C-contiguous (d,) of x2's dtype, or None
    eps : float >= 0
    y2 : C-contiguous (n, d) output of x2's dtype, not overlapping an input (None: allocated)
    mean, rstd : C-contiguous (n,) float64 outputs (None: allocated)

    Returns ``(y2, mean, rstd)``.
    """
    n = x2.shape[0]
    if y2 is None:
        y2 = np.empty_like(x2)
    if mean is None:
        mean = np.empty(n, np.float64)
    if rstd is None:
        rstd = np.empty(n, np.float64)
    if n > 0:
        _kernel.forward(y2, mean, rstd, x2, weight, bias, eps, _tuning.stream_for(y2))
    return y2, mean, rstd


def _fast_forward(x, ns, weight, bias, eps, out, keep: bool):
    """:func:`layer_norm_forward` (``keep``: returns ``(y, ctx)``) or :func:`layer_norm`
    (returns y) for the common call, or None for any other.  Common: x an exact, C-contiguous,
    aligned ndarray of the float32/float64 dtype objects; ``ns`` an int or a 1-tuple of int
    equal to x's last dim; weight and bias None or such arrays of shape (d,) and x's dtype; eps
    a float in [0, inf).  These are check_forward's checks, passed; on None nothing has been
    allocated, and the general path decides (and raises what it raises).  ``out`` is checked
    by the same helper as on the general path, which raises the same errors."""
    if type(eps) is not float or not 0.0 <= eps < math.inf:
        return None
    d = _checks.fast_rows(x, ns)
    if d is None:
        return None
    dt, shape, f = x.dtype, x.shape, x.flags
    pshape = (d,)
    w_owned = _checks.fast_param(weight, pshape, dt)
    b_owned = _checks.fast_param(bias, pshape, dt)
    if w_owned is None or b_owned is None:
        return None
    owned = f.owndata and w_owned and b_owned  # all own their memory: a distinct out is disjoint
    if out is None:
        y = np.empty(shape, dt)
    else:
        y = out
        if not (owned and type(out) is _ndarray and out.dtype is dt and out.shape == shape) or \
                not _checks.owned_c_array(out.flags) or out is x or out is weight or \
                out is bias:
            y = _checks.out_array(out, "out", shape, dt, (x, weight, bias))
    lead = shape[:-1]
    if not keep:                # statistics not kept: the kernel uses scratch for them
        if not x.size:
            return y
        if len(lead) == 1:
            _kernel.forward(y, None, None, x, weight, bias, eps, _tuning.stream_for(y))
        else:
            n = math.prod(lead)
            _kernel.forward(y.reshape(n, d), None, None, x.reshape(n, d), weight, bias, eps,
                            _tuning.stream_for(y))
        return y
    mean = np.empty(lead, F64)
    rstd = np.empty(lead, F64)
    if len(lead) == 1:
        run_forward(x, weight, bias, eps, y, mean, rstd)
    else:
        n = math.prod(lead)
        run_forward(x.reshape(n, d), weight, bias, eps, y.reshape(n, d), mean.reshape(n),
                    rstd.reshape(n))
    return y, LayerNormContext._build({"x": x, "weight": weight, "bias": bias,
                                       "normalized_shape": pshape, "eps": eps, "mean": mean,
                                       "rstd": rstd})


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """LayerNorm forward, keeping what backward needs.

    ``y = (x - mean) * rstd * weight + bias`` with ``mean`` and the biased variance ``var`` taken
    over the trailing ``normalized_shape`` dims of each row and ``rstd = 1 / sqrt(var + eps)``.

    Parameters
    ----------
    x : ndarray of shape ``(..., *normalized_shape)``, float32 or float64
        Any layout; a non-contiguous x is copied once (and that copy is kept for backward).
    normalized_shape : int or tuple of int
        The trailing dims to normalise over.
    weight, bias : ndarray of shape normalized_shape, same dtype as x, or None
        The affine parameters (``None``: no scale / no shift).
    eps : float, >= 0 and finite
        Added to the variance.
    out : ndarray of x's shape and dtype, C-contiguous, writeable, not overlapping an input
        Where to write y; reuse one across calls to avoid page-faulting a fresh output.

    Returns
    -------
    y : ndarray of x's shape and dtype
        ``out`` when given.
    ctx : LayerNormContext
        What :func:`layer_norm_backward` needs.  ``ctx.mean`` and ``ctx.rstd`` (float64) have
        shape ``x.shape[:x.ndim - len(normalized_shape)]``: the statistics
        ``torch.native_layer_norm`` returns.

    Raises
    ------
    TypeError
        Non-float dtypes (int, bool, float16, complex, object) or mixed dtypes.
    ValueError
        0-d x, normalized_shape not matching x's trailing dims, wrong weight/bias shape,
        eps negative or not finite, a bad ``out``.

    See Also
    --------
    layer_norm : the same without the context.
    layer_norm_backward : the gradients.
    normffn.reference.layer_norm_forward : the float64 reference.

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> x = np.arange(6, dtype=np.float32).reshape(2, 3)
    >>> y, ctx = normffn.layer_norm_forward(x, 3)
    >>> y.dtype, ctx.mean.dtype, ctx.mean.shape
    (dtype('float32'), dtype('float64'), (2,))
    >>> ctx.mean.tolist()
    [1.0, 4.0]
    >>> np.round(ctx.rstd, 4).tolist()                  # 1 / sqrt(2/3 + 1e-5)
    [1.2247, 1.2247]
    >>> y.astype(float).round(4).tolist()
    [[-1.2247, 0.0, 1.2247], [-1.2247, 0.0, 1.2247]]

    Normalising over the last two dims, with a preallocated output:

    >>> x = np.random.default_rng(0).standard_normal((4, 2, 3))
    >>> out = np.empty_like(x)
    >>> y, ctx = normffn.layer_norm_forward(x, (2, 3), out=out)
    >>> y is out, ctx.rstd.shape
    (True, (4,))
    >>> bool(np.allclose(y.reshape(4, -1).mean(axis=1), 0.0))
    True
    """
    fast = _fast_forward(x, normalized_shape, weight, bias, eps, out, True)
    if fast is not None:
        return fast
    a = check_forward(x, normalized_shape, weight, bias, eps, out)
    lead = a.lead
    mean = np.empty(lead, F64)
    rstd = np.empty(lead, F64)
    if len(lead) == 1:
        run_forward(a.x2, a.w1, a.b1, a.eps, a.y2, mean, rstd)
    else:
        run_forward(a.x2, a.w1, a.b1, a.eps, a.y2, mean.reshape(-1), rstd.reshape(-1))
    ctx = LayerNormContext._build({"x": a.x, "weight": a.weight, "bias": a.bias,
                                   "normalized_shape": a.nshape, "eps": a.eps, "mean": mean,
                                   "rstd": rstd})
    return a.y, ctx


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """LayerNorm over the trailing ``normalized_shape`` dims, as ``torch.nn.functional.layer_norm``.

    ``y = (x - mean) * rstd * weight + bias`` with ``mean`` and the biased variance ``var`` over
    the trailing dims and ``rstd = 1 / sqrt(var + eps)``; the statistics are computed in float64
    (two-pass, blocked sums) whatever the input dtype.  Keeps nothing for backward: use
    :func:`layer_norm_forward` when you need gradients.

    Parameters
    ----------
    x : ndarray of shape ``(..., *normalized_shape)``, float32 or float64
        Any layout (a non-contiguous x is read through one contiguous copy).
    normalized_shape : int or tuple of int
        The trailing dims to normalise over.
    weight, bias : ndarray of shape normalized_shape, same dtype as x, or None
        The affine parameters (``None``: no scale / no shift).
    eps : float, >= 0 and finite
        Added to the variance.
    out : ndarray of x's shape and dtype, C-contiguous, writeable, not overlapping an input
        Where to write y; reuse one across calls to avoid page-faulting a fresh output.

    Returns
    -------
    y : ndarray of x's shape and dtype
        ``out`` when given.

    Raises
    ------
    TypeError
        Non-float dtypes (int, bool, float16, complex, object) or mixed dtypes.
    ValueError
        0-d x, normalized_shape not matching x's trailing dims, wrong weight/bias shape,
        eps negative or not finite, a bad ``out``.

    See Also
    --------
    layer_norm_forward, layer_norm_backward, normffn.reference.layer_norm

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> x = np.arange(6, dtype=np.float32).reshape(2, 3)
    >>> y = normffn.layer_norm(x, 3)
    >>> y.shape, y.dtype
    ((2, 3), dtype('float32'))
    >>> y.astype(float).round(4).tolist()
    [[-1.2247, 0.0, 1.2247], [-1.2247, 0.0, 1.2247]]

    With weight and bias, checked against the float64 reference:

    >>> w = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    >>> b = np.array([0.5, 0.0, -0.5], dtype=np.float32)
    >>> y = normffn.layer_norm(x, 3, w, b)
    >>> bool(np.allclose(y, normffn.reference.layer_norm(x, 3, w, b), atol=1e-6))
    True

    A row of ``1e4 + small noise`` still normalises to float32 accuracy:

    >>> x = (1e4 + 0.1 * np.random.default_rng(0).standard_normal((8, 768))).astype(np.float32)
    >>> err = np.abs(normffn.layer_norm(x, 768) - normffn.reference.layer_norm(x, 768)).max()
    >>> bool(err < 1e-5)
    True
    """
    fast = _fast_forward(x, normalized_shape, weight, bias, eps, out, False)
    if fast is not None:
        return fast
    return layer_norm_forward(x, normalized_shape, weight, bias, eps, out=out)[0]


# ---------------------------------------------------------------- backward
_GRAD_NAMES = ("dx", "dweight", "dbias")

class BackwardArgs(NamedTuple):
    """:func:`check_backward`'s result: kernel-shaped views and which gradients to compute."""

    dx: np.ndarray | None    # the output dx (caller's shape), None when not needed
    dx2: np.ndarray | None   # (n, d) view of dx
    dy2: np.ndarray          # (n, d), C-contiguous
    x2: np.ndarray           # (n, d)
    w1: np.ndarray | None    # (d,)
    mean: np.ndarray         # (n,) float64
    rstd: np.ndarray         # (n,) float64
    nshape: tuple
    need_dx: bool
    need_dweight: bool
    need_dbias: bool


def check_backward(dy, ctx, out=None, needs=None) -> BackwardArgs:
    """Validate LayerNorm backward arguments (``ctx.validate()`` included) and return them in
    kernel shape.  ``needs`` as in :func:`layer_norm_backward`; ``out`` is checked only when dx
    is needed."""
    ctx = _checks.context(ctx, LayerNormContext, "layer_norm")
    ctx.validate()
    x, weight = ctx.x, ctx.weight
    need_dx, need_dw, need_db = _checks.needs(needs, _GRAD_NAMES,
                                              (True, weight is not None, ctx.bias is not None))
    shape, dtype = x.shape, x.dtype
    dy = _checks.grad_output(dy, shape, dtype)
    dx = None
    if need_dx:
        dx = _checks.new_or_out(out, "out", shape, dtype,
                                inputs=(dy, x, weight, ctx.mean, ctx.rstd))
    if len(shape) == 2 and len(ctx.normalized_shape) == 1:   # already (n, d): no views to make
        return BackwardArgs(dx, dx, np.ascontiguousarray(dy), x, weight, ctx.mean, ctx.rstd,
                            ctx.normalized_shape, need_dx, need_dw, need_db)
    n, d = ctx.rows()
    return BackwardArgs(dx, None if dx is None else dx.reshape(n, d),
                        np.ascontiguousarray(dy).reshape(n, d), ctx.x.reshape(n, d),
                        None if ctx.weight is None else ctx.weight.reshape(d),
                        ctx.mean.reshape(n), ctx.rstd.reshape(n), ctx.normalized_shape,
                        need_dx, need_dw, need_db)


def run_backward(dy2, x2, weight, mean, rstd, dx2=None, need_dx=True, need_dweight=True,
                 need_dbias=True):
    """LayerNorm backward over rows.  Trusts its arguments (no checks).

    dy2, x2 : C-contiguous (n, d) of one float dtype, n >= 0, d >= 1
    weight : C-contiguous (d,) or None (then there is no dweight: need_dweight must be False)
    mean, rstd : C-contiguous (n,) float64, as the forward produced them
    dx2 : C-contiguous (n, d) output not overlapping an input (None: allocated if need_dx)
    need_dx, need_dweight, need_dbias : which gradients to compute; the others are None and
        cost nothing (with need_dx False only the parameter sums run).

    Returns ``(dx2, dweight, dbias)`` with dweight/dbias of shape (d,), reduced over rows in a
    fixed order (identical for any thread count).
    """
    n, d = dy2.shape
    dtype = dy2.dtype
    dx2 = (np.empty_like(dy2) if dx2 is None else dx2) if need_dx else None
    dweight = np.empty(d, dtype) if need_dweight else None
    dbias = np.empty(d, dtype) if need_dbias else None
    if n == 0:
        for g in (dweight, dbias):
            if g is not None:
                g.fill(0)
        return dx2, dweight, dbias
    if not (need_dx or need_dweight or need_dbias):
        return dx2, dweight, dbias
    work = _kernel.scratch_size(n, d, need_dweight, need_dbias)
    stream = _tuning.stream_for(dx2) if need_dx else 0
    _kernel.backward(dx2, dweight, dbias, dy2, x2, weight, mean, rstd,
                     workspace("layer_norm_backward", work) if work else None, stream)
    return dx2, dweight, dbias


def _fast_backward(dy, ctx, out):
    """:func:`layer_norm_backward` with ``needs=None`` for the common call, or None for any
    other: ctx an exact LayerNormContext passing ``_valid_fast`` (the whole of ``validate``),
    dy an exact, C-contiguous, aligned ndarray of ctx.x's dtype object and shape.  ``out`` is
    checked by the general path's helper (same errors)."""
    if type(ctx) is not LayerNormContext or type(dy) is not _ndarray:
        return None
    valid = ctx._valid_fast()
    if not valid:
        return None
    x, weight, bias = ctx.x, ctx.weight, ctx.bias
    shape, dt = x.shape, x.dtype
    if dy.dtype is not dt or dy.shape != shape:
        return None
    f = dy.flags
    if not (f.c_contiguous and f.aligned):
        return None
    mean, rstd = ctx.mean, ctx.rstd
    n, d = mean.size, shape[-1]
    if not n:                   # no rows: the general path's zero-filled parameter gradients
        return None
    if out is None:
        dx = np.empty(shape, dt)
    else:
        dx = out
        if not (valid == 2 and f.owndata and type(out) is _ndarray and out.dtype is dt and
                out.shape == shape and _checks.owned_c_array(out.flags)) or \
                out is dy or out is x or out is weight:
            dx = _checks.out_array(out, "out", shape, dt, (dy, x, weight, mean, rstd))
    # run_backward's body for n >= 1 with dx needed
    need_w, need_b = weight is not None, bias is not None
    dweight = np.empty(d, dt) if need_w else None
    dbias = np.empty(d, dt) if need_b else None
    work = _kernel.scratch_size(n, d, need_w, need_b)
    if len(shape) == 2:
        _kernel.backward(dx, dweight, dbias, dy, x, weight, mean, rstd,
                         workspace("layer_norm_backward", work) if work else None,
                         _tuning.stream_for(dx))
    else:
        _kernel.backward(dx.reshape(n, d), dweight, dbias, dy.reshape(n, d), x.reshape(n, d),
                         weight, mean.reshape(n), rstd.reshape(n),
                         workspace("layer_norm_backward", work) if work else None,
                         _tuning.stream_for(dx))
    return dx, dweight, dbias


def layer_norm_backward(dy, ctx, *, out=None, needs=None):
    """Gradients of LayerNorm given ``dy = dL/dy``.

    With ``xhat = (x - mean) * rstd``, ``g = dy * weight``, ``c1 = mean(g * xhat)`` and
    ``c2 = mean(g)`` over the normalised dims: ``dx = rstd * (g - xhat * c1 - c2)``,
    ``dweight = sum(dy * xhat)`` and ``dbias = sum(dy)`` over the rows.

    Parameters
    ----------
    dy : ndarray of the forward output's shape and dtype
        Any layout.
    ctx : LayerNormContext
        From :func:`layer_norm_forward`.
    out : ndarray, optional
        Preallocated ``dx`` (same rules as the forward ``out``).
    needs : tuple of 3 bools (dx, dweight, dbias), optional
        Which gradients to compute; False entries are returned as None and their work is
        skipped.  Default: every gradient that exists (dweight/dbias only with weight/bias).

    Returns
    -------
    dx : ndarray like x, or None
        None when not needed.
    dweight, dbias : ndarray of shape normalized_shape, or None
        None where weight/bias were None or not needed.  Reduced over rows in a fixed order:
        identical for any thread count.

    Raises
    ------
    TypeError
        ``ctx`` is not a LayerNormContext, dy has the wrong dtype, ``needs`` is malformed.
    ValueError
        dy of the wrong shape, a bad ``out``, a context that is not what the forward saved.

    See Also
    --------
    layer_norm_forward, normffn.reference.layer_norm_backward

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((4, 8))
    >>> w, b = rng.standard_normal(8), rng.standard_normal(8)
    >>> y, ctx = normffn.layer_norm_forward(x, 8, w, b)
    >>> dy = rng.standard_normal(y.shape)
    >>> dx, dw, db = normffn.layer_norm_backward(dy, ctx)
    >>> dx.shape, dw.shape, db.shape
    ((4, 8), (8,), (8,))
    >>> bool(np.allclose(db, dy.sum(axis=0)))
    True
    >>> _, ref_ctx = normffn.reference.layer_norm_forward(x, 8, w, b)
    >>> ref = normffn.reference.layer_norm_backward(dy, ref_ctx)
    >>> all(bool(np.allclose(a, r)) for a, r in zip((dx, dw, db), ref))
    True

    Only the parameter gradients (a frozen input), so no dx pass runs:

    >>> normffn.layer_norm_backward(dy, ctx, needs=(False, True, True))[0] is None
    True
    """
    if needs is None:
        fast = _fast_backward(dy, ctx, out)
        if fast is not None:
            return fast
    a = check_backward(dy, ctx, out, needs)
    _, dweight, dbias = run_backward(a.dy2, a.x2, a.w1, a.mean, a.rstd, a.dx2, a.need_dx,
                                     a.need_dweight, a.need_dbias)
    nshape = a.nshape
    if len(nshape) == 1:                        # (d,) already: no views to make
        return a.dx, dweight, dbias
    return (a.dx,
            None if dweight is None else dweight.reshape(nshape),
            None if dbias is None else dbias.reshape(nshape))
