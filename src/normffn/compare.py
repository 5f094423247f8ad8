"""``python -m normffn compare``: accuracy of normffn (and torch) against the float64 reference.

For every op of the registry (:mod:`normffn._ops`), each of its variants (BatchNorm train /
eval, the FFN's plain and gated activations, the FFN sublayer's placement x norm x
activation), on normal and adversarial inputs, in float32 and
float64, this runs normffn, torch (when importable) and :mod:`normffn.reference` on the same
data and reports, per output (``y``, ``s``, ``mean``, ``rstd``, ``dx``, ``dsum``, ``dweight``,
...), the max abs error and the max error relative to the output's scale (``max |reference|``),
whether NaN/Inf sit where the reference puts them, the tolerance normffn promises
(:func:`normffn.testing.documented_tolerance`) and whether normffn is within it.  The command
exits non-zero if normffn is outside it anywhere.

Everything here is importable for your own comparison scripts::

    from normffn.testing import compare_outputs, run_comparison, documented_tolerance
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import numpy as np

from . import _ops
from . import reference as ref
from ._ops import INPUT_KINDS, documented_tolerance
from .testing import ComparisonRow, compare_outputs

__all__ = ["ComparisonRow", "INPUT_KINDS", "documented_tolerance", "compare_outputs",
           "run_comparison", "run_case", "format_rows", "main"]

OPS = tuple(_ops.OPS)


def _labels(op: _ops.Op):
    """(label, variant) per variant: ``batch_norm[train]``, ``ffn[gelu]``,
    ``ffn_gated[swiglu]``, ``ffn_block[post-rms-swiglu]``; the bare name for an op with one
    variant."""
    if len(op.variants) == 1:
        return [(op.name, next(iter(op.variants)))]
    return [(f"{op.name}[{v}]", v) for v in op.variants]


def _copy_state(op, args, dtype=None):
    args = dict(args)
    for k in op.state:
        if args.get(k) is not None:
            args[k] = np.array(args[k], dtype=dtype or args[k].dtype)
    return args


def _outputs(op, result, args):
    fwd, ctx = _ops.split_forward(op, result)
    for k in op.stats:
        fwd[k] = getattr(ctx, k, None)
    for k in op.state:
        fwd[k] = args.get(k)
    return fwd


def run_case(op: _ops.Op, variant, kind: str, dtype, seed: int = 0, torch: bool = True):
    """Run one (op, variant, input kind, dtype) with every provider.

    Parameters
    ----------
    op : normffn._ops.Op
        A registry entry (``normffn._ops.get("layer_norm")``).
    variant : str or None
        One of the op's variants (BatchNorm ``"train"``/``"eval"``, FFN activations, ...).
    kind : str
        A key of :data:`INPUT_KINDS`.
    dtype : dtype-like
        float32 or float64.
    seed : int
        Seed of the inputs.
    torch : bool
        Also run torch when it is importable.

    Returns
    -------
    results : dict
        provider -> (forward outputs, backward outputs), each a dict name -> ndarray.
    reference : tuple of dict
        The same pair for :mod:`normffn.reference`.
    inputs : normffn._ops.Inputs
        The inputs used.
    """
    import normffn

    dtype = np.dtype(dtype).type
    inp = op.make_inputs(op.test_shape, dtype, kind, seed, variant)
    inp.args.update(op.variants.get(variant, {}))
    fwd_nf, bwd_nf = op.function("normffn", "forward"), op.function("normffn", "backward")
    fwd_rf, bwd_rf = op.function("reference", "forward"), op.function("reference", "backward")
    a = _copy_state(op, inp.args)
    gkw = inp.grad_kwargs
    pos, kw = op.split_args(a)
    fwd = fwd_nf(*pos, **kw)
    res = {"normffn": (_outputs(op, fwd, a),
                       dict(zip(op.grads, bwd_nf(inp.dy, fwd[-1], **gkw))))}
    ar = _copy_state(op, inp.args, np.float64)
    pos_r, kw_r = op.split_args(ar)
    fwd_r = fwd_rf(*pos_r, **kw_r)
    reference = (_outputs(op, fwd_r, ar), dict(zip(op.grads, bwd_rf(inp.dy, fwd_r[-1], **gkw))))
    if torch and op.torch is not None and _ops.torch_or_none() is not None:
        t = op.torch(inp, variant)
        res["torch"] = (t.forward_outputs(), t.backward_outputs())
    del normffn
    return res, reference, inp


def run_comparison(ops=OPS, dtypes=("float32", "float64"), inputs=tuple(INPUT_KINDS), seed=0,
                   torch=True):
    """Compare normffn (and torch) with the float64 reference, as ``python -m normffn compare``.

    Parameters
    ----------
    ops : sequence of str
        Registry names (default: every op).
    dtypes : sequence of str
        ``"float32"`` and/or ``"float64"``.
    inputs : sequence of str
        Input kinds, keys of :data:`INPUT_KINDS` (normal, large offset, tiny variance, NaN row).
    seed : int
        Seed of the inputs.
    torch : bool
        Also compare torch when it is importable.

    Returns
    -------
    list of ComparisonRow
        One per (op variant, entry, input kind, dtype, output, provider); ``op`` carries the
        variant: ``batch_norm[train]``, ``ffn[gelu]``.

    Examples
    --------
    >>> from normffn.testing import run_comparison
    >>> rows = run_comparison(ops=("rms_norm",), dtypes=("float32",), inputs=("large_offset",),
    ...                       torch=False)
    >>> sorted({r.output for r in rows})
    ['dweight', 'dx', 'rstd', 'y']
    >>> all(r.within_tolerance for r in rows if r.provider == "normffn")
    True
    """
    rows = []
    for name in ops:
        op = _ops.get(name)
        for label, variant in _labels(op):
            for kind in inputs:
                for dt in dtypes:
                    with np.errstate(all="ignore"):
                        results, (fwd_r, bwd_r), inp = run_case(op, variant, kind, dt, seed,
                                                                torch)
                    for provider, (fwd, bwd) in results.items():
                        check = provider == "normffn"
                        for entry, got, want in (("forward", fwd, fwd_r),
                                                 ("backward", bwd, bwd_r)):
                            new = compare_outputs(op.name, entry, kind, dt, provider, got, want,
                                                  inp.rows, check, inp.condition)
                            for r in new:
                                r.op = label
                            rows += new
    return rows


def _err(r) -> tuple[str, str]:
    if r.n_finite == 0:
        return "all NaN/Inf", "(no error)"
    return f"{r.max_abs:.2e}", f"{r.max_rel:.2e}"


def _nonfinite(nf, tt) -> str:
    n = (nf or tt).n_nonfinite
    bad = [p for p, r in (("normffn", nf), ("torch", tt)) if r is not None and
           not r.nonfinite_match]
    if bad:
        return "DIFFER: " + ", ".join(bad)
    return f"same ({n})" if n else "none"


def format_rows(rows) -> str:
    """Format comparison rows as the table ``compare`` prints.

    One line per (op, entry, inputs, dtype, output), normffn and torch side by side, with the
    tolerance normffn promises there and the NaN/Inf agreement.

    Parameters
    ----------
    rows : list of ComparisonRow
        From :func:`run_comparison`.

    Returns
    -------
    str
    """
    key = lambda r: (r.op, r.entry, r.inputs, r.dtype, r.output)  # noqa: E731
    merged = {}
    for r in rows:
        merged.setdefault(key(r), {})[r.provider] = r
    header = ["op", "entry", "inputs", "dtype", "output", "tolerance rtol/atol",
              "normffn abs", "normffn rel", "ok", "torch abs", "torch rel", "NaN/Inf"]
    table = [header]
    for k, prov in merged.items():
        nf, tt = prov.get("normffn"), prov.get("torch")
        line = list(k)
        line.append(f"{nf.rtol:.0e}/{nf.atol:.0e}" if nf else "-")
        if nf:
            line += [*_err(nf), "yes" if nf.within_tolerance else "NO"]
        else:
            line += ["-", "-", "-"]
        line += list(_err(tt)) if tt else ["-", "-"]
        line.append(_nonfinite(nf, tt))
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(table[0]), "  ".join("-" * w for w in widths)] +
                     [fmt(r) for r in table[1:]])


LEGEND = (
    "Errors against the float64 reference (normffn.reference).  abs = max |out - ref|;\n"
    "rel = abs / max |ref| (relative to the output's scale, so values near zero do not\n"
    "dominate).  tolerance: |out - ref| <= atol * max(1, max |ref|) + rtol * |ref| "
    "elementwise\n(normffn.testing.documented_tolerance); ok = normffn within it and NaN/Inf "
    "where the\nreference has them.  NaN/Inf: how many the reference has, and whether normffn "
    "and torch\nput them in the same places; 'all NaN/Inf' = nothing finite to compare.\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", action="append", choices=OPS, help="op (repeatable; default all)")
    p.add_argument("--dtype", action="append", choices=["float32", "float64"],
                   help="dtype (repeatable; default both)")
    p.add_argument("--inputs", action="append", choices=sorted(INPUT_KINDS),
                   help="input kind (repeatable; default all)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    """``python -m normffn compare``: print the comparison table.

    Parameters
    ----------
    args : argparse.Namespace
        ``op``, ``dtype``, ``inputs`` (lists or None for all), ``json`` (a path or None),
        ``seed``.

    Returns
    -------
    int
        0 if normffn is within its documented tolerance everywhere, else 1 (the failures are
        listed on stderr).
    """
    rows = run_comparison(ops=tuple(args.op or OPS),
                          dtypes=tuple(args.dtype or ("float32", "float64")),
                          inputs=tuple(args.inputs or INPUT_KINDS), seed=args.seed)
    print(LEGEND)
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
                  f" (tolerance rtol {r.rtol:.1e}, atol {r.atol:.1e}), NaN/Inf match "
                  f"{r.nonfinite_match}", file=sys.stderr)
        return 1
    n = sum(1 for r in rows if r.provider == "normffn")
    print(f"\nOK: normffn within its documented tolerance in all {n} comparisons")
    return 0
