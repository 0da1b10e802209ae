"""Quality measures on token windows: perplexity, and the KL divergence of a sparse model's next-token
distributions from the dense model's (the allocation's cost; it sees every logit, not only the next
token's, so it needs fewer tokens than perplexity to rank two choices)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

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


def compare(models: Dict[str, object], windows: Sequence[List[int]], ref: Optional[str] = None,
            progress: bool = False, desc: str = "evaluating") -> Dict[str, Dict[str, float]]:
    """Per model: perplexity as `perplexity` computes it; with `ref` (one of the models), also the
    mean over positions of KL(ref || model) and the fraction of positions whose most likely next
    token is ref's. Window by window, so only one window's logits are held per model."""
    from tqdm import tqdm

    out = {k: {"nll": 0.0, "kl": 0.0, "top1": 0.0} for k in models}
    n_tgt = n_pos = 0
    for w in tqdm(windows, desc=desc, disable=not progress, leave=False):
        tgt = np.asarray(w[1:])
        lps = {}
        for k, m in models.items():
            m.rewind(0)
            lps[k] = _log_softmax(m.eval(w, all_logits=True))
            out[k]["nll"] -= float(lps[k][np.arange(len(tgt)), tgt].sum())
        if ref is not None:
            r = lps[ref]
            for k, lp in lps.items():
                out[k]["kl"] += float((np.exp(r) * (r - lp)).sum())
                out[k]["top1"] += float((lp.argmax(-1) == r.argmax(-1)).sum())
        n_tgt += len(tgt)
        n_pos += len(w)
    res = {}
    for k, v in out.items():
        res[k] = {"perplexity": float(np.exp(v["nll"] / max(1, n_tgt)))}
        if ref is not None:
            res[k].update(kl=v["kl"] / max(1, n_pos), top1=v["top1"] / max(1, n_pos))
    return res


def kl_from(model, windows: Sequence[List[int]], ref: List[np.ndarray]) -> float:
    """Mean over positions of KL(dense || model), dense log-probabilities given in `ref`."""
    tot, n = 0.0, 0
    for w, lp_ref in zip(windows, ref):
        model.rewind(0)
        lp = _log_softmax(model.eval(w, all_logits=True))
        tot += float((np.exp(lp_ref) * (lp_ref - lp)).sum())
        n += len(w)
    return tot / max(1, n)


def predict_stats(model) -> tuple:
    """(per-layer rows, pooled) of a predict model run with diag_recall: recall, predicted sparsity
    (neurons computed) and true sparsity (neurons active), from the runtime's counters. Pooled over
    layers, recall weighs each layer by its active neurons."""
    st = model.stats()
    rec = np.asarray(st["recall"], np.float64)
    pred = np.asarray(st["predicted_fraction"], np.float64)
    act = np.asarray(st["active_fraction"], np.float64)
    rows = [{"recall": float(r), "predicted_sparsity": float(1 - p), "actual_sparsity": float(1 - a)}
            for r, p, a in zip(rec, pred, act)]
    pooled = {"recall": float(np.nansum(rec * act) / max(1e-30, np.nansum(act))),
              "predicted_sparsity": float(1 - np.nanmean(pred)), "actual_sparsity": float(1 - np.nanmean(act))}
    return rows, pooled


def sparsity_of(model) -> Optional[float]:
    """1 - mean active fraction over layers, from the runtime's counters (None if unknown)."""
    a = np.asarray(model.stats()["active_fraction"], dtype=np.float64)
    return None if np.isnan(a).any() else float(1.0 - a.mean())
