"""The comparison machinery behind ``python -m normffn compare`` (also public in normffn.testing)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import child_env
from normffn import compare as compare_mod
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


def _env():
    return child_env()


def test_compare_command_json(tmp_path):
    out = tmp_path / "c.json"
    r = subprocess.run([sys.executable, "-m", "normffn", "compare", "--op", "layer_norm",
                        "--dtype", "float64", "--inputs", "large_offset", "--json", str(out)],
                       capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.read_text())
    assert data and all(d["op"] == "layer_norm" for d in data)
    assert "OK: normffn within its documented tolerance" in r.stdout
    assert "tolerance" in r.stdout and "NaN/Inf" in r.stdout
    assert all("rtol" in d and "n_finite" in d for d in data)


def test_testing_does_not_import_compare():
    code = ("import sys, normffn.testing; assert 'normffn.compare' not in sys.modules; "
            "from normffn.testing import documented_tolerance; "
            "assert 'normffn.compare' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr


def test_all_nan_outputs_are_reported_as_such():
    both = {"dweight": np.full(4, np.nan)}
    (row,) = testing.compare_outputs("layer_norm", "backward", "nan_row", "float32", "normffn",
                                     both, both)
    assert row.n_finite == 0 and row.n_nonfinite == 4 and row.within_tolerance
    text = compare_mod.format_rows([row])
    assert "all NaN/Inf" in text and "0.00e+00" not in text and "same (4)" in text


def test_rows_carry_the_tolerance_and_rel_is_against_the_scale():
    ref = {"y": np.array([1000.0, 1e-9])}
    got = {"y": np.array([1000.0, 2e-9])}
    (row,) = testing.compare_outputs("layer_norm", "forward", "normal", "float64", "normffn",
                                     got, ref)
    assert (row.rtol, row.atol) == testing.documented_tolerance("layer_norm", "y", "float64")
    assert row.max_rel == pytest.approx(1e-9 / 1000.0)   # not 1.0 from the near-zero element
    assert "tolerance" in compare_mod.format_rows([row])


def test_assert_close_message_has_no_repr_noise():
    with pytest.raises(AssertionError) as e:
        testing.assert_close(np.float32([1.0, 2.5]), np.array([1.0, 2.0]), name="y")
    msg = str(e.value)
    assert "np.float64" not in msg and "()" not in msg and "first at [1]" in msg


def test_fused_and_gated_ops_are_compared():
    """Ops with several outputs (add + norm: y and s; backward dsum with ds) and the gated FFN
    entry (labelled by activation) come out of the same machinery, within tolerance."""
    rows = testing.run_comparison(ops=("rms_norm", "add_layer_norm", "add_rms_norm",
                                       "ffn_gated"),
                                  dtypes=("float32",), inputs=("normal",), torch=False)
    got = {(r.op, r.output) for r in rows}
    assert {("add_layer_norm", "s"), ("add_layer_norm", "dsum"), ("add_layer_norm", "mean"),
            ("add_rms_norm", "dweight"), ("rms_norm", "rstd"), ("rms_norm", "dx"),
            ("ffn_gated[swiglu]", "dw1"), ("ffn_gated[reglu]", "y")} <= got
    assert all(r.within_tolerance for r in rows), [r for r in rows if not r.within_tolerance]


def test_ffn_block_is_compared_for_every_norm_and_placement():
    """The FFN sublayer (keyword-only norm / placement / eps) through the same machinery: every
    variant labelled, the seven gradients and the statistics compared (RMSNorm has no mean),
    within tolerance."""
    rows = testing.run_comparison(ops=("ffn_block",), dtypes=("float32",), inputs=("normal",),
                                  torch=False)
    got = {(r.op, r.output) for r in rows}
    assert {("ffn_block[pre-layer-relu]", "y"), ("ffn_block[pre-layer-relu]", "mean"),
            ("ffn_block[post-layer-gelu]", "dnorm_bias"), ("ffn_block[post-rms-swiglu]", "dw1"),
            ("ffn_block[pre-rms-swiglu]", "rstd"), ("ffn_block[pre-rms-relu]", "dx")} <= got
    assert not {o for op, o in got if "-rms-" in op} & {"mean", "dnorm_bias"}
    assert len({r.op for r in rows}) == 12
    assert all(r.within_tolerance for r in rows), [r for r in rows if not r.within_tolerance]
