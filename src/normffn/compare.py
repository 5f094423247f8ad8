"""``python -m normffn compare``: accuracy of normffn (and torch) against the float64 reference.

For every op and entry point, on normal and adversarial inputs, in float32 and float64, this
runs normffn, torch (when importable) and :mod:`normffn.reference` on the same data and
reports, per output (``y``, ``mean``, ``rstd``, ``dx``, ``dweight``, ...), the max abs and max
rel error against the reference, whether NaN/Inf sit where the reference puts them, and whether
normffn is within its documented tolerance (:func:`documented_tolerance`).  The command exits
non-zero if normffn is outside it anywhere.

Everything here is importable for your own comparison scripts::

    from normffn.testing import compare_outputs, run_comparison
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

import numpy as np

from . import reference as ref
from .testing import error_stats, tolerance

__all__ = ["ComparisonRow", "INPUT_KINDS", "documented_tolerance", "compare_outputs",
           "run_comparison", "format_rows", "main"]

# Outputs that are sums over the batch rows (their error grows like sqrt(rows)).
_ROW_SUMS = {"dweight", "dbias", "dw1", "db1", "dw2", "db2", "running_mean", "running_var"}


def documented_tolerance(op: str, output: str, dtype, rows: int = 1,
                         condition: float = 1.0) -> tuple[float, float]:
    """``(rtol, atol)`` normffn promises for ``output`` of ``op`` (see
    :func:`normffn.testing.assert_close` for how they combine).

    Elementwise outputs: :func:`normffn.testing.tolerance`.  Sums over ``rows`` batch rows
    (dweight, dbias, dw1, ...): atol grows like ``sqrt(rows)``.  FFN outputs in float32 are GEMMs
    with float32 accumulation inside BLAS: ``1e-4`` relative to the output's scale.
    Norms of data with a large offset: ``condition = max |mean| / std`` of the normalised groups;
    the float64 mean itself is only good to half an ulp of ``|mean|``, which moves ``xhat`` by
    ``eps64 * condition`` — in the reference as much as in normffn — so atol grows by
    ``8 * eps64 * condition``.
    """
    rtol, atol = tolerance(dtype)
    atol += 8 * np.finfo(np.float64).eps * condition
    if op == "ffn" and np.dtype(dtype) == np.float32:
        rtol, atol = 1e-4, 1e-4
    if output in _ROW_SUMS:
        atol = atol * math.sqrt(max(rows, 1))
    return rtol, atol


@dataclass
class ComparisonRow:
    op: str
    entry: str            # "forward" or "backward"
    inputs: str           # kind of input data
    dtype: str
    output: str
    provider: str         # "normffn" or "torch"
    max_abs: float
    max_rel: float
    nonfinite_match: bool
    within_tolerance: bool | None   # None for providers we make no promise about


def compare_outputs(op: str, entry: str, inputs: str, dtype, provider: str, outputs: dict,
                    reference: dict, rows: int = 1, check: bool = True,
                    condition: float = 1.0) -> list[ComparisonRow]:
    """One row per output present in both ``outputs`` and ``reference`` (name -> array).

    ``check``: judge against :func:`documented_tolerance` (normffn's promise)."""
    out = []
    for name, desired in reference.items():
        actual = outputs.get(name)
        if actual is None or desired is None:
            continue
        st = error_stats(actual, desired)
        ok = None
        if check:
            rtol, atol = documented_tolerance(op, name, dtype, rows, condition)
            a = np.asarray(actual, dtype=np.float64)
            d = np.asarray(desired, dtype=np.float64)
            fin = np.isfinite(d)
            with np.errstate(invalid="ignore"):
                bad = fin & ~(np.abs(a - d) <= atol * st.scale + rtol * np.abs(d))
            ok = bool(st.nonfinite_match and not bad.any())
        out.append(ComparisonRow(op, entry, inputs, np.dtype(dtype).name, name, provider,
                                 st.max_abs, st.max_rel, st.nonfinite_match, ok))
    return out


# ---------------------------------------------------------------- input kinds
def _normal(rng, shape):
    return rng.standard_normal(shape)


def _offset(rng, shape):
    return 1e4 + 0.1 * rng.standard_normal(shape)


def _tiny_var(rng, shape):
    return 1e3 + 1e-3 * rng.standard_normal(shape)


def _nan_row(rng, shape):
    a = rng.standard_normal(shape)
    a.reshape(shape[0], -1)[min(1, shape[0] - 1), 0] = np.nan
    return a


INPUT_KINDS = {"normal": _normal, "large_offset": _offset, "tiny_variance": _tiny_var,
               "nan_row": _nan_row}


def _torch():
    try:
        import torch
    except Exception:  # noqa: BLE001 - optional
        return None
    return torch


def _np(t):
    return None if t is None else t.detach().numpy()


# ---------------------------------------------------------------- per-op runners
def _layer_norm(kind, dtype, rng):
    import normffn

    n, d = 64, 768
    x = INPUT_KINDS[kind](rng, (n, d)).astype(dtype)
    w = (1 + 0.1 * rng.standard_normal(d)).astype(dtype)
    b = (0.1 * rng.standard_normal(d)).astype(dtype)
    dy = rng.standard_normal((n, d)).astype(dtype)
    y, ctx = normffn.layer_norm_forward(x, d, w, b)
    dx, dw, db = normffn.layer_norm_backward(dy, ctx)
    yr, cr = ref.layer_norm_forward(x, d, w, b)
    dxr, dwr, dbr = ref.layer_norm_backward(dy, cr)
    res = {"normffn": ({"y": y, "mean": ctx.mean, "rstd": ctx.rstd},
                       {"dx": dx, "dweight": dw, "dbias": db})}
    torch = _torch()
    if torch is not None:
        xt, wt, bt, dyt = (torch.from_numpy(a) for a in (x, w, b, dy))
        yt, mt, rt = torch.native_layer_norm(xt, [d], wt, bt, 1e-5)
        g = torch.ops.aten.native_layer_norm_backward(dyt, xt, [d], mt, rt, wt, bt,
                                                      [True, True, True])
        res["torch"] = ({"y": _np(yt), "mean": _np(mt).reshape(n), "rstd": _np(rt).reshape(n)},
                        {"dx": _np(g[0]), "dweight": _np(g[1]), "dbias": _np(g[2])})
    reference = ({"y": yr, "mean": cr.mean, "rstd": cr.rstd},
                 {"dx": dxr, "dweight": dwr, "dbias": dbr})
    return res, reference, n, _condition(x, axis=1)


def _condition(x, axis) -> float:
    """max |mean| / std over the normalised groups (the conditioning of x - mean)."""
    with np.errstate(all="ignore"):
        x = np.asarray(x, dtype=np.float64)
        m, sd = np.nanmean(x, axis=axis), np.nanstd(x, axis=axis)
        c = np.abs(m) / np.maximum(sd, 1e-300)
    c = c[np.isfinite(c)]
    return float(c.max()) if c.size else 1.0


def _batch_norm(kind, dtype, rng, training):
    import normffn

    shape = (8, 16, 12, 12)
    C = shape[1]
    x = INPUT_KINDS[kind](rng, shape).astype(dtype)
    w = (1 + 0.1 * rng.standard_normal(C)).astype(dtype)
    b = (0.1 * rng.standard_normal(C)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    rm0 = (0.1 * rng.standard_normal(C)).astype(dtype)
    rv0 = (1 + 0.1 * rng.random(C)).astype(dtype)
    if not training and kind != "normal":   # running stats that match the data's scale
        rm0 = np.nanmean(x, axis=(0, 2, 3)).astype(dtype)
        rv0 = np.nanvar(x, axis=(0, 2, 3)).astype(dtype) + dtype(1e-3)
    rm, rv = rm0.copy(), rv0.copy()
    y, ctx = normffn.batch_norm_forward(x, rm, rv, w, b, training, 0.1, 1e-5)
    dx, dw, db = normffn.batch_norm_backward(dy, ctx)
    rmr, rvr = rm0.astype(np.float64), rv0.astype(np.float64)
    yr, cr = ref.batch_norm_forward(x, rmr, rvr, w, b, training, 0.1, 1e-5)
    dxr, dwr, dbr = ref.batch_norm_backward(dy, cr)
    fwd = {"y": y, "mean": ctx.mean, "rstd": ctx.rstd}
    fwd_r = {"y": yr, "mean": cr.mean, "rstd": cr.rstd}
    if training:
        fwd.update(running_mean=rm, running_var=rv)
        fwd_r.update(running_mean=rmr, running_var=rvr)
    res = {"normffn": (fwd, {"dx": dx, "dweight": dw, "dbias": db})}
    torch = _torch()
    if torch is not None:
        xt, wt, bt, dyt = (torch.from_numpy(a) for a in (x, w, b, dy))
        rmt, rvt = torch.from_numpy(rm0.copy()), torch.from_numpy(rv0.copy())
        yt, mt, st = torch.ops.aten.native_batch_norm(xt, wt, bt, rmt, rvt, training, 0.1, 1e-5)
        g = torch.ops.aten.native_batch_norm_backward(dyt, xt, wt, rmt, rvt, mt, st, training,
                                                      1e-5, [True, True, True])
        tf = {"y": _np(yt)}
        if training:
            tf.update(mean=_np(mt), rstd=_np(st), running_mean=_np(rmt), running_var=_np(rvt))
        res["torch"] = (tf, {"dx": _np(g[0]), "dweight": _np(g[1]), "dbias": _np(g[2])})
    return (res, (fwd_r, {"dx": dxr, "dweight": dwr, "dbias": dbr}), x.size // C,
            _condition(x, axis=(0, 2, 3)))


def _ffn(kind, dtype, rng, activation):
    import normffn

    n, d, h = 64, 96, 256
    x = INPUT_KINDS[kind](rng, (n, d))
    if kind in ("large_offset", "tiny_variance"):   # an offset input, at a scale a GEMM keeps
        x = x / np.abs(np.nanmean(x))
    x = x.astype(dtype)
    w1 = (rng.standard_normal((d, h)) / np.sqrt(d)).astype(dtype)
    b1 = (0.1 * rng.standard_normal(h)).astype(dtype)
    w2 = (rng.standard_normal((h, d)) / np.sqrt(h)).astype(dtype)
    b2 = (0.1 * rng.standard_normal(d)).astype(dtype)
    dy = rng.standard_normal((n, d)).astype(dtype)
    y, ctx = normffn.ffn_forward(x, w1, b1, w2, b2, activation)
    dx, dw1, db1, dw2, db2 = normffn.ffn_backward(dy, ctx)
    yr, cr = ref.ffn_forward(x, w1, b1, w2, b2, activation)
    g_r = ref.ffn_backward(dy, cr)
    names = ("dx", "dw1", "db1", "dw2", "db2")
    res = {"normffn": ({"y": y}, dict(zip(names, (dx, dw1, db1, dw2, db2))))}
    torch = _torch()
    if torch is not None:
        tx = torch.from_numpy(x.copy()).requires_grad_()
        tp = [torch.from_numpy(a.copy()).requires_grad_() for a in (w1, b1, w2, b2)]
        act = {"relu": torch.relu, "silu": torch.nn.functional.silu,
               "gelu": torch.nn.functional.gelu,
               "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh")}[activation]
        ty = act(tx @ tp[0] + tp[1]) @ tp[2] + tp[3]
        ty.backward(torch.from_numpy(dy))
        res["torch"] = ({"y": _np(ty)}, dict(zip(names, [_np(tx.grad)] +
                                                 [_np(p.grad) for p in tp[:1]] +
                                                 [_np(tp[1].grad), _np(tp[2].grad),
                                                  _np(tp[3].grad)])))
    return res, ({"y": yr}, dict(zip(names, g_r))), n, 1.0


def _cases(ops):
    if "layer_norm" in ops:
        yield "layer_norm", _layer_norm
    if "batch_norm" in ops:
        yield "batch_norm[train]", lambda k, dt, rng: _batch_norm(k, dt, rng, True)
        yield "batch_norm[eval]", lambda k, dt, rng: _batch_norm(k, dt, rng, False)
    if "ffn" in ops:
        for act in ("relu", "gelu", "gelu_tanh", "silu"):
            yield f"ffn[{act}]", (lambda a: lambda k, dt, rng: _ffn(k, dt, rng, a))(act)


OPS = ("layer_norm", "batch_norm", "ffn")


def run_comparison(ops=OPS, dtypes=("float32", "float64"), inputs=tuple(INPUT_KINDS), seed=0):
    """Run every comparison; returns a list of :class:`ComparisonRow`."""
    rows = []
    for label, runner in _cases(ops):
        op = label.split("[")[0]
        for kind in inputs:
            for dt in dtypes:
                dtype = np.dtype(dt).type
                rng = np.random.default_rng(seed)
                with np.errstate(all="ignore"):
                    results, (fwd_r, bwd_r), nrows, cond = runner(kind, dtype, rng)
                for provider, (fwd, bwd) in results.items():
                    check = provider == "normffn"
                    new = (compare_outputs(op, "forward", kind, dt, provider, fwd, fwd_r, nrows,
                                           check, cond) +
                           compare_outputs(op, "backward", kind, dt, provider, bwd, bwd_r,
                                           nrows, check, cond))
                    for r in new:
                        r.op = label    # with its variant: batch_norm[train], ffn[gelu], ...
                    rows += new
    return rows


def format_rows(rows) -> str:
    """A table: one line per (op, entry, inputs, dtype, output), normffn and torch side by side."""
    key = lambda r: (r.op, r.entry, r.inputs, r.dtype, r.output)  # noqa: E731
    merged = {}
    for r in rows:
        merged.setdefault(key(r), {})[r.provider] = r
    header = ["op", "entry", "inputs", "dtype", "output", "normffn max abs", "normffn max rel",
              "ok", "torch max abs", "torch max rel"]
    table = [header]
    for k, prov in merged.items():
        nf, tt = prov.get("normffn"), prov.get("torch")
        line = list(k)
        line += [f"{nf.max_abs:.2e}", f"{nf.max_rel:.2e}",
                 ("yes" if nf.within_tolerance else "NO") + ("" if nf.nonfinite_match
                                                             else " (NaN/Inf differ)")] \
            if nf else ["-", "-", "-"]
        line += [f"{tt.max_abs:.2e}", f"{tt.max_rel:.2e}" + ("" if tt.nonfinite_match
                                                             else " (NaN/Inf differ)")] \
            if tt else ["-", "-"]
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(table[0]), "  ".join("-" * w for w in widths)] +
                     [fmt(r) for r in table[1:]])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", action="append", choices=OPS, help="op (repeatable; default all)")
    p.add_argument("--dtype", action="append", choices=["float32", "float64"],
                   help="dtype (repeatable; default both)")
    p.add_argument("--inputs", action="append", choices=sorted(INPUT_KINDS),
                   help="input kind (repeatable; default all)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    rows = run_comparison(ops=tuple(args.op or OPS), dtypes=tuple(args.dtype or
                                                                   ("float32", "float64")),
                          inputs=tuple(args.inputs or INPUT_KINDS), seed=args.seed)
    print("max abs / max rel error against the float64 reference (normffn.reference); 'ok' = "
          "within normffn's documented tolerance (normffn.compare.documented_tolerance)\n")
    print(format_rows(rows))
    bad = [r for r in rows if r.within_tolerance is False]
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
        print(f"\nwrote {args.json}")
    if bad:
        print(f"\nFAIL: normffn is outside its documented tolerance in {len(bad)} place(s):",
              file=sys.stderr)
        for r in bad:
            print(f"  {r.op} {r.entry} {r.inputs} {r.dtype} {r.output}: max abs {r.max_abs:.3e}"
                  f", max rel {r.max_rel:.3e}, NaN/Inf match {r.nonfinite_match}",
                  file=sys.stderr)
        return 1
    print(f"\nOK: normffn within its documented tolerance in all {sum(1 for r in rows if r.provider == 'normffn')} comparisons")
    return 0
