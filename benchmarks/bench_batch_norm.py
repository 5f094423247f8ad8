"""asv benchmarks for BatchNorm (normffn vs the NumPy reference vs torch), from the op registry:
shapes, data and calls are ``python -m normffn bench``'s (see ``_registry.py``)."""
from ._registry import registry_benchmarks

TrainNCHW_normffn, TrainNCHW_numpy, TrainNCHW_torch = registry_benchmarks(
    "TrainNCHW", "batch_norm", {"forward": "fwd train", "backward": "backward"},
    peakmem=("forward",),
    doc="Training: batch statistics + running-stat update + normalise; backward.")

EvalNCHW_normffn, EvalNCHW_numpy, EvalNCHW_torch = registry_benchmarks(
    "EvalNCHW", "batch_norm", {"forward": "fwd eval"}, peakmem=("forward",),
    doc="Eval: normalise with the running stats.")

TrainChannelsLast_normffn, TrainChannelsLast_torch = registry_benchmarks(
    "TrainChannelsLast", "batch_norm", {"forward": "fwd NHWC"}, peakmem=("forward",),
    providers=["normffn", "torch"],
    doc="Training on channels-last data (torch: channels_last); 4-D shapes only.")
