"""The op registry: everything the tools need to know about an op, written once.

``python -m normffn bench``, ``python -m normffn compare``, the asv suite (``benchmarks/``),
the fuzz worker and the generic reference test (``tests/test_ops_generic.py``) all read
:data:`OPS`; none of them names an op's arguments, torch twin or tolerance itself.  A new op is
ONE :class:`Op` entry here (plus its own module, kernel, tests and a line in ``__init__``).

What an entry gives (see :class:`Op` for the fields):

* shapes: the named bench shapes (``bench_shapes``; the first ones are ``bench``'s default),
  a small ``test_shape`` for ``compare`` and the tests, and ``shape_format`` / ``ndims``, from
  which :meth:`Op.parse_shape` validates ``--shape`` strings with a clear message;
* ``make_inputs(shape, dtype, kind, seed, variant) -> Inputs``: seeded arguments of the forward
  call (in signature order), an upstream gradient ``dy``, and what the tolerance needs (rows
  summed by weight gradients, conditioning); ``kind`` is one of :data:`INPUT_KINDS`;
* the callables: normffn's and :mod:`normffn.reference`'s are found by name (the reference
  mirrors the API name for name: ``op``, ``op_forward``, ``op_backward``; ``api`` when the
  entry's name is not the function's, e.g. ``ffn_gated`` -> ``ffn``); ``kwonly`` names the
  arguments that are keyword-only (``ffn_block``'s norm / placement / eps / recompute:
  callers split ``Inputs.args`` with :meth:`Op.split_args`), with flags saying
  which take ``out=`` (``backward_out``: ``"first"`` = the first gradient, ``"all"`` = a
  tuple aligned with ``grads``); ``forward_reuse`` names ctx fields a training loop passes
  back to the next forward as ``<field>_out=`` (FFN: ``hidden``); ``torch(inputs) -> TorchOp``
  builds PyTorch's twin (torch imported lazily, only when called);
* output names: ``outputs`` (forward: ``op`` returns them, a tuple when there are several,
  ``op_forward`` returns them followed by ctx, and ``out=`` is one buffer per output),
  ``stats`` (ctx fields compared), ``state`` (arguments updated in place, e.g. running
  stats), ``grads`` (backward, aligned with the returned tuple); further backward arguments
  (add + norm's ``ds``) travel in ``Inputs.grad_kwargs``;
* ``tolerance`` class (``"norm"`` or ``"gemm"``) and ``row_sums`` (outputs summed over batch
  rows), read by :func:`documented_tolerance`;
* ``variants``: configurations compared and tested (BatchNorm train / eval, FFN activations);
* ``bench_cases``: what ``bench`` times per shape (a case may be limited to some named bench
  shapes: ``ffn_block`` times ReLU at 2048x768x3072 and SwiGLU at 2048x768x2048), and the
  rate model: ``unit``, ``work(shape, itemsize, call[, gated=True])`` and ``limit`` (the
  machine-limit probe: ``"copy"`` of the bytes the forward moves, or ``"gemm"``: the FFN's
  bare GEMMs, x·w1 of width 2h when the case's activation is gated, see :func:`case_gated`);
* ``unfused(inputs, call) -> callable``: the op composed from other ops' public calls, timed
  by ``bench`` as ``normffn unfused`` (``ffn_block``: ``layer_norm`` / ``add_layer_norm`` +
  ``ffn``, what users wrote by hand before the fused op);
* ``step_alloc(shape, itemsize)``: bytes a buffer-reusing training step (``normffn out=``
  fwd+bwd) still allocates because the API takes no buffer for them (``ffn_block``: the kept
  ``xn`` or ``s`` and the statistics); the generic test allows exactly that much.

This module imports only NumPy and :mod:`normffn.testing` at import time (no op module, no
torch), so every tool may import it without cycles; ops are resolved when called.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .testing import tolerance

__all__ = ["Op", "Inputs", "BenchCase", "TorchOp", "OPS", "INPUT_KINDS", "get",
           "documented_tolerance", "bench_callable", "bench_providers", "bench_inputs",
           "copy_probe", "gemm_probe", "limit_probe", "limit_work", "case_work", "case_gated",
           "channels_last",
           "torch_or_none", "forward_out_buffers", "backward_out_buffers", "split_forward"]


# ---------------------------------------------------------------- input kinds
def _normal(rng, shape):
    return rng.standard_normal(shape)


def _large_offset(rng, shape):
    return 1e4 + 0.1 * rng.standard_normal(shape)


def _tiny_variance(rng, shape):
    return 1e3 + 1e-3 * rng.standard_normal(shape)


def _nan_row(rng, shape):
    a = rng.standard_normal(shape)
    a.reshape(shape[0], -1)[min(1, shape[0] - 1), 0] = np.nan
    return a


#: kind -> f(rng, shape) -> float64 values of x
INPUT_KINDS = {"normal": _normal, "large_offset": _large_offset,
               "tiny_variance": _tiny_variance, "nan_row": _nan_row}


def channels_last(a: np.ndarray) -> np.ndarray:
    """The same values with the channel axis (1) innermost in memory (PyTorch's
    ``channels_last``): a view of a C-contiguous (N, ..., C) array."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def torch_or_none():
    """``torch`` if it imports, else None (torch is optional)."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - any import failure means "absent"
        return None
    return torch


def _condition(x, axis) -> float:
    """max |mean| / std over the normalised groups (the conditioning of x - mean)."""
    with np.errstate(all="ignore"):
        x = np.asarray(x, dtype=np.float64)
        m, sd = np.nanmean(x, axis=axis), np.nanstd(x, axis=axis)
        c = np.abs(m) / np.maximum(sd, 1e-300)
    c = c[np.isfinite(c)]
    return float(c.max()) if c.size else 1.0


# ---------------------------------------------------------------- entry structure
@dataclass
class Inputs:
    """Seeded arguments of one op call.

    ``args``: the forward arguments by name, in signature order (``op(*args.values())``);
    ``dy``: the upstream gradient; ``rows``: how many batch rows a weight gradient sums;
    ``condition``: max |mean| / std of the normalised groups (1 where it does not apply);
    ``grad_kwargs``: further keyword arguments of the backward (add + norm: ``ds``, the
    gradient reaching ``s``)."""

    args: dict
    dy: np.ndarray
    rows: int = 1
    condition: float = 1.0
    grad_kwargs: dict = field(default_factory=dict)


@dataclass
class TorchOp:
    """PyTorch's twin of one op on fixed inputs (tensors converted once).

    ``forward()``, ``backward()`` and ``fwd_bwd()`` are what ``bench`` times (``backward`` may
    be None where PyTorch has no separate backward call, e.g. the FFN's autograd graph);
    ``forward_outputs()`` / ``backward_outputs()`` run once and return name -> ndarray with the
    registry's output names, for ``compare``."""

    forward: Callable
    fwd_bwd: Callable
    forward_outputs: Callable
    backward_outputs: Callable
    backward: Callable | None = None


@dataclass(frozen=True)
class BenchCase:
    """One row of ``bench``'s table for each shape.

    ``call``: ``"forward"``, ``"backward"`` or ``"fwd+bwd"``; ``variant``: key of
    ``Op.variants`` (forward keyword overrides); ``layout``: ``"channels_last"`` relays x and dy
    (shapes with ``min_ndim`` dims or more only); ``extra``: further normffn providers, label ->
    keyword overrides of the forward call (e.g. ``{"normffn recompute": {"recompute": True}}``);
    ``torch_label``: the torch column's name in the JSON (the table always says "torch");
    ``shapes``: names of the op's bench shapes this case is timed at (empty: every shape; at a
    shape that is not a named bench shape, e.g. ``--shape 6x8x16``, every case runs)."""

    direction: str
    call: str
    variant: str = ""
    layout: str = "contiguous"
    min_ndim: int = 0
    extra: dict = field(default_factory=dict)
    torch_label: str = "torch"
    shapes: tuple = ()


@dataclass(frozen=True)
class Op:
    """One op, as the tools see it (the module docstring lists what each field is for)."""

    name: str
    shape_format: str                 # "NxD": shown in messages and --help
    ndims: tuple                      # accepted len(shape) for --shape
    bench_shapes: dict                # name -> shape; `bench`'s defaults are the `default` ones
    default_shapes: tuple             # names of bench_shapes run by default
    test_shape: tuple                 # small shape for compare and the generic test
    make_inputs: Callable             # (shape, dtype, kind, seed, variant) -> Inputs
    torch: Callable | None            # (Inputs, variant) -> TorchOp
    outputs: tuple = ("y",)
    stats: tuple = ()                 # ctx fields compared against the reference's ctx
    state: tuple = ()                 # args updated in place by forward (compared too)
    grads: tuple = ()
    forward_out: bool = True          # op(..., out=) exists (one buffer per output)
    backward_out: str = "first"       # op_backward(..., out=): "first" grad, "all", "" none
    forward_reuse: tuple = ()         # ctx fields passed back to forward as <field>_out=
    tolerance: str = "norm"           # "norm" or "gemm" (documented_tolerance)
    row_sums: tuple = ()              # outputs summed over batch rows (atol * sqrt(rows))
    variants: dict = field(default_factory=lambda: {"": {}})
    bench_cases: tuple = ()
    unit: str = "GB/s"                # rate unit: "GB/s" or "GFLOP/s"
    work: Callable = None             # (shape, itemsize, call) -> bytes or flops per call
    limit: str = "copy"               # machine-limit probe: "copy" or "gemm"
    api: str = ""                     # function name when not `name` (ffn_gated -> ffn)
    module: str = "normffn"
    kwonly: tuple = ()                # keyword-only arguments (split_args)
    step_alloc: Callable = None       # (shape, itemsize) -> bytes a reusing step allocates
    unfused: Callable = None          # (Inputs, call) -> callable: bench's "normffn unfused"

    def split_args(self, args: dict) -> tuple[tuple, dict]:
        """``Inputs.args`` (or any name -> value dict in signature order) -> ``(positional,
        keyword)`` for calling the op's functions: ``f(*pos, **kw)``."""
        pos = tuple(v for k, v in args.items() if k not in self.kwonly)
        return pos, {k: v for k, v in args.items() if k in self.kwonly}

    # -- callables, by name (normffn and normffn.reference share the names)
    def function(self, provider: str, entry: str = "") -> Callable:
        """``provider`` ``"normffn"`` or ``"reference"``; ``entry`` ``""`` (the op),
        ``"forward"`` or ``"backward"``."""
        mod = importlib.import_module("normffn" if provider == "normffn"
                                      else "normffn.reference")
        return getattr(mod, (self.api or self.name) + (f"_{entry}" if entry else ""))

    def parse_shape(self, text) -> tuple:
        """``"8192x768"`` (or a bench-shape name, or a tuple) -> (8192, 768); ``ValueError``
        with this op's format otherwise."""
        if not isinstance(text, str):
            shape = tuple(int(v) for v in text)
        elif text in self.bench_shapes:
            return tuple(self.bench_shapes[text])
        else:
            parts = text.lower().replace("×", "x").replace(",", "x").split("x")
            try:
                shape = tuple(int(p) for p in parts)
            except ValueError:
                raise ValueError(f"{self.name} shapes are {self.shape_format}, got {text!r}"
                                 ) from None
        if len(shape) not in self.ndims or min(shape) < 1:
            got = text if isinstance(text, str) else "x".join(map(str, shape))
            raise ValueError(f"{self.name} shapes are {self.shape_format}, got {got}")
        return shape

    def cases_for(self, shape) -> list:
        """The bench cases timed at ``shape`` (``min_ndim``; a case limited to some named
        bench shapes is left out at the op's other named shapes)."""
        shape = tuple(shape)
        named = [k for k, v in self.bench_shapes.items() if tuple(v) == shape]
        return [c for c in self.bench_cases if len(shape) >= c.min_ndim and
                (not c.shapes or not named or any(k in c.shapes for k in named))]


# ---------------------------------------------------------------- tolerance
def documented_tolerance(op: str, output: str, dtype, rows: int = 1,
                         condition: float = 1.0) -> tuple[float, float]:
    """``(rtol, atol)`` normffn promises for ``output`` of ``op`` (see
    :func:`normffn.testing.assert_close` for how they combine).

    Tolerance class ``"norm"``: :func:`normffn.testing.tolerance` per dtype; data with a large
    offset (``condition = max |mean| / std`` of the normalised groups) adds
    ``8 * eps64 * condition`` to atol (the float64 mean itself is only good to half an ulp of
    ``|mean|``, which moves ``xhat`` by ``eps64 * condition`` in the reference as much as in
    normffn).  Class ``"gemm"`` in float32: ``1e-4`` relative to the output's scale (GEMMs
    accumulate in float32 inside BLAS).  Outputs summed over ``rows`` batch rows (the entry's
    ``row_sums``: dweight, dbias, dw1, ...): atol grows like ``sqrt(rows)``.
    """
    entry = get(op.split("[")[0])
    rtol, atol = tolerance(dtype)
    atol += 8 * np.finfo(np.float64).eps * condition
    if entry.tolerance == "gemm" and np.dtype(dtype) == np.float32:
        rtol, atol = 1e-4, 1e-4
    if output in entry.row_sums:
        atol = atol * math.sqrt(max(rows, 1))
    return rtol, atol


# ---------------------------------------------------------------- machine-limit probes
def copy_probe(nbytes: int) -> Callable:
    """A callable copying ``nbytes`` with all threads (memcpy per thread chunk): the copy
    bandwidth the norms are measured against.  Work per call: ``2 * nbytes``."""
    from ._kernels import _bench

    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    return lambda: _bench.parallel_copy(dst, src)


def gemm_probe(n: int, d: int, h: int, dtype, backward: bool, seed: int = 0,
               gated: bool = False) -> Callable:
    """A callable running the FFN's bare GEMMs (2 forward, 6 forward + backward) with scipy's
    BLAS (the BLAS normffn calls) on preallocated buffers: the FFN's machine limit.  ``gated``:
    the first layer is 2h wide (``x @ w1`` with w1 (d, 2h); its backward GEMMs as wide), the
    second h."""
    from scipy.linalg import blas

    rng = np.random.default_rng(seed)
    gemm = blas.sgemm if np.dtype(dtype) == np.float32 else blas.dgemm

    def fmat(m):  # (array BLAS reads as is, transpose flag) for a 2-D operand
        return (m, 0) if m.flags.f_contiguous else (m.T, 1)

    def mm(a, b, c):  # row-major c = a @ b  <=>  column-major c^T = b^T a^T
        bb, tb = fmat(b.T)
        aa, ta = fmat(a.T)
        gemm(1.0, bb, aa, beta=0.0, c=c.T, trans_a=tb, trans_b=ta, overwrite_c=1)

    hw = 2 * h if gated else h
    x, dy = (rng.standard_normal((n, d)).astype(dtype) for _ in range(2))
    w1 = rng.standard_normal((d, hw)).astype(dtype)
    w2 = rng.standard_normal((h, d)).astype(dtype)
    v, dv = np.empty((n, hw), dtype), np.empty((n, hw), dtype)   # pre-activation, its grad
    # the (n, h) hidden and dA: the same buffers as v, dv for a plain FFN
    hid, dhid = (np.empty((n, h), dtype), np.empty((n, h), dtype)) if gated else (v, dv)
    y, dx = np.empty((n, d), dtype), np.empty((n, d), dtype)
    dw1, dw2 = np.empty((d, hw), dtype), np.empty((h, d), dtype)

    def fwd():
        mm(x, w1, v)
        mm(hid, w2, y)

    def fwd_bwd():
        fwd()
        mm(dy, w2.T, dhid)
        mm(hid.T, dy, dw2)
        mm(dv, w1.T, dx)
        mm(x.T, dv, dw1)

    return fwd_bwd if backward else fwd


def case_gated(op: "Op", case: "BenchCase") -> bool:
    """Whether ``case`` runs a gated activation (its first GEMM is 2h wide)."""
    return op.variants.get(case.variant, {}).get("activation") in GATED_ACTIVATIONS


def case_work(op: "Op", case: "BenchCase", shape, dtype, call: str | None = None) -> float:
    """Work per call of one case (bytes or flops, ``op.unit``); ``call`` overrides the case's."""
    itemsize = np.dtype(dtype).itemsize
    if case_gated(op, case):
        return float(op.work(shape, itemsize, call or case.call, gated=True))
    return float(op.work(shape, itemsize, call or case.call))


def limit_work(op: "Op", shape, dtype, case: "BenchCase") -> float:
    """Work per call of the machine-limit probe of one case: the op's own flops for the GEMM
    probe; for the copy probe, the bytes the op's forward moves (read and written: 2·numel·
    itemsize for a norm, 4· for add + norm, which reads x and residual and writes y and s)."""
    if op.limit == "gemm":
        return case_work(op, case, shape, dtype)
    return case_work(op, case, shape, dtype, "forward")


def limit_probe(op: "Op", shape, dtype, case: "BenchCase"):
    """(probe name, zero-argument callable, work per call) of the machine limit for one case."""
    work = limit_work(op, shape, dtype, case)
    if op.limit == "gemm":
        n, d, h = shape
        return "gemm", gemm_probe(n, d, h, dtype, case.call != "forward",
                                  gated=case_gated(op, case)), work
    return "copy", copy_probe(int(work) // 2), work


# ---------------------------------------------------------------- LayerNorm
def _layer_norm_inputs(shape, dtype, kind="normal", seed=0, variant=""):
    rng = np.random.default_rng(seed)
    d = shape[-1]
    x = INPUT_KINDS[kind](rng, shape).astype(dtype)
    w = (1 + 0.1 * rng.standard_normal(d)).astype(dtype)
    b = (0.1 * rng.standard_normal(d)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return Inputs({"x": x, "normalized_shape": d, "weight": w, "bias": b, "eps": 1e-5}, dy,
                  rows=x.size // d, condition=_condition(x, axis=-1))


def _np(t):
    return None if t is None else t.detach().numpy()


def _layer_norm_torch(inp: Inputs, variant="") -> TorchOp:
    import torch

    a = inp.args
    d = a["normalized_shape"]
    lead = a["x"].shape[:-1]
    xt, wt, bt, dyt = (torch.from_numpy(v) for v in (a["x"], a["weight"], a["bias"], inp.dy))
    F = torch.nn.functional
    _, mt, rt = torch.native_layer_norm(xt, [d], wt, bt, a["eps"])
    mask = [True, True, True]

    def forward():
        return F.layer_norm(xt, [d], wt, bt, a["eps"])

    def backward():
        return torch.ops.aten.native_layer_norm_backward(dyt, xt, [d], mt, rt, wt, bt, mask)

    def fwd_bwd():
        _, m, r = torch.native_layer_norm(xt, [d], wt, bt, a["eps"])
        return torch.ops.aten.native_layer_norm_backward(dyt, xt, [d], m, r, wt, bt, mask)

    def forward_outputs():
        y, m, r = torch.native_layer_norm(xt, [d], wt, bt, a["eps"])
        return {"y": _np(y), "mean": _np(m).reshape(lead), "rstd": _np(r).reshape(lead)}

    def backward_outputs():
        return dict(zip(("dx", "dweight", "dbias"), map(_np, backward())))

    return TorchOp(forward, fwd_bwd, forward_outputs, backward_outputs, backward)


def _norm_work(shape, itemsize, call):
    """Norms: forward moves 2·numel·itemsize (read x, write y), backward 3· (x, dy, dx)."""
    nbytes = math.prod(shape) * itemsize
    return {"forward": 2, "backward": 3, "fwd+bwd": 5}[call] * nbytes


LAYER_NORM = Op(
    name="layer_norm",
    shape_format="NxD (rows x normalized size)",
    ndims=(2,),
    bench_shapes={"8192x768": (8192, 768), "2048x4096": (2048, 4096),
                  "4096x1024": (4096, 1024), "1000x769": (1000, 769), "3x1": (3, 1),
                  "65536x96": (65536, 96)},
    default_shapes=("8192x768", "2048x4096"),
    test_shape=(64, 768),
    make_inputs=_layer_norm_inputs,
    torch=_layer_norm_torch,
    stats=("mean", "rstd"),
    grads=("dx", "dweight", "dbias"),
    row_sums=("dweight", "dbias"),
    bench_cases=(BenchCase("forward", "forward"), BenchCase("backward", "backward")),
    work=_norm_work,
)


# ---------------------------------------------------------------- BatchNorm
def _batch_norm_inputs(shape, dtype, kind="normal", seed=0, variant="train"):
    rng = np.random.default_rng(seed)
    C = shape[1]
    training = variant != "eval"
    axes = (0,) + tuple(range(2, len(shape)))
    x = INPUT_KINDS[kind](rng, shape).astype(dtype)
    w = (1 + 0.1 * rng.standard_normal(C)).astype(dtype)
    b = (0.1 * rng.standard_normal(C)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    rm = (0.1 * rng.standard_normal(C)).astype(dtype)
    rv = (1 + 0.1 * rng.random(C)).astype(dtype)
    if not training and kind != "normal":   # running stats that match the data's scale
        with np.errstate(all="ignore"):
            rm = np.nanmean(x, axis=axes).astype(dtype)
            rv = np.nanvar(x, axis=axes).astype(dtype) + dtype(1e-3)
    return Inputs({"x": x, "running_mean": rm, "running_var": rv, "weight": w, "bias": b,
                   "training": training, "momentum": 0.1, "eps": 1e-5}, dy,
                  rows=x.size // C, condition=_condition(x, axis=axes))


def _batch_norm_torch(inp: Inputs, variant="train") -> TorchOp:
    import torch

    a = inp.args
    cl = a["x"].ndim >= 3 and not a["x"].flags.c_contiguous
    xt, wt, bt, dyt = (torch.from_numpy(v) for v in (a["x"], a["weight"], a["bias"], inp.dy))
    if cl and a["x"].ndim == 4:   # from_numpy keeps the strides; say the format all the same
        xt = xt.contiguous(memory_format=torch.channels_last)
        dyt = dyt.contiguous(memory_format=torch.channels_last)
    rmt = torch.from_numpy(a["running_mean"].copy())
    rvt = torch.from_numpy(a["running_var"].copy())
    tr, mom, eps = a["training"], a["momentum"], a["eps"]
    F = torch.nn.functional
    _, mt, st = torch.ops.aten.native_batch_norm(xt, wt, bt, rmt.clone(), rvt.clone(), tr, mom,
                                                 eps)
    mask = [True, True, True]

    def forward():
        return F.batch_norm(xt, rmt, rvt, wt, bt, tr, mom, eps)

    def backward():
        return torch.ops.aten.native_batch_norm_backward(dyt, xt, wt, rmt, rvt, mt, st, tr, eps,
                                                         mask)

    def fwd_bwd():
        _, m, s = torch.ops.aten.native_batch_norm(xt, wt, bt, rmt, rvt, tr, mom, eps)
        return torch.ops.aten.native_batch_norm_backward(dyt, xt, wt, rmt, rvt, m, s, tr, eps,
                                                         mask)

    def forward_outputs():
        rm0 = torch.from_numpy(a["running_mean"].copy())
        rv0 = torch.from_numpy(a["running_var"].copy())
        y, m, s = torch.ops.aten.native_batch_norm(xt, wt, bt, rm0, rv0, tr, mom, eps)
        out = {"y": _np(y)}
        if tr:   # in eval PyTorch returns empty batch statistics
            out.update(mean=_np(m), rstd=_np(s), running_mean=_np(rm0), running_var=_np(rv0))
        return out

    def backward_outputs():
        return dict(zip(("dx", "dweight", "dbias"), map(_np, backward())))

    return TorchOp(forward, fwd_bwd, forward_outputs, backward_outputs, backward)


BATCH_NORM = Op(
    name="batch_norm",
    shape_format="NxC, NxCxL or NxCxHxW (channels on axis 1)",
    ndims=(2, 3, 4),
    bench_shapes={"32x64x56x56": (32, 64, 56, 56), "8192x768": (8192, 768)},
    default_shapes=("32x64x56x56", "8192x768"),
    test_shape=(8, 16, 12, 12),
    make_inputs=_batch_norm_inputs,
    torch=_batch_norm_torch,
    stats=("mean", "rstd"),
    state=("running_mean", "running_var"),
    grads=("dx", "dweight", "dbias"),
    row_sums=("dweight", "dbias", "running_mean", "running_var"),
    variants={"train": {"training": True}, "eval": {"training": False}},
    bench_cases=(BenchCase("fwd train", "forward", "train"),
                 BenchCase("fwd eval", "forward", "eval"),
                 BenchCase("backward", "backward", "train"),
                 BenchCase("fwd NHWC", "forward", "train", layout="channels_last", min_ndim=3,
                           torch_label="torch channels_last")),
    work=_norm_work,
)


# ---------------------------------------------------------------- FFN
FFN_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")


def _ffn_inputs(shape, dtype, kind="normal", seed=0, variant="relu"):
    rng = np.random.default_rng(seed)
    n, d, h = shape
    x = INPUT_KINDS[kind](rng, (n, d))
    if kind in ("large_offset", "tiny_variance"):   # an offset input, at a scale a GEMM keeps
        x = x / np.abs(np.nanmean(x))
    x = x.astype(dtype)
    w1 = (rng.standard_normal((d, h)) / math.sqrt(d)).astype(dtype)
    b1 = (0.1 * rng.standard_normal(h)).astype(dtype)
    w2 = (rng.standard_normal((h, d)) / math.sqrt(h)).astype(dtype)
    b2 = (0.1 * rng.standard_normal(d)).astype(dtype)
    dy = rng.standard_normal((n, d)).astype(dtype)
    return Inputs({"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2,
                   "activation": variant or "relu"}, dy, rows=n)


def _ffn_torch(inp: Inputs, variant="relu") -> TorchOp:
    import torch

    a = inp.args
    F = torch.nn.functional
    gate = _GATES.get(a["activation"])       # gated: Linear -> chunk -> act(g) * u -> Linear
    act = {"relu": torch.relu, "silu": F.silu, "gelu": F.gelu,
           "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}[gate or a["activation"]]

    def hidden(v):
        if gate is None:
            return act(v)
        g, u = v.chunk(2, dim=-1)
        return act(g) * u

    # nn.Linear's layout: weight (out, in); same values as w1, w2
    W1 = torch.from_numpy(np.ascontiguousarray(a["w1"].T)).requires_grad_()
    W2 = torch.from_numpy(np.ascontiguousarray(a["w2"].T)).requires_grad_()
    B1 = None if a["b1"] is None else torch.from_numpy(a["b1"].copy()).requires_grad_()
    B2 = None if a["b2"] is None else torch.from_numpy(a["b2"].copy()).requires_grad_()
    xt = torch.from_numpy(a["x"]).requires_grad_()
    dyt = torch.from_numpy(inp.dy)
    params = [p for p in (xt, W1, B1, W2, B2) if p is not None]

    def forward():
        with torch.no_grad():
            return F.linear(hidden(F.linear(xt, W1, B1)), W2, B2)

    def fwd_bwd():
        for p in params:
            p.grad = None
        F.linear(hidden(F.linear(xt, W1, B1)), W2, B2).backward(dyt)

    def forward_outputs():
        return {"y": _np(forward())}

    def backward_outputs():
        fwd_bwd()
        g = lambda p, t=False: None if p is None else (_np(p.grad).T if t else _np(p.grad))  # noqa: E731
        return {"dx": g(xt), "dw1": g(W1, True), "db1": g(B1), "dw2": g(W2, True), "db2": g(B2)}

    return TorchOp(forward, fwd_bwd, forward_outputs, backward_outputs, None)


def _ffn_work(shape, itemsize, call, gated=False):
    """FFN GEMM flops: x·w1 is 2·n·d·hw (hw = h, or 2h gated), hidden·w2 2·n·h·d; forward +
    backward 3x the forward (each GEMM has two backward GEMMs)."""
    n, d, h = shape
    hw = 2 * h if gated else h
    return {"forward": 1, "fwd+bwd": 3}[call] * (2.0 * n * d * hw + 2.0 * n * h * d)


FFN = Op(
    name="ffn",
    shape_format="NxDxH (rows x model dim x hidden dim)",
    ndims=(3,),
    bench_shapes={"2048x768x3072": (2048, 768, 3072), "8192x512x2048": (8192, 512, 2048),
                  "512x1024x4096": (512, 1024, 4096)},
    default_shapes=("2048x768x3072", "8192x512x2048", "512x1024x4096"),
    test_shape=(64, 96, 256),
    make_inputs=_ffn_inputs,
    torch=_ffn_torch,
    grads=("dx", "dw1", "db1", "dw2", "db2"),
    backward_out="all",
    forward_reuse=("hidden",),
    tolerance="gemm",
    row_sums=("dw1", "db1", "dw2", "db2"),
    variants={a: {"activation": a} for a in FFN_ACTIVATIONS},
    bench_cases=(BenchCase("forward", "forward", "relu"),
                 BenchCase("fwd+bwd", "fwd+bwd", "relu",
                           extra={"normffn recompute": {"recompute": True}})),
    unit="GFLOP/s",
    work=_ffn_work,
    limit="gemm",
)


# ---------------------------------------------------------------- RMSNorm
def _rms_norm_inputs(shape, dtype, kind="normal", seed=0, variant=""):
    rng = np.random.default_rng(seed)
    d = shape[-1]
    x = INPUT_KINDS[kind](rng, shape).astype(dtype)
    w = (1 + 0.1 * rng.standard_normal(d)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    # eps=None: the dtype's machine epsilon (torch's default); no mean is subtracted, so no
    # conditioning term
    return Inputs({"x": x, "normalized_shape": d, "weight": w, "eps": None}, dy,
                  rows=x.size // d)


def _leaves(*arrays):
    """Tensors over the arrays' memory that autograd tracks (None stays None)."""
    import torch
    return [None if a is None else torch.from_numpy(a).requires_grad_() for a in arrays]


def _clear(*ts):
    for t in ts:
        if t is not None:
            t.grad = None


def _rms_norm_torch(inp: Inputs, variant="") -> TorchOp:
    import torch

    a = inp.args
    d, eps = a["normalized_shape"], a["eps"]
    F = torch.nn.functional
    xt, wt = _leaves(a["x"], a["weight"])
    dyt = torch.from_numpy(inp.dy)
    graph = {}

    def forward():
        with torch.no_grad():
            return F.rms_norm(xt, [d], wt, eps)

    def fwd_bwd():
        _clear(xt, wt)
        F.rms_norm(xt, [d], wt, eps).backward(dyt)

    def backward():   # autograd's backward alone, on a graph kept from one forward
        if "y" not in graph:
            graph["y"] = F.rms_norm(xt, [d], wt, eps)
        _clear(xt, wt)
        graph["y"].backward(dyt, retain_graph=True)

    def forward_outputs():
        return {"y": _np(forward())}      # F.rms_norm returns no rstd

    def backward_outputs():
        fwd_bwd()
        return {"dx": _np(xt.grad), "dweight": _np(wt.grad)}

    return TorchOp(forward, fwd_bwd, forward_outputs, backward_outputs, backward)


RMS_NORM = Op(
    name="rms_norm",
    shape_format="NxD (rows x normalized size)",
    ndims=(2,),
    bench_shapes={"8192x768": (8192, 768), "2048x4096": (2048, 4096),
                  "65536x96": (65536, 96), "262144x32": (262144, 32), "1000x769": (1000, 769),
                  "3x1": (3, 1)},
    default_shapes=("8192x768", "2048x4096"),
    test_shape=(64, 768),
    make_inputs=_rms_norm_inputs,
    torch=_rms_norm_torch,
    stats=("rstd",),
    grads=("dx", "dweight"),
    row_sums=("dweight",),
    bench_cases=(BenchCase("forward", "forward"), BenchCase("backward", "backward"),
                 BenchCase("fwd+bwd", "fwd+bwd")),
    work=_norm_work,
)


# ---------------------------------------------------------------- residual add + norm
def _add_norm_inputs(shape, dtype, kind="normal", seed=0, variant="", rms=False):
    rng = np.random.default_rng(seed)
    d = shape[-1]
    x = INPUT_KINDS[kind](rng, shape).astype(dtype)
    # the residual keeps the kind's character in s = x + residual (a tiny variance stays tiny)
    scale = {"tiny_variance": 1e-3, "large_offset": 0.1}.get(kind, 1.0)
    r = (scale * rng.standard_normal(shape)).astype(dtype)
    w = (1 + 0.1 * rng.standard_normal(d)).astype(dtype)
    b = (0.1 * rng.standard_normal(d)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    ds = rng.standard_normal(shape).astype(dtype)
    args = {"x": x, "residual": r, "normalized_shape": d, "weight": w}
    if rms:
        args["eps"] = None
    else:
        args.update(bias=b, eps=1e-5)
    return Inputs(args, dy, rows=x.size // d,
                  condition=1.0 if rms else _condition(x + r, axis=-1),
                  grad_kwargs={"ds": ds})


def _add_rms_norm_inputs(shape, dtype, kind="normal", seed=0, variant=""):
    return _add_norm_inputs(shape, dtype, kind, seed, variant, rms=True)


def _add_norm_torch(inp: Inputs, variant="") -> TorchOp:
    """``s = x + r`` then ``F.layer_norm`` (or ``F.rms_norm`` without a bias argument);
    backward: autograd of the pair (y, s) with the gradients (dy, ds)."""
    import torch

    a = inp.args
    d, eps = a["normalized_shape"], a["eps"]
    rms = "bias" not in a
    F = torch.nn.functional
    xt, rt, wt, bt = _leaves(a["x"], a["residual"], a["weight"], a.get("bias"))
    dyt, dst = torch.from_numpy(inp.dy), torch.from_numpy(inp.grad_kwargs["ds"])
    graph = {}

    def norm(s):
        return F.rms_norm(s, [d], wt, eps) if rms else F.layer_norm(s, [d], wt, bt, eps)

    def pair():
        s = xt + rt
        return norm(s), s

    def forward():
        with torch.no_grad():
            return pair()

    def fwd_bwd():
        _clear(xt, rt, wt, bt)
        torch.autograd.backward(pair(), (dyt, dst))

    def backward():   # autograd's backward alone, on a graph kept from one forward
        if "ys" not in graph:
            graph["ys"] = pair()
        _clear(xt, rt, wt, bt)
        torch.autograd.backward(graph["ys"], (dyt, dst), retain_graph=True)

    def forward_outputs():
        y, s = forward()
        out = {"y": _np(y), "s": _np(s)}
        if not rms:
            with torch.no_grad():
                _, m, r = torch.native_layer_norm(s, [d], wt, bt, eps)
            out.update(mean=_np(m).reshape(s.shape[:-1]), rstd=_np(r).reshape(s.shape[:-1]))
        return out

    def backward_outputs():
        fwd_bwd()
        out = {"dsum": _np(xt.grad), "dweight": _np(wt.grad)}
        if not rms:
            out["dbias"] = _np(bt.grad)
        return out

    return TorchOp(forward, fwd_bwd, forward_outputs, backward_outputs, backward)


def _add_norm_work(shape, itemsize, call):
    """Add + norm: forward reads x and residual and writes y and s (4·numel·itemsize);
    backward with ds reads dy, s and ds and writes dsum (4·)."""
    nbytes = math.prod(shape) * itemsize
    return {"forward": 4, "backward": 4, "fwd+bwd": 8}[call] * nbytes


_ADD_NORM_SHAPES = {"8192x768": (8192, 768), "2048x4096": (2048, 4096),
                    "1000x769": (1000, 769), "3x1": (3, 1)}

ADD_LAYER_NORM = Op(
    name="add_layer_norm",
    shape_format="NxD (rows x normalized size)",
    ndims=(2,),
    bench_shapes=dict(_ADD_NORM_SHAPES),
    default_shapes=("8192x768",),
    test_shape=(64, 768),
    make_inputs=_add_norm_inputs,
    torch=_add_norm_torch,
    outputs=("y", "s"),
    stats=("mean", "rstd"),
    grads=("dsum", "dweight", "dbias"),
    row_sums=("dweight", "dbias"),
    bench_cases=(BenchCase("forward", "forward"), BenchCase("backward+ds", "backward")),
    work=_add_norm_work,
)

ADD_RMS_NORM = Op(
    name="add_rms_norm",
    shape_format="NxD (rows x normalized size)",
    ndims=(2,),
    bench_shapes=dict(_ADD_NORM_SHAPES),
    default_shapes=("8192x768",),
    test_shape=(64, 768),
    make_inputs=_add_rms_norm_inputs,
    torch=_add_norm_torch,
    outputs=("y", "s"),
    stats=("rstd",),
    grads=("dsum", "dweight"),
    row_sums=("dweight",),
    bench_cases=(BenchCase("forward", "forward"), BenchCase("backward+ds", "backward")),
    work=_add_norm_work,
)


# ---------------------------------------------------------------- gated FFN
GATED_ACTIVATIONS = ("swiglu", "geglu", "reglu")
_GATES = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}


def _ffn_gated_inputs(shape, dtype, kind="normal", seed=0, variant="swiglu"):
    """Shape (n, d, h): h hidden units, so w1 is the packed (d, 2h) = [gate | up]."""
    rng = np.random.default_rng(seed)
    n, d, h = shape
    x = INPUT_KINDS[kind](rng, (n, d))
    if kind in ("large_offset", "tiny_variance"):   # an offset input, at a scale a GEMM keeps
        x = x / np.abs(np.nanmean(x))
    x = x.astype(dtype)
    w1 = (rng.standard_normal((d, 2 * h)) / math.sqrt(d)).astype(dtype)
    b1 = (0.1 * rng.standard_normal(2 * h)).astype(dtype)
    w2 = (rng.standard_normal((h, d)) / math.sqrt(h)).astype(dtype)
    b2 = (0.1 * rng.standard_normal(d)).astype(dtype)
    dy = rng.standard_normal((n, d)).astype(dtype)
    return Inputs({"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2,
                   "activation": variant or "swiglu"}, dy, rows=n)


FFN_GATED = Op(
    name="ffn_gated",
    api="ffn",
    shape_format="NxDxH (rows x model dim x hidden units; w1 is (D, 2H))",
    ndims=(3,),
    bench_shapes={"2048x768x2048": (2048, 768, 2048), "8192x512x1376": (8192, 512, 1376)},
    default_shapes=("2048x768x2048", "8192x512x1376"),
    test_shape=(64, 96, 128),
    make_inputs=_ffn_gated_inputs,
    torch=lambda inp, variant="swiglu": _ffn_torch(inp, variant),
    grads=("dx", "dw1", "db1", "dw2", "db2"),
    backward_out="all",
    forward_reuse=("hidden",),
    tolerance="gemm",
    row_sums=("dw1", "db1", "dw2", "db2"),
    variants={a: {"activation": a} for a in GATED_ACTIVATIONS},
    bench_cases=(BenchCase("fwd swiglu", "forward", "swiglu"),
                 BenchCase("fwd+bwd swiglu", "fwd+bwd", "swiglu",
                           extra={"normffn recompute": {"recompute": True}})),
    unit="GFLOP/s",
    work=_ffn_work,
    limit="gemm",
)


# ---------------------------------------------------------------- FFN sublayer
#: norm x placement x a few activations (plain ReLU and GELU, gated SwiGLU); the bench cases
#: ("fwd+bwd pre relu", ...) are "*-layer-relu" (GPT-2 style, LayerNorm) at the ReLU shape and
#: "*-rms-swiglu" (LLaMA style, RMSNorm) at the SwiGLU shape
FFN_BLOCK_VARIANTS = {f"{p}-{nm}-{a}": {"activation": a, "norm": nm, "placement": p}
                      for p in ("pre", "post") for nm in ("layer", "rms")
                      for a in ("relu", "gelu", "swiglu")}


def _ffn_block_inputs(shape, dtype, kind="normal", seed=0, variant="pre-layer-relu"):
    """Shape (n, d, h); gated activations get the packed w1 (d, 2h) and b1 (2h,); RMSNorm has
    no norm_bias.  Pre-LN the norm sees x (its conditioning is x's); post-LN it sees
    s = x + ffn(x), which the FFN spreads at x's own scale (condition ~1)."""
    v = FFN_BLOCK_VARIANTS[variant or "pre-layer-relu"]
    act, norm, placement = v["activation"], v["norm"], v["placement"]
    rng = np.random.default_rng(seed)
    n, d, h = shape
    hw = 2 * h if act in GATED_ACTIVATIONS else h
    x = INPUT_KINDS[kind](rng, (n, d)).astype(dtype)
    nw = (1 + 0.1 * rng.standard_normal(d)).astype(dtype)
    nb = (0.1 * rng.standard_normal(d)).astype(dtype) if norm == "layer" else None
    w1 = (rng.standard_normal((d, hw)) / math.sqrt(d)).astype(dtype)
    b1 = (0.1 * rng.standard_normal(hw)).astype(dtype)
    w2 = (rng.standard_normal((h, d)) / math.sqrt(h)).astype(dtype)
    b2 = (0.1 * rng.standard_normal(d)).astype(dtype)
    dy = rng.standard_normal((n, d)).astype(dtype)
    return Inputs({"x": x, "norm_weight": nw, "norm_bias": nb, "w1": w1, "b1": b1, "w2": w2,
                   "b2": b2, "activation": act, "norm": norm, "placement": placement,
                   "eps": 1e-5}, dy, rows=n,
                  condition=_condition(x, axis=-1) if placement == "pre" else 1.0)


def _ffn_block_torch(inp: Inputs, variant="pre-layer-relu") -> TorchOp:
    """``LayerNorm`` / ``RMSNorm`` + ``Linear`` + activation (gated: chunk, act(g) * u) +
    ``Linear`` + the residual add, in eager mode; backward is autograd of the whole sublayer."""
    import torch

    a = inp.args
    F = torch.nn.functional
    gate = _GATES.get(a["activation"])
    act = {"relu": torch.relu, "silu": F.silu, "gelu": F.gelu,
           "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}[gate or a["activation"]]
    d, eps = a["x"].shape[-1], a["eps"]
    rms, pre = a["norm"] == "rms", a["placement"] == "pre"

    def leaf(v, transpose=False):
        if v is None:
            return None
        return torch.from_numpy(np.ascontiguousarray(v.T if transpose else v)).requires_grad_()

    xt, NW, NB = leaf(a["x"]), leaf(a["norm_weight"]), leaf(a["norm_bias"])
    W1, W2 = leaf(a["w1"], True), leaf(a["w2"], True)      # nn.Linear's layout (out, in)
    B1, B2 = leaf(a["b1"]), leaf(a["b2"])
    dyt = torch.from_numpy(inp.dy)
    params = [p for p in (xt, NW, NB, W1, B1, W2, B2) if p is not None]

    def norm(v):
        return F.rms_norm(v, [d], NW, eps) if rms else F.layer_norm(v, [d], NW, NB, eps)

    def ffn(v):
        z = F.linear(v, W1, B1)
        if gate is None:
            return F.linear(act(z), W2, B2)
        g, u = z.chunk(2, dim=-1)
        return F.linear(act(g) * u, W2, B2)

    def block():
        return xt + ffn(norm(xt)) if pre else norm(xt + ffn(xt))

    def forward():
        with torch.no_grad():
            return block()

    def fwd_bwd():
        _clear(*params)
        block().backward(dyt)

    def forward_outputs():
        out = {"y": _np(forward())}
        if not rms:   # LayerNorm's statistics, as native_layer_norm returns them
            with torch.no_grad():
                v = xt if pre else xt + ffn(xt)
                _, m, r = torch.native_layer_norm(v, [d], NW, NB, eps)
            out.update(mean=_np(m).reshape(v.shape[:-1]), rstd=_np(r).reshape(v.shape[:-1]))
        return out

    def backward_outputs():
        fwd_bwd()
        g = lambda p, t=False: None if p is None else (_np(p.grad).T if t else _np(p.grad))  # noqa: E731
        return {"dx": g(xt), "dnorm_weight": g(NW), "dnorm_bias": g(NB), "dw1": g(W1, True),
                "db1": g(B1), "dw2": g(W2, True), "db2": g(B2)}

    return TorchOp(forward, fwd_bwd, forward_outputs, backward_outputs, None)


def _ffn_block_unfused(inp: Inputs, call: str) -> Callable:
    """The sublayer from normffn's separate public ops, as users composed it before
    ``ffn_block``: pre-LN ``layer_norm`` / ``rms_norm`` -> ``ffn`` -> ``x + f``; post-LN ``ffn``
    -> ``add_layer_norm`` / ``add_rms_norm`` (residual x); backward chains the ops' backwards
    (pre-LN: ``dx = dy + norm_backward(ffn_backward(dy)[0])``; post-LN: ``ds`` from the add +
    norm backward, ``dx = ds + ffn_backward(ds)[0]``)."""
    import normffn as nf

    a = inp.args
    x, nw, nb, act, eps = a["x"], a["norm_weight"], a["norm_bias"], a["activation"], a["eps"]
    ffn_p = (a["w1"], a["b1"], a["w2"], a["b2"], act)
    d, dy, rms = x.shape[-1], inp.dy, a["norm"] == "rms"
    if a["placement"] == "pre":
        def norm_fwd(v):
            return nf.rms_norm_forward(v, d, nw, eps) if rms else \
                nf.layer_norm_forward(v, d, nw, nb, eps)
        norm_bwd = nf.rms_norm_backward if rms else nf.layer_norm_backward

        def forward():
            v = nf.rms_norm(x, d, nw, eps) if rms else nf.layer_norm(x, d, nw, nb, eps)
            return x + nf.ffn(v, *ffn_p)

        def fwd_bwd():
            xn, nctx = norm_fwd(x)
            f, fctx = nf.ffn_forward(xn, *ffn_p)
            _ = x + f                                   # y
            dxn, *gf = nf.ffn_backward(dy, fctx)
            dxnorm, *gn = norm_bwd(dxn, nctx)
            return (dy + dxnorm, *gn, *gf)
    else:
        def add_norm_fwd(f):
            return nf.add_rms_norm_forward(f, x, d, nw, eps) if rms else \
                nf.add_layer_norm_forward(f, x, d, nw, nb, eps)
        add_norm_bwd = nf.add_rms_norm_backward if rms else nf.add_layer_norm_backward

        def forward():
            f = nf.ffn(x, *ffn_p)
            return (nf.add_rms_norm(f, x, d, nw, eps) if rms else
                    nf.add_layer_norm(f, x, d, nw, nb, eps))[0]

        def fwd_bwd():
            f, fctx = nf.ffn_forward(x, *ffn_p)
            _, _, nctx = add_norm_fwd(f)
            ds, *gn = add_norm_bwd(dy, nctx)
            dxf, *gf = nf.ffn_backward(ds, fctx)
            return (ds + dxf, *gn, *gf)
    return {"forward": forward, "fwd+bwd": fwd_bwd}[call]


def _ffn_block_step_alloc(shape, itemsize):
    """What ``ffn_block_forward(..., out=, hidden_out=)`` still allocates per training step:
    the kept (n, d) ``xn`` (pre-LN) or ``s`` (post-LN), and mean and rstd (n float64 each)."""
    n, d = shape[0], shape[1]
    return n * d * itemsize + 2 * n * 8


_RELU_SHAPE, _SWIGLU_SHAPE = ("2048x768x3072",), ("2048x768x2048",)

FFN_BLOCK = Op(
    name="ffn_block",
    shape_format="NxDxH (rows x model dim x hidden units; gated: w1 is D x 2H)",
    ndims=(3,),
    bench_shapes={"2048x768x3072": (2048, 768, 3072), "2048x768x2048": (2048, 768, 2048)},
    default_shapes=("2048x768x3072", "2048x768x2048"),
    test_shape=(32, 48, 64),
    make_inputs=_ffn_block_inputs,
    torch=_ffn_block_torch,
    stats=("mean", "rstd"),            # mean is None for RMSNorm (compared where it exists)
    grads=("dx", "dnorm_weight", "dnorm_bias", "dw1", "db1", "dw2", "db2"),
    backward_out="all",
    forward_reuse=("hidden",),
    tolerance="gemm",
    row_sums=("dnorm_weight", "dnorm_bias", "dw1", "db1", "dw2", "db2"),
    variants=FFN_BLOCK_VARIANTS,
    kwonly=("norm", "placement", "eps", "recompute"),
    step_alloc=_ffn_block_step_alloc,
    unfused=_ffn_block_unfused,
    bench_cases=(
        BenchCase("fwd+bwd pre relu", "fwd+bwd", "pre-layer-relu", shapes=_RELU_SHAPE,
                  extra={"normffn recompute": {"recompute": True}}),
        BenchCase("fwd+bwd post relu", "fwd+bwd", "post-layer-relu", shapes=_RELU_SHAPE),
        BenchCase("fwd pre relu", "forward", "pre-layer-relu", shapes=_RELU_SHAPE),
        BenchCase("fwd+bwd pre swiglu", "fwd+bwd", "pre-rms-swiglu", shapes=_SWIGLU_SHAPE,
                  extra={"normffn recompute": {"recompute": True}}),
        BenchCase("fwd+bwd post swiglu", "fwd+bwd", "post-rms-swiglu",
                  shapes=_SWIGLU_SHAPE),
        BenchCase("fwd pre swiglu", "forward", "pre-rms-swiglu", shapes=_SWIGLU_SHAPE)),
    unit="GFLOP/s",
    work=_ffn_work,                    # the sublayer's GEMMs: its limit is the bare GEMMs
    limit="gemm",
)


#: op name -> entry, in the order the tools list them
OPS = {op.name: op for op in (LAYER_NORM, RMS_NORM, ADD_LAYER_NORM, ADD_RMS_NORM, BATCH_NORM,
                              FFN, FFN_GATED, FFN_BLOCK)}


def get(name: str) -> Op:
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; known: {', '.join(OPS)}") from None


# ---------------------------------------------------------------- bench callables
def bench_inputs(op: Op, case: BenchCase, shape, dtype, seed: int = 0) -> Inputs:
    """Seeded normal inputs of one bench case (relaid for a channels-last case)."""
    inp = op.make_inputs(tuple(shape), np.dtype(dtype).type, "normal", seed,
                         case.variant or next(iter(op.variants)))
    inp.args.update(op.variants.get(case.variant, {}))
    if case.layout == "channels_last":
        inp.args["x"] = channels_last(inp.args["x"])
        inp.dy = channels_last(inp.dy)
    return inp


def bench_providers(op: Op, case: BenchCase, numpy: bool = True, torch: bool = True) -> list:
    """Provider labels of one case, normffn's headline first (``normffn out=``: every output
    buffer preallocated and reused, where the op's entry points take them all)."""
    names = []
    fwd, bwd = op.forward_out, bool(op.backward_out)
    if {"forward": fwd, "backward": bwd, "fwd+bwd": fwd and bwd}.get(case.call):
        names.append("normffn out=")
    names.append("normffn")
    names += list(case.extra)
    if op.unfused is not None:
        names.append("normffn unfused")
    if numpy and case.layout == "contiguous":
        names.append("numpy")
    if torch and op.torch is not None:
        names.append("torch")
    return names


# ---------------------------------------------------------------- calling an op generically
def split_forward(op: Op, result) -> tuple:
    """``op_forward``'s result -> ``(outputs, ctx)``, outputs a dict name -> array in the order
    of ``op.outputs`` (``(y, ctx)``, or ``(y, s, ctx)`` for add + norm)."""
    *ys, ctx = result
    return dict(zip(op.outputs, ys)), ctx


def op_outputs(op: Op, result) -> dict:
    """``op(...)``'s result (one array, or a tuple for several outputs) -> name -> array."""
    if len(op.outputs) == 1:
        return {op.outputs[0]: result}
    return dict(zip(op.outputs, result))


def forward_out_buffers(op: Op, x, fill=None):
    """``out=`` for the forward: one buffer like x per output (a tuple when several);
    ``fill``: a value to fill them with (default: uninitialised)."""
    make = np.empty_like if fill is None else (lambda a: np.full_like(a, fill))
    bufs = tuple(make(x) for _ in op.outputs)
    return bufs if len(bufs) > 1 else bufs[0]


def backward_out_buffers(op: Op, grads, dtype, fill=None):
    """``out=`` for the backward, shaped like ``grads`` (one call's gradients, any dtype):
    the first gradient's buffer (``backward_out="first"``) or a tuple aligned with ``grads``
    (``"all"``; None where the gradient is None)."""
    def make(g):
        if g is None:
            return None
        a = np.empty(np.shape(g), dtype=dtype)
        if fill is not None:
            a.fill(fill)
        return a
    if op.backward_out == "all":
        return tuple(make(g) for g in grads)
    return make(grads[0])


def _reuse(op: Op, ctx) -> dict:
    """Buffers a training loop hands back to the next forward (``hidden_out=ctx.hidden``)."""
    out = {}
    for k in op.forward_reuse:
        v = getattr(ctx, k, None)
        if v is not None:
            out[f"{k}_out"] = v
    return out


def bench_callable(op: Op, case: BenchCase, provider: str, inp: Inputs) -> Callable:
    """A zero-argument callable doing ``case``'s work with ``provider`` on ``inp`` (outputs
    preallocated for ``out=``, a ctx made beforehand for ``backward``).  Raises
    ``NotImplementedError`` when the provider does not exist here (torch missing, ...).

    ``normffn out=`` for ``fwd+bwd`` is a training step that touches no fresh memory: the
    forward writes into its ``out=`` buffers and gets the previous step's saved activations
    back (``forward_reuse``, e.g. ``hidden_out=ctx.hidden``), the backward writes every
    gradient into its ``out=`` buffers."""
    args = dict(inp.args)
    dy, gkw = inp.dy, dict(inp.grad_kwargs)
    if provider == "torch":
        if op.torch is None or torch_or_none() is None:
            raise NotImplementedError("torch is not installed")
        t = op.torch(inp, case.variant)
        fn = {"forward": t.forward, "backward": t.backward, "fwd+bwd": t.fwd_bwd}[case.call]
        if fn is None:
            raise NotImplementedError(f"torch has no separate {case.call} for {op.name}")
        return fn
    if provider == "normffn unfused":
        if op.unfused is None:
            raise NotImplementedError(f"{op.name} has no unfused composition")
        return op.unfused(inp, case.call)
    if provider == "numpy":
        lib = "reference"
        for k in op.state:   # the reference updates float64 running stats
            if args.get(k) is not None:
                args[k] = np.asarray(args[k], dtype=np.float64).copy()
    elif provider.startswith("normffn"):
        lib = "normffn"
        if provider in case.extra:
            args.update(case.extra[provider])
    else:
        raise NotImplementedError(f"unknown provider {provider!r}")
    use_out = provider == "normffn out="
    pos, kw = op.split_args(args)
    f_op, f_fwd, f_bwd = (op.function(lib, e) for e in ("", "forward", "backward"))
    if case.call == "forward":
        if use_out:
            y = forward_out_buffers(op, args["x"])
            return lambda: f_op(*pos, out=y, **kw)
        if provider in case.extra:
            return lambda: f_fwd(*pos, **kw)
        return lambda: f_op(*pos, **kw)
    if case.call == "backward":
        ctx = f_fwd(*pos, **kw)[-1]
        if use_out:
            if op.backward_out == "all":
                gout = backward_out_buffers(op, f_bwd(dy, ctx, **gkw), dy.dtype)
            else:
                gout = np.empty_like(dy)
            return lambda: f_bwd(dy, ctx, out=gout, **gkw)
        return lambda: f_bwd(dy, ctx, **gkw)
    if case.call == "fwd+bwd":
        if use_out:
            yout = forward_out_buffers(op, args["x"])
            ctx0 = f_fwd(*pos, out=yout, **kw)[-1]
            reuse = _reuse(op, ctx0)      # ctx0 is spent: the next forward overwrites them
            gout = backward_out_buffers(op, f_bwd(dy, ctx0, **gkw), dy.dtype) \
                if op.backward_out == "all" else np.empty_like(dy)

            def fwd_bwd_out():
                c = f_fwd(*pos, out=yout, **reuse, **kw)[-1]
                return f_bwd(dy, c, out=gout, **gkw)
            return fwd_bwd_out

        def fwd_bwd():
            c = f_fwd(*pos, **kw)[-1]
            return f_bwd(dy, c, **gkw)
        return fwd_bwd
    raise ValueError(case.call)
