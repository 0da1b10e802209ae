"""Every CUDA kernel (cpp/src/cuda/kernels.h) on a GPU against the CPU. Skipped without a usable GPU.

References: the CPU kernels of the active instruction set (bit for bit where kernels.h promises the
CPU's bits: quantized products, the down projection, the hybrid FFN, RoPE, the embedding, the KV
cache's rounding), quant.cpp's conversions, numpy in float64 for the norms and attention (within
float rounding). Odd shapes throughout: rows not a multiple of a warp's rows, chains that cross the
kernels' 32-block chunks, token counts that cross their 8-token passes, neuron counts that end in a
partial group, no active neuron and every neuron active.
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

import prosparse_rt
from prosparse_rt import _core

from test_block_math import (ACTS, FLOAT_TYPES, QUANT_TYPES, TYPES, acts, assert_same_bits, ffn_case,
                             weights)

pytestmark = pytest.mark.skipif(not prosparse_rt.cuda_devices() or not hasattr(_core._testing_cuda, "gpu_gemm"),
                                reason="no usable CUDA GPU (or a build without CUDA)")

T = _core._testing
C = _core._testing_cuda
ISA = T.active_isa()


# ---- activations and products ----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("nt", [1, 3, 9])
def test_quantize_act_is_the_cpu_bits(name, nt):
    k = 1056  # the CPU hook takes whole blocks; float rows with a tail go through the products below
    x = acts(nt, k, seed=1)
    want = b"".join(T.quantize_act(ISA, int(TYPES[name]), np.ascontiguousarray(row)) for row in x)
    assert C.gpu_quantize_act(int(TYPES[name]), x) == want


@pytest.mark.parametrize("name", list(QUANT_TYPES))
@pytest.mark.parametrize("nr,k", [(1, 32), (7, 352), (13, 1056), (333, 4128)])
@pytest.mark.parametrize("nt", [1, 2, 3, 9, 17])
def test_quantized_gemm_is_the_cpu_bits(name, nr, k, nt):
    W = weights(name, nr, k, seed=nr + k)
    x = acts(nt, k, seed=2)
    assert_same_bits(C.gpu_gemm(int(QT[name]), W, nr, x), T.gemm(ISA, int(QT[name]), W, nr, k, x))


# (a build without CUDA has no gpu_* hooks: this module is skipped there, but still imported)
needs_mma = pytest.mark.skipif(not getattr(C, "gpu_gemm_tiled_available", lambda t: False)(int(QT.Q8_0)),
                               reason="int8 tensor cores need sm_80+")


@needs_mma
@pytest.mark.parametrize("name", list(QUANT_TYPES))
@pytest.mark.parametrize("nr,k", [(70, 352), (333, 1056), (129, 4128)])
@pytest.mark.parametrize("nt", [16, 17, 31, 33, 70])
def test_tiled_gemm_is_the_row_paths_bits(name, nr, k, nt):
    # rows not a multiple of the 64-row block or 16-row fragment, tokens crossing 32-token blocks
    W = weights(name, nr, k, seed=nr + k + 2)
    x = acts(nt, k, seed=3)
    rows = C.gpu_gemm(int(QT[name]), W, nr, x, "rows")
    assert_same_bits(C.gpu_gemm(int(QT[name]), W, nr, x, "tiled"), rows)
    assert_same_bits(C.gpu_gemm(int(QT[name]), W, nr, x, "auto"), rows)
    assert_same_bits(rows, T.gemm(ISA, int(QT[name]), W, nr, k, x))
    for c in (0, nt - 1):  # a token alone (row path) = that token in a prompt (tiled path)
        assert_same_bits(C.gpu_gemm(int(QT[name]), W, nr, x[c:c + 1])[0], rows[c])


def test_tiled_gemm_refuses_types_without_a_tiled_kernel():
    assert not C.gpu_gemm_tiled_available(int(QT.F16))
    with pytest.raises(ValueError, match="no tiled kernel"):
        C.gpu_gemm(int(QT.F16), weights("F16", 2, 32, seed=1), 2, acts(16, 32, seed=1), "tiled")


@pytest.mark.parametrize("name", list(FLOAT_TYPES))
@pytest.mark.parametrize("nr,k", [(5, 33), (13, 357), (70, 2048)])
@pytest.mark.parametrize("nt", [1, 3, 9])
def test_float_gemm_follows_its_lane_order_and_agrees_with_the_cpu(name, nr, k, nt):
    W = weights(name, nr, k, seed=3)
    x = acts(nt, k, seed=4)
    got = C.gpu_gemm(int(QT[name]), W, nr, x)
    assert_same_bits(got, C.bm_gemm(int(QT[name]), W, nr, x))  # block_math.h's documented order
    want = T.gemm(ISA, int(QT[name]), W, nr, k, x).astype(np.float64)
    wd = T.dequantize(int(QT[name]), W, nr * k).reshape(nr, k).astype(np.float64)
    mag = np.abs(x).astype(np.float64) @ np.abs(wd).T
    assert np.all(np.abs(got - want) <= 2 * (k + 16) * 2.0**-24 * mag)


@pytest.mark.parametrize("name", list(TYPES))
def test_a_tokens_product_does_not_depend_on_the_batch(name):
    nr, k, nt = 37, 357 if name in FLOAT_TYPES else 352, 11
    W = weights(name, nr, k, seed=5)
    x = acts(nt, k, seed=6)
    batch = C.gpu_gemm(int(QT[name]), W, nr, x)
    for c in (0, 7, 8, 10):
        assert_same_bits(batch[c], C.gpu_gemm(int(QT[name]), W, nr, x[c:c + 1])[0])


@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("pattern", ["none", "all", "some"])
@pytest.mark.parametrize("nr,nt", [(200, 1), (200, 3), (77, 9), (640, 2)])
def test_down_projection_is_the_cpu_bits(name, pattern, nr, nt):
    k = 357 if name in FLOAT_TYPES else 2080  # 2080: columns past the first block of 512 threads' columns
    W = weights(name, nr, k, seed=7)
    rng = np.random.default_rng(8)
    active = {"none": np.zeros(nr, bool), "all": np.ones(nr, bool), "some": rng.random(nr) < 0.3}[pattern]
    coef = rng.standard_normal((nt, nr)).astype(np.float32)
    y0 = rng.standard_normal((nt, k)).astype(np.float32)
    rows = np.flatnonzero(active).astype(np.int32)
    got = C.gpu_axpy(int(QT[name]), W, nr, k, list(active.astype(np.uint8)), coef, y0)
    want = T.axpy_rows(ISA, int(QT[name]), W, nr, k, list(rows), np.ascontiguousarray(coef[:, rows]), y0)
    assert_same_bits(got, want)


# ---- the sparse FFN -------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["dense", "exact", "predict"])
@pytest.mark.parametrize("act,act_t", ACTS)
@pytest.mark.parametrize("types", [("Q4_0",) * 3, ("Q8_0",) * 3, ("Q4_1",) * 3, ("Q4_0", "Q8_0", "Q4_1"),
                                   ("Q8_0", "Q4_1", "F16")])
@pytest.mark.parametrize("n_ff,n_hot", [(200, 64), (200, 192), (200, 200), (77, 77)])
@pytest.mark.parametrize("nt", [1, 3, 9])
def test_hybrid_ffn_on_the_gpu_equals_the_cpu_bitwise(strategy, act, act_t, types, n_ff, n_hot, nt):
    c = ffn_case(types, n_ff, nt, seed=n_ff + nt, act=act)
    common = dict(strategy=strategy, act=act, act_t=act_t, gate_type=c["gate_type"], gate=c["gate"],
                  up_type=c["up_type"], up=c["up"], down_type=c["down_type"], down_t=c["down_t"], n_ff=n_ff,
                  h=c["h"], logit=c["logit"] if strategy == "predict" else None, pred_thr=0.3)
    if act == "silu":
        # CUDA's expf is within 2 ulp of glibc's: SiLU coefficients may differ in the last bits
        whole = C.cpu_ffn(**common, begin=0, end=n_ff, n_threads=1)
        got = C.gpu_ffn(**common, n_hot=n_hot, cold=True)
        assert np.allclose(got, whole, rtol=1e-5, atol=1e-6 * np.abs(whole).max())
        return
    assert_same_bits(C.gpu_ffn(**common, n_hot=n_hot, cold=False), C.cpu_ffn(**common, begin=0, end=n_hot, n_threads=1))
    assert_same_bits(C.gpu_ffn(**common, n_hot=n_hot, cold=True), C.cpu_ffn(**common, begin=0, end=n_ff, n_threads=2))


@pytest.mark.parametrize("strategy", ["dense", "exact", "predict"])
@pytest.mark.parametrize("types", [("Q4_0",) * 3, ("F32",) * 3, ("Q8_0", "Q4_1", "Q4_0")])
def test_coefficients_active_rows_and_counts_match_the_host_arithmetic(strategy, types):
    n_ff, nt = 200, 10
    c = ffn_case(types, n_ff, nt, seed=9, act="fatrelu")
    logit = c["logit"] if strategy == "predict" else None
    args = (strategy, "fatrelu", 0.2, c["gate_type"], c["gate"], c["up_type"], c["up"], n_ff, c["h"], logit, 0.3, n_ff)
    coef, active, counts = C.gpu_ffn_coef(*args)
    want_coef, want_active = C.bm_ffn_coef(*args)
    assert_same_bits(coef, want_coef)
    assert active == want_active
    act = np.frombuffer(active, np.uint8).astype(bool)
    assert counts[1] == act.sum()
    assert counts[0] >= np.count_nonzero(coef)  # a non-zero activation times an up of 0 is a zero coefficient
    if strategy == "predict":
        assert counts[2] == np.count_nonzero(c["logit"] > np.float32(0.3))
        assert counts[3] == np.count_nonzero(np.any(c["logit"] > np.float32(0.3), axis=0))
    else:
        assert counts[3] == n_ff


def test_mixed_gate_and_up_types_run_as_two_launches_with_the_same_bits():
    n_ff, nt = 130, 3
    c = ffn_case(("Q4_1", "Q8_0", "Q4_0"), n_ff, nt, seed=10, act="relu")
    args = ("exact", "relu", 0.0, c["gate_type"], c["gate"], c["up_type"], c["up"], n_ff, c["h"], None, 0.0, 128)
    coef, active, _ = C.gpu_ffn_coef(*args)
    want_coef, want_active = C.bm_ffn_coef(*args)
    assert_same_bits(coef, want_coef)
    assert active == want_active


# ---- the rest of a layer ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 96, 4096 + 7])
def test_rms_norm_within_rounding(n):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, n)).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + 1e-5) * w
    got = C.gpu_rms_norm(x, w, 1e-5)
    assert np.allclose(got, want, rtol=1e-6, atol=0)


def test_rope_is_the_cpu_bits():
    n_heads, hd, n_rot, nt = 5, 128, 96, 3
    x = np.random.default_rng(12).standard_normal((nt, n_heads * hd + 3)).astype(np.float32)
    cs = C.cpu_rope_table(n_rot, [0, 513, 8191], 500000.0, 0.25)
    assert_same_bits(C.gpu_rope(x, n_heads, hd, n_rot, cs), C.cpu_rope(x, n_heads, hd, n_rot, cs))


def test_elementwise_ops():
    rng = np.random.default_rng(13)
    y = rng.standard_normal(1000).astype(np.float32)
    x = rng.standard_normal(1000).astype(np.float32)
    assert_same_bits(C.gpu_elementwise("add_scaled", y, 1.0, x), y + x)
    a = np.float64(np.float32(0.37))  # the kernel's a is the float nearest 0.37
    fused = (a * x.astype(np.float64) + y).astype(np.float32)  # one rounding (fma), but for double rounding
    assert np.all(np.abs(C.gpu_elementwise("add_scaled", y, 0.37, x) - fused) <= np.spacing(np.abs(fused)))
    assert_same_bits(C.gpu_elementwise("scale", y, 0.37, None), y * np.float32(0.37))
    z = y.copy()
    z[:3] = [np.nan, -0.0, np.inf]
    assert_same_bits(C.gpu_elementwise("relu", z, 0.0, None), np.where(z > 0, z, np.float32(0)))


@pytest.mark.parametrize("name", list(TYPES))
def test_embedding_rows_are_quant_cpps_dequantization(name):
    n_vocab, n_embd = 50, 96
    table = weights(name, n_vocab, n_embd, seed=14)
    tokens = [3, 0, 49, 3, 17]
    full = T.dequantize(int(TYPES[name]), table, n_vocab * n_embd).reshape(n_vocab, n_embd)
    assert_same_bits(C.gpu_embed(int(TYPES[name]), table, n_vocab, n_embd, tokens, 1.0), full[tokens])
    assert_same_bits(C.gpu_embed(int(TYPES[name]), table, n_vocab, n_embd, tokens, 12.0), full[tokens] * np.float32(12))
    bad = C.gpu_embed(int(TYPES[name]), table, n_vocab, n_embd, [1, 50, -1], 1.0)
    assert_same_bits(bad[0], full[1])
    assert np.all(np.isnan(bad[1:]))  # the host refuses such ids; the kernel never reads past the table


KV_TYPES = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0}


def cache_bytes(kv, n_seq, nkv, n_ctx, hd):
    row = {"f32": 4 * hd, "f16": 2 * hd, "q8_0": 34 * hd // 32}[kv]
    return row, n_seq * nkv * n_ctx * row


@pytest.mark.parametrize("kv", list(KV_TYPES))
def test_kv_store_rounds_as_the_cpu_cache(kv):
    n_seq, nkv, n_ctx, hd = 2, 3, 20, 64
    row, nbytes = cache_bytes(kv, n_seq, nkv, n_ctx, hd)
    rng = np.random.default_rng(15)
    k = rng.standard_normal((4, nkv * hd + 8)).astype(np.float32)
    v = rng.standard_normal((4, nkv * hd + 8)).astype(np.float32)
    seq, pos = [0, 1, 1, 5], [3, 0, 19, 2]  # the last slot is out of range: skipped
    init = bytes(rng.integers(0, 256, nbytes, dtype=np.uint8))
    kc, vc = C.gpu_kv_store(kv, nkv, hd, n_ctx, n_seq, k, v, seq, pos, init, init)
    want_k, want_v = bytearray(init), bytearray(init)
    for t in range(3):
        for h in range(nkv):
            off = ((seq[t] * nkv + h) * n_ctx + pos[t]) * row
            for src, dst in ((k, want_k), (v, want_v)):
                vals = np.ascontiguousarray(src[t, h * hd:(h + 1) * hd])
                dst[off:off + row] = vals.tobytes() if kv == "f32" else T.quantize(int(KV_TYPES[kv]), vals)
    assert kc == bytes(want_k) and vc == bytes(want_v)


@pytest.mark.parametrize("kv", list(KV_TYPES))
@pytest.mark.parametrize("n_head,n_head_kv,hd", [(8, 2, 64), (4, 4, 128), (12, 1, 256), (6, 3, 32)])
def test_attention_matches_softmax_over_the_cache(kv, n_head, n_head_kv, hd):
    n_seq, n_ctx = 2, 300  # positions up to 299: three of the 128-position tiles, a partial last one
    row, nbytes = cache_bytes(kv, n_seq, n_head_kv, n_ctx, hd)
    rng = np.random.default_rng(16)
    kvals = rng.standard_normal((n_seq, n_head_kv, n_ctx, hd)).astype(np.float32)
    vvals = rng.standard_normal((n_seq, n_head_kv, n_ctx, hd)).astype(np.float32)

    def encode(vals):
        flat = vals.reshape(-1, hd)
        if kv == "f32":
            return flat.tobytes()
        return b"".join(T.quantize(int(KV_TYPES[kv]), np.ascontiguousarray(r)) for r in flat)

    kc, vc = encode(kvals), encode(vvals)
    kd = T.dequantize(int(KV_TYPES[kv]), kc, kvals.size).reshape(kvals.shape).astype(np.float64)
    vd = T.dequantize(int(KV_TYPES[kv]), vc, vvals.size).reshape(vvals.shape).astype(np.float64)
    seq, pos = [0, 1, 1, 0, 1, 0], [0, 31, 299, 127, 128, 255]  # tile edges on both sides
    q = rng.standard_normal((len(seq), n_head * hd)).astype(np.float32)
    scale = np.float32(1.0 / np.sqrt(np.float32(hd)))
    got = C.gpu_attention(kv, n_head, n_head_kv, hd, n_ctx, n_seq, q, seq, pos, kc, vc, float(scale))
    for t in range(len(seq)):  # a token's bits do not depend on the batch (decode = prompt)
        alone = C.gpu_attention(kv, n_head, n_head_kv, hd, n_ctx, n_seq, q[t:t + 1], seq[t:t + 1], pos[t:t + 1], kc, vc,
                                float(scale))
        assert_same_bits(got[t:t + 1], alone)
    g = n_head // n_head_kv
    for t in range(len(seq)):
        for h in range(n_head):
            K = kd[seq[t], h // g, :pos[t] + 1]
            V = vd[seq[t], h // g, :pos[t] + 1]
            s = K @ q[t, h * hd:(h + 1) * hd].astype(np.float64) * float(scale)
            e = np.exp(s - s.max())
            want = e @ V / e.sum()
            assert np.allclose(got[t, h * hd:(h + 1) * hd], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# ---- refusals ---------------------------------------------------------------------------------------------

def test_bad_arguments_are_value_errors_naming_the_problem():
    with pytest.raises(ValueError, match="head_dim above 256"):
        C.gpu_attention("f32", 2, 1, 512, 4, 1, np.zeros((1, 1024), np.float32), [0], [0], bytes(8192), bytes(8192), 1.0)
    with pytest.raises(ValueError, match="n_rot"):
        C.gpu_rope(np.zeros((1, 64), np.float32), 1, 64, 3, np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="multiple of n_head_kv"):
        C.gpu_attention("f32", 3, 2, 32, 4, 1, np.zeros((1, 96), np.float32), [0], [0], bytes(1024), bytes(1024), 1.0)


# ---- Q5_0, Q5_1, IQ4_NL and the K-quants ---------------------------------------------------------------
# The same promises for the types test_block_math_types.py checks as host loops: the CPU's bits for
# the activation conversion, the products, the down projection, the hybrid FFN and the embedding.

from test_block_math_types import FFN_TYPES, K_QUANTS, NEW_TYPES  # noqa: E402
from test_block_math_types import block as new_block  # noqa: E402
from test_block_math_types import ffn_case as new_ffn_case  # noqa: E402
from test_block_math_types import weights as new_weights  # noqa: E402


@pytest.mark.parametrize("name", NEW_TYPES)
@pytest.mark.parametrize("nt", [1, 9])
def test_new_types_quantize_act_is_the_cpu_bits(name, nt):
    k = 5 * new_block(name)
    x = acts(nt, k, seed=21)
    x[-1, -256:] = 0.0
    want = b"".join(T.quantize_act(ISA, int(QT[name]), np.ascontiguousarray(row)) for row in x)
    assert C.gpu_quantize_act(int(QT[name]), x) == want


@pytest.mark.parametrize("name", NEW_TYPES)
@pytest.mark.parametrize("nr,nblocks", [(1, 1), (13, 11), (333, 33)])
@pytest.mark.parametrize("nt", [1, 3, 9, 17])
def test_new_types_gemm_is_the_cpu_bits(name, nr, nblocks, nt):
    k = nblocks * new_block(name)
    W = new_weights(name, nr, k, seed=nr + k)
    x = acts(nt, k, seed=22)
    got = C.gpu_gemm(int(QT[name]), W, nr, x)
    assert_same_bits(got, T.gemm(ISA, int(QT[name]), W, nr, k, x))
    assert_same_bits(got[-1], C.gpu_gemm(int(QT[name]), W, nr, x[-1:])[0])  # independent of the batch


@pytest.mark.parametrize("name", NEW_TYPES)
@pytest.mark.parametrize("pattern", ["none", "all", "some"])
@pytest.mark.parametrize("nr,nt", [(200, 1), (77, 9), (640, 2)])
def test_new_types_down_projection_is_the_cpu_bits(name, pattern, nr, nt):
    k = 2304 if name in K_QUANTS else 2080  # columns past the first block of 512 threads' columns
    W = new_weights(name, nr, k, seed=23)
    rng = np.random.default_rng(24)
    active = {"none": np.zeros(nr, bool), "all": np.ones(nr, bool), "some": rng.random(nr) < 0.3}[pattern]
    coef = rng.standard_normal((nt, nr)).astype(np.float32)
    y0 = rng.standard_normal((nt, k)).astype(np.float32)
    rows = np.flatnonzero(active).astype(np.int32)
    got = C.gpu_axpy(int(QT[name]), W, nr, k, list(active.astype(np.uint8)), coef, y0)
    want = T.axpy_rows(ISA, int(QT[name]), W, nr, k, list(rows), np.ascontiguousarray(coef[:, rows]), y0)
    assert_same_bits(got, want)


@pytest.mark.parametrize("strategy", ["dense", "exact", "predict"])
@pytest.mark.parametrize("types", FFN_TYPES)
@pytest.mark.parametrize("n_ff,n_hot,nt", [(200, 64, 1), (200, 192, 9), (77, 77, 3)])
def test_new_types_hybrid_ffn_on_the_gpu_equals_the_cpu_bitwise(strategy, types, n_ff, n_hot, nt):
    c = new_ffn_case(types, n_ff, nt, seed=n_ff + nt)
    common = dict(strategy=strategy, act="fatrelu", act_t=0.2, gate_type=c["gate_type"], gate=c["gate"],
                  up_type=c["up_type"], up=c["up"], down_type=c["down_type"], down_t=c["down_t"], n_ff=n_ff,
                  h=c["h"], logit=c["logit"] if strategy == "predict" else None, pred_thr=0.3)
    assert_same_bits(C.gpu_ffn(**common, n_hot=n_hot, cold=False), C.cpu_ffn(**common, begin=0, end=n_hot, n_threads=1))
    assert_same_bits(C.gpu_ffn(**common, n_hot=n_hot, cold=True), C.cpu_ffn(**common, begin=0, end=n_ff, n_threads=2))


@pytest.mark.parametrize("name", NEW_TYPES)
def test_new_types_embedding_rows_are_quant_cpps_dequantization(name):
    n_vocab, n_embd = 50, 2 * new_block(name)
    table = new_weights(name, n_vocab, n_embd, seed=25)
    tokens = [3, 0, 49, 3, 17]
    full = T.dequantize(int(QT[name]), table, n_vocab * n_embd).reshape(n_vocab, n_embd)
    assert_same_bits(C.gpu_embed(int(QT[name]), table, n_vocab, n_embd, tokens, 1.0), full[tokens])
    assert_same_bits(C.gpu_embed(int(QT[name]), table, n_vocab, n_embd, tokens, 12.0), full[tokens] * np.float32(12))
