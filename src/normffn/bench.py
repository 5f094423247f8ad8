"""``python -m normffn bench``: normffn vs the NumPy reference vs torch, side by side.

Every case is measured in one process, providers interleaved round by round in a fresh random
order (so the machine's drift and cache effects hit all of them alike), a short call right after
an untimed call of the same provider (so another library's spinning thread pool does not count
against it), after warm-up, and reported as median with the inter-quartile spread.  Norms report
GB/s (forward moves 2·numel·itemsize, backward 3·) and the fraction of the copy bandwidth
measured in the same run; the FFN reports GFLOP/s and the fraction of the bare GEMMs' rate
measured in the same run.

Each op contributes a function ``_<op>_cases(shape, dtype, rng) -> list[Case]`` registered in
``OPS``; a Case names its providers (callables taking no argument), the work one call does, and
the "limit" callable that measures what the machine can do for that much work.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import reference as ref

__all__ = ["Case", "run", "main"]


@dataclass
class Case:
    op: str
    direction: str               # "forward", "backward", "fwd+bwd", ...
    shape: str
    dtype: str
    work: float                  # bytes (unit GB/s) or flops (unit GFLOP/s) per call
    unit: str                    # "GB/s" or "GFLOP/s"
    providers: dict              # name -> callable; the first is normffn's headline entry
    limit_name: str = ""         # "copy" or "gemm"
    limit: object = None         # callable doing the machine-limit work for this case
    limit_work: float = 0.0      # work of one limit call (same unit)
    results: dict = field(default_factory=dict)


def _torch():
    try:
        import torch
    except Exception:  # noqa: BLE001 - torch is optional; any import failure means "absent"
        return None
    return torch


def _copy_limit(nbytes: int):
    """A callable copying nbytes with all threads (the machine's copy bandwidth)."""
    from ._kernels import _bench

    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    return lambda: _bench.parallel_copy(dst, src)


# ---------------------------------------------------------------- LayerNorm
def _layer_norm_cases(shape, dtype, rng):
    import normffn as ln  # the public API (``from . import layer_norm`` is the function)

    n, d = shape
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal(d).astype(dtype)
    b = rng.standard_normal(d).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y = np.empty_like(x)
    dx = np.empty_like(x)
    _, ctx = ln.layer_norm_forward(x, d, w, b)
    _, rctx = ref.layer_norm_forward(x, d, w, b)
    nb = x.nbytes
    shp = f"{n}x{d}"
    fwd = {
        "normffn out=": lambda: ln.layer_norm(x, d, w, b, out=y),
        "normffn": lambda: ln.layer_norm(x, d, w, b),
        "numpy": lambda: ref.layer_norm(x, d, w, b),
    }
    bwd = {
        "normffn out=": lambda: ln.layer_norm_backward(dy, ctx, out=dx),
        "normffn": lambda: ln.layer_norm_backward(dy, ctx),
        "numpy": lambda: ref.layer_norm_backward(dy, rctx),
    }
    torch = _torch()
    if torch is not None:
        xt, wt, bt, dyt = (torch.from_numpy(a) for a in (x, w, b, dy))
        _, mt, rt = torch.native_layer_norm(xt, [d], wt, bt, 1e-5)
        fwd["torch"] = lambda: torch.nn.functional.layer_norm(xt, [d], wt, bt)
        bwd["torch"] = lambda: torch.ops.aten.native_layer_norm_backward(
            dyt, xt, [d], mt, rt, wt, bt, [True, True, True])
    copy = _copy_limit(nb)
    return [
        Case("layer_norm", "forward", shp, np.dtype(dtype).name, 2 * nb, "GB/s", fwd,
             "copy", copy, 2 * nb),
        Case("layer_norm", "backward", shp, np.dtype(dtype).name, 3 * nb, "GB/s", bwd,
             "copy", copy, 2 * nb),
    ]


# ---------------------------------------------------------------- BatchNorm
def _batch_norm_cases(shape, dtype, rng):
    import normffn as nf

    C = shape[1]
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal(C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y = np.empty_like(x)
    dx = np.empty_like(x)
    _, ctx = nf.batch_norm_forward(x, None, None, w, b, True)
    _, rctx = ref.batch_norm_forward(x, None, None, w, b, True)
    nb = x.nbytes
    shp = "x".join(map(str, shape))
    dt = np.dtype(dtype).name
    train = {
        "normffn out=": lambda: nf.batch_norm(x, rm, rv, w, b, True, out=y),
        "normffn": lambda: nf.batch_norm(x, rm, rv, w, b, True),
        "numpy": lambda: ref.batch_norm(x, rm.astype(np.float64), rv.astype(np.float64), w, b,
                                        True),
    }
    evalf = {
        "normffn out=": lambda: nf.batch_norm(x, rm, rv, w, b, False, out=y),
        "normffn": lambda: nf.batch_norm(x, rm, rv, w, b, False),
        "numpy": lambda: ref.batch_norm(x, rm, rv, w, b, False),
    }
    bwd = {
        "normffn out=": lambda: nf.batch_norm_backward(dy, ctx, out=dx),
        "normffn": lambda: nf.batch_norm_backward(dy, ctx),
        "numpy": lambda: ref.batch_norm_backward(dy, rctx),
    }
    cl = None
    if len(shape) > 2:
        def to_cl(a):
            return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)
        xc, yc = to_cl(x), to_cl(y)
        cl = {"normffn out=": lambda: nf.batch_norm(xc, rm, rv, w, b, True, out=yc),
              "normffn": lambda: nf.batch_norm(xc, rm, rv, w, b, True)}
    torch = _torch()
    if torch is not None:
        xt, wt, bt, dyt = (torch.from_numpy(a) for a in (x, w, b, dy))
        rmt, rvt = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
        _, mt, st = torch.ops.aten.native_batch_norm(xt, wt, bt, None, None, True, 0.1, 1e-5)
        F = torch.nn.functional
        train["torch"] = lambda: F.batch_norm(xt, rmt, rvt, wt, bt, True, 0.1, 1e-5)
        evalf["torch"] = lambda: F.batch_norm(xt, rmt, rvt, wt, bt, False, 0.1, 1e-5)
        bwd["torch"] = lambda: torch.ops.aten.native_batch_norm_backward(
            dyt, xt, wt, None, None, mt, st, True, 1e-5, [True, True, True])
        if cl is not None:
            xct = xt.contiguous(memory_format=torch.channels_last)
            cl["torch channels_last"] = lambda: F.batch_norm(xct, rmt, rvt, wt, bt, True, 0.1,
                                                             1e-5)
    copy = _copy_limit(nb)
    cases = [
        Case("batch_norm", "forward train", shp, dt, 2 * nb, "GB/s", train, "copy", copy, 2 * nb),
        Case("batch_norm", "forward eval", shp, dt, 2 * nb, "GB/s", evalf, "copy", copy, 2 * nb),
        Case("batch_norm", "backward", shp, dt, 3 * nb, "GB/s", bwd, "copy", copy, 2 * nb),
    ]
    if cl is not None:
        cases.append(Case("batch_norm", "forward train NHWC", shp, dt, 2 * nb, "GB/s", cl,
                          "copy", copy, 2 * nb))
    return cases


# ---------------------------------------------------------------- FFN
def _gemm_limit(n, d, h, dtype, rng, backward):
    """A callable running the FFN's bare GEMMs (2 forward, 6 forward+backward) with scipy's BLAS
    (the BLAS normffn calls), on preallocated buffers, no copies: the machine's GEMM rate."""
    from scipy.linalg import blas

    gemm = blas.sgemm if np.dtype(dtype) == np.float32 else blas.dgemm

    def fmat(m):  # (array BLAS reads as is, transpose flag) for a 2-D operand
        return (m, 0) if m.flags.f_contiguous else (m.T, 1)

    def mm(a, b, c, beta=0.0):  # row-major c = a @ b  <=>  column-major c^T = b^T a^T
        bb, tb = fmat(b.T)
        aa, ta = fmat(a.T)
        gemm(1.0, bb, aa, beta=beta, c=c.T, trans_a=tb, trans_b=ta, overwrite_c=1)

    x, dy = (rng.standard_normal((n, d)).astype(dtype) for _ in range(2))
    w1 = rng.standard_normal((d, h)).astype(dtype)
    w2 = rng.standard_normal((h, d)).astype(dtype)
    hid, dhid = np.empty((n, h), dtype), np.empty((n, h), dtype)
    y, dx = np.empty((n, d), dtype), np.empty((n, d), dtype)
    dw1, dw2 = np.empty((d, h), dtype), np.empty((h, d), dtype)

    def fwd():
        mm(x, w1, hid)
        mm(hid, w2, y)

    def fwd_bwd():
        fwd()
        mm(dy, w2.T, dhid)
        mm(hid.T, dy, dw2)
        mm(dhid, w1.T, dx)
        mm(x.T, dhid, dw1)

    return fwd_bwd if backward else fwd


def _ffn_cases(shape, dtype, rng):
    import normffn as nf

    n, d, h = shape
    x = rng.standard_normal((n, d)).astype(dtype)
    w1 = (rng.standard_normal((d, h)) / math.sqrt(d)).astype(dtype)
    w2 = (rng.standard_normal((h, d)) / math.sqrt(h)).astype(dtype)
    b1 = (0.1 * rng.standard_normal(h)).astype(dtype)
    b2 = (0.1 * rng.standard_normal(d)).astype(dtype)
    dy = rng.standard_normal((n, d)).astype(dtype)
    y = np.empty_like(x)
    shp = f"{n}x{d}x{h}"
    dt = np.dtype(dtype).name
    flops = 2.0 * n * d * h          # one GEMM

    def fb(recompute):
        def call():
            _, ctx = nf.ffn_forward(x, w1, b1, w2, b2, "relu", recompute=recompute)
            return nf.ffn_backward(dy, ctx)
        return call

    fwd = {"normffn out=": lambda: nf.ffn(x, w1, b1, w2, b2, "relu", out=y),
           "normffn forward": lambda: nf.ffn_forward(x, w1, b1, w2, b2, "relu")}
    both = {"normffn": fb(False), "normffn recompute": fb(True)}
    torch = _torch()
    if torch is not None:
        lin1, lin2 = torch.nn.Linear(d, h, dtype=getattr(torch, dt)), \
            torch.nn.Linear(h, d, dtype=getattr(torch, dt))
        with torch.no_grad():  # same weights, PyTorch's (out, in) layout
            lin1.weight.copy_(torch.from_numpy(w1.T.copy()))
            lin1.bias.copy_(torch.from_numpy(b1))
            lin2.weight.copy_(torch.from_numpy(w2.T.copy()))
            lin2.bias.copy_(torch.from_numpy(b2))
        xt = torch.from_numpy(x).requires_grad_(True)
        dyt = torch.from_numpy(dy)
        params = [xt, *lin1.parameters(), *lin2.parameters()]

        def torch_fb():
            for p in params:
                p.grad = None
            lin2(torch.relu(lin1(xt))).backward(dyt)

        def torch_fwd():
            with torch.no_grad():
                return lin2(torch.relu(lin1(xt)))

        fwd["torch"] = torch_fwd
        both["torch"] = torch_fb
    return [
        Case("ffn", "forward", shp, dt, 2 * flops, "GFLOP/s", fwd,
             "gemm", _gemm_limit(n, d, h, dtype, rng, False), 2 * flops),
        Case("ffn", "fwd+bwd", shp, dt, 6 * flops, "GFLOP/s", both,
             "gemm", _gemm_limit(n, d, h, dtype, rng, True), 6 * flops),
    ]


# op name -> (case builder, default shapes)
OPS = {
    "layer_norm": (_layer_norm_cases, [(8192, 768), (2048, 4096)]),
    "batch_norm": (_batch_norm_cases, [(32, 64, 56, 56), (8192, 768)]),
    "ffn": (_ffn_cases, [(2048, 768, 3072), (8192, 512, 2048), (512, 1024, 4096)]),
}


# ---------------------------------------------------------------- measuring
# Providers whose call takes less than this get one untimed call right before each timed one
# (see _measure).
SETTLE_BELOW_S = 0.05


def _measure(case: Case, repeat: int, min_time: float, progress) -> None:
    """Interleave providers (and the limit probe) round by round; keep per-provider times."""
    calls = dict(case.providers)
    if case.limit is not None:
        calls["__limit__"] = case.limit
    # warm-up: page in outputs, JIT-free but caches and thread pools need it
    for f in calls.values():
        f()
        f()
    # calibrate: each provider gets at least `repeat` rounds, more if it is fast
    one_call = {}
    for k, f in calls.items():
        t0 = time.perf_counter()
        f()
        one_call[k] = time.perf_counter() - t0
    one_round = max(sum(one_call.values()), 1e-6)
    rounds = max(repeat, min(10 * repeat, int(min_time / one_round)))
    times = {k: [] for k in calls}
    order = list(calls.items())
    shuffle = np.random.default_rng(0)
    for r in range(rounds):
        # A fresh random order every round, so no provider keeps inheriting a warm (or a
        # trashed) cache, or a neighbour's spinning thread pool, from the same predecessor.  (A
        # rotating order does not do that: it keeps every provider's cyclic predecessor.)
        for i in shuffle.permutation(len(order)):
            k, f = order[i]
            if one_call[k] < SETTLE_BELOW_S:
                # An untimed call first, as in a user's own loop: the previous provider's
                # OpenMP workers (torch's and normffn's libgomp are separate pools) spin for a
                # while after their parallel region and would otherwise take a core from a
                # millisecond-long kernel — a cost of alternating libraries, not of the kernel.
                f()
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
        progress(r + 1, rounds)
    for k, ts in times.items():
        a = np.array(ts)
        case.results[k] = {"median_s": float(np.median(a)),
                           "q1_s": float(np.percentile(a, 25)),
                           "q3_s": float(np.percentile(a, 75)),
                           "rounds": rounds}


def _progress_printer(label: str, stream):
    last = [0.0]
    interactive = stream.isatty()

    def progress(i, n):
        now = time.perf_counter()
        if i == n or now - last[0] > 0.5:
            last[0] = now
            if interactive:
                stream.write(f"\r  {label}: round {i}/{n}   ")
                if i == n:
                    stream.write("\r" + " " * (len(label) + 30) + "\r")
            elif i == n:
                stream.write(f"  {label}: {n} rounds\n")
            stream.flush()
    return progress


def run(ops=None, shapes=None, dtypes=("float32",), threads=None, repeat=15, min_time=1.0,
        progress_stream=sys.stderr, seed=0):
    """Build and measure cases; returns a list of :class:`Case` with ``results`` filled."""
    ops = list(ops or OPS)
    rng = np.random.default_rng(seed)
    cases = []
    limits = None
    if threads:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            raise SystemExit("--threads needs threadpoolctl: pip install 'normffn[bench]'") \
                from None
        limits = threadpool_limits(limits=threads)
    torch = _torch()
    old_torch_threads = torch.get_num_threads() if torch is not None else None
    if torch is not None and threads:
        torch.set_num_threads(threads)
    try:
        for op in ops:
            builder, default_shapes = OPS[op]
            for shape in (shapes or default_shapes):
                for dt in dtypes:
                    for case in builder(tuple(shape), np.dtype(dt).type, rng):
                        label = f"{case.op} {case.direction} {case.shape} {case.dtype}"
                        _measure(case, repeat, min_time, _progress_printer(label, progress_stream))
                        cases.append(case)
    finally:
        if torch is not None and threads:
            torch.set_num_threads(old_torch_threads)
        if limits is not None:
            limits.unregister()
    return cases


# ---------------------------------------------------------------- reporting
def _rate(case, key):
    return case.work / case.results[key]["median_s"] / 1e9


def summarize(case: Case) -> dict:
    """Derived numbers for one case: rate, fraction of the machine limit, speed-ups."""
    head = next(iter(case.providers))
    out = {"op": case.op, "direction": case.direction, "shape": case.shape, "dtype": case.dtype,
           "unit": case.unit, "providers": {}}
    for k in case.providers:
        r = case.results[k]
        out["providers"][k] = {"median_ms": r["median_s"] * 1e3,
                               "iqr_ms": (r["q3_s"] - r["q1_s"]) * 1e3,
                               "rate": _rate(case, k)}
    if case.limit is not None:
        lim_rate = case.limit_work / case.results["__limit__"]["median_s"] / 1e9
        out["limit"] = {"name": case.limit_name, "rate": lim_rate}
        out["fraction_of_limit"] = _rate(case, head) / lim_rate
    t_head = case.results[head]["median_s"]
    out["speedup"] = {k: case.results[k]["median_s"] / t_head
                      for k in case.providers if k != head}
    return out


def format_table(cases) -> str:
    rows = [summarize(c) for c in cases]
    names = []
    for r in rows:
        for k in r["providers"]:
            if k not in names:
                names.append(k)
    header = ["op", "dir", "shape", "dtype"] + [f"{k} ms" for k in names] + \
             ["rate", "limit", "% limit"] + [f"x vs {k}" for k in names[1:]]
    table = [header]
    for r in rows:
        head = next(iter(r["providers"]))
        line = [r["op"], r["direction"], r["shape"], r["dtype"]]
        for k in names:
            p = r["providers"].get(k)
            line.append(f"{p['median_ms']:.3f} ±{p['iqr_ms'] / 2:.3f}" if p else "-")
        line.append(f"{r['providers'][head]['rate']:.1f} {r['unit']}")
        if "limit" in r:
            line.append(f"{r['limit']['name']} {r['limit']['rate']:.1f}")
            line.append(f"{100 * r['fraction_of_limit']:.0f}%")
        else:
            line += ["-", "-"]
        for k in names[1:]:
            s = r["speedup"].get(k)
            line.append(f"{s:.2f}x" if s is not None else "-")
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.rjust(w) if i >= 4 else c.ljust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths)))
    lines = [fmt(table[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in table[1:]]
    return "\n".join(lines)


def machine_line(threads) -> str:
    import platform

    try:
        from threadpoolctl import threadpool_info
        info = threadpool_info()
    except ImportError:  # optional (the 'bench' extra): the line then says less
        info = []
    torch = _torch()
    blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} thr)"
            for i in info if i.get("user_api") == "blas"] or ["(install threadpoolctl to see)"]
    omp = [i.get("num_threads") for i in info if i.get("user_api") == "openmp"]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from ._kernels import layer_norm as _ln
    return (f"machine: {cpu}, {os.cpu_count()} cpus; normffn OpenMP threads: "
            f"{threads or _ln.max_threads()}; numpy {np.__version__}; "
            f"torch {torch.__version__ if torch else 'not installed'}; BLAS: {', '.join(blas)}"
            f"; openmp runtimes: {omp}")


def plot(cases, path: str) -> None:
    """Bar chart of achieved rate per case vs the machine limit measured in the same run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'normffn[plot]'") from None
    rows = [summarize(c) for c in cases]
    units = sorted({r["unit"] for r in rows})
    fig, axes = plt.subplots(1, len(units), figsize=(8 * len(units), 5.5), squeeze=False)
    for ax, unit in zip(axes[0], units):
        sel = [r for r in rows if r["unit"] == unit]
        labels = [f"{r['op']} {r['direction']}\n{r['shape']} {r['dtype']}" for r in sel]
        names = []
        for r in sel:
            names += [k for k in r["providers"] if k not in names]
        width = 0.8 / (len(names) + 1)
        xs = np.arange(len(sel))
        for i, k in enumerate(names):
            ax.bar(xs + i * width, [r["providers"].get(k, {}).get("rate", 0) for r in sel],
                   width, label=k)
        ax.bar(xs + len(names) * width, [r.get("limit", {}).get("rate", 0) for r in sel], width,
               label="machine limit (same run)", color="0.7")
        ax.set_xticks(xs + 0.4 - width / 2, labels, fontsize=7, rotation=35, ha="right")
        ax.set_ylabel(unit)
        ax.legend(fontsize=7)
        ax.set_title(f"normffn: achieved {unit}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _parse_shape(s: str):
    try:
        return tuple(int(v) for v in s.lower().replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 8192x768, got {s!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", action="append", choices=sorted(OPS),
                   help="op to run (repeatable; default: all)")
    p.add_argument("--shape", action="append", type=_parse_shape,
                   help="shape such as 8192x768 (repeatable; default: each op's own)")
    p.add_argument("--dtype", action="append", choices=["float32", "float64"],
                   help="dtype (repeatable; default float32)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for normffn, BLAS and torch (default: all cores)")
    p.add_argument("--repeat", type=int, default=15, help="minimum rounds per case")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="target seconds of measuring per case (more rounds if fast)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also draw a chart (needs matplotlib)")


def main(args) -> int:
    if args.threads is not None and args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    print(machine_line(args.threads))
    print("medians over interleaved rounds in random order, calls under "
          f"{SETTLE_BELOW_S * 1e3:.0f} ms timed right after an untimed one (± half the "
          "inter-quartile range); 'out=' reuses a preallocated output; copy = all-thread memcpy "
          "of the same bytes, same run\n")
    cases = run(ops=args.op, shapes=args.shape, dtypes=args.dtype or ["float32"],
                threads=args.threads, repeat=args.repeat, min_time=args.min_time)
    print(format_table(cases))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(args.threads),
                       "cases": [summarize(c) for c in cases]}, f, indent=2)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(cases, args.plot)
        print(f"wrote {args.plot}")
    return 0
