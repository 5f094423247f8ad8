"""Property-based fuzzing of one normffn op; run in a child process by ``test_hardening.py``.

    python tests/_fuzz_worker.py OP SEED EXAMPLES

OP is a registered op: ``layer_norm``, ``rms_norm``, ``add_layer_norm``, ``add_rms_norm``,
``batch_norm``, ``ffn``, ``ffn_gated`` (the FFN with swiglu / geglu / reglu and a packed w1) or
``ffn_block`` (the FFN sublayer: norm x placement x every activation, seven gradients).
Each example draws a full set of arguments — shapes with 0- and 1-sized dims, float32/float64,
layouts (C, F/transposed, strided slices, negative strides, read-only, byte-swapped, unaligned,
broadcast with zero strides, nested lists), None-ness of the optional arguments, scalars — and,
half of the time, one "bad" mutation (a wrong dtype, shape, type, value, an ``out=`` that is
wrong or overlaps an input, a tampered ``ctx``, a ctx of another op, a bad ``needs``...).
It then calls ``op(...)``, or ``op_forward(...)`` followed by ``op_backward(...)``, and checks:

* every call either returns what ``normffn.reference`` returns (``normffn.testing.assert_close``)
  or raises ``TypeError``/``ValueError`` — nothing else; arguments without a bad mutation must be
  accepted, a bad mutation must be rejected;
* no input array is modified; when a call raises, BatchNorm's running stats and the ``out=``
  buffers (add + norm's pair, ffn_backward's five, ffn_block_backward's seven) are bitwise
  untouched;
* backward's ``needs=`` gives None exactly where the reference (which honours it) does.

Crash reporting: before each call the example is written to stdout as one ``EXAMPLE ...`` line
(flushed), and faulthandler is on, so when the process dies on a signal the parent reports the
last example and the native traceback.  A falsified property exits 1 after hypothesis prints the
shrunk example.  The last line of a clean run is ``DONE <examples> <accepted> <rejected>``.
"""
from __future__ import annotations

import dataclasses
import faulthandler
import math
import sys
import types

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed as hyp_seed, settings
from hypothesis import strategies as st

import normffn
from normffn import _ops
from normffn import reference as ref
from normffn.testing import assert_close, documented_tolerance


def _grad_tol(op: str, name: str, dtype, rows: int) -> dict:
    """The registry's documented tolerance for a gradient summed over ``rows`` batch rows."""
    rtol, atol = documented_tolerance(op, name, dtype, rows)
    return {"rtol": rtol, "atol": atol}

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
BAD_DTYPES = (np.int32, np.int64, np.uint8, np.bool_, np.float16, np.longdouble,
              np.complex64, np.complex128, object)
LAYOUTS = ("c", "c", "c", "f", "strided", "neg", "perm", "readonly", "swapped", "unaligned",
           "broadcast", "list")
DIMS = (0, 1, 1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33)   # sizes a dim may take (shrinks to 0, 1, 2)
MAX_ELEMS = 1536
ALLOWED = (TypeError, ValueError)

STATS = {"examples": 0, "ok": 0, "raised": 0}


class Reject(Exception):
    """Raised inside an example when a call raised an allowed error (control flow only)."""


# ---------------------------------------------------------------- describing an example
def describe(v) -> str:
    if isinstance(v, np.ndarray):
        flags = "".join(c for c, f in (("C", v.flags.c_contiguous), ("F", v.flags.f_contiguous),
                                        ("W", v.flags.writeable), ("A", v.flags.aligned)) if f)
        return f"ndarray{v.shape}:{v.dtype.str}:strides={v.strides}:{flags or '-'}"
    if isinstance(v, list):
        return f"list(len={len(v)})"
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return f"{type(v).__name__}(" + ", ".join(
            f"{f.name}={describe(getattr(v, f.name))}" for f in dataclasses.fields(v)) + ")"
    if isinstance(v, (tuple,)):
        return "(" + ", ".join(describe(a) for a in v) + ")"
    return repr(v)[:80]


def announce(op: str, case: dict, args: dict) -> None:
    sys.stdout.write(f"EXAMPLE {op} mutation={case['mutation']} " +
                     " ".join(f"{k}={describe(v)}" for k, v in args.items()) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- building arrays
def _dims(data, n: int, lo=(), label="shape") -> tuple:
    """n dims from DIMS (dim i >= lo[i]), shrunk until the product is at most MAX_ELEMS."""
    shape = []
    for i in range(n):
        low = lo[i] if i < len(lo) else 0
        shape.append(data.draw(st.sampled_from([v for v in DIMS if v >= low]), label=f"{label}[{i}]"))
    while math.prod(shape) > MAX_ELEMS:
        j = int(np.argmax(shape))
        shape[j] = max(shape[j] // 2, 1)
    return tuple(shape)


def values(data, rng, shape, *, special=True, scale=1.0, positive=False,
           specials=(np.nan, np.inf, -np.inf)) -> np.ndarray:
    """float64 values of ``shape``: normal, sometimes scaled / offset / constant, sometimes with
    one NaN or Inf."""
    kind = data.draw(st.sampled_from(["normal", "normal", "big", "small", "offset", "const"]),
                     label="values")
    v = rng.standard_normal(shape) * scale
    if kind == "big":
        v *= 100.0
    elif kind == "small":
        v *= 1e-2
    elif kind == "offset":
        v += 10.0 * scale
    elif kind == "const":
        v = np.full(shape, 0.75 * scale)
    if positive:
        v = np.abs(v) + 0.1
    if special and v.size and data.draw(st.integers(0, 9), label="special?") == 0:
        bad = data.draw(st.sampled_from(specials), label="special value")
        v.reshape(-1)[int(rng.integers(v.size))] = bad
    return v


def layout(data, v: np.ndarray, dtype, *, allowed=LAYOUTS, label="layout"):
    """An array (or nested list) equal to ``v`` cast to dtype, in a drawn memory layout.
    Returns (array, layout name)."""
    name = data.draw(st.sampled_from(allowed), label=label)
    dtype = np.dtype(dtype)
    if v.ndim == 0 and name not in ("c", "readonly", "swapped"):
        name = "c"
    if name == "list" and (dtype != np.float64 or v.size == 0):
        name = "c"
    a = np.ascontiguousarray(v.astype(dtype))
    if name == "c":
        return a, name
    if name == "f":
        return np.asfortranarray(a), name
    if name == "strided":
        ax = data.draw(st.integers(0, v.ndim - 1), label="strided axis")
        step = data.draw(st.sampled_from([2, 3]), label="step")
        big_shape = list(v.shape)
        big_shape[ax] = max(1, step * v.shape[ax])
        big = np.full(big_shape, np.nan, dtype=dtype)   # poisoned gaps: reading them shows
        sl = [slice(None)] * v.ndim
        sl[ax] = slice(None, None, step)
        view = big[tuple(sl)][tuple(slice(0, s) for s in v.shape)]
        view[...] = a
        return view, name
    if name == "neg":
        ax = data.draw(st.integers(0, v.ndim - 1), label="flipped axis")
        return np.flip(np.ascontiguousarray(np.flip(a, ax)), ax), name
    if name == "perm":
        perm = data.draw(st.permutations(range(v.ndim)), label="perm")
        inv = np.argsort(perm)
        return np.ascontiguousarray(a.transpose(perm)).transpose(inv), name
    if name == "readonly":
        a.setflags(write=False)
        return a, name
    if name == "swapped":
        return a.astype(dtype.newbyteorder("S")), name
    if name == "unaligned":
        buf = bytearray(a.nbytes + 1)
        u = np.ndarray(a.shape, dtype=dtype, buffer=buf, offset=1)
        u[...] = a
        return u, name
    if name == "broadcast":
        ax = data.draw(st.integers(0, v.ndim - 1), label="broadcast axis")
        small = np.take(a, [0], axis=ax) if v.shape[ax] > 0 else a
        return np.broadcast_to(small, a.shape), name
    if name == "list":
        return a.tolist(), name
    raise AssertionError(name)


def bad_array(data, rng, shape, label="bad dtype"):
    """An array of ``shape`` with a dtype normffn must reject."""
    dt = data.draw(st.sampled_from(BAD_DTYPES), label=label)
    v = rng.standard_normal(shape)
    if dt is object:
        return v.astype(object)
    return v.astype(dt)


def other(dtype):
    return FLOATS[1] if np.dtype(dtype) == FLOATS[0] else FLOATS[0]


def poisoned(shape, dtype, rng, channels_last=False):
    """A fresh output buffer full of a random bit pattern (so "untouched" is checkable)."""
    if channels_last:
        moved = shape[:1] + shape[2:] + shape[1:2]
        a = np.empty(moved, dtype=dtype)
        a[...] = rng.standard_normal(moved)
        return np.moveaxis(a, -1, 1)
    a = np.empty(shape, dtype=dtype)
    a[...] = rng.standard_normal(shape)
    return a


def snapshot(a):
    """Bitwise snapshot of an array (None for anything else)."""
    if isinstance(a, np.ndarray) and a.dtype != object:
        return (a.shape, a.dtype.str, np.ascontiguousarray(a).tobytes())
    return None


def _overlapping_out(data, rng, shape, dtype, victim: str, base_shape):
    """(out, input) sharing memory: out partially overlapping a contiguous input of
    ``base_shape`` (both views of one buffer)."""
    size_out, size_in = math.prod(shape), math.prod(base_shape)
    shift = 0 if size_in == 0 or size_out == 0 else \
        data.draw(st.integers(-size_in + 1, size_out - 1), label=f"overlap shift {victim}")
    lo = min(0, shift)
    buf = np.empty(max(size_out, shift + size_in) - lo, dtype=dtype)
    buf[...] = rng.standard_normal(buf.shape)
    out = buf[-lo:-lo + size_out].reshape(shape)
    inp = buf[shift - lo:shift - lo + size_in].reshape(base_shape)
    return out, inp


# ---------------------------------------------------------------- running one call
def call(op: str, case: dict, fn, args: dict, kwargs_names=(), guard=(), mutable=("out",)):
    """Call fn(**args) (names in kwargs_names passed by keyword, the rest positionally in order).
    On success check no argument but those in ``mutable`` changed (arrays inside a ctx
    included); on an allowed error check nothing changed at all (``guard`` lists the buffers an
    op may write: out=, running stats) and raise Reject."""
    announce(op, case, args)
    before = [(g, snapshot(g)) for g in guard if snapshot(g) is not None]
    pos = [v for k, v in args.items() if k not in kwargs_names]
    kw = {k: v for k, v in args.items() if k in kwargs_names}
    flat = []
    for k, v in args.items():
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            flat += [(f"{k}.{f.name}", getattr(v, f.name)) for f in dataclasses.fields(v)]
        else:
            flat.append((k, v))
    inputs = [(k, v, snapshot(v)) for k, v in flat if snapshot(v) is not None]
    try:
        result = fn(*pos, **kw)
    except ALLOWED as exc:
        for g, snap in before:
            assert snapshot(g) == snap, f"a failed call ({exc!r}) modified a running stat / out"
        for k, v, snap in inputs:
            assert snapshot(v) == snap, f"a failed call ({exc!r}) modified its argument {k}"
        STATS["raised"] += 1
        if case["expect"] == "ok":
            raise AssertionError(f"valid arguments were rejected: {exc!r}") from exc
        raise Reject from exc
    STATS["ok"] += 1
    if case["expect"] == "raise":
        raise AssertionError(f"bad argument ({case['mutation']}) was accepted")
    for k, v, snap in inputs:
        if k not in mutable:
            assert snapshot(v) == snap, f"input {k} was modified by the call"
    return result


# ---------------------------------------------------------------- LayerNorm
def ln_case(data, rng) -> dict:
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    ndim = data.draw(st.integers(1, 4), label="ndim")
    k = data.draw(st.integers(1, ndim), label="len(normalized_shape)")
    shape = _dims(data, ndim, lo=(0,) * (ndim - k) + (1,) * k)
    nshape = shape[ndim - k:]
    mutation = data.draw(st.sampled_from([None] * 12 + [
        "x_dtype", "x_0d", "x_none", "x_str", "ns_mismatch", "ns_zero", "ns_empty", "ns_toolong",
        "ns_type", "w_shape", "w_dtype", "w_bad_dtype", "w_str", "b_shape", "b_dtype",
        "eps_neg", "eps_nonfinite", "eps_type", "out_shape", "out_dtype", "out_noncontig",
        "out_readonly", "out_type", "out_is_x", "out_overlap_x", "out_overlap_w"]),
        label="mutation")
    case = {"mutation": mutation, "expect": "raise" if mutation else "ok", "dtype": dtype}

    eps = data.draw(st.sampled_from([1e-5, 1e-5, 1e-3, 0.1, 1.0, 1, np.float32(1e-5),
                                     np.float64(1e-6), 0.0]), label="eps")
    xv = values(data, rng, shape)
    x, xlay = layout(data, xv, dtype, label="x layout")
    if eps == 0 and (xlay == "broadcast" or math.prod(nshape) < 2):
        eps = 1e-5      # eps = 0 on a constant row is 0/0: ill-posed, not a safety question
    ns_form = data.draw(st.sampled_from(["tuple", "list", "int", "np_int", "np_array"]),
                        label="normalized_shape form")
    if ns_form == "int" and k == 1:
        ns = nshape[0]
    elif ns_form == "np_int" and k == 1:
        ns = np.int64(nshape[0])
    elif ns_form == "list":
        ns = list(nshape)
    elif ns_form == "np_array":
        ns = np.array(nshape)
    else:
        ns = tuple(nshape)
    w = b = None
    if data.draw(st.booleans(), label="weight?"):
        w, _ = layout(data, values(data, rng, nshape), dtype, label="w layout")
    if data.draw(st.booleans(), label="bias?"):
        b, _ = layout(data, values(data, rng, nshape), dtype, label="b layout")
    out = None
    if data.draw(st.booleans(), label="out?"):
        out = poisoned(shape, dtype, rng)

    m = mutation
    if m == "x_dtype":
        x = bad_array(data, rng, shape)
    elif m == "x_0d":
        x, ns = np.array(1.0, dtype=dtype), 1
    elif m == "x_none":
        x = None
    elif m == "x_str":
        x = "not an array"
    elif m == "ns_mismatch":
        ns = tuple(nshape[:-1]) + (nshape[-1] + 1,)
    elif m == "ns_zero":
        ns = tuple(nshape[:-1]) + (0,)
    elif m == "ns_empty":
        ns = ()
    elif m == "ns_toolong":
        ns = (1,) + tuple(shape)
    elif m == "ns_type":
        ns = data.draw(st.sampled_from([1.5, "3", None, True, (1.0,), [None]]), label="bad ns")
    elif m == "w_shape":
        w = np.ones(nshape + (1,), dtype=dtype) if data.draw(st.booleans()) \
            else np.ones((nshape[-1] + 1,), dtype=dtype)
    elif m == "w_dtype":
        w = np.ones(nshape, dtype=other(dtype))
    elif m == "w_bad_dtype":
        w = bad_array(data, rng, nshape)
    elif m == "w_str":
        w = "weight"
    elif m == "b_shape":
        b = np.ones((1,) + nshape, dtype=dtype)
    elif m == "b_dtype":
        b = bad_array(data, rng, nshape) if data.draw(st.booleans()) \
            else np.ones(nshape, dtype=other(dtype))
    elif m == "eps_neg":
        eps = data.draw(st.sampled_from([-1e-5, -1.0, -np.finfo(float).tiny]))
    elif m == "eps_nonfinite":
        eps = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, np.float32(np.nan)]))
    elif m == "eps_type":
        eps = data.draw(st.sampled_from(["1e-5", None, True, 1j, np.array([1e-5]), [1e-5]]))
    elif m == "out_shape":
        out = np.empty(shape + (1,), dtype=dtype)
    elif m == "out_dtype":
        out = np.empty(shape, dtype=data.draw(st.sampled_from([other(dtype), np.int64,
                                                               np.float16])))
    elif m == "out_noncontig":
        out = np.empty(shape[:-1] + (2 * shape[-1],), dtype=dtype)[..., ::2]
        if out.flags.c_contiguous:          # e.g. zero-size: a no-op mutation
            case["expect"] = "either"
    elif m == "out_readonly":
        out = np.empty(shape, dtype=dtype)
        out.setflags(write=False)
    elif m == "out_type":
        out = data.draw(st.sampled_from(["out", [0.0], 3.0]))
    elif m == "out_is_x":
        x = np.ascontiguousarray(xv.astype(dtype))
        out = x
        if x.size == 0:
            case["expect"] = "either"
    elif m == "out_overlap_x":
        out, x = _overlapping_out(data, rng, shape, dtype, "x", shape)
        if x.size == 0:
            case["expect"] = "either"
    elif m == "out_overlap_w":
        out, w = _overlapping_out(data, rng, shape, dtype, "w", nshape)
        if out.size == 0:
            case["expect"] = "either"
    case["args"] = {"x": x, "normalized_shape": ns, "weight": w, "bias": b, "eps": eps,
                    "out": out}
    return case


def _ln_dy_ctx(data, rng, ctx, case):
    """dy, ctx, out for layer_norm_backward, possibly with a bad mutation."""
    shape, dtype = ctx.shape, ctx.dtype
    dy, _ = layout(data, values(data, rng, shape, special=False), dtype, label="dy layout")
    out = poisoned(shape, dtype, rng) if data.draw(st.booleans(), label="dx out?") else None
    m = data.draw(st.sampled_from([None] * 6 + [
        "dy_shape", "dy_dtype", "dy_bad_dtype", "dy_none", "ctx_type", "ctx_mean", "ctx_x",
        "ctx_weight", "ctx_ns", "out_overlap_dy", "out_is_ctx_x", "out_readonly"]),
        label="backward mutation")
    expect = "raise" if m else "ok"
    if m == "dy_shape":
        dy = np.ones(shape + (1,), dtype=dtype)
    elif m == "dy_dtype":
        dy = np.ones(shape, dtype=other(dtype))
    elif m == "dy_bad_dtype":
        dy = bad_array(data, rng, shape)
    elif m == "dy_none":
        dy = None
    elif m == "ctx_type":
        ctx = data.draw(st.sampled_from([None, "ctx", (1, 2)])) if data.draw(st.booleans()) \
            else types.SimpleNamespace(**{f.name: getattr(ctx, f.name)
                                          for f in dataclasses.fields(ctx)})
    elif m == "ctx_mean":
        ctx = dataclasses.replace(ctx, mean=data.draw(st.sampled_from(
            [ctx.mean.astype(np.float32), np.zeros(ctx.mean.shape + (2,)), None, [0.0]])))
    elif m == "ctx_x":
        ctx = dataclasses.replace(ctx, x=data.draw(st.sampled_from(
            [np.ones(ctx.x.shape + (2,), dtype=dtype), None,
             np.asfortranarray(np.ones(ctx.x.shape + (2,), dtype=dtype))[..., 0]])))
        if isinstance(ctx.x, np.ndarray) and ctx.x.flags.c_contiguous and \
                ctx.x.shape == shape:
            expect = "either"
    elif m == "ctx_weight":
        ctx = dataclasses.replace(ctx, weight=np.ones(tuple(ctx.normalized_shape) + (2,),
                                                      dtype=dtype))
    elif m == "ctx_ns":
        ctx = dataclasses.replace(ctx, normalized_shape=tuple(ctx.normalized_shape) + (3,))
    elif m == "out_overlap_dy":
        out, dy = _overlapping_out(data, rng, shape, dtype, "dy", shape)
        if out.size == 0:
            expect = "either"
    elif m == "out_is_ctx_x":
        out = ctx.x
        if out.size == 0 or not out.flags.writeable:
            expect = "either"
    elif m == "out_readonly":
        out = np.empty(shape, dtype=dtype)
        out.setflags(write=False)
    return dy, ctx, out, m, expect


def run_layer_norm(data, rng):
    case = ln_case(data, rng)
    a = case["args"]
    entry = data.draw(st.sampled_from(["op", "forward"]), label="entry")
    dtype = case["dtype"]
    if entry == "op":
        y = call("layer_norm", case, normffn.layer_norm, a, ("out",), guard=(a["out"],))
        ctx = None
    else:
        y, ctx = call("layer_norm_forward", case, normffn.layer_norm_forward, a, ("out",),
                      guard=(a["out"],))
    x = a["x"]
    if a["out"] is not None:
        assert y is a["out"], "out= given but another array returned"
    assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == np.shape(x)
    y_r, ctx_r = ref.layer_norm_forward(x, a["normalized_shape"], a["weight"], a["bias"],
                                        a["eps"])
    label = describe(a)
    assert_close(y, y_r, name="y", context=label)
    if ctx is None:
        return
    assert_close(ctx.mean, ctx_r.mean, dtype=dtype, name="mean", context=label)
    assert_close(ctx.rstd, ctx_r.rstd, dtype=dtype, name="rstd", context=label)
    dy, bctx, out, m, expect = _ln_dy_ctx(data, rng, ctx, case)
    bcase = {"mutation": m, "expect": expect}
    dx, dw, db = call("layer_norm_backward", bcase, normffn.layer_norm_backward,
                      {"dy": dy, "ctx": bctx, "out": out}, ("out",), guard=(out,))
    if m is not None:
        return          # an accepted "either" mutation (e.g. another valid ctx): not comparable
    if out is not None:
        assert dx is out
    dx_r, dw_r, db_r = ref.layer_norm_backward(dy, ctx_r)
    assert_close(dx, dx_r, name="dx", context=label)
    rows = max(1, np.size(x) // max(1, math.prod(ctx.normalized_shape)))
    for g, g_r, p, name in ((dw, dw_r, a["weight"], "dweight"), (db, db_r, a["bias"], "dbias")):
        if p is None:
            assert g is None, f"{name} should be None"
        else:
            assert g.shape == tuple(ctx.normalized_shape) and g.dtype == dtype
            assert_close(g, g_r, name=name, context=label,
                         **_grad_tol("layer_norm", name, dtype, rows))


# ---------------------------------------------------------------- BatchNorm
def _channels_last(a) -> bool:
    return isinstance(a, np.ndarray) and a.ndim >= 3 and not a.flags.c_contiguous and \
        np.moveaxis(a, 1, -1).flags.c_contiguous


def bn_case(data, rng) -> dict:
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    ndim = data.draw(st.integers(2, 4), label="ndim")
    shape = _dims(data, ndim)
    N, C = shape[:2]
    S = math.prod(shape[2:])
    training = data.draw(st.sampled_from([True, False, np.True_, np.False_]), label="training")
    mutation = data.draw(st.sampled_from([None] * 14 + [
        "x_dtype", "x_rank", "x_none", "rm_only", "rv_only", "stats_none_eval", "rm_readonly",
        "rv_noncontig", "rm_list", "rm_shape", "rv_dtype", "stats_same", "stats_overlap",
        "rm_overlap_x", "w_is_rm", "w_shape", "b_dtype", "training_type", "momentum_range",
        "momentum_type", "eps_neg", "eps_type", "out_shape", "out_dtype", "out_readonly",
        "out_layout", "out_is_x", "out_overlap_x", "out_overlap_rv", "out_type"]),
        label="mutation")
    case = {"mutation": mutation, "expect": "raise" if mutation else "ok", "dtype": dtype}
    allowed = LAYOUTS + (("channels_last",) * 3 if ndim >= 3 else ())
    xv = values(data, rng, shape)
    lay = data.draw(st.sampled_from(allowed), label="x layout kind")
    if lay == "channels_last":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(xv.astype(dtype), 1, -1)), -1, 1)
    else:
        x, lay = layout(data, xv, dtype, allowed=(lay,), label="x layout")
    stats = data.draw(st.booleans(), label="running stats?") or not training
    rm = rv = None
    if stats:
        rm = np.ascontiguousarray(values(data, rng, (C,), special=False).astype(dtype))
        rv = np.ascontiguousarray(values(data, rng, (C,), special=False, positive=True)
                                  .astype(dtype))
    w = b = None
    if data.draw(st.booleans(), label="weight?"):
        # no Inf/NaN in the weight: the kernel folds it into y = x * a + b' and an infinite
        # weight gives NaN where the reference gives +-Inf (KNOWN_ISSUES["bn_inf_weight"])
        w, _ = layout(data, values(data, rng, (C,), special=False), dtype, label="w layout")
    if data.draw(st.booleans(), label="bias?"):
        b, _ = layout(data, values(data, rng, (C,)), dtype, label="b layout")
    momentum = data.draw(st.sampled_from([0.1, 0.0, 1.0, 0.5, np.float32(0.3), 1]),
                         label="momentum")
    eps = data.draw(st.sampled_from([1e-5, 1e-3, 1.0, np.float64(1e-4)] +
                                    ([] if training else [0.0])), label="eps")
    out = None
    if data.draw(st.booleans(), label="out?"):
        out = poisoned(shape, dtype, rng, channels_last=_channels_last(x))

    m = mutation
    if m == "x_dtype":
        x = bad_array(data, rng, shape)
    elif m == "x_rank":
        x = np.ones(shape[:data.draw(st.integers(0, 1))], dtype=dtype)
    elif m == "x_none":
        x = None
    elif m == "rm_only":
        rm, rv = np.zeros(C, dtype=dtype), None
    elif m == "rv_only":
        rm, rv = None, np.ones(C, dtype=dtype)
    elif m == "stats_none_eval":
        rm = rv = None
        training = False
    elif m == "rm_readonly":
        rm = np.zeros(C, dtype=dtype)
        rm.setflags(write=False)
        rv = np.ones(C, dtype=dtype) if rv is None else rv
    elif m == "rv_noncontig":
        rm = np.zeros(C, dtype=dtype) if rm is None else rm
        rv = np.ones(2 * C, dtype=dtype)[::2]
        if C <= 1:
            case["expect"] = "either"     # a 0/1-element slice is contiguous
    elif m == "rm_list":
        rm, rv = [0.0] * C, (np.ones(C, dtype=dtype) if rv is None else rv)
    elif m == "rm_shape":
        rm, rv = np.zeros((C + 1,), dtype=dtype), (np.ones(C, dtype=dtype) if rv is None else rv)
    elif m == "rv_dtype":
        rm = np.zeros(C, dtype=dtype) if rm is None else rm
        rv = np.ones(C, dtype=data.draw(st.sampled_from([other(dtype), np.int64, np.float16])))
    elif m == "stats_same":
        rm = rv = np.ones(C, dtype=dtype)
        if C == 0:
            case["expect"] = "either"
    elif m == "stats_overlap":
        buf = np.ones(2 * C + 1, dtype=dtype)
        shift = data.draw(st.integers(0, max(C - 1, 0)), label="stats shift")
        rm, rv = buf[:C], buf[shift:shift + C]
        if C == 0:
            case["expect"] = "either"
    elif m == "rm_overlap_x":
        x = np.ascontiguousarray(xv.astype(dtype))
        if x.size >= C and C > 0:
            rm = x.reshape(-1)[x.size - C:]
            rv = np.ones(C, dtype=dtype) if rv is None else rv
        else:
            case["expect"] = "either"
    elif m == "w_is_rm":
        if rm is None:
            rm, rv = np.zeros(C, dtype=dtype), np.ones(C, dtype=dtype)
        w = rm
        if C == 0:
            case["expect"] = "either"
    elif m == "w_shape":
        w = np.ones((C, 1), dtype=dtype)
    elif m == "b_dtype":
        b = bad_array(data, rng, (C,)) if data.draw(st.booleans()) else \
            np.ones(C, dtype=other(dtype))
    elif m == "training_type":
        training = data.draw(st.sampled_from([1, 0, "yes", None, 1.0]), label="bad training")
    elif m == "momentum_range":
        momentum = data.draw(st.sampled_from([-0.1, 1.5, np.nan, np.inf]))
    elif m == "momentum_type":
        momentum = data.draw(st.sampled_from(["0.1", None, True, 0.1j, np.array([0.1])]))
    elif m == "eps_neg":
        eps = data.draw(st.sampled_from([-1e-5, np.nan, np.inf] + ([0.0] if training else [])))
    elif m == "eps_type":
        eps = data.draw(st.sampled_from(["1e-5", None, False, 1e-5j]))
    elif m == "out_shape":
        out = np.empty(shape[:1] + (C + 1,) + shape[2:], dtype=dtype)
    elif m == "out_dtype":
        out = np.empty(shape, dtype=other(dtype))
    elif m == "out_readonly":
        out = poisoned(shape, dtype, rng, channels_last=_channels_last(x))
        out.setflags(write=False)
    elif m == "out_layout":
        out = poisoned(shape, dtype, rng, channels_last=not _channels_last(x))
        ok = np.moveaxis(out, 1, -1).flags.c_contiguous if _channels_last(x) \
            else out.flags.c_contiguous
        if ok:
            case["expect"] = "either"
    elif m == "out_is_x":
        x = np.ascontiguousarray(xv.astype(dtype))
        out = x
        if x.size == 0:
            case["expect"] = "either"
    elif m == "out_overlap_x":
        out, x = _overlapping_out(data, rng, shape, dtype, "x", shape)
        if x.size == 0:
            case["expect"] = "either"
    elif m == "out_overlap_rv":
        if C == 0 or math.prod(shape) == 0:
            case["expect"] = "either"
        out, rv = _overlapping_out(data, rng, shape, dtype, "rv", (C,))
        rv[...] = np.abs(rv) + 0.1
        rm = np.zeros(C, dtype=dtype)
    elif m == "out_type":
        out = data.draw(st.sampled_from(["out", [0.0], 3.0]))
    # constraints that make otherwise valid arguments invalid
    if case["expect"] == "ok" and isinstance(training, (bool, np.bool_)):
        if training and N * S <= 1:
            case["expect"] = "raise"
        if not training and rm is None:
            case["expect"] = "raise"
    if case["expect"] == "ok" and out is not None and _channels_last(x) and \
            out.flags.c_contiguous and not np.moveaxis(out, 1, -1).flags.c_contiguous:
        case["expect"] = "raise"
    case["args"] = {"x": x, "running_mean": rm, "running_var": rv, "weight": w, "bias": b,
                    "training": training, "momentum": momentum, "eps": eps, "out": out}
    return case


def _bn_dy_ctx(data, rng, ctx):
    shape, dtype = ctx.shape, ctx.dtype
    dy, _ = layout(data, values(data, rng, shape, special=False), dtype, label="dy layout")
    out = None
    if data.draw(st.booleans(), label="dx out?"):
        out = poisoned(shape, dtype, rng, channels_last=ctx.channels_last)
    m = data.draw(st.sampled_from([None] * 6 + [
        "dy_shape", "dy_dtype", "dy_none", "ctx_type", "ctx_mean", "ctx_x", "ctx_training",
        "ctx_weight", "out_overlap_dy", "out_is_ctx_mean", "out_readonly"]),
        label="backward mutation")
    expect = "raise" if m else "ok"
    C = shape[1]
    if m == "dy_shape":
        dy = np.ones(shape[:1] + (C + 1,) + shape[2:], dtype=dtype)
    elif m == "dy_dtype":
        dy = np.ones(shape, dtype=data.draw(st.sampled_from([other(dtype), np.int32])))
    elif m == "dy_none":
        dy = None
    elif m == "ctx_type":
        ctx = data.draw(st.sampled_from([None, "ctx", {}]))
    elif m == "ctx_mean":
        ctx = dataclasses.replace(ctx, mean=np.zeros(C + 1, dtype=dtype))
    elif m == "ctx_x":
        ctx = dataclasses.replace(ctx, x=data.draw(st.sampled_from(
            [None, np.ones((2,) + shape, dtype=dtype)[::2][0][:, ::-1] if C > 1 else None,
             np.ones(shape[:1], dtype=dtype)])))
        if isinstance(ctx.x, np.ndarray) and ctx.x.shape == shape and ctx.x.flags.c_contiguous:
            expect = "either"      # a zero-size array is "contiguous" whatever its strides
    elif m == "ctx_training":
        ctx = dataclasses.replace(ctx, training="yes")
    elif m == "ctx_weight":
        ctx = dataclasses.replace(ctx, weight=np.ones(C + 2, dtype=dtype))
    elif m == "out_overlap_dy":
        out, dy = _overlapping_out(data, rng, shape, dtype, "dy", shape)
        if out.size == 0:
            expect = "either"
        if ctx.channels_last:
            expect = "raise"      # a C-contiguous out for a channels-last ctx is wrong anyway
    elif m == "out_is_ctx_mean":
        # out aliasing the statistics the kernel reads (a view of ctx.mean's memory)
        if math.prod(shape) == C and C > 0 and not ctx.channels_last:
            out = ctx.mean.reshape(shape)
        else:
            expect = "either"
    elif m == "out_readonly":
        out = poisoned(shape, dtype, rng, channels_last=ctx.channels_last)
        out.setflags(write=False)
    return dy, ctx, out, m, expect


def run_batch_norm(data, rng):
    case = bn_case(data, rng)
    a = case["args"]
    dtype = case["dtype"]
    entry = data.draw(st.sampled_from(["op", "forward"]), label="entry")
    rm, rv = a["running_mean"], a["running_var"]
    rm0 = np.array(rm, dtype=np.float64) if isinstance(rm, np.ndarray) else None
    rv0 = np.array(rv, dtype=np.float64) if isinstance(rv, np.ndarray) else None
    guard = tuple(g for g in (a["out"], rm, rv) if isinstance(g, np.ndarray))
    mutable = ("out", "running_mean", "running_var")
    if entry == "op":
        y = call("batch_norm", case, normffn.batch_norm, a, ("out",), guard=guard,
                 mutable=mutable)
        ctx = None
    else:
        y, ctx = call("batch_norm_forward", case, normffn.batch_norm_forward, a, ("out",),
                      guard=guard, mutable=mutable)
    x = a["x"]
    if a["out"] is not None:
        assert y is a["out"], "out= given but another array returned"
    assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == np.shape(x)
    if _channels_last(x):
        assert np.moveaxis(y, 1, -1).flags.c_contiguous, "channels-last in, not out"
    label = describe(a)
    if np.shape(x)[1] == 0:
        return          # no channels: nothing computed (and the reference divides by C)
    y_r, ctx_r = ref.batch_norm_forward(x, rm0, rv0, a["weight"], a["bias"], bool(a["training"]),
                                        float(a["momentum"]), float(a["eps"]))
    assert_close(y, y_r, name="y", context=label)
    if rm is not None:
        assert_close(rm, rm0, name="running_mean", context=label)
        assert_close(rv, rv0, name="running_var", context=label)
    if ctx is None:
        return
    assert_close(ctx.mean, ctx_r.mean, dtype=dtype, name="mean", context=label)
    assert_close(ctx.rstd, ctx_r.rstd, dtype=dtype, name="rstd", context=label)
    dy, bctx, out, m, expect = _bn_dy_ctx(data, rng, ctx)
    bcase = {"mutation": m, "expect": expect}
    dx, dw, db = call("batch_norm_backward", bcase, normffn.batch_norm_backward,
                      {"dy": dy, "ctx": bctx, "out": out}, ("out",), guard=(out,))
    if m is not None:
        return          # an accepted "either" mutation (e.g. another valid ctx): not comparable
    if out is not None:
        assert dx is out
    dx_r, dw_r, db_r = ref.batch_norm_backward(dy, ctx_r)
    assert_close(dx, dx_r, name="dx", context=label)
    count = max(1, np.size(x) // max(1, np.shape(x)[1]))
    for g, g_r, p, name in ((dw, dw_r, a["weight"], "dweight"), (db, db_r, a["bias"], "dbias")):
        if p is None:
            assert g is None, f"{name} should be None"
        else:
            assert g.shape == (np.shape(x)[1],) and g.dtype == dtype
            assert_close(g, g_r, name=name, context=label,
                         **_grad_tol("batch_norm", name, dtype, count))


# ---------------------------------------------------------------- FFN
ACTS = ("relu", "gelu", "gelu_tanh", "silu")
GATED_ACTS = ("swiglu", "geglu", "reglu")


def ffn_case(data, rng, gated: bool = False, mutate: bool = True) -> dict:
    """Arguments of ffn / ffn_forward; ``gated``: a gated activation, w1 (d, 2h) = [gate | up]
    and b1 (2h,) (``hw`` below is w1's width: h, or 2h when gated); ``mutate=False``: no bad
    mutation (the caller draws its own)."""
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    ndim = data.draw(st.integers(1, 3), label="ndim")
    shape = _dims(data, ndim, lo=(0,) * (ndim - 1) + (1,))
    d = shape[-1]
    h = data.draw(st.sampled_from([1, 2, 3, 5, 8, 16, 17, 33]), label="h")
    hw = 2 * h if gated else h
    mutation = data.draw(st.sampled_from([None] * 12 + [
        "x_dtype", "x_0d", "x_none", "d_zero", "h_zero", "w1_shape", "w1_rank", "w2_shape",
        "w2_dtype", "w1_bad_dtype", "b1_shape", "b2_shape", "b1_dtype", "act_value", "act_type",
        "recompute_type", "out_shape", "out_dtype", "out_readonly", "out_noncontig",
        "out_is_x", "out_overlap_x", "out_overlap_w2", "out_type"] +
        (["w1_odd", "b1_half", "w1_unpacked"] if gated else [])), label="mutation") \
        if mutate else None
    case = {"mutation": mutation, "expect": "raise" if mutation else "ok", "dtype": dtype}
    # NaN only: with an Inf, float32 underflow of act(v) (0 * Inf = NaN) against the float64
    # reference's tiny-but-nonzero value (tiny * Inf = Inf) is a precision question, not safety
    nan = (np.nan,)
    xv = values(data, rng, shape, specials=nan)
    x, _ = layout(data, xv, dtype, label="x layout")
    w1, _ = layout(data, values(data, rng, (d, hw), scale=1 / math.sqrt(d), specials=nan),
                   dtype, label="w1 layout")
    w2, _ = layout(data, values(data, rng, (h, d), scale=1 / math.sqrt(h), specials=nan), dtype,
                   label="w2 layout")
    b1 = b2 = None
    if data.draw(st.booleans(), label="b1?"):
        b1, _ = layout(data, values(data, rng, (hw,), specials=nan), dtype, label="b1 layout")
    if data.draw(st.booleans(), label="b2?"):
        b2, _ = layout(data, values(data, rng, (d,), specials=nan), dtype, label="b2 layout")
    act = data.draw(st.sampled_from(GATED_ACTS if gated else ACTS), label="activation")
    recompute = data.draw(st.sampled_from([False, True, np.True_]), label="recompute")
    out = poisoned(shape, dtype, rng) if data.draw(st.booleans(), label="out?") else None
    m = mutation
    if m == "x_dtype":
        x = bad_array(data, rng, shape)
    elif m == "x_0d":
        x = np.array(1.0, dtype=dtype)
    elif m == "x_none":
        x = None
    elif m == "d_zero":
        x, w1, w2, b2 = (np.ones(shape[:-1] + (0,), dtype=dtype), np.ones((0, hw), dtype=dtype),
                         np.ones((h, 0), dtype=dtype), None)
        out = None
    elif m == "h_zero":
        w1, w2, b1 = np.ones((d, 0), dtype=dtype), np.ones((0, d), dtype=dtype), None
    elif m == "w1_shape":
        w1 = np.ones((d + 1, hw), dtype=dtype)
    elif m == "w1_rank":
        w1 = np.ones(data.draw(st.sampled_from([(d,), (d, hw, 1), ()])), dtype=dtype)
    elif m == "w2_shape":
        w2 = np.ones((h, d + 1), dtype=dtype) if data.draw(st.booleans()) else \
            np.ones((d, h), dtype=dtype)
        if d == h:
            case["expect"] = "either"
    elif m == "w2_dtype":
        w2 = np.ones((h, d), dtype=other(dtype))
    elif m == "w1_bad_dtype":
        w1 = bad_array(data, rng, (d, hw))
    elif m == "b1_shape":
        b1 = np.ones((hw + 1,), dtype=dtype)
    elif m == "b2_shape":
        b2 = np.ones((1, d), dtype=dtype)
    elif m == "b1_dtype":
        b1 = bad_array(data, rng, (hw,))
    elif m == "act_value":
        act = data.draw(st.sampled_from(["tanh", "", "RELU", "gelu ", "none"]))
    elif m == "act_type":
        act = data.draw(st.sampled_from([None, 0, b"relu", ("relu",), np.str_("relu")]))
        if isinstance(act, str):
            case["expect"] = "either"        # np.str_ is a str
    elif m == "recompute_type":
        recompute = data.draw(st.sampled_from([1, "yes", None, 0.0]))
    elif m == "out_shape":
        out = np.empty(shape + (1,), dtype=dtype)
    elif m == "out_dtype":
        out = np.empty(shape, dtype=other(dtype))
    elif m == "out_readonly":
        out = np.empty(shape, dtype=dtype)
        out.setflags(write=False)
    elif m == "out_noncontig":
        out = np.empty(shape[:-1] + (2 * d,), dtype=dtype)[..., ::2]
        if out.flags.c_contiguous:
            case["expect"] = "either"
    elif m == "out_is_x":
        x = np.ascontiguousarray(xv.astype(dtype))
        out = x
        if x.size == 0:
            case["expect"] = "either"
    elif m == "out_overlap_x":
        out, x = _overlapping_out(data, rng, shape, dtype, "x", shape)
        if x.size == 0:
            case["expect"] = "either"
    elif m == "out_overlap_w2":
        out, w2 = _overlapping_out(data, rng, shape, dtype, "w2", (h, d))
        if out.size == 0:
            case["expect"] = "either"
    elif m == "out_type":
        out = data.draw(st.sampled_from(["out", [0.0], 3.0]))
    elif m == "w1_odd":              # a packed w1 must be 2h wide
        w1 = np.ones((d, hw + 1), dtype=dtype)
    elif m == "b1_half":             # the gate's bias alone, not the packed [gate | up]
        b1 = np.ones((h,), dtype=dtype)
    elif m == "w1_unpacked":         # w1 (d, h) with w2 (h, d): the up half is missing
        w1, b1 = np.ones((d, h), dtype=dtype), None
    case["args"] = {"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2, "activation": act}
    case["recompute"] = recompute
    case["out"] = out
    case["d"], case["h"] = d, h
    return case


def _ffn_dy_ctx(data, rng, ctx):
    shape, dtype = ctx.shape, ctx.dtype
    dy, _ = layout(data, values(data, rng, shape, special=False), dtype, label="dy layout")
    m = data.draw(st.sampled_from([None] * 6 + [
        "dy_shape", "dy_dtype", "dy_none", "ctx_type", "ctx_hidden", "ctx_recompute",
        "ctx_activation", "ctx_w1", "ctx_w2", "ctx_b1", "ctx_x"]), label="backward mutation")
    expect = "raise" if m else "ok"
    d, h = ctx.w1.shape
    if m == "dy_shape":
        dy = np.ones(shape[:-1] + (d + 1,), dtype=dtype)
    elif m == "dy_dtype":
        dy = np.ones(shape, dtype=data.draw(st.sampled_from([other(dtype), np.int64])))
    elif m == "dy_none":
        dy = None
    elif m == "ctx_type":
        ctx = data.draw(st.sampled_from([None, "ctx", ()]))
    elif m == "ctx_hidden":
        n = math.prod(shape[:-1])
        ctx = dataclasses.replace(ctx, hidden=data.draw(st.sampled_from(
            [np.ones((n + 1, h), dtype=dtype), np.ones((n, h), dtype=other(dtype)),
             np.ones((h, n), dtype=dtype).T if n > 1 and h > 1 else None])))
        if ctx.hidden is None and ctx.recompute:
            expect = "ok"
    elif m == "ctx_recompute":
        ctx = dataclasses.replace(ctx, recompute=data.draw(st.sampled_from(
            [not ctx.recompute, "yes", 1])))
        if ctx.recompute is False and ctx.hidden is None:
            expect = "raise"
    elif m == "ctx_activation":
        ctx = dataclasses.replace(ctx, activation=data.draw(st.sampled_from(["tanh", None, 3])))
    elif m == "ctx_w1":
        ctx = dataclasses.replace(ctx, w1=data.draw(st.sampled_from(
            [np.ones((d + 1, h), dtype=dtype), np.ones((d, h), dtype=other(dtype)),
             np.ones((d, h, 2), dtype=dtype)[:, :, 0], np.ones((d, h + 1), dtype=dtype), None])))
        if isinstance(ctx.w1, np.ndarray) and ctx.w1.shape == (d, h) and ctx.w1.dtype == dtype:
            expect = "either"      # a strided but BLAS-readable view is a valid weight
    elif m == "ctx_w2":
        ctx = dataclasses.replace(ctx, w2=np.ones((d, h + 1), dtype=dtype))
    elif m == "ctx_b1":
        ctx = dataclasses.replace(ctx, b1=np.ones(h + 1, dtype=dtype))
    elif m == "ctx_x":
        ctx = dataclasses.replace(ctx, x=data.draw(st.sampled_from(
            [np.ones(shape[:-1] + (d + 1,), dtype=dtype), None,
             np.ones(shape, dtype=other(dtype))])))
    return dy, ctx, m, expect


def _ffn_backward_out(data, rng, ctx, dy, m):
    """out= and needs= for ffn_backward: None, or five buffers (some None) in the gradients'
    shapes, sometimes mutated (a wrong shape, an overlap with dy, not five entries)."""
    if m is not None or not data.draw(st.booleans(), label="bwd out/needs?"):
        return None, None, None
    dtype = ctx.dtype
    d, hw = ctx.w1.shape
    shapes = (ctx.shape, (d, hw), (hw,), (ctx.w2.shape[0], d), (d,))
    out = [poisoned(s, dtype, rng) if data.draw(st.booleans(), label=f"out[{i}]?") else None
           for i, s in enumerate(shapes)]
    needs = data.draw(st.sampled_from([None, None] + [
        tuple(bool(i >> j & 1) for j in range(5)) for i in range(0, 32, 3)]), label="needs")
    bad = data.draw(st.sampled_from([None] * 6 + ["out_len", "out_shape", "out_is_dy",
                                                  "out_twice", "needs_len"]), label="bwd bad")
    if bad == "out_len":
        out = out[:4]
    elif bad == "out_shape":
        out[1] = np.empty((d + 1, hw), dtype)
        needs = None
    elif bad == "out_is_dy":
        if not isinstance(dy, np.ndarray) or not dy.flags.c_contiguous or not \
                dy.flags.writeable or dy.size == 0:
            bad = None
        else:
            out[0] = dy
            needs = None
    elif bad == "out_twice":         # dw1 and dw2 into one buffer (d == hw == h only)
        if d == hw == ctx.w2.shape[0] and d > 0:
            out[1] = out[3] = np.empty((d, d), dtype)
            needs = None
        else:
            bad = None
    elif bad == "needs_len":
        needs = (True,) * 4
    return tuple(out), needs, bad


def run_ffn(data, rng, gated: bool = False):
    case = ffn_case(data, rng, gated)
    a = case["args"]
    dtype = case["dtype"]
    entry = data.draw(st.sampled_from(["op", "forward"]), label="entry")
    if entry == "op":
        if case["mutation"] == "recompute_type":
            case["expect"] = "ok"          # ffn() takes no recompute: the mutation is moot
        args = dict(a, out=case["out"])
        y = call("ffn", case, normffn.ffn, args, ("out",), guard=(case["out"],))
        ctx = None
    else:
        if case["mutation"] and case["mutation"].startswith("out_"):
            case["expect"] = "ok"          # ffn_forward takes no out=: the mutation is moot
        args = dict(a, recompute=case["recompute"])
        if case["mutation"] == "recompute_type":
            case["expect"] = "raise"
        y, ctx = call("ffn_forward", case, normffn.ffn_forward, args)
    x = a["x"]
    if entry == "op" and case["out"] is not None:
        assert y is case["out"]
    assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == np.shape(x)
    label = describe(a)
    y_r, ctx_r = ref.ffn_forward(x, a["w1"], a["b1"], a["w2"], a["b2"], a["activation"])
    assert_close(y, y_r, name="y", context=label)
    if ctx is None:
        return
    if ctx.dead_units is not None:
        assert np.array_equal(ctx.dead_units, ctx_r.dead_units), "dead_units differ"
    dy, bctx, m, expect = _ffn_dy_ctx(data, rng, ctx)
    out, needs, bad = _ffn_backward_out(data, rng, ctx, dy, m)
    if bad is not None:
        m, expect = bad, "raise"
    guard = tuple(o for o in out or () if o is not None)
    grads = call("ffn_backward", {"mutation": m, "expect": expect}, normffn.ffn_backward,
                 {"dy": dy, "ctx": bctx, "out": out, "needs": needs}, ("out", "needs"),
                 guard=guard)
    if m is not None:
        return          # an accepted "either" mutation (e.g. another valid ctx): not comparable
    for g, o in zip(grads, out or ()):
        if g is not None and o is not None:
            assert g is o or g.base is o, "out= given but another array returned"
    grads_r = ref.ffn_backward(dy, ctx_r, needs=needs)
    rows = max(1, math.prod(np.shape(x)[:-1]))
    for g, g_r, name in zip(grads, grads_r, _ops.get("ffn").grads):
        if g_r is None:
            assert g is None, f"{name} should be None"
        else:
            assert g.dtype == dtype
            assert_close(g, g_r, name=name, context=label, **_grad_tol("ffn", name, dtype, rows))


# ---------------------------------------------------------------- RMSNorm and add + norm
ROW_OPS = {
    # op -> (has residual, has bias, eps=None allowed)
    "rms_norm": (False, False, True),
    "add_layer_norm": (True, True, False),
    "add_rms_norm": (True, False, True),
}


def rownorm_case(data, rng, op: str) -> dict:
    """Arguments of rms_norm / add_layer_norm / add_rms_norm (the rms_norm and add_norm modules
    share their checks), possibly with one bad mutation."""
    residual, has_bias, eps_none = ROW_OPS[op]
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    ndim = data.draw(st.integers(1, 4), label="ndim")
    k = data.draw(st.integers(1, ndim), label="len(normalized_shape)")
    shape = _dims(data, ndim, lo=(0,) * (ndim - k) + (1,) * k)
    nshape = shape[ndim - k:]
    muts = ["x_dtype", "x_0d", "x_none", "x_str", "ns_mismatch", "ns_zero", "ns_empty",
            "ns_toolong", "ns_type", "w_shape", "w_dtype", "w_bad_dtype", "w_str", "eps_neg",
            "eps_nonfinite", "eps_type", "out_dtype", "out_readonly", "out_is_x",
            "out_overlap_x", "out_overlap_w"]
    if residual:
        muts += ["r_shape", "r_dtype", "r_bad_dtype", "r_none", "out_not_pair", "out_same",
                 "out_overlap_r", "out_s_shape", "out_s_noncontig"]
    else:
        muts += ["out_shape", "out_noncontig", "out_type"]
    if has_bias:
        muts += ["b_shape", "b_dtype", "eps_none"]
    else:
        muts += ["bias_given"]
    mutation = data.draw(st.sampled_from([None] * 14 + muts), label="mutation")
    case = {"mutation": mutation, "expect": "raise" if mutation else "ok", "dtype": dtype}
    # eps > 0 only: eps = 0 on an all-zero row is 0/0 (ill-posed, not a safety question)
    eps = data.draw(st.sampled_from([1e-5, 1e-3, 1.0, 1, np.float32(1e-5), np.float64(1e-6)] +
                                    ([None, None] if eps_none else [])), label="eps")
    xv = values(data, rng, shape)
    x, _ = layout(data, xv, dtype, label="x layout")
    r = rv = None
    if residual:
        rv = values(data, rng, shape)
        r, _ = layout(data, rv, dtype, label="residual layout")
    ns = data.draw(st.sampled_from([tuple(nshape), list(nshape)] +
                                   ([nshape[0], np.int64(nshape[0])] if k == 1 else [])),
                   label="normalized_shape form")
    w = b = None
    if data.draw(st.booleans(), label="weight?"):
        w, _ = layout(data, values(data, rng, nshape), dtype, label="w layout")
    if has_bias and data.draw(st.booleans(), label="bias?"):
        b, _ = layout(data, values(data, rng, nshape), dtype, label="b layout")
    out = None
    if data.draw(st.booleans(), label="out?"):
        out = (poisoned(shape, dtype, rng), poisoned(shape, dtype, rng)) if residual \
            else poisoned(shape, dtype, rng)
    extra = {}
    m = mutation
    if m == "x_dtype":
        x = bad_array(data, rng, shape)
    elif m == "x_0d":
        x, ns = np.array(1.0, dtype=dtype), 1
        if residual:
            r = np.array(1.0, dtype=dtype)
    elif m == "x_none":
        x = None
    elif m == "x_str":
        x = "not an array"
    elif m == "ns_mismatch":
        ns = tuple(nshape[:-1]) + (nshape[-1] + 1,)
    elif m == "ns_zero":
        ns = tuple(nshape[:-1]) + (0,)
    elif m == "ns_empty":
        ns = ()
    elif m == "ns_toolong":
        ns = (1,) + tuple(shape)
    elif m == "ns_type":
        ns = data.draw(st.sampled_from([1.5, "3", None, True, (1.0,), [None]]), label="bad ns")
    elif m == "w_shape":
        w = np.ones((nshape[-1] + 1,), dtype=dtype)
    elif m == "w_dtype":
        w = np.ones(nshape, dtype=other(dtype))
    elif m == "w_bad_dtype":
        w = bad_array(data, rng, nshape)
    elif m == "w_str":
        w = "weight"
    elif m == "b_shape":
        b = np.ones((1,) + nshape, dtype=dtype)
    elif m == "b_dtype":
        b = bad_array(data, rng, nshape) if data.draw(st.booleans()) \
            else np.ones(nshape, dtype=other(dtype))
    elif m == "bias_given":          # rms ops take no bias argument at all
        extra["bias"] = np.ones(nshape, dtype=dtype)
    elif m == "eps_neg":
        eps = data.draw(st.sampled_from([-1e-5, -1.0]))
    elif m == "eps_nonfinite":
        eps = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif m == "eps_type":
        eps = data.draw(st.sampled_from(["1e-5", True, 1j, np.array([1e-5]), [1e-5]]))
    elif m == "eps_none":            # add_layer_norm's eps is a number (default 1e-5)
        eps = None
    elif m == "r_shape":
        r = np.ones(shape + (1,), dtype=dtype) if data.draw(st.booleans()) \
            else np.ones(shape[:-1] + (shape[-1] + 1,), dtype=dtype)
    elif m == "r_dtype":
        r = np.ones(shape, dtype=other(dtype))
    elif m == "r_bad_dtype":
        r = bad_array(data, rng, shape)
    elif m == "r_none":
        r = None
    elif m == "out_shape":
        out = np.empty(shape + (1,), dtype=dtype)
    elif m == "out_s_shape":
        out = (poisoned(shape, dtype, rng), np.empty(shape + (1,), dtype=dtype))
    elif m == "out_dtype":
        bad = np.empty(shape, dtype=other(dtype))
        out = (poisoned(shape, dtype, rng), bad) if residual else bad
    elif m == "out_noncontig":
        out = np.empty(shape[:-1] + (2 * shape[-1],), dtype=dtype)[..., ::2]
        if out.flags.c_contiguous:
            case["expect"] = "either"
    elif m == "out_s_noncontig":
        s_out = np.empty(shape[:-1] + (2 * shape[-1],), dtype=dtype)[..., ::2]
        out = (poisoned(shape, dtype, rng), s_out)
        if s_out.flags.c_contiguous:
            case["expect"] = "either"
    elif m == "out_readonly":
        ro = np.empty(shape, dtype=dtype)
        ro.setflags(write=False)
        out = (ro, poisoned(shape, dtype, rng)) if residual else ro
    elif m == "out_type":
        out = data.draw(st.sampled_from(["out", [0.0], 3.0]))
    elif m == "out_not_pair":
        y_out = poisoned(shape, dtype, rng)
        out = data.draw(st.sampled_from([y_out, (y_out,), (y_out, y_out.copy(), y_out.copy()),
                                         "out"]), label="not a pair")
    elif m == "out_same":            # y and s into one buffer
        y_out = poisoned(shape, dtype, rng)
        out = (y_out, y_out)
        if y_out.size == 0:
            case["expect"] = "either"
    elif m == "out_is_x":
        x = np.ascontiguousarray(xv.astype(dtype))
        out = (x, poisoned(shape, dtype, rng)) if residual else x
        if x.size == 0:
            case["expect"] = "either"
    elif m == "out_overlap_x":
        o, x = _overlapping_out(data, rng, shape, dtype, "x", shape)
        out = (poisoned(shape, dtype, rng), o) if residual else o
        if x.size == 0:
            case["expect"] = "either"
    elif m == "out_overlap_r":
        o, r = _overlapping_out(data, rng, shape, dtype, "r", shape)
        out = (o, poisoned(shape, dtype, rng))
        if r.size == 0:
            case["expect"] = "either"
    elif m == "out_overlap_w":
        o, w = _overlapping_out(data, rng, shape, dtype, "w", nshape)
        out = (o, poisoned(shape, dtype, rng)) if residual else o
        if o.size == 0:
            case["expect"] = "either"
    args = {"x": x}
    if residual:
        args["residual"] = r
    args.update(normalized_shape=ns, weight=w)
    if has_bias:
        args["bias"] = b
    args["eps"] = eps
    args.update(extra)
    args["out"] = out
    case["args"] = args
    return case


def _rownorm_backward_case(data, rng, op, ctx):
    """dy, ctx, ds, out and needs for the backward of a row-norm op, possibly mutated."""
    residual, has_bias, _ = ROW_OPS[op]
    shape, dtype = ctx.shape, ctx.dtype
    n_grads = 3 if has_bias else 2
    dy, _ = layout(data, values(data, rng, shape, special=False), dtype, label="dy layout")
    ds = None
    if residual and data.draw(st.booleans(), label="ds?"):
        ds, _ = layout(data, values(data, rng, shape, special=False), dtype, label="ds layout")
    out = poisoned(shape, dtype, rng) if data.draw(st.booleans(), label="dx out?") else None
    needs = data.draw(st.sampled_from([None, None] + [
        tuple(bool(i >> j & 1) for j in range(n_grads)) for i in range(2 ** n_grads)]),
        label="needs")
    if needs is not None and not needs[0]:
        out = None
    saved = "s" if residual else "x"
    muts = ["dy_shape", "dy_dtype", "dy_none", "ctx_type", "ctx_other_op", "ctx_rstd",
            "ctx_saved", "ctx_weight", "ctx_ns", "out_overlap_dy", "out_is_ctx_saved",
            "out_readonly", "needs_len", "needs_type", "out_not_needed"]
    if residual:
        muts += ["ds_shape", "ds_dtype", "out_overlap_ds"]
    m = data.draw(st.sampled_from([None] * 8 + muts), label="backward mutation")
    expect = "raise" if m else "ok"
    if m == "dy_shape":
        dy = np.ones(shape + (1,), dtype=dtype)
    elif m == "dy_dtype":
        dy = np.ones(shape, dtype=other(dtype))
    elif m == "dy_none":
        dy = None
    elif m == "ctx_type":
        ctx = data.draw(st.sampled_from([None, "ctx", (1, 2)])) if data.draw(st.booleans()) \
            else types.SimpleNamespace(**{f.name: getattr(ctx, f.name)
                                          for f in dataclasses.fields(ctx)})
    elif m == "ctx_other_op":        # a valid context, but of another op
        xx = np.ones((2, 3), dtype=dtype)
        ctx = data.draw(st.sampled_from(["ln", "rms", "add_ln", "add_rms"]), label="other ctx")
        ctx = {"ln": lambda: normffn.layer_norm_forward(xx, 3)[1],
               "rms": lambda: normffn.rms_norm_forward(xx, 3)[1],
               "add_ln": lambda: normffn.add_layer_norm_forward(xx, xx, 3)[2],
               "add_rms": lambda: normffn.add_rms_norm_forward(xx, xx, 3)[2]}[ctx]()
        mine = {"rms_norm": normffn.RMSNormContext, "add_layer_norm":
                normffn.AddLayerNormContext, "add_rms_norm": normffn.AddRMSNormContext}[op]
        if isinstance(ctx, mine):
            expect = "raise" if shape != (2, 3) else "either"
    elif m == "ctx_rstd":
        ctx = dataclasses.replace(ctx, rstd=data.draw(st.sampled_from(
            [ctx.rstd.astype(np.float32), np.zeros(ctx.rstd.shape + (2,)), None, [0.0]])))
    elif m == "ctx_saved":
        bad = data.draw(st.sampled_from(
            [np.ones(shape + (2,), dtype=dtype), None,
             np.asfortranarray(np.ones(shape + (2,), dtype=dtype))[..., 0]]))
        ctx = dataclasses.replace(ctx, **{saved: bad})
        if isinstance(bad, np.ndarray) and bad.flags.c_contiguous and bad.shape == shape:
            expect = "either"
    elif m == "ctx_weight":
        ctx = dataclasses.replace(ctx, weight=np.ones(tuple(ctx.normalized_shape) + (2,),
                                                      dtype=dtype))
    elif m == "ctx_ns":
        ctx = dataclasses.replace(ctx, normalized_shape=tuple(ctx.normalized_shape) + (3,))
    elif m == "out_overlap_dy":
        out, dy = _overlapping_out(data, rng, shape, dtype, "dy", shape)
        needs = None
        if out.size == 0:
            expect = "either"
    elif m == "out_overlap_ds":
        out, ds = _overlapping_out(data, rng, shape, dtype, "ds", shape)
        needs = None
        if out.size == 0:
            expect = "either"
    elif m == "out_is_ctx_saved":
        out = getattr(ctx, saved)
        needs = None
        if out.size == 0 or not out.flags.writeable:
            expect = "either"
    elif m == "out_readonly":
        out = np.empty(shape, dtype=dtype)
        out.setflags(write=False)
        needs = None
    elif m == "ds_shape":
        ds = np.ones(shape + (1,), dtype=dtype)
    elif m == "ds_dtype":
        ds = np.ones(shape, dtype=other(dtype))
    elif m == "needs_len":
        needs = (True,) * (n_grads + 1)
    elif m == "needs_type":
        needs = data.draw(st.sampled_from(["all", True, (1,) * n_grads, [None] * n_grads]))
    elif m == "out_not_needed":      # out= for dx, but dx not needed
        out = poisoned(shape, dtype, rng)
        needs = (False,) + (True,) * (n_grads - 1)
    return dy, ctx, ds, out, needs, m, expect


def run_rownorm(data, rng, op):
    residual, has_bias, _ = ROW_OPS[op]
    case = rownorm_case(data, rng, op)
    a = case["args"]
    dtype = case["dtype"]
    out = a["out"]
    guard = tuple(o for o in (out if isinstance(out, tuple) else (out,))
                  if isinstance(o, np.ndarray))
    entry = data.draw(st.sampled_from(["op", "forward"]), label="entry")
    fn = getattr(normffn, op if entry == "op" else f"{op}_forward")
    by_kw = ("out",) if has_bias else ("out", "bias")    # rms ops: a bias is a bad keyword
    res = call(op if entry == "op" else f"{op}_forward", case, fn, a, by_kw, guard=guard)
    if residual:
        y, s = res[:2]
        ctx = res[2] if entry == "forward" else None
    else:
        y, ctx = (res, None) if entry == "op" else res
    x = a["x"]
    if out is not None:
        same = (y is out[0] and s is out[1]) if residual else y is out
        assert same, "out= given but other arrays returned"
    assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == np.shape(x)
    label = describe(a)
    ref_args = [x] + ([a["residual"]] if residual else []) + [a["normalized_shape"], a["weight"]]
    ref_args += ([a["bias"]] if has_bias else []) + [a["eps"]]
    res_r = getattr(ref, f"{op}_forward")(*ref_args)
    y_r, ctx_r = res_r[0], res_r[-1]
    assert_close(y, y_r, name="y", context=label)
    if residual:
        assert s.dtype == dtype and s.shape == np.shape(x)
        assert_close(s, res_r[1], name="s", context=label)
    if ctx is None:
        return
    if has_bias:
        assert_close(ctx.mean, ctx_r.mean, dtype=dtype, name="mean", context=label)
    assert_close(ctx.rstd, ctx_r.rstd, dtype=dtype, name="rstd", context=label)
    dy, bctx, ds, bout, needs, m, expect = _rownorm_backward_case(data, rng, op, ctx)
    args = {"dy": dy, "ctx": bctx}
    if residual:
        args["ds"] = ds
    args.update(out=bout, needs=needs)
    grads = call(f"{op}_backward", {"mutation": m, "expect": expect},
                 getattr(normffn, f"{op}_backward"), args, ("out", "needs"), guard=(bout,))
    if m is not None:
        return          # an accepted "either" mutation (e.g. another valid ctx): not comparable
    names = ("dsum" if residual else "dx", "dweight") + (("dbias",) if has_bias else ())
    assert len(grads) == len(names)
    if bout is not None:
        assert grads[0] is bout
    grads_r = getattr(ref, f"{op}_backward")(dy, ctx_r, *([ds] if residual else []),
                                             needs=needs)
    rows = max(1, np.size(x) // max(1, math.prod(ctx.normalized_shape)))
    for g, g_r, name in zip(grads, grads_r, names):
        if g_r is None:
            assert g is None, f"{name} should be None"
        else:
            assert g is not None and g.dtype == dtype, name
            tol = {} if name in ("dx", "dsum") else _grad_tol(op, name, dtype, rows)
            assert_close(g, g_r, name=name, context=label, **tol)


# ---------------------------------------------------------------- FFN sublayer
BLOCK_GRADS = ("dx", "dnorm_weight", "dnorm_bias", "dw1", "db1", "dw2", "db2")


def ffn_block_case(data, rng) -> dict:
    """Arguments of ffn_block / ffn_block_forward: the FFN's (``ffn_case``, plain or gated,
    with its mutations) plus norm, placement, eps and the norm's parameters, with their own
    mutations when the FFN part drew none."""
    gated = data.draw(st.booleans(), label="gated?")
    # a third of the examples may carry one of the FFN's own mutations, the rest one of the
    # sublayer's (or none): valid and invalid calls both stay well represented
    case = ffn_case(data, rng, gated, mutate=data.draw(st.integers(0, 2), label="ffn mut?") == 0)
    dtype, d = case["dtype"], case["d"]
    norm = data.draw(st.sampled_from(["layer", "rms"]), label="norm")
    placement = data.draw(st.sampled_from(["pre", "post"]), label="placement")
    # eps > 0 only: eps = 0 on a constant row is 0/0 (ill-posed, not a safety question)
    eps = data.draw(st.sampled_from([1e-5, 1e-3, 0.1, 1, np.float32(1e-5)] +
                                    ([None] if norm == "rms" else [])), label="eps")
    nan = (np.nan,)
    nw = nb = None
    if data.draw(st.booleans(), label="norm_weight?"):
        nw, _ = layout(data, values(data, rng, (d,), specials=nan), dtype, label="nw layout")
    if norm == "layer" and data.draw(st.booleans(), label="norm_bias?"):
        nb, _ = layout(data, values(data, rng, (d,), specials=nan), dtype, label="nb layout")
    m = None
    if case["mutation"] is None:
        m = data.draw(st.sampled_from([None] * 12 + [
            "norm_value", "norm_type", "placement_value", "placement_type", "rms_bias",
            "nw_shape", "nw_dtype", "nw_bad_dtype", "nb_shape", "eps_neg", "eps_nonfinite",
            "eps_type", "eps_none_layer", "out_overlap_nw"]), label="block mutation")
    if m is not None:
        case["mutation"], case["expect"] = m, "raise"
    if m == "norm_value":
        norm = data.draw(st.sampled_from(["group", "LAYER", "", "batch"]))
    elif m == "norm_type":
        norm = data.draw(st.sampled_from([None, 1, b"rms", ("layer",)]))
    elif m == "placement_value":
        placement = data.draw(st.sampled_from(["middle", "PRE", "", "sandwich"]))
    elif m == "placement_type":
        placement = data.draw(st.sampled_from([None, 0, b"pre", ["post"]]))
    elif m == "rms_bias":            # RMSNorm has no bias
        norm, nb, eps = "rms", np.ones(d, dtype=dtype), 1e-5
    elif m == "nw_shape":
        nw = np.ones(data.draw(st.sampled_from([(d + 1,), (1, d), ()])), dtype=dtype)
    elif m == "nw_dtype":
        nw = np.ones(d, dtype=other(dtype))
    elif m == "nw_bad_dtype":
        nw = bad_array(data, rng, (d,))
    elif m == "nb_shape":
        norm, nb, eps = "layer", np.ones(d + 1, dtype=dtype), 1e-5
    elif m == "eps_neg":
        eps = data.draw(st.sampled_from([-1e-5, -1.0]))
    elif m == "eps_nonfinite":
        eps = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif m == "eps_type":
        eps = data.draw(st.sampled_from(["1e-5", True, 1j, np.array([1e-5]), [1e-5]]))
    elif m == "eps_none_layer":      # eps=None (machine epsilon) is for RMSNorm only
        norm, nb, eps = "layer", None, None
    elif m == "out_overlap_nw":
        shape = np.shape(case["args"]["x"])
        case["out"], nw = _overlapping_out(data, rng, shape, dtype, "nw", (d,))
        if case["out"].size == 0:
            case["expect"] = "either"
    a = case["args"]
    case["args"] = {"x": a["x"], "norm_weight": nw, "norm_bias": nb, "w1": a["w1"],
                    "b1": a["b1"], "w2": a["w2"], "b2": a["b2"], "activation": a["activation"],
                    "norm": norm, "placement": placement, "eps": eps}
    return case


def _block_backward_case(data, rng, ctx):
    """dy, ctx, out (seven buffers or None), needs, and one mutation or None."""
    shape, dtype = ctx.shape, ctx.dtype
    d, hw = ctx.w1.shape
    h = ctx.w2.shape[0]
    dy, _ = layout(data, values(data, rng, shape, special=False), dtype, label="dy layout")
    shapes = (shape, (d,), (d,), (d, hw), (hw,), (h, d), (d,))
    out = None
    if data.draw(st.booleans(), label="bwd out?"):
        out = [poisoned(s, dtype, rng) if data.draw(st.booleans(), label=f"out[{i}]?") else None
               for i, s in enumerate(shapes)]
    needs = data.draw(st.sampled_from([None, None] + [
        tuple(bool(i >> j & 1) for j in range(7)) for i in range(0, 128, 9)]), label="needs")
    m = data.draw(st.sampled_from([None] * 10 + [
        "dy_shape", "dy_dtype", "dy_none", "ctx_type", "ctx_other_op", "ctx_norm",
        "ctx_placement", "ctx_mean", "ctx_rstd", "ctx_eps", "ctx_xn", "ctx_s", "ctx_hidden",
        "ctx_w1", "out_len", "out_shape", "out_is_dy", "out_is_ctx_x", "needs_len",
        "needs_type"]), label="backward mutation")
    expect = "raise" if m else "ok"
    lead = shape[:-1]
    if m == "dy_shape":
        dy = np.ones(lead + (d + 1,), dtype=dtype)
    elif m == "dy_dtype":
        dy = np.ones(shape, dtype=data.draw(st.sampled_from([other(dtype), np.int64])))
    elif m == "dy_none":
        dy = None
    elif m == "ctx_type":
        ctx = data.draw(st.sampled_from([None, "ctx", ()])) if data.draw(st.booleans()) \
            else types.SimpleNamespace(**{f.name: getattr(ctx, f.name)
                                          for f in dataclasses.fields(ctx)})
    elif m == "ctx_other_op":        # a valid context of the plain FFN
        ctx = normffn.ffn_forward(np.ones((2, 3), dtype), np.ones((3, 4), dtype), None,
                                  np.ones((4, 3), dtype), None)[1]
    elif m == "ctx_norm":            # a flip is inconsistent too (layer keeps a mean, rms not)
        ctx = dataclasses.replace(ctx, norm=data.draw(st.sampled_from(
            ["group", None, "rms" if ctx.norm == "layer" else "layer"])))
    elif m == "ctx_placement":       # a flip: pre keeps xn (or nothing), post keeps s
        ctx = dataclasses.replace(ctx, placement=data.draw(st.sampled_from(
            ["middle", None, "post" if ctx.placement == "pre" else "pre"])))
    elif m == "ctx_mean":
        ctx = dataclasses.replace(ctx, mean=None if ctx.mean is not None else
                                  np.zeros(lead, np.float64))
    elif m == "ctx_rstd":
        ctx = dataclasses.replace(ctx, rstd=data.draw(st.sampled_from(
            [ctx.rstd.astype(np.float32), np.zeros(lead + (2,)), None])))
    elif m == "ctx_eps":
        ctx = dataclasses.replace(ctx, eps=data.draw(st.sampled_from([-1.0, np.nan, "1e-5"])))
    elif m == "ctx_xn":
        ctx = dataclasses.replace(ctx, xn=np.ones(lead + (d + 1,), dtype=dtype))
    elif m == "ctx_s":
        ctx = dataclasses.replace(ctx, s=np.ones(lead + (d + 1,), dtype=dtype))
    elif m == "ctx_hidden":
        n = math.prod(lead)
        ctx = dataclasses.replace(ctx, hidden=np.ones((n + 1, hw), dtype=dtype))
    elif m == "ctx_w1":
        ctx = dataclasses.replace(ctx, w1=np.ones((d + 1, hw), dtype=dtype))
    elif m == "out_len":
        out = [None] * 6
    elif m == "out_shape":           # dw1 always exists, so its buffer is always checked
        out = [None] * 7
        out[3] = np.empty((d + 1, hw), dtype)
        needs = None
    elif m == "out_is_dy":
        if isinstance(dy, np.ndarray) and dy.flags.c_contiguous and dy.flags.writeable \
                and dy.size:
            out, needs = [dy] + [None] * 6, None
        else:
            m, expect = None, "ok"
    elif m == "out_is_ctx_x":
        if ctx.x.size and ctx.x.flags.writeable:
            out, needs = [ctx.x] + [None] * 6, None
        else:
            m, expect = None, "ok"
    elif m == "needs_len":
        needs = (True,) * 6
    elif m == "needs_type":
        needs = data.draw(st.sampled_from(["all", True, (1,) * 7, [None] * 7]))
    return dy, ctx, (None if out is None else tuple(out)), needs, m, expect


def _block_tol(name, dtype, rows, cond=1.0):
    """float32: a norm, two GEMMs and a residual (test_ffn_block's 2e-4); float64: the
    registry's documented tolerance.  ``cond``: post-LN's LayerNorm sees s = x + ffn(x),
    which the op rounds to the dtype after the GEMM's accumulation (relative error ~ a few
    dozen eps of |s|); normalising multiplies that by max |mean(s)| / std(s) (the reference
    keeps s in float64), so the tolerance grows with it: an ill-conditioned input, not a
    safety question (NaN/Inf placement is still checked exactly)."""
    rtol, atol = documented_tolerance("ffn_block", name, dtype, rows)
    if np.dtype(dtype) == np.float32:
        rtol, atol = max(rtol, 2e-4), max(atol, 2e-4 * math.sqrt(rows) if name != "dx"
                                          else 2e-4)
    extra = 64 * float(np.finfo(dtype).eps) * cond if cond > 1 else 0.0
    return {"rtol": rtol + extra, "atol": atol + extra}


def run_ffn_block(data, rng):
    case = ffn_block_case(data, rng)
    a = case["args"]
    dtype = case["dtype"]
    out = case["out"]
    entry = data.draw(st.sampled_from(["op", "forward"]), label="entry")
    kwn = ("norm", "placement", "eps", "out", "recompute")
    if entry == "op":
        if case["mutation"] == "recompute_type":
            case["expect"] = "ok"          # ffn_block() takes no recompute: the mutation is moot
        args = dict(a, out=out)
        y = call("ffn_block", case, normffn.ffn_block, args, kwn, guard=(out,))
        ctx = None
    else:
        args = dict(a, recompute=case["recompute"], out=out)
        y, ctx = call("ffn_block_forward", case, normffn.ffn_block_forward, args, kwn,
                      guard=(out,))
    x = a["x"]
    if out is not None:
        assert y is out, "out= given but another array returned"
    assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == np.shape(x)
    label = describe(a)
    y_r, ctx_r = ref.ffn_block_forward(x, a["norm_weight"], a["norm_bias"], a["w1"], a["b1"],
                                       a["w2"], a["b2"], a["activation"], norm=a["norm"],
                                       placement=a["placement"], eps=a["eps"])
    cond = 1.0
    if a["placement"] == "post" and a["norm"] == "layer":
        cond = _ops._condition(ctx_r.s, axis=-1)
    assert_close(y, y_r, name="y", context=label, **_block_tol("y", dtype, 1, cond))
    if ctx is None:
        return
    assert_close(ctx.rstd, ctx_r.rstd, dtype=dtype, name="rstd", context=label,
                 **_block_tol("rstd", dtype, 1, cond))
    assert (ctx.mean is None) == (ctx_r.mean is None), "ctx.mean is None exactly for rms"
    # A ReLU-type unit whose reference pre-activation is at rounding level is a tie: a
    # normalised row sums to 0, so a constant (or broadcast) w1 column gives 0 in exact
    # arithmetic and +-tiny in either dtype.  Which side of 0 it lands on decides dead_units
    # and whether a NaN in dA passes (PyTorch's threshold_backward); both are right, so such
    # examples check safety only (calls, shapes, None-ness), not those values.
    v = ctx_r.ffn_ctx.g if a["activation"] == "reglu" else ctx_r.ffn_ctx.v
    fin = np.abs(v[np.isfinite(v)])
    tie = a["activation"] in ("relu", "reglu") and fin.size > 0 and \
        bool(np.any(fin <= 1e-4 * max(1.0, float(fin.max()))))
    if ctx.dead_units is not None and not tie:
        assert np.array_equal(ctx.dead_units, ctx_r.dead_units), "dead_units differ"
    dy, bctx, bout, needs, m, expect = _block_backward_case(data, rng, ctx)
    guard = tuple(o for o in bout or () if o is not None)
    grads = call("ffn_block_backward", {"mutation": m, "expect": expect},
                 normffn.ffn_block_backward,
                 {"dy": dy, "ctx": bctx, "out": bout, "needs": needs}, ("out", "needs"),
                 guard=guard)
    if m is not None:
        return
    assert len(grads) == 7
    for g, o in zip(grads, bout or ()):
        if g is not None and o is not None:
            assert g is o, "out= given but another array returned"
    grads_r = ref.ffn_block_backward(dy, ctx_r, needs=needs)
    rows = max(1, math.prod(np.shape(x)[:-1]))
    for g, g_r, name in zip(grads, grads_r, BLOCK_GRADS):
        if g_r is None:
            assert g is None, f"{name} should be None"
        else:
            assert g is not None and g.dtype == dtype, name
            assert g.shape == np.shape(g_r), name
            if not tie:
                assert_close(g, g_r, name=name, context=label,
                             **_block_tol(name, dtype, rows, cond))


# ---------------------------------------------------------------- driver
RUNNERS = {"layer_norm": run_layer_norm, "batch_norm": run_batch_norm, "ffn": run_ffn,
           "ffn_gated": lambda data, rng: run_ffn(data, rng, gated=True),
           "ffn_block": run_ffn_block,
           **{op: (lambda data, rng, op=op: run_rownorm(data, rng, op)) for op in ROW_OPS}}
# every registered op has a fuzz runner (a new op without one fails test_hardening loudly)
MISSING = sorted(set(_ops.OPS) - set(RUNNERS))


def main(argv) -> int:
    op, seed, examples = argv[1], int(argv[2]), int(argv[3])
    if op not in RUNNERS:
        print(f"no fuzz runner for registered op {op!r} (add run_{op} to RUNNERS)", flush=True)
        return 2
    faulthandler.enable()
    runner = RUNNERS[op]

    @hyp_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), phases=(Phase.generate, Phase.shrink),
              print_blob=True)
    @given(st.data(), st.integers(0, 2**32 - 1))
    def fuzz(data, value_seed):
        rng = np.random.default_rng(value_seed)
        STATS["examples"] += 1
        with np.errstate(all="ignore"):
            try:
                runner(data, rng)
            except Reject:
                pass

    fuzz()
    print(f"DONE {STATS['examples']} {STATS['ok']} {STATS['raised']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
