"""BatchNorm: ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per channel (axis 1).

Signatures follow ``torch.nn.functional.batch_norm``; arrays are NumPy arrays.  Two memory
layouts run without a copy — C-contiguous ``(N, C, *spatial)`` (PyTorch's NCHW) and
channels-last (a transposed view of a C-contiguous ``(N, *spatial, C)`` array, such as
``x_nhwc.transpose(0, 3, 1, 2)``, PyTorch's ``channels_last``) — and outputs come back in the
input's layout.  Any other strides cost one copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _checks
from ._kernels import batch_norm as _kernel

__all__ = ["BatchNormContext", "batch_norm", "batch_norm_forward", "batch_norm_backward"]

# (N, C, S) inputs with S below this (and C*S at most _SMALL_S_MAX_WIDTH) run as an (N, C*S)
# matrix through the column kernel: per-row calls on runs of a few values would cost more.
_SMALL_S = 16
_SMALL_S_MAX_WIDTH = 1 << 16
# Outputs of at least _kernel.stream_bytes() (a quarter of the L3) are written with non-temporal
# stores (no read-for-ownership) by the rows kernel (NCHW).  Measured here (Zen 4 VM, 25 MB
# outputs, 2 threads) that made eval 25% and training ~8% faster; in the column kernel
# (channels-last, (N, C)) it was 0-15% slower, so that kernel stores normally.
_STREAM_COLUMNS = False


def _stream(y: np.ndarray, xk: np.ndarray) -> bool:
    return y.nbytes >= _kernel.stream_bytes() and (xk.ndim == 3 or _STREAM_COLUMNS)


def _is_channels_last(a: np.ndarray) -> bool:
    """True if ``a`` (ndim >= 3) is a channels-last view (C-contiguous once axis 1 goes last) and
    not also plainly C-contiguous."""
    return a.ndim >= 3 and not a.flags.c_contiguous and np.moveaxis(a, 1, -1).flags.c_contiguous


def _output(out, name: str, shape: tuple, dtype, channels_last: bool, inputs) -> np.ndarray:
    """A new output, or the caller's ``out`` checked, in the layout the kernel writes."""
    if not channels_last:
        return _checks.new_or_out(out, name, shape, dtype, inputs=inputs)
    moved = shape[:1] + shape[2:] + shape[1:2]
    if out is None:
        return np.moveaxis(np.empty(moved, dtype=dtype), -1, 1)
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
    return out


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


@dataclass(frozen=True, eq=False)
class BatchNormContext:
    """What :func:`batch_norm_backward` needs; returned by :func:`batch_norm_forward`.

    Attributes
    ----------
    mean, rstd : ndarray of shape (C,), float64
        Training: the batch mean and ``1 / sqrt(biased_var + eps)`` (the ``save_mean`` and
        ``save_invstd`` of ``torch.native_batch_norm``).  Eval: the running mean and
        ``1 / sqrt(running_var + eps)``.  Always float64, as in LayerNormContext: a float32
        mean of data offset by 1e3 is off by ~1e-4, which backward (it recomputes ``xhat``
        from it) would pay for.
    x : ndarray of the forward input's shape, C-contiguous or channels-last (backward recomputes
        ``xhat`` from it and returns dx in its layout)
    weight, bias : ndarray of shape (C,) or None
    eps : float
    training : bool
    """

    x: np.ndarray
    weight: np.ndarray | None
    bias: np.ndarray | None
    eps: float
    training: bool
    mean: np.ndarray
    rstd: np.ndarray

    @property
    def shape(self) -> tuple:
        return self.x.shape

    @property
    def dtype(self) -> np.dtype:
        return self.x.dtype

    @property
    def channels_last(self) -> bool:
        return _is_channels_last(self.x)

    def _validate(self) -> tuple[np.ndarray, np.ndarray]:
        """Check the context is internally consistent (a hand-built or tampered context must
        raise, not reach the kernel); return the (mean, rstd) backward uses."""
        x = self.x
        if not isinstance(x, np.ndarray) or x.dtype not in _checks.FLOAT_DTYPES or x.ndim < 2 \
                or not (x.flags.c_contiguous or _is_channels_last(x)):
            raise ValueError("ctx.x must be the float array (C-contiguous or channels-last, "
                             "ndim >= 2) saved by the forward")
        C = x.shape[1]
        for name in ("mean", "rstd"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.dtype != np.float64 or a.shape != (C,) \
                    or not a.flags.c_contiguous:
                raise ValueError(f"ctx.{name} must be a C-contiguous float64 array of shape "
                                 f"({C},)")
        for name in ("weight", "bias"):
            a = getattr(self, name)
            if a is not None and (not isinstance(a, np.ndarray) or a.dtype != x.dtype
                                  or a.shape != (C,) or not a.flags.c_contiguous):
                raise ValueError(f"ctx.{name} must be None or a C-contiguous {x.dtype} array "
                                 f"of shape ({C},)")
        if not isinstance(self.training, (bool, np.bool_)):
            raise ValueError("ctx.training must be a bool")
        return self.mean, self.rstd


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


def batch_norm_forward(x, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5, *, out=None):
    """BatchNorm forward, keeping what backward needs.

    Parameters
    ----------
    x : ndarray of shape (N, C, *spatial), float32 or float64
        Channels on axis 1: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ...  C-contiguous and
        channels-last arrays are used in place; other layouts are copied once.
    running_mean, running_var : ndarray of shape (C,) and x's dtype, or both None
        C-contiguous and writeable (they are the module's state, updated in place in training;
        the same rules hold in eval, where they are only read).  Required in eval.
    weight, bias : ndarray of shape (C,), x's dtype, or None
    training : bool
        True: normalise with the batch mean and biased variance over ``(N, *spatial)`` and, if
        running stats are given, update them in place:
        ``running_mean = (1 - momentum) * running_mean + momentum * mean``,
        ``running_var = (1 - momentum) * running_var + momentum * unbiased_var``.
        False: normalise with the running stats.
    momentum : float in [0, 1]
    eps : float, finite; > 0 in training, >= 0 in eval
    out : ndarray of x's shape and dtype, writeable, not overlapping an input, in the layout y
        will have: C-contiguous, or channels-last when x is channels-last (for example
        ``np.moveaxis(np.empty((N, H, W, C)), -1, 1)``).  Reuse one across calls to avoid
        page-faulting a fresh output.

    Returns
    -------
    y : ndarray of x's shape and dtype, in x's layout (channels-last in, channels-last out;
        any other layout: C-contiguous)
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
    """
    # ---- validation: everything before any kernel runs or any state changes
    x = _checks.float_array(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, C, *spatial) with rank >= 2, got shape "
                         f"{x.shape}")
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
    channels_last = _is_channels_last(x)
    if not channels_last:
        x = np.ascontiguousarray(x)
    y = _output(out, "out", x.shape, dtype, channels_last,
                inputs=(x, weight, bias, running_mean, running_var))

    # ---- compute
    if training:
        mean64 = np.zeros(C)
        var64 = np.zeros(C)
    else:
        mean64 = running_mean.astype(np.float64)
        var64 = running_var.astype(np.float64)
    if x.size > 0:
        xk, s = _kernel_view(x, channels_last)
        yk, _ = _kernel_view(y, channels_last)
        _kernel.forward(yk, mean64, var64, xk, weight, bias, eps, training, s, _stream(y, xk))
    with np.errstate(divide="ignore", invalid="ignore"):
        rstd64 = 1.0 / np.sqrt(var64 + eps)
    if training and running_mean is not None:
        with np.errstate(invalid="ignore", over="ignore"):
            new_mean = (1.0 - momentum) * running_mean + momentum * mean64
            new_var = (1.0 - momentum) * running_var + momentum * (var64 * (N * S / (N * S - 1)))
        running_mean[...] = new_mean
        running_var[...] = new_var
    ctx = BatchNormContext(x=x, weight=weight, bias=bias, eps=eps, training=training,
                           mean=mean64, rstd=rstd64)
    return y, ctx


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, out=None):
    """BatchNorm over channels (axis 1), as ``torch.nn.functional.batch_norm``.

    ``y = (x - mean) * rstd * weight + bias`` per channel, ``rstd = 1 / sqrt(var + eps)``;
    training: batch mean / biased variance (running stats updated in place with the unbiased
    variance); eval: the running stats.  See :func:`batch_norm_forward`.  Returns y only.
    """
    return batch_norm_forward(x, running_mean, running_var, weight, bias, training, momentum,
                              eps, out=out)[0]


def batch_norm_backward(dy, ctx, *, out=None):
    """Gradients of BatchNorm given ``dy = dL/dy``.

    Parameters
    ----------
    dy : ndarray of the forward output's shape and dtype (any layout; copied once if it is not
        in ``ctx.x``'s layout)
    ctx : BatchNormContext from :func:`batch_norm_forward`
    out : optional preallocated ``dx``, in ``ctx.x``'s layout (same rules as the forward ``out``)

    Returns
    -------
    dx : ndarray like x (and in its layout)
    dweight, dbias : ndarray of shape (C,), or None where weight/bias were None
        Reduced in a fixed order: identical for any thread count.

    Maths, per channel over ``(N, *spatial)``: ``xhat = (x - mean) * rstd``, ``g = dy * weight``;
    training: ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``; eval (the statistics are
    constants): ``dx = g * rstd``.  ``dweight = sum(dy * xhat)``, ``dbias = sum(dy)``.
    """
    ctx = _checks.context(ctx, BatchNormContext, "batch_norm")
    mean64, rstd64 = ctx._validate()
    dtype = ctx.dtype
    x = ctx.x
    channels_last = ctx.channels_last
    dy = _checks.grad_output(dy, ctx.shape, dtype)
    dx = _output(out, "out", ctx.shape, dtype, channels_last,
                 inputs=(dy, x, ctx.weight, ctx.bias, ctx.mean, ctx.rstd))
    C = x.shape[1]
    sdy = np.zeros(C)
    sdyx = np.zeros(C)
    if x.size > 0:
        if channels_last:
            dyc = np.moveaxis(np.ascontiguousarray(np.moveaxis(dy, 1, -1)), -1, 1)
        else:
            dyc = np.ascontiguousarray(dy)
        xk, s = _kernel_view(x, channels_last)
        dyk, _ = _kernel_view(dyc, channels_last)
        dxk, _ = _kernel_view(dx, channels_last)
        need_x = ctx.training or ctx.weight is not None
        sums = need_x or ctx.bias is not None
        _kernel.backward(dxk, sdy, sdyx, dyk, xk, ctx.weight, mean64, rstd64, bool(ctx.training),
                         need_x, sums, s, _stream(dx, xk))
    dweight = None if ctx.weight is None else (sdyx * rstd64).astype(dtype)
    dbias = None if ctx.bias is None else sdy.astype(dtype)
    return dx, dweight, dbias
