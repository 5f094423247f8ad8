"""What every asv benchmark class here shares: it is built from the op registry
(:mod:`normffn._ops`) and times what ``python -m normffn bench`` times, the way bench times it.

``registry_benchmarks(name, op, methods, ...)`` makes one class per provider,
``<name>_normffn``, ``<name>_numpy``, ``<name>_torch`` (in the order of ``providers``), each
parametrised over shape x dtype, with one ``time_<m>`` per entry of ``methods`` (``m`` -> the
registry's bench-case direction) and ``peakmem_<m>`` for the names in ``peakmem``.  ``setup``
raises NotImplementedError (asv's "skip") when the provider is missing (torch not installed) or
the case does not apply to the shape.  ``time_*`` time normffn's headline call (``out=`` where
the op has it); ``peakmem_*`` the allocating call.

Same work as bench: the registry's shapes, seeded inputs, ``out=`` buffers and calls
(``_ops.bench_inputs`` / ``_ops.bench_callable``).

Same process model: asv runs every parameter of every benchmark in a fresh process, and one
class per provider means a process only ever loads one library's OpenMP runtime (the normffn
classes never import torch), as bench's worker per provider does.

Same timing policy (bench's defaults, ``normffn.bench.run``): three untimed warm-up calls, then
calls timed one by one (``number = 1``), 5 to 50 of them filling about 1/3 s per process, in 3
processes (``rounds``); asv reports the median of all calls, as bench does.  The inputs and
callables are built once per process and reused by every timed call: asv re-runs ``setup``
between samples (asv-runner >= 0.3 does so before every call), and a fresh 25 MB input per call
would time cold caches and page faults that bench's repeated calls do not pay.
"""
import timeit

import numpy as np

from normffn import _ops

DTYPES = ["float32", "float64"]
PROVIDERS = ["normffn", "numpy", "torch"]

# bench's defaults (normffn.bench.run: repeat=15, min_time=1.0, rounds=3, spread over the
# rounds) and its warm-up (_calls_for: three untimed calls); tests/test_benchmarks.py checks
# that they still agree.
BENCH_ROUNDS = 3
BENCH_CALLS = (5, 50)             # timed calls per process: at least, at most
BENCH_SECONDS = 1.0 / 3           # per process: time after which to stop once 5 calls are in
WARMUP_CALLS = 3


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


def _build(cls, shape, dtype):
    """{(method, alloc): warmed-up callable} for one class at one (shape, dtype); raises
    NotImplementedError when this provider / shape has no such case."""
    op = _ops.get(cls.op)
    cases = {c.direction: c for c in op.cases_for(shape)}
    calls = {}
    for m, direction in cls.methods.items():
        case = cases.get(direction)
        if case is None:
            raise NotImplementedError(f"{op.name} {direction} needs another shape")
        for alloc in ((False, True) if m in cls.peakmem else (False,)):
            label = _provider(op, case, cls.provider, alloc, cls.normffn_label)
            inp = _ops.bench_inputs(op, case, shape, np.dtype(dtype).name)
            fn = _ops.bench_callable(op, case, label, inp)   # NotImplementedError: skip
            for _ in range(WARMUP_CALLS):
                fn()
            calls[(m, alloc)] = fn
    return calls


class _RegistryBenchmark:
    param_names = ["shape", "dtype"]
    timer = timeit.default_timer            # wall clock: the kernels are multi-threaded
    timeout = 300
    number = 1                              # calls timed one by one, as bench does
    warmup_time = 0                         # setup made bench's warm-up calls
    repeat = (BENCH_CALLS[0], BENCH_CALLS[1], BENCH_SECONDS)
    rounds = BENCH_ROUNDS
    op = ""
    provider = ""
    methods = {}
    peakmem = ()
    normffn_label = None
    _built = (None, None)                   # (shape, dtype) -> calls or the skip, per class

    def setup(self, shape, dtype):
        cls = type(self)
        key = (tuple(shape), np.dtype(dtype).name)
        if cls._built[0] != key:            # first setup of this process (or new parameters)
            cls._built = (None, None)       # free the previous parameters' arrays first
            try:
                built = _build(cls, *key)
            except NotImplementedError as exc:
                built = exc
            cls._built = (key, built)
        built = cls._built[1]
        if isinstance(built, NotImplementedError):
            raise built
        self._calls = built


def _method(m, alloc):
    def call(self, shape, dtype):
        self._calls[(m, alloc)]()
    call.__name__ = f"{'peakmem' if alloc else 'time'}_{m}"
    return call


def registry_benchmarks(name, op, methods, peakmem=(), providers=PROVIDERS, normffn_label=None,
                        doc=""):
    """One asv class per provider, ``<name>_<provider>``, in the order of ``providers``."""
    entry = _ops.get(op)
    params = ([tuple(s) for s in entry.bench_shapes.values()], DTYPES)
    out = []
    for provider in providers:
        attrs = {"op": op, "provider": provider, "methods": dict(methods),
                 "peakmem": tuple(peakmem), "normffn_label": normffn_label,
                 "params": params, "__doc__": f"{provider}: {doc}" if doc else provider}
        for m in methods:
            attrs[f"time_{m}"] = _method(m, False)
            if m in peakmem:
                attrs[f"peakmem_{m}"] = _method(m, True)
        out.append(type(f"{name}_{provider}", (_RegistryBenchmark,), attrs))
    return tuple(out)
