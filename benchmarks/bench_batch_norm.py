"""asv benchmarks for BatchNorm: normffn vs the NumPy reference vs torch.

Each class is parametrised over shape x dtype x provider; ``setup`` raises NotImplementedError
(asv's "skip") when a provider is missing.  Data is seeded and cached per (shape, dtype).
Each method calls exactly the op its name says; outputs are preallocated where the provider
allows it.
"""
import functools
import timeit

import numpy as np

SHAPES = [(32, 64, 56, 56), (8192, 768)]
DTYPES = ["float32", "float64"]
PROVIDERS = ["normffn", "numpy", "torch"]


@functools.lru_cache(maxsize=4)
def _data(shape, dtype):
    rng = np.random.default_rng(0)
    C = shape[1]
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal(C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    return x, dy, w, b


def _channels_last(a):
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


class _Base:
    params = (SHAPES, DTYPES, PROVIDERS)
    param_names = ["shape", "dtype", "provider"]
    timer = timeit.default_timer            # wall clock: the kernels are multi-threaded
    training = True
    layout = "contiguous"

    def setup(self, shape, dtype, provider):
        x, dy, w, b = _data(shape, dtype)
        C = shape[1]
        if self.layout == "channels_last":
            if len(shape) < 3:
                raise NotImplementedError("channels-last needs spatial dims")
            x, dy = _channels_last(x), _channels_last(dy)
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        training = self.training
        if provider == "normffn":
            import normffn
            y = np.moveaxis(np.empty_like(np.moveaxis(x, 1, -1)), -1, 1) \
                if self.layout == "channels_last" else np.empty_like(x)
            dx = np.empty_like(y) if self.layout != "channels_last" else \
                np.moveaxis(np.empty_like(np.moveaxis(x, 1, -1)), -1, 1)
            _, ctx = normffn.batch_norm_forward(x, rm, rv, w, b, training)
            self.fwd = lambda: normffn.batch_norm(x, rm, rv, w, b, training, out=y)
            self.fwd_alloc = lambda: normffn.batch_norm(x, rm, rv, w, b, training)
            self.bwd = lambda: normffn.batch_norm_backward(dy, ctx, out=dx)
        elif provider == "numpy":
            from normffn import reference as ref
            rm64, rv64 = rm.astype(np.float64), rv.astype(np.float64)
            _, ctx = ref.batch_norm_forward(x, rm64, rv64, w, b, training)
            self.fwd = self.fwd_alloc = lambda: ref.batch_norm(x, rm64, rv64, w, b, training)
            self.bwd = lambda: ref.batch_norm_backward(dy, ctx)
        else:
            try:
                import torch
            except ImportError:
                raise NotImplementedError("torch is not installed") from None
            xt = torch.from_numpy(np.ascontiguousarray(x))
            dyt = torch.from_numpy(np.ascontiguousarray(dy))
            if self.layout == "channels_last":
                xt = xt.contiguous(memory_format=torch.channels_last)
                dyt = dyt.contiguous(memory_format=torch.channels_last)
            wt, bt = torch.from_numpy(w), torch.from_numpy(b)
            rmt, rvt = torch.from_numpy(rm), torch.from_numpy(rv)
            _, mt, st = torch.ops.aten.native_batch_norm(xt, wt, bt, rmt, rvt, training, 0.1,
                                                         1e-5)
            F = torch.nn.functional
            self.fwd = self.fwd_alloc = lambda: F.batch_norm(xt, rmt, rvt, wt, bt, training,
                                                             0.1, 1e-5)
            self.bwd = lambda: torch.ops.aten.native_batch_norm_backward(
                dyt, xt, wt, rmt, rvt, mt, st, training, 1e-5, [True, True, True])


    def time_forward(self, shape, dtype, provider):
        self.fwd()

    def time_backward(self, shape, dtype, provider):
        self.bwd()

    def peakmem_forward(self, shape, dtype, provider):
        self.fwd_alloc()


# asv skips classes whose name starts with "_" and finds the inherited methods in these.
class TrainNCHW(_Base):
    """Training: batch statistics + running-stat update + normalise; backward."""


class EvalNCHW(_Base):
    """Eval: normalise with the running stats."""
    training = False


class TrainChannelsLast(_Base):
    """Training on channels-last data (x_nhwc.transpose(0, 3, 1, 2); torch channels_last)."""
    layout = "channels_last"
