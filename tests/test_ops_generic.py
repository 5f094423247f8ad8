"""Every op of the registry x entry point x dtype x input kind against normffn.reference.

Driven by :mod:`normffn._ops` only: a new registry entry is tested here with no new code.
Entry points: ``op(...)``, ``op(..., out=)``, ``op_forward(...)`` (outputs, ctx statistics
-- None where the variant has none, as RMSNorm's mean --, in-place state such as running
stats), ``op_backward(dy, ctx)``, ``op_backward(..., out=)``
where the op has it, and ``op_backward(..., needs=)`` (gradients not needed come back as None,
in normffn and in the reference alike).  Fused ops return several outputs (add + norm:
``(y, s)``, forward ``(y, s, ctx)``; ``out=`` a pair) and take further backward arguments
(``ds``) from ``Inputs.grad_kwargs``; keyword-only arguments (``ffn_block``'s norm,
placement, eps) are passed by keyword (``Op.split_args``).  Tolerances are the documented ones
(:func:`normffn.testing.documented_tolerance`); NaN/Inf must sit where the reference has them.
"""
from __future__ import annotations

import inspect
import tracemalloc

import numpy as np
import pytest

import normffn
from normffn import _ops
from normffn import reference as ref
from normffn.testing import assert_close, documented_tolerance

ENTRIES = ["op", "op_out", "forward", "backward", "backward_out", "backward_needs"]
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


def _check_grads(op, inp, dtype, grads, grads_r, context):
    assert len(grads) == len(op.grads)
    for name, g, g_r in zip(op.grads, grads, grads_r):
        if g_r is None:
            assert g is None, f"{name} should be None ({context})"
        else:
            assert g is not None, f"{name} is None ({context})"
            assert g.dtype == dtype
            _check(op, inp, dtype, name, g, g_r, context)


def _needs_patterns(n):
    """Two ``needs`` for n gradients: only the first, and all but the first."""
    return [(True,) + (False,) * (n - 1), (False,) + (True,) * (n - 1)]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("kind", list(_ops.INPUT_KINDS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("op, variant", CASES)
def test_against_reference(op, variant, dtype, kind, entry):
    if entry == "op_out" and not op.forward_out or entry == "backward_out" and not op.backward_out:
        pytest.skip(f"{op.name} has no {entry}")
    inp = op.make_inputs(op.test_shape, dtype, kind, 0, variant)
    inp.args.update(op.variants.get(variant, {}))
    gkw = inp.grad_kwargs
    context = f"{op.name}[{variant}] {kind} {np.dtype(dtype).name} {entry}"
    before = {k: np.array(v, copy=True) for k, v in inp.args.items() if
              isinstance(v, np.ndarray) and k not in op.state}
    before.update({f"grad:{k}": np.array(v, copy=True) for k, v in gkw.items()})
    a, ar = _state(op, inp.args), _state(op, inp.args, np.float64)
    x = inp.args["x"]
    (pos, kw), (pos_r, kw_r) = op.split_args(a), op.split_args(ar)   # keyword-only arguments
    with np.errstate(all="ignore"):
        outs_r, ctx_r = _ops.split_forward(op, op.function("reference", "forward")(*pos_r,
                                                                                  **kw_r))
        if entry in ("op", "op_out"):
            out = _ops.forward_out_buffers(op, x, fill=np.nan) if entry == "op_out" else None
            okw = {"out": out} if out is not None else {}
            result = op.function("normffn")(*pos, **kw, **okw)
            outs = _ops.op_outputs(op, result)
            if out is not None:
                assert result is out if len(op.outputs) == 1 else \
                    all(r is o for r, o in zip(result, out))
            for name, y in outs.items():
                assert y.dtype == dtype and y.shape == np.shape(x)
                _check(op, inp, dtype, name, y, outs_r[name], context)
        else:
            outs, ctx = _ops.split_forward(op, op.function("normffn", "forward")(*pos, **kw))
            for name, y in outs.items():
                _check(op, inp, dtype, name, y, outs_r[name], context)
            for k in op.stats:
                if getattr(ctx_r, k) is None:     # a statistic this variant has not (RMS mean)
                    assert getattr(ctx, k) is None, f"ctx.{k} should be None ({context})"
                    continue
                _check(op, inp, dtype, k, getattr(ctx, k), getattr(ctx_r, k), context)
            for k in op.state:
                if a.get(k) is not None:
                    _check(op, inp, dtype, k, a[k], ar[k], context)
            bwd, bwd_r = op.function("normffn", "backward"), op.function("reference", "backward")
            if entry == "backward":
                _check_grads(op, inp, dtype, bwd(inp.dy, ctx, **gkw),
                             bwd_r(inp.dy, ctx_r, **gkw), context)
            elif entry == "backward_out":
                grads_r = bwd_r(inp.dy, ctx_r, **gkw)
                out = _ops.backward_out_buffers(op, grads_r, dtype, fill=np.nan)
                grads = bwd(inp.dy, ctx, out=out, **gkw)
                if op.backward_out == "all":
                    assert all(g is o for g, o in zip(grads, out) if o is not None)
                else:
                    assert grads[0] is out
                _check_grads(op, inp, dtype, grads, grads_r, context)
            elif entry == "backward_needs":
                for needs in _needs_patterns(len(op.grads)):
                    grads_r = bwd_r(inp.dy, ctx_r, needs=needs, **gkw)
                    assert all(g is None for g, n in zip(grads_r, needs) if not n)
                    _check_grads(op, inp, dtype, bwd(inp.dy, ctx, needs=needs, **gkw), grads_r,
                                 f"{context} needs={needs}")
    for k, v in before.items():   # inputs are never modified
        now = gkw[k[5:]] if k.startswith("grad:") else inp.args[k]
        assert np.array_equal(now, v, equal_nan=True), f"{k} was modified"


# ---------------------------------------------------------------- the registry's own contract
PUBLIC = sorted(n for n in normffn.__all__
                if callable(getattr(normffn, n)) and not inspect.isclass(getattr(normffn, n)))


@pytest.mark.parametrize("name", PUBLIC)
def test_reference_mirrors_the_public_api_name_for_name(name):
    """Every public function has a reference of the same name taking the same parameters (the
    reference may ignore some, e.g. ``out=``), so one test can walk every entry point."""
    assert hasattr(ref, name), f"normffn.reference has no {name}"
    params = lambda f: [(p.name, p.kind) for p in inspect.signature(f).parameters.values()]  # noqa: E731
    assert params(getattr(ref, name)) == params(getattr(normffn, name))


def test_every_public_op_is_registered():
    apis = {op.api or op.name for op in _ops.OPS.values()}
    ops = {n for n in PUBLIC if n + "_forward" in PUBLIC and n + "_backward" in PUBLIC}
    assert ops <= apis, f"ops without a registry entry: {sorted(ops - apis)}"


@pytest.mark.parametrize("op", list(_ops.OPS.values()), ids=list(_ops.OPS))
def test_every_bench_case_and_provider_runs(op):
    """bench's callables, at the op's small test shape (no timing): each provider of each case
    runs; ``normffn out=`` allocates nothing (the FFNs' training step included) beyond what
    the entry's ``step_alloc`` says the API has no buffer for, and its forward + backward
    gives bitwise what the allocating call gives."""
    torch = _ops.torch_or_none()
    ran = 0
    for case in op.cases_for(op.test_shape):
        for provider in _ops.bench_providers(op, case, numpy=True, torch=torch is not None):
            inp = _ops.bench_inputs(op, case, op.test_shape, "float32")
            fn = _ops.bench_callable(op, case, provider, inp)
            fn()
            got = fn()    # a second call: out= buffers and reused ctx fields are valid again
            ran += 1
            if provider == "normffn out=":
                # reused buffers: no output, gradient or saved activation is allocated
                tracemalloc.start()
                try:
                    fn()
                    peak = tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()
                allowed = 16 << 10
                if op.step_alloc is not None and case.call == "fwd+bwd":
                    allowed += op.step_alloc(op.test_shape, 4)
                assert peak < allowed, f"{case.direction}: {peak} bytes allocated"
            if case.call == "fwd+bwd" and provider == "normffn out=":
                # the reusing training step computes what the allocating one does, bitwise
                want = _ops.bench_callable(op, case, "normffn", inp)()
                for name, g, w in zip(op.grads, got, want):
                    assert (g is None) == (w is None), name
                    if g is not None:
                        assert np.array_equal(g, w, equal_nan=True), f"{name} differs"
    assert ran > 0
