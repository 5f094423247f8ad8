"""asv benchmarks for the fused FFN (normffn vs the NumPy reference vs torch), from the op
registry: shapes, data and calls are ``python -m normffn bench``'s (see ``_registry.py``).

``time_forward``: inference (normffn.ffn with ``out=``; torch under no_grad);
``time_forward_backward``: a training step, forward keeping what backward needs then backward,
reusing every buffer (``ffn_forward(..., out=, hidden_out=previous ctx.hidden)`` +
``ffn_backward(..., out=(dx, dw1, db1, dw2, db2))``; torch: eager autograd); its
``peakmem_*`` is the default, allocating call.  ``FFNRecompute_normffn``: the same with
``recompute=True`` (normffn only).  ``GatedFFN_*``: SwiGLU with the packed w1 (d, 2h) at the gated
bench shapes (torch: Linear -> chunk -> silu(a) * b -> Linear)."""
from ._registry import registry_benchmarks

FFN_normffn, FFN_numpy, FFN_torch = registry_benchmarks(
    "FFN", "ffn", {"forward": "forward", "forward_backward": "fwd+bwd"},
    peakmem=("forward", "forward_backward"), doc=__doc__)

(FFNRecompute_normffn,) = registry_benchmarks(
    "FFNRecompute", "ffn", {"forward_backward": "fwd+bwd"}, peakmem=("forward_backward",),
    providers=["normffn"], normffn_label="normffn recompute",
    doc="forward(recompute=True) + backward: no (n, h) buffer kept (normffn only).")

GatedFFN_normffn, GatedFFN_numpy, GatedFFN_torch = registry_benchmarks(
    "GatedFFN", "ffn_gated", {"forward": "fwd swiglu", "forward_backward": "fwd+bwd swiglu"},
    peakmem=("forward", "forward_backward"),
    doc="SwiGLU: forward (out=) and a training step (every buffer reused); peakmem: allocating.")

(GatedFFNRecompute_normffn,) = registry_benchmarks(
    "GatedFFNRecompute", "ffn_gated", {"forward_backward": "fwd+bwd swiglu"},
    peakmem=("forward_backward",), providers=["normffn"], normffn_label="normffn recompute",
    doc="SwiGLU forward(recompute=True) + backward: no (n, 2h) buffer kept (normffn only).")
