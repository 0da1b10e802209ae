"""Training-free sparsity for SiLU models (CATS, Lee et al. 2024): per layer, zero SiLU(gate) where
its magnitude is below a threshold, the quantile of |SiLU(gate)| on calibration text that reaches the
layer's sparsity. Layers differ in how much sparsity they tolerate, so instead of one sparsity for
all, the per-layer levels are allocated greedily (after TEAL, Liu et al. 2024): the cost of each
layer at a few levels is measured end to end (KL of the next-token distribution from the dense
model's, that layer alone sparsified), and levels are raised one step at a time where the cost grows
least until the mean reaches the target. Costs are assumed additive across layers; the result is
checked against uniform allocation on the same tokens, and uniform is kept if it is better."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import evaluate

log = logging.getLogger(__name__)

STEP = 0.025          # granularity of per-layer levels
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


def measured_sparsity(act_abs: np.ndarray, n_samples: int, thresholds: Sequence[float]) -> List[float]:
    return [float((act_abs[l, :n_samples].astype(np.float32) < t).mean()) for l, t in enumerate(thresholds)]


def probe_levels(target: float) -> List[float]:
    lv = sorted({round(min(MAX_LEVEL, max(STEP, target + d)), 3) for d in (-0.2, 0.0, 0.2)})
    return lv


@dataclass
class Allocation:
    levels: List[float]
    method: str                      # "greedy" or "uniform"
    kl: Dict[str, float] = field(default_factory=dict)   # method -> KL on the probe tokens
    costs: Optional[np.ndarray] = None  # [n_layer, len(probe)] measured single-layer KL


def greedy(costs: np.ndarray, probe: Sequence[float], target: float, max_level: float) -> List[float]:
    """Raise per-layer levels by STEP where the interpolated cost grows least until the mean level
    reaches target. costs[l, j]: cost of layer l alone at probe[j]; cost(0) = 0."""
    n_layer = costs.shape[0]
    xs = np.concatenate([[0.0], np.asarray(probe, dtype=np.float64)])
    grid = np.arange(0.0, max_level + 1e-9, STEP)
    curve = np.stack([np.interp(grid, xs, np.concatenate([[0.0], np.maximum(costs[l], 0.0)]))
                      for l in range(n_layer)])
    idx = np.zeros(n_layer, dtype=np.int64)
    need = int(round(target / STEP * n_layer))
    for _ in range(need):
        inc = np.full(n_layer, np.inf)
        ok = idx + 1 < len(grid)
        inc[ok] = curve[ok, idx[ok] + 1] - curve[ok, idx[ok]]
        if not np.isfinite(inc).any():
            break
        idx[int(np.argmin(inc))] += 1
    return [float(grid[i]) for i in idx]


def allocate(model, act_abs: np.ndarray, n_samples: int, target: float, windows: Sequence[List[int]],
             method: str = "greedy", progress: bool = True) -> Allocation:
    """Per-layer sparsity levels averaging `target`. `model`: a _core.Model of the input file (SiLU),
    whose thresholds are set in memory (set_layer_thresholds) for each measurement."""
    from tqdm import tqdm

    n_layer = act_abs.shape[0]
    uniform = [float(target)] * n_layer
    if method == "uniform" or target <= 0:
        return Allocation(uniform, "uniform")
    model.set_layer_thresholds([])
    ref = evaluate.window_logprobs(model, windows)
    probe = probe_levels(target)
    costs = np.zeros((n_layer, len(probe)))
    bar = tqdm(total=n_layer * len(probe), desc="layer sensitivity", disable=not progress)
    for j, s in enumerate(probe):
        thr = quantile_thresholds(act_abs, n_samples, [s] * n_layer)
        for l in range(n_layer):
            t = [0.0] * n_layer
            t[l] = thr[l]
            model.set_layer_thresholds(t)
            costs[l, j] = evaluate.kl_from(model, windows, ref)
            bar.update(1)
    bar.close()
    levels = greedy(costs, probe, target, min(MAX_LEVEL, max(probe)))
    kl = {}
    for name, lv in (("uniform", uniform), ("greedy", levels)):
        model.set_layer_thresholds(quantile_thresholds(act_abs, n_samples, lv))
        kl[name] = evaluate.kl_from(model, windows, ref)
    model.set_layer_thresholds([])
    best = "greedy" if kl["greedy"] <= kl["uniform"] else "uniform"
    if best == "uniform":
        log.warning("greedy allocation (KL %.4f) did not beat uniform (KL %.4f) on the probe tokens; "
                    "keeping uniform", kl["greedy"], kl["uniform"])
    return Allocation(levels if best == "greedy" else uniform, best, kl, costs)
