"""asv benchmarks for the fused FFN (normffn vs the NumPy reference vs torch), from the op
registry: shapes, data and calls are ``python -m normffn bench``'s (see ``_registry.py``).

``time_forward``: inference (normffn.ffn with ``out=``; torch under no_grad);
``time_forward_backward``: forward keeping what backward needs, then backward (torch: eager
autograd); ``FFNRecompute``: the same with ``recompute=True`` (normffn only)."""
from ._registry import registry_benchmark

FFN = registry_benchmark(
    "FFN", "ffn", {"forward": "forward", "forward_backward": "fwd+bwd"},
    peakmem=("forward", "forward_backward"), doc=__doc__)

FFNRecompute = registry_benchmark(
    "FFNRecompute", "ffn", {"forward_backward": "fwd+bwd"}, peakmem=("forward_backward",),
    providers=["normffn"], normffn_label="normffn recompute",
    doc="forward(recompute=True) + backward: no (n, h) buffer kept (normffn only).")
