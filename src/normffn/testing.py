"""Comparison helpers for tests and for users' own numerical comparison scripts.

- :func:`tolerance` — the documented per-dtype accuracy normffn promises against the float64
  reference.
- :func:`error_stats` — max abs / max rel error of one array against a reference, and where.
- :func:`assert_close` — dtype-aware comparison with a failure message that says dtype, shape,
  the max abs/rel error and where it occurred; NaN/Inf must sit exactly where the reference
  puts them.
- :func:`gradcheck` — central finite differences in float64 against analytic gradients.
- :func:`compare_outputs` and :class:`ComparisonRow` — one output of one library against the
  reference, judged against a tolerance (what ``python -m normffn compare`` prints).
- :func:`run_comparison`, :func:`documented_tolerance` — the machinery of
  ``python -m normffn compare`` (in :mod:`normffn.compare` and the op registry), re-exported
  here lazily for your own scripts.

This module imports nothing from normffn at import time (the registry and ``compare`` import
it, not the other way round).
"""
from __future__ import annotations

import math
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
    """The per-dtype accuracy normffn promises against the float64 reference.

    An output passes when ``|actual - reference| <= atol * scale + rtol * |reference|``
    elementwise, with ``scale = max(1, max |reference|)`` over the finite values (see
    :func:`assert_close`).  float32 kernels compute in float32 with float64 reductions, so the
    promise is a few float32 ulps of the output's scale.  Some ops widen it
    (:func:`documented_tolerance`: GEMM outputs in float32, sums over many rows, badly
    conditioned data).

    Parameters
    ----------
    dtype : dtype-like
        float32 or float64.

    Returns
    -------
    rtol, atol : float
        ``atol`` is multiplied by ``scale``.

    Raises
    ------
    KeyError
        A dtype other than float32 and float64.

    Examples
    --------
    >>> import numpy as np
    >>> from normffn.testing import tolerance
    >>> tolerance(np.float32)
    (2e-05, 2e-05)
    >>> tolerance("float64")
    (1e-11, 1e-11)
    """
    return _TOLERANCES[np.dtype(dtype)]


@dataclass(frozen=True)
class ErrorStats:
    """Errors of ``actual`` against ``desired`` over the positions where ``desired`` is finite.

    Returned by :func:`error_stats` and :func:`assert_close`.

    Attributes
    ----------
    max_abs : float
        Largest ``|actual - desired|``.
    max_rel : float
        ``max_abs`` relative to the output's scale (``max |desired|`` over finite values), so
        elements near zero do not dominate it.
    where : tuple of int or None
        Index of the worst element (against the mixed tolerance); None when nothing was compared.
    nonfinite_match : bool
        NaN and ±Inf sit exactly where ``desired`` has them.
    scale : float
        ``max(1, max |desired|)``, the factor atol is multiplied by.
    n_finite : int
        How many positions were compared (0: both are all NaN/Inf, and the errors mean nothing).

    Examples
    --------
    >>> from normffn.testing import error_stats
    >>> st = error_stats([float("nan"), 1.0], [float("nan"), 1.5])
    >>> st.max_abs, st.nonfinite_match, st.n_finite
    (0.5, True, 1)
    """

    max_abs: float
    max_rel: float
    where: tuple | None
    nonfinite_match: bool
    scale: float
    n_finite: int = -1


def _nonfinite_match(a, d) -> bool:
    return bool(np.array_equal(np.isnan(a), np.isnan(d))
                and np.array_equal(np.where(np.isinf(d), d, 0), np.where(np.isinf(a), a, 0))
                and np.array_equal(np.isfinite(a), np.isfinite(d)))


def error_stats(actual, desired) -> ErrorStats:
    """Errors of ``actual`` against ``desired``, both converted to float64.

    Parameters
    ----------
    actual, desired : array_like
        Of the same shape.

    Returns
    -------
    ErrorStats
        Max abs error, max error relative to the output's scale, where, and whether NaN/Inf
        match.

    Raises
    ------
    AssertionError
        The shapes differ.

    See Also
    --------
    assert_close

    Examples
    --------
    >>> st = error_stats([1.0, 2.0, 4.001], [1.0, 2.0, 4.0])
    >>> round(st.max_abs, 6), round(st.max_rel, 6), st.where
    (0.001, 0.00025, (2,))
    """
    a = np.asarray(actual, dtype=np.float64)
    d = np.asarray(desired, dtype=np.float64)
    if a.shape != d.shape:
        raise AssertionError(f"shape mismatch: actual {a.shape}, desired {d.shape}")
    fin_d = np.isfinite(d)
    match = _nonfinite_match(a, d)
    n_fin = int(fin_d.sum())
    if a.size == 0 or not n_fin:
        return ErrorStats(0.0, 0.0, None, match, 1.0, n_fin)
    mag = float(np.abs(d[fin_d]).max())
    scale = max(1.0, mag)
    with np.errstate(invalid="ignore"):
        err = np.where(fin_d, np.abs(a - d), 0.0)
    err = np.where(np.isnan(err), np.inf, err)  # NaN where the reference is finite: infinite error
    max_abs = float(err.max())
    max_rel = max_abs / mag if mag > 0 else (0.0 if max_abs == 0 else math.inf)
    # "worst" = the element furthest beyond a unit mixed tolerance (err / (scale + |ref|))
    worst = np.unravel_index(int(np.argmax(err / (scale + np.abs(np.where(fin_d, d, 0))))),
                             a.shape)
    return ErrorStats(max_abs, max_rel, tuple(int(i) for i in worst), match, scale, n_fin)


def _within(a, d, st: ErrorStats, rtol: float, atol: float):
    """Boolean mask of finite reference positions outside the tolerance."""
    fin = np.isfinite(d)
    with np.errstate(invalid="ignore"):
        return fin & ~(np.abs(a - d) <= atol * st.scale + rtol * np.abs(d))


def _fmt_index(idx) -> str:
    return "[" + ", ".join(str(int(i)) for i in idx) + "]"


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(int(i)) for i in shape) + ("," if len(shape) == 1 else "") + ")"


def assert_close(actual, desired, *, dtype=None, rtol=None, atol=None, name: str = "",
                 context: str = "") -> ErrorStats:
    """Assert that ``actual`` matches ``desired`` within normffn's documented tolerance.

    Elementwise ``|actual - desired| <= atol * scale + rtol * |desired|`` with
    ``scale = max(1, max |desired|)``, and NaN and ±Inf exactly where ``desired`` has them.

    Parameters
    ----------
    actual, desired : array_like
        Of the same shape; ``desired`` is usually a :mod:`normffn.reference` result.
    dtype : dtype-like, optional
        Picks the default tolerances (:func:`tolerance`); default: ``actual``'s dtype
        (float64 for anything else).
    rtol, atol : float, optional
        Override the defaults.
    name : str
        Prefix of the failure message (e.g. the output's name).
    context : str
        Appended to the failure message in parentheses (e.g. the input kind).

    Returns
    -------
    ErrorStats
        The errors, when the check passes.

    Raises
    ------
    AssertionError
        Outside the tolerance, or NaN/Inf in other places: the message gives the dtype, the
        shape, the max abs/rel error, how many elements fail and the first failing index with
        both values.

    See Also
    --------
    error_stats, tolerance, documented_tolerance

    Examples
    --------
    >>> import numpy as np
    >>> assert_close(np.float32([1, 2]), np.array([1.0, 2.0])).max_abs
    0.0
    >>> assert_close(np.float32([1, 2.1]), np.array([1.0, 2.0]), name="y")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    AssertionError: y: not close: float32, shape (2,): max abs err 1.000e-01, ...

    Checking an op against its float64 reference:

    >>> import normffn
    >>> from normffn import reference
    >>> x = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    >>> st = assert_close(normffn.layer_norm(x, 32), reference.layer_norm(x, 32), name="y")
    >>> st.nonfinite_match, bool(st.max_abs < 1e-5)
    (True, True)
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
    bad = _within(a, d, st, rtol, atol)
    if st.nonfinite_match and not bad.any():
        return st
    label = f"{name}: " if name else ""
    ctx = f" ({context})" if context else ""
    where = tuple(int(i) for i in np.argwhere(bad)[0]) if bad.any() else st.where
    msg = (f"{label}not close{ctx}: {dt.name}, shape {_fmt_shape(np.shape(desired))}: "
           f"max abs err {st.max_abs:.3e}, max rel err {st.max_rel:.3e} (of max |desired|), "
           f"{int(bad.sum())} elements beyond rtol={rtol:g}, atol={atol:g} x scale "
           f"{st.scale:.3g}")
    if where is not None and a.size:
        at = _fmt_index(where) if where else "the value"
        msg += f"; first at {at}: actual {float(a[where])!r}, desired {float(d[where])!r}"
    if not st.nonfinite_match:
        diff = np.argwhere(~((np.isnan(a) & np.isnan(d)) | (a == d) | (np.isfinite(a) &
                                                                       np.isfinite(d))))
        msg += "; NaN/Inf positions differ from the reference"
        if diff.size and tuple(int(v) for v in diff[0]) != where:
            i = tuple(int(v) for v in diff[0])
            msg += (f" (first at {_fmt_index(i) if i else 'the value'}: actual "
                    f"{float(a[i])!r}, desired {float(d[i])!r})")
    raise AssertionError(msg)


@dataclass
class ComparisonRow:
    """One output of one library compared with the reference: a line of ``compare``.

    Attributes
    ----------
    op : str
        The op, with its variant (``batch_norm[train]``, ``ffn[gelu]``).
    entry : str
        ``"forward"`` or ``"backward"``.
    inputs : str
        The kind of input data (a key of :data:`normffn.compare.INPUT_KINDS`).
    dtype : str
        ``"float32"`` or ``"float64"``.
    output : str
        The output's name (``y``, ``mean``, ``rstd``, ``dx``, ``dweight``, ...).
    provider : str
        ``"normffn"`` or ``"torch"``.
    max_abs : float
        Max ``|out - reference|``.
    max_rel : float
        ``max_abs / max |reference|`` (the output's scale).
    nonfinite_match : bool
        NaN/Inf where the reference has them.
    within_tolerance : bool or None
        None for providers normffn makes no promise about.
    rtol, atol : float
        The tolerance applied (atol multiplied by ``max(1, max |reference|)``).
    n_finite : int
        Finite reference values compared (0: all NaN/Inf).
    n_nonfinite : int
        NaN/Inf values in the reference.
    """

    op: str
    entry: str            # "forward" or "backward"
    inputs: str           # kind of input data
    dtype: str
    output: str
    provider: str         # "normffn" or "torch"
    max_abs: float
    max_rel: float        # max_abs / max |reference| (the output's scale)
    nonfinite_match: bool
    within_tolerance: bool | None   # None for providers we make no promise about
    rtol: float = 0.0
    atol: float = 0.0               # multiplied by max(1, max |reference|)
    n_finite: int = -1              # finite reference values compared (0: all NaN/Inf)
    n_nonfinite: int = 0            # NaN/Inf values in the reference


def compare_outputs(op: str, entry: str, inputs: str, dtype, provider: str, outputs: dict,
                    reference: dict, rows: int = 1, check: bool = True,
                    condition: float = 1.0, tolerances=None) -> list[ComparisonRow]:
    """Compare the outputs of one library with the reference, one row per output.

    Parameters
    ----------
    op : str
        The op's registry name (``"layer_norm"``, ...), for the default tolerances.
    entry : str
        ``"forward"`` or ``"backward"``.
    inputs : str
        The kind of input data (a label for the rows).
    dtype : dtype-like
        The inputs' dtype.
    provider : str
        The library's name.
    outputs, reference : dict
        Output name -> array, of the library and of the reference.  Only names present in both
        are compared.
    rows : int
        Rows summed by the row-sum outputs (dweight, dbias, ...): their atol grows like
        ``sqrt(rows)``.
    check : bool
        Judge the outputs against the tolerance (normffn's promise); else
        ``within_tolerance`` is None.
    condition : float
        ``max |mean| / std`` of the data (large offsets widen atol).
    tolerances : callable, optional
        ``f(output_name) -> (rtol, atol)``; default: :func:`documented_tolerance` of the op.

    Returns
    -------
    list of ComparisonRow

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> from normffn import reference
    >>> from normffn.testing import compare_outputs
    >>> x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    >>> y, ctx = normffn.layer_norm_forward(x, 16)
    >>> y_r, ctx_r = reference.layer_norm_forward(x, 16)
    >>> rows = compare_outputs("layer_norm", "forward", "normal", np.float32, "normffn",
    ...                        {"y": y, "rstd": ctx.rstd}, {"y": y_r, "rstd": ctx_r.rstd})
    >>> [(r.output, r.within_tolerance) for r in rows]
    [('y', True), ('rstd', True)]
    """
    if tolerances is None:
        from ._ops import documented_tolerance

        def tolerances(name):
            return documented_tolerance(op, name, dtype, rows, condition)
    out = []
    for name, desired in reference.items():
        actual = outputs.get(name)
        if actual is None or desired is None:
            continue
        st = error_stats(actual, desired)
        rtol, atol = tolerances(name)
        ok = None
        if check:
            a = np.asarray(actual, dtype=np.float64)
            d = np.asarray(desired, dtype=np.float64)
            ok = bool(st.nonfinite_match and not _within(a, d, st, rtol, atol).any())
        n_bad = int(np.size(desired) - st.n_finite)
        out.append(ComparisonRow(op, entry, inputs, np.dtype(dtype).name, name, provider,
                                 st.max_abs, st.max_rel, st.nonfinite_match, ok, rtol, atol,
                                 st.n_finite, n_bad))
    return out


def gradcheck(fn, inputs, grads, dy, *, h: float = 1e-6, rtol: float = 1e-5,
              atol: float = 1e-6, max_elements: int | None = 200, seed: int = 0,
              names=None) -> None:
    """Check analytic gradients against central finite differences.

    The scalar loss is ``L = sum(fn(*inputs) * dy)``, evaluated in float64; each checked element
    is perturbed by ``h * max(1, |value|)`` both ways.

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
    h : float
        Relative step.
    rtol, atol : float
        Pass when ``|numeric - analytic| <= atol + rtol * max(|numeric|, |analytic|)``.
    max_elements : int or None
        Check at most this many randomly chosen elements per input (None: all).
    seed : int
        Seed of that choice.
    names : sequence of str, optional
        Names of the inputs in failure messages.

    Returns
    -------
    None

    Raises
    ------
    AssertionError
        A gradient of the wrong shape, or an element outside the tolerance: the message names
        the input, the index and both values.

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> from normffn.testing import gradcheck
    >>> rng = np.random.default_rng(0)
    >>> x, w = rng.standard_normal((3, 5)), rng.standard_normal(5)
    >>> dy = rng.standard_normal((3, 5))
    >>> _, ctx = normffn.layer_norm_forward(x, 5, w)
    >>> dx, dw, _ = normffn.layer_norm_backward(dy, ctx)
    >>> gradcheck(lambda x, w: normffn.layer_norm(x, 5, w), [x, w], [dx, dw], dy,
    ...           names=["x", "weight"])
    >>> gradcheck(lambda x, w: normffn.layer_norm(x, 5, w), [x, w], [dx, 2 * dw], dy,
    ...           names=["x", "weight"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    AssertionError: gradcheck failed for weight at ...
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
    # Re-exported lazily (they import the ops): documented_tolerance from the op registry,
    # run_comparison from normffn.compare; so users' comparison scripts need only this module.
    if name == "documented_tolerance":
        from ._ops import documented_tolerance
        return documented_tolerance
    if name in ("run_comparison", "format_rows", "INPUT_KINDS"):
        from . import compare
        return getattr(compare, name)
    raise AttributeError(f"module 'normffn.testing' has no attribute {name!r}")
