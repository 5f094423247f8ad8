"""normffn in PyTorch: operators with autograd, drop-in modules and ``patch(model)``.

::

    import normffn.torch as nft

    y = nft.layer_norm(x, (768,), weight, bias)           # torch.nn.functional signatures
    ff = nft.FeedForward(512, 2048, activation="gelu")     # fc1/fc2 are nn.Linear
    model = nft.patch(model)                               # nn.LayerNorm etc. -> normffn

The kernels run on zero-copy views of strided CPU float32/float64 tensors.  Anything else
(another device, float16/bfloat16, mixed dtypes, double backward) runs the PyTorch op instead,
with a one-time :class:`FallbackWarning` naming the reason.  The operators are
``torch.ops.normffn.*`` (``torch.library.custom_op`` with autograd and fake kernels), so
``torch.compile(model, fullgraph=True)`` traces through them.  The FFN kernels multiply with
PyTorch's own BLAS (:func:`blas`, :func:`set_blas`): one BLAS and one thread pool per process.

Requires PyTorch (``pip install "normffn[torch]"``); ``import normffn`` never imports it.
"""
try:
    import torch as _torch  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError("normffn.torch needs PyTorch: pip install 'normffn[torch]' (a CPU build "
                      "of torch is enough)") from e

from ._blas import blas, set_blas
from ._util import FallbackWarning
from .functional import batch_norm, ffn, ffn_block, layer_norm, rms_norm
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, FeedForward, FFNBlock, LayerNorm,
                      RMSNorm, TorchFeedForward, TorchFFNBlock)
from .patch import PatchReport, patch, patch_report

__all__ = [
    "layer_norm", "rms_norm", "batch_norm", "ffn", "ffn_block",
    "LayerNorm", "RMSNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FeedForward",
    "FFNBlock",
    "TorchFeedForward", "TorchFFNBlock",
    "patch", "patch_report", "PatchReport", "FallbackWarning", "blas", "set_blas",
]
