"""Smoke tests of the two benchmark front ends, on tiny shapes (no timing is judged here).

* every asv benchmark method runs once, for every class (one per provider) and dtype, at its
  op's registry ``test_shape`` (a raising benchmark fails CI in seconds instead of dropping out
  of the asv history); the asv classes keep bench's timing policy and process model;
* ``python -m normffn bench`` runs end to end in both process modes, writes its JSON, and
  rejects a bad ``--shape`` / a missing ``--plot`` dependency before timing anything.
"""
from __future__ import annotations

import importlib
import inspect
import itertools
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import child_env
from normffn import _ops, bench

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _import_suite(name):
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module(f"benchmarks.{name}")
    finally:
        sys.path.remove(str(ROOT))


def _asv_classes():
    for path in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        mod = _import_suite(path.stem)
        for cname, cls in inspect.getmembers(mod, inspect.isclass):
            if cname.startswith("_") or not hasattr(cls, "params"):
                continue
            methods = [m for m in dir(cls) if m.startswith(("time_", "peakmem_"))]
            if methods:
                yield pytest.param(cls, methods, id=f"{path.stem}.{cname}")


@pytest.mark.parametrize("cls, methods", list(_asv_classes()))
def test_asv_benchmark_runs(cls, methods):
    shape = _ops.get(cls.op).test_shape
    _, dtypes = cls.params
    ran = 0
    for dtype in dtypes:
        b = cls()
        try:
            b.setup(shape, dtype)
        except NotImplementedError:
            continue           # asv's skip: provider missing / case not applicable
        for m in methods:
            getattr(b, m)(shape, dtype)
            ran += 1
    if cls.provider == "torch" and _ops.torch_or_none() is None:
        assert ran == 0
    else:
        assert ran > 0, f"{cls.__name__}: every parameter combination was skipped"


def test_asv_one_class_per_provider_with_registry_params():
    mod = _import_suite("bench_layer_norm")
    shapes = [tuple(s) for s in _ops.get("layer_norm").bench_shapes.values()]
    for provider in ("normffn", "numpy", "torch"):
        cls = getattr(mod, f"LayerNorm_{provider}")
        assert cls.provider == provider and cls.__name__ == f"LayerNorm_{provider}"
        assert cls.param_names == ["shape", "dtype"]
        assert cls.params == (shapes, ["float32", "float64"])
    assert not hasattr(mod, "LayerNorm")


def test_asv_timing_policy_is_bench_defaults():
    """asv's attributes reproduce bench's default policy: three untimed warm-up calls, calls
    timed one by one, 5..50 per process over 1/3 s, 3 processes, median of all calls."""
    reg = _import_suite("_registry")
    defaults = {k: v.default for k, v in inspect.signature(bench.run).parameters.items()}
    rounds, repeat, min_time = defaults["rounds"], defaults["repeat"], defaults["min_time"]
    per_round = -(-repeat // rounds)
    assert reg.BENCH_ROUNDS == rounds
    assert reg.BENCH_CALLS == (per_round, 10 * per_round)
    assert reg.BENCH_SECONDS == pytest.approx(min_time / rounds)
    calls = []
    bench._calls_for(lambda: calls.append(1), repeat, 0.0)
    assert reg.WARMUP_CALLS == len(calls)
    cls = _import_suite("bench_layer_norm").LayerNorm_normffn
    assert (cls.number, cls.warmup_time, cls.rounds) == (1, 0, rounds)
    assert cls.repeat == (per_round, 10 * per_round, pytest.approx(min_time / rounds))


def test_asv_setup_builds_once_per_process():
    """asv re-runs setup between samples: the inputs, out= buffers and callables bench reuses
    across calls are reused too (a rebuild would time cold caches), and a skip stays a skip."""
    mod = _import_suite("bench_layer_norm")
    shape = _ops.get("layer_norm").test_shape
    a, b = mod.LayerNorm_normffn(), mod.LayerNorm_normffn()
    a.setup(shape, "float32")
    b.setup(shape, "float32")
    assert a._calls is b._calls
    b.setup(shape, "float64")
    assert b._calls is not a._calls
    nhwc = _import_suite("bench_batch_norm").TrainChannelsLast_normffn()
    for _ in range(2):
        with pytest.raises(NotImplementedError):
            nhwc.setup((6, 8), "float32")           # channels-last cases need 4-D shapes


def test_asv_normffn_process_never_imports_torch():
    """Like bench's worker per provider, a normffn asv process loads no second OpenMP runtime."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from benchmarks import bench_layer_norm as m, bench_ffn as f; "
            "b = m.LayerNorm_normffn(); b.setup((6, 8), 'float32'); b.time_forward((6, 8), "
            "'float32'); c = f.FFN_normffn(); c.setup((6, 8, 16), 'float32'); "
            "c.time_forward_backward((6, 8, 16), 'float32'); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True,
                       env=child_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def _bench(*args, timeout=600):
    env = child_env()
    return subprocess.run([sys.executable, "-m", "normffn", "bench", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


TINY = ["--op", "layer_norm", "--op", "ffn", "--shape", "6x8", "--shape", "6x8x16",
        "--min-time", "0", "--repeat", "2"]


@pytest.mark.parametrize("mode", [["--rounds", "2"], ["--in-process"]],
                         ids=["process", "in-process"])
def test_bench_end_to_end(mode, tmp_path):
    out = tmp_path / "b.json"
    r = _bench(*TINY, *mode, "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "normffn vs" in r.stdout and "higher is" in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 100, r.stdout
    assert "[1/" in r.stderr and "left" in r.stderr            # progress with time left
    data = json.loads(out.read_text())
    assert data["mode"] == ("in-process" if "--in-process" in mode else "process")
    got = {(c["op"], c["direction"]) for c in data["cases"]}
    assert got == {("layer_norm", "forward"), ("layer_norm", "backward"),
                   ("ffn", "forward"), ("ffn", "fwd+bwd")}
    for c in data["cases"]:
        assert "limit" in c and c["limit"]["rate"] > 0
        assert all(p["median_ms"] > 0 for p in c["providers"].values())


def test_bench_fused_and_gated_ops_in_process(tmp_path):
    """Ops with two outputs (add + norm's out= pair, backward with ds) and the gated FFN (its
    own shapes, the training step reusing every buffer) through the whole command."""
    out = tmp_path / "b.json"
    r = _bench("--op", "add_layer_norm", "--op", "rms_norm", "--op", "ffn_gated", "--shape",
               "6x8", "--shape", "6x8x16", "--min-time", "0", "--repeat", "1", "--in-process",
               "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.read_text())
    got = {(c["op"], c["direction"]) for c in data["cases"]}
    assert got == {("add_layer_norm", "forward"), ("add_layer_norm", "backward+ds"),
                   ("rms_norm", "forward"), ("rms_norm", "backward"), ("rms_norm", "fwd+bwd"),
                   ("ffn_gated", "fwd swiglu"), ("ffn_gated", "fwd+bwd swiglu")}
    for c in data["cases"]:
        assert "normffn out=" in c["providers"] and "normffn" in c["providers"]


def test_bench_ffn_block_in_process(tmp_path):
    """The FFN sublayer (keyword-only arguments, seven gradients reused by ``normffn out=``)
    through the whole command; at a shape that is not a named bench shape every case runs."""
    out = tmp_path / "b.json"
    r = _bench("--op", "ffn_block", "--shape", "6x8x16", "--min-time", "0", "--repeat", "1",
               "--in-process", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.read_text())
    got = {c["direction"] for c in data["cases"]}
    assert got == {c.direction for c in _ops.get("ffn_block").bench_cases}
    for c in data["cases"]:
        assert {"normffn out=", "normffn", "normffn unfused"} <= set(c["providers"])


def test_ffn_block_unfused_composition_computes_the_fused_op():
    """bench's "normffn unfused" (layer_norm / add_layer_norm + ffn, what users composed by
    hand) gives the fused op's results, so the two are timed doing the same work."""
    import normffn
    op = _ops.get("ffn_block")
    for variant in ("pre-layer-relu", "post-rms-swiglu", "post-layer-gelu", "pre-rms-relu"):
        inp = op.make_inputs(op.test_shape, np.float64, "normal", 0, variant)
        pos, kw = op.split_args(inp.args)
        y, ctx = normffn.ffn_block_forward(*pos, **kw)
        grads = [g for g in normffn.ffn_block_backward(inp.dy, ctx) if g is not None]
        np.testing.assert_allclose(op.unfused(inp, "forward")(), y, rtol=1e-12, atol=1e-12)
        got = op.unfused(inp, "fwd+bwd")()
        assert len(got) == len(grads)
        for g, w in zip(got, grads):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_ffn_block_cases_and_rate_model_follow_the_shape():
    """Issue #13's pairing: ReLU cases at 2048x768x3072, SwiGLU ones at 2048x768x2048; the
    gated cases count (and probe) a first GEMM 2h wide."""
    op = _ops.get("ffn_block")
    relu, swiglu = (2048, 768, 3072), (2048, 768, 2048)
    assert all("relu" in c.direction for c in op.cases_for(relu))
    assert all("swiglu" in c.direction for c in op.cases_for(swiglu))
    assert len(op.cases_for(relu)) + len(op.cases_for(swiglu)) == len(op.bench_cases)
    n, d, h = swiglu
    for c in op.cases_for(swiglu):
        assert _ops.case_gated(op, c)
        fwd = 2.0 * n * d * 2 * h + 2.0 * n * h * d
        assert _ops.case_work(op, c, swiglu, "float32") == fwd * (3 if c.call == "fwd+bwd" else 1)
    n, d, h = relu
    for c in op.cases_for(relu):
        assert not _ops.case_gated(op, c)
        assert _ops.limit_work(op, relu, "float32", c) == \
            4.0 * n * d * h * (3 if c.call == "fwd+bwd" else 1)
    # the plain FFNs' rate model is unchanged by the per-case gating
    ffn, gated = _ops.get("ffn"), _ops.get("ffn_gated")
    assert _ops.case_work(ffn, ffn.bench_cases[1], (8, 4, 6), "float32") == 6 * 2.0 * 8 * 4 * 6
    assert _ops.case_work(gated, gated.bench_cases[0], (8, 4, 6), "float32") == 6.0 * 8 * 4 * 6


def test_bench_threads_list_prints_scaling(tmp_path):
    r = _bench("--op", "layer_norm", "--shape", "6x8", "--min-time", "0", "--repeat", "1",
               "--rounds", "1", "--threads", "1,2", "--no-torch")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Scaling" in r.stdout and "normffn 1t" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--op", "ffn", "--shape", "64x768"], "ffn shapes are NxDxH"),
    (["--op", "layer_norm", "--shape", "64x7x8"], "layer_norm shapes are NxD"),
    (["--op", "layer_norm", "--shape", "64xabc"], "layer_norm shapes are NxD"),
    (["--op", "layer_norm", "--threads", "0"], "--threads"),
])
def test_bench_rejects_bad_arguments_before_timing(args, message):
    r = _bench(*args, timeout=120)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    assert "[1/" not in r.stderr                                # nothing was timed


def test_bench_plot_dependency_checked_first():
    try:
        import matplotlib  # noqa: F401
        pytest.skip("matplotlib is installed")
    except ImportError:
        pass
    r = _bench("--op", "layer_norm", "--shape", "6x8", "--plot", "x.png", timeout=120)
    assert r.returncode != 0 and "matplotlib" in r.stderr and "[1/" not in r.stderr


def test_version():
    env = child_env()
    r = subprocess.run([sys.executable, "-m", "normffn", "--version"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0 and r.stdout.startswith("normffn ")


def test_parse_threads_and_shapes():
    assert bench.parse_threads("1,2") == [1, 2]
    assert bench.resolve_shapes(["layer_norm", "batch_norm"], ["8x4"]) == {
        "layer_norm": [(8, 4)], "batch_norm": [(8, 4)]}
    assert _ops.get("ffn").parse_shape("8192x512x2048") == (8192, 512, 2048)
    assert _ops.get("layer_norm").parse_shape("8192x768") == (8192, 768)
    with pytest.raises(ValueError, match="ffn shapes are NxDxH"):
        bench.resolve_shapes(["ffn"], ["64x768"])


def test_wide_table_moves_extra_normffn_columns_to_a_second_table():
    """A table wider than 100 columns (ffn_block: five provider columns) keeps normffn's first
    two columns, torch, the speed-up and the limit; the other normffn variants go below."""
    from normffn.bench import TABLE_WIDTH, _render, _split_wide
    cols = ["normffn out=", "normffn", "normffn recompute", "normffn unfused", "torch"]
    heads = ["shape", "dir"] + [k.replace(" ", "\n", 1) for k in cols] + \
        ["normffn vs\ntorch (×,\nhigher is\nfaster)", "GFLOP/s", "% of\ngemm"]
    row = ["2048×768×3072", "fwd+bwd post swiglu"] + ["1198 ±10%"] * 5 + ["0.903", "219", "92%"]
    (mh, mr), (eh, er) = _split_wide(heads, [row, row], cols)
    assert [h.split("\n")[-1] for h in mh] == ["shape", "dir", "out=", "normffn", "torch",
                                                "faster)", "GFLOP/s", "gemm"]
    assert [h.split("\n")[-1] for h in eh] == ["shape", "dir", "recompute", "unfused"]
    assert len(mr[0]) == len(mh) and len(er[0]) == len(eh)
    from normffn.bench import _header_lines
    assert max(len(line) for line in _render(_header_lines(mh), mr, 2)) <= TABLE_WIDTH
    # a narrow table stays whole
    narrow = _split_wide(heads[:4] + heads[-3:], [row[:4] + row[-3:]], cols[:2])
    assert narrow[1] is None


def test_torch_train_step_fused_group_smoke(tmp_path):
    """benchmarks/torch_train_step.py --only fused, tiny shapes, one round: every case's worker
    runs (torch eager, normffn.torch, bare GEMMs) and the report carries every spec."""
    pytest.importorskip("torch")
    out = tmp_path / "fused.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "torch_train_step.py"),
                        "--only", "fused", "--tiny", "--rounds", "1", "--steps", "2",
                        "--json", str(out)],
                       capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())["fused"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        specs = importlib.import_module("torch_train_step").TINY["fused"]
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert sorted(res) == sorted(specs)
    for spec, v in res.items():
        assert all(v["ms"][k]["median"] > 0 for k in ("torch", "normffn", "module", "gemms")), \
            spec
