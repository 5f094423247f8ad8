"""The transformer's FFN sublayer, fused: the norm, the FFN and the residual add, forward and
backward.

    pre-LN  (GPT-2 and later):        y = x + ffn(norm(x))
    post-LN (the original Transformer): y = norm(x + ffn(x))

``norm`` is LayerNorm (``"layer"``: weight and bias) or RMSNorm (``"rms"``: weight only) over
the last dim; ``ffn(v) = act(v @ w1 + b1) @ w2 + b2`` with any activation of :func:`normffn.ffn`,
gated ones taking the packed ``w1`` (d, 2h).

How it is fused (every piece is another op's run layer, called without validating again):

* pre-LN forward: the norm writes ``xn`` (kept for backward unless ``recompute``); the FFN
  kernel runs its GEMMs in its own row blocks and, block by block, writes ``x + b2`` into y just
  before its second GEMM accumulates ``a @ w2`` onto it (``beta = 1``): the residual add costs
  no pass of its own.  Backward: the FFN backward writes ``dxn``; the add + norm backward
  kernel computes ``dx = norm_backward(dxn) + dy`` and the norm's parameter gradients in its one
  pass over the rows.
* post-LN forward: the FFN kernel writes ``s = x + b2 + a @ w2`` the same way, then the norm
  writes y from s.  Backward: the norm backward writes ``ds`` straight into the dx buffer, and
  the FFN backward reads it as its upstream gradient and accumulates ``dH @ w1^T`` onto it
  (``beta = 1``): ``dx = ds + ffn_backward(ds)`` with no copy and no extra pass.

Blocking.  The GEMMs keep the FFN's own row blocks (``normffn.ffn``'s tuning: a block of the
hidden sized for the cache; relu with the hidden kept: whole-matrix GEMMs), and the norm runs as
one OpenMP pass over all rows before (pre-LN) or after (post-LN) them, rather than once per
block between GEMMs.  Why: at the bench shapes (2048 x 768 x 3072) the GEMMs are ~300 ms and
a norm pass over the 6 MB of rows ~0.3 ms; blocking the norm could save at most that pass's
trip through memory, while cutting the GEMMs into more, smaller calls costs several percent
(ffn's own measurements: whole-matrix 97% of the bare GEMMs vs 89% in blocks) and an OpenMP
team started between BLAS calls fights BLAS's spinning workers on this 2-core machine (ffn.pyx).

Memory.  Training keeps x, the norm statistics, and: pre-LN ``xn`` (n, d), post-LN ``s``
(n, d), plus the FFN's hidden (n, h; gated n, 2h) unless ``recompute=True``.  With
``recompute=True`` neither ``xn`` nor the hidden is kept: backward recomputes ``xn`` into one
(n, d) scratch buffer (the size of dx) and the hidden block by block.  Scratch comes from
``normffn._workspace``.

Layers as in every op module: ``check_forward`` / ``check_backward`` validate (through
``_checks`` and the FFN's checks); ``run_forward`` / ``run_backward`` trust their arguments;
``ffn_block``, ``ffn_block_forward``, ``ffn_block_backward`` compose the two.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import _blas, _checks
from ._context import Context, Field
from ._kernels import layer_norm as _omp
from ._workspace import workspace
from .add_norm import run_add_norm_backward
from .ffn import ACTIVATIONS, GATED, FFNArgs
from .ffn import check_forward as ffn_check_forward
from .ffn import run_backward as ffn_run_backward
from .ffn import run_forward as ffn_run_forward
from .layer_norm import run_forward as layer_norm_run_forward
from .rms_norm import run_rms_norm_forward

__all__ = ["FFNBlockContext", "ffn_block", "ffn_block_forward", "ffn_block_backward",
           "check_forward", "run_forward", "check_backward", "run_backward"]

NORMS = ("layer", "rms")
PLACEMENTS = ("pre", "post")
GRAD_NAMES = ("dx", "dnorm_weight", "dnorm_bias", "dw1", "db1", "dw2", "db2")


def _scratch(role: str, n: int, d: int, dtype) -> np.ndarray:
    """An (n, d) C-contiguous scratch matrix from the workspace (n may be 0)."""
    return workspace(role, n * d, dtype)[:n * d].reshape(n, d)


# ---------------------------------------------------------------- context
def _d(ctx) -> int:
    return ctx.x.shape[-1]


def _lead(ctx) -> tuple:
    return ctx.x.shape[:-1]


def _hw(ctx):
    w1 = ctx.w1
    return w1.shape[1] if w1.ndim == 2 else "hw"


def _units(ctx):
    hw = _hw(ctx)
    return hw // 2 if ctx.activation in GATED and isinstance(hw, int) else hw


@dataclass(frozen=True, eq=False)
class FFNBlockContext(Context):
    """What :func:`ffn_block_backward` needs; returned by :func:`ffn_block_forward`.

    Attributes
    ----------
    x : ndarray of shape (..., d)
        C-contiguous (the forward input; copied only if it was not).
    norm_weight, norm_bias : ndarray of shape (d,) or None
        The norm's parameters.
    w1, b1, w2, b2 : ndarray or None
        The FFN's parameters as given (C- or F-ordered weights kept as they are).
    activation : str
        The activation's name.
    norm : {"layer", "rms"}
        The norm.
    placement : {"pre", "post"}
        Where the norm sits.
    eps : float
        The norm's eps.
    recompute : bool
        Whether backward recomputes the normalised input and the hidden.
    mean : ndarray of shape x.shape[:-1], float64, or None
        None for RMSNorm (it has no mean).
    rstd : ndarray of shape x.shape[:-1], float64
        The norm's statistics, as :class:`normffn.LayerNormContext`'s (of x for pre-LN, of
        ``s = x + ffn(x)`` for post-LN).
    xn : ndarray of x's shape, or None
        Pre-LN: the normalised input ``norm(x)`` the FFN saw (None with ``recompute=True``, and
        for post-LN).
    s : ndarray of x's shape, or None
        Post-LN: the residual sum ``x + ffn(x)`` that was normalised (None for pre-LN).
    hidden : ndarray of shape (n, h) (gated: (n, 2h)), or None
        What :class:`normffn.FFNContext` keeps as ``hidden`` (None with ``recompute``).
    dead_units : ndarray of shape (h,), bool, or None
        relu / reglu: the hidden units (gates) that were 0 for every row; None otherwise.

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((3, 4))
    >>> _, ctx = normffn.ffn_block_forward(x, None, None, rng.standard_normal((4, 6)), None,
    ...                                    rng.standard_normal((6, 4)), None, norm="rms")
    >>> ctx.mean is None, ctx.rstd.shape, ctx.xn.shape, ctx.s is None
    (True, (3,), (3, 4), True)
    """

    x: np.ndarray
    norm_weight: np.ndarray | None
    norm_bias: np.ndarray | None
    w1: np.ndarray
    b1: np.ndarray | None
    w2: np.ndarray
    b2: np.ndarray | None
    activation: str
    norm: str
    placement: str
    eps: float
    recompute: bool
    mean: np.ndarray | None
    rstd: np.ndarray
    xn: np.ndarray | None
    s: np.ndarray | None
    hidden: np.ndarray | None
    dead_units: np.ndarray | None

    _op = "ffn_block"
    _fields = (
        Field("x", "input", shape=lambda c: c.x.shape if c.x.ndim >= 1 else ("...", "d")),
        Field("norm_weight", "like_x", shape=lambda c: (_d(c),), optional=True),
        Field("norm_bias", "like_x", shape=lambda c: (_d(c),), optional=True),
        Field("w1", "like_x", shape=lambda c: (_d(c), _hw(c)), layout="blas"),
        Field("b1", "like_x", shape=lambda c: (_hw(c),), optional=True),
        Field("w2", "like_x", shape=lambda c: (_units(c), _d(c)), layout="blas"),
        Field("b2", "like_x", shape=lambda c: (_d(c),), optional=True),
        Field("recompute", "bool"),
        Field("mean", "float64", shape=_lead, optional=True),
        Field("rstd", "float64", shape=_lead),
        Field("xn", "like_x", shape=lambda c: c.x.shape, optional=True),
        Field("s", "like_x", shape=lambda c: c.x.shape, optional=True),
        Field("hidden", "like_x", shape=lambda c: (math.prod(_lead(c)), _hw(c)),
              optional=True),
    )

    def _extra_checks(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ctx.activation must be one of {sorted(ACTIVATIONS)}")
        if self.norm not in NORMS:
            raise ValueError(f"ctx.norm must be one of {NORMS}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"ctx.placement must be one of {PLACEMENTS}")
        if self.x.ndim < 1:
            raise ValueError("ctx.x must have at least one dimension")
        hw = self.w1.shape[1]
        if hw < 1 or (self.activation in GATED and hw % 2):
            raise ValueError(f"ctx.w1 has shape {self.w1.shape}, inconsistent with "
                             f"activation {self.activation!r}")
        if _d(self) > _checks.INT32_MAX or hw > _checks.INT32_MAX:
            raise ValueError("ctx is inconsistent: d or h too large for BLAS")
        rms = self.norm == "rms"
        if rms and (self.mean is not None or self.norm_bias is not None):
            raise ValueError("ctx.mean and ctx.norm_bias must be None for norm='rms'")
        if not rms and self.mean is None:
            raise ValueError("ctx.mean is None; it must hold what ffn_block_forward saved")
        if not isinstance(self.eps, float) or not math.isfinite(self.eps) or self.eps < 0:
            raise ValueError(f"ctx.eps must be a finite float >= 0, got {self.eps!r}")
        pre = self.placement == "pre"
        if (self.xn is not None) != (pre and not self.recompute):
            raise ValueError("ctx.xn must be kept for pre-LN without recompute, else None")
        if (self.s is not None) != (not pre):
            raise ValueError("ctx.s must be kept for post-LN, else None")
        if (self.hidden is not None) == bool(self.recompute):
            raise ValueError("ctx.hidden must be kept unless recompute is True, then None")


# ---------------------------------------------------------------- check layer
class BlockArgs(NamedTuple):
    """Checked forward arguments, as :func:`check_forward` returns them."""
    ffn: FFNArgs                  # x (C-contiguous), x2 (n, d), the FFN's parameters,
                                  # hidden_out, n, d, h
    norm_weight: np.ndarray | None
    norm_bias: np.ndarray | None
    norm: str
    placement: str
    eps: float
    out: np.ndarray | None        # validated y buffer of x's shape, or None
    kept_out: np.ndarray | None   # validated buffer for xn (pre) or s (post), or None


def _choice(value, name: str, allowed: tuple) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {allowed}, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_forward(x, norm_weight, norm_bias, w1, b1, w2, b2, activation="relu", *,
                  norm="layer", placement="pre", eps=1e-5, recompute=False, out=None,
                  hidden_out=None, kept_out=None) -> BlockArgs:
    """Validate the forward's arguments (see :func:`ffn_block_forward` for what raises).
    Nothing is written; x is copied to C order only once every check passed."""
    norm = _choice(norm, "norm", NORMS)
    placement = _choice(placement, "placement", PLACEMENTS)
    if norm == "rms" and norm_bias is not None:
        raise ValueError("norm_bias must be None for norm='rms' (RMSNorm has no bias)")
    # the FFN's checks (x, weights, biases, activation, recompute); out is checked below
    # against every input, norm parameters included
    a = ffn_check_forward(x, w1, b1, w2, b2, activation, recompute=recompute,
                          hidden_out=hidden_out)
    dtype, d = a.x.dtype, a.d
    norm_weight = _checks.optional_param(norm_weight, "norm_weight", (d,), dtype)
    norm_bias = _checks.optional_param(norm_bias, "norm_bias", (d,), dtype)
    if norm == "rms":
        eps = _checks.eps(eps, dtype=dtype)
    else:
        if eps is None:
            raise TypeError("eps must be a real number for norm='layer' (eps=None, the "
                            "dtype's machine epsilon, is for norm='rms' only)")
        eps = _checks.eps(eps)
    if out is not None:
        out = _checks.out_array(out, "out", a.x.shape, dtype,
                                inputs=(x if isinstance(x, np.ndarray) else None, a.x,
                                        norm_weight, norm_bias, a.w1, a.b1, a.w2, a.b2))
    if a.hidden_out is not None:      # the FFN checked it against x and its own parameters
        _checks.out_array(a.hidden_out, "hidden_out", a.hidden_out.shape, dtype,
                          inputs=(norm_weight, norm_bias, out))
    if kept_out is not None:
        if recompute and placement == "pre":
            raise ValueError("kept_out must be None with recompute=True and placement='pre' "
                             "(the normalised input is recomputed, not kept)")
        kept_out = _checks.out_array(
            kept_out, "kept_out", a.x.shape, dtype,
            inputs=(x if isinstance(x, np.ndarray) else None, a.x, norm_weight, norm_bias,
                    a.w1, a.b1, a.w2, a.b2, out, a.hidden_out))
    return BlockArgs(a, norm_weight, norm_bias, norm, placement, eps, out, kept_out)


def check_backward(dy, ctx, *, out=None, needs=None):
    """Validate the backward's arguments.  Returns ``(ctx, dy2, needs, outs)``: dy as a
    C-contiguous (n, d) array; ``needs`` seven bools aligned with :data:`GRAD_NAMES`, False for
    a parameter that does not exist; ``outs`` seven validated buffers or None (dx as (n, d))."""
    ctx = _checks.context(ctx, FFNBlockContext, "ffn_block")
    ctx.validate()
    dtype = ctx.dtype
    exists = (True, ctx.norm_weight is not None, ctx.norm_bias is not None, True,
              ctx.b1 is not None, True, ctx.b2 is not None)
    needs = _checks.needs(needs, GRAD_NAMES, exists)
    dy = _checks.grad_output(dy, ctx.shape, dtype)
    n, d, hw = math.prod(_lead(ctx)), _d(ctx), ctx.w1.shape[1]
    outs = [None] * 7
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 7:
            raise ValueError(f"out must be a tuple of 7 arrays or None aligned with "
                             f"{GRAD_NAMES}, got {type(out).__name__}")
        shapes = (ctx.shape, (d,), (d,), (d, hw), (hw,), (_units(ctx), d), (d,))
        taken = [dy, ctx.x, ctx.norm_weight, ctx.norm_bias, ctx.w1, ctx.b1, ctx.w2, ctx.b2,
                 ctx.mean, ctx.rstd, ctx.xn, ctx.s, ctx.hidden]
        for i, (name, shape) in enumerate(zip(GRAD_NAMES, shapes)):
            if out[i] is None or not needs[i]:
                continue
            outs[i] = _checks.out_array(out[i], f"out[{i}] ({name})", shape, dtype,
                                        inputs=taken, transposed_ok=i in (3, 5))
            taken.append(outs[i])
        if outs[0] is not None:
            outs[0] = outs[0].reshape(n, d)
    dy2 = np.ascontiguousarray(dy).reshape(n, d)
    return ctx, dy2, needs, tuple(outs)


# ---------------------------------------------------------------- run layer
@contextmanager
def _norm_threads():
    """The sublayer's norm passes run on the calling thread alone when the FFN multiplies with
    scipy's OpenBLAS: after an OpenMP region libgomp's idle worker spins on its core for
    milliseconds, and OpenBLAS's threaded GEMMs that follow need that core (docs/tuning.md).
    With a BLAS on the OpenMP pool (normffn.torch) the norms keep the pool."""
    if _blas.on_openmp_pool():
        yield
        return
    before = _omp.set_max_threads(1)
    try:
        yield
    finally:
        _omp.set_max_threads(before)


def _norm_forward(norm, x2, weight, bias, eps, y2, mean, rstd):
    with _norm_threads():
        if norm == "rms":
            run_rms_norm_forward(x2, weight, eps, y2, rstd)
        else:
            layer_norm_run_forward(x2, weight, bias, eps, y2, mean, rstd)


def _add_norm_backward(*args):
    with _norm_threads():
        run_add_norm_backward(*args)


def run_forward(x2, norm_weight, norm_bias, w1, b1, w2, b2, activation, norm, placement, eps,
                *, training=False, recompute=False, out=None, mean=None, rstd=None,
                hidden_out=None, kept_out=None):
    """The sublayer's forward on checked arrays; trusts its arguments.

    x2 : (n, d) C-contiguous;  norm_weight, norm_bias : (d,) or None (bias None for "rms");
    w1, b1, w2, b2, activation as :func:`normffn.ffn.run_forward` takes them;  norm, placement,
    eps valid;  out : (n, d) C-contiguous or None;  mean (LayerNorm), rstd : (n,) float64
    outputs or None (allocated);  hidden_out : where the FFN keeps its hidden (training without
    recompute), or None;  kept_out : (n, d) C-contiguous, where xn (pre, kept) or s (post,
    training) goes, or None.  ``training=False`` keeps nothing (xn or s and the norm
    statistics live in scratch).  Returns ``(y2, mean, rstd, xn, s, hidden, dead_units)``:
    xn (pre-LN) and s (post-LN) are None unless kept, hidden and dead_units as the FFN's.
    """
    n, d = x2.shape
    dtype = x2.dtype
    rms = norm == "rms"
    y2 = np.empty((n, d), dtype) if out is None else out
    if not training:
        stats = workspace("ffn_block.stats", 2 * n, np.float64)
        mean, rstd = (None if rms else stats[:n]), stats[n:2 * n]
    else:
        if mean is None and not rms:
            mean = np.empty(n, np.float64)
        if rstd is None:
            rstd = np.empty(n, np.float64)
    xn = s = None
    if placement == "pre":
        keep = training and not recompute
        if keep:
            xn2 = np.empty((n, d), dtype) if kept_out is None else kept_out
        else:
            xn2 = _scratch("ffn_block.xn", n, d, dtype)
        _norm_forward(norm, x2, norm_weight, norm_bias, eps, xn2, mean, rstd)
        _, hidden, dead = ffn_run_forward(xn2, w1, b1, w2, b2, activation, training=training,
                                          recompute=recompute, out=y2, residual=x2,
                                          hidden_out=hidden_out)
        xn = xn2 if keep else None
    else:
        if training:
            s2 = np.empty((n, d), dtype) if kept_out is None else kept_out
        else:
            s2 = _scratch("ffn_block.s", n, d, dtype)
        _, hidden, dead = ffn_run_forward(x2, w1, b1, w2, b2, activation, training=training,
                                          recompute=recompute, out=s2, residual=x2,
                                          hidden_out=hidden_out)
        _norm_forward(norm, s2, norm_weight, norm_bias, eps, y2, mean, rstd)
        s = s2 if training else None
    return y2, mean, rstd, xn, s, hidden, dead


def run_backward(dy2, x2, norm_weight, norm_bias, mean, rstd, xn2, s2, hidden, w1, b1, w2,
                 activation, norm, placement, eps, needs, *, out=(None,) * 7):
    """The sublayer's backward on checked arrays; trusts its arguments.

    dy2, x2 : (n, d) C-contiguous;  norm_weight, norm_bias, eps : the forward's;  mean (None
    for RMSNorm), rstd : (n,) float64 as the forward produced them;  xn2 : pre-LN's saved (n, d)
    normalised input, or None (recompute: rebuilt from x2 by the norm's forward, bitwise as the
    forward made it);  s2 : post-LN's (n, d) residual sum;  hidden : the FFN's saved hidden or
    None (recompute);  needs : seven bools aligned with GRAD_NAMES (False for a missing
    parameter);  out : seven buffers or None (dx as (n, d)).

    Returns the seven gradients, None where not needed; only the work they need runs (no FFN
    dx GEMM when neither dx nor a norm parameter gradient is needed, no norm backward when none
    of them is needed (pre-LN), no FFN backward when only the norm's grads are (post-LN)).
    Scratch: "ffn_block.xn" (recompute), "ffn_block.dxn" (pre-LN), "ffn_block.ds" (post-LN
    without dx), each (n, d), and the FFN's own blocks.
    """
    n, d = x2.shape
    dtype = x2.dtype
    hw, h = w1.shape[1], w2.shape[0]
    shapes = ((n, d), (d,), (d,), (d, hw), (hw,), (h, d), (d,))
    grads = [None] * 7
    for i, (need, shape) in enumerate(zip(needs, shapes)):
        if need:
            grads[i] = out[i] if out[i] is not None else np.empty(shape, dtype)
    dx, dnw, dnb, dw1, db1, dw2, db2 = grads
    ffn_w = (dw1, db1, dw2, db2)
    ffn_needs = tuple(g is not None for g in ffn_w)
    if placement == "pre":
        # dxn = ffn_backward(dy)[0];  dx = norm_backward(dxn) + dy  (one add + norm pass)
        need_dxn = dx is not None or dnw is not None or dnb is not None
        if need_dxn or any(ffn_needs):
            if xn2 is None:
                xn2 = _scratch("ffn_block.xn", n, d, dtype)
                stats = workspace("ffn_block.stats", 2 * n, np.float64)
                _norm_forward(norm, x2, norm_weight, norm_bias, eps, xn2,
                              None if mean is None else stats[:n], stats[n:2 * n])
            dxn = _scratch("ffn_block.dxn", n, d, dtype) if need_dxn else None
            ffn_run_backward(dy2, xn2, hidden, w1, b1, w2, activation,
                             (need_dxn,) + ffn_needs, out=(dxn,) + ffn_w)
            if need_dxn:
                _add_norm_backward(dxn, x2, norm_weight, mean, rstd,
                                   dy2 if dx is not None else None, dx, dnw, dnb)
    else:
        # ds = norm_backward(dy), written into dx;  dx += ffn_backward(ds)[0] in place
        need_ds = dx is not None or any(ffn_needs)
        ds = None
        if need_ds:
            ds = dx if dx is not None else _scratch("ffn_block.ds", n, d, dtype)
        if need_ds or dnw is not None or dnb is not None:
            _add_norm_backward(dy2, s2, norm_weight, mean, rstd, None, ds, dnw, dnb)
        if need_ds:
            ffn_run_backward(ds, x2, hidden, w1, b1, w2, activation,
                             (dx is not None,) + ffn_needs, out=(dx,) + ffn_w,
                             dx_accumulate=dx is not None)
    return tuple(grads)


# ---------------------------------------------------------------- public API
def ffn_block_forward(x, norm_weight, norm_bias, w1, b1, w2, b2, activation="relu", *,
                      norm="layer", placement="pre", eps=1e-5, recompute=False, out=None,
                      hidden_out=None, kept_out=None):
    """FFN sublayer forward, keeping what backward needs.

    ``pre``: ``y = x + ffn(norm(x))``;  ``post``: ``y = norm(x + ffn(x))``, with
    ``ffn(v) = act(v @ w1 + b1) @ w2 + b2`` and norm LayerNorm or RMSNorm over the last dim.
    The residual add rides on the second GEMM and the norm's backward adds the residual
    gradient in its own pass, so the sublayer makes no extra pass over memory.

    Parameters
    ----------
    x : ndarray of shape (..., d), float32 or float64
        Any layout; a non-contiguous x is copied once (and that copy is kept for backward).
    norm_weight : ndarray of shape (d,) or None
        The norm's scale.
    norm_bias : ndarray of shape (d,) or None
        The norm's shift; must be None for ``norm="rms"``.
    w1, b1, w2, b2 : ndarray or None
        As :func:`normffn.ffn_forward` takes them: ``w1`` (d, h) (gated: packed (d, 2h) =
        [gate | up], see :func:`normffn.pack_gated`), ``b1`` (h,) / (2h,) or None, ``w2``
        (h, d), ``b2`` (d,) or None; C- or F-ordered weights are read in place.
    activation : {"relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "reglu"}
        The FFN's activation.
    norm : {"layer", "rms"}
        LayerNorm or RMSNorm.
    placement : {"pre", "post"}
        Pre-LN (GPT-2 and later) or post-LN (the original Transformer).
    eps : float >= 0 and finite
        Default 1e-5, for both norms.  For ``norm="rms"`` also None: the dtype's machine
        epsilon (``torch``'s ``rms_norm`` default); for ``norm="layer"`` None is a TypeError.
    recompute : bool
        True keeps neither the normalised input (pre-LN) nor the FFN's hidden activation:
        backward recomputes them (one more GEMM and one norm pass, far less memory).
    out : ndarray of x's shape and dtype, C-contiguous, writeable, not overlapping an input
        Where to write y.
    hidden_out : ndarray of shape (n, w1.shape[1]), x's dtype, C-contiguous, writeable, or None
        Where to keep the FFN's hidden (recompute=False only; ``n = prod(x.shape[:-1])``), as
        :func:`normffn.ffn_forward` takes it: a training loop passes the previous step's
        ``ctx.hidden`` once that step's backward is done, so no step page-faults a fresh one.
    kept_out : ndarray of x's shape and dtype, C-contiguous, writeable, or None
        Where to keep the (n, d) array backward needs besides the hidden: the normalised input
        (``ctx.xn``, pre-LN; not with recompute=True) or the residual sum (``ctx.s``,
        post-LN); reused across steps as ``hidden_out`` is.

    Returns
    -------
    y : ndarray of x's shape and dtype
        ``out`` when given.
    ctx : FFNBlockContext
        ``ctx.mean`` (None for RMSNorm), ``ctx.rstd`` (float64, shape ``x.shape[:-1]``): the
        norm's statistics (of x pre-LN, of ``x + ffn(x)`` post-LN); ``ctx.dead_units`` for
        relu and reglu.

    Raises
    ------
    TypeError
        Non-float or mixed dtypes; norm, placement or activation not a str; recompute not a
        bool; eps not a number (None with norm="layer").
    ValueError
        norm not "layer"/"rms", placement not "pre"/"post", a norm_bias with norm="rms",
        norm_weight/norm_bias not (d,), eps negative or not finite, and everything
        :func:`normffn.ffn_forward` rejects (shapes of x, w1, b1, w2, b2, activation names, a
        bad ``out``).  Nothing is written when an argument is rejected.

    See Also
    --------
    ffn_block, ffn_block_backward, normffn.reference.ffn_block_forward

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((5, 8))
    >>> nw, nb = np.ones(8), np.zeros(8)
    >>> w1, b1 = rng.standard_normal((8, 16)), rng.standard_normal(16)
    >>> w2, b2 = rng.standard_normal((16, 8)), rng.standard_normal(8)
    >>> y, ctx = normffn.ffn_block_forward(x, nw, nb, w1, b1, w2, b2, "relu")   # pre-LN
    >>> xn = normffn.layer_norm(x, 8, nw, nb)
    >>> bool(np.allclose(y, x + normffn.ffn(xn, w1, b1, w2, b2)))
    True
    >>> y, ctx = normffn.ffn_block_forward(x, nw, None, w1, b1, w2, b2, norm="rms",
    ...                                    placement="post")
    >>> bool(np.allclose(y, normffn.rms_norm(x + normffn.ffn(x, w1, b1, w2, b2), 8, nw, 1e-5)))
    True
    """
    b = check_forward(x, norm_weight, norm_bias, w1, b1, w2, b2, activation, norm=norm,
                      placement=placement, eps=eps, recompute=recompute, out=out,
                      hidden_out=hidden_out, kept_out=kept_out)
    a = b.ffn
    lead = a.x.shape[:-1]
    mean = None if b.norm == "rms" else np.empty(lead, np.float64)
    rstd = np.empty(lead, np.float64)
    y2, _, _, xn, s, hidden, dead = run_forward(
        a.x2, b.norm_weight, b.norm_bias, a.w1, a.b1, a.w2, a.b2, a.activation, b.norm,
        b.placement, b.eps, training=True, recompute=a.recompute,
        out=None if b.out is None else b.out.reshape(a.n, a.d),
        mean=None if mean is None else mean.reshape(a.n), rstd=rstd.reshape(a.n),
        hidden_out=a.hidden_out,
        kept_out=None if b.kept_out is None else b.kept_out.reshape(a.n, a.d))
    ctx = FFNBlockContext._build({
        "x": a.x, "norm_weight": b.norm_weight, "norm_bias": b.norm_bias, "w1": a.w1,
        "b1": a.b1, "w2": a.w2, "b2": a.b2, "activation": a.activation, "norm": b.norm,
        "placement": b.placement, "eps": b.eps, "recompute": a.recompute, "mean": mean,
        "rstd": rstd, "xn": None if xn is None else _kept(xn, b.kept_out, a.x.shape),
        "s": None if s is None else _kept(s, b.kept_out, a.x.shape), "hidden": hidden,
        "dead_units": dead})
    return (b.out if b.out is not None else y2.reshape(a.x.shape)), ctx


def _kept(a2, kept_out, shape):
    """The kept (n, d) array in x's shape: ``kept_out`` itself when the caller gave it (so the
    next step can hand the very same object back), else a view of ``a2``."""
    return kept_out if kept_out is not None else a2.reshape(shape)


def ffn_block(x, norm_weight, norm_bias, w1, b1, w2, b2, activation="relu", *, norm="layer",
              placement="pre", eps=1e-5, out=None):
    """FFN sublayer inference: ``x + ffn(norm(x))`` (pre) or ``norm(x + ffn(x))`` (post).

    Keeps nothing: the extra memory is one (n, d) scratch buffer (the normalised input, or the
    residual sum) and the FFN's hidden block.

    Parameters
    ----------
    x : ndarray of shape (..., d), float32 or float64
        Any layout.
    norm_weight, norm_bias : ndarray of shape (d,) or None
        The norm's parameters (``norm_bias`` None for ``norm="rms"``).
    w1, b1, w2, b2 : ndarray or None
        The FFN's parameters, as :func:`normffn.ffn` takes them.
    activation : {"relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "reglu"}
        The FFN's activation.
    norm : {"layer", "rms"}
        LayerNorm or RMSNorm.
    placement : {"pre", "post"}
        Where the norm sits.
    eps : float >= 0 and finite, or None (RMSNorm only)
        The norm's eps.
    out : ndarray of x's shape and dtype, C-contiguous, writeable, not overlapping an input
        Where to write y.

    Returns
    -------
    y : ndarray of x's shape and dtype
        ``out`` when given.

    Raises
    ------
    TypeError
        As :func:`ffn_block_forward`.
    ValueError
        As :func:`ffn_block_forward`.

    See Also
    --------
    ffn_block_forward, normffn.reference.ffn_block

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    >>> w1, b1 = normffn.pack_gated(rng.standard_normal((8, 12)), rng.standard_normal((8, 12)))
    >>> w1, w2 = w1.astype(np.float32), rng.standard_normal((12, 8)).astype(np.float32)
    >>> y = normffn.ffn_block(x, np.ones(8, np.float32), None, w1, None, w2, None, "swiglu",
    ...                       norm="rms")
    >>> y.shape, y.dtype
    ((2, 3, 8), dtype('float32'))
    >>> y_ref = normffn.reference.ffn_block(x, np.ones(8, np.float32), None, w1, None, w2, None,
    ...                                     "swiglu", norm="rms")
    >>> bool(np.allclose(y, y_ref, rtol=1e-4, atol=1e-4))
    True
    """
    b = check_forward(x, norm_weight, norm_bias, w1, b1, w2, b2, activation, norm=norm,
                      placement=placement, eps=eps, out=out)
    a = b.ffn
    y2 = run_forward(a.x2, b.norm_weight, b.norm_bias, a.w1, a.b1, a.w2, a.b2, a.activation,
                     b.norm, b.placement, b.eps,
                     out=None if b.out is None else b.out.reshape(a.n, a.d))[0]
    return b.out if b.out is not None else y2.reshape(a.x.shape)


def ffn_block_backward(dy, ctx, *, out=None, needs=None):
    """Gradients of the FFN sublayer given ``dy = dL/dy``.

    Pre-LN: ``(dxn, dw1, db1, dw2, db2) = ffn_backward(dy)`` at ``xn = norm(x)``,
    ``(dxnorm, dnorm_weight, dnorm_bias) = norm_backward(dxn)``, ``dx = dy + dxnorm``.
    Post-LN: ``(ds, dnorm_weight, dnorm_bias) = norm_backward(dy)`` at ``s = x + ffn(x)``,
    ``(dxf, dw1, ...) = ffn_backward(ds)``, ``dx = ds + dxf``.  The norm's parameter
    gradients are float64 sums over fixed row blocks added in a fixed order, and db1/db2
    float64 sums in row order (identical for any thread count); dw1/dw2 are accumulated by BLAS
    block after block (as deterministic as the BLAS itself).  With 0 rows the parameter
    gradients are zeros.

    Parameters
    ----------
    dy : ndarray of the forward output's shape and dtype
        Any layout.
    ctx : FFNBlockContext
        From :func:`ffn_block_forward`.
    out : tuple of 7 (ndarray or None), optional
        Preallocated ``(dx, dnorm_weight, dnorm_bias, dw1, db1, dw2, db2)`` in the shapes
        below (C-contiguous, writeable, x's dtype, overlapping no input and no other output;
        ``dw1``/``dw2`` may also be the transpose of a C-contiguous array, ``nn.Linear``'s
        layout); None entries are allocated; entries for gradients not computed are left
        untouched.
    needs : tuple of 7 bools, optional
        Which of ``(dx, dnorm_weight, dnorm_bias, dw1, db1, dw2, db2)`` to compute; default:
        every one whose parameter exists.  The others are returned as None and their work is
        skipped.

    Returns
    -------
    dx : ndarray of x's shape
        The input gradient.
    dnorm_weight, dnorm_bias : ndarray of shape (d,), or None
        None where the parameter is None or not needed.
    dw1, db1, dw2, db2 : ndarray or None
        As :func:`normffn.ffn_backward` returns them (C-contiguous).

    Raises
    ------
    TypeError
        ctx not an FFNBlockContext; dy not float or not x's dtype; ``needs`` malformed.
    ValueError
        dy of the wrong shape; an inconsistent ctx; ``out`` not 7 entries or a bad buffer.

    See Also
    --------
    ffn_block_forward, normffn.reference.ffn_block_backward

    Examples
    --------
    >>> import numpy as np
    >>> import normffn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((6, 4))
    >>> args = (np.ones(4), np.zeros(4), rng.standard_normal((4, 8)), np.zeros(8),
    ...         rng.standard_normal((8, 4)), np.zeros(4), "gelu")
    >>> y, ctx = normffn.ffn_block_forward(x, *args, placement="post")
    >>> dy = rng.standard_normal(y.shape)
    >>> grads = normffn.ffn_block_backward(dy, ctx)
    >>> len(grads), grads[0].shape
    (7, (6, 4))
    >>> _, rctx = normffn.reference.ffn_block_forward(x, *args, placement="post")
    >>> ref = normffn.reference.ffn_block_backward(dy, rctx)
    >>> all(bool(np.allclose(g, r)) for g, r in zip(grads, ref))
    True
    """
    ctx, dy2, needs, outs = check_backward(dy, ctx, out=out, needs=needs)
    n, d = dy2.shape
    grads = run_backward(
        dy2, ctx.x.reshape(n, d), ctx.norm_weight, ctx.norm_bias,
        None if ctx.mean is None else ctx.mean.reshape(n), ctx.rstd.reshape(n),
        None if ctx.xn is None else ctx.xn.reshape(n, d),
        None if ctx.s is None else ctx.s.reshape(n, d), ctx.hidden, ctx.w1, ctx.b1, ctx.w2,
        ctx.activation, ctx.norm, ctx.placement, ctx.eps, needs, out=outs)
    dx = grads[0]
    if dx is not None:
        dx = out[0] if outs[0] is not None else dx.reshape(ctx.shape)
    return (dx,) + tuple(grads[1:])
