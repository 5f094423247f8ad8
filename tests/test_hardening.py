"""Hardening: fuzzed inputs, failure atomicity, concurrency, leaks, aliasing, large sizes.

The kernels run without bounds checks and without the GIL; these tests check that the Python
layer keeps them safe:

* fuzzing (hypothesis, in a child process so a segfault fails the test instead of killing
  pytest): every public function either matches ``normffn.reference`` or raises
  TypeError/ValueError (tests/_fuzz_worker.py has the details);
* failure atomicity: a call that raises leaves BatchNorm's running stats and every ``out=``
  buffer (a pair for add + norm, five for ffn_backward, seven for ffn_block_backward, and
  ffn_block_forward's ``hidden_out``) bitwise untouched;
* concurrency: 4 threads give bitwise the serial results, and every kernel releases the GIL;
* leaks: 10,000 calls leave RSS and input refcounts flat;
* aliasing: an ``out=`` (either of add + norm's pair, any of ffn_backward's five, ffn_block's
  y and its backward's seven) that overlaps any input (partially, via views of one buffer) is
  rejected;
* large sizes: more than 2**31 elements or a row longer than 2**31 is accepted with 64-bit sizes
  (norms) or rejected before any allocation (FFN, whose BLAS takes 32-bit ints).
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import normffn
from normffn import _ops
from normffn import reference as ref
from normffn.testing import assert_close

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fuzz_worker.py")
OPS = list(_ops.OPS)             # every registered op is fuzzed
FAST_EXAMPLES = 300
SLOW_EXAMPLES = 10_000
SEED = int(os.environ.get("NORMFFN_FUZZ_SEED", "20261127"))

LN = sys.modules["normffn.layer_norm"]
BN = sys.modules["normffn.batch_norm"]
FFN = sys.modules["normffn.ffn"]
RMS = sys.modules["normffn.rms_norm"]
ADDN = sys.modules["normffn.add_norm"]


# ---------------------------------------------------------------- fuzzing in a child process
def _child_env():
    env = dict(os.environ)
    # the child imports the very normffn this process imported
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(normffn.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _start(op, examples, tmp_dir):
    log = open(os.path.join(tmp_dir, f"fuzz_{op}.log"), "w+")
    proc = subprocess.Popen([sys.executable, WORKER, op, str(SEED), str(examples)],
                            stdout=log, stderr=subprocess.STDOUT, env=_child_env())
    return proc, log


def _finish(op, examples, proc, log, timeout):
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    log.seek(0)
    lines = log.read().splitlines()
    log.close()
    done = [ln for ln in lines if ln.startswith("DONE ")]
    if rc != 0 or not done:
        last = [ln for ln in lines if ln.startswith("EXAMPLE ")][-1:]
        other = [ln for ln in lines if not ln.startswith("EXAMPLE ")]
        how = (f"killed by signal {-rc}" if isinstance(rc, int) and rc < 0
               else f"exit status {rc}")
        pytest.fail(f"fuzzing {op} (seed {SEED}, {examples} examples) failed: {how}\n"
                    f"last example started: {last[0] if last else '(none)'}\n"
                    f"reproduce: python {WORKER} {op} {SEED} {examples}\n" +
                    "\n".join(other[-80:]), pytrace=False)
    n, accepted, rejected = map(int, done[-1].split()[1:])
    assert n >= examples, f"only {n} examples ran"
    # both outcomes must be well represented, or the fuzzing tests little
    assert accepted >= n // 5 and rejected >= n // 5, (n, accepted, rejected)


@pytest.mark.parametrize("op", OPS)
def test_fuzz(op, tmp_path):
    proc, log = _start(op, FAST_EXAMPLES, tmp_path)
    _finish(op, FAST_EXAMPLES, proc, log, timeout=300)


@pytest.fixture(scope="module")
def slow_fuzz_runs(tmp_path_factory):
    """Start the slow fuzz runs at once (they share the cores; each test waits for its own)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    runs = {op: _start(op, SLOW_EXAMPLES, tmp) for op in OPS}
    yield runs
    for proc, log in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_fuzz_slow(op, slow_fuzz_runs):
    proc, log = slow_fuzz_runs[op]
    _finish(op, SLOW_EXAMPLES, proc, log, timeout=600)


# ---------------------------------------------------------------- helpers
def _rand(rng, shape, dtype=np.float64, positive=False):
    a = rng.standard_normal(shape)
    if positive:
        a = np.abs(a) + 0.5
    return a.astype(dtype)


def _bits(a):
    return np.ascontiguousarray(a).tobytes()


# ---------------------------------------------------------------- failure atomicity
def _bn_good(rng, dtype=np.float32, shape=(4, 3, 5)):
    C = shape[1]
    return dict(x=_rand(rng, shape, dtype), running_mean=_rand(rng, (C,), dtype),
                running_var=_rand(rng, (C,), dtype, positive=True), weight=_rand(rng, (C,), dtype),
                bias=_rand(rng, (C,), dtype), training=True, momentum=0.1, eps=1e-5)


# name -> function(kwargs) mutating a valid BatchNorm training call into an invalid one
BN_BAD = {
    "x_int": lambda k: k.update(x=k["x"].astype(np.int32)),
    "x_mixed_dtype": lambda k: k.update(x=k["x"].astype(np.float64)),
    "x_rank1": lambda k: k.update(x=k["x"][:, 0, 0]),
    "x_one_value_per_channel": lambda k: k.update(x=k["x"][:1, :, :1]),
    "weight_shape": lambda k: k.update(weight=np.ones(4, np.float32)),
    "weight_dtype": lambda k: k.update(weight=np.ones(3, np.float64)),
    "bias_type": lambda k: k.update(bias="bias"),
    "momentum_range": lambda k: k.update(momentum=1.5),
    "momentum_nan": lambda k: k.update(momentum=float("nan")),
    "momentum_type": lambda k: k.update(momentum="0.1"),
    "eps_zero_training": lambda k: k.update(eps=0.0),
    "eps_type": lambda k: k.update(eps=None),
    "training_type": lambda k: k.update(training=1),
    "running_var_missing": lambda k: k.update(running_var=None),
    "out_shape": lambda k: k.update(out=np.zeros((4, 3, 6), np.float32)),
    "out_dtype": lambda k: k.update(out=np.zeros((4, 3, 5), np.float64)),
    "out_readonly": lambda k: (k.update(out=np.zeros((4, 3, 5), np.float32)),
                               k["out"].setflags(write=False)),
    "out_noncontig": lambda k: k.update(out=np.zeros((4, 3, 10), np.float32)[..., ::2]),
    "out_is_x": lambda k: k.update(out=k["x"]),
    "out_overlaps_running_var": lambda k: k.update(out=np.zeros(60, np.float32).reshape(4, 3, 5),
                                                   running_var=None),  # fixed up below
}


@pytest.mark.parametrize("bad", sorted(BN_BAD))
@pytest.mark.parametrize("entry", ["batch_norm", "batch_norm_forward"])
def test_batch_norm_failure_leaves_state_untouched(bad, entry, rng):
    k = _bn_good(rng)
    k["out"] = np.full(k["x"].shape, 7.0, np.float32)
    BN_BAD[bad](k)
    if bad == "out_overlaps_running_var":
        k["running_var"] = k["out"].reshape(-1)[10:13]
        k["running_var"][...] = 1.0
    watched = [a for a in (k["running_mean"], k["running_var"], k["out"], k["x"], k["weight"])
               if isinstance(a, np.ndarray)]
    before = [_bits(a) for a in watched]
    with pytest.raises((TypeError, ValueError)):
        getattr(normffn, entry)(**k)
    assert [_bits(a) for a in watched] == before


@pytest.mark.parametrize("entry", ["layer_norm", "layer_norm_forward"])
@pytest.mark.parametrize("bad", ["weight_shape", "bias_dtype", "eps", "normalized_shape",
                                 "out_overlaps_weight"])
def test_layer_norm_failure_leaves_out_untouched(entry, bad, rng):
    x = _rand(rng, (5, 8))
    w, b = _rand(rng, 8), _rand(rng, 8)
    out = np.full((5, 8), 3.0)
    kw = dict(weight=w, bias=b, eps=1e-5, out=out)
    ns = 8
    if bad == "weight_shape":
        kw["weight"] = np.ones(7)
    elif bad == "bias_dtype":
        kw["bias"] = np.ones(8, np.float32)
    elif bad == "eps":
        kw["eps"] = -1.0
    elif bad == "normalized_shape":
        ns = (5, 9)
    else:
        kw["weight"] = out.reshape(-1)[4:12]
    before = _bits(out)
    with pytest.raises((TypeError, ValueError)):
        getattr(normffn, entry)(x, ns, **kw)
    assert _bits(out) == before


@pytest.mark.parametrize("op", ["layer_norm", "batch_norm"])
def test_backward_failure_leaves_out_untouched(op, rng):
    x = _rand(rng, (6, 4, 3))
    if op == "layer_norm":
        y, ctx = normffn.layer_norm_forward(x, 3, np.ones(3))
    else:
        y, ctx = normffn.batch_norm_forward(x, None, None, np.ones(4), training=True)
    backward = getattr(normffn, f"{op}_backward")
    out = np.full(x.shape, 5.0)
    for dy in (np.ones((6, 4, 4)), np.ones(x.shape, np.float32), None, x.astype(np.int64)):
        with pytest.raises((TypeError, ValueError)):
            backward(dy, ctx, out=out)
    with pytest.raises(ValueError):
        backward(out, ctx, out=out)
    assert np.all(out == 5.0)


def test_ffn_failure_leaves_out_untouched(rng):
    x, w1, w2 = _rand(rng, (5, 4)), _rand(rng, (4, 6)), _rand(rng, (6, 4))
    out = np.full((5, 4), 2.0)
    for kw in (dict(activation="tanh"), dict(b1=np.ones(5)), dict(b2=np.ones(4, np.float32)),
               dict(w2=np.ones((6, 5))), dict(activation=None)):
        args = dict(x=x, w1=w1, b1=None, w2=w2, b2=None, activation="relu") | kw
        with pytest.raises((TypeError, ValueError)):
            normffn.ffn(**args, out=out)
    assert np.all(out == 2.0)


# name -> f(kwargs) making a valid add_layer_norm / add_rms_norm call invalid
ADD_BAD = {
    "residual_shape": lambda k: k.update(residual=np.ones((5, 9))),
    "residual_dtype": lambda k: k.update(residual=k["residual"].astype(np.float32)),
    "weight_shape": lambda k: k.update(weight=np.ones(7)),
    "eps": lambda k: k.update(eps=-1.0),
    "normalized_shape": lambda k: k.update(normalized_shape=(5, 9)),
    "out_not_pair": lambda k: k.update(out=k["out"][:1]),
    "out_s_readonly": lambda k: k["out"][1].setflags(write=False),
    "out_s_overlaps_x": lambda k: k.update(out=(k["out"][0], k["x"])),
    "out_y_is_s": lambda k: k.update(out=(k["out"][0], k["out"][0])),
    "out_s_overlaps_weight": lambda k: k.update(weight=k["out"][1].reshape(-1)[4:12]),
}


@pytest.mark.parametrize("bad", sorted(ADD_BAD))
@pytest.mark.parametrize("entry", ["add_layer_norm", "add_layer_norm_forward", "add_rms_norm",
                                   "add_rms_norm_forward"])
def test_add_norm_failure_leaves_both_outs_untouched(entry, bad, rng):
    """out= is a pair (y_out, s_out): a call that raises writes neither (nor its inputs)."""
    k = dict(x=_rand(rng, (5, 8)), residual=_rand(rng, (5, 8)), normalized_shape=8,
             weight=_rand(rng, 8), eps=1e-5, out=(np.full((5, 8), 3.0), np.full((5, 8), 4.0)))
    if "layer" in entry:
        k["bias"] = _rand(rng, 8)
    ys, ss = k["out"]
    ADD_BAD[bad](k)
    watched = [ys, ss, k["x"], k["residual"]]
    before = [_bits(a) for a in watched]
    with pytest.raises((TypeError, ValueError)):
        getattr(normffn, entry)(**k)
    assert [_bits(a) for a in watched] == before


@pytest.mark.parametrize("entry", ["rms_norm", "rms_norm_forward"])
@pytest.mark.parametrize("bad", ["weight_shape", "weight_dtype", "eps", "normalized_shape",
                                 "bias_given", "out_overlaps_weight"])
def test_rms_norm_failure_leaves_out_untouched(entry, bad, rng):
    x = _rand(rng, (5, 8))
    out = np.full((5, 8), 3.0)
    kw = dict(weight=_rand(rng, 8), eps=None, out=out)
    ns = 8
    if bad == "weight_shape":
        kw["weight"] = np.ones(7)
    elif bad == "weight_dtype":
        kw["weight"] = np.ones(8, np.float32)
    elif bad == "eps":
        kw["eps"] = float("nan")
    elif bad == "normalized_shape":
        ns = (5, 9)
    elif bad == "bias_given":
        kw["bias"] = np.ones(8)
    else:
        kw["weight"] = out.reshape(-1)[4:12]
    before = _bits(out)
    with pytest.raises((TypeError, ValueError)):
        getattr(normffn, entry)(x, ns, **kw)
    assert _bits(out) == before


@pytest.mark.parametrize("op", ["rms_norm", "add_layer_norm", "add_rms_norm"])
def test_row_norm_backward_failure_leaves_out_untouched(op, rng):
    x = _rand(rng, (6, 4, 3))
    if op == "rms_norm":
        _, ctx = normffn.rms_norm_forward(x, 3, np.ones(3))
        extra = {}
    else:
        *_, ctx = getattr(normffn, f"{op}_forward")(x, x, 3, np.ones(3))
        extra = {"ds": np.ones(x.shape)}
    backward = getattr(normffn, f"{op}_backward")
    out = np.full(x.shape, 5.0)
    bad_calls = [dict(dy=np.ones((6, 4, 4))), dict(dy=np.ones(x.shape, np.float32)),
                 dict(dy=None), dict(dy=x.astype(np.int64)), dict(dy=out),
                 dict(dy=x, needs=(True,)), dict(dy=x, needs=(False,) * (3 if "layer" in op
                                                                          else 2))]
    if extra:
        bad_calls += [dict(dy=x, ds=np.ones((6, 4, 4))), dict(dy=x, ds=out),
                      dict(dy=x, ds=np.ones(x.shape, np.float32))]
    for kw in bad_calls:
        args = dict(extra, **kw)
        dy = args.pop("dy")
        with pytest.raises((TypeError, ValueError)):
            backward(dy, ctx, out=out, **args)
    wrong = normffn.layer_norm_forward(x, 3)[1]          # a context of another op
    with pytest.raises(TypeError):
        backward(x, wrong, out=out)
    assert np.all(out == 5.0)


@pytest.mark.parametrize("act", ["relu", "swiglu"])
def test_ffn_backward_failure_leaves_every_out_untouched(act, rng):
    h = 6
    hw = 2 * h if act == "swiglu" else h
    x, w1, w2 = _rand(rng, (5, 4)), _rand(rng, (4, hw)), _rand(rng, (h, 4))
    b1, b2 = _rand(rng, hw), _rand(rng, 4)
    _, ctx = normffn.ffn_forward(x, w1, b1, w2, b2, act)
    dy = _rand(rng, (5, 4))

    def outs():
        return [np.full(s, 9.0) for s in ((5, 4), (4, hw), (hw,), (h, 4), (4,))]

    cases = []
    o = outs()
    o[3] = np.full((h, 5), 9.0)                          # dw2 of the wrong shape (the last
    cases.append((o, {}))                                # checked after dx, dw1 are fine)
    o = outs()
    o[4] = o[4].astype(np.float32)
    cases.append((o, {}))
    o = outs()
    o[2] = ctx.b1                                        # db1 into an input
    cases.append((o, {}))
    cases.append((outs()[:4], {}))                       # not five entries
    cases.append((outs(), {"needs": (True,) * 4}))
    cases.append((outs(), {"dy": np.ones((5, 5))}))
    for o, kw in cases:
        watched = [a for a in o if isinstance(a, np.ndarray)] + [ctx.x, ctx.hidden]
        before = [_bits(a) for a in watched]
        with pytest.raises((TypeError, ValueError)):
            normffn.ffn_backward(kw.pop("dy", dy), ctx, out=tuple(o), **kw)
        assert [_bits(a) for a in watched] == before


def _block_args(rng, act="relu", norm="layer", shape=(5, 4), h=6):
    d = shape[-1]
    hw = 2 * h if act == "swiglu" else h
    return dict(x=_rand(rng, shape), norm_weight=_rand(rng, d),
                norm_bias=_rand(rng, d) if norm == "layer" else None,
                w1=_rand(rng, (d, hw)) / 2, b1=_rand(rng, hw), w2=_rand(rng, (h, d)) / 2,
                b2=_rand(rng, d), activation=act, norm=norm, placement="pre", eps=1e-5)


# name -> f(kwargs) making a valid ffn_block / ffn_block_forward call invalid
BLOCK_BAD = {
    "norm_value": lambda k: k.update(norm="group"),
    "placement_value": lambda k: k.update(placement="middle"),
    "rms_with_bias": lambda k: k.update(norm="rms"),
    "norm_weight_shape": lambda k: k.update(norm_weight=np.ones(5)),
    "norm_bias_dtype": lambda k: k.update(norm_bias=np.ones(4, np.float32)),
    "eps": lambda k: k.update(eps=-1.0),
    "eps_none_layer": lambda k: k.update(eps=None),
    "activation": lambda k: k.update(activation="tanh"),
    "w2_shape": lambda k: k.update(w2=np.ones((6, 5))),
    "out_overlaps_norm_weight": lambda k: k.update(norm_weight=k["out"].reshape(-1)[3:7]),
    "out_is_x": lambda k: k.update(out=k["x"]),
    "hidden_out_shape": lambda k: k.update(hidden_out=np.full((4, 6), 8.0)),
    "hidden_out_overlaps_out": lambda k: k.update(hidden_out=np.full((5, 6), 8.0),
                                                  out=None),     # fixed up below
}


@pytest.mark.parametrize("entry, bad", [(e, b) for e in ("ffn_block", "ffn_block_forward")
                                        for b in sorted(BLOCK_BAD)
                                        if e == "ffn_block_forward" or "hidden_out" not in b])
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_ffn_block_failure_leaves_out_untouched(entry, placement, bad, rng):
    """ffn_block's out= (and ffn_block_forward's hidden_out=) stay bitwise untouched by a call
    that raises, whichever argument is bad."""
    k = _block_args(rng)
    k["placement"] = placement
    k["out"] = np.full((5, 4), 3.0)
    if entry == "ffn_block_forward":
        k["hidden_out"] = np.full((5, 6), 8.0)
    BLOCK_BAD[bad](k)
    if bad == "hidden_out_overlaps_out":
        buf = np.full(50, 8.0)
        k["hidden_out"], k["out"] = buf[:30].reshape(5, 6), buf[26:46].reshape(5, 4)
    watched = [a for a in (k.get("out"), k.get("hidden_out"), k["x"], k["norm_weight"],
                           k["w1"]) if isinstance(a, np.ndarray)]
    before = [_bits(a) for a in watched]
    with pytest.raises((TypeError, ValueError)):
        getattr(normffn, entry)(**k)
    assert [_bits(a) for a in watched] == before


@pytest.mark.parametrize("act, norm, placement", [("relu", "layer", "pre"),
                                                  ("swiglu", "rms", "post")])
def test_ffn_block_backward_failure_leaves_every_out_untouched(act, norm, placement, rng):
    k = _block_args(rng, act, norm)
    k["placement"] = placement
    _, ctx = normffn.ffn_block_forward(**k)
    d, hw = ctx.w1.shape
    h = ctx.w2.shape[0]
    dy = _rand(rng, (5, 4))

    def outs():
        return [np.full(s, 9.0) for s in ((5, 4), (d,), (d,), (d, hw), (hw,), (h, d), (d,))]

    cases = []
    o = outs()
    o[5] = np.full((h, 5), 9.0)                          # dw2 of the wrong shape (checked
    cases.append((o, {}))                                # after dx, dnorm_*, dw1, db1)
    o = outs()
    o[6] = o[6].astype(np.float32)
    cases.append((o, {}))
    o = outs()
    o[4] = ctx.b1                                        # db1 into an input
    cases.append((o, {}))
    o = outs()
    o[3] = o[5] = np.full((d, d), 9.0) if d == hw == h else o[3][:, :h]   # shared/bad dw
    cases.append((o, {}))
    cases.append((outs()[:6], {}))                       # not seven entries
    cases.append((outs(), {"needs": (True,) * 6}))
    cases.append((outs(), {"dy": np.ones((5, 5))}))
    cases.append((outs(), {"ctx": dataclasses.replace(ctx, placement="middle")}))
    for o, kw in cases:
        watched = [a for a in o if isinstance(a, np.ndarray)] + [ctx.x, ctx.hidden]
        before = [_bits(a) for a in watched]
        with pytest.raises((TypeError, ValueError)):
            normffn.ffn_block_backward(kw.pop("dy", dy), kw.pop("ctx", ctx), out=tuple(o),
                                       **kw)
        assert [_bits(a) for a in watched] == before


# ---------------------------------------------------------------- concurrency
def _ln_all(x, w, b, dy):
    y, ctx = normffn.layer_norm_forward(x, x.shape[-1], w, b)
    return (normffn.layer_norm(x, x.shape[-1], w, b), y, ctx.mean, ctx.rstd,
            *normffn.layer_norm_backward(dy, ctx))


def _bn_all(x, w, b, dy):
    C = x.shape[1]
    rm, rv = np.zeros(C, x.dtype), np.ones(C, x.dtype)
    y_eval = normffn.batch_norm(x, rm, rv, w, b, training=False)
    y, ctx = normffn.batch_norm_forward(x, rm, rv, w, b, training=True)
    return (y_eval, y, rm, rv, ctx.mean, ctx.rstd, *normffn.batch_norm_backward(dy, ctx))


def _ffn_all(x, w1, b1, w2, b2, dy, act):
    y, ctx = normffn.ffn_forward(x, w1, b1, w2, b2, act)
    grads = normffn.ffn_backward(dy, ctx)
    return (normffn.ffn(x, w1, b1, w2, b2, act), y, *grads)


def _rows_all(x, r, w, b, dy):
    """RMSNorm and both add + norm ops, every entry point."""
    d = x.shape[-1]
    y, ctx = normffn.rms_norm_forward(x, d, w)
    y1, s1, c1 = normffn.add_layer_norm_forward(x, r, d, w, b)
    y2, s2, c2 = normffn.add_rms_norm_forward(x, r, d, w)
    return (normffn.rms_norm(x, d, w), y, ctx.rstd, *normffn.rms_norm_backward(dy, ctx),
            *normffn.add_layer_norm(x, r, d, w, b), y1, s1, c1.mean, c1.rstd,
            *normffn.add_layer_norm_backward(dy, c1, r), *normffn.add_rms_norm(x, r, d, w),
            y2, s2, c2.rstd, *normffn.add_rms_norm_backward(dy, c2, r))


def _block_all(x, nw, nb, w1, b1, w2, b2, dy, act, norm, placement):
    """ffn_block, ffn_block_forward (kept and recomputed) and both backwards."""
    kw = dict(norm=norm, placement=placement)
    y, ctx = normffn.ffn_block_forward(x, nw, nb, w1, b1, w2, b2, act, **kw)
    yr, ctxr = normffn.ffn_block_forward(x, nw, nb, w1, b1, w2, b2, act, recompute=True, **kw)
    return (normffn.ffn_block(x, nw, nb, w1, b1, w2, b2, act, **kw), y, ctx.rstd, yr,
            *normffn.ffn_block_backward(dy, ctx), *normffn.ffn_block_backward(dy, ctxr))


def _jobs(rng, dtype, n_threads):
    """Per thread, one job per op on its own data and shapes: callables returning all outputs
    (every entry point, forward and backward)."""
    per_thread = []
    for t in range(n_threads):
        x = _rand(rng, (64 + 16 * t, 96 + 8 * t), dtype)
        d = x.shape[-1]
        w, b, dy = _rand(rng, d, dtype), _rand(rng, d, dtype), _rand(rng, x.shape, dtype)
        xb = _rand(rng, (8 + t, 6 + t, 12, 10), dtype)
        C = xb.shape[1]
        wb, bb, dyb = _rand(rng, C, dtype), _rand(rng, C, dtype), _rand(rng, xb.shape, dtype)
        xf = _rand(rng, (48 + 8 * t, 32), dtype)
        h = 64 + 16 * t
        w1, w2 = _rand(rng, (32, h), dtype) / 6, _rand(rng, (h, 32), dtype) / 8
        b1, b2, dyf = _rand(rng, h, dtype), _rand(rng, 32, dtype), _rand(rng, xf.shape, dtype)
        act = ("relu", "gelu", "gelu_tanh", "silu")[t % 4]
        r = _rand(rng, x.shape, dtype)
        gw1 = _rand(rng, (32, 2 * h), dtype) / 6
        gb1 = _rand(rng, 2 * h, dtype)
        gact = ("swiglu", "geglu", "reglu")[t % 3]
        per_thread.append([
            lambda x=x, w=w, b=b, dy=dy: _ln_all(x, w, b, dy),
            lambda x=xb, w=wb, b=bb, dy=dyb: _bn_all(x, w, b, dy),
            lambda x=xf, w1=w1, b1=b1, w2=w2, b2=b2, dy=dyf, act=act:
                _ffn_all(x, w1, b1, w2, b2, dy, act),
            lambda x=x, r=r, w=w, b=b, dy=dy: _rows_all(x, r, w, b, dy),
            lambda x=xf, w1=gw1, b1=gb1, w2=w2, b2=b2, dy=dyf, act=gact:
                _ffn_all(x, w1, b1, w2, b2, dy, act),
            # the FFN sublayer: pre-LN ReLU-type on even threads, post-RMS gated on odd ones
            (lambda x=xf, nw=w[:32], nb=b[:32], w1=w1, b1=b1, w2=w2, b2=b2, dy=dyf, act=act:
                _block_all(x, nw, nb, w1, b1, w2, b2, dy, act, "layer", "pre"))
            if t % 2 == 0 else
            (lambda x=xf, nw=w[:32], w1=gw1, b1=gb1, w2=w2, b2=b2, dy=dyf, act=gact:
                _block_all(x, nw, None, w1, b1, w2, b2, dy, act, "rms", "post")),
        ])
    return per_thread


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threads_match_serial_bitwise(dtype, rng):
    n_threads, repeats = 4, 30
    jobs = _jobs(rng, dtype, n_threads)
    serial = [[job() for job in mine] for mine in jobs]
    results = [[] for _ in range(n_threads)]
    errors = []
    barrier = threading.Barrier(n_threads)

    def worker(tid):
        try:
            barrier.wait()
            for r in range(repeats):
                # thread t starts at op t: every op family runs at once
                n_ops = len(jobs[tid])
                order = [(tid + r + j) % n_ops for j in range(n_ops)]
                got = [None] * n_ops
                for j in order:
                    got[j] = jobs[tid][j]()
                results[tid].append(got)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for tid in range(n_threads):
        for r, got in enumerate(results[tid]):
            for op, (outs, want) in enumerate(zip(got, serial[tid])):
                assert len(outs) == len(want)
                for i, (a, b) in enumerate(zip(outs, want)):
                    if b is None:
                        assert a is None
                    else:
                        assert a.dtype == b.dtype and a.shape == b.shape
                        assert _bits(a) == _bits(b), \
                            f"thread {tid} op {op} output {i} repeat {r} differs from serial"


def _gil_calls(rng):
    """name -> zero-argument call of one entry point on inputs big enough that the kernel runs
    for milliseconds; inputs are C-contiguous so the Python layer makes no large NumPy copy
    (NumPy itself drops the GIL while copying big arrays)."""
    x = _rand(rng, (2048, 1024), np.float32)
    w = _rand(rng, 1024, np.float32)
    _, lctx = normffn.layer_norm_forward(x, 1024, w, w)
    xb = _rand(rng, (32, 64, 32, 32), np.float32)
    wb = _rand(rng, 64, np.float32)
    rm, rv = np.zeros(64, np.float32), np.ones(64, np.float32)
    _, bctx = normffn.batch_norm_forward(xb, rm, rv, wb, wb, training=True)
    xf = _rand(rng, (1024, 256), np.float32)
    w1, w2 = _rand(rng, (256, 1024), np.float32) / 16, _rand(rng, (1024, 256), np.float32) / 32
    b1 = _rand(rng, 1024, np.float32)
    _, fctx = normffn.ffn_forward(xf, w1, b1, w2, None, "gelu")
    out = np.empty_like(x)
    r = _rand(rng, x.shape, np.float32)
    _, rctx = normffn.rms_norm_forward(x, 1024, w)
    *_, alctx = normffn.add_layer_norm_forward(x, r, 1024, w, w)
    *_, arctx = normffn.add_rms_norm_forward(x, r, 1024, w)
    gw1 = _rand(rng, (256, 2048), np.float32) / 16
    _, gctx = normffn.ffn_forward(xf, gw1, None, w2, None, "swiglu")
    nw = _rand(rng, 256, np.float32)
    _, kctx = normffn.ffn_block_forward(xf, nw, nw, w1, b1, w2, None, "gelu")
    return {
        "ffn_block": lambda: normffn.ffn_block(xf, nw, None, gw1, None, w2, None, "swiglu",
                                               norm="rms", placement="post"),
        "ffn_block_backward": lambda: normffn.ffn_block_backward(xf, kctx),
        "rms_norm": lambda: normffn.rms_norm(x, 1024, w, out=out),
        "rms_norm_backward": lambda: normffn.rms_norm_backward(x, rctx),
        "add_layer_norm": lambda: normffn.add_layer_norm(x, r, 1024, w, w),
        "add_layer_norm_backward": lambda: normffn.add_layer_norm_backward(x, alctx, r),
        "add_rms_norm": lambda: normffn.add_rms_norm(x, r, 1024, w),
        "add_rms_norm_backward": lambda: normffn.add_rms_norm_backward(x, arctx, r),
        "ffn_swiglu": lambda: normffn.ffn(xf, gw1, None, w2, None, "swiglu"),
        "ffn_swiglu_backward": lambda: normffn.ffn_backward(xf, gctx),
        "layer_norm": lambda: normffn.layer_norm(x, 1024, w, w, out=out),
        "layer_norm_backward": lambda: normffn.layer_norm_backward(x, lctx),
        "batch_norm_train": lambda: normffn.batch_norm(xb, rm, rv, wb, wb, training=True),
        "batch_norm_eval": lambda: normffn.batch_norm(xb, rm, rv, wb, wb),
        "batch_norm_backward": lambda: normffn.batch_norm_backward(xb, bctx),
        "ffn": lambda: normffn.ffn(xf, w1, b1, w2, None, "relu"),
        "ffn_forward": lambda: normffn.ffn_forward(xf, w1, b1, w2, None, "silu"),
        "ffn_backward": lambda: normffn.ffn_backward(xf, fctx),
    }


def test_kernels_release_the_gil(rng):
    """While the main thread is inside a kernel, a second Python thread makes progress.

    With a switch interval far longer than any call, a thread holding the GIL keeps it until it
    blocks or releases it: so the spinning thread's counter moves during a call only if the
    call released the GIL.  No timing threshold: "moved at all" vs "did not move"; a control
    (pure Python holding the GIL for a similar time) must show no progress.
    """
    calls = _gil_calls(rng)
    counter = [0]
    stop = threading.Event()

    def spin():
        import time
        while not stop.is_set():
            counter[0] += 1
            if counter[0] % 256 == 0:
                time.sleep(0)        # hand the GIL back to the main thread regularly

    old = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    t = threading.Thread(target=spin)
    t.start()
    progress = {}
    try:
        import time
        while counter[0] == 0:
            time.sleep(0.001)

        def moved(fn):
            c0 = counter[0]
            fn()
            return counter[0] - c0

        progress["control"] = moved(lambda: sum(i * i for i in range(200_000)))
        # one OpenMP/BLAS thread, so a core is free for the spinning thread to wake up on
        # while the kernel runs; retry a few times (a wake-up can still be late once)
        with threadpool_limits(limits=1):
            for name, fn in calls.items():
                progress[name] = 0
                for _ in range(10):
                    progress[name] = moved(fn)
                    if progress[name]:
                        break
    finally:
        stop.set()
        sys.setswitchinterval(old)
        t.join()
    assert progress.pop("control") == 0, "the method is broken: the control let the thread run"
    held = [name for name, p in progress.items() if p == 0]
    assert not held, f"these calls never released the GIL: {held} ({progress})"


# ---------------------------------------------------------------- leaks
def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _leak_calls(rng):
    """name -> (call, input arrays whose refcounts must not move)."""
    x = _rand(rng, (4, 8))
    w, b = _rand(rng, 8), _rand(rng, 8)
    out = np.empty_like(x)
    _, lctx = normffn.layer_norm_forward(x, 8, w, b)
    xb = _rand(rng, (4, 3, 5))
    rm, rv, wb = np.zeros(3), np.ones(3), _rand(rng, 3)
    _, bctx = normffn.batch_norm_forward(xb, rm, rv, wb, wb, training=True)
    xf, w1, w2 = _rand(rng, (4, 8)), _rand(rng, (8, 16)), _rand(rng, (16, 8))
    b1, b2 = _rand(rng, 16), _rand(rng, 8)
    _, fctx = normffn.ffn_forward(xf, w1, b1, w2, b2, "gelu")
    bad = x.astype(np.int32)
    r = _rand(rng, (4, 8))
    pair = (np.empty_like(x), np.empty_like(x))
    _, rctx = normffn.rms_norm_forward(x, 8, w)
    *_, actx = normffn.add_layer_norm_forward(x, r, 8, w, b)
    gw1 = _rand(rng, (8, 32))
    _, gctx = normffn.ffn_forward(xf, gw1, None, w2, b2, "swiglu")
    fouts = tuple(np.empty(s) for s in ((4, 8), (8, 16), (16,), (16, 8), (8,)))
    _, kctx = normffn.ffn_block_forward(xf, w, b, w1, b1, w2, b2, "relu")
    kouts = tuple(np.empty(s) for s in ((4, 8), (8,), (8,), (8, 16), (16,), (16, 8), (8,)))

    def raises(fn, *a, **k):
        try:
            fn(*a, **k)
        except (TypeError, ValueError):
            return
        raise AssertionError("expected an error")

    return {
        "layer_norm": (lambda: normffn.layer_norm(x, 8, w, b, out=out), (x, w, b, out)),
        "layer_norm_forward": (lambda: normffn.layer_norm_forward(x.T, 4), (x,)),
        "layer_norm_backward": (lambda: normffn.layer_norm_backward(x, lctx), (x, lctx)),
        "layer_norm_error": (lambda: raises(normffn.layer_norm, bad, 8), (bad,)),
        "batch_norm": (lambda: normffn.batch_norm(xb, rm, rv, wb, wb, training=True),
                       (xb, rm, rv, wb)),
        "batch_norm_forward": (lambda: normffn.batch_norm_forward(xb, rm, rv, wb), (xb, rm, rv)),
        "batch_norm_backward": (lambda: normffn.batch_norm_backward(xb, bctx), (xb, bctx)),
        "batch_norm_error": (lambda: raises(normffn.batch_norm, xb, rm, rv, momentum=2.0),
                             (xb, rm, rv)),
        "ffn": (lambda: normffn.ffn(xf, w1, b1, w2, b2, "relu"), (xf, w1, b1, w2, b2)),
        "ffn_forward": (lambda: normffn.ffn_forward(xf, w1.T.T, None, w2.T.copy().T, b2,
                                                    "silu", True), (xf, w1, w2, b2)),
        "ffn_backward": (lambda: normffn.ffn_backward(xf, fctx), (xf, fctx)),
        "ffn_error": (lambda: raises(normffn.ffn, xf, w1, b1, w2, b2, "tanh"), (xf, w1)),
        "ffn_backward_out": (lambda: normffn.ffn_backward(xf, fctx, out=fouts), (xf, fctx)),
        "ffn_swiglu": (lambda: normffn.ffn_backward(
            xf, normffn.ffn_forward(xf, gw1, None, w2, b2, "swiglu")[1]), (xf, gw1, w2)),
        "ffn_swiglu_backward": (lambda: normffn.ffn_backward(xf, gctx), (xf, gctx)),
        "rms_norm": (lambda: normffn.rms_norm(x, 8, w, out=out), (x, w, out)),
        "rms_norm_backward": (lambda: normffn.rms_norm_backward(x, rctx), (x, rctx)),
        "add_layer_norm": (lambda: normffn.add_layer_norm(x, r, 8, w, b, out=pair),
                           (x, r, w, b) + pair),
        "add_layer_norm_backward": (lambda: normffn.add_layer_norm_backward(x, actx, r),
                                    (x, r, actx)),
        "add_rms_norm": (lambda: normffn.add_rms_norm_forward(x, r, 8, w), (x, r, w)),
        "add_norm_error": (lambda: raises(normffn.add_layer_norm, x, bad, 8), (x, bad)),
        "ffn_block": (lambda: normffn.ffn_block(xf, w, None, gw1, None, w2, b2, "swiglu",
                                                norm="rms", placement="post", out=out),
                      (xf, w, gw1, w2, b2, out)),
        "ffn_block_forward": (lambda: normffn.ffn_block_forward(xf, w, b, w1, b1, w2, b2,
                                                                recompute=True), (xf, w, b, w1)),
        "ffn_block_backward_out": (lambda: normffn.ffn_block_backward(xf, kctx, out=kouts),
                                   (xf, kctx) + kouts),
        "ffn_block_error": (lambda: raises(normffn.ffn_block, xf, w, b, w1, b1, w2, b2,
                                           norm="group"), (xf, w, b)),
    }


def test_no_leaks_over_10000_calls(rng):
    calls = _leak_calls(rng)
    for fn, _ in calls.values():        # warm up: caches, workspaces, first-call allocations
        for _ in range(200):
            fn()
    gc.collect()
    refs = {name: [sys.getrefcount(a) for a in arrays] for name, (_, arrays) in calls.items()}
    rss0 = _rss_bytes()
    for name, (fn, _) in calls.items():
        for _ in range(10_000):
            fn()
    gc.collect()
    grown = _rss_bytes() - rss0
    assert grown < 4 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 10,000 calls of each op"
    for name, (_, arrays) in calls.items():
        assert [sys.getrefcount(a) for a in arrays] == refs[name], f"{name}: refcount changed"


# ---------------------------------------------------------------- aliasing
def _views(total, dtype=np.float64):
    buf = np.arange(total, dtype=dtype) / total + 1.0
    return buf


def _shifts(n_out, n_in):
    """Start of the input relative to out's start: overlapping by one element at either end,
    in the middle, and (last) just adjacent on both sides (no overlap)."""
    over = sorted({-n_in + 1, -(n_in // 2), 0, n_out // 2, n_out - 1})
    return over, [-n_in, n_out]


def _alias_cases():
    """(label, make(buf_views) -> (call, out)) for every out= of every op and each input it
    must not overlap."""
    cases = []
    shape = (6, 8)
    n = 48

    def ln(victim):
        def run(out, inp, rng):
            x, w, b = _rand(rng, shape), _rand(rng, 8), _rand(rng, 8)
            args = dict(x=x, weight=w, bias=b)
            args[victim] = inp.reshape(args[victim].shape)
            return lambda: normffn.layer_norm(args["x"], 8, args["weight"], args["bias"],
                                              out=out.reshape(shape))
        return run

    for v, size in (("x", n), ("weight", 8), ("bias", 8)):
        cases.append((f"layer_norm/{v}", n, size, ln(v)))

    def ln_bwd(victim):
        def run(out, inp, rng):
            x = _rand(rng, shape)
            if victim == "ctx.x":
                inp[...] = x.reshape(-1)
                x = inp.reshape(shape)
            w = _rand(rng, 8)
            if victim == "ctx.weight":
                w = inp.reshape(8)
            _, ctx = normffn.layer_norm_forward(x, 8, w)
            dy = inp.reshape(shape) if victim == "dy" else _rand(rng, shape)
            return lambda: normffn.layer_norm_backward(dy, ctx, out=out.reshape(shape))
        return run

    for v, size in (("dy", n), ("ctx.x", n), ("ctx.weight", 8)):
        cases.append((f"layer_norm_backward/{v}", n, size, ln_bwd(v)))

    bshape = (4, 3, 4)

    def bn(victim, entry):
        def run(out, inp, rng):
            args = dict(x=_rand(rng, bshape), running_mean=np.zeros(3), running_var=np.ones(3),
                        weight=_rand(rng, 3), bias=_rand(rng, 3))
            if victim == "running_var":
                inp[...] = np.abs(inp) + 1
            args[victim] = inp.reshape(args[victim].shape)
            return lambda: getattr(normffn, entry)(**args, training=True,
                                                   out=out.reshape(bshape))
        return run

    for entry in ("batch_norm", "batch_norm_forward"):
        for v, size in (("x", n), ("running_mean", 3), ("running_var", 3), ("weight", 3),
                        ("bias", 3)):
            cases.append((f"{entry}/{v}", n, size, bn(v, entry)))

    def bn_bwd(victim):
        def run(out, inp, rng):
            x = _rand(rng, bshape)
            if victim == "ctx.x":
                inp[...] = x.reshape(-1)
                x = inp.reshape(bshape)
            w = _rand(rng, 3)
            if victim == "ctx.weight":
                w = inp.reshape(3)
            _, ctx = normffn.batch_norm_forward(x, None, None, w, None, training=True)
            dy = inp.reshape(bshape) if victim == "dy" else _rand(rng, bshape)
            return lambda: normffn.batch_norm_backward(dy, ctx, out=out.reshape(bshape))
        return run

    for v, size in (("dy", n), ("ctx.x", n), ("ctx.weight", 3)):
        cases.append((f"batch_norm_backward/{v}", n, size, bn_bwd(v)))

    fshape, h = (6, 8), 4

    def ffn(victim):
        def run(out, inp, rng):
            args = dict(x=_rand(rng, fshape), w1=_rand(rng, (8, h)), b1=_rand(rng, h),
                        w2=_rand(rng, (h, 8)), b2=_rand(rng, 8))
            args[victim] = inp.reshape(args[victim].shape)
            return lambda: normffn.ffn(**args, out=out.reshape(fshape))
        return run

    for v, size in (("x", n), ("w1", 8 * h), ("b1", h), ("w2", h * 8), ("b2", 8)):
        cases.append((f"ffn/{v}", n, size, ffn(v)))

    def ffn_bwd(victim, slot):
        def run(out, inp, rng):
            x = _rand(rng, fshape)
            if victim == "ctx.x":
                inp[...] = x.reshape(-1)
                x = inp.reshape(fshape)
            _, ctx = normffn.ffn_forward(x, _rand(rng, (8, h)), _rand(rng, h),
                                         _rand(rng, (h, 8)), None, "silu")
            dy = inp.reshape(fshape) if victim == "dy" else _rand(rng, fshape)
            outs = [None] * 5
            outs[slot] = out.reshape(((6, 8), (8, h))[slot])
            return lambda: normffn.ffn_backward(dy, ctx, out=tuple(outs))
        return run

    for v, size in (("dy", n), ("ctx.x", n)):
        cases.append((f"ffn_backward/{v}", n, size, ffn_bwd(v, 0)))
    cases.append(("ffn_backward[dw1]/dy", 8 * h, n, ffn_bwd("dy", 1)))

    def rms(victim):
        def run(out, inp, rng):
            args = dict(x=_rand(rng, shape), weight=_rand(rng, 8))
            args[victim] = inp.reshape(args[victim].shape)
            return lambda: normffn.rms_norm(args["x"], 8, args["weight"], out=out.reshape(shape))
        return run

    for v, size in (("x", n), ("weight", 8)):
        cases.append((f"rms_norm/{v}", n, size, rms(v)))

    def add(victim, which, entry):
        def run(out, inp, rng):
            args = dict(x=_rand(rng, shape), residual=_rand(rng, shape), weight=_rand(rng, 8))
            if "layer" in entry:
                args["bias"] = _rand(rng, 8)
            args[victim] = inp.reshape(args[victim].shape)
            pair = [np.empty(shape), np.empty(shape)]
            pair[which] = out.reshape(shape)
            return lambda: getattr(normffn, entry)(normalized_shape=8, out=tuple(pair), **args)
        return run

    for entry in ("add_layer_norm", "add_rms_norm"):
        for which, label in ((0, "y"), (1, "s")):
            for v, size in (("x", n), ("residual", n), ("weight", 8)) + \
                    ((("bias", 8),) if "layer" in entry else ()):
                cases.append((f"{entry}[{label}]/{v}", n, size, add(v, which, entry)))

    def add_bwd(victim, entry):
        def run(out, inp, rng):
            x = _rand(rng, shape)
            w = inp.reshape(8) if victim == "ctx.weight" else _rand(rng, 8)
            *_, ctx = getattr(normffn, f"{entry}_forward")(x, _rand(rng, shape), 8, w)
            if victim == "ctx.s":
                inp[...] = ctx.s.reshape(-1)
                ctx = dataclasses.replace(ctx, s=inp.reshape(shape))
            dy = inp.reshape(shape) if victim == "dy" else _rand(rng, shape)
            ds = inp.reshape(shape) if victim == "ds" else _rand(rng, shape)
            return lambda: getattr(normffn, f"{entry}_backward")(dy, ctx, ds,
                                                                 out=out.reshape(shape))
        return run

    for entry in ("add_layer_norm", "add_rms_norm"):
        for v, size in (("dy", n), ("ds", n), ("ctx.s", n), ("ctx.weight", 8)):
            cases.append((f"{entry}_backward/{v}", n, size, add_bwd(v, entry)))

    def rms_bwd(victim):
        def run(out, inp, rng):
            x = _rand(rng, shape)
            if victim == "ctx.x":
                inp[...] = x.reshape(-1)
                x = inp.reshape(shape)
            _, ctx = normffn.rms_norm_forward(x, 8, _rand(rng, 8))
            dy = inp.reshape(shape) if victim == "dy" else _rand(rng, shape)
            return lambda: normffn.rms_norm_backward(dy, ctx, out=out.reshape(shape))
        return run

    for v, size in (("dy", n), ("ctx.x", n)):
        cases.append((f"rms_norm_backward/{v}", n, size, rms_bwd(v)))

    def block(victim, placement):
        def run(out, inp, rng):
            args = dict(x=_rand(rng, fshape), norm_weight=_rand(rng, 8),
                        norm_bias=_rand(rng, 8), w1=_rand(rng, (8, h)), b1=_rand(rng, h),
                        w2=_rand(rng, (h, 8)), b2=_rand(rng, 8))
            args[victim] = inp.reshape(args[victim].shape)
            return lambda: normffn.ffn_block(**args, placement=placement,
                                             out=out.reshape(fshape))
        return run

    for placement in ("pre", "post"):
        for v, size in (("x", n), ("norm_weight", 8), ("norm_bias", 8), ("w1", 8 * h),
                        ("b1", h), ("w2", h * 8), ("b2", 8)):
            cases.append((f"ffn_block[{placement}]/{v}", n, size, block(v, placement)))

    def block_bwd(victim, slot, placement):
        shapes = ((6, 8), (8,), (8,), (8, h), (h,), (h, 8), (8,))

        def run(out, inp, rng):
            x = _rand(rng, fshape)
            if victim == "ctx.x":
                inp[...] = x.reshape(-1)
                x = inp.reshape(fshape)
            _, ctx = normffn.ffn_block_forward(x, _rand(rng, 8), _rand(rng, 8),
                                               _rand(rng, (8, h)), _rand(rng, h),
                                               _rand(rng, (h, 8)), None, "silu",
                                               placement=placement)
            dy = inp.reshape(fshape) if victim == "dy" else _rand(rng, fshape)
            outs = [None] * 7
            outs[slot] = out.reshape(shapes[slot])
            return lambda: normffn.ffn_block_backward(dy, ctx, out=tuple(outs))
        return run

    for placement in ("pre", "post"):
        for v, size in (("dy", n), ("ctx.x", n)):
            cases.append((f"ffn_block_backward[{placement}]/{v}", n, size,
                          block_bwd(v, 0, placement)))
        cases.append((f"ffn_block_backward[{placement},dw1]/dy", 8 * h, n,
                      block_bwd("dy", 3, placement)))
        cases.append((f"ffn_block_backward[{placement},dnorm_weight]/dy", 8, n,
                      block_bwd("dy", 1, placement)))
    return cases


ALIAS_CASES = _alias_cases()


@pytest.mark.parametrize("case", ALIAS_CASES, ids=[c[0] for c in ALIAS_CASES])
def test_out_overlapping_an_input_is_rejected(case, rng):
    label, n_out, n_in, make = case
    overlapping, adjacent = _shifts(n_out, n_in)
    for shift in overlapping + adjacent:
        lo = min(0, shift)
        buf = _views(max(n_out, shift + n_in) - lo)
        out = buf[-lo:-lo + n_out]
        inp = buf[shift - lo:shift - lo + n_in]
        call = make(out, inp, np.random.default_rng(abs(shift)))
        if shift in overlapping:
            before = _bits(buf)
            with pytest.raises(ValueError, match="overlap"):
                call()
            assert _bits(buf) == before, f"{label}: a rejected call wrote to memory"
        else:
            call()      # adjacent but disjoint views of one buffer are fine


# ---------------------------------------------------------------- alignment
def _unaligned(a):
    """A copy of ``a`` whose data starts one byte past an element boundary (legal in NumPy; a
    kernel loading whole floats from it is undefined behaviour, which UBSan reports)."""
    u = np.ndarray(a.shape, dtype=a.dtype, buffer=bytearray(a.nbytes + 1), offset=1)
    u[...] = a
    assert not u.flags.aligned
    return u


def test_unaligned_inputs_are_copied_and_unaligned_outputs_rejected(rng):
    x, w = _rand(rng, (5, 8)), _rand(rng, 8)
    assert_close(normffn.layer_norm(_unaligned(x), 8, _unaligned(w), _unaligned(w)),
                 ref.layer_norm(x, 8, w, w))
    y, ctx = normffn.layer_norm_forward(x, 8, w)
    assert_close(normffn.layer_norm_backward(_unaligned(x), ctx)[0],
                 ref.layer_norm_backward(x, ref.layer_norm_forward(x, 8, w)[1])[0])
    xb = _rand(rng, (4, 3, 5))
    assert_close(normffn.batch_norm(_unaligned(xb), None, None, _unaligned(xb[0, :, 0]),
                                    training=True),
                 ref.batch_norm(xb, None, None, xb[0, :, 0], training=True))
    w1, w2 = _rand(rng, (8, 6)), _rand(rng, (6, 8))
    assert_close(normffn.ffn(_unaligned(x), _unaligned(w1), None, _unaligned(w2).T.copy().T,
                             _unaligned(w)), ref.ffn(x, w1, None, w2, w))
    with pytest.raises(ValueError, match="aligned"):
        normffn.layer_norm(x, 8, out=_unaligned(np.empty_like(x)))
    with pytest.raises(ValueError, match="aligned"):
        normffn.layer_norm_backward(x, ctx, out=_unaligned(np.empty_like(x)))
    with pytest.raises(ValueError, match="aligned"):
        normffn.batch_norm(xb, None, None, training=True, out=_unaligned(np.empty_like(xb)))
    with pytest.raises(ValueError, match="aligned"):
        normffn.ffn(x, w1, None, w2, None, out=_unaligned(np.empty_like(x)))
    rm, rv = np.zeros(3), np.ones(3)
    for stats in ((_unaligned(rm), rv), (rm, _unaligned(rv))):
        before = [_bits(a) for a in stats]
        with pytest.raises(ValueError, match="aligned"):
            normffn.batch_norm(xb, *stats, training=True)
        assert [_bits(a) for a in stats] == before


# ---------------------------------------------------------------- large sizes
BIG = 2**31 + 1        # more elements (or a longer row) than a 32-bit int holds


class _Recorder:
    """Stands in for a kernel module: records the shapes it is called with, computes nothing."""

    def __init__(self, real):
        self._real = real
        self.calls = []

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name not in ("forward", "backward"):
            return attr

        def record(*args):
            self.calls.append((name, [getattr(a, "shape", a) for a in args]))
        return record


def _no_big_allocation(fn, exc=ValueError, match=None):
    """fn() raises exc (matching ``match``) having allocated less than 1 MiB (tracemalloc sees
    NumPy's data buffers)."""
    tracemalloc.start()
    try:
        with pytest.raises(exc, match=match):
            fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated before the error"


def test_ffn_rejects_sizes_beyond_blas_int_before_allocating():
    z = np.float32(0)
    big = 2**31
    # d = 2**31: x (1, d), w1 (d, 1), w2 (1, d) -- zero-stride views, no memory
    x = np.broadcast_to(z, (1, big))
    w1, w2 = np.broadcast_to(z, (big, 1)), np.broadcast_to(z, (1, big))
    for fn in (normffn.ffn, normffn.ffn_forward):
        _no_big_allocation(lambda: fn(x, w1, None, w2, None), match="2\\*\\*31")
        # a bias of that size must not be copied before the size is rejected
        _no_big_allocation(lambda: fn(x, w1, None, w2, np.broadcast_to(z, (big,))),
                           match="2\\*\\*31")
    # h = 2**31
    x = np.broadcast_to(z, (3, 2))
    w1, w2 = np.broadcast_to(z, (2, big)), np.broadcast_to(z, (big, 2))
    for fn in (normffn.ffn, normffn.ffn_forward):
        _no_big_allocation(lambda: fn(x, w1, None, w2, None), match="2\\*\\*31")
        _no_big_allocation(lambda: fn(x, w1, np.broadcast_to(z, (big,)), w2, None),
                           match="2\\*\\*31")


def _virtual(shape, dtype=np.float32):
    """A C-contiguous array whose pages are never touched (costs address space, not memory)."""
    return np.empty(shape, dtype=dtype)


@pytest.mark.parametrize("shape, k", [((2, BIG // 2 + 1), 1), ((BIG,), 1),
                                      ((BIG // 8 + 1, 2, 4), 2)],
                         ids=["rows>2^31-elements", "one-row-longer-than-2^31", "2-d-rows"])
def test_layer_norm_passes_64bit_sizes_to_the_kernel(shape, k, monkeypatch):
    rec = _Recorder(LN._kernel)
    monkeypatch.setattr(LN, "_kernel", rec)
    x = _virtual(shape)
    ns = shape[len(shape) - k:]
    y, ctx = normffn.layer_norm_forward(x, ns)
    n, d = math.prod(shape[:len(shape) - k]), math.prod(ns)
    assert n * d > 2**31 and y.shape == shape
    assert rec.calls[-1][1][0] == (n, d) and rec.calls[-1][1][3] == (n, d)
    normffn.layer_norm_backward(x, ctx, out=y)
    assert rec.calls[-1][0] == "backward" and rec.calls[-1][1][0] == (n, d)


@pytest.mark.parametrize("shape", [(2, 3, BIG // 6 + 1), (BIG // 4 + 1, 4)])
def test_batch_norm_passes_64bit_sizes_to_the_kernel(shape, monkeypatch):
    rec = _Recorder(BN._kernel)
    monkeypatch.setattr(BN, "_kernel", rec)
    x = _virtual(shape)
    C = shape[1]
    y, ctx = normffn.batch_norm_forward(x, np.zeros(C, np.float32), np.ones(C, np.float32),
                                        training=True)
    assert y.shape == shape and math.prod(rec.calls[-1][1][0]) == x.size > 2**31
    normffn.batch_norm_backward(x, ctx, out=y)
    assert rec.calls[-1][0] == "backward" and math.prod(rec.calls[-1][1][0]) == x.size


@pytest.mark.parametrize("op", ["rms_norm", "add_layer_norm", "add_rms_norm"])
def test_row_norms_pass_64bit_sizes_to_the_kernel(op, monkeypatch):
    mod = RMS if op == "rms_norm" else ADDN
    rec = _Recorder(mod._kernel)
    monkeypatch.setattr(mod, "_kernel", rec)
    shape = (BIG // 8 + 1, 8)
    n, d = shape
    x = _virtual(shape)
    if op == "rms_norm":
        y, ctx = normffn.rms_norm_forward(x, d)
        extra = ()
    else:
        y, _, ctx = getattr(normffn, f"{op}_forward")(x, _virtual(shape), d)
        extra = (x,)                       # ds
    assert n * d > 2**31 and y.shape == shape
    assert rec.calls[-1][0] == "forward" and rec.calls[-1][1][0] == (n, d)
    getattr(normffn, f"{op}_backward")(x, ctx, *extra, out=y)
    assert rec.calls[-1][0] == "backward" and rec.calls[-1][1][0] == (n, d)


def test_ffn_more_than_2_31_rows_keeps_blas_sizes_32bit(monkeypatch):
    rec = _Recorder(FFN._kernel)
    monkeypatch.setattr(FFN, "_kernel", rec)
    n = 2**31 + 5
    x = _virtual((n, 1))
    w1, w2 = np.ones((1, 2), np.float32), np.ones((2, 1), np.float32)
    normffn.ffn(x, w1, None, w2, None, out=_virtual((n, 1)))
    name, shapes = rec.calls[-1]
    blk = shapes[10]                     # rows per block: the m of every GEMM
    assert shapes[0] == (n, 1) and 1 <= blk <= 2**31 - 1


def _mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
def test_real_more_than_2_31_elements():
    """One real float32 LayerNorm (and BatchNorm) over 2**31 + 2048 elements.  x is calloc'd
    zeros (untouched pages read as the shared zero page) with data only in its last rows, so it
    costs ~8 GiB for y alone; the rows past element 2**31 are checked against the reference (a
    32-bit index would wrap and read the zero rows at the start)."""
    if _mem_available() < 14 << 30:
        pytest.skip("needs ~9 GiB of free memory")
    d = 1024
    n = 2**31 // d + 2
    rng = np.random.default_rng(0)
    x = np.zeros((n, d), np.float32)
    tail = _rand(rng, (4, d), np.float32) * 3 + 1
    x[-4:] = tail
    w = _rand(rng, d, np.float32)
    y = normffn.layer_norm(x, d, w, w)
    assert_close(y[-4:], ref.layer_norm(tail, d, w, w))
    assert_close(y[:2], ref.layer_norm(x[:2], d, w, w))
    del y
    # BatchNorm eval over (2, C, S): channel C-1 of sample 1 ends past element 2**31
    C, S = 4, (n * d) // 8
    xb = x.reshape(2, C, S)
    rm, rv = np.full(C, 0.5, np.float32), np.full(C, 2.0, np.float32)
    yb = normffn.batch_norm(xb, rm, rv, w[:C], w[:C])
    assert_close(yb[1, C - 1, -4 * d + 1:], ref.batch_norm(xb[1:, C - 1:, -4 * d + 1:], rm[-1:],
                                                           rv[-1:], w[C - 1:C], w[C - 1:C])[0, 0])


# ---------------------------------------------------------------- the kernels' own guard
# The LayerNorm/RMSNorm entry points take plain ndarrays (kernels/arrays.pxd) instead of typed
# memoryviews; a caller inside the package that broke the contract must get a ValueError, not
# a read or write out of bounds.
def _ln_args(n=3, d=5, dtype=np.float32):
    x = np.ones((n, d), dtype)
    return dict(y=np.empty_like(x), mean=np.empty(n), rstd=np.empty(n), x=x,
                weight=np.ones(d, dtype), bias=np.ones(d, dtype))


GUARD_CASES = [
    ("y", lambda a: np.empty((3, 4), np.float32)),                 # too few elements
    ("y", lambda a: np.empty((3, 5), np.float64)),                 # other dtype
    ("y", lambda a: np.empty((5, 3), np.float32).T),               # not C-contiguous
    ("y", lambda a: np.frombuffer(bytes(60), np.float32).reshape(3, 5)),  # read-only
    ("mean", lambda a: np.empty(2)),
    ("rstd", lambda a: np.empty(3, np.float32)),
    ("weight", lambda a: np.ones(4, np.float32)),
    ("bias", lambda a: [1.0] * 5),
    ("x", lambda a: np.ones((3, 5), np.int32)),
    ("x", lambda a: np.ones(15, np.float32)),                      # not 2-D
]


@pytest.mark.parametrize("name,bad", GUARD_CASES, ids=[f"{n}{i}" for i, (n, _) in
                                                       enumerate(GUARD_CASES)])
def test_row_norm_kernels_guard_their_arguments(name, bad):
    from normffn._kernels import layer_norm as k_ln, rms_norm as k_rms
    a = _ln_args()
    a[name] = bad(a)
    with pytest.raises(ValueError, match="kernel argument"):
        k_ln.forward(a["y"], a["mean"], a["rstd"], a["x"], a["weight"], a["bias"], 1e-5, 0)
    if name not in ("mean", "bias"):
        with pytest.raises(ValueError, match="kernel argument"):
            k_rms.forward(a["y"], a["rstd"], a["x"], a["weight"], 1e-5, 0)


def test_row_norm_backward_kernels_guard_their_arguments():
    from normffn._kernels import layer_norm as k_ln, rms_norm as k_rms
    a = _ln_args()
    x, w, mean, rstd = a["x"], a["weight"], a["mean"], a["rstd"]
    dx, dy = np.empty_like(x), np.ones_like(x)
    dw = np.empty(5, np.float32)
    work = np.empty(k_ln.scratch_size(3, 5, True, False))
    with pytest.raises(ValueError, match="kernel argument scratch"):
        k_ln.backward(dx, dw, None, dy, x, w, mean, rstd, work[:1], 0)
    with pytest.raises(ValueError, match="kernel argument dy"):
        k_ln.backward(dx, dw, None, dy[:2], x, w, mean, rstd, work, 0)
    with pytest.raises(ValueError, match="kernel argument dweight"):
        k_rms.backward(dx, np.empty(4, np.float32), dy, x, w, rstd, work, 0)
    with pytest.raises(ValueError, match="kernel argument dx"):
        k_rms.backward(dx.astype(np.float64), None, dy, x, w, rstd, None, 0)
