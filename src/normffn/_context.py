"""The base of every op's context (``LayerNormContext``, ``BatchNormContext``, ``FFNContext`` …).

A context is what a forward pass hands its backward: the saved input, the parameters and the
statistics.  It is a frozen dataclass whose public fields users may read (``ctx.mean``,
``ctx.rstd``, ``ctx.dead_units``).  Because a context can be built or altered by hand, backward
re-checks it before any kernel sees it; that check is written once, here, driven by the
``_fields`` table each subclass declares:

    _fields = (Field("x", kind="input"), Field("mean", kind="float64", shape=lead), ...)

``Context.validate()`` walks the table and raises ``ValueError`` naming the field and what was
expected.  Subclasses add only what a table cannot say (cross-field rules) in ``_extra_checks``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np

from . import _checks

__all__ = ["Context", "Field"]

_FLOAT64 = np.dtype(np.float64)
_BOOL = np.dtype(np.bool_)


@dataclass(frozen=True)
class Field:
    """One field of a context and what it must hold.

    kind
        ``"input"``: the saved forward input — a float32/float64 ndarray, C-contiguous unless
        ``layout`` accepts more.  ``"like_x"``: an ndarray of x's dtype.  ``"float64"``: a float64
        ndarray.  ``"bool_array"``: a bool ndarray.  ``"bool"``: a Python/NumPy bool.
    shape
        ``None`` (any), or a function of the context returning the expected shape.
    optional
        ``None`` is allowed.
    layout
        ``"C"`` (C-contiguous), ``"blas"`` (rows or columns contiguous, as BLAS reads them), or
        a function of the array returning True when its layout is acceptable.
    """

    name: str
    kind: str
    shape: Callable | None = None
    optional: bool = False
    layout: object = "C"


def _layout_ok(a: np.ndarray, layout) -> bool:
    if layout == "C":
        return a.flags.c_contiguous
    if layout == "blas":
        return a.ndim == 2 and _checks.blas_layout(a)
    return bool(layout(a))


@dataclass(frozen=True, eq=False)
class Context:
    """Base class of the op contexts: one validator for all of them (see the module doc).

    A context is a frozen dataclass; its public fields (``ctx.mean``, ``ctx.rstd``,
    ``ctx.dead_units``, ...) may be read freely.  Backward calls :meth:`validate` before any
    kernel sees the context, so a context built or altered by hand cannot crash a kernel.
    """

    _op: ClassVar[str] = ""
    _fields: ClassVar[tuple] = ()

    @classmethod
    def _build(cls, fields: dict):
        """The context ``cls(**fields)`` (``fields``, a fresh dict naming every field, becomes
        its ``__dict__``), built without the frozen dataclass's per-field
        ``object.__setattr__``: a forward's hot path."""
        ctx = object.__new__(cls)
        object.__setattr__(ctx, "__dict__", fields)
        return ctx

    def _valid_fast(self) -> int:
        """Nonzero only if :meth:`validate` would pass, decided without formatting anything (a
        subclass's check of the common case: exact ndarrays of the expected dtype objects,
        shapes and layouts); the row norms return 2 when every array also owns its memory (their
        backward's ``out=`` fast path then skips the overlap test).  0 sends :meth:`validate`
        down the general path, which raises or passes as it always did.  Default: 0."""
        return 0

    @property
    def shape(self) -> tuple:
        """Shape of the forward input (and of the output, dy and dx)."""
        return self.x.shape

    @property
    def dtype(self) -> np.dtype:
        return self.x.dtype

    def validate(self) -> None:
        """Raise ``ValueError`` unless every field holds what its op's backward may trust.

        On the hot path (a context as its forward built it) this costs a few attribute reads per
        field; messages are only formatted when a check fails.

        Returns
        -------
        None

        Raises
        ------
        ValueError
            A field of the wrong type, dtype, shape or memory layout, or an inconsistent context;
            the message names the field and what was expected.

        Examples
        --------
        >>> import dataclasses
        >>> import numpy as np
        >>> import normffn
        >>> _, ctx = normffn.layer_norm_forward(np.ones((2, 3)), 3)
        >>> ctx.validate()
        >>> bad = dataclasses.replace(ctx, rstd=np.ones(5))
        >>> bad.validate()
        Traceback (most recent call last):
        ...
        ValueError: ctx.rstd has shape (5,), expected (2,)
        """
        if self._valid_fast():
            return
        x = getattr(self, "x", None)
        for f in self._fields:
            a = getattr(self, f.name)
            if a is None:
                if f.optional:
                    continue
                raise ValueError(f"ctx.{f.name} is None; it must hold what {self._op}_forward "
                                 "saved")
            if f.kind == "bool":
                if not isinstance(a, (bool, np.bool_)):
                    raise ValueError(f"ctx.{f.name} must be a bool, got {type(a).__name__}")
                continue
            if type(a) is not np.ndarray and not isinstance(a, np.ndarray):
                raise ValueError(f"ctx.{f.name} must be a numpy.ndarray, got "
                                 f"{type(a).__name__}")
            dt = a.dtype
            kind = f.kind
            if kind == "input":
                ok = dt in _checks.FLOAT_DTYPES
            elif kind == "like_x":
                ok = dt == x.dtype
            elif kind == "float64":
                ok = dt == _FLOAT64
            elif kind == "bool_array":
                ok = dt == _BOOL
            else:  # pragma: no cover - a wrong table is a programming error
                raise AssertionError(f"unknown field kind {kind!r}")
            if not ok:
                expected = {"input": "float32 or float64", "like_x": str(x.dtype),
                            "float64": "float64", "bool_array": "bool"}[kind]
                raise ValueError(f"ctx.{f.name} has dtype {dt}, expected {expected}")
            if f.shape is not None:
                shape = tuple(f.shape(self))
                if a.shape != shape:
                    raise ValueError(f"ctx.{f.name} has shape {a.shape}, expected {shape}")
            if not (a.flags.c_contiguous if f.layout == "C" else _layout_ok(a, f.layout)):
                raise ValueError(f"ctx.{f.name} is not in the memory layout {self._op}_forward "
                                 "saved it in")
        self._extra_checks()

    def _extra_checks(self) -> None:
        """Cross-field rules a subclass cannot express in ``_fields`` (default: none)."""
