"""What every part of normffn.torch shares: the zero-copy bridge, the support test, the
one-time fallback warning and the lookup of NumPy ops that later issues add.

Kept small because it runs on every call: the per-call budget of a wrapper is ~15 µs.
"""
import inspect
import warnings

import numpy as np
import torch

import normffn

__all__ = ["FallbackWarning", "FLOATS", "np_", "opt_np", "plan", "warn_fallback",
           "numpy_op", "call_backward", "compiling", "KERNEL_ACTIVATIONS", "GATED"]

FLOATS = (torch.float32, torch.float64)


class FallbackWarning(UserWarning):
    """normffn.torch ran the PyTorch op instead of a normffn kernel (issued once per reason)."""


def np_(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as an ndarray (no copy; strides kept).  CPU tensors only."""
    return (t.detach() if t.requires_grad else t).numpy()


def opt_np(t):
    return None if t is None else np_(t)


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


_accepts_needs: dict = {}


def call_backward(fn, dy: np.ndarray, ctx, needs) -> tuple:
    """``fn(dy, ctx, needs=needs)`` where the NumPy backward takes ``needs=`` (it then skips
    the work for False entries); otherwise every gradient is computed and the unneeded ones
    dropped.  Unneeded entries come back as None either way."""
    needs = tuple(bool(n) for n in needs)
    takes = _accepts_needs.get(fn)
    if takes is None:
        try:
            takes = "needs" in inspect.signature(fn).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            takes = False
        _accepts_needs[fn] = takes
    grads = fn(dy, ctx, needs=needs) if takes else fn(dy, ctx)
    return tuple(g if n else None for g, n in zip(grads, needs))


GATED = ("swiglu", "geglu", "reglu")


def _kernel_activations() -> frozenset:
    """The FFN activations this normffn build has, probed once at import with 1-row calls (at
    import, not per call: torch.compile must not trace NumPy code).  Gated ones (issue #12)
    take a packed (d, 2h) w1 and an (h, d) w2."""
    found = set()
    x = np.zeros((1, 2))
    for name in ("relu", "gelu", "gelu_tanh", "silu") + GATED:
        w2 = np.zeros((1, 2)) if name in GATED else np.zeros((2, 2))
        try:
            normffn.ffn(x, np.zeros((2, 2)), None, w2, None, name)
        except (TypeError, ValueError):
            continue
        found.add(name)
    return frozenset(found)


KERNEL_ACTIVATIONS = _kernel_activations()
