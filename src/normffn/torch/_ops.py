"""normffn's kernels as PyTorch operators (``torch.ops.normffn.*``).

Layers, per op:

* a forward operator (``torch.library.custom_op``) returning the output **and** what backward
  needs (statistics, the FFN's hidden activation) as tensors — torch.compile can carry tensors
  between the forward and backward graphs, not Python objects;
* a backward operator taking those tensors back, rebuilding the NumPy layer's context from
  them and returning every gradient slot (an empty tensor where autograd needs none: operators
  cannot return None);
* ``register_autograd`` linking the two, asking only for the gradients autograd needs
  (``ctx.needs_input_grad``), and ``register_fake`` giving torch.compile each output's shape,
  dtype **and strides** without running a kernel.

The operators call the public NumPy API on zero-copy views (``Tensor.numpy()`` in,
``torch.from_numpy`` out).  They trust their caller (functional.py) to have sent strided CPU
float32/float64 tensors of one dtype; argument errors (shapes, eps, momentum) surface as the
NumPy layer's ValueError/TypeError.  They also rely on the NumPy layer returning arrays that
nothing else writes (its outputs and context arrays): those become tensors autograd saves.  A
module's reused buffers (FeedForward, FFNBlock: ``_util.StepBuffers``) keep that promise: one
is written again only once no tensor references it.

Weights of the FFN are in ``nn.Linear`` layout (``weight1`` ``(h1, d)``, ``weight2`` ``(d, h)``)
and reach the kernels as transposed views (``w1 = weight1.T``), never copied; the weight
gradients are written by the kernels through transposed views of C-contiguous arrays in that
same layout, so autograd keeps them as ``.grad`` without the copy a transposed gradient costs.

Double backward (``create_graph=True``) is served by recomputing the op with PyTorch ops and
differentiating those (with a one-time FallbackWarning): the NumPy backward is not itself
differentiable.

Two routes over the same functions.  ``torch.ops.normffn.*`` (dispatcher, register_autograd)
is what torch.compile, export, fake tensors and dispatch modes see.  Plain eager calls skip the
dispatcher — a custom op with an autograd formula costs ~25 µs per call in the dispatcher alone
(pytorch/pytorch#139500, #176592), over the 15 µs budget of a wrapper — and run the same Python
implementation through an ``autograd.Function`` built from the same setup/backward pair
(``<Op>Function`` below; without autograd, the implementation directly).  functional.py picks
the route per call (``_util.plan``).

A new op plugs in as: implementation + custom op + fake, backward implementation + custom op +
fake, one setup/backward pair, one ``register_autograd`` line, one ``_function`` line, and a
front-end function in functional.py.  LayerNorm and RMSNorm, whose small calls are where the
wrapper's cost shows, have hand-written eager Functions instead (they return y alone and keep
the NumPy context for backward).

The FFN and FFN-block calls multiply with torch's own BLAS (``_blas``), and outputs from 4 MiB
on are allocated by torch (``_util.big_out``: NumPy would ask for huge pages).
"""
import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import normffn

from . import _torch_ref
from ._blas import gemms
from ._util import big_out, compiling, np_, numpy_op, opt_np, warn_fallback

__all__ = ["layer_norm", "layer_norm_backward", "rms_norm", "rms_norm_backward",
           "batch_norm", "batch_norm_backward", "ffn", "ffn_forward", "ffn_backward",
           "ffn_block", "LayerNormFunction", "RMSNormFunction", "BatchNormFunction",
           "FFNFunction", "FFNBlockFunction"]

_custom_op = torch.library.custom_op


def _from(a, like: Tensor) -> Tensor:
    """ndarray -> tensor sharing its memory; None -> an empty placeholder of like's dtype."""
    return like.new_empty(0) if a is None else torch.from_numpy(a)


def _keep(g: Tensor, needed: bool):
    return g if needed else None


def _op(name: str, impl, fake):
    """``torch.ops.normffn.<name>`` from a Python implementation and its fake."""
    op = _custom_op(f"normffn::{name}", impl, mutates_args=())
    op.register_fake(fake)
    return op


def _function(name: str, impl, setup, backward):
    """The eager route: an autograd.Function running ``impl`` with the op's own setup and
    backward (the backward given calls the backward implementation directly)."""
    def forward(ctx, *args):
        out = impl(*args)
        setup(ctx, args, out)
        return out
    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def _mark_stats(ctx, *stats) -> None:
    """The operator returns what backward needs (statistics, the FFN's hidden) as outputs:
    not differentiable, and no zero gradients built for them (``set_materialize_grads``)."""
    ctx.mark_non_differentiable(*stats)
    ctx.set_materialize_grads(False)


def _dx_out(dy: np.ndarray, needs) -> Optional[np.ndarray]:
    """A row norm's dx buffer (big_out), when dx is wanted."""
    return big_out(dy.shape, dy.dtype) if needs[0] else None


def _double_backward(ctx, dy: Tensor) -> bool:
    """True when autograd is building a graph of this backward (create_graph=True)."""
    return torch.is_grad_enabled() and not compiling() and (
        dy.requires_grad or any(t is not None and t.requires_grad for t in ctx.saved_tensors))


def _torch_grads(op: str, fn, inputs: tuple, dy: Tensor, needs) -> list:
    """Gradients of ``fn(*inputs)`` for the ``needs`` entries, as a differentiable graph."""
    warn_fallback(op, "double backward (create_graph=True)", "PyTorch autograd of the same op")
    wanted = [t for t, n in zip(inputs, needs) if n]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(fn(*inputs), wanted, dy, create_graph=True,
                                         allow_unused=True))
    return [next(grads) if n else None for n in needs]


# ---------------------------------------------------------------- LayerNorm

def _ln_impl(x: Tensor, normalized_shape: list[int], weight: Optional[Tensor],
             bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> (y, mean, rstd); mean/rstd float64 of shape x.shape[:-len(normalized_shape)]."""
    xa = np_(x)
    y, c = normffn.layer_norm_forward(xa, tuple(normalized_shape), opt_np(weight), opt_np(bias),
                                      eps, out=big_out(xa.shape, xa.dtype))
    return torch.from_numpy(y), torch.from_numpy(c.mean), torch.from_numpy(c.rstd)


def _ln_fake(x, normalized_shape, weight, bias, eps):
    lead = x.shape[:x.dim() - len(normalized_shape)]
    return (x.new_empty(x.shape), x.new_empty(lead, dtype=torch.float64),
            x.new_empty(lead, dtype=torch.float64))


def _ln_bwd_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 mean: Tensor, rstd: Tensor, normalized_shape: list[int], eps: float,
                 needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dx, dweight, dbias), empty where not needed."""
    c = normffn.LayerNormContext(x=np.ascontiguousarray(np_(x)), weight=opt_np(weight),
                                 bias=opt_np(bias), normalized_shape=tuple(normalized_shape),
                                 eps=eps, mean=np_(mean), rstd=np_(rstd))
    dya = np_(dy)
    dx, dw, db = normffn.layer_norm_backward(dya, c, needs=tuple(needs),
                                             out=_dx_out(dya, needs))
    return _from(dx, x), _from(dw, x), _from(db, x)


def _ln_bwd_fake(dy, x, weight, bias, mean, rstd, normalized_shape, eps, needs):
    def like(t, n):
        return t.new_empty(t.shape) if n else x.new_empty(0)
    return like(x, needs[0]), like(weight, needs[1]), like(bias, needs[2])


def _ln_setup(ctx, inputs, output):
    x, normalized_shape, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.normalized_shape, ctx.eps = normalized_shape, eps
    _mark_stats(ctx, mean, rstd)


def _ln_backward(bwd):
    def backward(ctx, dy, *_dstats):
        if dy is None:
            return (None,) * 5
        x, weight, bias, mean, rstd = ctx.saved_tensors
        nx, _, nw, nb, _ = ctx.needs_input_grad
        needs = [nx, nw and weight is not None, nb and bias is not None]
        if _double_backward(ctx, dy):
            dx, dw, db = _ln_torch_grads(ctx, x, weight, bias, dy, needs)
        else:
            dx, dw, db = bwd(dy, x, weight, bias, mean, rstd, ctx.normalized_shape, ctx.eps,
                             needs)
        return _keep(dx, needs[0]), None, _keep(dw, needs[1]), _keep(db, needs[2]), None
    return backward


def _dims(normalized_shape) -> tuple:
    """normalized_shape as torch.nn.functional takes it (the eager Functions keep an int)."""
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def _ln_torch_grads(ctx, x, weight, bias, dy, needs):
    shape = _dims(ctx.normalized_shape)
    return _torch_grads("layer_norm", lambda a, w, b: F.layer_norm(a, shape, w, b, ctx.eps),
                        (x, weight, bias), dy, needs)


class LayerNormFunction(torch.autograd.Function):
    """The eager route: ``apply(x, normalized_shape, weight, bias, eps) -> y``.  It returns y
    alone and keeps the NumPy layer's context on the autograd context, which backward hands
    straight to ``normffn.layer_norm_backward``: autograd's bookkeeping per output, the tensors
    made of the statistics and the context rebuilt in backward were a third of a small call's
    wrapper cost.  x, weight and bias are saved as tensors so that autograd's version check
    still catches an input modified in place before backward."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):
        xa = np_(x)
        y, c = normffn.layer_norm_forward(xa, normalized_shape, opt_np(weight), opt_np(bias),
                                          eps, out=big_out(xa.shape, xa.dtype))
        ctx.save_for_backward(x, weight, bias)
        ctx.numpy_ctx, ctx.normalized_shape, ctx.eps = c, normalized_shape, eps
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        nx, _, nw, nb, _ = ctx.needs_input_grad
        needs = [nx, nw and weight is not None, nb and bias is not None]
        if _double_backward(ctx, dy):
            dx, dw, db = _ln_torch_grads(ctx, x, weight, bias, dy, needs)
        else:
            dya = np_(dy)
            dx, dw, db = (_opt_from(g) for g in normffn.layer_norm_backward(
                dya, ctx.numpy_ctx, needs=tuple(needs), out=_dx_out(dya, needs)))
        return _keep(dx, needs[0]), None, _keep(dw, needs[1]), _keep(db, needs[2]), None


layer_norm = _op("layer_norm", _ln_impl, _ln_fake)
layer_norm_backward = _op("layer_norm_backward", _ln_bwd_impl, _ln_bwd_fake)
layer_norm.register_autograd(_ln_backward(layer_norm_backward), setup_context=_ln_setup)


# ---------------------------------------------------------------- RMSNorm

def _rms_impl(x: Tensor, normalized_shape: list[int], weight: Optional[Tensor],
              eps: float) -> tuple[Tensor, Tensor]:
    """-> (y, rstd); eps already resolved (the front end turns None into finfo.eps)."""
    xa = np_(x)
    y, c = normffn.rms_norm_forward(xa, tuple(normalized_shape), opt_np(weight), eps,
                                    out=big_out(xa.shape, xa.dtype))
    return torch.from_numpy(y), torch.from_numpy(c.rstd)


def _rms_fake(x, normalized_shape, weight, eps):
    lead = x.shape[:x.dim() - len(normalized_shape)]
    return x.new_empty(x.shape), x.new_empty(lead, dtype=torch.float64)


def _rms_bwd_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor,
                  normalized_shape: list[int], eps: float,
                  needs: list[bool]) -> tuple[Tensor, Tensor]:
    """-> (dx, dweight), empty where not needed."""
    c = normffn.RMSNormContext(x=np.ascontiguousarray(np_(x)), weight=opt_np(weight),
                               normalized_shape=tuple(normalized_shape), eps=eps,
                               rstd=np_(rstd))
    dya = np_(dy)
    dx, dw = normffn.rms_norm_backward(dya, c, needs=tuple(needs), out=_dx_out(dya, needs))
    return _from(dx, x), _from(dw, x)


def _rms_bwd_fake(dy, x, weight, rstd, normalized_shape, eps, needs):
    return (x.new_empty(x.shape) if needs[0] else x.new_empty(0),
            weight.new_empty(weight.shape) if needs[1] else x.new_empty(0))


def _rms_setup(ctx, inputs, output):
    x, normalized_shape, weight, eps = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.normalized_shape, ctx.eps = normalized_shape, eps
    _mark_stats(ctx, output[1])


def _rms_backward(bwd):
    def backward(ctx, dy, *_dstats):
        if dy is None:
            return (None,) * 4
        x, weight, rstd = ctx.saved_tensors
        nx, _, nw, _ = ctx.needs_input_grad
        needs = [nx, nw and weight is not None]
        if _double_backward(ctx, dy):
            dx, dw = _rms_torch_grads(ctx, x, weight, dy, needs)
        else:
            dx, dw = bwd(dy, x, weight, rstd, ctx.normalized_shape, ctx.eps, needs)
        return _keep(dx, needs[0]), None, _keep(dw, needs[1]), None
    return backward


def _rms_torch_grads(ctx, x, weight, dy, needs):
    shape = _dims(ctx.normalized_shape)
    return _torch_grads("rms_norm", lambda a, w: F.rms_norm(a, shape, w, ctx.eps),
                        (x, weight), dy, needs)


class RMSNormFunction(torch.autograd.Function):
    """The eager route: ``apply(x, normalized_shape, weight, eps) -> y``, keeping the NumPy
    layer's context on the autograd context (as LayerNormFunction)."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        xa = np_(x)
        y, c = normffn.rms_norm_forward(xa, normalized_shape, opt_np(weight), eps,
                                        out=big_out(xa.shape, xa.dtype))
        ctx.save_for_backward(x, weight)
        ctx.numpy_ctx, ctx.normalized_shape, ctx.eps = c, normalized_shape, eps
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        nx, _, nw, _ = ctx.needs_input_grad
        needs = [nx, nw and weight is not None]
        if _double_backward(ctx, dy):
            dx, dw = _rms_torch_grads(ctx, x, weight, dy, needs)
        else:
            dya = np_(dy)
            dx, dw = (_opt_from(g) for g in normffn.rms_norm_backward(
                dya, ctx.numpy_ctx, needs=tuple(needs), out=_dx_out(dya, needs)))
        return _keep(dx, needs[0]), None, _keep(dw, needs[1]), None


rms_norm = _op("rms_norm", _rms_impl, _rms_fake)
rms_norm_backward = _op("rms_norm_backward", _rms_bwd_impl, _rms_bwd_fake)
rms_norm.register_autograd(_rms_backward(rms_norm_backward), setup_context=_rms_setup)


# ---------------------------------------------------------------- BatchNorm

def _bn_like(x: Tensor) -> Tensor:
    """An empty tensor in the layout the NumPy BatchNorm gives x's outputs: channels-last
    (C-contiguous once axis 1 goes last) stays channels-last, anything else is C-contiguous."""
    if x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous():
        s = x.shape
        return x.new_empty(s[:1] + s[2:] + s[1:2]).movedim(-1, 1)
    return x.new_empty(x.shape)


def _bn_impl(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
             weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
             momentum: float, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (y, mean, rstd, new_running_mean, new_running_var).

    Functional (autograd formulas need functional operators): the running stats are updated on
    copies, returned for the front end to ``copy_`` into the buffers (empty when not updated).
    """
    update = training and running_mean is not None
    rm, rv = opt_np(running_mean), opt_np(running_var)
    if update:
        rm, rv = rm.copy(), rv.copy()
    y, c = normffn.batch_norm_forward(np_(x), rm, rv, opt_np(weight), opt_np(bias), training,
                                      momentum, eps)
    return (torch.from_numpy(y), torch.from_numpy(c.mean), torch.from_numpy(c.rstd),
            _from(rm if update else None, x), _from(rv if update else None, x))


def _bn_fake(x, running_mean, running_var, weight, bias, training, momentum, eps):
    C = x.shape[1]
    n = C if training and running_mean is not None else 0
    return (_bn_like(x), x.new_empty(C, dtype=torch.float64),
            x.new_empty(C, dtype=torch.float64), x.new_empty(n), x.new_empty(n))


def _bn_saved_x(xa: np.ndarray) -> np.ndarray:
    """x as the NumPy forward kept it: C-contiguous or channels-last as given, else copied."""
    if xa.flags.c_contiguous or (xa.ndim >= 3 and np.moveaxis(xa, 1, -1).flags.c_contiguous):
        return xa
    return np.ascontiguousarray(xa)


def _bn_bwd_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 mean: Tensor, rstd: Tensor, training: bool, eps: float,
                 needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dx in x's layout, dweight, dbias), empty where not needed."""
    c = normffn.BatchNormContext(x=_bn_saved_x(np_(x)), weight=opt_np(weight),
                                 bias=opt_np(bias), eps=eps, training=training,
                                 mean=np_(mean), rstd=np_(rstd))
    dx, dw, db = normffn.batch_norm_backward(np_(dy), c, needs=tuple(needs))
    return _from(dx, x), _from(dw, x), _from(db, x)


def _bn_bwd_fake(dy, x, weight, bias, mean, rstd, training, eps, needs):
    C = x.shape[1]
    return (_bn_like(x) if needs[0] else x.new_empty(0),
            x.new_empty(C) if needs[1] else x.new_empty(0),
            x.new_empty(C) if needs[2] else x.new_empty(0))


def _bn_setup(ctx, inputs, output):
    x, running_mean, running_var, weight, bias, training, momentum, eps = inputs
    _, mean, rstd, new_rm, new_rv = output
    # eval: the running stats, for the double-backward path only (training updates them in
    # place right after this op, so saving them there would trip autograd's version check)
    stats = (None, None) if training else (running_mean, running_var)
    ctx.save_for_backward(x, weight, bias, mean, rstd, *stats)
    ctx.training, ctx.eps = training, eps
    _mark_stats(ctx, mean, rstd, new_rm, new_rv)


def _bn_backward(bwd):
    def backward(ctx, dy, *_stat_grads):
        if dy is None:
            return (None,) * 8
        x, weight, bias, mean, rstd, running_mean, running_var = ctx.saved_tensors
        nx, _, _, nw, nb, _, _, _ = ctx.needs_input_grad
        needs = [nx, nw and weight is not None, nb and bias is not None]
        if _double_backward(ctx, dy):
            # training: batch statistics (running stats not touched again); eval: running stats
            rm, rv = (None, None) if ctx.training else (running_mean, running_var)
            dx, dw, db = _torch_grads(
                "batch_norm",
                lambda a, w, b: F.batch_norm(a, rm, rv, w, b, ctx.training, 0.0, ctx.eps),
                (x, weight, bias), dy, needs)
        else:
            dx, dw, db = bwd(dy, x, weight, bias, mean, rstd, ctx.training, ctx.eps, needs)
        return (_keep(dx, needs[0]), None, None, _keep(dw, needs[1]), _keep(db, needs[2]),
                None, None, None)
    return backward


batch_norm = _op("batch_norm", _bn_impl, _bn_fake)
batch_norm_backward = _op("batch_norm_backward", _bn_bwd_impl, _bn_bwd_fake)
batch_norm.register_autograd(_bn_backward(batch_norm_backward), setup_context=_bn_setup)
BatchNormFunction = _function("BatchNormFunction", _bn_impl, _bn_setup,
                              _bn_backward(_bn_bwd_impl))


# ---------------------------------------------------------------- FFN
# The eager route of a module (FeedForward) passes its StepBuffers (see _util) as one more
# argument: the forward writes y and the hidden activation, the backward the gradients, into the
# previous step's arrays when nothing references them any more.  The operators never take it.

_FFN_GRADS = ("dx", "dw1", "db1", "dw2", "db2")


def _w(t: Tensor) -> np.ndarray:
    """nn.Linear weight (out, in) -> the kernels' (in, out) weight: a transposed view."""
    return np_(t).T


def _blas_ready(w: np.ndarray) -> np.ndarray:
    """The weight as ffn_forward kept it: as given when rows or columns are contiguous."""
    return w if (w.flags.c_contiguous or w.flags.f_contiguous) else np.ascontiguousarray(w)


def _ffn_infer(x, weight1, bias1, weight2, bias2, activation, buffers=None) -> Tensor:
    xa = np_(x)
    out = None if buffers is None else buffers.take("y", xa.shape, xa.dtype)
    if out is None:
        out = big_out(xa.shape, xa.dtype)
    with gemms():
        y = normffn.ffn(xa, _w(weight1), opt_np(bias1), _w(weight2), opt_np(bias2), activation,
                        out=out)
    if buffers is not None:
        buffers.keep("y", y)
    return torch.from_numpy(y)


def _ffn_impl(x: Tensor, weight1: Tensor, bias1: Optional[Tensor], weight2: Tensor,
              bias2: Optional[Tensor], activation: str) -> Tensor:
    """Inference: y only, no (n, h) buffer kept."""
    return _ffn_infer(x, weight1, bias1, weight2, bias2, activation)


def _ffn_fake(x, weight1, bias1, weight2, bias2, activation):
    return x.new_empty(x.shape)


def _ffn_fwd(x, weight1, bias1, weight2, bias2, activation, recompute, buffers=None):
    """-> (y, hidden); hidden is what ffn_forward keeps: (n, weight1.shape[0]) — (n, h), gated
    (n, 2h) — or empty with recompute=True."""
    xa = np_(x)
    out = hidden_out = None
    if buffers is not None:
        out = buffers.take("y", xa.shape, xa.dtype)
        if not recompute:
            hidden_out = buffers.take("hidden", (math.prod(xa.shape[:-1]), weight1.shape[0]),
                                      xa.dtype)
    if out is None:
        out = big_out(xa.shape, xa.dtype)
    if hidden_out is None and not recompute:
        hidden_out = big_out((math.prod(xa.shape[:-1]), weight1.shape[0]), xa.dtype)
    with gemms():
        y, c = normffn.ffn_forward(xa, _w(weight1), opt_np(bias1), _w(weight2), opt_np(bias2),
                                   activation, recompute=recompute, out=out,
                                   hidden_out=hidden_out)
    if buffers is not None:
        buffers.keep("y", y)
        buffers.keep("hidden", c.hidden)
    return torch.from_numpy(y), _from(c.hidden, x)


def _ffn_fwd_impl(x: Tensor, weight1: Tensor, bias1: Optional[Tensor], weight2: Tensor,
                  bias2: Optional[Tensor], activation: str,
                  recompute: bool) -> tuple[Tensor, Tensor]:
    """-> (y, hidden); hidden is (n, h) — gated (n, 2h) — or empty with recompute=True."""
    return _ffn_fwd(x, weight1, bias1, weight2, bias2, activation, recompute)


def _ffn_fwd_fake(x, weight1, bias1, weight2, bias2, activation, recompute):
    if recompute:
        return x.new_empty(x.shape), x.new_empty(0)
    n = math.prod(x.shape[:-1])
    return x.new_empty(x.shape), x.new_empty((n, weight1.shape[0]))


def _backward_into(call, roles, shapes, needs, dtype, buffers, linear: tuple) -> list:
    """Run an FFN-family NumPy backward, ``call(out)``, writing each needed gradient into a
    module's reused buffer (``buffers``: StepBuffers, or None), else a torch-allocated one from
    4 MiB on (big_out), else whatever the NumPy layer allocates.  The weight gradients at the
    indices ``linear`` are C-contiguous in nn.Linear's (out, in) layout and reach the kernel as
    transposed views, so autograd keeps them as ``.grad`` without a copy.  Returns the
    gradients (ndarrays, None where not needed) and keeps them in ``buffers`` for the next
    step."""
    bufs = [None] * len(roles)
    for i, (role, shape, need) in enumerate(zip(roles, shapes, needs)):
        if not need:
            continue
        if buffers is not None:
            bufs[i] = buffers.take(role, shape, dtype)
        if bufs[i] is None:
            bufs[i] = big_out(shape, dtype)
        if bufs[i] is None and i in linear:
            bufs[i] = np.empty(shape, dtype)
    out = tuple(None if b is None else (b.T if i in linear else b) for i, b in enumerate(bufs))
    with gemms():
        grads = list(call(out))
    for i in linear:
        if grads[i] is not None:
            grads[i] = bufs[i]
    if buffers is not None:
        for role, g in zip(roles, grads):
            buffers.keep(role, g)
    return grads


def _ffn_bwd(dy, x, weight1, bias1, weight2, bias2, hidden, activation, recompute, needs,
             buffers=None):
    """-> (dx, dweight1, dbias1, dweight2, dbias2), weight grads C-contiguous in nn.Linear's
    layout (the kernel writes them through transposed views, so autograd keeps them as
    ``.grad`` without the copy a transposed gradient would cost); empty where not needed."""
    w1, w2 = _blas_ready(_w(weight1)), _blas_ready(_w(weight2))
    c = normffn.FFNContext(x=np.ascontiguousarray(np_(x)), w1=w1, b1=opt_np(bias1), w2=w2,
                           b2=opt_np(bias2), activation=activation, recompute=recompute,
                           hidden=None if recompute else np_(hidden), dead_units=None)
    needs = tuple(needs)
    # dx, db1, db2 in the kernels' shapes; dw1, dw2 in nn.Linear's (out, in) layout
    shapes = (c.x.shape, w1.T.shape, (w1.shape[1],), w2.T.shape, (w2.shape[1],))
    grads = _backward_into(lambda out: normffn.ffn_backward(np_(dy), c, needs=needs, out=out),
                           _FFN_GRADS, shapes, needs, c.x.dtype, buffers, linear=(1, 3))
    return tuple(_from(g, x) for g in grads)


def _ffn_bwd_impl(dy: Tensor, x: Tensor, weight1: Tensor, bias1: Optional[Tensor],
                  weight2: Tensor, bias2: Optional[Tensor], hidden: Tensor, activation: str,
                  recompute: bool, needs: list[bool]
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dweight1, dbias1, dweight2, dbias2), empty where not needed."""
    return _ffn_bwd(dy, x, weight1, bias1, weight2, bias2, hidden, activation, recompute, needs)


def _ffn_bwd_fake(dy, x, weight1, bias1, weight2, bias2, hidden, activation, recompute, needs):
    def weight_grad(w, n):  # C-contiguous in nn.Linear's layout, as the weight
        return w.new_empty(w.shape) if n else x.new_empty(0)
    return (x.new_empty(x.shape) if needs[0] else x.new_empty(0),
            weight_grad(weight1, needs[1]),
            bias1.new_empty(bias1.shape) if needs[2] else x.new_empty(0),
            weight_grad(weight2, needs[3]),
            bias2.new_empty(bias2.shape) if needs[4] else x.new_empty(0))


def _ffn_setup(ctx, inputs, output):
    x, weight1, bias1, weight2, bias2, activation, recompute = inputs[:7]
    ctx.save_for_backward(x, weight1, bias1, weight2, bias2, output[1])
    ctx.activation, ctx.recompute = activation, recompute
    ctx.buffers = inputs[7] if len(inputs) > 7 else None   # the eager route of a module
    # without _mark_stats' set_materialize_grads(False), autograd built a zero gradient for the
    # hidden activation, an (n, h) tensor (8% of a FeedForward step at 8192x512x2048)
    _mark_stats(ctx, output[1])


def _ffn_backward(bwd):
    def backward(ctx, dy, _dhidden):
        if dy is None:
            return (None,) * len(ctx.needs_input_grad)
        x, weight1, bias1, weight2, bias2, hidden = ctx.saved_tensors
        nx, nw1, nb1, nw2, nb2 = ctx.needs_input_grad[:5]
        needs = [nx, nw1, nb1 and bias1 is not None, nw2, nb2 and bias2 is not None]
        if _double_backward(ctx, dy):
            grads = _torch_grads(
                "ffn", lambda *a: _torch_ref.ffn(*a, ctx.activation),
                (x, weight1, bias1, weight2, bias2), dy, needs)
        else:
            extra = () if ctx.buffers is None else (ctx.buffers,)
            grads = bwd(dy, x, weight1, bias1, weight2, bias2, hidden, ctx.activation,
                        ctx.recompute, needs, *extra)
        return tuple(_keep(g, n) for g, n in zip(grads, needs)) + \
            (None,) * (len(ctx.needs_input_grad) - 5)
    return backward


ffn = _op("ffn", _ffn_impl, _ffn_fake)
ffn_forward = _op("ffn_forward", _ffn_fwd_impl, _ffn_fwd_fake)
ffn_backward = _op("ffn_backward", _ffn_bwd_impl, _ffn_bwd_fake)
ffn_forward.register_autograd(_ffn_backward(ffn_backward), setup_context=_ffn_setup)
# apply(x, weight1, bias1, weight2, bias2, activation, recompute[, buffers])
FFNFunction = _function("FFNFunction", _ffn_fwd, _ffn_setup, _ffn_backward(_ffn_bwd))


# ---------------------------------------------------------------- FFN block (issue #13)
# Inference: the operator below (y = normffn.ffn_block(...)).  Training in eager mode:
# FFNBlockFunction (normffn.ffn_block_forward / _backward).  Both run only where this normffn
# build has ffn_block (functional.ffn_block checks); otherwise, and for training under
# torch.compile (an operator pair needs the context's fields as tensors), functional.ffn_block
# composes layer_norm/rms_norm, ffn and the residual add.

def _ffn_block_impl(x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                    weight1: Tensor, bias1: Optional[Tensor], weight2: Tensor,
                    bias2: Optional[Tensor], activation: str, norm: str, placement: str,
                    eps: float) -> Tensor:
    fn = numpy_op("ffn_block")
    xa = np_(x)
    with gemms():
        y = fn(xa, opt_np(norm_weight), opt_np(norm_bias), _w(weight1), opt_np(bias1),
               _w(weight2), opt_np(bias2), activation, norm=norm, placement=placement, eps=eps,
               out=big_out(xa.shape, xa.dtype))
    return torch.from_numpy(y)


def _ffn_block_fake(x, norm_weight, norm_bias, weight1, bias1, weight2, bias2, activation, norm,
                    placement, eps):
    return x.new_empty(x.shape)


ffn_block = _op("ffn_block", _ffn_block_impl, _ffn_block_fake)


_BLOCK_GRADS = ("dx", "dnorm_weight", "dnorm_bias", "dw1", "db1", "dw2", "db2")


def _opt_from(a):
    return None if a is None else torch.from_numpy(a)


class FFNBlockFunction(torch.autograd.Function):
    """The fused FFN sublayer with autograd, eager mode:
    ``apply(x, norm_weight, norm_bias, weight1, bias1, weight2, bias2, activation, norm,
    placement, eps[, buffers])``; ``buffers``: a module's StepBuffers (FFNBlock), or None.

    What backward needs (the NumPy context's arrays: x as the kernels read it, the statistics,
    the normalised input or residual sum, the hidden activation) is saved as tensors with
    ``save_for_backward``, beside the inputs (whose version autograd checks): autograd frees
    them when backward has run, as it does for any op, so a module's next step can write its
    hidden activation and outputs into the same arrays again (``_util.StepBuffers``).  The
    backward rebuilds the NumPy context from them."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, weight1, bias1, weight2, bias2, activation,
                norm, placement, eps, buffers=None):
        xa = np_(x)
        out = hidden_out = None
        if buffers is not None:
            out = buffers.take("y", xa.shape, xa.dtype)
            hidden_out = buffers.take("hidden", (math.prod(xa.shape[:-1]), weight1.shape[0]),
                                      xa.dtype)
        kept_out = None if buffers is None else buffers.take("kept", xa.shape, xa.dtype)
        if out is None:
            out = big_out(xa.shape, xa.dtype)
        if hidden_out is None:
            hidden_out = big_out((math.prod(xa.shape[:-1]), weight1.shape[0]), xa.dtype)
        if kept_out is None:
            kept_out = big_out(xa.shape, xa.dtype)
        with gemms():
            y, c = numpy_op("ffn_block_forward")(
                xa, opt_np(norm_weight), opt_np(norm_bias), _w(weight1), opt_np(bias1),
                _w(weight2), opt_np(bias2), activation, norm=norm, placement=placement,
                eps=eps, out=out, hidden_out=hidden_out, kept_out=kept_out)
        if buffers is not None:
            buffers.keep("kept", c.xn if c.xn is not None else c.s)
            buffers.keep("y", y)
            buffers.keep("hidden", c.hidden)
        ctx.save_for_backward(x, norm_weight, norm_bias, weight1, bias1, weight2, bias2,
                              *(_opt_from(a) for a in (c.x, c.mean, c.rstd, c.xn, c.s,
                                                       c.hidden, c.dead_units)))
        ctx.spec = (activation, norm, placement, eps)
        ctx.buffers = buffers
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        inputs = saved[:7]
        needs = [n and t is not None for n, t in zip(ctx.needs_input_grad[:7], inputs)]
        activation, norm, placement, eps = ctx.spec
        if _double_backward(ctx, dy):
            grads = _torch_grads(
                "ffn_block",
                lambda *a: _torch_ref.ffn_block(*a, activation, norm=norm, placement=placement,
                                                eps=eps),
                inputs, dy, needs)
        else:
            grads = _ffn_block_bwd(dy, inputs, saved[7:], ctx.spec, needs, ctx.buffers)
        return tuple(_keep(t, n) for t, n in zip(grads, needs)) + (None,) * 5


def _ffn_block_bwd(dy, inputs, kept, spec, needs, buffers):
    """The NumPy backward on the saved tensors -> seven gradients (None where not needed);
    dw1, dw2 C-contiguous in nn.Linear's layout (written by the kernels through transposed
    views: autograd keeps them as ``.grad`` without a copy)."""
    _, norm_weight, norm_bias, weight1, bias1, weight2, bias2 = inputs
    xc, mean, rstd, xn, s, hidden, dead = kept
    activation, norm, placement, eps = spec
    c = numpy_op("FFNBlockContext")(
        x=np_(xc), norm_weight=opt_np(norm_weight), norm_bias=opt_np(norm_bias),
        w1=_blas_ready(_w(weight1)), b1=opt_np(bias1), w2=_blas_ready(_w(weight2)),
        b2=opt_np(bias2), activation=activation, norm=norm, placement=placement, eps=eps,
        recompute=False, mean=opt_np(mean), rstd=np_(rstd), xn=opt_np(xn), s=opt_np(s),
        hidden=opt_np(hidden), dead_units=opt_np(dead))
    # dx in x's shape, the norm's and the biases' in theirs, dw1/dw2 in nn.Linear's (out, in)
    shapes = [tuple(c.x.shape)] + [None if t is None else tuple(t.shape) for t in inputs[1:]]
    g = _backward_into(
        lambda out: numpy_op("ffn_block_backward")(np_(dy), c, needs=tuple(needs), out=out),
        _BLOCK_GRADS, shapes, needs, c.x.dtype, buffers, linear=(3, 5))
    return [_opt_from(a) for a in g]
