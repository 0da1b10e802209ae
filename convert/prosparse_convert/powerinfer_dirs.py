"""PowerInfer's side files: predictor directories (`model_{i}.pt` with fc1.weight [R, n_embd] and
fc2.weight [n_ff, R], Linear-ReLU-Linear without bias; R may differ per layer) and activation
directories (`activation_{i}.pt`, per-neuron firing counts). Read in numeric layer order; the layer
count, every shape and every file are checked before anything is written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

import numpy as np

from .errors import ConvertError


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ConvertError("reading PowerInfer .pt files needs torch "
                           "(pip install 'prosparse-rt[torch]')") from e
    return torch


def _numbered(d: Path, prefix: str, n_layer: int) -> List[Path]:
    if not d.is_dir():
        raise ConvertError(f"not a directory: {d}")
    pat = re.compile(rf"^{re.escape(prefix)}_(\d+)\.pt$")
    found: Dict[int, Path] = {}
    for f in d.iterdir():
        m = pat.match(f.name)
        if m:
            found[int(m.group(1))] = f
    missing = [i for i in range(n_layer) if i not in found]
    if missing:
        raise ConvertError(f"missing file: {d / f'{prefix}_{missing[0]}.pt'} "
                           f"({len(missing)} of {n_layer} layers have no {prefix}_N.pt)")
    extra = sorted(i for i in found if i >= n_layer)
    if extra:
        raise ConvertError(f"{d}: {prefix}_{extra[0]}.pt is for layer {extra[0]}, but the model has "
                           f"{n_layer} layers (wrong layer count)")
    return [found[i] for i in range(n_layer)]


def _load(path: Path):
    torch = _torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConvertError(f"cannot read {path}: {e}") from e


def _as_f32(t, what: str) -> np.ndarray:
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise ConvertError(f"{what}: expected a tensor, got {type(t).__name__}")
    a = t.detach().float().numpy()
    if not np.all(np.isfinite(a)):
        raise ConvertError(f"{what}: contains NaN or infinity")
    return np.ascontiguousarray(a, dtype=np.float32)


class Predictors:
    """Shapes checked at construction; weights loaded one layer at a time when written."""

    def __init__(self, d: Path, n_layer: int, n_embd: int, n_ff: int) -> None:
        self.files = _numbered(Path(d), "model", n_layer)
        self.ranks: List[int] = []
        for i, f in enumerate(self.files):
            fc1, fc2 = self._read(f)
            if fc1.ndim != 2 or fc1.shape[1] != n_embd:
                raise ConvertError(f"{f}: fc1.weight has shape {list(fc1.shape)}, expected [R, {n_embd}]")
            r = fc1.shape[0]
            if r < 1 or fc2.shape != (n_ff, r):
                raise ConvertError(f"{f}: fc2.weight has shape {list(fc2.shape)}, expected [{n_ff}, {r}] "
                                   f"(n_ff, the rank of fc1)")
            self.ranks.append(r)

    @staticmethod
    def _read(f: Path):
        sd = _load(f)
        if not isinstance(sd, dict):
            raise ConvertError(f"{f}: expected a state dict with fc1.weight and fc2.weight")
        for k in ("fc1.weight", "fc2.weight"):
            if k not in sd:
                raise ConvertError(f"{f}: missing {k}")
        unknown = sorted(set(sd) - {"fc1.weight", "fc2.weight"})
        if unknown:
            raise ConvertError(f"{f}: unexpected entries {unknown} (the predictor is "
                               f"Linear-ReLU-Linear without bias)")
        return sd["fc1.weight"], sd["fc2.weight"]

    def layer(self, i: int):
        fc1, fc2 = self._read(self.files[i])
        return _as_f32(fc1, f"{self.files[i]} fc1.weight"), _as_f32(fc2, f"{self.files[i]} fc2.weight")


def read_activation_freq(d: Path, n_layer: int, n_ff: int) -> List[np.ndarray]:
    """Per layer, each neuron's count divided by the layer's largest count (PowerInfer's files do not
    record the number of tokens, docs/design.md "Tensors")."""
    out = []
    for f in _numbered(Path(d), "activation", n_layer):
        obj = _load(f)
        counts = _as_f32(obj, str(f)).astype(np.float64)
        if counts.shape != (n_ff,):
            raise ConvertError(f"{f}: counts have shape {list(counts.shape)}, expected [{n_ff}] (n_ff)")
        if np.any(counts < 0):
            raise ConvertError(f"{f}: negative activation counts")
        m = counts.max()
        out.append((counts / m if m > 0 else counts).astype(np.float32))
    return out
