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
    """``nn.LayerNorm`` on normffn's kernel (same arguments, parameters and state dict).

    Examples
    --------
    >>> import torch
    >>> import normffn.torch as nft
    >>> ln = nft.LayerNorm(8)
    >>> ln.load_state_dict(torch.nn.LayerNorm(8).state_dict())
    <All keys matched successfully>
    >>> x = torch.randn(2, 8)
    >>> bool(torch.allclose(ln(x), torch.nn.functional.layer_norm(x, (8,)), atol=1e-6))
    True
    """

    def forward(self, input):
        return NF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` on normffn's kernel (same arguments, parameters and state dict).

    Examples
    --------
    >>> import torch
    >>> import normffn.torch as nft
    >>> norm = nft.RMSNorm(8, eps=1e-6)
    >>> isinstance(norm, torch.nn.RMSNorm), norm(torch.randn(3, 8)).shape
    (True, torch.Size([3, 8]))
    """

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
    """``nn.BatchNorm1d`` on normffn's kernels ((N, C) and (N, C, L) inputs).

    Same constructor, parameters, buffers and state dict as PyTorch's; ``momentum=None``
    (cumulative average), ``track_running_stats`` and ``affine=False`` behave as there.

    Examples
    --------
    >>> import torch
    >>> import normffn.torch as nft
    >>> bn = nft.BatchNorm1d(4)
    >>> y = bn(torch.randn(16, 4))
    >>> int(bn.num_batches_tracked), y.shape
    (1, torch.Size([16, 4]))
    """


class BatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` on normffn's kernels (NCHW and channels-last without a copy).

    Examples
    --------
    >>> import torch
    >>> import normffn.torch as nft
    >>> bn = nft.BatchNorm2d(3).eval()
    >>> x = torch.randn(2, 3, 5, 5)
    >>> bool(torch.allclose(bn(x), torch.nn.BatchNorm2d(3).eval()(x), atol=1e-6))
    True
    """


class BatchNorm3d(_BatchNormMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` on normffn's kernels (NCDHW and channels-last without a copy).

    Examples
    --------
    >>> import torch
    >>> import normffn.torch as nft
    >>> nft.BatchNorm3d(2)(torch.randn(2, 2, 3, 3, 3)).shape
    torch.Size([2, 2, 3, 3, 3])
    """


def _linears(module, d_model, d_hidden, activation, bias, factory):
    """fc1: d_model -> d_hidden (2 * d_hidden for gated activations: gate rows, then up rows),
    fc2: d_hidden -> d_model, both nn.Linear."""
    width = 2 * d_hidden if activation in GATED else d_hidden
    module.fc1 = nn.Linear(d_model, width, bias=bias, **factory)
    module.fc2 = nn.Linear(d_hidden, d_model, bias=bias, **factory)


class FeedForward(nn.Module):
    """``fc2(act(fc1(x)))`` fused: ``nn.Linear`` → activation → ``nn.Linear`` as one module.

    For "swiglu"/"geglu"/"reglu" ``fc1`` has ``2 * d_hidden`` outputs, the gate's rows first.
    State dict: ``fc1.*``, ``fc2.*``, as :class:`TorchFeedForward`.

    In eager mode, step after step, the kernels write the hidden activation, the output and the
    gradients into the previous step's arrays once nothing references those any more (a buffer
    still saved by a graph or held as a ``.grad`` is never overwritten).
    :meth:`release_buffers` drops them.

    Parameters
    ----------
    d_model : int
        Input and output features.
    d_hidden : int
        Hidden units.
    activation : {"relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "reglu"}
        The activation.
    bias : bool
        Whether fc1 and fc2 have biases.
    recompute : bool
        Keep no (tokens × d_hidden) activation for backward (backward redoes the first GEMM).
    device, dtype
        As for ``nn.Linear``.

    Examples
    --------
    >>> import torch
    >>> import normffn.torch as nft
    >>> ff = nft.FeedForward(8, 32, activation="swiglu")
    >>> ff.fc1.weight.shape                                   # gate rows, then up rows
    torch.Size([64, 8])
    >>> ref = nft.TorchFeedForward(8, 32, activation="swiglu")
    >>> ref.load_state_dict(ff.state_dict())
    <All keys matched successfully>
    >>> x = torch.randn(4, 8)
    >>> bool(torch.allclose(ff(x), ref(x), atol=1e-5))
    True
    """

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
    """Stock PyTorch counterpart of :class:`FeedForward` (Linear → activation → Linear).

    Same constructor and state dict; for comparisons and benchmarks.
    """

    def forward(self, input):
        return self.fc2(_torch_ref.activation(self.activation, self.fc1(input)))


class FFNBlock(nn.Module):
    """The transformer's FFN sublayer as a module.

    ``placement="pre"``: ``x + ffn(norm(x))``; ``"post"``: ``norm(x + ffn(x))``;
    ``norm="layer"`` (LayerNorm) or ``"rms"`` (RMSNorm) over ``d_model``.  Submodules ``norm``,
    ``fc1``, ``fc2``; state dict as :class:`TorchFFNBlock`.

    Parameters
    ----------
    d_model, d_hidden : int
        Features and hidden units.
    activation : {"relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "reglu"}
        The FFN's activation.
    bias : bool
        Whether fc1 and fc2 have biases.
    norm : {"layer", "rms"}
        The norm.
    placement : {"pre", "post"}
        Where the norm sits.
    eps : float
        The norm's eps.
    device, dtype
        As for ``nn.Linear``.

    In eager training, step after step, the fused kernels write the output, the hidden
    activation and the gradients into the previous step's arrays once nothing references those
    any more (as :class:`FeedForward`); :meth:`release_buffers` drops them.

    Raises
    ------
    ValueError
        norm or placement not one of the choices.

    Examples
    --------
    >>> import torch
    >>> import normffn.torch as nft
    >>> block = nft.FFNBlock(8, 16, norm="rms", placement="post")
    >>> sorted(block.state_dict())
    ['fc1.bias', 'fc1.weight', 'fc2.bias', 'fc2.weight', 'norm.weight']
    >>> ref = nft.TorchFFNBlock(8, 16, norm="rms", placement="post")
    >>> ref.load_state_dict(block.state_dict())
    <All keys matched successfully>
    >>> x = torch.randn(3, 8)
    >>> bool(torch.allclose(block(x), ref(x), atol=1e-5))
    True
    """

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
        """Forget the arrays kept for reuse by the next step (memory in use is not touched)."""
        self._step_buffers.clear()

    def extra_repr(self):
        return (f"activation={self.activation!r}, norm={self.norm_kind!r}, "
                f"placement={self.placement!r}")


class TorchFFNBlock(FFNBlock):
    """Stock PyTorch counterpart of :class:`FFNBlock`.

    ``nn.LayerNorm``/``nn.RMSNorm``, Linear, activation, Linear, residual add; same
    constructor and state dict.
    """

    @staticmethod
    def _norm_classes():
        return nn.LayerNorm, nn.RMSNorm

    def forward(self, input):
        return _torch_ref.ffn_block(input, self.norm.weight, getattr(self.norm, "bias", None),
                                    self.fc1.weight, self.fc1.bias, self.fc2.weight,
                                    self.fc2.bias, self.activation, norm=self.norm_kind,
                                    placement=self.placement, eps=self.eps)
