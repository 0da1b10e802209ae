"""Per-layer predictor cut-offs and always-on prefixes, chosen on windows the predictors were not
trained on, and the predictors' quality measured on windows neither training nor the choice saw.

A neuron is computed when the predictor's logit exceeds the layer's cut-off, or when it is among
the layer's `always_on` most frequent neurons (a prefix once the file is in frequency order). The
logits are the ones the runtime computes: the stored (quantized) fc1/fc2 applied to the residual
stream as it enters the FFN, not RMS-normalised (training normalises, which the predictor's
positive homogeneity makes harmless at cut-off 0; any other cut-off compares against the raw
logit, so it is chosen on the raw logit).

For a recall target r a layer's cut-off is the largest value at which the predictor, together with
the always-on prefix, catches at least r of the active neurons on the tuning windows; among the
candidate prefixes the one computing the fewest neurons there is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np


@dataclass
class Choice:
    cutoff: float      # logit cut-off (the neuron runs where logit > cutoff)
    always_on: int     # neurons [0, always_on) of the frequency order always run
    recall: float      # on the tuning windows
    predicted: float   # fraction of neurons computed on the tuning windows


@dataclass
class Quality:
    recall: float              # active neurons computed / active neurons
    predicted_sparsity: float  # 1 - computed neurons / all neurons
    actual_sparsity: float     # 1 - active neurons / all neurons
    n_active: int = 0          # counts, for pooling over layers
    n_hit: int = 0
    n_computed: int = 0
    n_total: int = 0

    def as_dict(self) -> dict:
        return {"recall": self.recall, "predicted_sparsity": self.predicted_sparsity,
                "actual_sparsity": self.actual_sparsity}

    @staticmethod
    def pooled(qs: Sequence["Quality"]) -> "Quality":
        a, h = sum(q.n_active for q in qs), sum(q.n_hit for q in qs)
        c, t = sum(q.n_computed for q in qs), sum(q.n_total for q in qs)
        return Quality(h / a if a else 1.0, 1.0 - c / max(1, t), 1.0 - a / max(1, t), a, h, c, t)


def _cutoff_for(pos: np.ndarray, need: int, rest_max: float) -> float:
    """The largest float32 c with at least `need` of `pos` above it (`rest_max` when need <= 0:
    nothing above it)."""
    if need <= 0:
        return float(rest_max)
    need = min(need, len(pos))
    v = np.partition(pos, len(pos) - need)[len(pos) - need]
    return float(np.nextafter(np.float32(v), np.float32(-np.inf)))


def choose(logit: np.ndarray, y: np.ndarray, target: float, order: Optional[np.ndarray] = None,
           candidates: Iterable[int] = (0,), z: float = 2.0, block: int = 32) -> Choice:
    """The cut-off reaching recall `target` on (logit [n, n_ff], y [n, n_ff] active), for each
    candidate always-on count (neurons order[:k] always computed; order: hottest first), keeping
    the one that computes the fewest neurons. The recall measured on n tokens is an estimate; so
    that recall on other text reaches the target too, the target is raised by `z` standard errors
    of that estimate (the ratio estimator's over blocks of `block` consecutive tokens, the rows of
    `logit` in text order), measured at the choice for the plain target."""
    if order is not None:
        logit, y = logit[:, order], y[:, order]
    cands = sorted({int(k) for k in candidates if 0 <= int(k) <= y.shape[1] and (order is not None or k == 0)})
    best = _best(logit, y, target, cands)
    if z > 0:
        pred = logit > np.float32(best.cutoff)
        pred[:, :best.always_on] = True
        hit, act = (pred & y).sum(1).astype(np.float64), y.sum(1).astype(np.float64)
        # consecutive tokens of a text are alike: blocks of `block` tokens are the units
        nb = max(1, len(hit) // block)
        hit, act = [np.add.reduceat(v, np.arange(0, nb * block, block)) for v in (hit[:nb * block], act[:nb * block])]
        if act.sum() > 0:
            r = hit.sum() / act.sum()
            se = float(np.sqrt(((hit - r * act) ** 2).sum()) / act.sum())
            best = _best(logit, y, min(target + z * se, 1.0), cands)
    return best


def _best(logit: np.ndarray, y: np.ndarray, target: float, cands: Sequence[int]) -> Choice:
    n, F = y.shape
    n_active = int(y.sum())
    need_total = math.ceil(target * n_active - 1e-9)
    best: Optional[Choice] = None
    for k in cands:
        rest_l, rest_y = logit[:, k:], y[:, k:]
        hit_on = int(y[:, :k].sum())
        rest_max = float(rest_l.max()) if rest_l.size else 0.0
        c = _cutoff_for(rest_l[rest_y], need_total - hit_on, rest_max)
        pred = rest_l > c
        hit = hit_on + int((pred & rest_y).sum())
        computed = n * k + int(pred.sum())
        ch = Choice(c, k, hit / n_active if n_active else 1.0, computed / max(1, n * F))
        if best is None or ch.predicted < best.predicted:
            best = ch
    assert best is not None
    return best


def quality(logit: np.ndarray, y: np.ndarray, cutoff: float, always_on: int = 0,
            order: Optional[np.ndarray] = None) -> Quality:
    """Recall and sparsities of the rule (logit > cutoff, or among order[:always_on])."""
    pred = logit > np.float32(cutoff)
    if always_on:
        pred[:, order[:always_on]] = True
    n_act, hit = int(y.sum()), int((pred & y).sum())
    computed, total = int(pred.sum()), y.size
    return Quality(hit / n_act if n_act else 1.0, 1.0 - computed / max(1, total), 1.0 - n_act / max(1, total),
                   n_act, hit, computed, total)


def prefix_candidates(freq: np.ndarray, order: np.ndarray, steps: int = 32) -> list:
    """Always-on counts worth trying: 0 and prefixes of the frequency order, up to the neurons that
    fire on at least a tenth of the tokens (beyond that, computing a neuron always is mostly waste)."""
    f = np.asarray(freq, np.float64)[order]
    limit = int((f >= 0.1).sum())
    if limit == 0:
        return [0]
    step = max(1, limit // steps)
    return sorted({0, limit, *range(step, limit + 1, step)})
