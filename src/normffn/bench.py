"""``python -m normffn bench``: normffn vs torch (and the NumPy reference), one table per op.

What is timed comes from the op registry (:mod:`normffn._ops`): per op its bench shapes, the
cases of each shape (forward, backward, ...), the providers' callables and the rate model.

Process model (default): every provider is timed in its OWN process — a worker
``python -m normffn.bench --worker SPEC`` per provider family (normffn, torch, numpy, and the
machine-limit probe) per round, for one (op, shape, dtype, threads) at a time; the families
alternate process by process, in a rotated order each round, for ``--rounds`` rounds.  torch and
normffn each load their own OpenMP runtime, and in one process the other library's spinning
workers distort timings both ways; separate processes remove that.  Each worker warms up, then
times calls one by one; the table shows the median of all calls of all rounds, ± half the
range of the per-round medians (how much a fresh process moves it).  ``--in-process`` keeps the
old mode: all providers in this process, interleaved round by round in random order, a short
call timed right after an untimed one, ± half the inter-quartile range.

Rates: norms report GB/s (forward moves 2·numel·itemsize, backward 3·; add + norm 4· both, as
it reads x and residual and writes y and s, backward reads dy, s, ds and writes dsum) and the
fraction of the copy bandwidth for the forward's bytes (``normffn._kernels._bench.parallel_copy``);
the FFNs report GFLOP/s and the fraction of their bare GEMMs' rate (gated: x·w1 of width 2h,
hidden·w2; the FFN sublayer ``ffn_block`` against its own bare GEMMs, so the norm, activation
and residual must hide inside them); both limits measured in the same run, in their own
process.  For the FFNs' forward+backward, ``normffn out=`` is a training step that reuses every
buffer (``ffn_forward(..., out=, hidden_out=previous ctx.hidden)`` + ``ffn_backward(...,
out=(dx, dw1, db1, dw2, db2))``; ``ffn_block`` the same with its seven gradients);
``normffn`` is the default, allocating call; ``normffn unfused`` (``ffn_block``) the same
sublayer composed from the separate ops (``layer_norm`` / ``add_layer_norm`` + ``ffn``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field

import numpy as np

from . import _ops

__all__ = ["Case", "run", "main", "summarize", "format_tables", "parse_threads"]

FAMILIES = ("normffn", "torch", "numpy", "limit")
SPEEDUP_TITLE = "normffn vs torch (×, higher is faster)"
SPEEDUP_HEADER = ("normffn vs", "torch (×,", "higher is", "faster)")   # the title, 4 lines


@dataclass
class Case:
    """One timed row: an op's bench case at one shape, dtype and thread count."""

    op: str
    direction: str
    call: str
    shape: tuple
    dtype: str
    threads: int | None
    work: float                   # bytes or flops per call
    unit: str
    providers: list               # labels, normffn's headline first
    limit_name: str = ""
    limit_work: float = 0.0
    results: dict = field(default_factory=dict)   # label (or "__limit__") -> timing dict

    @property
    def shape_str(self) -> str:
        return "×".join(map(str, self.shape))


def _family(provider: str) -> str:
    return "limit" if provider == "__limit__" else provider.split()[0]


# ---------------------------------------------------------------- timing primitives
def _time_calls(fn, calls: int) -> list:
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _calls_for(fn, repeat: int, min_time: float) -> int:
    """Warm up (caches, page faults, thread pools), then choose how many calls fill min_time:
    at least ``repeat``, at most ``10 * repeat``."""
    fn()
    fn()
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-7)
    return max(repeat, min(10 * repeat, int(min_time / one)))


def _stats(samples: list, round_medians: list | None = None) -> dict:
    a = np.asarray(samples)
    med = float(np.median(a))
    q1, q3 = float(np.percentile(a, 25)), float(np.percentile(a, 75))
    if round_medians and len(round_medians) > 1:
        spread = (max(round_medians) - min(round_medians)) / 2
    else:
        spread = (q3 - q1) / 2
    return {"median_s": med, "q1_s": q1, "q3_s": q3, "spread_s": spread, "calls": len(samples),
            "round_medians_s": list(round_medians or [med])}


# ---------------------------------------------------------------- worker (one process)
def _apply_threads(threads):
    """Inside a worker: OMP/BLAS threads come from the environment the parent set; torch is
    told as well (it may have been imported before)."""
    if threads:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(threads)


def worker(spec: dict) -> dict:
    """Time one provider family on one (op, shape, dtype): {label: {direction: [seconds]}}."""
    op = _ops.get(spec["op"])
    shape, dtype, family = tuple(spec["shape"]), spec["dtype"], spec["family"]
    out = {}
    for case in op.cases_for(shape):
        if spec.get("directions") and case.direction not in spec["directions"]:
            continue
        if family == "limit":
            name, fn, _ = _ops.limit_probe(op, shape, dtype, case)
            calls = {"__limit__": fn}
        else:
            calls = {}
            for p in _ops.bench_providers(op, case, numpy=True, torch=True):
                if _family(p) != family:
                    continue
                inp = _ops.bench_inputs(op, case, shape, dtype, spec.get("seed", 0))
                try:
                    calls[p] = _ops.bench_callable(op, case, p, inp)
                except NotImplementedError:
                    continue
            _apply_threads(spec.get("threads"))
        for label, fn in calls.items():
            n = _calls_for(fn, spec["repeat"], spec["min_time"])
            out.setdefault(label, {})[case.direction] = _time_calls(fn, n)
    return out


def _worker_main(argv) -> int:
    spec = json.loads(argv[0])
    res = worker(spec)
    sys.stdout.write("NORMFFN-RESULT " + json.dumps(res) + "\n")
    return 0


def _thread_env(threads):
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    if threads:
        for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[k] = str(threads)
    return env


def _spawn(spec: dict) -> dict:
    r = subprocess.run([sys.executable, "-m", "normffn.bench", "--worker", json.dumps(spec)],
                       capture_output=True, text=True, env=_thread_env(spec.get("threads")))
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("NORMFFN-RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"bench worker {spec['family']} for {spec['op']} {spec['shape']} "
                           f"failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("NORMFFN-RESULT "):])


# ---------------------------------------------------------------- progress
class Progress:
    """``[3/17] layer_norm 8192×768 float32 torch, round 2/3 … 12 s left`` on stderr."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def start(self, label: str) -> None:
        i = self.done + 1
        left = ""
        if self.done:
            rate = (time.perf_counter() - self.t0) / self.done
            left = f" … {_fmt_secs(rate * (self.total - self.done))} left"
        line = f"[{i}/{self.total}] {label}{left}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish_one(self) -> None:
        self.done += 1
        if self.done == self.total and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _fmt_secs(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


# ---------------------------------------------------------------- running
def _cases_of(op: _ops.Op, shape, dtype: str, threads, numpy: bool, torch: bool) -> list:
    cases = []
    for bc in op.cases_for(shape):
        cases.append(Case(op.name, bc.direction, bc.call, tuple(shape), dtype, threads,
                          _ops.case_work(op, bc, shape, dtype), op.unit,
                          _ops.bench_providers(op, bc, numpy=numpy, torch=torch),
                          op.limit, _ops.limit_work(op, shape, dtype, bc)))
    return cases


def _groups(ops, shapes, dtypes, threads_list):
    """[(op, shape, dtype, threads)] in run order; ``shapes``: op name -> list of shapes."""
    out = []
    for threads in threads_list:
        for name in ops:
            op = _ops.get(name)
            for shape in shapes[name]:
                for dt in dtypes:
                    out.append((op, tuple(shape), np.dtype(dt).name, threads))
    return out


def _run_processes(groups, repeat, min_time, rounds, numpy, torch, progress_stream, seed):
    cases = []
    plan = []
    for op, shape, dt, threads in groups:
        cs = _cases_of(op, shape, dt, threads, numpy, torch)
        fams = [f for f in FAMILIES if f == "limit" or any(_family(p) == f
                                                           for c in cs for p in c.providers)]
        plan.append((op, shape, dt, threads, cs, fams))
    total = sum(len(f) for *_, f in plan) * rounds
    prog = Progress(total, progress_stream)
    per_round = max(1, math.ceil(repeat / rounds))
    for op, shape, dt, threads, cs, fams in plan:
        samples, medians = {}, {}
        for r in range(rounds):
            order = fams[r % len(fams):] + fams[:r % len(fams)]   # rotate: no fixed neighbour
            for fam in order:
                prog.start(f"{op.name} {'×'.join(map(str, shape))} {dt}"
                           f"{f' {threads} thr' if threads else ''} {fam}, round {r + 1}/{rounds}")
                spec = {"op": op.name, "shape": list(shape), "dtype": dt, "family": fam,
                        "threads": threads, "repeat": per_round,
                        "min_time": min_time / rounds, "seed": seed}
                res = _spawn(spec)
                for label, per_dir in res.items():
                    for direction, ts in per_dir.items():
                        samples.setdefault((label, direction), []).extend(ts)
                        medians.setdefault((label, direction), []).append(float(np.median(ts)))
                prog.finish_one()
        for c in cs:
            c.providers = [p for p in c.providers if (p, c.direction) in samples]
            for label in c.providers + ["__limit__"]:
                key = (label, c.direction)
                if key in samples:
                    c.results[label] = _stats(samples[key], medians[key])
        cases += cs
    return cases


# Providers whose call takes less than this get one untimed call right before each timed one
# (in-process mode only; see _measure_in_process).
SETTLE_BELOW_S = 0.05


def _measure_in_process(calls: dict, repeat: int, min_time: float, rng) -> dict:
    """Interleave providers (and the limit probe) round by round in random order."""
    one = {}
    for k, f in calls.items():
        f()
        f()
        t = time.perf_counter()
        f()
        one[k] = time.perf_counter() - t
    one_round = max(sum(one.values()), 1e-6)
    rounds = max(repeat, min(10 * repeat, int(min_time / one_round)))
    times = {k: [] for k in calls}
    order = list(calls.items())
    for _ in range(rounds):
        # a fresh random order every round, so no provider keeps inheriting a warm (or a
        # trashed) cache, or a neighbour's spinning thread pool, from the same predecessor
        for i in rng.permutation(len(order)):
            k, f = order[i]
            if one[k] < SETTLE_BELOW_S:
                f()   # untimed: another library's OpenMP workers may still be spinning
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: _stats(ts) for k, ts in times.items()}


def _run_in_process(groups, repeat, min_time, numpy, torch, progress_stream, seed):
    plan = [(g, _cases_of(g[0], g[1], g[2], g[3], numpy, torch)) for g in groups]
    prog = Progress(sum(len(cs) for _, cs in plan), progress_stream)
    rng = np.random.default_rng(0)
    cases = []
    for (op, shape, dt, threads), cs in plan:
        with _threads_in_process(threads):
            for c, bc in zip(cs, op.cases_for(shape)):
                prog.start(f"{op.name} {c.shape_str} {dt} {c.direction}")
                calls = {}
                for p in c.providers:
                    inp = _ops.bench_inputs(op, bc, shape, dt, seed)
                    try:
                        calls[p] = _ops.bench_callable(op, bc, p, inp)
                    except NotImplementedError:
                        pass
                c.providers = [p for p in c.providers if p in calls]
                calls["__limit__"] = _ops.limit_probe(op, shape, dt, bc)[1]
                c.results = _measure_in_process(calls, repeat, min_time, rng)
                prog.finish_one()
                cases.append(c)
    return cases


class _threads_in_process:
    """Limit OpenMP/BLAS (threadpoolctl) and torch threads in this process."""

    def __init__(self, threads):
        self.threads, self.limits, self.old = threads, None, None

    def __enter__(self):
        if not self.threads:
            return self
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            raise SystemExit("--threads with --in-process needs threadpoolctl: "
                             "pip install 'normffn[bench]'") from None
        self.limits = threadpool_limits(limits=self.threads)
        torch = _ops.torch_or_none()
        if torch is not None:
            self.old = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc):
        if self.limits is not None:
            self.limits.unregister()
        if self.old is not None:
            _ops.torch_or_none().set_num_threads(self.old)


def run(ops=None, shapes=None, dtypes=("float32",), threads=(None,), repeat=15, min_time=1.0,
        rounds=3, in_process=False, numpy=False, torch=True, progress_stream=None, seed=0):
    """Measure every case; returns a list of :class:`Case` with ``results`` filled.

    ``shapes``: op name -> list of shapes (default: each op's ``default_shapes``);
    ``threads``: list of thread counts (None: all cores)."""
    ops = list(ops or _ops.OPS)
    shapes = dict(shapes or {})
    for name in ops:
        op = _ops.get(name)
        shapes.setdefault(name, [op.bench_shapes[s] for s in op.default_shapes])
    if isinstance(threads, int) or threads is None:
        threads = [threads]
    groups = _groups(ops, shapes, dtypes, list(threads))
    if in_process:
        return _run_in_process(groups, repeat, min_time, numpy, torch, progress_stream, seed)
    return _run_processes(groups, repeat, min_time, rounds, numpy, torch, progress_stream, seed)


# ---------------------------------------------------------------- reporting
def summarize(case: Case) -> dict:
    """Derived numbers for one case: per provider median, spread, rate; the limit; speed-ups
    (``speedup[k]`` = time of k / time of normffn's headline: > 1 means normffn is faster)."""
    head = case.providers[0]
    out = {"op": case.op, "direction": case.direction, "shape": "x".join(map(str, case.shape)),
           "dtype": case.dtype, "threads": case.threads, "unit": case.unit, "providers": {}}
    for k in case.providers:
        r = case.results[k]
        out["providers"][k] = {"median_ms": r["median_s"] * 1e3,
                               "spread_ms": r["spread_s"] * 1e3,
                               "iqr_ms": (r["q3_s"] - r["q1_s"]) * 1e3,
                               "calls": r["calls"],
                               "round_medians_ms": [v * 1e3 for v in r["round_medians_s"]],
                               "rate": case.work / r["median_s"] / 1e9}
    if "__limit__" in case.results:
        lim_rate = case.limit_work / case.results["__limit__"]["median_s"] / 1e9
        out["limit"] = {"name": case.limit_name, "rate": lim_rate}
        out["fraction_of_limit"] = out["providers"][head]["rate"] / lim_rate
    t_head = case.results[head]["median_s"]
    out["speedup"] = {k: case.results[k]["median_s"] / t_head
                      for k in case.providers if k != head}
    return out


def _fmt_ms(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _fmt_rate(v: float) -> str:
    """Three significant digits (at least the units)."""
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 \
        else f"{v:.3f}"


def _time_cell(p) -> str:
    rel = 100 * p["spread_ms"] / p["median_ms"] if p["median_ms"] else 0.0
    return f"{_fmt_ms(p['median_ms'])} ±{rel:.0f}%"


def _column_of(provider: str) -> str:
    return "torch" if provider.startswith("torch") else provider


def _header_lines(heads: list) -> list:
    """Header cells with line breaks -> rows of header lines, bottom-aligned."""
    split = [h.split("\n") for h in heads]
    n = max(len(p) for p in split)
    return [[(p[len(p) - n + i] if i >= n - len(p) else "") for p in split] for i in range(n)]


def _render(header_lines: list, rows: list, left: int) -> list:
    """Columns right-aligned except the first ``left``; header cells may span several lines."""
    ncol = len(rows[0]) if rows else len(header_lines[0])
    widths = [max([len(h[i]) for h in header_lines] + [len(r[i]) for r in rows])
              for i in range(ncol)]

    def fmt(row):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return [fmt(h) for h in header_lines] + ["  ".join("-" * w for w in widths)] + \
        [fmt(r) for r in rows]


TABLE_WIDTH = 100


def _split_wide(heads: list, rows: list, cols: list):
    """``((heads, rows), None)``, or when the table is wider than TABLE_WIDTH columns and has
    more than two normffn columns: the main table without the normffn columns after the first
    two, and a second table of shape, dir and those columns."""
    width = len(_render(_header_lines(heads), rows, 2)[-len(rows) - 1]) if rows else 0
    moved = [i for i, k in enumerate(cols) if _family(k) == "normffn"][2:]
    if width <= TABLE_WIDTH or not moved:
        return (heads, rows), None
    moved_at = {2 + i for i in moved}
    keep = [i for i in range(len(heads)) if i not in moved_at]
    extra = [0, 1] + sorted(moved_at)
    return (([heads[i] for i in keep], [[r[i] for i in keep] for r in rows]),
            ([heads[i] for i in extra], [[r[i] for i in extra] for r in rows]))


def _l3_mib() -> float:
    try:
        from ._tuning import l3_bytes
        return l3_bytes() / 2**20
    except Exception:  # noqa: BLE001 - informative only
        return 32.0


def format_tables(cases) -> str:
    """One table per (op, dtype, threads): shapes as rows, providers as columns."""
    blocks = []
    keys = []
    for c in cases:
        k = (c.op, c.dtype, c.threads)
        if k not in keys:
            keys.append(k)
    for op_name, dtype, threads in keys:
        sel = [c for c in cases if (c.op, c.dtype, c.threads) == (op_name, dtype, threads)]
        sums = [summarize(c) for c in sel]
        seen = [_column_of(p) for c in sel for p in c.providers]
        cols = list(dict.fromkeys(k for fam in ("normffn", "numpy", "torch") for k in seen
                                  if _family(k) == fam))
        unit = sel[0].unit
        limit = sel[0].limit_name
        has_torch = "torch" in cols
        heads = ["shape", "dir"] + [k.replace(" ", "\n", 1) for k in cols] + \
            (["\n".join(SPEEDUP_HEADER)] if has_torch else []) + [unit, f"% of\n{limit}"]
        rows, notes = [], []
        for c, s in zip(sel, sums):
            row = [c.shape_str, c.direction]
            byc = {_column_of(k): v for k, v in s["providers"].items()}
            row += [_time_cell(byc[k]) if k in byc else "-" for k in cols]
            if has_torch:
                sp = [v for k, v in s["speedup"].items() if k.startswith("torch")]
                row.append(_fmt_rate(sp[0]) if sp else "-")
            head = s["providers"][c.providers[0]]
            row.append(_fmt_rate(head["rate"]))
            frac = s.get("fraction_of_limit")
            mark = ""
            if frac is not None and frac > 1.0 and limit == "copy":
                mark = "†"
                if not notes:
                    notes.append(c)
            row.append(f"{100 * frac:.0f}%{mark}" if frac is not None else "-")
            rows.append(row)
        title = (f"{op_name} · {dtype} · {threads or 'all'} thread{'s' if threads != 1 else ''}"
                 f": times in ms (median ± spread);\n  {unit} and % of limit are for "
                 f"normffn's first column")
        per_shape = {}
        for c, sm in zip(sel, sums):
            if "limit" in sm:
                per_shape.setdefault(c.shape_str, {}).setdefault(c.limit_work, (c.direction,
                                                                               sm["limit"]))
        lim = [f"{shp} " + ", ".join((f"{d} " if len(v) > 1 else "") + _fmt_rate(x["rate"])
                                     for d, x in v.values()) + f" {unit}"
               for shp, v in per_shape.items()]
        glue = "; " if sum(len(t) for t in lim) < 50 else "\n    "
        block = [title, f"  machine limit ({limit}, same run):{glue if glue != '; ' else ' '}"
                        f"{glue.join(lim)}", ""]
        main, extra = _split_wide(heads, rows, cols)
        block += _render(_header_lines(main[0]), main[1], 2)
        if extra:
            block += ["", "  more normffn variants (same cases, ms):", ""]
            block += _render(_header_lines(extra[0]), extra[1], 2)
        if notes:
            mib = 3 * math.prod(notes[0].shape) * np.dtype(dtype).itemsize / 2**20
            block.append(
                f"† faster than the same-run copy probe (memcpy of the same bytes, all threads).\n"
                f"  The probe is not a hard ceiling: between repeated calls part of the data\n"
                f"  (≤ {mib:.0f} MiB here) stays in the {_l3_mib():.0f} MiB L3, which the kernel "
                f"reuses, while\n  glibc's memcpy picks non-temporal stores that bypass the "
                f"cache.  Read such %\n  as 'relative to memcpy', not as a fraction of DRAM "
                f"bandwidth.")
        blocks.append("\n".join(block))
    return "\n\n".join(blocks)


def format_scaling(cases) -> str:
    """Per case: normffn's and torch's time at each thread count and the parallel efficiency
    of the largest count against the smallest (100% = perfect scaling)."""
    counts = sorted({c.threads for c in cases if c.threads})
    if len(counts) < 2:
        return ""
    lo, hi = counts[0], counts[-1]
    by = {}
    for c in cases:
        by.setdefault((c.op, c.shape, c.dtype, c.direction), {})[c.threads] = c
    rows = []
    for (op, shape, dtype, direction), per in by.items():
        row = [op, "×".join(map(str, shape)), direction]
        for fam in ("normffn", "torch", "__limit__"):
            t = {}
            for k, c in per.items():
                label = "__limit__" if fam == "__limit__" else next(
                    (p for p in c.providers if _family(p) == fam), None)
                if label in c.results:
                    t[k] = c.results[label]["median_s"]
            row += [_fmt_ms(t[k] * 1e3) if k in t else "-" for k in counts]
            row.append(f"{100 * t[lo] * lo / (t[hi] * hi):.0f}%" if lo in t and hi in t else "-")
        rows.append(row)
    head = ["op", "shape", "dir"]
    for fam in ("normffn", "torch", "limit"):
        head += [f"{fam} {k}t" for k in counts] + ["eff"]
    text = _render([head], rows, 3)
    return "\n".join([
        f"Scaling: ms at each thread count; eff = t({lo}) · {lo} / (t({hi}) · {hi}) "
        f"(100% = perfect).",
        "A kernel scaling like the limit column (copy / GEMM probe) is bound by what the probe",
        "measures; one scaling better than its copy probe is per-core bound, not DRAM bound.",
        ""] + text)


def machine_line(threads_list) -> str:
    import platform
    from importlib import metadata

    from . import __version__

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        torch_v = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_v = "not installed"
    blas = _blas_info()
    thr = ", ".join(str(t) if t else f"all ({os.cpu_count()})" for t in threads_list)
    return (f"normffn {__version__}; {cpu}, {os.cpu_count()} cpus; threads: {thr}; "
            f"numpy {np.__version__}; torch {torch_v}; BLAS: {blas}")


def _blas_info() -> str:
    """The BLAS normffn calls (scipy's), from threadpoolctl if installed, else from scipy's
    build configuration."""
    try:
        from threadpoolctl import threadpool_info
        import scipy.linalg  # noqa: F401 - loads the BLAS so threadpoolctl sees it
        info = [f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads)"
                for i in threadpool_info() if i.get("user_api") == "blas"]
        if info:
            return ", ".join(dict.fromkeys(info))
    except ImportError:
        pass
    try:
        import scipy
        cfg = scipy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"scipy's {cfg.get('name')} {cfg.get('version')} (scipy build configuration)"
    except Exception:  # noqa: BLE001 - informative only
        return "scipy's BLAS (version unknown)"


def _colours(names):
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#17becf", "#bcbd22"]
    return {n: palette[i % len(palette)] for i, n in enumerate(sorted(names))}


def plot(cases, path: str) -> None:
    """Bar chart of achieved rate per case vs the machine limit measured in the same run; one
    colour per provider across panels, legend below the bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [summarize(c) for c in cases]
    units = sorted({r["unit"] for r in rows})
    names = []
    for r in rows:
        names += [_column_of(k) for k in r["providers"] if _column_of(k) not in names]
    colour = _colours(names)
    colour["machine limit (same run)"] = "0.7"
    fig, axes = plt.subplots(1, len(units), figsize=(8 * len(units), 6), squeeze=False)
    for ax, unit in zip(axes[0], units):
        sel = [r for r in rows if r["unit"] == unit]
        labels = [f"{r['op']} {r['direction']}\n{r['shape']} {r['dtype']}"
                  + (f" {r['threads']}t" if r["threads"] else "") for r in sel]
        width = 0.8 / (len(names) + 1)
        xs = np.arange(len(sel))
        for i, k in enumerate(names):
            vals = [next((p["rate"] for q, p in r["providers"].items() if _column_of(q) == k), 0)
                    for r in sel]
            ax.bar(xs + i * width, vals, width, label=k, color=colour[k])
        ax.bar(xs + len(names) * width, [r.get("limit", {}).get("rate", 0) for r in sel], width,
               label="machine limit (same run)", color=colour["machine limit (same run)"])
        ax.set_xticks(xs + 0.4 - width / 2, labels, fontsize=7, rotation=35, ha="right")
        ax.set_ylabel(unit)
        ax.set_title(f"normffn: achieved {unit}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- command line
def parse_threads(text: str) -> list:
    """``"2"`` -> [2]; ``"1,2"`` -> [1, 2]."""
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads takes N or a list N,M,..., got {text!r}"
                                         ) from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"--threads values must be >= 1, got {text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", action="append", choices=list(_ops.OPS),
                   help="op to run (repeatable; default: all)")
    p.add_argument("--shape", action="append",
                   help="shape such as 8192x768 (or a bench-shape name); repeatable; applies "
                        "to each chosen op whose format it fits: " +
                        "; ".join(f"{o.name} {o.shape_format}" for o in _ops.OPS.values()))
    p.add_argument("--dtype", action="append", choices=["float32", "float64"],
                   help="dtype (repeatable; default float32)")
    p.add_argument("--threads", type=parse_threads, default=None,
                   help="threads for normffn, BLAS and torch: N, or a list 1,2 for a scaling "
                        "table (default: all cores)")
    p.add_argument("--repeat", type=int, default=15, help="minimum timed calls per case")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="target seconds of timed calls per case and provider")
    p.add_argument("--rounds", type=int, default=3,
                   help="processes per provider per case, alternating (default 3)")
    p.add_argument("--in-process", action="store_true",
                   help="old mode: every provider in this process, interleaved")
    p.add_argument("--numpy", action="store_true",
                   help="also time the float64 NumPy reference (slow; a wider table)")
    p.add_argument("--no-torch", action="store_true", help="leave torch out")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also draw a chart (needs matplotlib)")


def resolve_shapes(ops, texts) -> dict:
    """op name -> shapes from ``--shape`` strings; each string goes to the ops whose format it
    fits.  Raises ValueError naming the op's format if an op gets no shape."""
    if not texts:
        return {}
    out = {name: [] for name in ops}
    errors = {}
    for t in texts:
        for name in ops:
            try:
                out[name].append(_ops.get(name).parse_shape(t))
            except ValueError as exc:
                errors.setdefault(name, str(exc))
    empty = [n for n in ops if not out[n]]
    if empty:
        raise ValueError("; ".join(errors[n] for n in empty) +
                         (" (choose ops with --op)" if len(ops) > 1 else ""))
    return out


def main(args) -> int:
    ops = list(args.op or _ops.OPS)
    # everything that can fail is checked before any timing
    try:
        shapes = resolve_shapes(ops, args.shape)
    except ValueError as exc:
        raise SystemExit(f"bench: {exc}") from None
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("bench: --plot needs matplotlib: pip install 'normffn[plot]'"
                             ) from None
    if args.repeat < 1 or args.rounds < 1 or args.min_time < 0:
        raise SystemExit("bench: --repeat and --rounds must be >= 1, --min-time >= 0")
    threads = args.threads or [None]
    torch = not args.no_torch and _torch_installed()
    say = lambda text: print(textwrap.fill(text, 100, subsequent_indent="  "))  # noqa: E731
    say(machine_line(threads))
    if args.in_process:
        say("timing: every provider in this process (--in-process), interleaved in random "
              f"order; calls under {SETTLE_BELOW_S * 1e3:.0f} ms right after an untimed one; "
              "± half the inter-quartile range")
    else:
        say(f"timing: each provider in its own process, {args.rounds} rounds alternating "
              "providers; median of all calls, ± half the range of the per-round medians")
    say("'out=' reuses a preallocated output; machine limits are measured in the same run"
        + ("" if args.in_process else ", in their own process"))
    print()
    cases = run(ops=ops, shapes=shapes, dtypes=args.dtype or ["float32"], threads=threads,
                repeat=args.repeat, min_time=args.min_time, rounds=args.rounds,
                in_process=args.in_process, numpy=args.numpy, torch=torch)
    print(format_tables(cases))
    scaling = format_scaling(cases)
    if scaling:
        print("\n" + scaling)
    if args.json:
        from . import __version__
        with open(args.json, "w") as f:
            json.dump({"version": __version__, "machine": machine_line(threads),
                       "mode": "in-process" if args.in_process else "process",
                       "rounds": 1 if args.in_process else args.rounds,
                       "cases": [summarize(c) for c in cases]}, f, indent=2)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(cases, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _torch_installed() -> bool:
    from importlib.util import find_spec
    return find_spec("torch") is not None


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit("usage: python -m normffn bench ...   (this module's own entry is the worker)")
