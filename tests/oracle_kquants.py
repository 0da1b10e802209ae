"""The converter's K-quant quantizer as it was before it was made fast (issue 15), kept as the
oracle of tests/test_quant_fast.py: the straightforward numpy port, one candidate scale at a time
over whole rows of blocks, that bench/bench_quant.py validated against llama.cpp's quantizer
(README, "K-quants"). prosparse_convert/kquants.py must give the same bytes. Do not optimise this.

Quantizers for the K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): llama.cpp's reference algorithms
(ggml-quants.c quantize_row_q*_K_ref, what its quantize tool runs without an importance matrix),
vectorised over blocks with numpy. The gguf package only dequantizes these types; its
dequantizer reads what this writes (tests/test_kquants.py).

Arithmetic is float32 as in C, with nearest_int = round half to even (np.rint). Sums over a block
run in numpy's order rather than C's sequential one, so a choice between two candidate scales
that tie to the last bit may differ from llama.cpp's; the error stays the same (bench/bench_quant.py
measures it against llama.cpp's quantizer).
"""

from __future__ import annotations

import numpy as np

QK_K = 256
F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


def _rint(x):
    return np.rint(x).astype(np.int32)


def _f16(x):
    """fp16 rounding as ggml stores a scale, back as float32."""
    return np.asarray(x, F32).astype(np.float16).astype(F32)


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


def _pack_k4_scales(ls, lm):
    """Q4_K/Q5_K: 8 six-bit scales and mins per super-block into 12 bytes (blocks x 12)."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4]
    out[:, 4:8] = lm[:, 0:4]
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return out


def _unpack_k4_scales(s):
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(F32), m.astype(F32)


def _le_u8(v):
    """nearest_int result stored into a uint8_t, as C does (wrapping)."""
    return (v.astype(np.int64) & 0xFF).astype(np.uint8)


def _q45_k(x, nmax, rmin, nstep):
    """Shared part of Q4_K and Q5_K: per super-block (d, dmin, packed scales, codes 0..nmax)."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    av = np.sqrt((sub * sub).sum(axis=1, dtype=F32) / F32(32)).astype(F32)
    weights = av[:, None] + np.abs(sub)
    scales, mins, L = _make_qkx2(sub, weights, nmax, rmin, 0.1, nstep, False)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 256)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0)).astype(F32)
    inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0)).astype(F32)
    ls = np.minimum(_le_u8(_rint(inv_scale[:, None] * scales)), 63)
    lm = np.minimum(_le_u8(_rint(inv_min[:, None] * mins)), 63)
    packed = _pack_k4_scales(ls, lm)
    d = (max_scale / F32(63)).astype(np.float16)
    dmin = (max_min / F32(63)).astype(np.float16)
    sc, m = _unpack_k4_scales(packed)
    dd = d.astype(F32)[:, None] * sc
    dm = dmin.astype(F32)[:, None] * m
    xs = x.reshape(nb, 8, 32)
    ok = dd != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        Ln = np.clip(_rint((xs + dm[:, :, None]) / np.where(ok, dd, F32(1))[:, :, None]), 0, nmax)
    L = np.where(ok[:, :, None], Ln, L.reshape(nb, 8, 32)).reshape(nb, 256)
    return d, dmin, packed, L


def _pack_nibbles_k(L):
    """Q4_K/Q5_K low nibbles: each 64 codes -> 32 bytes (j low, j + 32 high)."""
    L = (L & 0xF).astype(np.uint8).reshape(-1, 4, 2, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)


def _pack_2bit(L):
    """Q2_K/Q3_K low bits: each 128 codes -> 32 bytes, code j + 32 s in bits 2s."""
    L = (L & 3).astype(np.uint8).reshape(-1, 2, 4, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64)


def _half_bytes(v):
    return v.astype(np.float16).view(np.uint8).reshape(-1, 2)


def quantize_q4_k(x):
    d, dmin, packed, L = _q45_k(x, 15, -1.0, 20)
    return np.concatenate([_half_bytes(d), _half_bytes(dmin), packed, _pack_nibbles_k(L)], axis=1)


def quantize_q5_k(x):
    d, dmin, packed, L = _q45_k(x, 31, -0.5, 15)
    hi = (L >> 4).astype(np.uint8).reshape(-1, 8, 32)  # bit s of qh[j]: code j + 32 s
    qh = np.zeros((L.shape[0], 32), np.uint8)
    for s in range(8):
        qh |= hi[:, s] << s
    return np.concatenate([_half_bytes(d), _half_bytes(dmin), packed, qh, _pack_nibbles_k(L)], axis=1)


def quantize_q6_k(x):
    nb = x.shape[0]
    scales, L = _make_qx(x.reshape(nb * 16, 16), 32)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 256)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, idx[:, None], axis=1)[:, 0]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = (F32(-128) / np.where(zero, F32(1), max_scale)).astype(F32)
    d = np.where(zero, F32(0), F32(1) / iscale).astype(np.float16)
    sc = np.minimum(_rint(iscale[:, None] * scales), 127)
    sc = np.where(zero[:, None], 0, sc).astype(np.int8)
    dd = d.astype(F32)[:, None] * sc.astype(F32)
    ok = dd != 0
    xs = x.reshape(nb, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        Ln = np.clip(_rint(xs / np.where(ok, dd, F32(1))[:, :, None]), -32, 31) + 32
    L = np.where(ok[:, :, None], Ln, L.reshape(nb, 16, 16)).reshape(nb, 256)
    L = np.where(zero[:, None], 0, L)
    Lr = L.astype(np.uint8).reshape(nb, 2, 4, 32)  # [half][quarter][l]
    ql = np.concatenate([(Lr[:, :, 0] & 0xF) | ((Lr[:, :, 2] & 0xF) << 4),
                         (Lr[:, :, 1] & 0xF) | ((Lr[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((Lr[:, :, 0] >> 4) | ((Lr[:, :, 1] >> 4) << 2) | ((Lr[:, :, 2] >> 4) << 4)
          | ((Lr[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), _half_bytes(d)], axis=1)


def quantize_q3_k(x):
    nb = x.shape[0]
    scales, L = _make_q3(x.reshape(nb * 16, 16), 4)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 256)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, idx[:, None], axis=1)[:, 0]
    has = max_scale != 0
    iscale = (F32(-32) / np.where(has, max_scale, F32(1))).astype(F32)
    l6 = (np.clip(_rint(iscale[:, None] * scales), -32, 31) + 32).astype(np.uint8)
    l6 = np.where(has[:, None], l6, 0).astype(np.uint8)
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, 0:8] = (l6[:, 0:8] & 0xF) | ((l6[:, 8:16] & 0xF) << 4)
    hi = l6 >> 4
    for j in range(16):
        packed[:, 8 + j % 4] |= hi[:, j] << (2 * (j // 4))
    d = np.where(has, F32(1) / iscale, F32(0)).astype(np.float16)
    sc = np.where(has[:, None], l6.astype(np.int32) - 32, 0)
    dd = d.astype(F32)[:, None] * sc.astype(F32)
    ok = dd != 0
    xs = x.reshape(nb, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        Ln = np.clip(_rint(xs / np.where(ok, dd, F32(1))[:, :, None]), -4, 3) + 4
    L = np.where(ok[:, :, None], Ln, L.reshape(nb, 16, 16)).reshape(nb, 256)
    high = (L > 3).reshape(nb, 8, 32)  # bit s of hmask[m]: code 32 s + m
    hmask = np.zeros((nb, 32), np.uint8)
    for s in range(8):
        hmask |= high[:, s].astype(np.uint8) << s
    L = np.where(L > 3, L - 4, L)
    return np.concatenate([hmask, _pack_2bit(L), packed, _half_bytes(d)], axis=1)


def quantize_q2_k(x):
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales, mins, L = _make_qkx2(sub, np.abs(sub), 3, -0.5, 0.1, 15, True)
    scales, mins, L = scales.reshape(nb, 16), mins.reshape(nb, 16), L.reshape(nb, 256)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    q4 = F32(15)
    iscale = (q4 / np.where(max_scale > 0, max_scale, F32(1))).astype(F32)
    lsc = np.where(max_scale[:, None] > 0, _rint(iscale[:, None] * scales), 0)
    imin = (q4 / np.where(max_min > 0, max_min, F32(1))).astype(F32)
    lmn = np.where(max_min[:, None] > 0, _rint(imin[:, None] * mins), 0)
    packed = _le_u8(lsc) | _le_u8(_le_u8(lmn).astype(np.int64) << 4)
    d = np.where(max_scale > 0, max_scale / q4, F32(0)).astype(np.float16)
    dmin = np.where(max_min > 0, max_min / q4, F32(0)).astype(np.float16)
    dd = d.astype(F32)[:, None] * (packed & 0xF).astype(F32)
    dm = dmin.astype(F32)[:, None] * (packed >> 4).astype(F32)
    ok = dd != 0
    xs = x.reshape(nb, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        Ln = np.clip(_rint((xs + dm[:, :, None]) / np.where(ok, dd, F32(1))[:, :, None]), 0, 3)
    L = np.where(ok[:, :, None], Ln, L.reshape(nb, 16, 16)).reshape(nb, 256)
    return np.concatenate([packed, _pack_2bit(L), _half_bytes(d), _half_bytes(dmin)], axis=1)


QUANTIZERS = {"Q2_K": quantize_q2_k, "Q3_K": quantize_q3_k, "Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k,
              "Q6_K": quantize_q6_k}


def quantize(a: np.ndarray, name: str) -> np.ndarray:
    """a (..., k) float32 with k a multiple of 256 -> uint8 (..., k / 256 * block bytes)."""
    a = np.ascontiguousarray(a, dtype=F32)
    if a.shape[-1] % QK_K:
        raise ValueError(f"{name} needs rows of a multiple of {QK_K} values, not {a.shape[-1]}")
    blocks = QUANTIZERS[name](a.reshape(-1, QK_K))
    return blocks.reshape(*a.shape[:-1], -1)
