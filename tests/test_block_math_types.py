"""The GPU kernels' arithmetic (block_math.h) for Q5_0, Q5_1, IQ4_NL and the K-quants, run on the
CPU against the CPU kernels, bit for bit (test_block_math.py does the same for Q8_0/Q4_0/Q4_1).

References we did not write for this: every available CPU instruction set's kernels (their scalar
reference follows the gguf package's layouts and numpy formulas; test_quant_types.py checks that),
quant.cpp's dequantize_row and the CPU FFN executor. Weights are random blocks with finite fp16
scales (helpers_quant.random_blocks) so every code and packed-scale bit is exercised.
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from helpers_quant import random_blocks
from prosparse_rt import _core
from test_block_math import ACTS, acts, assert_same_bits

T = _core._testing
C = _core._testing_cuda
ISAS = T.isas()

# llama.cpp's Q4_K_M files are mostly Q4_K, Q6_K and Q5_0 (the fallback for rows that are not whole
# 256-blocks); the rest in the order of the other mixes
NEW_TYPES = ["Q4_K", "Q6_K", "Q5_0", "Q5_1", "IQ4_NL", "Q5_K", "Q3_K", "Q2_K"]
K_QUANTS = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


def block(name):
    return 256 if name in K_QUANTS else 32


def weights(name, nr, k, seed):
    return random_blocks(QT[name], nr, k, np.random.default_rng(seed)).tobytes()


@pytest.mark.parametrize("name", NEW_TYPES)
def test_reference_dequantization_equals_quant_cpp(name):
    k = 3 * block(name) + (96 if name not in K_QUANTS else 0)
    data = weights(name, 1, k, seed=2)
    assert_same_bits(C.bm_dequant(int(QT[name]), data, k, True), T.dequantize(int(QT[name]), data, k))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", NEW_TYPES)
def test_kernel_dequantization_equals_the_cpu_kernels(isa, name):
    # one row with coefficient 1 through the CPU's axpy: fma(w, 1, 0) is the weight as the kernels
    # dequantize it, but for the sign of a zero (compare w + 0)
    k = 3 * block(name)
    data = weights(name, 1, k, seed=3)
    want = T.axpy_rows(isa, int(QT[name]), data, 1, k, None, np.ones((1, 1), np.float32), np.zeros((1, k), np.float32))
    assert_same_bits(C.bm_dequant(int(QT[name]), data, k, False) + np.float32(0), want[0])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", NEW_TYPES)
@pytest.mark.parametrize("nt", [1, 3])
def test_activation_conversion_equals_every_isa(isa, name, nt):
    k = 3 * block(name)
    x = acts(nt, k, seed=5)
    x[-1, -256:] = 0.0  # an all-zero 256-block (the Q8_K quantizer's special case)
    x[-1, 5] = -(np.abs(x[-1, :block(name)]).max() + 1)  # the largest magnitude negative: its sign is kept
    want = b"".join(T.quantize_act(isa, int(QT[name]), np.ascontiguousarray(row)) for row in x)
    assert C.bm_quantize_act(int(QT[name]), x) == want


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", NEW_TYPES)
@pytest.mark.parametrize("nr,nblocks", [(1, 1), (7, 11), (5, 33)])
@pytest.mark.parametrize("nt", [1, 3])
def test_quantized_row_products_are_the_cpu_bits(isa, name, nr, nblocks, nt):
    # 33 blocks: a chain that crosses the kernel's 32-block chunks with a partial last chunk
    k = nblocks * block(name)
    W = weights(name, nr, k, seed=nr + k)
    x = acts(nt, k, seed=6)
    assert_same_bits(C.bm_gemm(int(QT[name]), W, nr, x), T.gemm(isa, int(QT[name]), W, nr, k, x))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", NEW_TYPES)
@pytest.mark.parametrize("pattern", ["all", "some"])
@pytest.mark.parametrize("nt", [1, 3])
def test_down_projection_is_the_cpu_bits(isa, name, pattern, nt):
    nr, k = 200, 2 * block(name) if name in K_QUANTS else 352
    W = weights(name, nr, k, seed=9)
    rng = np.random.default_rng(10)
    active = {"all": np.ones(nr, bool), "some": rng.random(nr) < 0.3}[pattern]
    coef = rng.standard_normal((nt, nr)).astype(np.float32)
    y0 = rng.standard_normal((nt, k)).astype(np.float32)
    rows = np.flatnonzero(active).astype(np.int32)
    got = C.bm_axpy(int(QT[name]), W, nr, k, list(active.astype(np.uint8)), coef, y0)
    want = T.axpy_rows(isa, int(QT[name]), W, nr, k, list(rows), np.ascontiguousarray(coef[:, rows]), y0)
    assert_same_bits(got, want)


# ---- the hybrid FFN ---------------------------------------------------------------------------------

N_EMBD = 256  # one K-quant super-block, eight 32-blocks


def ffn_case(types, n_ff, nt, seed):
    gate_t, up_t, down_t = types
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((nt, N_EMBD)).astype(np.float32)
    logit = rng.standard_normal((nt, n_ff)).astype(np.float32)
    return dict(gate_type=int(QT[gate_t]), gate=weights(gate_t, n_ff, N_EMBD, seed + 1), up_type=int(QT[up_t]),
                up=weights(up_t, n_ff, N_EMBD, seed + 2), down_type=int(QT[down_t]),
                down_t=weights(down_t, n_ff, N_EMBD, seed + 3), n_ff=n_ff, h=h, logit=logit)


FFN_TYPES = [("Q4_K", "Q4_K", "Q6_K"), ("Q5_0", "Q5_0", "Q6_K"), ("Q5_1", "IQ4_NL", "Q5_K"),
             ("Q3_K", "Q2_K", "Q3_K"), ("Q2_K", "Q5_K", "Q2_K"), ("IQ4_NL", "Q6_K", "Q5_1")]


@pytest.mark.parametrize("strategy", ["dense", "exact", "predict"])
@pytest.mark.parametrize("act,act_t", [a for a in ACTS if a[0] != "silu"] + [("silu", 0.05)])
@pytest.mark.parametrize("types", FFN_TYPES)
@pytest.mark.parametrize("n_ff,n_hot,nt", [(200, 64, 1), (200, 192, 3), (77, 77, 2)])
def test_hybrid_ffn_equals_the_cpu_executor_bitwise(strategy, act, act_t, types, n_ff, n_hot, nt):
    c = ffn_case(types, n_ff, nt, seed=n_ff + nt)
    common = dict(strategy=strategy, act=act, act_t=act_t, gate_type=c["gate_type"], gate=c["gate"],
                  up_type=c["up_type"], up=c["up"], down_type=c["down_type"], down_t=c["down_t"], n_ff=n_ff,
                  h=c["h"], logit=c["logit"] if strategy == "predict" else None, pred_thr=0.3)
    whole = C.cpu_ffn(**common, begin=0, end=n_ff, n_threads=2)
    hot = C.cpu_ffn(**common, begin=0, end=n_hot, n_threads=1)
    assert_same_bits(C.bm_ffn(**common, n_hot=n_hot, cold=False), hot)
    assert_same_bits(C.bm_ffn(**common, n_hot=n_hot, cold=True), whole)
