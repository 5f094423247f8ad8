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

from . import _ops, _torch_ref
from ._util import KERNEL_ACTIVATIONS, numpy_op, plan, warn_fallback

__all__ = ["layer_norm", "rms_norm", "batch_norm", "ffn", "ffn_block"]

# per op: (operator, eager autograd.Function, implementation) — see _ops for the two routes
_LN = (torch.ops.normffn.layer_norm.default, _ops.LayerNormFunction, _ops._ln_impl)
_RMS = (torch.ops.normffn.rms_norm.default, _ops.RMSNormFunction, _ops._rms_impl)
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


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm`` on normffn's kernel (float64 statistics)."""
    reason, grad, direct = plan(input, weight, bias)
    if reason is not None:
        warn_fallback("layer_norm", reason, "torch.nn.functional.layer_norm")
        return F.layer_norm(input, tuple(_shape(normalized_shape)), weight, bias, eps)
    return _run(_LN, grad, direct, input, _shape(normalized_shape), weight, bias, float(eps))[0]


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm`` on normffn's kernel (float64 statistics); ``eps=None``
    means ``torch.finfo(input.dtype).eps`` as in PyTorch."""
    reason, grad, direct = plan(input, weight)
    if reason is not None:
        warn_fallback("rms_norm", reason, "torch.nn.functional.rms_norm")
        return F.rms_norm(input, tuple(_shape(normalized_shape)), weight, eps)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    return _run(_RMS, grad, direct, input, _shape(normalized_shape), weight, float(eps))[0]


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """``torch.nn.functional.batch_norm`` on normffn's kernels (NCHW and channels-last without
    a copy).  In training the running stats are updated in place, as PyTorch does."""
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
    """``act(input @ weight1.T + bias1) @ weight2.T + bias2`` — ``nn.Linear`` → activation →
    ``nn.Linear`` fused.

    Parameters
    ----------
    input : tensor of shape (..., d)
    weight1 : tensor of shape (h, d) — ``(2h, d)`` for "swiglu"/"geglu"/"reglu", gate rows
        first (nn.Linear layout; reaches the kernel as a transposed view, never copied)
    bias1 : tensor of shape (h,) (``(2h,)`` gated) or None
    weight2 : tensor of shape (d, h);  bias2 : tensor of shape (d,) or None
    activation : "relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "reglu"
    recompute : keep no (n, h) activation for backward; backward recomputes it (one more GEMM)

    Without autograd (no_grad, or nothing requires grad) the inference kernel runs and keeps
    nothing; otherwise the forward keeps the hidden activation for backward.
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
    """The FFN sublayer: pre ``x + ffn(norm(x))``, post ``norm(x + ffn(x))``; norm "layer" or
    "rms" over the last dim.

    Where this normffn build has ``normffn.ffn_block`` the fused op runs: inference through
    its operator, training in eager mode through :class:`~normffn.torch._ops.FFNBlockFunction`.
    Otherwise — and for training under torch.compile — it composes :func:`layer_norm` /
    :func:`rms_norm`, :func:`ffn` and the residual add (the same maths)."""
    return _ffn_block(input, norm_weight, norm_bias, weight1, bias1, weight2, bias2, activation,
                      norm, placement, eps, None)


def _ffn_block(input, norm_weight, norm_bias, weight1, bias1, weight2, bias2, activation, norm,
               placement, eps, buffers):
    """:func:`ffn_block`; ``buffers``: a module's StepBuffers for the composed FFN."""
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
                                               float(eps))
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
