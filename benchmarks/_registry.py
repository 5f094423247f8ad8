"""What every asv benchmark class here shares: it is built from the op registry
(:mod:`normffn._ops`), so the shapes, inputs and each provider's call are those of
``python -m normffn bench`` (same seeded data, same ``out=`` buffers, one warm-up call).

``registry_benchmark(name, op, methods, ...)`` makes a class parametrised over
shape x dtype x provider with one ``time_<m>`` per entry of ``methods`` (``m`` -> the
registry's bench-case direction) and ``peakmem_<m>`` for the names in ``peakmem``.  ``setup``
raises NotImplementedError (asv's "skip") when a provider is missing or the case does not apply
to the shape.  ``time_*`` time normffn's headline call (``out=`` where the op has it);
``peakmem_*`` the allocating call.
"""
import timeit

import numpy as np

from normffn import _ops

DTYPES = ["float32", "float64"]
PROVIDERS = ["normffn", "numpy", "torch"]


def _provider(op, case, provider, alloc, normffn_label):
    names = _ops.bench_providers(op, case)
    if provider != "normffn":
        if provider not in names:
            raise NotImplementedError(f"{provider} does not run {op.name} {case.direction}")
        return provider
    if normffn_label:
        return normffn_label
    if not alloc and "normffn out=" in names:
        return "normffn out="
    return "normffn"


class _RegistryBenchmark:
    param_names = ["shape", "dtype", "provider"]
    timer = timeit.default_timer            # wall clock: the kernels are multi-threaded
    timeout = 300
    op = ""
    methods = {}
    peakmem = ()
    normffn_label = None

    def setup(self, shape, dtype, provider):
        op = _ops.get(self.op)
        shape = tuple(shape)
        cases = {c.direction: c for c in op.cases_for(shape)}
        self._calls = {}
        for m, direction in self.methods.items():
            case = cases.get(direction)
            if case is None:
                raise NotImplementedError(f"{op.name} {direction} needs another shape")
            for alloc in ((False, True) if m in self.peakmem else (False,)):
                label = _provider(op, case, provider, alloc, self.normffn_label)
                inp = _ops.bench_inputs(op, case, shape, np.dtype(dtype).name)
                fn = _ops.bench_callable(op, case, label, inp)   # NotImplementedError: skip
                fn()                                             # warm-up, as bench does
                self._calls[(m, alloc)] = fn


def _method(m, alloc):
    def call(self, shape, dtype, provider):
        self._calls[(m, alloc)]()
    call.__name__ = f"{'peakmem' if alloc else 'time'}_{m}"
    return call


def registry_benchmark(name, op, methods, peakmem=(), providers=PROVIDERS, normffn_label=None,
                       doc=""):
    entry = _ops.get(op)
    attrs = {"op": op, "methods": dict(methods), "peakmem": tuple(peakmem),
             "normffn_label": normffn_label, "__doc__": doc,
             "params": ([tuple(s) for s in entry.bench_shapes.values()], DTYPES,
                        list(providers))}
    for m in methods:
        attrs[f"time_{m}"] = _method(m, False)
        if m in peakmem:
            attrs[f"peakmem_{m}"] = _method(m, True)
    return type(name, (_RegistryBenchmark,), attrs)
