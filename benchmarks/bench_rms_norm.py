"""asv benchmarks for RMSNorm (normffn vs the NumPy reference vs torch's F.rms_norm), from the op
registry: shapes, data and calls are ``python -m normffn bench``'s (see ``_registry.py``)."""
from ._registry import registry_benchmarks

RMSNorm_normffn, RMSNorm_numpy, RMSNorm_torch = registry_benchmarks(
    "RMSNorm", "rms_norm",
    {"forward": "forward", "backward": "backward", "forward_backward": "fwd+bwd"},
    peakmem=("forward",),
    doc="forward (out=), backward (out=), forward + backward (out=); peakmem: allocating "
        "forward.  torch: F.rms_norm, its backward by autograd.")
