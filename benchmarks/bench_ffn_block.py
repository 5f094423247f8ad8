"""asv benchmarks for the fused FFN sublayer (``ffn_block``: norm + FFN + residual, pre-LN and
post-LN) against the NumPy reference and torch, from the op registry: shapes, data and calls are
``python -m normffn bench``'s (see ``_registry.py``).

Issue #13's shapes: ReLU with LayerNorm at 2048x768x3072 (``FFNBlock_*``), SwiGLU with RMSNorm
and the packed w1 (d, 2h) at 2048x768x2048 (``GatedFFNBlock_*``); each class skips the other's
shape.  ``time_forward``: inference (``ffn_block(..., out=)``; torch under no_grad);
``time_forward_backward_pre`` / ``_post``: a training step reusing every buffer the API takes
(``ffn_block_forward(..., out=, hidden_out=previous ctx.hidden)`` + ``ffn_block_backward(...,
out=<seven gradients>)``; torch: ``LayerNorm``/``RMSNorm`` + ``Linear`` + activation +
``Linear`` + add, eager autograd); the ``peakmem_*`` are the default, allocating calls.
``*Recompute_normffn``: pre-LN forward(recompute=True) + backward (normffn only)."""
from ._registry import registry_benchmarks

FFNBlock_normffn, FFNBlock_numpy, FFNBlock_torch = registry_benchmarks(
    "FFNBlock", "ffn_block",
    {"forward": "fwd pre relu", "forward_backward_pre": "fwd+bwd pre relu",
     "forward_backward_post": "fwd+bwd post relu"},
    peakmem=("forward", "forward_backward_pre"), doc=__doc__)

(FFNBlockRecompute_normffn,) = registry_benchmarks(
    "FFNBlockRecompute", "ffn_block", {"forward_backward_pre": "fwd+bwd pre relu"},
    peakmem=("forward_backward_pre",), providers=["normffn"], normffn_label="normffn recompute",
    doc="pre-LN ReLU forward(recompute=True) + backward: neither xn nor the (n, h) hidden kept.")

GatedFFNBlock_normffn, GatedFFNBlock_numpy, GatedFFNBlock_torch = registry_benchmarks(
    "GatedFFNBlock", "ffn_block",
    {"forward": "fwd pre swiglu", "forward_backward_pre": "fwd+bwd pre swiglu",
     "forward_backward_post": "fwd+bwd post swiglu"},
    peakmem=("forward", "forward_backward_pre"),
    doc="SwiGLU + RMSNorm sublayer: forward (out=) and training steps (buffers reused); "
        "peakmem: allocating.")

(GatedFFNBlockRecompute_normffn,) = registry_benchmarks(
    "GatedFFNBlockRecompute", "ffn_block", {"forward_backward_pre": "fwd+bwd pre swiglu"},
    peakmem=("forward_backward_pre",), providers=["normffn"],
    normffn_label="normffn recompute",
    doc="pre-RMS SwiGLU forward(recompute=True) + backward: no (n, 2h) hidden kept.")
