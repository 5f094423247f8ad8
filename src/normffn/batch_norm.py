"""BatchNorm: ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per channel (axis 1).

Signatures follow ``torch.nn.functional.batch_norm``; arrays are NumPy arrays.  Two memory
layouts run without a copy — C-contiguous ``(N, C, *spatial)`` (PyTorch's NCHW) and
channels-last (a transposed view of a C-contiguous ``(N, *spatial, C)`` array, such as
``x_nhwc.transpose(0, 3, 1, 2)``, PyTorch's ``channels_last``) — and outputs come back in the
input's layout.  Any other strides cost one copy.

``check_forward`` / ``check_backward`` validate and normalise arguments; ``run_forward`` /
``run_backward`` trust them, allocate and call the kernels (fused ops call these directly); the
public functions compose the two.

The phases below are public, for data that arrives in chunks (``normffn.dask``, streaming
statistics)::

    parts = [partial_stats(chunk) for chunk in chunks]        # per chunk (count, mean, M2)
    count, mean, m2 = merge_stats(parts)                      # fixed-order Chan merge
    mean, var, rstd = finalize_stats(count, mean, m2, eps)
    update_running_stats(running_mean, running_var, mean, var, count, momentum)
    ys = [apply(chunk, mean, rstd, weight, bias) for chunk in chunks]
    # backward
    sums = [backward_sums(dy_k, x_k, mean) for ...]           # per chunk (sdy, sdyx)
    sdy, sdyx = sum in a fixed order;  dweight = (sdyx * rstd).astype(dtype), dbias = sdy...
    dxs = [backward_apply(dy_k, x_k, mean, rstd, weight, sdy, sdyx, count, True) for ...]

With a single chunk the phases give exactly the one-call results; over several chunks the
statistics agree with the one-call ones to a few ulps (the merge order differs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np

from . import _checks, _tuning
from ._context import Context, Field
from ._kernels import batch_norm as _kernel
from ._workspace import workspace

__all__ = ["BatchNormContext", "batch_norm", "batch_norm_forward", "batch_norm_backward",
           "partial_stats", "merge_stats", "finalize_stats", "update_running_stats", "apply",
           "backward_sums", "backward_apply"]

# ---------------------------------------------------------------- tuning
# (N, C, S) inputs with S below _SMALL_S (and C*S at most _SMALL_S_MAX_WIDTH) run as an
# (N, C*S) matrix through the column kernel: per-run calls on a few values would cost more
# (set when the kernels were written; no recorded sweep).
_SMALL_S = 16
_SMALL_S_MAX_WIDTH = 1 << 16


def _stream(out: np.ndarray, xk: np.ndarray) -> int:
    """Stream the output (non-temporal stores) in the rows kernel when it is at least
    _tuning.stream_threshold() bytes.  The column kernel never streams (measured 0-15% slower)."""
    return int(xk.ndim == 3 and out.nbytes >= _tuning.stream_threshold())


# ---------------------------------------------------------------- layouts
def _is_channels_last(a: np.ndarray) -> bool:
    """True if ``a`` (ndim >= 3) is a channels-last view (C-contiguous once axis 1 goes last) and
    not also plainly C-contiguous."""
    return a.ndim >= 3 and not a.flags.c_contiguous and np.moveaxis(a, 1, -1).flags.c_contiguous


def _in_kernel_layout(a: np.ndarray) -> np.ndarray:
    """``a`` itself if it is C-contiguous or channels-last, else a C-contiguous copy."""
    return a if _is_channels_last(a) else np.ascontiguousarray(a)


def _like_layout(a: np.ndarray, channels_last: bool) -> np.ndarray:
    """``a`` in the given layout (copied once if it is not)."""
    if channels_last:
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)
    return np.ascontiguousarray(a)


def _empty(shape: tuple, dtype, channels_last: bool) -> np.ndarray:
    if not channels_last:
        return np.empty(shape, dtype=dtype)
    return np.moveaxis(np.empty(shape[:1] + shape[2:] + shape[1:2], dtype=dtype), -1, 1)


def _check_out(out, name: str, shape: tuple, dtype, channels_last: bool, inputs) -> None:
    """Check the caller's ``out`` is in the layout the kernel writes."""
    if not channels_last:
        _checks.out_array(out, name, shape, dtype, inputs=inputs)
        return
    moved = shape[:1] + shape[2:] + shape[1:2]
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} has shape {out.shape}, expected {tuple(shape)}")
    if out.dtype != dtype:
        raise ValueError(f"{name} has dtype {out.dtype}, expected {dtype}")
    if not np.moveaxis(out, 1, -1).flags.c_contiguous:
        raise ValueError(f"{name} must be channels-last like x: a transposed view of a "
                         f"C-contiguous array of shape {moved}, such as "
                         f"np.moveaxis(np.empty({moved}), -1, 1)")
    _checks.out_array(np.moveaxis(out, 1, -1), name, moved, dtype, inputs=inputs)


def _kernel_view(a: np.ndarray, channels_last: bool):
    """(view for the kernel, S passed to it): 3-D (N, C, S) for the rows kernel, 2-D (M, K)
    for the column kernel (K = C*S, channel of column k is k // S)."""
    N, C = a.shape[:2]
    S = math.prod(a.shape[2:])
    if channels_last:
        return np.moveaxis(a, 1, -1).reshape(N * S, C), 1
    if S == 1:
        return a.reshape(N, C), 1
    if S < _SMALL_S and C * S <= _SMALL_S_MAX_WIDTH:
        return a.reshape(N, C * S), S
    return a.reshape(N, C, S), S


def _scratch(xk: np.ndarray, s: int):
    """The kernels' scratch: per-channel constants (x's dtype) and float64 block partials."""
    n_consts, n_parts = _kernel.scratch_sizes(xk, s)
    return (workspace("batch_norm.consts", n_consts, xk.dtype),
            workspace("batch_norm.parts", n_parts, np.float64))


def _count(x: np.ndarray) -> int:
    """Values per channel: N * prod(spatial)."""
    return x.shape[0] * math.prod(x.shape[2:])


# ---------------------------------------------------------------- context
def _channels(ctx) -> tuple:
    return (ctx.x.shape[1],)


def _x_layout(a: np.ndarray) -> bool:
    return a.ndim >= 2 and (a.flags.c_contiguous or _is_channels_last(a))


@dataclass(frozen=True, eq=False)
class BatchNormContext(Context):
    """What :func:`batch_norm_backward` needs; returned by :func:`batch_norm_forward`.

    Attributes
    ----------
    mean, rstd : ndarray of shape (C,), float64
        Training: the batch mean and ``1 / sqrt(biased_var + eps)`` (the ``save_mean`` and
        ``save_invstd`` of ``torch.native_batch_norm``).  Eval: the running mean and
        ``1 / sqrt(running_var + eps)``.  Always float64, as in LayerNormContext: a float32
        mean of data offset by 1e3 is off by ~1e-4, which backward (it recomputes ``xhat``
        from it) would pay for.
    x : ndarray
        The forward input's shape, C-contiguous or channels-last (backward recomputes ``xhat``
        from it and returns dx in its layout).
    weight, bias : ndarray of shape (C,) or None
        As given to the forward.
    eps : float
        As given to the forward.
    training : bool
        Whether the forward normalised with batch statistics.

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> x = np.arange(12, dtype=np.float32).reshape(3, 2, 2)     # N=3, C=2, L=2
    >>> _, ctx = normffn.batch_norm_forward(x, None, None, training=True)
    >>> ctx.mean.tolist(), ctx.training, ctx.channels_last
    ([4.5, 6.5], True, False)
    """

    _op: ClassVar[str] = "batch_norm"
    _fields: ClassVar[tuple] = (
        Field("x", "input", layout=_x_layout),
        Field("weight", "like_x", shape=_channels, optional=True),
        Field("bias", "like_x", shape=_channels, optional=True),
        Field("training", "bool"),
        Field("mean", "float64", shape=_channels),
        Field("rstd", "float64", shape=_channels),
    )

    x: np.ndarray
    weight: np.ndarray | None
    bias: np.ndarray | None
    eps: float
    training: bool
    mean: np.ndarray
    rstd: np.ndarray

    @property
    def channels_last(self) -> bool:
        return _is_channels_last(self.x)


# ---------------------------------------------------------------- forward: check / run
def _running_stat(a, name: str, C: int, dtype: np.dtype) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place), got "
                        f"{type(a).__name__}")
    _checks.same_dtype(dtype, name, a)
    if a.shape != (C,):
        raise ValueError(f"{name} has shape {a.shape}, expected ({C},) (the channels of x)")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (it is updated in place)")
    if not a.flags.writeable:
        raise ValueError(f"{name} must be writeable (it is updated in place)")
    if not a.flags.aligned:
        raise ValueError(f"{name} must be aligned to its itemsize (it is updated in place)")
    return a


def _channel_input(x, name: str = "x") -> np.ndarray:
    x = _checks.float_array(x, name)
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (N, C, *spatial) with rank >= 2, got shape "
                         f"{x.shape}")
    return x


def check_forward(x, running_mean, running_var, weight=None, bias=None, training=False,
                  momentum=0.1, eps=1e-5, out=None) -> tuple:
    """Validate the arguments of :func:`batch_norm_forward` (see it for the rules).

    Returns ``(x, running_mean, running_var, weight, bias, training, momentum, eps, out)``
    ready for :func:`run_forward`: x C-contiguous or channels-last, parameters C-contiguous,
    training a bool, momentum and eps floats, out checked (or None).  Raises before any state
    changes.
    """
    x = _channel_input(x)
    dtype = x.dtype
    N, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    weight = _checks.optional_param(weight, "weight", (C,), dtype)
    bias = _checks.optional_param(bias, "bias", (C,), dtype)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together or both be None")
    if running_mean is not None:
        running_mean = _running_stat(running_mean, "running_mean", C, dtype)
        running_var = _running_stat(running_var, "running_var", C, dtype)
        if _checks._overlaps(running_mean, running_var):
            raise ValueError("running_mean and running_var overlap; pass separate arrays")
        for a, name in ((x, "x"), (weight, "weight"), (bias, "bias")):
            for r, rname in ((running_mean, "running_mean"), (running_var, "running_var")):
                if a is not None and _checks._overlaps(r, a):
                    raise ValueError(f"{rname} overlaps {name}; pass separate arrays")
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    training = bool(training)
    momentum = _checks.finite_float(momentum, "momentum", low=0.0, high=1.0)
    eps = _checks.finite_float(eps, "eps", low=0.0, low_inclusive=not training)
    if training and N * S <= 1:
        raise ValueError(f"training needs more than 1 value per channel, got x of shape "
                         f"{x.shape} ({N * S} value(s) per channel)")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    x = _in_kernel_layout(x)
    if out is not None:
        _check_out(out, "out", x.shape, dtype, _is_channels_last(x),
                   inputs=(x, weight, bias, running_mean, running_var))
    return x, running_mean, running_var, weight, bias, training, momentum, eps, out


def update_running_stats(running_mean: np.ndarray, running_var: np.ndarray, mean: np.ndarray,
                         var: np.ndarray, count, momentum: float) -> None:
    """Update running statistics in place, as PyTorch does.

    ``running_mean = (1 - momentum) * running_mean + momentum * mean`` and
    ``running_var = (1 - momentum) * running_var + momentum * unbiased_var`` with
    ``unbiased_var = var * (count / (count - 1))``.  The arithmetic is NumPy's, in the running
    stats' dtype promoted with float64 ``mean`` and ``var`` (exactly what
    :func:`batch_norm_forward` does).  Trusts its arguments.

    Parameters
    ----------
    running_mean, running_var : ndarray of shape (C,)
        Updated in place.
    mean, var : ndarray of shape (C,), float64
        The batch mean and biased variance (from :func:`finalize_stats`).
    count : float or ndarray
        Values per channel in the batch, > 1.
    momentum : float
        Weight of the batch statistics.

    Returns
    -------
    None

    Examples
    --------
    >>> import numpy as np
    >>> from normffn.batch_norm import update_running_stats
    >>> rm, rv = np.zeros(2), np.ones(2)
    >>> update_running_stats(rm, rv, np.array([1.0, 2.0]), np.array([2.0, 2.0]), 3, 0.5)
    >>> rm.tolist(), rv.tolist()                    # unbiased var = 2 * 3 / 2 = 3
    ([0.5, 1.0], [2.0, 2.0])
    """
    with np.errstate(invalid="ignore", over="ignore"):
        new_mean = (1.0 - momentum) * running_mean + momentum * mean
        new_var = (1.0 - momentum) * running_var + momentum * (var * (count / (count - 1)))
    running_mean[...] = new_mean
    running_var[...] = new_var


def run_forward(x, running_mean, running_var, weight, bias, training: bool, momentum: float,
                eps: float, out=None):
    """BatchNorm forward on arguments :func:`check_forward` returned; trusts its arguments.
    Returns ``(y, ctx)``; updates the running stats in training."""
    dtype = x.dtype
    C = x.shape[1]
    channels_last = _is_channels_last(x)
    y = out if out is not None else _empty(x.shape, dtype, channels_last)
    if training:
        mean64 = np.zeros(C)
        var64 = np.zeros(C)
    else:
        mean64 = running_mean.astype(np.float64)
        var64 = running_var.astype(np.float64)
    rstd64 = np.empty(C)
    if x.size > 0:
        xk, s = _kernel_view(x, channels_last)
        yk, _ = _kernel_view(y, channels_last)
        consts, parts = _scratch(xk, s)
        _kernel.forward(yk, mean64, var64, rstd64, xk, weight, bias, eps, training, s,
                        _stream(y, xk), consts, parts)
    else:
        _kernel.rstd_from_var(rstd64, var64, eps)
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, mean64, var64, _count(x), momentum)
    ctx = BatchNormContext._build({"x": x, "weight": weight, "bias": bias, "eps": eps,
                                   "training": training, "mean": mean64, "rstd": rstd64})
    return y, ctx


def batch_norm_forward(x, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5, *, out=None):
    """BatchNorm forward, keeping what backward needs.

    Parameters
    ----------
    x : ndarray of shape ``(N, C, *spatial)``, float32 or float64
        Channels on axis 1: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ...  C-contiguous and
        channels-last arrays are used in place; other layouts are copied once.
    running_mean, running_var : ndarray of shape (C,) and x's dtype, or both None
        C-contiguous and writeable (they are the module's state, updated in place in training;
        the same rules hold in eval, where they are only read).  Required in eval.
    weight, bias : ndarray of shape (C,), x's dtype, or None
        The affine parameters.
    training : bool
        True: normalise with the batch mean and biased variance over ``(N, *spatial)`` and, if
        running stats are given, update them in place:
        ``running_mean = (1 - momentum) * running_mean + momentum * mean``,
        ``running_var = (1 - momentum) * running_var + momentum * unbiased_var``.
        False: normalise with the running stats.
    momentum : float in [0, 1]
        Weight of the batch statistics in the running-stat update.
    eps : float, finite; > 0 in training, >= 0 in eval
        Added to the variance.
    out : ndarray, optional
        Of x's shape and dtype, writeable, not overlapping an input, in the layout y will have:
        C-contiguous, or channels-last when x is channels-last (for example
        ``np.moveaxis(np.empty((N, H, W, C)), -1, 1)``).  Reuse one across calls to avoid
        page-faulting a fresh output.

    Returns
    -------
    y : ndarray of x's shape and dtype
        In x's layout (channels-last in, channels-last out; any other layout: C-contiguous).
    ctx : BatchNormContext
        ``ctx.mean``/``ctx.rstd`` (shape (C,)): batch stats in training, running stats in eval.

    Raises
    ------
    TypeError
        Non-float or mixed dtypes; running stats that are not ndarrays; non-real momentum/eps;
        non-bool training.
    ValueError
        x of rank < 2; a channel-count mismatch; only one of the running stats, or none in
        eval; running stats that are read-only, non-contiguous or overlap; momentum outside
        [0, 1]; eps not finite, or <= 0 in training; training with at most one value per
        channel (``N * prod(spatial) <= 1``); a bad ``out``.
        On any error nothing is computed and the running stats are untouched.

    See Also
    --------
    batch_norm, batch_norm_backward, normffn.reference.batch_norm_forward

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> x = np.arange(12, dtype=np.float32).reshape(3, 2, 2)     # N=3, C=2, L=2
    >>> rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    >>> y, ctx = normffn.batch_norm_forward(x, rm, rv, training=True, momentum=0.5)
    >>> ctx.mean.tolist()                                         # channel 0: 0, 1, 4, 5, 8, 9
    [4.5, 6.5]
    >>> rm.tolist()                                               # 0.5 * 0 + 0.5 * mean
    [2.25, 3.25]
    >>> rv.astype(float).round(4).tolist()                        # 0.5 + 0.5 * 13.1 (unbiased)
    [7.05, 7.05]
    >>> bool(np.allclose(y.mean(axis=(0, 2)), 0.0, atol=1e-6))
    True

    Channels-last in, channels-last out:

    >>> x_nhwc = np.random.default_rng(0).standard_normal((2, 4, 4, 3))
    >>> x = x_nhwc.transpose(0, 3, 1, 2)                          # (N, C, H, W) view
    >>> y, _ = normffn.batch_norm_forward(x, None, None, training=True)
    >>> y.shape, y.flags.c_contiguous, np.moveaxis(y, 1, -1).flags.c_contiguous
    ((2, 3, 4, 4), False, True)
    """
    return run_forward(*check_forward(x, running_mean, running_var, weight, bias, training,
                                      momentum, eps, out))


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, out=None):
    """BatchNorm over channels (axis 1), as ``torch.nn.functional.batch_norm``.

    ``y = (x - mean) * rstd * weight + bias`` per channel, ``rstd = 1 / sqrt(var + eps)``.
    Training: the batch mean and biased variance over ``(N, *spatial)``, and the running stats
    (if given) updated in place with the unbiased variance, as PyTorch does.  Eval: the running
    stats.  Keeps nothing for backward (see :func:`batch_norm_forward`).

    Parameters
    ----------
    x : ndarray of shape ``(N, C, *spatial)``, float32 or float64
        C-contiguous or channels-last (used in place); other layouts are copied once.
    running_mean, running_var : ndarray of shape (C,) and x's dtype, or both None
        Updated in place in training; required in eval.
    weight, bias : ndarray of shape (C,), x's dtype, or None
        The affine parameters.
    training : bool
        Batch statistics (True) or running statistics (False).
    momentum : float in [0, 1]
        Weight of the batch statistics in the running-stat update.
    eps : float, finite; > 0 in training, >= 0 in eval
        Added to the variance.
    out : ndarray, optional
        Preallocated y, in the layout y will have (see :func:`batch_norm_forward`).

    Returns
    -------
    y : ndarray of x's shape and dtype
        In x's layout.

    Raises
    ------
    TypeError
        Non-float or mixed dtypes, running stats that are not ndarrays, non-bool training.
    ValueError
        As :func:`batch_norm_forward`; on any error the running stats are untouched.

    See Also
    --------
    batch_norm_forward, batch_norm_backward, normffn.reference.batch_norm

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])                  # N=2, C=2
    >>> rm, rv = np.zeros(2), np.ones(2)
    >>> y = normffn.batch_norm(x, rm, rv, training=True, eps=1e-12)
    >>> np.round(y, 6).tolist()
    [[-1.0, -1.0], [1.0, 1.0]]
    >>> np.round(rm, 6).tolist(), np.round(rv, 6).tolist()       # momentum 0.1, unbiased var
    ([0.2, 2.0], [1.1, 20.9])

    Eval uses the running statistics:

    >>> y = normffn.batch_norm(x, np.array([1.0, 10.0]), np.array([4.0, 100.0]), eps=0.0)
    >>> y.tolist()
    [[0.0, 0.0], [1.0, 2.0]]
    """
    return batch_norm_forward(x, running_mean, running_var, weight, bias, training, momentum,
                              eps, out=out)[0]


# ---------------------------------------------------------------- backward: check / run
def _needs(needs, ctx) -> tuple[bool, bool, bool]:
    """(need_dx, need_dweight, need_dbias): entries for absent parameters are False."""
    has = (True, ctx.weight is not None, ctx.bias is not None)
    if needs is None:
        return has
    try:
        t = tuple(needs)
    except TypeError:
        raise TypeError(f"needs must be a tuple of 3 bools (dx, dweight, dbias), got "
                        f"{type(needs).__name__}") from None
    if len(t) != 3 or not all(isinstance(v, (bool, np.bool_)) for v in t):
        raise ValueError(f"needs must be a tuple of 3 bools (dx, dweight, dbias), got {t!r}")
    return tuple(bool(v) and h for v, h in zip(t, has))


def check_backward(dy, ctx, out=None, needs=None) -> tuple:
    """Validate the arguments of :func:`batch_norm_backward`.

    Returns ``(dy, ctx, out, (need_dx, need_dweight, need_dbias))`` with dy in ``ctx.x``'s
    layout (copied once if it was not) and out checked (or None; ignored if dx is not needed).
    """
    ctx = _checks.context(ctx, BatchNormContext, "batch_norm")
    ctx.validate()
    need = _needs(needs, ctx)
    dy = _checks.grad_output(dy, ctx.shape, ctx.dtype)
    channels_last = ctx.channels_last
    if need[0] and out is not None:
        _check_out(out, "out", ctx.shape, ctx.dtype, channels_last,
                   inputs=(dy, ctx.x, ctx.weight, ctx.bias, ctx.mean, ctx.rstd))
    dy = _like_layout(dy, channels_last)
    return dy, ctx, out if need[0] else None, need


def run_backward(dy, x, weight, mean, rstd, training: bool, out=None, need_dx: bool = True,
                 need_dweight: bool = True, need_dbias: bool = True):
    """BatchNorm backward on validated arrays (dy in x's layout, x C-contiguous or
    channels-last, mean/rstd float64 (C,)); trusts its arguments.  Returns
    ``(dx, dweight, dbias)`` with None for what is not needed (or has no parameter); only the
    work for what is needed is done: the channel sums are skipped when nothing needs them, and
    dx is not written when it is not needed."""
    dtype = x.dtype
    C = x.shape[1]
    channels_last = _is_channels_last(x)
    need_dweight = need_dweight and weight is not None
    need_dx_sums = need_dx and training
    need_x = need_dx_sums or need_dweight            # sum(dy * (x - mean))
    sums = need_x or need_dbias                      # sum(dy)
    dx = None
    if need_dx:
        dx = out if out is not None else _empty(x.shape, dtype, channels_last)
    dweight = np.empty(C, dtype) if need_dweight else None
    dbias = np.empty(C, dtype) if need_dbias else None
    sdy = np.zeros(C)
    sdyx = np.zeros(C)
    if x.size > 0:
        if need_dx or sums:
            xk, s = _kernel_view(x, channels_last)
            dyk, _ = _kernel_view(dy, channels_last)
            dxk = None if dx is None else _kernel_view(dx, channels_last)[0]
            consts, parts = _scratch(xk, s)
            _kernel.backward(dxk, dweight, dbias, sdy, sdyx, dyk, xk, weight, mean, rstd,
                             float(_count(x)), training, sums, need_x, s,
                             0 if dx is None else _stream(dx, xk), consts, parts)
    else:     # no values: the sums are 0
        if dweight is not None:
            dweight[...] = (sdyx * rstd).astype(dtype)
        if dbias is not None:
            dbias[...] = sdy
    return dx, dweight, dbias


def batch_norm_backward(dy, ctx, *, out=None, needs=None):
    """Gradients of BatchNorm given ``dy = dL/dy``.

    Per channel over ``(N, *spatial)``, with ``xhat = (x - mean) * rstd`` and
    ``g = dy * weight``: in training ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``; in
    eval (the statistics are constants) ``dx = g * rstd``.  ``dweight = sum(dy * xhat)``,
    ``dbias = sum(dy)``.

    Parameters
    ----------
    dy : ndarray of the forward output's shape and dtype
        Any layout; copied once if it is not in ``ctx.x``'s layout.
    ctx : BatchNormContext
        From :func:`batch_norm_forward`.
    out : ndarray, optional
        Preallocated ``dx``, in ``ctx.x``'s layout (same rules as the forward ``out``).
    needs : tuple of 3 bools (dx, dweight, dbias), optional
        Which gradients to compute; the others are returned as None and their work is skipped
        (only dweight/dbias: the channel sums, no dx written; only dx in eval: no sums).
        Default: every gradient that exists.

    Returns
    -------
    dx : ndarray like x (and in its layout), or None
        None if not needed.
    dweight, dbias : ndarray of shape (C,), or None
        None where weight/bias were None or not needed.  Reduced in a fixed order: identical
        for any thread count.

    Raises
    ------
    TypeError
        ctx is not a BatchNormContext; dy of another dtype; needs not a sequence.
    ValueError
        dy of the wrong shape; a context whose fields are inconsistent; a bad ``out`` or
        ``needs``.

    See Also
    --------
    batch_norm_forward, normffn.reference.batch_norm_backward

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((8, 3, 5))
    >>> w, b = rng.standard_normal(3), rng.standard_normal(3)
    >>> y, ctx = normffn.batch_norm_forward(x, None, None, w, b, training=True)
    >>> dy = rng.standard_normal(y.shape)
    >>> dx, dw, db = normffn.batch_norm_backward(dy, ctx)
    >>> bool(np.allclose(db, dy.sum(axis=(0, 2))))
    True
    >>> _, rctx = normffn.reference.batch_norm_forward(x, None, None, w, b, training=True)
    >>> ref = normffn.reference.batch_norm_backward(dy, rctx)
    >>> all(bool(np.allclose(a, r)) for a, r in zip((dx, dw, db), ref))
    True
    """
    dy, ctx, out, need = check_backward(dy, ctx, out, needs)
    return run_backward(dy, ctx.x, ctx.weight, ctx.mean, ctx.rstd, bool(ctx.training), out,
                        *need)


# ---------------------------------------------------------------- phases
def _stat_vector(a, name: str, C: int) -> np.ndarray:
    """A per-channel float64 statistic of shape (C,), C-contiguous."""
    if a is None:
        raise TypeError(f"{name} must be a float64 array of shape ({C},), got None")
    a = np.asarray(a)
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array of shape ({C},), got dtype {a.dtype}")
    if a.shape != (C,):
        raise ValueError(f"{name} has shape {a.shape}, expected ({C},) (the channels of x)")
    return np.ascontiguousarray(a, dtype=np.float64)


def _count_vector(count, C: int, name: str = "count") -> np.ndarray:
    c = np.asarray(count, dtype=np.float64)
    if c.ndim == 0:
        c = np.full(C, float(c))
    elif c.shape != (C,):
        raise ValueError(f"{name} has shape {c.shape}, expected () or ({C},)")
    return np.ascontiguousarray(c)


def partial_stats(x):
    """Phase 1: per-channel statistics of one chunk.

    Parameters
    ----------
    x : ndarray of shape ``(N, C, *spatial)``, float32 or float64
        C-contiguous or channels-last; other layouts are copied once.

    Returns
    -------
    count : float
        Values per channel in the chunk, ``N * prod(spatial)``.
    mean, m2 : ndarray of shape (C,), float64
        Mean and ``M2 = sum((x - mean)**2)`` per channel, from the same block statistics as the
        one-call training forward (``finalize_stats`` of one chunk gives its mean/var bitwise).
        A chunk with no values gives count 0 and zeros.

    Raises
    ------
    TypeError
        x not a float array.
    ValueError
        x of rank < 2.

    See Also
    --------
    merge_stats, finalize_stats

    Examples
    --------
    >>> import numpy as np
    >>> from normffn.batch_norm import partial_stats
    >>> count, mean, m2 = partial_stats(np.array([[1.0, 0.0], [3.0, 0.0]]))
    >>> count, mean.tolist(), m2.tolist()
    (2.0, [2.0, 0.0], [2.0, 0.0])
    """
    x = _in_kernel_layout(_channel_input(x))
    C = x.shape[1]
    mean = np.zeros(C)
    m2 = np.zeros(C)
    if x.size > 0:
        xk, s = _kernel_view(x, _is_channels_last(x))
        _, parts = _scratch(xk, s)
        _kernel.stats(mean, m2, xk, s, parts)
    return float(_count(x)), mean, m2


def merge_stats(parts: Sequence):
    """Phase 2: merge ``(count, mean, m2)`` triples with Chan et al.'s formula.

    Merged in the order given: deterministic, the same sequence always gives the same bits.

    Parameters
    ----------
    parts : sequence of (count, mean, m2)
        ``count`` a float or a per-channel (C,) array; ``mean`` and ``m2`` (C,) float arrays.
        Parts with count 0 are skipped.

    Returns
    -------
    count : float or ndarray of shape (C,)
        A float if every input count was a scalar, else a (C,) array.
    mean, m2 : ndarray of shape (C,), float64
        The statistics of the union of the parts.

    Raises
    ------
    ValueError
        No parts, a part that is not a triple, mismatched shapes.

    See Also
    --------
    partial_stats, finalize_stats

    Examples
    --------
    >>> import numpy as np
    >>> from normffn.batch_norm import partial_stats, merge_stats, finalize_stats
    >>> x = np.random.default_rng(0).standard_normal((10, 3, 4))
    >>> count, mean, m2 = merge_stats([partial_stats(x[:4]), partial_stats(x[4:])])
    >>> count
    40.0
    >>> bool(np.allclose(mean, x.mean(axis=(0, 2))))
    True
    >>> mean, var, rstd = finalize_stats(count, mean, m2, 1e-5)
    >>> bool(np.allclose(var, x.var(axis=(0, 2))))
    True
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_stats needs at least one (count, mean, m2) part")
    C = np.shape(parts[0][1])[0] if np.ndim(parts[0][1]) == 1 else None
    if C is None:
        raise ValueError("mean of each part must have shape (C,)")
    n = np.zeros(C)
    mean = np.zeros(C)
    m2 = np.zeros(C)
    scalar = True
    for i, part in enumerate(parts):
        if len(part) != 3:
            raise ValueError(f"parts[{i}] must be a (count, mean, m2) triple")
        cnt, mb, m2b = part
        scalar = scalar and np.ndim(cnt) == 0
        _kernel.chan_merge(n, mean, m2, _count_vector(cnt, C, f"parts[{i}] count"),
                           _stat_vector(mb, f"parts[{i}] mean", C),
                           _stat_vector(m2b, f"parts[{i}] m2", C))
    if scalar:
        count = float(sum(float(p[0]) for p in parts))
        return count, mean, m2
    return n, mean, m2


def finalize_stats(count, mean, m2, eps: float):
    """Phase 2b: ``(mean, var, rstd)`` from merged statistics.

    ``var = m2 / count`` (biased) and ``rstd = 1 / sqrt(var + eps)``, both float64 (C,) —
    bitwise what the one-call forward computes from the same (count, mean, m2).  For the running
    stats pass ``var`` and ``count`` to :func:`update_running_stats` (it forms the unbiased
    ``var * count / (count - 1)``).

    Parameters
    ----------
    count : float or ndarray of shape (C,)
        Values per channel.
    mean, m2 : ndarray of shape (C,)
        From :func:`merge_stats` (or :func:`partial_stats`).
    eps : float, >= 0 and finite
        Added to the variance.

    Returns
    -------
    mean, var, rstd : ndarray of shape (C,), float64
        The mean, the biased variance and ``1 / sqrt(var + eps)``.

    Raises
    ------
    TypeError
        Non-float statistics.
    ValueError
        Mismatched shapes, eps negative or not finite.

    Examples
    --------
    >>> import numpy as np
    >>> from normffn.batch_norm import finalize_stats
    >>> mean, var, rstd = finalize_stats(4.0, np.array([1.0]), np.array([16.0]), 0.0)
    >>> var.tolist(), rstd.tolist()
    ([4.0], [0.5])
    """
    mean = _stat_vector(mean, "mean", np.shape(mean)[0] if np.ndim(mean) == 1 else -1)
    C = mean.shape[0]
    m2 = _stat_vector(m2, "m2", C)
    eps = _checks.finite_float(eps, "eps", low=0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = m2 / _count_vector(count, C)
    rstd = np.empty(C)
    _kernel.rstd_from_var(rstd, var, eps)
    return mean, var, rstd


def apply(x, mean, rstd, weight=None, bias=None, out=None):
    """Phase 3: ``y = (x - mean) * rstd * weight + bias`` per channel with given statistics.

    The elementwise pass of the forward (the eval path fed with batch statistics).

    Parameters
    ----------
    x : ndarray of shape ``(N, C, *spatial)``, float32 or float64
        C-contiguous or channels-last; other layouts are copied once.
    mean, rstd : ndarray of shape (C,)
        float64 statistics (from :func:`finalize_stats`).
    weight, bias : ndarray of shape (C,) of x's dtype, or None
        The affine parameters.
    out : ndarray, optional
        As in :func:`batch_norm_forward`.

    Returns
    -------
    y : ndarray
        In x's layout.

    Raises
    ------
    TypeError
        Non-float or mixed dtypes.
    ValueError
        Shapes that do not match x's channels, a bad ``out``.

    Examples
    --------
    >>> import numpy as np
    >>> from normffn.batch_norm import apply
    >>> x = np.array([[1.0, 2.0], [3.0, 4.0]])
    >>> apply(x, np.array([2.0, 3.0]), np.array([1.0, 0.5])).tolist()
    [[-1.0, -0.5], [1.0, 0.5]]
    """
    x = _in_kernel_layout(_channel_input(x))
    C = x.shape[1]
    mean = _stat_vector(mean, "mean", C)
    rstd = _stat_vector(rstd, "rstd", C)
    weight = _checks.optional_param(weight, "weight", (C,), x.dtype)
    bias = _checks.optional_param(bias, "bias", (C,), x.dtype)
    channels_last = _is_channels_last(x)
    if out is not None:
        _check_out(out, "out", x.shape, x.dtype, channels_last, inputs=(x, weight, bias))
    return run_apply(x, mean, rstd, weight, bias, out)


def run_apply(x, mean, rstd, weight, bias, out=None):
    """:func:`apply` on validated arguments; trusts them."""
    channels_last = _is_channels_last(x)
    y = out if out is not None else _empty(x.shape, x.dtype, channels_last)
    if x.size > 0:
        xk, s = _kernel_view(x, channels_last)
        yk, _ = _kernel_view(y, channels_last)
        consts, _ = _scratch(xk, s)
        _kernel.apply(yk, xk, mean, rstd, weight, bias, s, _stream(y, xk), consts)
    return y


def _dy_for(dy, x) -> np.ndarray:
    dy = _checks.grad_output(dy, x.shape, x.dtype)
    return _like_layout(dy, _is_channels_last(x))


def backward_sums(dy, x, mean):
    """Backward phase 1: per-channel ``sdy = sum(dy)`` and ``sdyx = sum(dy * (x - mean))``.

    Sums over chunks (added in a fixed order) give the batch's; then
    ``dweight = (sdyx * rstd).astype(x.dtype)`` and ``dbias = sdy.astype(x.dtype)``.

    Parameters
    ----------
    dy : ndarray
        The gradient of this chunk's output, x's shape and dtype.
    x : ndarray of shape ``(N, C, *spatial)``
        This chunk's input.
    mean : ndarray of shape (C,)
        The batch mean used by the forward.

    Returns
    -------
    sdy, sdyx : ndarray of shape (C,), float64
        The chunk's sums.

    Raises
    ------
    TypeError
        Non-float or mixed dtypes.
    ValueError
        Shapes that do not match.

    Examples
    --------
    >>> import numpy as np
    >>> from normffn.batch_norm import backward_sums
    >>> x, dy = np.array([[1.0], [3.0]]), np.array([[1.0], [2.0]])
    >>> sdy, sdyx = backward_sums(dy, x, np.array([2.0]))
    >>> sdy.tolist(), sdyx.tolist()                 # 1 + 2;  1 * (-1) + 2 * 1
    ([3.0], [1.0])
    """
    x = _in_kernel_layout(_channel_input(x))
    C = x.shape[1]
    mean = _stat_vector(mean, "mean", C)
    dy = _dy_for(dy, x)
    sdy = np.zeros(C)
    sdyx = np.zeros(C)
    if x.size > 0:
        channels_last = _is_channels_last(x)
        xk, s = _kernel_view(x, channels_last)
        dyk, _ = _kernel_view(dy, channels_last)
        consts, parts = _scratch(xk, s)
        _kernel.backward(None, None, None, sdy, sdyx, dyk, xk, None, mean, mean,
                         float(_count(x)), False, True, True, s, 0, consts, parts)
    return sdy, sdyx


def backward_apply(dy, x, mean, rstd, weight, sdy, sdyx, count, training, out=None):
    """Backward phase 2: dx of one chunk given the batch's statistics and channel sums.

    Training: ``dx = ((dy - sdy/count) - (x - mean) * rstd**2 * sdyx/count) * rstd * weight``;
    eval: ``dx = dy * rstd * weight`` (sdy, sdyx, count unused).

    Parameters
    ----------
    dy, x : ndarray of shape ``(N, C, *spatial)``
        This chunk's output gradient and input.
    mean, rstd : ndarray of shape (C,)
        The batch statistics (float64).
    weight : ndarray of shape (C,) or None
        The scale.
    sdy, sdyx : ndarray of shape (C,)
        The whole batch's sums from :func:`backward_sums`.
    count : float
        Values per channel of the whole batch.
    training : bool
        Whether the forward used batch statistics.
    out : ndarray, optional
        Preallocated dx, in x's layout.

    Returns
    -------
    dx : ndarray
        In x's layout.

    Raises
    ------
    TypeError
        Non-float or mixed dtypes, non-bool training.
    ValueError
        Shapes that do not match, count not positive in training, a bad ``out``.

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> from normffn.batch_norm import (partial_stats, finalize_stats, backward_sums,
    ...                                 backward_apply)
    >>> rng = np.random.default_rng(0)
    >>> x, dy = rng.standard_normal((6, 2)), rng.standard_normal((6, 2))
    >>> count, mean, m2 = partial_stats(x)
    >>> mean, var, rstd = finalize_stats(count, mean, m2, 1e-5)
    >>> sdy, sdyx = backward_sums(dy, x, mean)
    >>> dx = backward_apply(dy, x, mean, rstd, None, sdy, sdyx, count, True)
    >>> _, ctx = normffn.batch_norm_forward(x, None, None, training=True)
    >>> bool(np.allclose(dx, normffn.batch_norm_backward(dy, ctx)[0]))
    True
    """
    x = _in_kernel_layout(_channel_input(x))
    C = x.shape[1]
    mean = _stat_vector(mean, "mean", C)
    rstd = _stat_vector(rstd, "rstd", C)
    sdy = _stat_vector(sdy, "sdy", C)
    sdyx = _stat_vector(sdyx, "sdyx", C)
    weight = _checks.optional_param(weight, "weight", (C,), x.dtype)
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    count = _checks.finite_float(count, "count", low=0.0, low_inclusive=not training)
    dy = _dy_for(dy, x)
    channels_last = _is_channels_last(x)
    if out is not None:
        _check_out(out, "out", x.shape, x.dtype, channels_last, inputs=(dy, x, weight))
    dx = out if out is not None else _empty(x.shape, x.dtype, channels_last)
    if x.size > 0:
        xk, s = _kernel_view(x, channels_last)
        dyk, _ = _kernel_view(dy, channels_last)
        dxk, _ = _kernel_view(dx, channels_last)
        consts, parts = _scratch(xk, s)
        _kernel.backward(dxk, None, None, sdy.copy(), sdyx.copy(), dyk, xk, weight, mean, rstd,
                         count, bool(training), False, False, s, _stream(dx, xk), consts, parts)
    return dx
