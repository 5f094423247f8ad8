"""``patch(model)``: swap normffn's modules into an existing PyTorch model, in place.

Each replaced module becomes an instance of the normffn subclass holding the **same** Parameter
and buffer objects (and hooks, training flag, attributes): an optimizer built before the patch
keeps updating the parameters the model uses, and the state dict is unchanged.  A module used
at several places in the model is replaced once and stays shared.
"""
import logging
import weakref
from dataclasses import dataclass, field

from torch import nn

from . import modules as M
from ._util import FLOATS

__all__ = ["patch", "PatchReport", "patch_report"]

_log = logging.getLogger("normffn.torch")

# exact PyTorch class -> normffn class (subclasses of these are skipped: their forward may differ)
_REPLACE = {
    nn.LayerNorm: M.LayerNorm,
    nn.RMSNorm: M.RMSNorm,
    nn.BatchNorm1d: M.BatchNorm1d,
    nn.BatchNorm2d: M.BatchNorm2d,
    nn.BatchNorm3d: M.BatchNorm3d,
}


@dataclass
class PatchReport:
    """What :func:`patch` did.

    Attributes
    ----------
    replaced : list of (str, str)
        ``(qualified name, class name)`` of each replaced module.
    skipped : list of (str, str, str)
        ``(qualified name, class name, reason)`` of each module left alone.
    """

    replaced: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def __str__(self):
        lines = [f"normffn.torch.patch: replaced {len(self.replaced)}, skipped "
                 f"{len(self.skipped)}"]
        lines += [f"  replaced {name or '<root>'} ({cls})" for name, cls in self.replaced]
        lines += [f"  skipped  {name or '<root>'} ({cls}): {why}"
                  for name, cls, why in self.skipped]
        return "\n".join(lines)


def _why_not(module: nn.Module) -> str | None:
    """Why this (exact-class) module is left alone, or None to replace it."""
    for name, t in list(module.named_parameters(recurse=False)) + \
            list(module.named_buffers(recurse=False)):
        if name == "num_batches_tracked" or t is None:
            continue
        if not t.is_cpu:
            return f"{name} is on {t.device} (normffn runs on the CPU)"
        if t.dtype not in FLOATS:
            return f"{name} is {str(t.dtype).replace('torch.', '')} (normffn serves float32 " \
                   "and float64)"
    return None


def _swap(module: nn.Module, cls) -> nn.Module:
    """A cls instance sharing module's state: same Parameter/buffer/submodule objects and
    hooks (the dicts are copied, their values are not)."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, (dict, set)) else v)
                         for k, v in module.__dict__.items()})
    return new


def patch(model: nn.Module, *, verbose: bool = False) -> nn.Module:
    """Swap normffn's modules into a PyTorch model, in place.

    Every ``nn.LayerNorm``, ``nn.RMSNorm`` and ``nn.BatchNorm1d/2d/3d`` of ``model`` that
    normffn can serve becomes the normffn module holding the **same** Parameter and buffer
    objects (and hooks, training flag, attributes): an optimizer built before the patch keeps
    updating the parameters the model uses, and the state dict is unchanged.  Modules whose
    parameters or buffers are not CPU float32/float64, and subclasses of those classes (their
    forward may differ), are skipped.

    Parameters
    ----------
    model : torch.nn.Module
        Patched in place.
    verbose : bool
        Print the report.

    Returns
    -------
    torch.nn.Module
        ``model`` (or, if the model itself is one of those modules, its replacement).  The
        report — also logged at INFO on the ``normffn.torch`` logger and kept for
        :func:`patch_report` — lists what was replaced and what was skipped, and why.

    Raises
    ------
    TypeError
        ``model`` is not a ``torch.nn.Module``.

    Examples
    --------
    >>> import torch
    >>> import normffn.torch as nft
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8),
    ...                             torch.nn.BatchNorm1d(8))
    >>> weight = model[1].weight
    >>> model = nft.patch(model)
    >>> type(model[1]).__module__, model[1].weight is weight
    ('normffn.torch.modules', True)
    >>> print(nft.patch_report(model))
    normffn.torch.patch: replaced 2, skipped 0
      replaced 1 (LayerNorm)
      replaced 2 (BatchNorm1d)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    done: dict = {}  # id(old) -> new, so shared modules stay shared

    def convert(module: nn.Module, name: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        cls = _REPLACE.get(type(module))
        new = module
        if cls is not None:
            why = _why_not(module)
            if why is None:
                new = _swap(module, cls)
                report.replaced.append((name, type(module).__name__))
            else:
                report.skipped.append((name, type(module).__name__, why))
        elif isinstance(module, tuple(_REPLACE)) and not isinstance(module, tuple(
                _REPLACE.values())):
            report.skipped.append((name, type(module).__name__,
                                   "a subclass of a PyTorch norm (its forward may differ)"))
        done[id(module)] = new
        for child_name, child in list(new._modules.items()):
            if child is not None:
                replacement = convert(child, f"{name}.{child_name}" if name else child_name)
                if replacement is not child:
                    new._modules[child_name] = replacement
        return new

    model = convert(model, "")
    _reports[model] = report
    _log.info("%s", report)
    if verbose:
        print(report)
    return model


_reports: "weakref.WeakKeyDictionary[nn.Module, PatchReport]" = weakref.WeakKeyDictionary()


def patch_report(model: nn.Module) -> PatchReport | None:
    """The report of the last :func:`patch` of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        A model returned by :func:`patch`.

    Returns
    -------
    PatchReport or None
        None if the model was never patched.

    Examples
    --------
    >>> import torch
    >>> import normffn.torch as nft
    >>> nft.patch_report(torch.nn.Linear(2, 2)) is None
    True
    """
    return _reports.get(model)

