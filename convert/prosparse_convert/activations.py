"""The FFN activations as the runtime computes them (cpp/src/ffn.cpp `ffn_activation`), for numpy
arrays and torch tensors alike, so that calibration, training and the runtime agree on which
neurons are zero:

- `silu`: SiLU(g) = g * sigmoid(g); with a threshold t > 0 (a SiLU model's calibrated
  `prosparse.layer_thresholds`, CATS-style) zero where |SiLU(g)| < t.
- `relu`: g where g > 0, else 0.
- `fatrelu`: g where g >= t, else 0 (ProSparse's FATReLU; t = 0 is ReLU).

Outputs keep the input's type and dtype; torch inputs keep their autograd graph.
"""

from __future__ import annotations

import numpy as np

ACTIVATIONS = ("silu", "relu", "fatrelu")


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _where(cond, x):
    """x where cond, else 0, in x's own library."""
    if _is_torch(x):
        import torch

        return torch.where(cond, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return np.where(cond, x, np.zeros((), dtype=x.dtype))


def silu(g):
    """g / (1 + exp(-g)), computed in g's dtype like the runtime (no overflow warning for very
    negative g in numpy: exp overflows to inf and SiLU is -0)."""
    if _is_torch(g):
        import torch

        return torch.nn.functional.silu(g)
    with np.errstate(over="ignore"):
        return g / (1 + np.exp(-g))


def activation(kind: str, gate, threshold: float = 0.0):
    """act(gate) for `kind` (silu, relu, fatrelu) with its threshold (see the module's docstring)."""
    if kind == "silu":
        a = silu(gate)
        return a if threshold <= 0 else _where(abs(a) >= threshold, a)
    if kind == "relu":
        return _where(gate > 0, gate)
    if kind == "fatrelu":
        return _where(gate >= threshold, gate)
    raise ValueError(f"unknown activation {kind!r} (expected one of {', '.join(ACTIVATIONS)})")


def active(kind: str, gate, threshold: float = 0.0):
    """The neurons whose activation is not zero (boolean, the shape of `gate`): the ones a sparse
    strategy computes."""
    return activation(kind, gate, threshold) != 0


__all__ = ["ACTIVATIONS", "activation", "active", "silu"]
