"""benchmarks/dask_scale.py (issue #15's scale benchmark) runs end to end on a tiny array and
reports every figure the targets and floors are read from."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("dask.array")
pytest.importorskip("distributed")

import normffn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dask_scale_small_run(tmp_path):
    out = tmp_path / "scale.json"
    src = os.path.dirname(os.path.dirname(normffn.__file__))
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "dask_scale.py"), "--gib", "0.0078125",
         "--chunk-mib", "1", "--sources", "2", "--repeat", "1", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["chunks"] == 8 and r["sources_per_process"] == 2
    for key in ("ln_cluster_GBps", "bn_cluster_GBps", "read_sum_cluster_GBps",
                "ln_inprocess_GBps", "copy_one_read_GBps", "dask_slot_ms_per_chunk",
                "ln_vs_inprocess", "bn_vs_copy_one_read", "read_sum_vs_inprocess_sum",
                "ln_ceiling_vs_inprocess", "bn_ceiling_vs_copy_one_read",
                "ln_tuned_vs_inprocess_out", "bn_tuned_vs_copy_one_read",
                "ln_cpu_bound_vs_inprocess", "dask_tuned_slot_ms_per_chunk",
                "bn_cpu_bound_vs_copy_one_read"):
        assert r[key] > 0, key
    # every per-chunk graph ran one task per chunk, and the workers held the sources
    for name in ("ln", "ln_tuned", "bn", "bn_tuned", "read_sum", "noop", "noop_tuned"):
        assert r[f"{name}_task_ms"] == r[f"{name}_task_ms"], f"{name}: no per-chunk tasks"
    assert r["worker_peak_rss_MiB"] >= r["worker_sources_MiB"] == 2
    for line in ("LayerNorm vs in-process calls", "BN statistics vs copy, one read",
                 "plain Dask read-and-sum", "memory per worker"):
        assert line in proc.stdout
