"""The comparison machinery behind ``python -m normffn compare`` (also public in normffn.testing)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from normffn import testing


def test_run_comparison_layer_norm_rows_are_real_and_within_tolerance():
    rows = testing.run_comparison(ops=("layer_norm",), dtypes=("float32",),
                                  inputs=("normal", "nan_row"))
    mine = [r for r in rows if r.provider == "normffn"]
    outputs = {r.output for r in mine}
    assert {"y", "mean", "rstd", "dx", "dweight", "dbias"} <= outputs
    assert all(r.within_tolerance for r in mine), [r for r in mine if not r.within_tolerance]
    assert any(r.max_abs > 0 for r in mine)           # numbers come from a real run
    assert all(r.nonfinite_match for r in mine)        # the NaN row stays where the ref has it


def test_compare_outputs_flags_a_wrong_result():
    ref = {"y": np.linspace(-1, 1, 10)}
    bad = {"y": ref["y"] + 1e-3}
    (row,) = testing.compare_outputs("layer_norm", "forward", "normal", "float32", "normffn",
                                     bad, ref)
    assert row.within_tolerance is False and np.isclose(row.max_abs, 1e-3)
    nan = {"y": np.where(np.arange(10) == 3, np.nan, ref["y"])}
    (row,) = testing.compare_outputs("layer_norm", "forward", "normal", "float32", "normffn",
                                     nan, ref)
    assert row.nonfinite_match is False and row.within_tolerance is False


def test_compare_command_json(tmp_path):
    out = tmp_path / "c.json"
    r = subprocess.run([sys.executable, "-m", "normffn", "compare", "--op", "layer_norm",
                        "--dtype", "float64", "--inputs", "large_offset", "--json", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.read_text())
    assert data and all(d["op"] == "layer_norm" for d in data)
    assert "OK: normffn within its documented tolerance" in r.stdout
