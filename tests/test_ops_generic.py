"""Every op of the registry x entry point x dtype x input kind against normffn.reference.

Driven by :mod:`normffn._ops` only: a new registry entry is tested here with no new code.
Entry points: ``op(...)``, ``op(..., out=)``, ``op_forward(...)`` (output, ctx statistics,
in-place state such as running stats), ``op_backward(dy, ctx)`` and ``op_backward(..., out=)``
where the op has it.  Tolerances are the documented ones
(:func:`normffn.testing.documented_tolerance`); NaN/Inf must sit where the reference has them.
"""
from __future__ import annotations

import numpy as np
import pytest

from normffn import _ops
from normffn.testing import assert_close, documented_tolerance

ENTRIES = ["op", "op_out", "forward", "backward", "backward_out"]
CASES = [pytest.param(op, v, id=f"{op.name}[{v}]" if v else op.name)
         for op in _ops.OPS.values() for v in op.variants]


def _state(op, args, dtype=None):
    args = dict(args)
    for k in op.state:
        if args.get(k) is not None:
            args[k] = np.array(args[k], dtype=dtype or args[k].dtype)
    return args


def _check(op, inp, dtype, name, actual, desired, context):
    rtol, atol = documented_tolerance(op.name, name, dtype, inp.rows, inp.condition)
    assert_close(actual, desired, dtype=dtype, rtol=rtol, atol=atol, name=name,
                 context=context)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("kind", list(_ops.INPUT_KINDS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("op, variant", CASES)
def test_against_reference(op, variant, dtype, kind, entry):
    if entry == "op_out" and not op.forward_out or entry == "backward_out" and not op.backward_out:
        pytest.skip(f"{op.name} has no {entry}")
    inp = op.make_inputs(op.test_shape, dtype, kind, 0, variant)
    inp.args.update(op.variants.get(variant, {}))
    context = f"{op.name}[{variant}] {kind} {np.dtype(dtype).name} {entry}"
    before = {k: np.array(v, copy=True) for k, v in inp.args.items() if
              isinstance(v, np.ndarray) and k not in op.state}
    a, ar = _state(op, inp.args), _state(op, inp.args, np.float64)
    with np.errstate(all="ignore"):
        y_r, ctx_r = op.function("reference", "forward")(*ar.values())
        if entry in ("op", "op_out"):
            out = np.full_like(inp.args["x"], np.nan) if entry == "op_out" else None
            kw = {"out": out} if out is not None else {}
            y = op.function("normffn")(*a.values(), **kw)
            if out is not None:
                assert y is out
            assert y.dtype == dtype and y.shape == np.shape(inp.args["x"])
            _check(op, inp, dtype, "y", y, y_r, context)
        else:
            y, ctx = op.function("normffn", "forward")(*a.values())
            _check(op, inp, dtype, "y", y, y_r, context)
            for k in op.stats:
                _check(op, inp, dtype, k, getattr(ctx, k), getattr(ctx_r, k), context)
            for k in op.state:
                if a.get(k) is not None:
                    _check(op, inp, dtype, k, a[k], ar[k], context)
            if entry.startswith("backward"):
                grads_r = op.function("reference", "backward")(inp.dy, ctx_r)
                kw = {}
                if entry == "backward_out":
                    kw["out"] = np.full_like(inp.dy, np.nan)
                grads = op.function("normffn", "backward")(inp.dy, ctx, **kw)
                assert len(grads) == len(op.grads)
                if kw:
                    assert grads[0] is kw["out"]
                for name, g, g_r in zip(op.grads, grads, grads_r):
                    if g_r is None:
                        assert g is None, f"{name} should be None"
                    else:
                        assert g.dtype == dtype
                        _check(op, inp, dtype, name, g, g_r, context)
    for k, v in before.items():   # inputs are never modified
        assert np.array_equal(inp.args[k], v, equal_nan=True), f"{k} was modified"
