"""asv benchmarks for LayerNorm: normffn vs the NumPy reference vs torch.

Parametrised over shape (transformer shapes and odd ones) x dtype x provider; ``setup`` raises
NotImplementedError (asv's "skip") when a provider is missing.  Data is seeded and cached per
(shape, dtype).  Each method calls exactly the op its name says; ``time_*`` reuse a
preallocated output where the provider allows it (``out=``), ``peakmem_forward`` allocates.
"""
import functools
import timeit

import numpy as np

SHAPES = [(8192, 768), (2048, 4096), (4096, 1024), (1000, 769), (3, 1)]
DTYPES = ["float32", "float64"]
PROVIDERS = ["normffn", "numpy", "torch"]


@functools.lru_cache(maxsize=4)
def _data(shape, dtype):
    rng = np.random.default_rng(0)
    d = shape[-1]
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal(d).astype(dtype)
    b = rng.standard_normal(d).astype(dtype)
    return x, dy, w, b


class LayerNorm:
    params = (SHAPES, DTYPES, PROVIDERS)
    param_names = ["shape", "dtype", "provider"]
    timer = timeit.default_timer            # wall clock: the kernels are multi-threaded

    def setup(self, shape, dtype, provider):
        x, dy, w, b = _data(shape, dtype)
        d = shape[-1]
        if provider == "normffn":
            import normffn
            y, dx = np.empty_like(x), np.empty_like(x)
            _, ctx = normffn.layer_norm_forward(x, d, w, b)
            self.fwd = lambda: normffn.layer_norm(x, d, w, b, out=y)
            self.fwd_alloc = lambda: normffn.layer_norm(x, d, w, b)
            self.bwd = lambda: normffn.layer_norm_backward(dy, ctx, out=dx)
        elif provider == "numpy":
            from normffn import reference as ref
            _, ctx = ref.layer_norm_forward(x, d, w, b)
            self.fwd = self.fwd_alloc = lambda: ref.layer_norm(x, d, w, b)
            self.bwd = lambda: ref.layer_norm_backward(dy, ctx)
        else:
            try:
                import torch
            except ImportError:
                raise NotImplementedError("torch is not installed") from None
            xt, dyt, wt, bt = (torch.from_numpy(a) for a in (x, dy, w, b))
            _, mt, rt = torch.native_layer_norm(xt, [d], wt, bt, 1e-5)
            F = torch.nn.functional
            self.fwd = self.fwd_alloc = lambda: F.layer_norm(xt, [d], wt, bt)
            self.bwd = lambda: torch.ops.aten.native_layer_norm_backward(
                dyt, xt, [d], mt, rt, wt, bt, [True, True, True])

    def time_forward(self, shape, dtype, provider):
        self.fwd()

    def time_backward(self, shape, dtype, provider):
        self.bwd()

    def peakmem_forward(self, shape, dtype, provider):
        self.fwd_alloc()
