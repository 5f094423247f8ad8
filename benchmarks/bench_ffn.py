"""asv benchmarks for the fused FFN (Linear -> ReLU -> Linear): normffn vs NumPy vs torch.

Parametrised over shape (n, d, h) x dtype x provider; ``setup`` raises NotImplementedError
(asv's "skip") when a provider is missing.  Data is seeded and cached per (shape, dtype).
Each method calls exactly the op its name says:

- ``time_forward``: inference (normffn.ffn with a preallocated ``out``; torch under no_grad;
  numpy: the float64 reference).
- ``time_forward_backward``: forward keeping what backward needs, then backward (torch: eager
  nn.Linear -> relu -> nn.Linear with autograd).
- ``FFNRecompute``: the same with ``recompute=True`` (normffn only).
- ``peakmem_*``: the same calls, for asv's peak-RSS tracking.
"""
import functools
import timeit

import numpy as np

SHAPES = [(2048, 768, 3072), (8192, 512, 2048), (512, 1024, 4096)]
DTYPES = ["float32", "float64"]
PROVIDERS = ["normffn", "numpy", "torch"]


@functools.lru_cache(maxsize=2)
def _data(shape, dtype):
    n, d, h = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(dtype)
    dy = rng.standard_normal((n, d)).astype(dtype)
    w1 = (rng.standard_normal((d, h)) / np.sqrt(d)).astype(dtype)
    w2 = (rng.standard_normal((h, d)) / np.sqrt(h)).astype(dtype)
    b1 = (0.1 * rng.standard_normal(h)).astype(dtype)
    b2 = (0.1 * rng.standard_normal(d)).astype(dtype)
    return x, dy, w1, b1, w2, b2


class FFN:
    params = (SHAPES, DTYPES, PROVIDERS)
    param_names = ["shape", "dtype", "provider"]
    timer = timeit.default_timer            # wall clock: BLAS and the kernels are multi-threaded
    timeout = 300

    def setup(self, shape, dtype, provider):
        x, dy, w1, b1, w2, b2 = _data(shape, dtype)
        self.fb_recompute = None
        if provider == "normffn":
            import normffn
            y = np.empty_like(x)
            self.fwd = lambda: normffn.ffn(x, w1, b1, w2, b2, "relu", out=y)
            self.fwd_alloc = lambda: normffn.ffn(x, w1, b1, w2, b2, "relu")

            def fb(recompute):
                def call():
                    _, ctx = normffn.ffn_forward(x, w1, b1, w2, b2, "relu", recompute=recompute)
                    return normffn.ffn_backward(dy, ctx)
                return call
            self.fb = fb(False)
            self.fb_recompute = fb(True)
        elif provider == "numpy":
            from normffn import reference as ref

            def fb():
                _, ctx = ref.ffn_forward(x, w1, b1, w2, b2, "relu")
                return ref.ffn_backward(dy, ctx)
            self.fwd = self.fwd_alloc = lambda: ref.ffn(x, w1, b1, w2, b2, "relu")
            self.fb = fb
        else:
            try:
                import torch
            except ImportError:
                raise NotImplementedError("torch is not installed") from None
            n, d, h = shape
            tdt = getattr(torch, dtype)
            lin1, lin2 = torch.nn.Linear(d, h, dtype=tdt), torch.nn.Linear(h, d, dtype=tdt)
            with torch.no_grad():
                lin1.weight.copy_(torch.from_numpy(w1.T.copy()))
                lin1.bias.copy_(torch.from_numpy(b1))
                lin2.weight.copy_(torch.from_numpy(w2.T.copy()))
                lin2.bias.copy_(torch.from_numpy(b2))
            xt = torch.from_numpy(x).requires_grad_(True)
            dyt = torch.from_numpy(dy)
            params = [xt, *lin1.parameters(), *lin2.parameters()]

            def fwd():
                with torch.no_grad():
                    return lin2(torch.relu(lin1(xt)))

            def fb():
                for p in params:
                    p.grad = None
                lin2(torch.relu(lin1(xt))).backward(dyt)
            self.fwd = self.fwd_alloc = fwd
            self.fb = fb

    def time_forward(self, shape, dtype, provider):
        self.fwd()

    def time_forward_backward(self, shape, dtype, provider):
        self.fb()

    def peakmem_forward(self, shape, dtype, provider):
        self.fwd_alloc()

    def peakmem_forward_backward(self, shape, dtype, provider):
        self.fb()


class FFNRecompute(FFN):
    """forward(recompute=True) + backward: no (n, h) buffer kept (normffn only)."""
    params = (SHAPES, DTYPES, ["normffn"])

    def setup(self, shape, dtype, provider):
        super().setup(shape, dtype, provider)
        self.fb = self.fb_recompute
