"""normffn ops on tensors, with ``torch.nn.functional``'s signatures.

Each function decides, from the tensors' metadata only, whether normffn serves the call
(strided CPU float32/float64, one dtype) and then calls the operator in ``torch.ops.normffn``;
otherwise it runs the PyTorch op and warns once, naming the reason (FallbackWarning).  The
decision is plain Python on dtypes/devices, so torch.compile guards on it and traces straight
into the operator.  In plain eager mode the same implementation runs without the dispatcher
(an ``autograd.Function``, or the implementation itself when autograd is not recording): the
dispatcher's custom-op overhead alone exceeds the per-call budget (see ``_ops``).
"""
import torch
import torch.nn.functional as F

import normffn

from . import _ops, _torch_ref
from ._util import KERNEL_ACTIVATIONS, big_out, np_, numpy_op, opt_np, plan, warn_fallback

__all__ = ["layer_norm", "rms_norm", "batch_norm", "ffn", "ffn_block"]

# per op: (operator, eager autograd.Function, implementation) — see _ops for the two routes;
# LayerNorm and RMSNorm: the operator alone (their eager Functions return y only, and are
# called directly below)
_LN_OP = torch.ops.normffn.layer_norm.default
_RMS_OP = torch.ops.normffn.rms_norm.default
_BN = (torch.ops.normffn.batch_norm.default, _ops.BatchNormFunction, _ops._bn_impl)
_FFN_TRAIN = (torch.ops.normffn.ffn_forward.default, _ops.FFNFunction, _ops._ffn_fwd_impl)
_FFN_INFER = (torch.ops.normffn.ffn.default, None, _ops._ffn_impl)
_FFN_BLOCK = (torch.ops.normffn.ffn_block.default, None, _ops._ffn_block_impl)


def _run(route, grad: bool, direct: bool, *args):
    """The operator, or with ``direct`` the eager Function (autograd recording) or the bare
    implementation."""
    op, function, impl = route
    if not direct:
        return op(*args)
    return function.apply(*args) if grad else impl(*args)


def _shape(normalized_shape) -> list:
    if isinstance(normalized_shape, int):
        return [normalized_shape]
    return [int(s) for s in normalized_shape]


def _numpy_shape(normalized_shape):
    """normalized_shape as the NumPy API takes it: an int stays an int (its fast path)."""
    if type(normalized_shape) is int:
        return normalized_shape
    return tuple(int(s) for s in normalized_shape)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm`` on normffn's kernel (float64 statistics).

    Parameters
    ----------
    input : torch.Tensor of shape ``(..., *normalized_shape)``
        CPU float32/float64 runs normffn's kernel on a zero-copy view; anything else runs
        ``torch.nn.functional.layer_norm`` with a one-time :class:`FallbackWarning`.
    normalized_shape : int or sequence of int
        The trailing dims to normalise over.
    weight, bias : torch.Tensor of shape normalized_shape, or None
        The affine parameters.
    eps : float
        Added to the variance.

    Returns
    -------
    torch.Tensor
        Differentiable with respect to input, weight and bias (backward computes only the
        gradients autograd asks for).

    Examples
    --------
    >>> import torch
    >>> import normffn.torch as nft
    >>> x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    >>> w = torch.rand(8, dtype=torch.float64, requires_grad=True)
    >>> y = nft.layer_norm(x, (8,), w, None)
    >>> bool(torch.allclose(y, torch.nn.functional.layer_norm(x, (8,), w, None)))
    True
    >>> y.sum().backward()
    >>> x.grad.shape, w.grad.shape
    (torch.Size([4, 8]), torch.Size([8]))
    """
    reason, grad, direct = plan(input, weight, bias)
    if reason is not None:
        warn_fallback("layer_norm", reason, "torch.nn.functional.layer_norm")
        return F.layer_norm(input, tuple(_shape(normalized_shape)), weight, bias, eps)
    if direct and not grad:     # eager inference: the NumPy call alone, no statistics kept
        xa = np_(input)
        return torch.from_numpy(normffn.layer_norm(xa, _numpy_shape(normalized_shape),
                                                   opt_np(weight), opt_np(bias), float(eps),
                                                   out=big_out(xa.shape, xa.dtype)))
    if direct:                  # eager, autograd recording (the inference case returned above)
        return _ops.LayerNormFunction.apply(input, _numpy_shape(normalized_shape), weight, bias,
                                            float(eps))
    return _LN_OP(input, _shape(normalized_shape), weight, bias, float(eps))[0]


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm`` on normffn's kernel (float64 statistics).

    Parameters
    ----------
    input : torch.Tensor of shape ``(..., *normalized_shape)``
        CPU float32/float64 (else the PyTorch op runs, with a :class:`FallbackWarning`).
    normalized_shape : int or sequence of int
        The trailing dims to normalise over.
    weight : torch.Tensor of shape normalized_shape, or None
        The scale.
    eps : float or None
        None means ``torch.finfo(input.dtype).eps``, as in PyTorch.

    Returns
    -------
    torch.Tensor

    Examples
    --------
    >>> import torch
    >>> import normffn.torch as nft
    >>> x = torch.randn(3, 16)
    >>> y = nft.rms_norm(x, 16)
    >>> bool(torch.allclose(y, torch.nn.functional.rms_norm(x, (16,)), atol=1e-6))
    True
    """
    reason, grad, direct = plan(input, weight)
    if reason is not None:
        warn_fallback("rms_norm", reason, "torch.nn.functional.rms_norm")
        return F.rms_norm(input, tuple(_shape(normalized_shape)), weight, eps)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    if direct and not grad:     # eager inference: the NumPy call alone, no statistics kept
        xa = np_(input)
        return torch.from_numpy(normffn.rms_norm(xa, _numpy_shape(normalized_shape),
                                                 opt_np(weight), float(eps),
                                                 out=big_out(xa.shape, xa.dtype)))
    if direct:                  # eager, autograd recording (the inference case returned above)
        return _ops.RMSNormFunction.apply(input, _numpy_shape(normalized_shape), weight,
                                          float(eps))
    return _RMS_OP(input, _shape(normalized_shape), weight, float(eps))[0]


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """``torch.nn.functional.batch_norm`` on normffn's kernels.

    NCHW and channels-last inputs run without a copy.  In training the running stats are
    updated in place, as PyTorch does.

    Parameters
    ----------
    input : torch.Tensor of shape ``(N, C, *spatial)``
        CPU float32/float64 (else the PyTorch op runs, with a :class:`FallbackWarning`).
    running_mean, running_var : torch.Tensor of shape (C,), or None
        Updated in place in training; required in eval.
    weight, bias : torch.Tensor of shape (C,), or None
        The affine parameters.
    training : bool
        Batch statistics (True) or running statistics (False).
    momentum : float
        Weight of the batch statistics in the running-stat update.
    eps : float
        Added to the variance.

    Returns
    -------
    torch.Tensor
        In input's memory format.

    Examples
    --------
    >>> import torch
    >>> import normffn.torch as nft
    >>> x = torch.randn(8, 3, 4, 4).to(memory_format=torch.channels_last)
    >>> rm, rv = torch.zeros(3), torch.ones(3)
    >>> y = nft.batch_norm(x, rm, rv, training=True)
    >>> y.is_contiguous(memory_format=torch.channels_last)
    True
    >>> bool(torch.allclose(rm, 0.1 * x.mean(dim=(0, 2, 3)), atol=1e-6))
    True
    """
    reason, grad, direct = plan(input, running_mean, running_var, weight, bias)
    if reason is not None:
        warn_fallback("batch_norm", reason, "torch.nn.functional.batch_norm")
        return F.batch_norm(input, running_mean, running_var, weight, bias, training,
                            momentum, eps)
    y, _, _, new_mean, new_var = _run(_BN, grad, direct, input, running_mean, running_var,
                                      weight, bias, bool(training), float(momentum), float(eps))
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y


def ffn(input, weight1, bias1, weight2, bias2, activation="relu", *, recompute=False):
    """Fused ``nn.Linear`` → activation → ``nn.Linear``: ``act(input @ w1.T + b1) @ w2.T + b2``.

    Without autograd (``no_grad``, or nothing requires grad) the inference kernel runs and keeps
    nothing; otherwise the forward keeps the hidden activation for backward.

    Parameters
    ----------
    input : torch.Tensor of shape (..., d)
        CPU float32/float64 (else PyTorch's composition runs, with a :class:`FallbackWarning`).
    weight1 : torch.Tensor of shape (h, d)
        ``(2h, d)`` for "swiglu"/"geglu"/"reglu", gate rows first (nn.Linear layout; reaches
        the kernel as a transposed view, never copied).
    bias1 : torch.Tensor of shape (h,) (``(2h,)`` gated) or None
        The first bias.
    weight2 : torch.Tensor of shape (d, h)
        The second weight (nn.Linear layout).
    bias2 : torch.Tensor of shape (d,) or None
        The second bias.
    activation : {"relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "reglu"}
        The activation.
    recompute : bool
        Keep no (n, h) activation for backward; backward recomputes it (one more GEMM).

    Returns
    -------
    torch.Tensor of shape (..., d)

    Raises
    ------
    ValueError
        An unknown activation.

    Examples
    --------
    >>> import torch
    >>> import normffn.torch as nft
    >>> fc1, fc2 = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)
    >>> x = torch.randn(5, 8)
    >>> y = nft.ffn(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, activation="gelu")
    >>> with torch.no_grad():
    ...     y_ref = fc2(torch.nn.functional.gelu(fc1(x)))
    >>> bool(torch.allclose(y, y_ref, atol=1e-5))
    True
    """
    return _ffn(input, weight1, bias1, weight2, bias2, activation, recompute, None)


def _ffn(input, weight1, bias1, weight2, bias2, activation, recompute, buffers):
    """:func:`ffn`; ``buffers``: a module's StepBuffers (reused on the eager route only)."""
    reason, grad, direct = plan(input, weight1, bias1, weight2, bias2)
    if activation not in KERNEL_ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(KERNEL_ACTIVATIONS)}, got "
                         f"{activation!r}")
    if reason is not None:
        warn_fallback("ffn", reason, "nn.Linear -> activation -> nn.Linear in PyTorch")
        return _torch_ref.ffn(input, weight1, bias1, weight2, bias2, activation)
    recompute = bool(recompute)
    if direct and buffers is not None:
        if grad:
            return _ops.FFNFunction.apply(input, weight1, bias1, weight2, bias2, activation,
                                          recompute, buffers)[0]
        return _ops._ffn_infer(input, weight1, bias1, weight2, bias2, activation, buffers)
    if grad:
        return _run(_FFN_TRAIN, True, direct, input, weight1, bias1, weight2, bias2, activation,
                    recompute)[0]
    return _run(_FFN_INFER, False, direct, input, weight1, bias1, weight2, bias2, activation)


def ffn_block(input, norm_weight, norm_bias, weight1, bias1, weight2, bias2, activation="relu",
              *, norm="layer", placement="pre", eps=1e-5):
    """The FFN sublayer: pre ``x + ffn(norm(x))``, post ``norm(x + ffn(x))``.

    ``norm`` is "layer" or "rms" over the last dim.  Where this normffn build has
    ``normffn.ffn_block`` the fused op runs: inference through its operator, training in eager
    mode through an autograd Function.  Otherwise — and for training under torch.compile — it
    composes :func:`layer_norm` / :func:`rms_norm`, :func:`ffn` and the residual add (the same
    maths).

    Parameters
    ----------
    input : torch.Tensor of shape (..., d)
        CPU float32/float64.
    norm_weight, norm_bias : torch.Tensor of shape (d,), or None
        The norm's parameters (``norm_bias`` None for "rms").
    weight1, bias1, weight2, bias2 : torch.Tensor or None
        The FFN's parameters, as :func:`ffn` takes them (nn.Linear layout).
    activation : {"relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "reglu"}
        The FFN's activation.
    norm : {"layer", "rms"}
        LayerNorm or RMSNorm.
    placement : {"pre", "post"}
        Where the norm sits.
    eps : float
        The norm's eps.

    Returns
    -------
    torch.Tensor of input's shape

    Raises
    ------
    ValueError
        norm not "layer"/"rms", placement not "pre"/"post", a norm_bias with norm="rms".

    Examples
    --------
    >>> import torch
    >>> import normffn.torch as nft
    >>> ref = nft.TorchFFNBlock(8, 16)                         # stock PyTorch
    >>> x = torch.randn(4, 8)
    >>> y = nft.ffn_block(x, ref.norm.weight, ref.norm.bias, ref.fc1.weight, ref.fc1.bias,
    ...                   ref.fc2.weight, ref.fc2.bias)
    >>> bool(torch.allclose(y, ref(x), atol=1e-5))
    True
    """
    return _ffn_block(input, norm_weight, norm_bias, weight1, bias1, weight2, bias2, activation,
                      norm, placement, eps, None)


def _ffn_block(input, norm_weight, norm_bias, weight1, bias1, weight2, bias2, activation, norm,
               placement, eps, buffers):
    """:func:`ffn_block`; ``buffers``: a module's StepBuffers (the fused op's, or the composed
    FFN's), reused on the eager route only."""
    if norm not in ("layer", "rms"):
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    if placement not in ("pre", "post"):
        raise ValueError(f"placement must be 'pre' or 'post', got {placement!r}")
    if norm == "rms" and norm_bias is not None:
        raise ValueError("norm_bias must be None for norm='rms'")
    tensors = (input, norm_weight, norm_bias, weight1, bias1, weight2, bias2)
    if numpy_op("ffn_block") is not None and activation in KERNEL_ACTIVATIONS:
        reason, grad, direct = plan(*tensors)
        if reason is None and not grad:
            return _run(_FFN_BLOCK, False, direct, *tensors, activation, norm, placement,
                        float(eps))
        if reason is None and direct and numpy_op("ffn_block_backward") is not None:
            return _ops.FFNBlockFunction.apply(*tensors, activation, norm, placement,
                                               float(eps), buffers)
    d = input.shape[-1]

    def normed(t):
        if norm == "layer":
            return layer_norm(t, d, norm_weight, norm_bias, eps)
        return rms_norm(t, d, norm_weight, eps)

    if placement == "pre":
        return input + _ffn(normed(input), weight1, bias1, weight2, bias2, activation, False,
                            buffers)
    return normed(input + _ffn(input, weight1, bias1, weight2, bias2, activation, False,
                               buffers))
