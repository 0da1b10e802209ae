"""Activation profiling: run the model densely over calibration windows with the runtime's capture
hook, count per layer how often each neuron fires, and keep a bounded reservoir of samples.

What is kept per sampled token and layer (one reservoir of token positions shared by all layers, so
memory is `slots x n_layer x bytes per sample` however many tokens stream past):
- ReLU/FATReLU: the residual stream entering the FFN (the predictor's input, float16) and the active
  mask (bit-packed): the predictors' training pairs.
- SiLU: |SiLU(gate)| (float16): the distribution that per-layer thresholds are quantiles of.

ReLU/FATReLU also count, per neuron, the windows in which it fires on the window's first token
(Profile.first_counts): without a BOS token the first token is the attention sink every later
token reads, and a few rare neurons fire there and almost nowhere else (docs/calibrate.md, "One
neuron, one window").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from ..activations import active, silu
from ..errors import ConvertError


class Reservoir:
    """Algorithm R over token positions: after n tokens, each is held with probability slots/n."""

    def __init__(self, slots: int, rng: np.random.Generator) -> None:
        self.slots, self.seen, self.rng = slots, 0, rng

    def place(self, n: int) -> tuple:
        """(positions in the incoming batch of n tokens, slot for each), last writer wins per slot."""
        idx = np.arange(self.seen, self.seen + n)
        slot = idx.copy()
        late = idx >= self.slots
        if late.any():
            r = (self.rng.random(int(late.sum())) * (idx[late] + 1)).astype(np.int64)
            slot[late] = np.where(r < self.slots, r, -1)
        self.seen += n
        keep = slot >= 0
        pos, slot = np.nonzero(keep)[0], slot[keep]
        # a slot chosen twice in one batch keeps the later token, as a sequential pass would
        _, last = np.unique(slot[::-1], return_index=True)
        sel = np.sort(len(slot) - 1 - last)
        return pos[sel], slot[sel]

    @property
    def filled(self) -> int:
        return min(self.seen, self.slots)


@dataclass
class Profile:
    activation: str
    n_tokens: int = 0
    counts: List[np.ndarray] = field(default_factory=list)   # per layer, int64 [n_ff]
    x: Optional[np.ndarray] = None       # [n_layer, slots, n_embd] f16 (relu/fatrelu)
    mask: Optional[np.ndarray] = None    # [n_layer, slots, n_ff/8] packed bits (relu/fatrelu)
    act_abs: Optional[np.ndarray] = None  # [n_layer, slots, n_ff] f16 |SiLU(gate)| (silu)
    n_samples: int = 0
    first_counts: Optional[List[np.ndarray]] = None  # per layer [n_ff]: windows whose first token fires it
    n_windows: int = 0

    def first_freq(self) -> List[np.ndarray]:
        """Per layer, the fraction of windows whose first token fires each neuron."""
        return [(c / max(1, self.n_windows)).astype(np.float32) for c in self.first_counts]

    def freq(self) -> List[np.ndarray]:
        """Per layer, the fraction of tokens on which each neuron fired."""
        return [(c / max(1, self.n_tokens)).astype(np.float32) for c in self.counts]

    def masks(self, layer: int, n_ff: int) -> np.ndarray:
        return np.unpackbits(self.mask[layer, :self.n_samples], axis=1, count=n_ff).astype(bool)


def reservoir_slots(n_layer: int, bytes_per_token_layer: int, max_samples: int, max_bytes: int) -> int:
    return int(max(1, min(max_samples, max_bytes // max(1, n_layer * bytes_per_token_layer))))


def profile(model, windows, activation_kind: str, act_t: float, *, max_samples: int = 20000,
            max_bytes: int = 1 << 30, seed: int = 0, progress: bool = True, desc: str = "profiling",
            thresholds: Optional[List[float]] = None) -> Profile:
    """Runs every window from position 0 through `model` (a prosparse_rt._core.Model) with capture
    on. `thresholds`: SiLU layer thresholds to count firing against (|SiLU(gate)| >= t)."""
    from tqdm import tqdm

    hp = model.hparams
    L, E, F = hp["n_layer"], hp["n_embd"], hp["n_ff"]
    sparse = activation_kind in ("relu", "fatrelu")
    per = (2 * E + (F + 7) // 8) if sparse else 2 * F
    slots = min(reservoir_slots(L, per, max_samples, max_bytes), max(1, sum(len(w) for w in windows)))
    rng = np.random.default_rng(seed)
    res = Reservoir(slots, rng)
    prof = Profile(activation_kind, counts=[np.zeros(F, np.int64) for _ in range(L)])
    if sparse:
        prof.first_counts = [np.zeros(F, np.int64) for _ in range(L)]
        prof.x = np.zeros((L, slots, E), np.float16)
        prof.mask = np.zeros((L, slots, (F + 7) // 8), np.uint8)
    else:
        prof.act_abs = np.zeros((L, slots, F), np.float16)
    bar = tqdm(total=sum(len(w) for w in windows), desc=desc, unit="tok", disable=not progress)
    model.set_capture(True)
    try:
        for w in windows:
            model.rewind(0)
            model.eval(w)
            pos, slot = res.place(len(w))
            for l in range(L):
                x, g = model.captured(l)
                if g.shape != (len(w), F) or x.shape != (len(w), E):
                    raise ConvertError(f"capture of layer {l} has shapes {x.shape}/{g.shape}")
                if sparse:
                    m = active(activation_kind, g, act_t)
                    prof.counts[l] += m.sum(0)
                    prof.first_counts[l] += m[0]
                    if len(pos):
                        prof.x[l, slot] = x[pos].astype(np.float16)
                        prof.mask[l, slot] = np.packbits(m[pos], axis=1)
                else:
                    a = np.abs(silu(g))
                    if thresholds is not None:
                        prof.counts[l] += (a >= thresholds[l]).sum(0)
                    if len(pos):
                        prof.act_abs[l, slot] = np.minimum(a[pos], 65504.0).astype(np.float16)
            prof.n_tokens += len(w)
            prof.n_windows += 1
            bar.update(len(w))
    finally:
        model.set_capture(False)
        bar.close()
    prof.n_samples = res.filled
    return prof
