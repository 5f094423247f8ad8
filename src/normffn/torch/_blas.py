"""normffn.torch multiplies with PyTorch's own BLAS.

In a PyTorch process the model's other layers multiply with torch's BLAS (MKL in the x86
wheels) on torch's OpenMP pool.  Were normffn's FFN kernels to use scipy's OpenBLAS there, two
sets of BLAS workers would take turns on the same cores, each spinning while the other runs
(measured: a training step of FFNBlock modules 555 ms against 401 ms with passive OpenMP
workers; docs/tuning.md, "normffn.torch in a training step").  So normffn.torch registers the
BLAS routines torch's library exports (``sgemm_``, ``dgemm_``, ``sgemv_``, ``dgemv_``: the
Fortran interface, LP64) with ``normffn._blas``, and runs its FFN and FFN-block calls with them.
Where torch exports no such routines, or they fail ``normffn._blas``'s check, normffn.torch
keeps scipy's BLAS, which is always correct.

``set_blas("scipy")`` switches back for the process (for comparisons); ``blas()`` names the one
in use.  The NumPy API (``normffn.ffn`` called directly) is never affected.
"""
from __future__ import annotations

import ctypes
import os
from contextlib import nullcontext

import torch

from normffn import _blas

__all__ = ["blas", "set_blas", "gemms"]

_NAME = "torch"
_ROUTINES = ("sgemm_", "dgemm_", "sgemv_", "dgemv_")
_use_torch = True
_unavailable: str | None = None      # why torch's BLAS cannot be used, or None


def _torch_library() -> str | None:
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        path = os.path.join(lib, name)
        if os.path.exists(path):
            return path
    return None


def _register() -> str | None:
    """Register torch's BLAS; return why it could not be, or None."""
    path = _torch_library()
    if path is None:
        return "torch's CPU library was not found"
    try:
        lib = ctypes.CDLL(path)      # already loaded by `import torch`: the same handle
        addresses = [ctypes.cast(getattr(lib, r), ctypes.c_void_p).value for r in _ROUTINES]
    except (OSError, AttributeError) as e:
        return f"torch's library exports no Fortran BLAS ({e})"
    # torch's MKL threads on torch's OpenMP pool (the GNU threading layer), which normffn's
    # kernels share: the FFN's elementwise passes may then use that pool's threads too
    openmp = torch.backends.mkl.is_available() and torch.backends.openmp.is_available()
    try:
        _blas.register(_NAME, *addresses, openmp=openmp)
    except ValueError as e:
        return str(e)
    return None


def blas() -> str:
    """``"torch"`` if normffn.torch's FFN calls multiply with PyTorch's BLAS, else ``"scipy"``."""
    return _NAME if (_use_torch and _unavailable is None) else "scipy"


def set_blas(name: str) -> None:
    """Use ``"torch"`` (the default, where available) or ``"scipy"``'s BLAS in normffn.torch's
    FFN and FFN-block calls.  Raises ValueError for another name, or for ``"torch"`` where
    torch's BLAS cannot be used (the reason is named)."""
    global _use_torch
    if name not in (_NAME, "scipy"):
        raise ValueError(f"blas must be 'torch' or 'scipy', got {name!r}")
    if name == _NAME and _unavailable is not None:
        raise ValueError(f"torch's BLAS cannot be used: {_unavailable}")
    _use_torch = name == _NAME


def gemms():
    """Context for one normffn call: its GEMMs use the BLAS ``blas()`` names."""
    return _blas.using(_NAME) if blas() == _NAME else nullcontext()


_unavailable = _register()
