"""The converter's IQ4_NL quantizer as it was before it was made fast (issue 15), kept as the
oracle of tests/test_quant_fast.py: the straightforward numpy port, one candidate scale at a time
over whole rows of blocks, that bench/bench_quant.py validated against llama.cpp's quantizer
(README, "K-quants"). prosparse_convert/iq4nl.py must give the same bytes. Do not optimise this.

The algorithm, its arithmetic and its limits: prosparse_convert/iq4nl.py's docstring.
"""

from __future__ import annotations

import numpy as np

from prosparse_convert.iq4nl import _KV, F32, GROUP_MAX_EPS, KVALUES, NTRY, QK  # the grid and constants


def _nearest(v):
    """llama.cpp's best_index_int8 over the grid: the index of the nearest grid value (the upper
    one on a tie), 0 / 15 beyond the ends."""
    v = v.astype(F32)
    mu = np.clip(np.searchsorted(_KV, v, side="right"), 1, 15)
    lower = (v - _KV[mu - 1]) < (_KV[mu] - v)
    idx = np.where(lower, mu - 1, mu)
    idx = np.where(v <= _KV[0], 0, idx)
    return np.where(v >= _KV[15], 15, idx).astype(np.uint8)


def _sums(x, w, L):
    q = _KV[L]
    sumqx = (w * q * x).sum(axis=1, dtype=F32)
    sumq2 = (w * q * q).sum(axis=1, dtype=F32)
    return sumqx, sumq2


def quantize_iq4_nl(x):
    """x (blocks, 32) float32 -> uint8 (blocks, 18): fp16 d, then 16 bytes of nibbles (element j
    in the low nibble of byte j, element 16 + j in the high one)."""
    x = np.ascontiguousarray(x, dtype=F32)
    w = (x * x).astype(F32)
    idx = np.abs(x).argmax(axis=1)
    mx = np.take_along_axis(x, idx[:, None], axis=1)[:, 0]
    zero = np.abs(mx) < GROUP_MAX_EPS
    mxs = np.where(zero, F32(1), mx).astype(F32)
    d = (-mxs / _KV[0]).astype(F32)
    L = _nearest((F32(1) / d)[:, None] * x)
    sumqx, sumq2 = _sums(x, w, L)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (sumqx / sumq2).astype(F32)
    best = (d * sumqx).astype(F32)
    for itry in range(-NTRY, NTRY + 1):
        iscale = (F32(itry + int(KVALUES[0])) / mxs).astype(F32)
        sumqx, sumq2 = _sums(x, w, _nearest(iscale[:, None] * x))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        with np.errstate(divide="ignore", invalid="ignore"):
            dn = (sumqx / sumq2).astype(F32)
        d = np.where(better, dn, d).astype(F32)
        best = np.where(better, (dn * sumqx).astype(F32), best)
    d = np.where(zero, F32(0), d).astype(F32)
    with np.errstate(divide="ignore"):
        iscale = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)
    L = _nearest(iscale[:, None] * x)
    qs = L[:, :16] | (L[:, 16:] << 4)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), qs], axis=1)


def quantize(a: np.ndarray) -> np.ndarray:
    """a (..., k) float32 with k a multiple of 32 -> uint8 (..., k / 32 * 18)."""
    a = np.ascontiguousarray(a, dtype=F32)
    if a.shape[-1] % QK:
        raise ValueError(f"IQ4_NL needs rows of a multiple of {QK} values, not {a.shape[-1]}")
    return quantize_iq4_nl(a.reshape(-1, QK)).reshape(*a.shape[:-1], -1)
