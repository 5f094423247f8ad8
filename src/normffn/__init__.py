"""normffn: fast, accurate CPU kernels for the transformer's building blocks.

LayerNorm, RMSNorm and BatchNorm, the residual add before a norm, the fused feed-forward
block ``act(x @ w1 + b1) @ w2 + b2`` (plain and gated activations) and the whole FFN
sublayer, forward and backward.  NumPy arrays in, NumPy arrays out (float32 or float64);
signatures follow ``torch.nn.functional``.

Every op has three entry points: ``op(...) -> y``, ``op_forward(...) -> (y, ctx)`` and
``op_backward(dy, ctx) -> grads``.  ``normffn.reference`` holds float64 references of each,
``normffn.testing`` the comparison helpers; ``normffn.torch`` and ``normffn.dask`` are the
PyTorch and Dask front ends (optional extras; ``import normffn`` imports neither).

Examples
--------
>>> import numpy as np
>>> import normffn
>>> x = np.arange(6, dtype=np.float32).reshape(2, 3)
>>> y, ctx = normffn.layer_norm_forward(x, 3)
>>> dx, dw, db = normffn.layer_norm_backward(np.ones_like(y), ctx)
>>> y.dtype, dx.shape, dw is None
(dtype('float32'), (2, 3), True)
"""
from .layer_norm import LayerNormContext, layer_norm, layer_norm_backward, layer_norm_forward
from .batch_norm import (BatchNormContext, batch_norm, batch_norm_backward,
                         batch_norm_forward)
from .ffn import FFNContext, ffn, ffn_backward, ffn_forward, pack_gated
from .rms_norm import RMSNormContext, rms_norm, rms_norm_backward, rms_norm_forward
from .add_norm import (AddLayerNormContext, AddRMSNormContext, add_layer_norm,
                       add_layer_norm_backward, add_layer_norm_forward, add_rms_norm,
                       add_rms_norm_backward, add_rms_norm_forward)
from .ffn_block import FFNBlockContext, ffn_block, ffn_block_backward, ffn_block_forward

__version__ = "0.1.0"

__all__ = [
    "LayerNormContext", "layer_norm", "layer_norm_forward", "layer_norm_backward",
    "BatchNormContext", "batch_norm", "batch_norm_forward", "batch_norm_backward",
    "FFNContext", "ffn", "ffn_forward", "ffn_backward", "pack_gated",
    "RMSNormContext", "rms_norm", "rms_norm_forward", "rms_norm_backward",
    "AddLayerNormContext", "add_layer_norm", "add_layer_norm_forward", "add_layer_norm_backward",
    "AddRMSNormContext", "add_rms_norm", "add_rms_norm_forward", "add_rms_norm_backward",
    "FFNBlockContext", "ffn_block", "ffn_block_forward", "ffn_block_backward",
]
