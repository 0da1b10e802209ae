"""The converter's IQ4_NL quantizer (prosparse_convert/iq4nl.py, llama.cpp's search over scales on
the non-linear grid). References we did not write: the gguf package's IQ4_NL dequantizer and
layout, its Q4_0 quantizer (llama.cpp's reference) for the error level, and a brute-force search
over scales. bench/bench_quant.py compares the errors with llama.cpp's own quantizer."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES, quants

from prosparse_convert import iq4nl, quant
from prosparse_rt._core import _testing as core

KV = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float64)


def _inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    x[1] *= 1e-3
    x[2, :32] = 0.0  # an all-zero block
    x[3, :32] = -0.0
    x[4] = rng.standard_t(2, 256).astype(np.float32)  # heavy tails
    x[5, :32] = 1.0  # a constant block
    x[6, :32] = np.float32(-3.5)
    x[7, 5] = 40.0  # one outlier
    return x


def _rel_rmse(deq, x):
    x = x.astype(np.float64)
    return np.sqrt(np.mean((deq.astype(np.float64) - x) ** 2)) / np.sqrt(np.mean(x ** 2))


def test_gguf_reads_back_what_we_write_and_equals_our_dequantizer():
    x = _inputs()
    q = iq4nl.quantize(x)
    assert q.dtype == np.uint8 and q.shape == (64, 256 // 32 * GGML_QUANT_SIZES[T.IQ4_NL][1])
    deq = quants.dequantize(q, T.IQ4_NL)
    assert deq.shape == x.shape
    # the runtime's dequantization of the same bytes: bit for bit
    ours = core.dequantize(int(T.IQ4_NL), q.tobytes(), x.size)
    np.testing.assert_array_equal(np.asarray(ours, np.float32).reshape(x.shape), deq.astype(np.float32))
    # the layout by hand: fp16 d, element j in the low nibble of byte j, 16 + j in the high one
    blk = q.reshape(-1, 18)
    d = blk[:, :2].copy().view(np.float16).astype(np.float64)
    codes = np.concatenate([blk[:, 2:] & 0xF, blk[:, 2:] >> 4], axis=1)
    np.testing.assert_array_equal((d * KV[codes]).reshape(x.shape).astype(np.float32), deq.astype(np.float32))
    # zero blocks: d = 0 (code 8, the grid value nearest 0), exact zeros back
    assert np.all(deq[2, :32] == 0) and np.all(deq[3, :32] == 0)
    assert bytes(q[2, :18]) == b"\x00\x00" + bytes([0x88] * 16)


def test_error_is_below_q4_0_and_below_every_scale_the_search_tries():
    x = _inputs()
    deq = quants.dequantize(iq4nl.quantize(x), T.IQ4_NL)
    q4 = quants.dequantize(quants.quantize(x, T.Q4_0), T.Q4_0)
    gauss = slice(8, 64)
    e_iq, e_q4 = _rel_rmse(deq[gauss], x[gauss]), _rel_rmse(q4[gauss], x[gauss])
    # the non-linear grid with the scale search beats Q4_0 (same bits per weight) on Gaussian rows
    assert e_iq < 0.93 * e_q4, (e_iq, e_q4)  # 0.89 here
    # per block, the weighted error (weights x^2, the quantizer's objective) is no worse than that
    # of each scale the search tries, with nearest codes: the first guess max / 127 and the 15
    # scales max / (t - 127), t = -7..7 (a least-squares refit and nearest codes can only lower
    # it); ours pays only for its fp16-rounded scale. (The search is llama.cpp's: a brute-force
    # search over all scales finds lower errors on some blocks.)
    xb = x.reshape(-1, 32).astype(np.float64)
    w = xb * xb
    got = ((deq.reshape(-1, 32) - xb) ** 2 * w).sum(axis=1)
    mx = xb[np.arange(len(xb)), np.abs(xb).argmax(axis=1)]
    nz = np.abs(mx) > 0

    def err_at(d):
        codes = np.abs((xb / d[:, None])[:, :, None] - KV[None, None, :]).argmin(axis=2)
        return ((d[:, None] * KV[codes] - xb) ** 2 * w).sum(axis=1)

    safe = np.where(nz, mx, 1.0)
    cands = [err_at(safe / 127)] + [err_at(safe / (t - 127)) for t in range(-7, 8)]
    best = np.min(cands, axis=0)
    energy = (w * xb * xb).sum(axis=1)
    assert np.all(got[nz] <= best[nz] * 1.01 + 1e-3 * energy[nz])
    assert np.median(got[nz] / np.maximum(best[nz], 1e-30)) < 1.0  # the refit usually gains


def test_rows_that_are_not_whole_blocks_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        iq4nl.quantize(np.ones((2, 48), np.float32))


def test_iq4_nl_file_type_follows_llama_cpp_mix():
    def mt(name, shape, n_layer=32, n_gqa=4, tied=False):
        return quant.mixed_type("iq4_nl", name, shape, n_layer, n_gqa, tied)

    assert mt("blk.9.attn_q.weight", (4096, 4096)) == T.IQ4_NL
    assert mt("blk.9.ffn_up.weight", (11008, 4096)) == T.IQ4_NL
    assert mt("blk.9.attn_v.weight", (1024, 4096)) == T.Q5_K  # n_gqa >= 4
    assert mt("blk.9.attn_v.weight", (1024, 4096), n_gqa=2) == T.IQ4_NL
    assert mt("blk.3.ffn_down.weight", (4096, 11008)) == T.Q5_K  # the first eighth of the layers
    assert mt("blk.4.ffn_down.weight", (4096, 11008)) == T.IQ4_NL
    assert mt("blk.0.ffn_down.weight", (576, 1568)) == T.Q5_1  # rows not whole super-blocks: Q5_K's fallback
    assert mt("output.weight", (32000, 4096)) == T.Q6_K
    assert mt("output.weight", (49152, 576)) == T.Q8_0  # 576: Q6_K's fallback
    assert mt("token_embd.weight", (32000, 4096)) == T.IQ4_NL
    assert mt("blk.0.attn_norm.weight", (4096,)) == T.F32
    assert mt("blk.0.attn_q.weight", (48, 40)) == T.F16  # rows not whole blocks
    assert quant.FILE_TYPES["iq4_nl"] == 25  # llama.cpp's LLAMA_FTYPE_MOSTLY_IQ4_NL
