"""kernels/vmath.h: the vectorised exp, normal CDF and smooth activations the fused FFN uses.

Each function is reached through its NF_CLONES array form (normffn._kernels._bench hooks), so
these tests run the vector code the FFN runs on this machine.  References: float64 (float32
functions), x87 long double (float64 exp), scipy's ndtr/erfc in long double where it matters.
"""
from __future__ import annotations

import numpy as np
import pytest

from normffn import reference
from normffn.testing import assert_close
from normffn._kernels import _bench

F32_MIN_DENORMAL = np.float32(2.0 ** -149)


def _vexp32(x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.empty_like(x)
    _bench.vexp_f32(y, x)
    return y


def _vexp64(x):
    x = np.ascontiguousarray(x, dtype=np.float64)
    y = np.empty_like(x)
    _bench.vexp_f64(y, x)
    return y


def _vphi(x):
    x = np.ascontiguousarray(x, dtype=np.float64)
    y, p = np.empty_like(x), np.empty_like(x)
    _bench.vphi(y, p, x)
    return y, p


ACT_CODES = {"gelu": 1, "gelu_tanh": 2, "silu": 3}


def _vact(name, x):
    y, d = np.empty_like(x), np.empty_like(x)
    fn = _bench.vact_f32 if x.dtype == np.float32 else _bench.vact_f64
    fn(y, d, np.ascontiguousarray(x), ACT_CODES[name])
    return y, d


def _ulps32(y, ref):
    """|y - ref| in units of the float32 spacing at ref (denormal spacing below the normals)."""
    ref = np.asarray(ref, dtype=np.float64)
    spacing = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    spacing = np.maximum(spacing, 2.0 ** -149)
    return np.abs(y.astype(np.float64) - ref) / spacing


def _ulps64(y, ref):
    """|y - ref| in float64 ulps, ref a long double."""
    with np.errstate(over="ignore"):
        spacing = np.maximum(np.spacing(np.abs(ref).astype(np.float64)), 2.0 ** -1074)
    return (np.abs(y.astype(np.longdouble) - ref) / spacing.astype(np.longdouble)).astype(
        np.float64)


# ---------------------------------------------------------------- exp, float32
def test_exp_f32_dense_bit_patterns():
    # every 1021st float bit pattern (all signs, exponents, mantissas), plus [-104, 89] densely
    bits = np.arange(0, 2 ** 32, 1021, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = np.concatenate([x, np.linspace(-104, 89, 1_000_001, dtype=np.float32),
                        np.linspace(-1, 1, 200_001, dtype=np.float32)])
    x = x[np.isfinite(x)]
    y = _vexp32(x)
    with np.errstate(over="ignore"):
        ref = np.exp(x.astype(np.float64))
    overflow = ref > np.finfo(np.float32).max * (1 + 2.0 ** -25)
    assert np.all(y[overflow] == np.inf)
    ok = ~overflow
    err = _ulps32(y[ok], ref[ok])
    assert err.max() <= 1.0, f"max {err.max():.3f} ulp at x = {x[ok][err.argmax()]!r}"


def test_exp_f32_special_values():
    x = np.float32([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 1e-45, -1e-45])
    y = _vexp32(x)
    assert np.isnan(y[0])
    assert y[1] == np.inf and y[2] == 0 and y[5] == np.inf and y[6] == 0
    assert np.all(y[[3, 4, 7, 8]] == 1)
    assert not np.signbit(y[2]) and not np.signbit(y[6])


def test_exp_f32_overflow_and_underflow_boundaries():
    big = np.float32(np.log(np.float64(np.finfo(np.float32).max)))          # 88.72284
    below, above = np.nextafter(big, np.float32(0)), np.nextafter(big, np.float32(np.inf))
    assert np.isfinite(_vexp32([below])[0])
    huge = np.float32([above, 89, 104, 200])
    assert _vexp32(huge).tolist() == [np.inf] * 4
    # denormal results, rounded once: within 1 denormal ulp of the float64 result
    x = np.linspace(-103.9, -87.4, 200_001, dtype=np.float32)
    y = _vexp32(x)
    assert np.all(np.abs(y.astype(np.float64) - np.exp(x.astype(np.float64))) <= 2.0 ** -149)
    # the smallest denormal and the rounding to zero just below it
    x0 = np.float32(np.log(2.0 ** -149))
    assert _vexp32([x0])[0] == F32_MIN_DENORMAL
    assert _vexp32([np.float32(-104.0), np.float32(-150.0)]).tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- exp, float64
def test_exp_f64_sampled():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(-745.1, 709.78, 400_000), rng.uniform(-1, 1, 200_000),
                        rng.uniform(-745.1, -708, 100_000),           # denormal results
                        rng.uniform(-1e-8, 1e-8, 10_000)])
    y = _vexp64(x)
    ref = np.exp(x.astype(np.longdouble))
    err = _ulps64(y, ref)
    assert err.max() < 1.0, f"max {err.max():.3f} ulp at x = {x[err.argmax()]!r}"


def test_exp_f64_special_values_and_boundaries():
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 709.78, 709.79, -745.13, -745.14, 1e300,
                  -1e300, 5e-324])
    y = _vexp64(x)
    assert np.isnan(y[0])
    assert y[1] == np.inf and y[2] == 0 and y[6] == np.inf and y[9] == np.inf
    assert y[3] == 1 and y[4] == 1 and y[11] == 1
    assert np.isfinite(y[5]) and y[5] == np.exp(709.78)
    assert y[7] == 5e-324 and y[8] == 0 and y[10] == 0


# ---------------------------------------------------------------- Phi (float arguments)
def test_phi_relative_accuracy_over_float_range():
    from scipy.special import ndtr
    # every float32 in [-15, 10] would be 2e9 values: a dense grid plus random float32 values
    rng = np.random.default_rng(2)
    v = np.concatenate([np.linspace(-15, 10, 500_001, dtype=np.float32),
                        rng.uniform(-15, 10, 300_000).astype(np.float32),
                        np.float32([-1e-30, 1e-30, -1e-6, 1e-6])]).astype(np.float64)
    y, p = _vphi(v)
    ref = ndtr(v)                      # relative accuracy ~1e-15 in the tail (erfc based)
    rel = np.abs(y / ref - 1)
    assert rel.max() < 1e-10, f"Phi: max rel {rel.max():.3g} at v = {v[rel.argmax()]!r}"
    pref = np.exp(-0.5 * v.astype(np.longdouble) ** 2) / np.sqrt(np.longdouble(2) * np.pi)
    prel = np.abs(p / pref - 1).astype(np.float64)
    assert prel.max() < 1e-15


def test_phi_special_values():
    y, p = _vphi(np.array([np.nan, -np.inf, np.inf, 0.0, -0.0, -40.0, 40.0]))
    assert np.isnan(y[0]) and np.isnan(p[0])
    assert y[1] == 0 and y[2] == 1 and p[1] == 0 and p[2] == 0
    np.testing.assert_allclose(y[3:5], 0.5, rtol=1e-10)
    assert 0 <= y[5] < 1e-300 and y[6] == 1


# ---------------------------------------------------------------- activations
@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu"])
def test_activation_f32_against_float64_reference(name):
    v = np.concatenate([np.linspace(-20, 20, 400_001, dtype=np.float32),
                        np.float32([-1e-30, 1e-30, -90, 90, -1e4, 1e4])])
    y, d = _vact(name, v)
    ref_y, ref_d = reference._ffn_act(name, v.astype(np.float64))
    assert_close(y, ref_y, dtype=np.float32, name=f"{name} value")
    assert_close(d, ref_d, dtype=np.float32, name=f"{name} derivative")
    if name == "gelu":
        # computed in double and rounded once: a few float ulps relative, into the far tail
        tail = (v > -14) & (ref_y != 0)
        err = _ulps32(y[tail], ref_y[tail])
        assert err.max() <= 2, f"gelu: {err.max():.2f} ulp at v = {v[tail][err.argmax()]!r}"
    if name == "silu":
        ok = (ref_y != 0) & (v > -88)        # below, e^-v overflows float: silu(v) -> 0 (as libm)
        err = _ulps32(y[ok], ref_y[ok])
        assert err.max() <= 4, f"silu: {err.max():.2f} ulp at v = {v[ok][err.argmax()]!r}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu"])
def test_activation_special_values_match_reference(name, dtype):
    v = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 100.0, -100.0], dtype=dtype)
    y, d = _vact(name, v)
    with np.errstate(all="ignore"):
        ref_y, ref_d = reference._ffn_act(name, v.astype(np.float64))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref_y), err_msg=f"{name} value NaN")
    np.testing.assert_array_equal(np.isnan(d), np.isnan(ref_d), err_msg=f"{name} grad NaN")
    fin = np.isfinite(ref_y)
    np.testing.assert_array_equal(np.isinf(y), np.isinf(ref_y) & ~np.isnan(ref_y))
    np.testing.assert_allclose(y[fin], ref_y[fin], rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu"])
def test_activation_f64_against_reference(name):
    v = np.linspace(-40, 40, 200_001)
    y, d = _vact(name, v)
    ref_y, ref_d = reference._ffn_act(name, v)
    # gelu's tail: erfc(z) is conditioned ~2 z^2, so argument roundings give ~1e-13 at v = -38;
    # the reference's gelu_tanh, v/2 (1 + tanh u), cancels to 0 below v ~ -6 (atol)
    np.testing.assert_allclose(y, ref_y, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(d, ref_d, rtol=1e-12, atol=1e-14)
