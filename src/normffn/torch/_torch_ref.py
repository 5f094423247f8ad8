"""The same ops written with stock PyTorch: what normffn.torch falls back to (other devices and
dtypes, double backward) and what its modules are compared against.

Weights are in ``nn.Linear`` layout: ``weight1`` is ``(h, d)`` (``(2h, d)`` for the gated
activations, gate rows first then the linear "up" rows — the packed layout of normffn.ffn's
``w1 = weight1.T``), ``weight2`` is ``(d, h)``.
"""
import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "GATED", "activation", "ffn", "ffn_block"]

# activation -> elementwise function of the pre-activation (plain) or of the gate (gated)
ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "silu": F.silu,
}
GATED = {"swiglu": F.silu, "geglu": F.gelu, "reglu": F.relu}


def activation(name: str, v: torch.Tensor) -> torch.Tensor:
    """``act(v)`` for a plain activation; for a gated one ``gate_act(v[..., :h]) * v[..., h:]``
    with v of width 2h."""
    if name in ACTIVATIONS:
        return ACTIVATIONS[name](v)
    if name in GATED:
        gate, up = v.chunk(2, dim=-1)
        return GATED[name](gate) * up
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS) + sorted(GATED)}, "
                     f"got {name!r}")


def ffn(input, weight1, bias1, weight2, bias2, activation_name="relu"):
    """``act(input @ weight1.T + bias1) @ weight2.T + bias2`` (nn.Linear layout)."""
    return F.linear(activation(activation_name, F.linear(input, weight1, bias1)), weight2, bias2)


def _norm(norm, x, weight, bias, eps):
    d = x.shape[-1]
    if norm == "layer":
        return F.layer_norm(x, (d,), weight, bias, eps)
    if norm == "rms":
        return F.rms_norm(x, (d,), weight, eps)
    raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")


def ffn_block(input, norm_weight, norm_bias, weight1, bias1, weight2, bias2,
              activation_name="relu", *, norm="layer", placement="pre", eps=1e-5):
    """Pre: ``x + ffn(norm(x))``; post: ``norm(x + ffn(x))`` (norm over the last dim)."""
    if placement == "pre":
        return input + ffn(_norm(norm, input, norm_weight, norm_bias, eps), weight1, bias1,
                           weight2, bias2, activation_name)
    if placement == "post":
        return _norm(norm, input + ffn(input, weight1, bias1, weight2, bias2, activation_name),
                     norm_weight, norm_bias, eps)
    raise ValueError(f"placement must be 'pre' or 'post', got {placement!r}")
