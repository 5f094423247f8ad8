"""Modules with PyTorch's constructors, parameters, buffers and state-dict keys.

The norms subclass their PyTorch counterparts and replace only ``forward``, so everything else
(``reset_parameters``, ``extra_repr``, ``_load_from_state_dict``, ``num_batches_tracked``
handling of old checkpoints) is PyTorch's own, and :func:`normffn.torch.patch` can turn a
PyTorch module into one of these while keeping its very Parameter and buffer objects.

``FeedForward`` and ``FFNBlock`` have no PyTorch class; their counterparts, with the same
constructors and state-dict keys, are :class:`TorchFeedForward` and :class:`TorchFFNBlock`
(stock PyTorch, for comparisons and benchmarks).
"""
import torch
from torch import nn

from . import _torch_ref
from . import functional as NF
from ._util import GATED, StepBuffers

__all__ = ["LayerNorm", "RMSNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FeedForward",
           "FFNBlock",
           "TorchFeedForward", "TorchFFNBlock"]


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` on normffn's kernel (same arguments, parameters and state dict)."""

    def forward(self, input):
        return NF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` on normffn's kernel (same arguments, parameters and state dict)."""

    def forward(self, input):
        return NF.rms_norm(input, self.normalized_shape, self.weight, self.eps)


class _BatchNormMixin:
    """PyTorch's ``_BatchNorm.forward`` with normffn's batch_norm: the same momentum
    (``None``: cumulative average over ``num_batches_tracked``), ``track_running_stats`` and
    eval-without-buffers rules."""

    def forward(self, input):
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        return NF.batch_norm(input, self.running_mean if use_buffers else None,
                             self.running_var if use_buffers else None, self.weight, self.bias,
                             bn_training, factor, self.eps)


class BatchNorm1d(_BatchNormMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` on normffn's kernels ((N, C) and (N, C, L) inputs)."""


class BatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` on normffn's kernels (NCHW and channels-last without a copy)."""


class BatchNorm3d(_BatchNormMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` on normffn's kernels (NCDHW and channels-last without a copy)."""


def _linears(module, d_model, d_hidden, activation, bias, factory):
    """fc1: d_model -> d_hidden (2 * d_hidden for gated activations: gate rows, then up rows),
    fc2: d_hidden -> d_model, both nn.Linear."""
    width = 2 * d_hidden if activation in GATED else d_hidden
    module.fc1 = nn.Linear(d_model, width, bias=bias, **factory)
    module.fc2 = nn.Linear(d_hidden, d_model, bias=bias, **factory)


class FeedForward(nn.Module):
    """``fc2(act(fc1(x)))`` fused: ``nn.Linear(d_model, d_hidden)`` → activation →
    ``nn.Linear(d_hidden, d_model)``.  For "swiglu"/"geglu"/"reglu" ``fc1`` has ``2 * d_hidden``
    outputs, the gate's rows first.  ``recompute=True`` keeps no (tokens × d_hidden) activation
    for backward (backward redoes the first GEMM).  State dict: ``fc1.*``, ``fc2.*``, as
    :class:`TorchFeedForward`.

    In eager mode, step after step, the kernels write the hidden activation, the output and the
    gradients into the previous step's arrays once nothing references those any more (see
    :class:`normffn.torch._util.StepBuffers`; a buffer still saved by a graph or held as a
    ``.grad`` is never overwritten).  ``release_buffers()`` drops them."""

    def __init__(self, d_model, d_hidden, activation="relu", bias=True, *, recompute=False,
                 device=None, dtype=None):
        super().__init__()
        self.d_model, self.d_hidden, self.activation = d_model, d_hidden, activation
        self.recompute = recompute
        self._step_buffers = StepBuffers()
        _linears(self, d_model, d_hidden, activation, bias, {"device": device, "dtype": dtype})

    def forward(self, input):
        return NF._ffn(input, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                       self.activation, self.recompute, self._step_buffers)

    def release_buffers(self):
        """Forget the arrays kept for reuse by the next step (memory in use is not touched)."""
        self._step_buffers.clear()

    def extra_repr(self):
        return f"activation={self.activation!r}"


class TorchFeedForward(FeedForward):
    """Stock PyTorch counterpart of :class:`FeedForward` (Linear → activation → Linear)."""

    def forward(self, input):
        return self.fc2(_torch_ref.activation(self.activation, self.fc1(input)))


class FFNBlock(nn.Module):
    """The transformer's FFN sublayer: ``placement="pre"``: ``x + ffn(norm(x))``;
    ``"post"``: ``norm(x + ffn(x))``; ``norm="layer"`` (LayerNorm) or ``"rms"`` (RMSNorm) over
    ``d_model``.  Submodules ``norm``, ``fc1``, ``fc2``; state dict as :class:`TorchFFNBlock`."""

    def __init__(self, d_model, d_hidden, activation="relu", bias=True, *, norm="layer",
                 placement="pre", eps=1e-5, device=None, dtype=None):
        super().__init__()
        if norm not in ("layer", "rms"):
            raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
        if placement not in ("pre", "post"):
            raise ValueError(f"placement must be 'pre' or 'post', got {placement!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_hidden, self.activation = d_model, d_hidden, activation
        self.norm_kind, self.placement, self.eps = norm, placement, eps
        norms = self._norm_classes()
        self.norm = (norms[0](d_model, eps=eps, **factory) if norm == "layer"
                     else norms[1](d_model, eps=eps, **factory))
        self._step_buffers = StepBuffers()
        _linears(self, d_model, d_hidden, activation, bias, factory)

    @staticmethod
    def _norm_classes():
        return LayerNorm, RMSNorm

    def forward(self, input):
        return NF._ffn_block(input, self.norm.weight, getattr(self.norm, "bias", None),
                             self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                             self.activation, self.norm_kind, self.placement, self.eps,
                             self._step_buffers)

    def release_buffers(self):
        """Forget the arrays the composed FFN keeps for reuse by the next step."""
        self._step_buffers.clear()

    def extra_repr(self):
        return (f"activation={self.activation!r}, norm={self.norm_kind!r}, "
                f"placement={self.placement!r}")


class TorchFFNBlock(FFNBlock):
    """Stock PyTorch counterpart of :class:`FFNBlock` (nn.LayerNorm/nn.RMSNorm, Linear,
    activation, Linear, residual add)."""

    @staticmethod
    def _norm_classes():
        return nn.LayerNorm, nn.RMSNorm

    def forward(self, input):
        return _torch_ref.ffn_block(input, self.norm.weight, getattr(self.norm, "bias", None),
                                    self.fc1.weight, self.fc1.bias, self.fc2.weight,
                                    self.fc2.bias, self.activation, norm=self.norm_kind,
                                    placement=self.placement, eps=self.eps)
