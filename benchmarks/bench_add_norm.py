"""asv benchmarks for the fused residual add + norm (``s = x + residual``, ``y = norm(s)``), from
the op registry: shapes, data and calls are ``python -m normffn bench``'s (see
``_registry.py``).  Backward takes ``ds``, the gradient reaching s (pre-LN); torch is ``x + r``
then ``F.layer_norm`` / ``F.rms_norm``, its backward autograd of the pair (y, s)."""
from ._registry import registry_benchmarks

AddLayerNorm_normffn, AddLayerNorm_numpy, AddLayerNorm_torch = registry_benchmarks(
    "AddLayerNorm", "add_layer_norm", {"forward": "forward", "backward": "backward+ds"},
    peakmem=("forward",), doc="forward (out= pair) and backward with ds (out=)")

AddRMSNorm_normffn, AddRMSNorm_numpy, AddRMSNorm_torch = registry_benchmarks(
    "AddRMSNorm", "add_rms_norm", {"forward": "forward", "backward": "backward+ds"},
    peakmem=("forward",), doc="forward (out= pair) and backward with ds (out=)")
