"""Smoke-run every asv benchmark once, at its smallest shape, for every other parameter.

A benchmark that raises (other than asv's NotImplementedError skip) fails CI here, in seconds,
instead of silently dropping out of the asv history.
"""
from __future__ import annotations

import importlib.util
import inspect
import itertools
import math
import pathlib

import pytest

BENCH_DIR = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _modules():
    for path in sorted(BENCH_DIR.glob("bench_*.py")):
        spec = importlib.util.spec_from_file_location(f"_asv_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield path.stem, mod


def _cases():
    for name, mod in _modules():
        for cname, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ != mod.__name__ or cname.startswith("_"):
                continue
            methods = [m for m in dir(cls) if m.startswith(("time_", "peakmem_", "mem_"))]
            if not methods:
                continue
            params = cls.params if isinstance(cls.params[0], (list, tuple)) else (cls.params,)
            names = list(getattr(cls, "param_names", [f"p{i}" for i in range(len(params))]))
            grids = [list(params)]
            if "shape" in names:  # smallest shape first; larger ones only if it is skipped
                i = names.index("shape")
                grids = [params[:i] + ([s],) + params[i + 1:]
                         for s in sorted(params[i], key=math.prod)]
            yield pytest.param(cls, methods, grids, id=f"{name}.{cname}")


@pytest.mark.parametrize("cls, methods, grids", list(_cases()))
def test_benchmark_runs(cls, methods, grids):
    ran = 0
    for grid in grids:
        for combo in itertools.product(*grid):
            bench = cls()
            try:
                if hasattr(bench, "setup"):
                    bench.setup(*combo)
            except NotImplementedError:
                continue  # asv's skip: provider not installed / combination not applicable
            for m in methods:
                getattr(bench, m)(*combo)
                ran += 1
            if hasattr(bench, "teardown"):
                bench.teardown(*combo)
        if ran:
            break
    assert ran > 0, f"{cls.__name__}: every parameter combination was skipped"
