"""Quality measures on token windows: perplexity, and the KL divergence of a sparse model's next-token
distributions from the dense model's (the allocation's cost; it sees every logit, not only the next
token's, so it needs fewer tokens than perplexity to rank two choices)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def window_logprobs(model, windows: Sequence[List[int]]) -> List[np.ndarray]:
    out = []
    for w in windows:
        model.rewind(0)
        out.append(_log_softmax(model.eval(w, all_logits=True)))
    return out


def perplexity(model, windows: Sequence[List[int]], progress: bool = False, desc: str = "perplexity") -> float:
    """exp(mean NLL of every token but each window's first), each window from position 0."""
    from tqdm import tqdm

    nll, n = 0.0, 0
    for w in tqdm(windows, desc=desc, disable=not progress, leave=False):
        model.rewind(0)
        lp = _log_softmax(model.eval(w, all_logits=True))
        tgt = np.asarray(w[1:])
        nll -= float(lp[np.arange(len(tgt)), tgt].sum())
        n += len(tgt)
    return float(np.exp(nll / max(1, n)))


def kl_from(model, windows: Sequence[List[int]], ref: List[np.ndarray]) -> float:
    """Mean over positions of KL(dense || model), dense log-probabilities given in `ref`."""
    tot, n = 0.0, 0
    for w, lp_ref in zip(windows, ref):
        model.rewind(0)
        lp = _log_softmax(model.eval(w, all_logits=True))
        tot += float((np.exp(lp_ref) * (lp_ref - lp)).sum())
        n += len(w)
    return tot / max(1, n)


def sparsity_of(model) -> Optional[float]:
    """1 - mean active fraction over layers, from the runtime's counters (None if unknown)."""
    a = np.asarray(model.stats()["active_fraction"], dtype=np.float64)
    return None if np.isnan(a).any() else float(1.0 - a.mean())
