"""Training-free sparsity for SiLU models (CATS, Lee et al. 2024): per layer, zero SiLU(gate) where
its magnitude is below a threshold, the quantile of |SiLU(gate)| on calibration text that reaches the
layer's sparsity. Layers differ in how much sparsity they tolerate, so the per-layer levels are
allocated greedily, after TEAL (Liu et al. 2024), measured end to end: starting from uniform levels,
each round measures, for every layer, how much the KL divergence of the next-token distributions
from the dense model's grows when that layer alone takes `step` more sparsity *with all the others at
their current levels* (so interactions between layers count), then moves one, two or three `step`s
of sparsity from the most to the least sensitive layers (the mean stays on target) and keeps the best
move only if the KL of the whole allocation falls. Uniform is the starting point, so the result is never worse than uniform
on the probe tokens. (Costs measured one layer at a time against a dense model, then added, were
tried first: on SmolLM2 they favoured concentrating sparsity in a few layers and lost to uniform.)"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import evaluate

log = logging.getLogger(__name__)

MAX_LEVEL = 0.95      # no layer is made sparser than this


def quantile_thresholds(act_abs: np.ndarray, n_samples: int, levels: Sequence[float]) -> List[float]:
    """Per layer l, the threshold t with a fraction levels[l] of |SiLU(gate)| samples below t."""
    out = []
    for l, s in enumerate(levels):
        if s <= 0:
            out.append(0.0)
            continue
        v = act_abs[l, :n_samples].astype(np.float32).ravel()
        out.append(float(np.quantile(v, min(float(s), 1.0), method="higher")))
    return out


class GridQuantiles:
    """quantile_thresholds for levels on a grid, each layer's grid of quantiles found in one pass
    (np.quantile with every grid level at once) the first time the layer is asked for: the greedy
    search asks for thousands of level vectors, all on target + k * step, and one quantile of a
    layer's samples costs as much as all of them (a partition of every sample). Levels off the grid
    are computed as quantile_thresholds would."""

    def __init__(self, act_abs: np.ndarray, n_samples: int, grid: Sequence[float]) -> None:
        self._a, self._n = act_abs, n_samples
        self._grid = sorted({round(float(g), 6) for g in grid if 0 < g <= 1.0})
        self._memo: Dict[tuple, float] = {}

    def __call__(self, levels: Sequence[float]) -> List[float]:
        out = []
        for l, s in enumerate(levels):
            s = round(float(s), 6)
            if s <= 0:
                out.append(0.0)
                continue
            if (l, s) not in self._memo:
                v = self._a[l, :self._n].astype(np.float32).ravel()
                qs = self._grid if s in self._grid and (l, self._grid[0]) not in self._memo else [s]
                for q, t in zip(qs, np.quantile(v, [min(q, 1.0) for q in qs], method="higher")):
                    self._memo[(l, q)] = float(t)
            out.append(self._memo[(l, s)])
        return out


def measured_sparsity(act_abs: np.ndarray, n_samples: int, thresholds: Sequence[float]) -> List[float]:
    return [float((act_abs[l, :n_samples].astype(np.float32) < t).mean()) for l, t in enumerate(thresholds)]


@dataclass
class Allocation:
    levels: List[float]
    method: str                      # "greedy" or "uniform"
    kl: Dict[str, float] = field(default_factory=dict)   # method -> KL on the probe tokens
    history: List[float] = field(default_factory=list)   # KL after each accepted round


def exchange(levels: Sequence[float], marginal: Sequence[float], k: int, step: float,
             max_level: float) -> List[float]:
    """Lower the k layers with the largest marginal cost by `step` and raise the k with the smallest,
    within [0, max_level]; the mean is unchanged."""
    lv = list(levels)
    order = np.argsort(np.asarray(marginal, dtype=np.float64), kind="stable")
    down = [int(i) for i in order[::-1] if lv[i] - step >= -1e-9][:k]
    up = [int(i) for i in order if lv[i] + step <= max_level + 1e-9 and int(i) not in down][:k]
    k = min(len(down), len(up))
    for i in down[:k]:
        lv[i] = round(lv[i] - step, 6)
    for i in up[:k]:
        lv[i] = round(lv[i] + step, 6)
    return lv


def allocate(model, act_abs: np.ndarray, n_samples: int, target: float, windows: Sequence[List[int]],
             method: str = "greedy", rounds: int = 3, step: float = 0.05, progress: bool = True) -> Allocation:
    """Per-layer sparsity levels averaging `target`. `model`: a _core.Model of the input file (SiLU),
    whose thresholds are set in memory (set_layer_thresholds) for each measurement."""
    from tqdm import tqdm

    n_layer = act_abs.shape[0]
    uniform = [float(target)] * n_layer
    if method == "uniform" or target <= 0:
        return Allocation(uniform, "uniform")
    model.set_layer_thresholds([])
    ref = evaluate.window_logprobs(model, windows)
    # every level the search can reach: the target moved by whole steps (exchange rounds to 1e-6)
    quantiles = GridQuantiles(act_abs, n_samples, [target + k * step for k in range(-int(target / step) - 1,
                                                                                      int(1 / step) + 2)])

    def kl_of(lv):
        model.set_layer_thresholds(quantiles(lv))
        return evaluate.kl_from(model, windows, ref)

    levels, cur = uniform, kl_of(uniform)
    kl = {"uniform": cur}
    history = [cur]
    k = max(1, n_layer // 4)
    bar = tqdm(total=rounds * (n_layer + 1), desc="allocating sparsity", disable=not progress)
    for _ in range(rounds):
        marginal = []
        for l in range(n_layer):
            lv = list(levels)
            lv[l] = min(MAX_LEVEL, lv[l] + step)
            marginal.append(kl_of(lv) - cur)
            bar.update(1)
        # the marginals are a local linear model: try moves of one, two and three steps on it
        best = None
        for mult in (1, 2, 3):
            cand = exchange(levels, marginal, k, step * mult, MAX_LEVEL)
            if cand == levels:
                continue
            new = kl_of(cand)
            if best is None or new < best[1]:
                best = (cand, new)
        bar.update(1)
        if best is not None and best[1] < cur:
            levels, cur = best
            history.append(cur)
        else:
            k = max(1, k // 2)  # too bold a move: try fewer layers
    bar.close()
    model.set_layer_thresholds([])
    kl["greedy"] = cur
    return Allocation(levels, "greedy" if levels != uniform else "uniform", kl, history)
