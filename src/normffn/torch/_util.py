"""What every part of normffn.torch shares: the zero-copy bridge, the support test, the
one-time fallback warning, the lookup of NumPy ops that later issues add (``ffn_block``) and
the buffers a module reuses across steps.

Kept small because it runs on every call: the per-call budget of a wrapper is ~15 µs.
"""
import sys
import warnings

import numpy as np
import torch

import normffn
from normffn.ffn import ACTIVATIONS as _FFN_ACTIVATIONS, GATED as _FFN_GATED

__all__ = ["FallbackWarning", "FLOATS", "np_", "opt_np", "big_out", "plan", "warn_fallback",
           "numpy_op", "compiling", "KERNEL_ACTIVATIONS", "GATED", "StepBuffers"]

FLOATS = (torch.float32, torch.float64)


class FallbackWarning(UserWarning):
    """normffn.torch ran the PyTorch op instead of a normffn kernel (issued once per reason)."""


def np_(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as an ndarray (no copy; strides kept).  CPU tensors only."""
    return (t.detach() if t.requires_grad else t).numpy()


def opt_np(t):
    return None if t is None else np_(t)


# NumPy asks the kernel for transparent huge pages (madvise) on every array from 4 MiB on; on
# a machine with THP in "madvise" mode a fresh huge page may then wait for memory compaction:
# measured, a SwiGLU FFN forward at 2048x768x2048 took 100-110 ms instead of 60 ms for the
# first ~10 calls of a process (numpy's madvise off: 60 ms from the start).  PyTorch's own ops
# allocate without it, so normffn.torch allocates its large outputs the same way.
_NUMPY_HUGEPAGE_BYTES = 1 << 22
_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def big_out(shape: tuple, dtype):
    """A C-contiguous ndarray for a kernel output of this shape and dtype, allocated by torch
    (see above), or None below NumPy's huge-page size (the NumPy layer then allocates)."""
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    if nbytes < _NUMPY_HUGEPAGE_BYTES:
        return None
    return torch.empty(tuple(shape), dtype=_TORCH_DTYPES[dtype]).numpy()


# False: every call goes through torch.ops.normffn.* (tests flip it to check both routes agree)
EAGER_FAST_PATH = True
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plan(x: torch.Tensor, *others) -> tuple:
    """``(reason, grad, direct)`` for one call, in one pass over its tensors (this runs on every
    call: the budget is ~15 µs a call).

    reason
        Why normffn cannot serve these tensors, or None.  normffn serves strided CPU
        float32/float64 tensors, all of x's dtype (``others`` may hold None for absent
        parameters); non-contiguous ones are served (the NumPy layer copies what its kernels
        cannot read in place).
    grad
        Autograd is recording and some tensor requires grad.
    direct
        The call may skip the dispatcher (see _ops): plain eager mode — not tracing for
        torch.compile, no dispatch or torch-function mode (fake tensors, export, DeviceContext)
        — and plain tensors only (subclasses get the operator, which handles them).
    """
    dt = x.dtype
    if dt not in FLOATS:
        return f"dtype {str(dt).replace('torch.', '')} (normffn serves float32 and float64)", \
            False, False
    requires = False
    plain = True
    for t in (x,) + others:
        if t is None:
            continue
        if not t.is_cpu:
            return f"device {t.device} (normffn runs on the CPU)", False, False
        if t.dtype != dt:
            return (f"mixed dtypes {str(dt).replace('torch.', '')} and "
                    f"{str(t.dtype).replace('torch.', '')} (normffn needs one dtype)"), \
                False, False
        if t.layout is not torch.strided:
            return f"layout {t.layout} (normffn needs strided tensors)", False, False
        requires = requires or t.requires_grad
        plain = plain and type(t) in _PLAIN
    direct = (EAGER_FAST_PATH and plain and not compiling()
              and not torch._C._len_torch_dispatch_stack()
              and not torch._C._is_torch_function_mode_enabled())
    return None, requires and torch.is_grad_enabled(), direct


_warned: set = set()


def compiling() -> bool:
    return torch.compiler.is_compiling()


def warn_fallback(op: str, reason: str, fallback: str) -> None:
    """Warn once per (op, reason) that ``fallback`` ran instead of normffn.  Silent while
    torch.compile traces (a warning there would break the graph; eager runs warned already
    or will)."""
    if compiling():
        return
    key = (op, reason)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"normffn.torch.{op}: {reason}; running {fallback} instead",
                  FallbackWarning, stacklevel=3)


def numpy_op(name: str):
    """normffn.<name>, or None while this build lacks it (ops of later issues)."""
    return getattr(normffn, name, None)


# The FFN activations of normffn's kernels; the gated ones take a packed (d, 2h) w1 (nn.Linear
# weight1 (2h, d), gate rows first) and an (h, d) w2.
GATED = tuple(_FFN_GATED)
KERNEL_ACTIVATIONS = frozenset(_FFN_ACTIVATIONS)


def _refs(a) -> int:
    return sys.getrefcount(a)


def _baseline_refs() -> int:
    a = np.empty(1)
    return _refs(a)     # the count of an array held by one local variable, measured as take() does


_UNSHARED = _baseline_refs()


class StepBuffers:
    """The arrays a module hands to its kernels again on its next step (issue #14): the FFN's
    hidden activation, its output and its gradients, so a training loop does not page-fault
    fresh ones every step.

    The rule that keeps this safe under autograd: a buffer is handed out again only when nothing
    but this object references it.  Every tensor made from an array by ``torch.from_numpy`` (and
    every view of such a tensor) keeps that array alive through its storage, so an unreferenced
    buffer is saved by no autograd graph (its step's backward has run and freed the saved
    tensors, or the graph was dropped), held by no ``.grad``, hook or caller.  When the previous
    step's buffer is still in use — gradient accumulation over several forwards,
    ``retain_graph=True``, the module called twice in one step, an output the caller kept — the
    kernel gets a fresh array and that buffer stays with its user: a later step never writes
    memory a saved tensor or a returned gradient still holds.  One buffer per role is kept.
    Eager mode only (torch.compile plans its own memory).
    """

    __slots__ = ("_free",)

    def __init__(self):
        self._free = {}

    def take(self, role: str, shape: tuple, dtype):
        """The last buffer kept for ``role`` if it has this shape and dtype and nothing else
        references it; otherwise None (the caller allocates)."""
        buf = self._free.pop(role, None)
        if buf is not None and buf.shape == shape and buf.dtype == dtype \
                and _refs(buf) <= _UNSHARED:
            return buf
        return None

    def keep(self, role: str, buf) -> None:
        """Remember ``buf`` (the array the kernel wrote, the very object the returned tensor
        was made from) for the next step."""
        if buf is not None:
            self._free[role] = buf

    def clear(self) -> None:
        self._free.clear()

    def __reduce__(self):   # a copied or pickled module starts with no buffers of its own
        return (StepBuffers, ())
