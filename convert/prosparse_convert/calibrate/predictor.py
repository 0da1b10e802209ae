"""Per-layer activation predictors: Linear-ReLU-Linear without bias (PowerInfer's fc1/fc2, input the
residual stream before ffn_norm), trained in numpy with Adam on a class re-weighted binary
cross-entropy, as the ProSparse authors did: active neurons are the minority class, and a missed
active neuron costs more than a wasted inactive one (it is dropped from the output), so positives
weigh n_inactive/n_active (clipped), which selects for recall.

The predictor is positively homogeneous in its input (no bias, ReLU): scaling x scales every logit,
so the decision at cut-off 0 (sigmoid 0.5) does not depend on the scale of x. We train on x divided
by its RMS, the scale-free input the FFN itself sees through ffn_norm; the per-layer cut-offs that
calibration writes are chosen on the raw logits the runtime computes (cutoffs.py).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import ConvertError


def default_rank(n_embd: int) -> int:
    """1024 for 7B-sized models (n_embd 4096, PowerInfer's choice), n_embd/4 for smaller ones; a
    multiple of 32 (whole quant blocks in fc2's rows), at least 64 (below that recall suffers)."""
    return int(min(1024, max(64, (n_embd // 4) // 32 * 32)))


def _normalize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    rms = np.sqrt(np.mean(x * x, axis=1, keepdims=True)) + 1e-6
    return x / rms


def logits(fc1: np.ndarray, fc2: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ fc1.T, 0.0) @ fc2.T


def q8_0_acts(x: np.ndarray) -> np.ndarray:
    """x [n, k] (k a multiple of 32) as the runtime multiplies it with Q8_0/Q4_0 weights: llama.cpp's
    reference Q8_0 values (per block of 32, scale max|x|/127 stored as float16, round half away
    from zero), dequantized."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    x = np.ascontiguousarray(x, np.float32)
    return np.asarray(dequantize(quantize(x, T.Q8_0), T.Q8_0), np.float32).reshape(x.shape)


Q8_ACTS = ("q8_0", "q4_0", "q5_0", "iq4_nl")  # weight types whose products take Q8_0 activations


def runtime_logits(fc1: np.ndarray, fc2: np.ndarray, x: np.ndarray, fc1_type: str, fc2_type: str) -> np.ndarray:
    """The logits the runtime computes from predictors stored at fc1_type/fc2_type (fc1, fc2 already
    the stored weights, dequantized; type names lower case, as gguf's GGMLQuantizationType names
    them): a matrix product with Q8_0/Q4_0 weights quantizes its activations (the residual stream x
    for fc1, the hidden ReLU for fc2) to Q8_0 first; with float weights they stay float."""
    x = np.asarray(x, np.float32)
    h = np.maximum((q8_0_acts(x) if fc1_type in Q8_ACTS else x) @ fc1.T, 0.0)
    return (q8_0_acts(h) if fc2_type in Q8_ACTS else h) @ fc2.T


def train(x: np.ndarray, y: np.ndarray, rank: int, *, epochs: int = 10, batch: int = 64,
          lr: float = 1e-2, pos_weight: Optional[float] = None, max_pos_weight: float = 30.0,
          seed: int = 0) -> tuple:
    """(fc1 [rank, n_embd], fc2 [n_ff, rank]) float32, trained on inputs x [n, n_embd] and active
    masks y [n, n_ff] (bool)."""
    n, E = x.shape
    F = y.shape[1]
    if n < 2:
        raise ConvertError(f"{n} training samples are too few to train a predictor")
    if rank < 1:
        raise ConvertError(f"predictor rank must be >= 1, got {rank}")
    rng = np.random.default_rng(seed)
    xn = _normalize(x)
    yf = y.astype(np.float32)
    p = float(yf.mean())
    if pos_weight is None:
        # twice the class ratio: balancing the classes alone leaves recall near 85% on held-out
        # tokens; a missed neuron is the expensive error, so lean further towards predicting active
        pos_weight = float(np.clip(2.0 * (1.0 - p) / max(p, 1e-6), 1.0, max_pos_weight))
    W1 = (rng.standard_normal((rank, E)) / np.sqrt(E)).astype(np.float32)
    W2 = (rng.standard_normal((F, rank)) / np.sqrt(rank)).astype(np.float32)
    params = [W1, W2]
    m = [np.zeros_like(w) for w in params]
    v = [np.zeros_like(w) for w in params]
    b1, b2, eps, step = 0.9, 0.999, 1e-8, 0
    n_steps = epochs * max(1, (n + batch - 1) // batch)
    for _ in range(epochs):
        order = rng.permutation(n)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            xb, yb = xn[idx], yf[idx]
            h = xb @ W1.T
            a = np.maximum(h, 0.0)
            z = a @ W2.T
            s = 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))
            # d/dz of  w*y*softplus(-z) + (1-y)*softplus(z)  =  (1-y)*s - w*y*(1-s)
            dz = ((1.0 - yb) * s - pos_weight * yb * (1.0 - s)) / (len(idx) * F)
            g2 = dz.T @ a
            dh = (dz @ W2) * (h > 0)
            g1 = dh.T @ xb
            step += 1
            # cosine decay: the last epochs settle instead of bouncing around the optimum
            lr_t = lr * 0.5 * (1.0 + np.cos(np.pi * min(1.0, step / n_steps)))
            for w, g, mi, vi in ((W1, g1, m[0], v[0]), (W2, g2, m[1], v[1])):
                mi *= b1
                mi += (1 - b1) * g
                vi *= b2
                vi += (1 - b2) * g * g
                w -= lr_t * (mi / (1 - b1 ** step)) / (np.sqrt(vi / (1 - b2 ** step)) + eps)
    return W1, W2
