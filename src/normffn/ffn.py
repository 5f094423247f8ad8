"""Fused feed-forward block: ``y = act(x @ w1 + b1) @ w2 + b2``, forward and backward.

The transformer's position-wise FFN (``nn.Linear -> activation -> nn.Linear``) as one op, with
plain activations (relu, gelu, gelu_tanh, silu) or gated ones (swiglu, geglu, reglu).

Gated activations take a packed first weight ``w1`` of shape ``(d, 2h)``: its first h columns
are the gate, its last h the linear ("up") half, as Transformer Engine packs them; ``b1`` is
``(2h,)`` or None and ``w2`` is ``(h, d)``::

    hidden = act(x @ w1[:, :h] + b1[:h]) * (x @ w1[:, h:] + b1[h:]),   y = hidden @ w2 + b2

with act = silu (swiglu), gelu (erf; geglu) or relu (reglu).  :func:`pack_gated` builds w1 from
separate gate and up matrices (LLaMA's w1 and w3, Hugging Face's gate_proj and up_proj).  Rows
go through in blocks so the block of the hidden activation stays in cache between its two GEMMs;
bias, activation and (backward) the activation's derivative are applied to the block while it is
hot.  GEMMs are scipy's BLAS (sgemm/dgemm); weights are read in place, C- or F-ordered.

Layers (the same in every op module):

* ``check_forward`` / ``check_backward`` validate the public arguments (through ``_checks``) and
  return what the run layer needs: C-contiguous 2-D ``(n, d)`` views, normalised ``needs``.
* ``run_forward`` / ``run_backward`` trust their arguments: they pick the row blocks, take
  scratch from ``_workspace``, allocate the outputs not passed in and call the kernel.  Fused ops
  (``ffn_block``) call them directly on ``(n, d)`` row blocks.
* ``ffn``, ``ffn_forward``, ``ffn_backward`` compose the two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import _blas, _checks, _tuning
from ._checks import F32, F64, INT32_MAX
from ._context import Context, Field
from ._kernels import ffn as _kernel
from ._workspace import workspace

__all__ = ["FFNContext", "ffn", "ffn_forward", "ffn_backward", "pack_gated"]

# The names `activation` accepts, and their kernel codes (kernels/ffn_elementwise.h).
_CODES = dict(_kernel.ACTIVATION_CODES)
ACTIVATIONS = tuple(_CODES)
GATED = tuple(_kernel.GATED)
# Activations whose forward in training flags dead units (ctx.dead_units; reglu: its gate).
_DEAD_UNITS = ("relu", "reglu")
GRAD_NAMES = ("dx", "dw1", "db1", "dw2", "db2")

# ---------------------------------------------------------------- tuning
# Bytes of hidden activation per row block (float32, 2 threads, vs bare GEMMs; docs/tuning.md).
# Training: half the last-level cache within [16, 64] MB, so a block stays cached between its
# GEMMs (32 MiB L3: 16 MB, 92% at 8192x512x2048; 480 MiB L3: 64 MB, fwd+bwd 11-17% faster than 16)
_BLOCK_BYTES = min(64 << 20, max(16 << 20, _tuning.l3_bytes() // 2))
_INFERENCE_BLOCK_BYTES = 32 << 20    # ffn(): 94-95% of the bare GEMMs, 92% at 16 MB; 64 MB alike
_RECOMPUTE_BLOCK_BYTES = 8 << 20     # recompute=True saves memory; its backward holds two blocks
_MIN_BLOCK_ROWS = 256                # OpenBLAS re-packs the weight per call: 10-25% lost below


def _block_rows(n: int, h: int, itemsize: int, budget: int) -> int:
    """Rows per block: about ``budget`` bytes of hidden activation, split evenly over
    ceil(n / rows) blocks (no ragged last block)."""
    blk = max(_MIN_BLOCK_ROWS, budget // (h * itemsize))
    if n <= blk:
        return max(n, 1)
    nb = -(-n // blk)
    return -(-n // nb)


# ---------------------------------------------------------------- context
def _d(ctx) -> int:
    return ctx.x.shape[-1]


def _hw(ctx):
    """w1's width (h for a plain activation)."""
    w1 = ctx.w1
    return w1.shape[1] if w1.ndim == 2 else "h"


def _units(ctx):
    """The hidden units h: w1's width, halved for a gated activation."""
    hw = _hw(ctx)
    return hw // 2 if ctx.activation in GATED and isinstance(hw, int) else hw


def _rows(ctx) -> int:
    return math.prod(ctx.x.shape[:-1])


@dataclass(frozen=True, eq=False)
class FFNContext(Context):
    """What :func:`ffn_backward` needs; returned by :func:`ffn_forward`.

    The ReLU mask is derived from the saved hidden (``a > 0``; more exactly, the gradient passes
    unless ``a <= 0``, as in PyTorch's ``threshold_backward``) rather than kept as bits: the saved
    ``a`` is needed anyway for ``dw2 = a^T @ dy``, so the mask costs no memory and no extra pass —
    the comparison is fused into the pass that applies it.

    Attributes
    ----------
    x : ndarray of shape (..., d)
        C-contiguous (the forward input, copied only if it was not).
    w1 : ndarray of shape (d, h), gated (d, 2h)
        The forward's first weight as given (C- or F-ordered weights are kept as they are).
    b1 : ndarray of shape (h,) or (2h,), or None
        The first bias.
    w2 : ndarray of shape (h, d)
        The second weight as given.
    b2 : ndarray of shape (d,) or None
        The second bias.
    activation : str
        The activation's name.
    recompute : bool
        Whether the forward kept the hidden (False) or backward recomputes it (True).
    hidden : ndarray of shape (n, h), gated (n, 2h), or None
        ``n = prod(x.shape[:-1])``.  For ``"relu"`` the activation ``a = relu(x @ w1 + b1)``
        (its positive entries are the mask backward needs); for the other activations the
        pre-activation ``v = x @ w1 + b1`` (gated: the packed [gate | up]; their derivative
        needs ``v``, and ``a`` is recomputed from it block by block).  None with
        ``recompute=True``: backward recomputes ``v``.  Pass it as ``hidden_out=`` to the next
        :func:`ffn_forward` to reuse the buffer.
    dead_units : ndarray of shape (h,), bool, or None
        For ``"relu"``: True where the unit's output was 0 for every row of the batch (the
        dead-ReLU diagnostic; vacuously True when the batch has no rows); for ``"reglu"`` the
        same of the gate, ``relu(x @ w1[:, :h] + b1[:h])``.  None otherwise.

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> x = np.ones((4, 2))
    >>> w1 = np.array([[1.0, -1.0, 0.5], [1.0, -1.0, 0.5]])       # unit 1 is never positive
    >>> y, ctx = normffn.ffn_forward(x, w1, None, np.ones((3, 2)), None)
    >>> ctx.dead_units.tolist(), ctx.hidden.shape
    ([False, True, False], (4, 3))
    """

    x: np.ndarray
    w1: np.ndarray
    b1: np.ndarray | None
    w2: np.ndarray
    b2: np.ndarray | None
    activation: str
    recompute: bool
    hidden: np.ndarray | None
    dead_units: np.ndarray | None

    _op = "ffn"
    _fields = (
        Field("x", "input", shape=lambda c: c.x.shape if c.x.ndim >= 1 else ("...", "d")),
        Field("w1", "like_x", shape=lambda c: (_d(c), _hw(c)), layout="blas"),
        Field("b1", "like_x", shape=lambda c: (_hw(c),), optional=True),
        Field("w2", "like_x", shape=lambda c: (_units(c), _d(c)), layout="blas"),
        Field("b2", "like_x", shape=lambda c: (_d(c),), optional=True),
        Field("recompute", "bool"),
        Field("hidden", "like_x", shape=lambda c: (_rows(c), _hw(c)), optional=True),
    )

    def _valid_fast(self) -> bool:
        """The common case of :meth:`validate` (see ``Context._valid_fast``): exact ndarrays of
        x's dtype object, the table's shapes and layouts and the cross-field rules."""
        x, w1, w2, act, rec, hidden = (self.x, self.w1, self.w2, self.activation,
                                       self.recompute, self.hidden)
        if type(x) is not np.ndarray or type(w1) is not np.ndarray or \
                type(w2) is not np.ndarray or type(act) is not str or type(rec) is not bool:
            return False
        dt, xs = x.dtype, x.shape
        if (dt is not F32 and dt is not F64) or w1.dtype is not dt or w2.dtype is not dt or \
                not xs or w1.ndim != 2 or act not in _CODES or rec is not (hidden is None):
            return False
        d = xs[-1]
        d1, hw = w1.shape
        gated = act in GATED
        if d1 != d or hw < 1 or (gated and hw % 2) or d > INT32_MAX or hw > INT32_MAX or \
                w2.shape != ((hw // 2 if gated else hw), d) or not x.flags.c_contiguous or \
                not _checks.blas_layout(w1) or not _checks.blas_layout(w2):
            return False
        for a, shape in ((self.b1, (hw,)), (self.b2, (d,))):
            if a is not None and (type(a) is not np.ndarray or a.dtype is not dt or
                                  a.shape != shape or not a.flags.c_contiguous):
                return False
        if hidden is not None:
            rows = xs[0] if len(xs) == 2 else math.prod(xs[:-1])
            if type(hidden) is not np.ndarray or hidden.dtype is not dt or \
                    hidden.shape != (rows, hw) or not hidden.flags.c_contiguous:
                return False
        return True

    def _extra_checks(self) -> None:
        if not isinstance(self.activation, str) or self.activation not in _CODES:
            raise ValueError(f"ctx.activation must be one of {sorted(_CODES)}")
        if self.w1.shape[1] < 1:
            raise ValueError("ctx.w1 must have at least one column (h >= 1)")
        if self.activation in GATED and self.w1.shape[1] % 2:
            raise ValueError(f"ctx.w1 has shape {self.w1.shape}: a gated activation needs "
                             "(d, 2h)")
        if self.recompute and self.hidden is not None:
            raise ValueError("ctx.hidden must be None when ctx.recompute is True")
        if not self.recompute and self.hidden is None:
            raise ValueError("ctx.hidden is None; it must hold what ffn_forward saved "
                             "(recompute=False)")
        if _d(self) > _checks.INT32_MAX or self.w1.shape[1] > _checks.INT32_MAX:
            raise ValueError("ctx is inconsistent: d or h too large for BLAS")


# ---------------------------------------------------------------- check layer
class FFNArgs(NamedTuple):
    """Checked forward arguments, as :func:`check_forward` returns them."""
    x: np.ndarray                 # x's shape, C-contiguous (copied only if x was not)
    x2: np.ndarray                # the same data as (n, d)
    w1: np.ndarray                # (d, h), gated (d, 2h); rows or columns contiguous
    b1: np.ndarray | None         # (h,), gated (2h,)
    w2: np.ndarray                # (h, d), rows or columns contiguous
    b2: np.ndarray | None
    activation: str
    recompute: bool
    out: np.ndarray | None        # validated y buffer, x's shape, or None
    hidden_out: np.ndarray | None  # validated (n, w1.shape[1]) buffer, or None
    n: int
    d: int
    h: int                        # hidden units (w2.shape[0])


def _activation(activation) -> str:
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str, one of {sorted(_CODES)}, got "
                        f"{type(activation).__name__}")
    if activation not in _CODES:
        raise ValueError(f"activation must be one of {sorted(_CODES)}, got {activation!r}")
    return activation


def _weight(w, name: str, dtype: np.dtype, expected) -> np.ndarray:
    w = _checks.float_array(w, name)
    _checks.same_dtype(dtype, name, w)
    if w.ndim != 2:
        if not isinstance(expected, str):       # w2's (h, d), formatted only for the message
            expected = f"(h, d) = {expected}"
        raise ValueError(f"{name} must be 2-D of shape {expected}, got shape {w.shape}")
    return w


def check_forward(x, w1, b1, w2, b2, activation="relu", *, recompute=False, out=None,
                  hidden_out=None) -> FFNArgs:
    """Validate the forward's arguments (see :func:`ffn_forward` for what raises).

    Weights are left in their layout when BLAS can read it (C- or F-ordered), biases made
    C-contiguous; ``out`` (x's shape) and ``hidden_out`` ((n, h), only with recompute False) are
    checked but not allocated.  x is copied to C order last, after every check passed."""
    x = _checks.float_array(x, "x")
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension (..., d), got a 0-d array")
    dtype = x.dtype
    d = x.shape[-1]
    if d == 0:
        raise ValueError(f"x has shape {x.shape}: its last dim d must be >= 1")
    activation = _activation(activation)
    gated = activation in GATED
    w1 = _weight(w1, "w1", dtype, "(d, 2h) = [gate | up]" if gated else "(d, h)")
    if w1.shape[0] != d:
        raise ValueError(f"w1 has shape {w1.shape}, expected ({d}, {'2h' if gated else 'h'}): "
                         f"its first dim must match the last dim of x (shape {x.shape})")
    hw = w1.shape[1]
    if hw == 0:
        raise ValueError(f"w1 has shape {w1.shape}: the hidden size h must be >= 1")
    if gated and hw % 2:
        raise ValueError(f"w1 has shape {w1.shape}, expected (d, 2h): {activation} packs the "
                         "gate and the up projection side by side (see pack_gated), so its "
                         "width must be even")
    h = hw // 2 if gated else hw
    w2 = _weight(w2, "w2", dtype, (h, d))
    if w2.shape != (h, d):
        where = "h = w1.shape[1] // 2" if gated else "h from w1"
        raise ValueError(f"w2 has shape {w2.shape}, expected {(h, d)} ({where}, d from x)")
    # sizes before the biases: optional_param may copy a (huge, broadcast) bias
    _checks.gemm_size(d, "d (the last dim of x)")
    _checks.gemm_size(hw, "h (the hidden size, w1.shape[1])")
    if gated and b1 is not None and np.shape(b1) == (h,):
        raise ValueError(f"b1 has shape ({h},), expected ({hw},): a gated activation takes "
                         "the packed [gate | up] biases (see pack_gated)")
    b1 = _checks.optional_param(b1, "b1", (hw,), dtype)
    b2 = _checks.optional_param(b2, "b2", (d,), dtype)
    if not isinstance(recompute, (bool, np.bool_)):
        raise TypeError(f"recompute must be a bool, got {type(recompute).__name__}")
    recompute = bool(recompute)
    n = math.prod(x.shape[:-1])
    inputs = (x, w1, b1, w2, b2)
    if out is not None:
        out = _checks.out_array(out, "out", x.shape, dtype, inputs=inputs)
    if hidden_out is not None:
        if recompute:
            raise ValueError("hidden_out must be None with recompute=True (no hidden is kept)")
        hidden_out = _checks.out_array(hidden_out, "hidden_out", (n, hw), dtype,
                                       inputs=inputs + (out,))
    w1, w2 = _checks.blas_matrix(w1), _checks.blas_matrix(w2)
    x = np.ascontiguousarray(x)
    return FFNArgs(x, x if x.ndim == 2 else x.reshape(n, d), w1, b1, w2, b2, activation,
                   recompute, out, hidden_out, n, d, h)


def check_backward(dy, ctx, *, out=None, needs=None):
    """Validate the backward's arguments.  Returns ``(ctx, dy2, needs, outs)``: dy as a
    C-contiguous (n, d) array; ``needs`` five bools, False for a bias that does not exist;
    ``outs`` five validated buffers or None (dx as an (n, d) view), None where not needed."""
    ctx = _checks.context(ctx, FFNContext, "ffn")
    ctx.validate()
    x = ctx.x
    dtype = x.dtype
    dy = _checks.grad_output(dy, x.shape, dtype)
    exists = (True, True, ctx.b1 is not None, True, ctx.b2 is not None)
    needs = _checks.needs(needs, GRAD_NAMES, exists)
    if out is None:
        dy = np.ascontiguousarray(dy)
        return ctx, (dy if dy.ndim == 2 else dy.reshape(_rows(ctx), _d(ctx))), needs, _NO_OUTS
    outs = [None] * 5
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 5:
            raise ValueError(f"out must be a tuple of 5 arrays or None aligned with "
                             f"{GRAD_NAMES}, got {type(out).__name__}")
        n, d, hw = _rows(ctx), _d(ctx), ctx.w1.shape[1]
        shapes = (ctx.shape, (d, hw), (hw,), (_units(ctx), d), (d,))
        taken = [dy, ctx.x, ctx.w1, ctx.b1, ctx.w2, ctx.b2, ctx.hidden]
        for i, (name, shape) in enumerate(zip(GRAD_NAMES, shapes)):
            if out[i] is None or not needs[i]:
                continue
            outs[i] = _checks.out_array(out[i], f"out[{i}] ({name})", shape, dtype,
                                        inputs=taken, transposed_ok=i in (1, 3))
            taken.append(outs[i])
        if outs[0] is not None:
            outs[0] = outs[0].reshape(n, d)
    dy2 = np.ascontiguousarray(dy).reshape(_rows(ctx), _d(ctx))
    return ctx, dy2, needs, tuple(outs)


_NO_OUTS = (None,) * 5


# ---------------------------------------------------------------- run layer
def run_forward(x, w1, b1, w2, b2, activation, *, training=False, recompute=False, out=None,
                hidden_out=None, residual=None):
    """The FFN forward on checked arrays; trusts its arguments.

    x : (n, d) C-contiguous;  w1, w2 as BLAS reads them;  b1, b2 C-contiguous or None;
    activation a valid name;  out : (n, d) C-contiguous or None;  hidden_out : (n, h) or None.
    ``training=False`` keeps nothing (inference); True keeps the hidden unless ``recompute`` and
    flags dead units (relu).  ``residual`` ((n, d) C-contiguous, not overlapping ``out``, or
    None) is added to y block by block under the second GEMM (ffn_block's ``x + FFN``).
    Returns ``(y, hidden, dead_units)`` (the last two None when not kept), y being ``out`` when
    given.
    """
    n, d = x.shape
    hw, h = w1.shape[1], w2.shape[0]
    dtype = x.dtype
    y = np.empty((n, d), dtype) if out is None else out
    hidden = None
    if training and not recompute:
        hidden = np.empty((n, hw), dtype) if hidden_out is None else hidden_out
    dead = np.empty(h, dtype=bool) if training and activation in _DEAD_UNITS else None
    if n == 0:
        if dead is not None:
            dead.fill(True)
        return y, hidden, dead
    if hidden is not None and activation == "relu":
        # relu writes its activation over the saved hidden in place: no scratch, nothing to keep
        # in cache between the GEMMs, so whole-matrix GEMMs (97% of bare GEMMs vs 89% in blocks)
        blk, scratch = min(n, _checks.INT32_MAX), None
    else:
        budget = (_RECOMPUTE_BLOCK_BYTES if recompute else
                  _BLOCK_BYTES if hidden is not None else _INFERENCE_BLOCK_BYTES)
        blk = _block_rows(n, hw, x.itemsize, budget)
        # the activation apart from the kept pre-activation (h wide), or in place (hw wide)
        width = h if hidden is not None else hw
        scratch = workspace("ffn.hidden_block", blk * width, dtype)
    _kernel.forward(y, hidden, None if dead is None else dead.view(np.uint8), scratch, x,
                    w1, b1, w2, b2, _CODES[activation], blk, residual, _blas.current())
    return y, hidden, dead


def run_backward(dy, x, hidden, w1, b1, w2, activation, needs, *, out=(None,) * 5,
                 dx_accumulate=False):
    """The FFN backward on checked arrays; trusts its arguments.

    dy, x : (n, d) C-contiguous;  hidden : what ffn_forward saved, or None (recompute);
    needs : five bools aligned with (dx, dw1, db1, dw2, db2) (False for a missing bias);
    out : five buffers or None (dx as (n, d)).  Returns the five gradients, None where not
    needed; only the GEMMs and sums of the needed ones run.  Scratch: "ffn.grad_block" (dA,
    blk x hw) and "ffn.hidden_block" (the recomputed block, or a's block) — the forward's key,
    so recompute=True holds two blocks in all.  ``dx_accumulate`` (dx needed, given as out[0]):
    dx += dH @ w1^T onto what out[0] holds, which may be ``dy`` itself (ffn_block's post-LN
    residual gradient, with no copy).
    """
    n, d = x.shape
    hw, h = w1.shape[1], w2.shape[0]
    dtype = x.dtype
    shapes = ((n, d), (d, hw), (hw,), (h, d), (d,))
    grads = [None] * 5
    for i, (need, shape) in enumerate(zip(needs, shapes)):
        if need:
            grads[i] = out[i] if out[i] is not None else np.empty(shape, dtype)
    dx, dw1, db1, dw2, db2 = grads
    if n == 0:
        for g in grads[1:]:
            if g is not None:
                g.fill(0)
        return tuple(grads)
    if not any(needs):
        return tuple(grads)
    need_dh = dx is not None or dw1 is not None or db1 is not None
    blk = _block_rows(n, hw, x.itemsize,
                      _RECOMPUTE_BLOCK_BYTES if hidden is None else _BLOCK_BYTES)
    gbuf = workspace("ffn.grad_block", blk * hw, dtype) if need_dh else None
    if hidden is None:
        zwidth = hw if (need_dh or dw2 is not None) else 0
    else:
        zwidth = h if (activation != "relu" and dw2 is not None) else 0
    zbuf = workspace("ffn.hidden_block", blk * zwidth, dtype) if zwidth else None
    sums = workspace("ffn.bias_sums", hw + d, np.float64) \
        if (db1 is not None or db2 is not None) else None
    _kernel.backward(dx, dw1, db1, dw2, db2, sums, gbuf, zbuf, dy, hidden, x, w1, b1, w2,
                     _CODES[activation], blk, dx_accumulate, _blas.current())
    return tuple(grads)


# ---------------------------------------------------------------- public API
def ffn_forward(x, w1, b1, w2, b2, activation="relu", recompute=False, *, out=None,
                hidden_out=None):
    """FFN forward, keeping what backward needs: ``y = act(x @ w1 + b1) @ w2 + b2``.

    Gated activations take a packed ``w1`` of shape (d, 2h) = ``[gate | up]`` and compute
    ``y = (act(x @ w1[:, :h] + b1[:h]) * (x @ w1[:, h:] + b1[h:])) @ w2 + b2``
    (:func:`pack_gated` builds it).

    Parameters
    ----------
    x : ndarray of shape (..., d), float32 or float64
        Any layout; a non-contiguous x is copied once (and that copy is kept for backward).
    w1 : ndarray of shape (d, h)
        Gated activations: (d, 2h) = [gate | up].
    b1 : ndarray of shape (h,) (gated: (2h,)) or None
        The first bias.
    w2 : ndarray of shape (h, d)
        The second weight.
    b2 : ndarray of shape (d,) or None
        The second bias.  All parameters have x's dtype.  Weights may be C- or F-contiguous
        (``torch.nn.Linear.weight.T``) and are read in place by BLAS, never copied (a weight with
        neither rows nor columns contiguous is copied once).
    activation : {"relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "reglu"}
        ``"gelu"`` is the exact (erf) GELU, ``"gelu_tanh"`` its tanh approximation; the gated
        ones multiply silu / gelu / relu of the gate half by the up half.
    recompute : bool
        False: keep the (n, h) hidden (gated: (n, 2h)) for backward.  True: keep no such
        buffer; backward recomputes ``x @ w1 + b1`` block by block (one more GEMM, far less
        memory).
    out : ndarray of x's shape and dtype, C-contiguous, writeable, not overlapping an input
        Where to write y.
    hidden_out : ndarray of shape (n, w1.shape[1]), x's dtype, C-contiguous, writeable, or None
        Where to keep the hidden (``n = prod(x.shape[:-1])``; recompute=False only).  A training
        loop passes the previous step's ``ctx.hidden`` once that step's backward is done (that
        context is then spent: its hidden is overwritten), so no step page-faults a fresh one.

    Returns
    -------
    y : ndarray of shape (..., d), x's dtype
        ``out`` when given.
    ctx : FFNContext
        ``ctx.dead_units`` (relu, reglu) flags the hidden units (reglu: gates) that were 0
        for every row.

    Raises
    ------
    TypeError
        Non-float or mixed dtypes; activation not a str; recompute not a bool.
    ValueError
        0-d x; d or h == 0; w1 not (d, h), w2 not (h, d), b1 not (h,), b2 not (d,) (gated:
        w1 not (d, 2h), b1 not (2h,)); unknown activation; d or w1's width >= 2**31 (BLAS takes
        32-bit sizes); a bad ``out`` or ``hidden_out``.

    See Also
    --------
    ffn, ffn_backward, pack_gated, normffn.reference.ffn_forward

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 5, 8)).astype(np.float32)     # any leading dims
    >>> w1 = rng.standard_normal((8, 32)).astype(np.float32)
    >>> w2 = rng.standard_normal((32, 8)).astype(np.float32)
    >>> b1, b2 = np.zeros(32, np.float32), np.zeros(8, np.float32)
    >>> y, ctx = normffn.ffn_forward(x, w1, b1, w2, b2, "gelu")
    >>> y.shape, y.dtype, ctx.hidden.shape
    ((2, 5, 8), dtype('float32'), (10, 32))
    >>> y_ref = normffn.reference.ffn(x, w1, b1, w2, b2, "gelu")
    >>> bool(np.allclose(y, y_ref, rtol=1e-4, atol=1e-4))
    True

    A transposed weight (PyTorch's ``nn.Linear.weight.T``) is read in place:

    >>> w1_torch = np.ascontiguousarray(w1.T)                      # (h, d) as nn.Linear stores it
    >>> y2, _ = normffn.ffn_forward(x, w1_torch.T, b1, w2, b2, "gelu")
    >>> bool(np.allclose(y2, y, rtol=1e-5, atol=1e-5))
    True

    ``recompute=True`` keeps no hidden:

    >>> normffn.ffn_forward(x, w1, b1, w2, b2, "relu", recompute=True)[1].hidden is None
    True
    """
    a = check_forward(x, w1, b1, w2, b2, activation, recompute=recompute, out=out,
                      hidden_out=hidden_out)
    flat = a.x2 is a.x                          # x is (n, d): no views to make
    y, hidden, dead = run_forward(a.x2, a.w1, a.b1, a.w2, a.b2, a.activation, training=True,
                                  recompute=a.recompute,
                                  out=a.out if a.out is None or flat else a.out.reshape(a.n, a.d),
                                  hidden_out=a.hidden_out)
    ctx = FFNContext._build({"x": a.x, "w1": a.w1, "b1": a.b1, "w2": a.w2, "b2": a.b2,
                             "activation": a.activation, "recompute": a.recompute,
                             "hidden": hidden, "dead_units": dead})
    return (a.out if a.out is not None else y if flat else y.reshape(a.x.shape)), ctx


def ffn(x, w1, b1, w2, b2, activation="relu", *, out=None):
    """FFN inference: ``y = act(x @ w1 + b1) @ w2 + b2``.

    The transformer's position-wise feed-forward block (``nn.Linear -> activation ->
    nn.Linear``) as one op.  Keeps nothing for backward: the extra memory is one block of the
    hidden activation (about 32 MB, kept for the next call of this thread), never (n, h).

    Parameters
    ----------
    x : ndarray of shape (..., d), float32 or float64
        Any layout.
    w1 : ndarray of shape (d, h)
        Gated activations: (d, 2h) = [gate | up] (see :func:`pack_gated`).
    b1 : ndarray of shape (h,) (gated: (2h,)) or None
        The first bias.
    w2 : ndarray of shape (h, d)
        The second weight.
    b2 : ndarray of shape (d,) or None
        The second bias.  Weights may be C- or F-ordered; they are read in place.
    activation : {"relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "reglu"}
        The activation (see :func:`ffn_forward`).
    out : ndarray of x's shape and dtype, C-contiguous, writeable, not overlapping an input
        Where to write y; reuse one across calls to avoid page-faulting a fresh output.

    Returns
    -------
    y : ndarray of shape (..., d)
        ``out`` when given.

    Raises
    ------
    TypeError
        Non-float or mixed dtypes; activation not a str.
    ValueError
        As :func:`ffn_forward`.

    See Also
    --------
    ffn_forward, ffn_backward, normffn.reference.ffn

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> x = np.array([[1.0, -2.0]])
    >>> w1 = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])         # d=2, h=3
    >>> w2 = np.ones((3, 2))
    >>> normffn.ffn(x, w1, None, w2, None).tolist()               # relu([1, -2, -1]) @ w2
    [[1.0, 1.0]]

    SwiGLU with separate gate and up projections:

    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((4, 6))
    >>> w_gate, w_up, w_down = (rng.standard_normal((6, 10)), rng.standard_normal((6, 10)),
    ...                         rng.standard_normal((10, 6)))
    >>> w1, b1 = normffn.pack_gated(w_gate, w_up)
    >>> y = normffn.ffn(x, w1, b1, w_down, None, "swiglu")
    >>> g = x @ w_gate
    >>> bool(np.allclose(y, (g / (1 + np.exp(-g)) * (x @ w_up)) @ w_down))
    True
    """
    a = check_forward(x, w1, b1, w2, b2, activation, out=out)
    flat = a.x2 is a.x                          # x is (n, d): no views to make
    y, _, _ = run_forward(a.x2, a.w1, a.b1, a.w2, a.b2, a.activation,
                          out=a.out if a.out is None or flat else a.out.reshape(a.n, a.d))
    return a.out if a.out is not None else y if flat else y.reshape(a.x.shape)


def ffn_backward(dy, ctx, *, out=None, needs=None):
    """Gradients of the FFN given ``dy = dL/dy``.

    With ``v = x @ w1 + b1`` and ``a = act(v)``: ``dA = dy @ w2.T``, ``dH = dA * act'(v)``,
    ``dx = dH @ w1.T``, ``dw1 = x^T @ dH``, ``db1 = sum_rows dH``, ``dw2 = a^T @ dy``,
    ``db2 = sum_rows dy``.  Gated (``v = [g | u]``, ``a = act(g) * u``):
    ``dg = dA * u * act'(g)`` (reglu: ``dA * u`` unless g <= 0), ``du = dA * act(g)``,
    ``dH = [dg | du]``, the rest as above.  Rows are processed in blocks in a fixed order;
    db1/db2 are float64 sums in row order (identical for any thread count), dw1/dw2 are
    accumulated block by block by BLAS (as deterministic as the BLAS itself).  With 0 rows the
    weight gradients are zeros.

    Parameters
    ----------
    dy : ndarray of the forward output's shape (..., d) and dtype
        Any layout.
    ctx : FFNContext
        From :func:`ffn_forward`.
    out : tuple of 5 (ndarray or None), optional
        Preallocated ``(dx, dw1, db1, dw2, db2)`` in the shapes below (C-contiguous, writeable,
        x's dtype, overlapping no input and no other output); ``dw1``/``dw2`` may also be the
        transpose of a C-contiguous array (``weight.grad.numpy().T`` of an ``nn.Linear``: the
        gradient is then written in that layout, no copy).  None entries are allocated, and
        entries for gradients not computed are left untouched.  A training loop passes the same
        buffers every step.
    needs : tuple of 5 bools, optional
        Which of ``(dx, dw1, db1, dw2, db2)`` to compute; default: all that exist.  The others
        are returned as None and their work is skipped: no ``dx`` GEMM without dx (a first
        layer), no ``dw1``/``dw2`` GEMM for a frozen weight, no ``dy @ w2.T`` GEMM when none of
        dx, dw1, db1 is needed.

    Returns
    -------
    dx : ndarray of shape (..., d)
        The input gradient.
    dw1 : ndarray of w1's shape ((d, h), gated (d, 2h))
        C-contiguous.
    db1 : ndarray of b1's shape ((h,), gated (2h,)), or None
        None if b1 was None.
    dw2 : ndarray of shape (h, d)
        C-contiguous.
    db2 : ndarray of shape (d,), or None
        None if b2 was None.  Each gradient is also None where ``needs`` says False.

    Raises
    ------
    TypeError
        ctx not an FFNContext; dy not float or not x's dtype; a ``needs`` entry not a bool.
    ValueError
        dy of the wrong shape; an inconsistent ctx; ``needs`` or ``out`` not 5 entries; a bad
        ``out`` buffer.

    See Also
    --------
    ffn_forward, normffn.reference.ffn_backward

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((16, 4))
    >>> w1, b1 = rng.standard_normal((4, 8)), rng.standard_normal(8)
    >>> w2, b2 = rng.standard_normal((8, 4)), rng.standard_normal(4)
    >>> y, ctx = normffn.ffn_forward(x, w1, b1, w2, b2, "silu")
    >>> dy = rng.standard_normal(y.shape)
    >>> grads = normffn.ffn_backward(dy, ctx)
    >>> [g.shape for g in grads]
    [(16, 4), (4, 8), (8,), (8, 4), (4,)]
    >>> _, rctx = normffn.reference.ffn_forward(x, w1, b1, w2, b2, "silu")
    >>> ref = normffn.reference.ffn_backward(dy, rctx)
    >>> all(bool(np.allclose(g, r)) for g, r in zip(grads, ref))
    True

    A first layer needs no dx:

    >>> normffn.ffn_backward(dy, ctx, needs=(False, True, True, True, True))[0] is None
    True
    """
    ctx, dy2, needs, outs = check_backward(dy, ctx, out=out, needs=needs)
    x = ctx.x
    grads = run_backward(dy2, x if x.ndim == 2 else x.reshape(dy2.shape), ctx.hidden, ctx.w1,
                         ctx.b1, ctx.w2, ctx.activation, needs, out=outs)
    dx = grads[0]
    if dx is not None:
        dx = out[0] if outs[0] is not None else dx if x.ndim == 2 else dx.reshape(x.shape)
    return (dx,) + tuple(grads[1:])


def pack_gated(w_gate, w_up, b_gate=None, b_up=None, *, layout="math"):
    """Pack separate gate and up projections into the ``w1`` (and ``b1``) of a gated FFN.

    normffn's packed layout, one rule for every gated activation: ``w1 = [w_gate | w_up]``
    along the hidden axis — columns ``0..h-1`` are the gate (the half that goes through
    silu/gelu/relu), columns ``h..2h-1`` the linear "up" half — and ``b1 = [b_gate | b_up]``.
    Libraries name these differently: LLaMA's reference code computes ``w2(silu(w1(x)) * w3(x))``
    (gate = its w1, up = its w3, down = its w2); Hugging Face calls them ``gate_proj``,
    ``up_proj``, ``down_proj``.  normffn's ``w2`` is the down projection, ``(h, d)``, i.e.
    ``down_proj.weight.T``.

    Parameters
    ----------
    w_gate, w_up : ndarray
        ``layout="math"``: shape (d, h) each (``x @ w``).  ``layout="torch"``: shape (h, d)
        each, as ``nn.Linear.weight`` (``gate_proj.weight``, ``up_proj.weight``).
    b_gate, b_up : ndarray of shape (h,) or None
        Zeros stand in for one that is None while the other is given.
    layout : {"math", "torch"}
        How the weights are stored.

    Returns
    -------
    w1 : ndarray of shape (d, 2h)
        ``"math"``: C-contiguous.  ``"torch"``: the transposed view of a C-contiguous (2h, d)
        array — ``w1.T`` is the packed ``nn.Linear`` weight — which :func:`ffn` reads in place.
    b1 : ndarray of shape (2h,), or None
        None when both biases are None.

    Raises
    ------
    TypeError
        Non-float or mixed dtypes.
    ValueError
        Weights not 2-D or of different shapes, a bias not (h,), an unknown layout.

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> w_gate = np.zeros((3, 2)); w_up = np.ones((3, 2))          # d=3, h=2
    >>> w1, b1 = normffn.pack_gated(w_gate, w_up, b_up=np.array([1.0, 2.0]))
    >>> w1.shape, w1[0].tolist(), b1.tolist()
    ((3, 4), [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 2.0])

    From ``nn.Linear`` weights (shape (h, d)), without copying at call time:

    >>> w1, b1 = normffn.pack_gated(w_gate.T, w_up.T, layout="torch")
    >>> w1.shape, w1.flags.f_contiguous, b1 is None
    ((3, 4), True, True)
    """
    if layout not in ("math", "torch"):
        raise ValueError(f"layout must be 'math' or 'torch', got {layout!r}")
    w_gate = _checks.float_array(w_gate, "w_gate")
    dtype = w_gate.dtype
    w_up = _weight(w_up, "w_up", dtype, "the shape of w_gate")
    if w_gate.ndim != 2:
        raise ValueError(f"w_gate must be 2-D, got shape {w_gate.shape}")
    if w_up.shape != w_gate.shape:
        raise ValueError(f"w_up has shape {w_up.shape}, expected {w_gate.shape} (w_gate's)")
    h = w_gate.shape[1] if layout == "math" else w_gate.shape[0]
    biases = [_checks.optional_param(b, name, (h,), dtype)
              for b, name in ((b_gate, "b_gate"), (b_up, "b_up"))]
    d = w_gate.shape[0] if layout == "math" else w_gate.shape[1]
    if layout == "math":
        w1 = np.concatenate([w_gate, w_up], axis=1, out=np.empty((d, 2 * h), dtype))
    else:
        w1 = np.concatenate([w_gate, w_up], axis=0, out=np.empty((2 * h, d), dtype)).T
    if biases[0] is None and biases[1] is None:
        return w1, None
    b1 = np.zeros(2 * h, dtype)
    for k, b in enumerate(biases):
        if b is not None:
            b1[k * h:(k + 1) * h] = b
    return w1, b1
