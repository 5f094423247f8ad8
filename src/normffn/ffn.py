"""Fused feed-forward block: ``y = act(x @ w1 + b1) @ w2 + b2``, forward and backward.

The transformer's position-wise FFN (``nn.Linear -> activation -> nn.Linear``) as one op.  Rows
go through in blocks so the block of the hidden activation stays in cache between its two GEMMs;
bias, activation and (backward) the activation's derivative are applied to the block while it is
hot.  GEMMs are scipy's BLAS (sgemm/dgemm); weights are read in place, C- or F-ordered.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _checks
from ._kernels import ffn as _kernel
from ._workspace import workspace

__all__ = ["FFNContext", "ffn", "ffn_forward", "ffn_backward"]

# activation name -> kernel code (kernels/activations.h, NF_ACT_*)
ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}

# Rows per block: enough for BLAS to run each GEMM near its whole-matrix rate (each call re-packs
# the weight, so blocks of a few hundred rows lose 10-25% to OpenBLAS), few enough that a block
# of the hidden activation (rows x h) stays in the last-level cache between its two GEMMs.
# Measured on a 2-core Zen 4 (32 MB L3) with scipy's OpenBLAS, float32, 8192x512x2048, all
# against the same whole-matrix GEMMs in one process:
#   - inference (`ffn`): 16 MB blocks 92%, 32 MB 94-95% (the extra memory is one block, cached);
#   - backward: 16 MB and 32 MB alike (92%, 91%); 16 MB kept (it holds one or two blocks);
#   - forward keeping a relu hidden: not blocked at all (see _run_forward).
# recompute=True uses 8 MB (its backward holds two blocks and exists to save memory).
_BLOCK_BYTES = 16 << 20
_INFERENCE_BLOCK_BYTES = 32 << 20
_RECOMPUTE_BLOCK_BYTES = 8 << 20
_MIN_BLOCK_ROWS = 256
# recompute=False with relu: dw2 = a^T @ dy as one GEMM over all rows after the loop (the whole
# a is saved anyway) rather than one per block.
_FULL_DW2 = True
# Plain kernels only (no openblas_set_num_threads_local found): OpenMP threads for the
# elementwise passes between two threaded-BLAS GEMMs (0: as many as OpenMP allows).  1, as
# measured: OpenBLAS's idle workers spin (sched_yield) for a long while after each GEMM and
# libgomp's workers after each parallel region, so on 2 cores a 2-thread elementwise pass fights
# the BLAS threads on both sides and cost 15-30% of the whole op; one thread costs a few %.
_EW_THREADS = 1


def _block_rows(n: int, h: int, itemsize: int, budget: int) -> int:
    """Rows per block: about ``budget`` bytes of hidden activation, split evenly over
    ceil(n / rows) blocks (no ragged last block)."""
    blk = max(_MIN_BLOCK_ROWS, budget // (h * itemsize))
    if n <= blk:
        return max(n, 1)
    nb = -(-n // blk)
    return -(-n // nb)


@dataclass(frozen=True, eq=False)
class FFNContext:
    """What :func:`ffn_backward` needs; returned by :func:`ffn_forward`.

    Attributes
    ----------
    x : ndarray of shape (..., d), C-contiguous (the forward input, copied only if it was not)
    w1 : ndarray of shape (d, h);  b1 : ndarray of shape (h,) or None
    w2 : ndarray of shape (h, d);  b2 : ndarray of shape (d,) or None
        The forward's parameters as given (C- or F-ordered weights are kept as they are).
    activation : str
    recompute : bool
    hidden : ndarray of shape (n, h) or None
        ``n = prod(x.shape[:-1])``.  For ``"relu"`` the activation ``a = relu(x @ w1 + b1)``
        (its positive entries are the mask backward needs); for the other activations the
        pre-activation ``v = x @ w1 + b1`` (their derivative needs ``v``, and ``a`` is recomputed
        from it block by block).  None with ``recompute=True``: backward recomputes ``v``.
    dead_units : ndarray of shape (h,), bool, or None
        For ``"relu"``: True where the unit's output was 0 for every row of the batch (the
        dead-ReLU diagnostic; vacuously True when the batch has no rows).  None otherwise.

    The ReLU mask is derived from the saved hidden (``a > 0``; more exactly, the gradient passes
    unless ``a <= 0``, as in PyTorch's ``threshold_backward``) rather than kept as bits: the
    saved ``a`` is needed anyway for ``dw2 = a^T @ dy``, so the mask costs no memory and no extra
    pass — the comparison is fused into the pass that applies it.  Bits would only pay off when
    ``a`` is not kept, i.e. with ``recompute=True``, where the forward GEMM is redone and yields
    the mask for free.
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

    @property
    def shape(self) -> tuple:
        """Shape of x, y, dy and dx."""
        return self.x.shape

    @property
    def dtype(self) -> np.dtype:
        return self.x.dtype

    def _rows(self) -> tuple[int, int, int]:
        """(n, d, h), after checking the context is internally consistent (a hand-built or
        tampered context must raise, not reach the kernel)."""
        x = self.x
        if not isinstance(x, np.ndarray) or x.dtype not in _checks.FLOAT_DTYPES \
                or not x.flags.c_contiguous or x.ndim < 1:
            raise ValueError("ctx.x must be the C-contiguous float array saved by the forward")
        dt = x.dtype
        d = x.shape[-1]
        n = math.prod(x.shape[:-1])
        w1, w2 = self.w1, self.w2
        if not isinstance(w1, np.ndarray) or w1.dtype != dt or w1.ndim != 2 \
                or w1.shape[0] != d or w1.shape[1] < 1 or _checks.blas_matrix(w1) is not w1:
            raise ValueError(f"ctx.w1 must be a {dt} array of shape (d={d}, h) with contiguous "
                             "rows or columns")
        h = w1.shape[1]
        if not isinstance(w2, np.ndarray) or w2.dtype != dt or w2.shape != (h, d) \
                or _checks.blas_matrix(w2) is not w2:
            raise ValueError(f"ctx.w2 must be a {dt} array of shape {(h, d)} with contiguous "
                             "rows or columns")
        for name, size in (("b1", h), ("b2", d)):
            b = getattr(self, name)
            if b is not None and (not isinstance(b, np.ndarray) or b.dtype != dt
                                  or b.shape != (size,) or not b.flags.c_contiguous):
                raise ValueError(f"ctx.{name} must be None or a C-contiguous {dt} array of "
                                 f"shape ({size},)")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ctx.activation must be one of {sorted(ACTIVATIONS)}")
        hid = self.hidden
        if self.recompute is not True and self.recompute is not False:
            raise ValueError("ctx.recompute must be a bool")
        if self.recompute:
            if hid is not None:
                raise ValueError("ctx.hidden must be None when ctx.recompute is True")
        elif not isinstance(hid, np.ndarray) or hid.dtype != dt or hid.shape != (n, h) \
                or not hid.flags.c_contiguous:
            raise ValueError(f"ctx.hidden must be a C-contiguous {dt} array of shape {(n, h)}")
        if d > _checks.INT32_MAX or h > _checks.INT32_MAX:
            raise ValueError("ctx is inconsistent: d or h too large for BLAS")
        return n, d, h


def _activation(activation) -> str:
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str, one of {sorted(ACTIVATIONS)}, got "
                        f"{type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return activation


def _weight(w, name: str, dtype: np.dtype, expected: str) -> np.ndarray:
    w = _checks.float_array(w, name)
    _checks.same_dtype(dtype, name, w)
    if w.ndim != 2:
        raise ValueError(f"{name} must be 2-D of shape {expected}, got shape {w.shape}")
    return w


def _validate(x, w1, b1, w2, b2, activation):
    """Checked (x, w1, b1, w2, b2, activation, n, d, h); weights left in their layout when BLAS
    can read it (C- or F-ordered), biases C-contiguous."""
    x = _checks.float_array(x, "x")
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension (..., d), got a 0-d array")
    dtype = x.dtype
    d = x.shape[-1]
    if d == 0:
        raise ValueError(f"x has shape {x.shape}: its last dim d must be >= 1")
    w1 = _weight(w1, "w1", dtype, "(d, h)")
    if w1.shape[0] != d:
        raise ValueError(f"w1 has shape {w1.shape}, expected ({d}, h): its first dim must match "
                         f"the last dim of x (shape {x.shape})")
    h = w1.shape[1]
    if h == 0:
        raise ValueError(f"w1 has shape {w1.shape}: the hidden size h must be >= 1")
    w2 = _weight(w2, "w2", dtype, f"(h, d) = {(h, d)}")
    if w2.shape != (h, d):
        raise ValueError(f"w2 has shape {w2.shape}, expected {(h, d)} (h from w1, d from x)")
    # sizes before the biases: optional_param may copy a (huge, broadcast) bias
    _checks.gemm_size(d, "d (the last dim of x)")
    _checks.gemm_size(h, "h (the hidden size, w1.shape[1])")
    b1 = _checks.optional_param(b1, "b1", (h,), dtype)
    b2 = _checks.optional_param(b2, "b2", (d,), dtype)
    activation = _activation(activation)
    n = math.prod(x.shape[:-1])
    return (x, _checks.blas_matrix(w1), b1, _checks.blas_matrix(w2), b2, activation, n, d, h)


def _scratch(key: str, blk: int, h: int, dtype) -> np.ndarray:
    """A (blk, h) scratch block, reused across calls (see _workspace: no page faults).  Two keys
    only — "ffn.hidden_block" (forward's a or v block, backward's recomputed or activated block)
    and "ffn.grad_block" (backward's dA block) — so with recompute=True the forward's cached block
    is the backward's, and the extra memory stays two blocks."""
    return workspace(key, blk * h, dtype).reshape(blk, h)


def _run_forward(y2, hidden, alive, x2, w1, b1, w2, b2, activation, n, h, recompute=False):
    act = ACTIVATIONS[activation]
    if hidden is not None and activation == "relu":
        # relu writes its activation over the saved hidden in place: no scratch, so nothing to
        # keep in cache between the GEMMs and no reason to block — whole-matrix GEMMs are the
        # fastest (measured at 8192x512x2048: 97% of the bare GEMMs' time, 89% in 16 MB blocks).
        blk, scratch = min(n, _checks.INT32_MAX), None
    else:
        # a block of a (or, without a saved hidden, of v then a) needs scratch
        budget = (_RECOMPUTE_BLOCK_BYTES if recompute else
                  _BLOCK_BYTES if hidden is not None else _INFERENCE_BLOCK_BYTES)
        blk = _block_rows(n, h, x2.itemsize, budget)
        scratch = _scratch("ffn.hidden_block", blk, h, x2.dtype)
    _kernel.forward(y2, hidden, alive, scratch, x2, w1, b1, w2, b2, act, blk, _EW_THREADS)


def ffn_forward(x, w1, b1, w2, b2, activation="relu", recompute=False):
    """FFN forward, keeping what backward needs.

    ``y = act(x @ w1 + b1) @ w2 + b2``

    Parameters
    ----------
    x : ndarray of shape (..., d), float32 or float64
        Any layout; a non-contiguous x is copied once (and that copy is kept for backward).
    w1 : ndarray of shape (d, h)
    b1 : ndarray of shape (h,) or None
    w2 : ndarray of shape (h, d)
    b2 : ndarray of shape (d,) or None
        Same dtype as x.  Weights may be C- or F-contiguous (``torch.nn.Linear.weight.T``) and are
        read in place by BLAS, never copied (a weight with neither rows nor columns contiguous is
        copied once).
    activation : {"relu", "gelu", "gelu_tanh", "silu"}
        ``"gelu"`` is the exact (erf) GELU, ``"gelu_tanh"`` its tanh approximation.
    recompute : bool
        False: keep the (n, h) hidden activation for backward.  True: keep no (n, h) buffer;
        backward recomputes ``x @ w1 + b1`` block by block (one more GEMM, far less memory).

    Returns
    -------
    y : ndarray of shape (..., d), x's dtype
    ctx : FFNContext
        ``ctx.dead_units`` (relu only) flags the hidden units that were 0 for every row.

    Raises
    ------
    TypeError
        Non-float or mixed dtypes; activation not a str; recompute not a bool.
    ValueError
        0-d x; d or h == 0; w1 not (d, h), w2 not (h, d), b1 not (h,), b2 not (d,); unknown
        activation; d or h >= 2**31 (BLAS takes 32-bit sizes).
    """
    x, w1, b1, w2, b2, activation, n, d, h = _validate(x, w1, b1, w2, b2, activation)
    if not isinstance(recompute, (bool, np.bool_)):
        raise TypeError(f"recompute must be a bool, got {type(recompute).__name__}")
    recompute = bool(recompute)
    dtype = x.dtype
    xc = np.ascontiguousarray(x)
    y = np.empty(x.shape, dtype=dtype)
    hidden = None if recompute else np.empty((n, h), dtype=dtype)
    dead = np.ones(h, dtype=bool) if activation == "relu" else None
    if n > 0:
        alive = None
        if dead is not None:
            alive = np.zeros(h, dtype=np.uint8)
        _run_forward(y.reshape(n, d), hidden, alive, xc.reshape(n, d), w1, b1, w2, b2,
                     activation, n, h, recompute)
        if dead is not None:
            dead = alive == 0
    ctx = FFNContext(x=xc, w1=w1, b1=b1, w2=w2, b2=b2, activation=activation,
                     recompute=recompute, hidden=hidden, dead_units=dead)
    return y, ctx


def ffn(x, w1, b1, w2, b2, activation="relu", *, out=None):
    """FFN inference: ``y = act(x @ w1 + b1) @ w2 + b2`` (see :func:`ffn_forward`).

    Keeps nothing for backward: the extra memory is one block of the hidden activation
    (about ``_INFERENCE_BLOCK_BYTES``, 32 MB; kept for the next call of this thread), never
    (n, h).

    Parameters
    ----------
    out : ndarray of x's shape and dtype, C-contiguous, writeable, not overlapping an input
        Where to write y; reuse one across calls to avoid page-faulting a fresh output.

    Returns
    -------
    y : ndarray of shape (..., d)
    """
    x, w1, b1, w2, b2, activation, n, d, h = _validate(x, w1, b1, w2, b2, activation)
    y = _checks.new_or_out(out, "out", x.shape, x.dtype, inputs=(x, w1, b1, w2, b2))
    if n > 0:
        xc = np.ascontiguousarray(x)
        _run_forward(y.reshape(n, d), None, None, xc.reshape(n, d), w1, b1, w2, b2,
                     activation, n, h)
    return y


def ffn_backward(dy, ctx):
    """Gradients of the FFN given ``dy = dL/dy``.

    Parameters
    ----------
    dy : ndarray of the forward output's shape (..., d) and dtype (any layout)
    ctx : FFNContext from :func:`ffn_forward`

    Returns
    -------
    dx : ndarray of shape (..., d)
    dw1 : ndarray of shape (d, h), C-contiguous
    db1 : ndarray of shape (h,), or None if b1 was None
    dw2 : ndarray of shape (h, d), C-contiguous
    db2 : ndarray of shape (d,), or None if b2 was None

    Maths (v = x @ w1 + b1, a = act(v)): ``dA = dy @ w2.T``, ``dH = dA * act'(v)``,
    ``dx = dH @ w1.T``, ``dw1 = x^T @ dH``, ``db1 = sum_rows dH``, ``dw2 = a^T @ dy``,
    ``db2 = sum_rows dy``.  Rows are processed in blocks in a fixed order; db1/db2 are float64
    sums in row order (identical for any thread count), dw1/dw2 are accumulated block by block by
    BLAS (as deterministic as the BLAS itself).  With 0 rows the weight grads are zeros.

    Raises
    ------
    TypeError
        ctx not an FFNContext; dy not float or not x's dtype.
    ValueError
        dy of the wrong shape; an inconsistent ctx.
    """
    ctx = _checks.context(ctx, FFNContext, "ffn")
    n, d, h = ctx._rows()
    dtype = ctx.dtype
    dy = _checks.grad_output(dy, ctx.shape, dtype)
    dx = np.empty(ctx.shape, dtype=dtype)
    dw1 = np.empty((d, h), dtype=dtype)
    dw2 = np.empty((h, d), dtype=dtype)
    db1_acc = np.zeros(h) if ctx.b1 is not None else None
    db2_acc = np.zeros(d) if ctx.b2 is not None else None
    if n == 0:
        dw1.fill(0)
        dw2.fill(0)
    else:
        blk = _block_rows(n, h, dx.itemsize,
                          _RECOMPUTE_BLOCK_BYTES if ctx.recompute else _BLOCK_BYTES)
        gbuf = _scratch("ffn.grad_block", blk, h, dtype)
        zbuf = None if (ctx.hidden is not None and ctx.activation == "relu") \
            else _scratch("ffn.hidden_block", blk, h, dtype)
        full_dw2 = _FULL_DW2 and n <= _checks.INT32_MAX
        _kernel.backward(dx.reshape(n, d), dw1, dw2, db1_acc, db2_acc, gbuf, zbuf,
                         np.ascontiguousarray(dy).reshape(n, d), ctx.hidden,
                         ctx.x.reshape(n, d), ctx.w1, ctx.b1, ctx.w2,
                         ACTIVATIONS[ctx.activation], blk, full_dw2, _EW_THREADS)
    db1 = None if db1_acc is None else db1_acc.astype(dtype)
    db2 = None if db2_acc is None else db2_acc.astype(dtype)
    return dx, dw1, db1, dw2, db2

