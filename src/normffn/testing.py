"""Comparison helpers for tests and for users' own numerical comparison scripts.

- :func:`tolerance` — the documented per-dtype accuracy normffn promises against the float64
  reference.
- :func:`error_stats` — max abs / max rel error of one array against a reference, and where.
- :func:`assert_close` — dtype-aware comparison with a failure message that says dtype, shape,
  the max abs/rel error and where it occurred; NaN/Inf must sit exactly where the reference
  puts them.
- :func:`gradcheck` — central finite differences in float64 against analytic gradients.
- :func:`run_comparison`, :func:`compare_outputs`, :func:`documented_tolerance` — the machinery
  of ``python -m normffn compare`` (defined in :mod:`normffn.compare`), for your own scripts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["tolerance", "error_stats", "ErrorStats", "assert_close", "gradcheck",
           "documented_tolerance", "compare_outputs", "run_comparison", "ComparisonRow"]

# Documented accuracy against the float64 reference: |actual - ref| <= atol * scale + rtol * |ref|
# with scale = max(1, max |ref|) over finite values.  float32 kernels compute in float32 with
# float64 reductions, so a few float32 ulps of the output's scale.
_TOLERANCES = {
    np.dtype(np.float32): (2e-5, 2e-5),
    np.dtype(np.float64): (1e-11, 1e-11),
}


def tolerance(dtype) -> tuple[float, float]:
    """``(rtol, atol)`` normffn promises for outputs of ``dtype`` (atol is scaled by the
    reference's largest magnitude, at least 1)."""
    return _TOLERANCES[np.dtype(dtype)]


@dataclass(frozen=True)
class ErrorStats:
    """Max abs and max rel error of ``actual`` vs ``desired`` (finite positions), the index of the
    worst abs error, and whether NaN/Inf positions agree."""

    max_abs: float
    max_rel: float
    where: tuple | None
    nonfinite_match: bool
    scale: float


def error_stats(actual, desired) -> ErrorStats:
    """Compare ``actual`` to ``desired`` (both converted to float64)."""
    a = np.asarray(actual, dtype=np.float64)
    d = np.asarray(desired, dtype=np.float64)
    if a.shape != d.shape:
        raise AssertionError(f"shape mismatch: actual {a.shape}, desired {d.shape}")
    fin_d = np.isfinite(d)
    nonfinite_match = bool(np.array_equal(np.isnan(a), np.isnan(d))
                           and np.array_equal(np.where(np.isinf(d), d, 0),
                                              np.where(np.isinf(a), a, 0))
                           and np.array_equal(np.isfinite(a), fin_d))
    if a.size == 0 or not fin_d.any():
        return ErrorStats(0.0, 0.0, None, nonfinite_match, 1.0)
    scale = max(1.0, float(np.abs(d[fin_d]).max()))
    with np.errstate(invalid="ignore"):
        err = np.where(fin_d, np.abs(a - d), 0.0)
    err = np.where(np.isnan(err), np.inf, err)  # a NaN where the reference is finite is infinite error
    rel = err / np.maximum(np.abs(d), np.finfo(np.float64).tiny)
    rel = np.where(fin_d, rel, 0.0)
    # "worst" = the element furthest beyond a unit mixed tolerance (err / (scale + |ref|))
    worst = np.unravel_index(int(np.argmax(err / (scale + np.abs(np.where(fin_d, d, 0))))), a.shape)
    return ErrorStats(float(err.max()), float(rel.max()), tuple(int(i) for i in worst),
                      nonfinite_match, scale)


def assert_close(actual, desired, *, dtype=None, rtol=None, atol=None, name: str = "",
                 context: str = "") -> ErrorStats:
    """Assert ``|actual - desired| <= atol * scale + rtol * |desired|`` elementwise, with NaN and
    ±Inf exactly where ``desired`` has them.

    ``dtype`` picks the default tolerances (default: ``actual``'s dtype).  ``scale`` is
    ``max(1, max |desired|)``.  Returns the :class:`ErrorStats`; raises ``AssertionError`` with
    dtype, shape, max abs/rel error and the worst index otherwise.
    """
    dt = np.dtype(dtype) if dtype is not None else np.asarray(actual).dtype
    if dt not in _TOLERANCES:
        dt = np.dtype(np.float64)
    r0, a0 = _TOLERANCES[dt]
    rtol = r0 if rtol is None else rtol
    atol = a0 if atol is None else atol
    st = error_stats(actual, desired)
    a = np.asarray(actual, dtype=np.float64)
    d = np.asarray(desired, dtype=np.float64)
    fin = np.isfinite(d)
    with np.errstate(invalid="ignore"):
        bad = fin & ~(np.abs(a - d) <= atol * st.scale + rtol * np.abs(d))
    if st.nonfinite_match and not bad.any():
        return st
    label = f"{name}: " if name else ""
    where = tuple(int(i) for i in np.argwhere(bad)[0]) if bad.any() else st.where
    msg = (f"{label}not close ({context}) dtype={dt}, shape={np.shape(desired)}: "
           f"max abs err {st.max_abs:.3e}, max rel err {st.max_rel:.3e}, "
           f"{int(bad.sum())} elements beyond rtol={rtol:g}, atol={atol:g}*scale({st.scale:.3g})")
    if where is not None and a.size:
        msg += f"; first at {where}: actual {a[where]!r}, desired {d[where]!r}"
    if not st.nonfinite_match:
        msg += "; NaN/Inf positions differ from the reference"
    raise AssertionError(msg)


def gradcheck(fn, inputs, grads, dy, *, h: float = 1e-6, rtol: float = 1e-5,
              atol: float = 1e-6, max_elements: int | None = 200, seed: int = 0,
              names=None) -> None:
    """Check analytic gradients against central finite differences of ``L = sum(fn(*inputs) * dy)``.

    Parameters
    ----------
    fn : callable
        Takes ``inputs`` (float64 arrays or None) and returns one array (the forward output).
    inputs : sequence of ndarray or None
        Evaluated in float64; None entries are passed through and skipped.
    grads : sequence of ndarray or None
        Analytic ``dL/dinput`` for each input (None to skip).
    dy : ndarray
        Upstream gradient (the weights of the scalar loss).
    max_elements : int or None
        Check at most this many randomly chosen elements per input (None: all).

    Raises ``AssertionError`` naming the input, the index and both values.
    """
    inputs = [None if a is None else np.array(a, dtype=np.float64) for a in inputs]
    dy = np.asarray(dy, dtype=np.float64)
    rng = np.random.default_rng(seed)
    names = names or [f"input {i}" for i in range(len(inputs))]

    def loss():
        return float(np.sum(np.asarray(fn(*inputs), dtype=np.float64) * dy))

    for k, (a, g) in enumerate(zip(inputs, grads)):
        if a is None or g is None:
            continue
        g = np.asarray(g, dtype=np.float64)
        if g.shape != a.shape:
            raise AssertionError(f"{names[k]}: gradient shape {g.shape} != input shape {a.shape}")
        flat = a.reshape(-1)
        idx = np.arange(flat.size)
        if max_elements is not None and flat.size > max_elements:
            idx = rng.choice(flat.size, size=max_elements, replace=False)
        for i in idx:
            old = flat[i]
            step = h * max(1.0, abs(old))
            flat[i] = old + step
            lp = loss()
            flat[i] = old - step
            lm = loss()
            flat[i] = old
            num = (lp - lm) / (2 * step)
            ana = float(g.reshape(-1)[i])
            if not abs(num - ana) <= atol + rtol * max(abs(num), abs(ana)):
                where = np.unravel_index(int(i), a.shape)
                raise AssertionError(f"gradcheck failed for {names[k]} at {where}: analytic "
                                     f"{ana!r}, finite difference {num!r} "
                                     f"(|diff| {abs(num - ana):.3e})")


def __getattr__(name):
    # The comparison helpers live in normffn.compare (they import the ops); re-exported here so
    # users' comparison scripts need only ``normffn.testing``.
    if name in ("documented_tolerance", "compare_outputs", "run_comparison", "ComparisonRow",
                "format_rows", "INPUT_KINDS"):
        from . import compare
        return getattr(compare, name)
    raise AttributeError(f"module 'normffn.testing' has no attribute {name!r}")
