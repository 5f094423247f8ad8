"""asv benchmarks for LayerNorm (normffn vs the NumPy reference vs torch), from the op registry:
shapes, data and calls are ``python -m normffn bench``'s (see ``_registry.py``)."""
from ._registry import registry_benchmarks

LayerNorm_normffn, LayerNorm_numpy, LayerNorm_torch = registry_benchmarks(
    "LayerNorm", "layer_norm", {"forward": "forward", "backward": "backward"},
    peakmem=("forward",), doc="forward (out=) and backward (out=); peakmem: allocating forward")
