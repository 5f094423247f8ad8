"""Tuning constants of the Python run layers, in one place.

Each constant carries one line naming the measurement that chose it; the stories of those
measurements are in ``docs/tuning.md``.  The C kernels' own constants are in ``kernels/*.h``
and ``kernels/*.pyx`` under a "Tuning" heading, with the same rule.

Run-time machine facts (the last-level cache size, hence which outputs get non-temporal stores)
live here too, computed once per process, so no extension module keeps a private copy.
"""
from __future__ import annotations

import os

__all__ = ["l3_bytes", "stream_threshold", "set_stream_threshold", "stream_for"]

_DEFAULT_L3 = 32 << 20
_l3_cache: int | None = None
_stream_override: int | None = None
# stream_threshold() as last computed: stream_for's per-call comparison needs no function call.
_threshold: int | None = None


def l3_bytes() -> int:
    """Size of the last-level cache in bytes (sysfs; sysconf as a fallback; 32 MiB if neither
    gives a plausible value).  sysfs comes first: glibc's sysconf reports 320 MB for this VM's
    AMD L3."""
    global _l3_cache
    if _l3_cache is None:
        l3 = -1
        try:
            with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
                text = f.read().strip()
            unit = text[-1:].upper()
            value = int(text[:-1]) if unit in ("K", "M") else int(text)
            l3 = value << (10 if unit == "K" else 20 if unit == "M" else 0)
        except (OSError, ValueError):
            pass
        if l3 <= 0:
            try:
                l3 = os.sysconf("SC_LEVEL3_CACHE_SIZE")
            except (ValueError, OSError, AttributeError):
                l3 = -1
        if not (1 << 20) < l3 < (1 << 30):
            l3 = _DEFAULT_L3
        _l3_cache = l3
    return _l3_cache


def stream_threshold() -> int:
    """Outputs of at least this many bytes are written with non-temporal stores.

    Default: a quarter of the L3.  Measured here (32 MiB L3, 2 threads, LayerNorm 4096x768 and
    up): streaming was 15-25% faster; smaller outputs stay in cache for whoever reads them next.
    """
    return _stream_override if _stream_override is not None else l3_bytes() // 4


def set_stream_threshold(nbytes: int | None) -> int:
    """Set the streaming threshold in bytes (``None`` restores the default); returns the
    threshold now in force.  A documented setting: tests use ``1`` to exercise the streaming
    path on small arrays."""
    global _stream_override, _threshold
    if nbytes is not None:
        nbytes = int(nbytes)
        if nbytes < 1:
            raise ValueError(f"nbytes must be >= 1 or None, got {nbytes}")
    _stream_override = nbytes
    _threshold = stream_threshold()
    return _threshold


def stream_for(out) -> int:
    """1 when an output as large as ``out`` (an ndarray) is written with non-temporal stores
    (at least :func:`stream_threshold` bytes), else 0: the flag the kernels take."""
    if _threshold is None:
        _init_threshold()
    return 1 if out.nbytes >= _threshold else 0


def _init_threshold() -> None:
    """Compute the threshold :func:`stream_for` compares with (once per process; kept up to
    date by :func:`set_stream_threshold`)."""
    global _threshold
    _threshold = stream_threshold()
