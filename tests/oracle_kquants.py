"""The converter's K-quant quantizer as it was before it was made fast (issue 15), kept as the
oracle of tests/test_quant_fast.py: the straightforward numpy port, one candidate scale at a time
over whole rows of blocks, that bench/bench_quant.py validated against llama.cpp's quantizer
(README, "K-quants"). prosparse_convert/kquants.py must give the same bytes. Do not optimise this.

The algorithm, its arithmetic and its limits: prosparse_convert/kquants.py's docstring.
"""

from __future__ import annotations

import types

import numpy as np

from prosparse_convert import kquants as _fast

from prosparse_convert.kquants import F32, GROUP_MAX_EPS, QK_K, _f16, _rint  # helpers the rewrite kept


def _make_qkx2(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants over rows of x (blocks x n): codes 0..nmax, scale and min with x ~ scale * L - min.
    Returns (scale, the_min, L)."""
    x = x.astype(F32)
    w = w.astype(F32)
    mn = np.minimum(x.min(axis=1), F32(0))
    mx = x.max(axis=1)
    sum_w = w.sum(axis=1, dtype=F32)
    sum_x = (w * x).sum(axis=1, dtype=F32)
    flat = mx == mn
    span = np.where(flat, F32(1), mx - mn).astype(F32)

    def err(scale, mn_, L):
        diff = scale[:, None] * L + mn_[:, None] - x
        diff = np.abs(diff) if use_mad else diff * diff
        return (w * diff).sum(axis=1, dtype=F32)

    iscale = (F32(nmax) / span).astype(F32)
    scale = (F32(1) / iscale).astype(F32)
    L = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(F32)
    best = err(scale, mn, L)
    for step in range(nstep + 1):
        iscale = ((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span).astype(F32)
        La = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(F32)
        sum_l = (w * La).sum(axis=1, dtype=F32)
        sum_l2 = (w * La * La).sum(axis=1, dtype=F32)
        sum_xl = (w * La * x).sum(axis=1, dtype=F32)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, F32(1))
        this_scale = ((sum_w * sum_xl - sum_x * sum_l) / Ds).astype(F32)
        this_min = ((sum_l2 * sum_x - sum_l * sum_xl) / Ds).astype(F32)
        pos = this_min > 0
        this_min = np.where(pos, F32(0), this_min)
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = np.where(pos, sum_xl / np.where(sum_l2 == 0, F32(1), sum_l2), this_scale).astype(F32)
        cur = err(this_scale, this_min, La)
        better = ok & (cur < best)
        L = np.where(better[:, None], La, L)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale = np.where(flat, F32(0), scale)
    L = np.where(flat[:, None], F32(0), L)
    return scale.astype(F32), (-mn).astype(F32), L.astype(np.int32)


def _make_qx(x, nmax):
    """make_qx_quants with rmse_type 1 (weights x^2), no importance: codes -nmax..nmax-1 (+ nmax)."""
    x = x.astype(F32)
    idx = np.abs(x).argmax(axis=1)
    mx = np.take_along_axis(x, idx[:, None], axis=1)[:, 0]
    zero = np.abs(mx) < GROUP_MAX_EPS
    mxs = np.where(zero, F32(1), mx)
    w = x * x

    def codes(iscale):
        return np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1).astype(F32)

    iscale = (F32(-nmax) / mxs).astype(F32)
    L = codes(iscale)
    sumlx = (w * x * L).sum(axis=1, dtype=F32)
    suml2 = (w * L * L).sum(axis=1, dtype=F32)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 == 0, F32(1), suml2), F32(0)).astype(F32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = (-(F32(nmax) + F32(0.1) * F32(step)) / mxs).astype(F32)
        La = codes(iscale)
        slx = (w * x * La).sum(axis=1, dtype=F32)
        sl2 = (w * La * La).sum(axis=1, dtype=F32)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        sl2s = np.where(sl2 > 0, sl2, F32(1))
        L = np.where(better[:, None], La, L)
        scale = np.where(better, slx / sl2s, scale).astype(F32)
        best = np.where(better, scale * slx, best)
    scale = np.where(zero, F32(0), scale)
    L = np.where(zero[:, None], F32(0), L)
    return scale.astype(F32), (L + nmax).astype(np.int32)


def _make_q3(x, nmax):
    """make_q3_quants with do_rmse: codes -nmax..nmax-1, refined element by element (weights x^2)."""
    x = x.astype(F32)
    idx = np.abs(x).argmax(axis=1)
    mx = np.take_along_axis(x, idx[:, None], axis=1)[:, 0]
    zero = np.abs(mx) < GROUP_MAX_EPS
    iscale = (F32(-nmax) / np.where(zero, F32(1), mx)).astype(F32)
    L = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1).astype(F32)
    w = x * x
    sumlx = (w * x * L).sum(axis=1, dtype=F32)
    suml2 = (w * L * L).sum(axis=1, dtype=F32)
    active = ~zero
    for _ in range(5):
        changed = np.zeros(x.shape[0], bool)
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], L[:, i]
            slx = sumlx - wi * xi * li
            pos = active & (slx > 0)
            sl2 = suml2 - wi * li * li
            with np.errstate(divide="ignore", invalid="ignore"):
                new_l = np.clip(_rint(np.where(pos, xi * sl2 / np.where(pos, slx, F32(1)), F32(0))), -nmax, nmax - 1)
            new_l = new_l.astype(F32)
            diff = pos & (new_l != li)
            slx2 = slx + wi * xi * new_l
            sl22 = sl2 + wi * new_l * new_l
            take = diff & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = np.where(take, new_l, li)
            sumlx = np.where(take, slx2, sumlx).astype(F32)
            suml2 = np.where(take, sl22, suml2).astype(F32)
            changed |= take
        active &= changed
        if not active.any():
            break
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0)).astype(F32)
    scale = np.where(zero, F32(0), scale)
    L = np.where(zero[:, None], F32(0), L)
    return scale, (L + nmax).astype(np.int32)


# The packers and the per-type drivers (_pack_*, _q45_k, quantize_q*_k) did not change with the
# fast searches: they are kquants.py's own, re-bound to this module's globals so that they call the
# straightforward searches above. What this oracle checks is the searches; the packing is checked
# against the gguf package's dequantization (tests/test_kquants.py, tests/test_quant_types.py).
def _rebind(name):
    f = getattr(_fast, name)
    return types.FunctionType(f.__code__, globals(), name, f.__defaults__, f.__closure__)


for _name in ("_pack_k4_scales", "_unpack_k4_scales", "_le_u8", "_q45_k", "_pack_nibbles_k", "_pack_2bit",
              "_half_bytes", "quantize_q4_k", "quantize_q5_k", "quantize_q6_k", "quantize_q3_k", "quantize_q2_k"):
    globals()[_name] = _rebind(_name)


QUANTIZERS = {"Q2_K": quantize_q2_k, "Q3_K": quantize_q3_k, "Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k,
              "Q6_K": quantize_q6_k}


def quantize(a: np.ndarray, name: str) -> np.ndarray:
    """a (..., k) float32 with k a multiple of 256 -> uint8 (..., k / 256 * block bytes)."""
    a = np.ascontiguousarray(a, dtype=F32)
    if a.shape[-1] % QK_K:
        raise ValueError(f"{name} needs rows of a multiple of {QK_K} values, not {a.shape[-1]}")
    blocks = QUANTIZERS[name](a.reshape(-1, QK_K))
    return blocks.reshape(*a.shape[:-1], -1)
