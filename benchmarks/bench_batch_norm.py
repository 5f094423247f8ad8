"""asv benchmarks for BatchNorm (normffn vs the NumPy reference vs torch), from the op registry:
shapes, data and calls are ``python -m normffn bench``'s (see ``_registry.py``)."""
from ._registry import registry_benchmark

TrainNCHW = registry_benchmark(
    "TrainNCHW", "batch_norm", {"forward": "fwd train", "backward": "backward"},
    peakmem=("forward",),
    doc="Training: batch statistics + running-stat update + normalise; backward.")

EvalNCHW = registry_benchmark(
    "EvalNCHW", "batch_norm", {"forward": "fwd eval"}, peakmem=("forward",),
    doc="Eval: normalise with the running stats.")

TrainChannelsLast = registry_benchmark(
    "TrainChannelsLast", "batch_norm", {"forward": "fwd NHWC"}, peakmem=("forward",),
    providers=["normffn", "torch"],
    doc="Training on channels-last data (torch: channels_last); 4-D shapes only.")
