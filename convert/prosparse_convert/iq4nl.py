"""IQ4_NL quantizer: llama.cpp's algorithm (ggml-quants.c, quantize_iq4_nl without an importance
matrix: quantize_row_iq4_nl_impl with 32-weight blocks and ntry = 7), vectorised over blocks with
numpy. The gguf package only dequantizes IQ4_NL; its dequantizer reads what this writes
(tests/test_kquants.py).

Per block of 32: the codes index the non-linear grid KVALUES (x ~ d * KVALUES[code]). Each
element weighs x^2. Starting from d = max / 127 (max: the element of largest magnitude, sign
kept), then for the 15 inverse scales (t - 127) / max, t = -7..7, the codes are the nearest grid
points and the least-squares scale sumqx / sumq2 is kept when it lowers the weighted error
(sumqx^2 / sumq2 largest). The codes are then redone with the chosen (float) scale, which is
stored as fp16. Arithmetic is float32 as in C; sums run in numpy's order, so a tie between two
candidate scales to the last bit may go the other way than llama.cpp's (bench/bench_quant.py
compares the errors).

The search runs chunked, threaded and transposed like kquants.py, with the nearest grid point
looked up in a table; the bytes are those of tests/oracle_iq4nl.py (tests/test_quant_fast.py).
"""

from __future__ import annotations

import numpy as np

from . import kquants
from .kquants import _pw

QK = 32
F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
NTRY = 7
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_KV = KVALUES.astype(F32)


# _nearest by table: the grid's midpoints are multiples of 1/2, so the index of the nearest grid
# value (the upper one on a tie) depends only on t = floor(2 v): it is the number of midpoints m
# with t >= 2 m. The tables cover t = -_TMAX.._TMAX and are rolled so that np.take(..., mode="wrap")
# reads t directly (negative t from the end).
_TMAX = 320
_MID2 = (_KV[:-1] + _KV[1:]).astype(np.int64)  # 2 x the midpoints, exact
_T = np.roll(np.arange(-_TMAX, _TMAX + 1), -_TMAX)
_LUT_IDX = (_T[:, None] >= _MID2[None, :]).sum(axis=1).astype(np.uint8)
_LUT_Q = _KV[_LUT_IDX]


def _slot(v2, clamp):
    """floor(v2) (v2 = 2 v) as table indices. With clamp, clamped to +-_TMAX first (NaN -> the top,
    where llama.cpp's best_index_int8 ends up too); without, |v2| must be below _TMAX."""
    t = np.floor(v2, out=v2)
    if clamp:
        np.fmin(t, F32(_TMAX), out=t)
        np.fmax(t, F32(-_TMAX), out=t)
    return t.astype(np.intp)


def _nearest(v):
    """llama.cpp's best_index_int8 over the grid: the index of the nearest grid value (the upper
    one on a tie), 0 / 15 beyond the ends."""
    return np.take(_LUT_IDX, _slot(np.asarray(v, F32) * F32(2), True), mode="wrap")


def _sums_t(xT, w, v2):
    """sumqx, sumq2 of the blocks (transposed: 32 x blocks) for the codes nearest v2 / 2, where
    |v2| < _TMAX: 2 (iscale x) is (2 iscale) x to the bit, as scaling by 2 commutes with rounding
    (and below the normal range floor() of either is 0 or -1, the same code)."""
    q = np.take(_LUT_Q, _slot(v2, False), mode="wrap")
    s2 = np.empty((xT.shape[0], 2, xT.shape[1]), F32)  # w q x, w q q: summed in one go
    np.multiply(w, q, out=s2[:, 1])
    np.multiply(s2[:, 1], xT, out=s2[:, 0])
    s2[:, 1] *= q
    return _pw(s2)


def quantize_iq4_nl(x):
    """x (blocks, 32) float32 -> uint8 (blocks, 18): fp16 d, then 16 bytes of nibbles (element j
    in the low nibble of byte j, element 16 + j in the high one). Every candidate scale runs for
    all blocks at once on the transposed blocks."""
    x = np.ascontiguousarray(x, dtype=F32)
    idx = np.abs(x).argmax(axis=1)
    mx = np.take_along_axis(x, idx[:, None], axis=1)[:, 0]
    zero = np.abs(mx) < GROUP_MAX_EPS
    mxs = np.where(zero, F32(1), mx).astype(F32)
    xT = np.ascontiguousarray(x.T)
    w = (xT * xT).astype(F32)
    d = (-mxs / _KV[0]).astype(F32)
    sumqx, sumq2 = _sums_t(xT, w, (F32(2) * (F32(1) / d)) * xT)  # |1/d x| <= 127
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (sumqx / sumq2).astype(F32)
    best = (d * sumqx).astype(F32)
    for itry in range(-NTRY, NTRY + 1):
        iscale = (F32(itry + int(KVALUES[0])) / mxs).astype(F32)
        sumqx, sumq2 = _sums_t(xT, w, (F32(2) * iscale) * xT)  # |iscale x| <= 134
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        with np.errstate(divide="ignore", invalid="ignore"):
            dn = (sumqx / sumq2).astype(F32)
        d = np.where(better, dn, d).astype(F32)
        best = np.where(better, (dn * sumqx).astype(F32), best)
    d = np.where(zero, F32(0), d).astype(F32)
    with np.errstate(divide="ignore"):
        iscale = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)
    with np.errstate(invalid="ignore"):
        L = _nearest(iscale[:, None] * x)
    qs = L[:, :16] | (L[:, 16:] << 4)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), qs], axis=1)


def quantize(a: np.ndarray) -> np.ndarray:
    """a (..., k) float32 with k a multiple of 32 -> uint8 (..., k / 32 * 18)."""
    a = np.ascontiguousarray(a, dtype=F32)
    if a.shape[-1] % QK:
        raise ValueError(f"IQ4_NL needs rows of a multiple of {QK} values, not {a.shape[-1]}")
    blocks = kquants.run_chunks(quantize_iq4_nl, a.reshape(-1, QK), kquants.CHUNK_WEIGHTS // QK)
    return blocks.reshape(*a.shape[:-1], -1)
