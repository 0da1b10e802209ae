"""The GPU kernels' arithmetic (cpp/src/block_math.h) run on the CPU against the CPU kernels.

The bm_* hooks (python_cuda_hooks.cpp) compute with block_math.h's functions only, in the order the
CUDA kernels use: a quantized row product as per-block integer terms chained in block order, the
down projection as per-group fma chains folded in group order, the coefficients as the fused
kernel's per-row decisions. References we did not write for this: every available CPU instruction
set's kernels (cpu/kernels_*.cpp), quant.cpp's conversions (checked against the gguf package in
test_quant.py) and the CPU FFN executor (ffn.cpp). Quantized products, the down projection for every
weight type and the hybrid FFN must be the same bits; float-weight products follow their own fixed
lane order on the GPU and agree within rounding.
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants

from prosparse_rt import _core

T = _core._testing
C = _core._testing_cuda
ISAS = T.isas()

FLOAT_TYPES = {"F32": QT.F32, "F16": QT.F16, "BF16": QT.BF16}
QUANT_TYPES = {"Q8_0": QT.Q8_0, "Q4_0": QT.Q4_0, "Q4_1": QT.Q4_1}
TYPES = {**FLOAT_TYPES, **QUANT_TYPES}


def weights(name, nr, k, seed, scale=1.0):
    """nr rows of k weights of type `name` as a GGUF stores them (the gguf package's quantizers)."""
    w = (np.random.default_rng(seed).standard_normal((nr, k)) * scale).astype(np.float32)
    qt = TYPES[name]
    if qt == QT.F32:
        return w.tobytes()
    return quants.quantize(w, qt).tobytes()


def acts(nt, k, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((nt, k)).astype(np.float32) * 2
    x[:, ::32] = 127.0  # blocks whose scale is exactly 1: x = j + 0.5 values hit rounding ties
    x[:, 1::32] = 2.5
    x[0, :32] = 0.0     # an all-zero block: d = 0
    return x


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def assert_same_bits(got, want):
    got, want = bits(got), bits(want)
    assert got.shape == want.shape
    diff = np.flatnonzero(got != want)
    assert diff.size == 0, f"{diff.size} of {got.size} values differ, first at {diff[0]}"


# ---- conversions ----------------------------------------------------------------------------------

def test_fp16_rounding_equals_quant_cpp_on_every_kind_of_float():
    rng = np.random.default_rng(1)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 1e-8, 2.0**-24, 2.0**-25,
                        3 * 2.0**-26, 2.0**-14, 6.1e-5, 1 + 2.0**-11, 1 + 3 * 2.0**-11], np.float32)
    x = np.concatenate([special, -special, rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-9, 6, 20000),
                        rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    x = np.ascontiguousarray(x, np.float32)
    assert C.bm_fp16(x) == T.quantize(int(QT.F16), x)


def test_every_half_converts_to_the_same_float_as_quant_cpp():
    h = np.arange(65536, dtype=np.uint16).tobytes()
    assert_same_bits(C.bm_half_to_float(h), T.dequantize(int(QT.F16), h, 65536))


@pytest.mark.parametrize("name", list(TYPES))
def test_reference_dequantization_equals_quant_cpp(name):
    k = 352
    data = weights(name, 1, k, seed=2)
    assert_same_bits(C.bm_dequant(int(TYPES[name]), data, k, True), T.dequantize(int(TYPES[name]), data, k))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(TYPES))
def test_kernel_dequantization_equals_the_cpu_kernels(isa, name):
    # One row with coefficient 1 through the CPU's axpy: fma(w, 1, 0) is the weight as the kernels
    # dequantize it (Q4_1: fma(q, d, m), not quant.cpp's q * d + m), but for the sign of a zero
    # (a negative scale times code 8 is -0, and -0 + 0 = +0): compare w + 0.
    k = 352
    data = weights(name, 1, k, seed=3)
    want = T.axpy_rows(isa, int(TYPES[name]), data, 1, k, None, np.ones((1, 1), np.float32), np.zeros((1, k), np.float32))
    assert_same_bits(C.bm_dequant(int(TYPES[name]), data, k, False) + np.float32(0), want[0])


def test_q8_0_cache_rounding_equals_quant_cpp():
    x = acts(3, 256, seed=4).ravel()
    assert C.bm_q8_0_row(x) == T.quantize(int(QT.Q8_0), x)


# ---- activations and products -----------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("nt", [1, 3])
def test_activation_conversion_equals_every_isa(isa, name, nt):
    k = 352  # the hook takes whole blocks; float rows with a tail go through the products below
    x = acts(nt, k, seed=5)
    want = b"".join(T.quantize_act(isa, int(TYPES[name]), np.ascontiguousarray(row)) for row in x)
    assert C.bm_quantize_act(int(TYPES[name]), x) == want


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(QUANT_TYPES))
@pytest.mark.parametrize("nr,k", [(1, 32), (7, 352), (13, 1056), (9, 4128)])
@pytest.mark.parametrize("nt", [1, 2, 3])
def test_quantized_row_products_are_the_cpu_bits(isa, name, nr, k, nt):
    # k = 1056 and 4128: 33 and 129 blocks, a chain that crosses the kernel's 32-block chunks with
    # a partial last chunk; nr not a multiple of the kernel's 2 rows per warp or the CPU's 4 or 8.
    W = weights(name, nr, k, seed=nr + k)
    x = acts(nt, k, seed=6)
    assert_same_bits(C.bm_gemm(int(QT[name]), W, nr, x), T.gemm(isa, int(QT[name]), W, nr, k, x))


@pytest.mark.parametrize("name", list(QUANT_TYPES))
@pytest.mark.parametrize("nr,k,nt", [(1, 32, 1), (17, 352, 9), (70, 1056, 37), (16, 64, 16)])
def test_tiled_products_are_the_cpu_bits(name, nr, k, nt):
    # the tensor-core kernel's fragments and per-D-value chains (kernels_mma.cu) through an mma
    # emulated from the PTX fragment tables; rows and tokens that end in partial 16 x 8 tiles
    W = weights(name, nr, k, seed=nr + k + 1)
    x = acts(nt, k, seed=7)
    assert_same_bits(C.bm_gemm_tiled(int(QT[name]), W, nr, x), T.gemm(T.active_isa(), int(QT[name]), W, nr, k, x))


def test_tiled_products_refuse_other_types():
    with pytest.raises(ValueError, match="no tiled kernel"):
        C.bm_gemm_tiled(int(QT.F16), weights("F16", 2, 32, seed=1), 2, acts(1, 32, seed=1))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(FLOAT_TYPES))
@pytest.mark.parametrize("k", [33, 357])
def test_float_row_products_agree_with_every_isa_within_rounding(isa, name, k):
    nr, nt = 5, 3
    W = weights(name, nr, k, seed=7)
    x = acts(nt, k, seed=8)
    got = C.bm_gemm(int(QT[name]), W, nr, x).astype(np.float64)
    want = T.gemm(isa, int(QT[name]), W, nr, k, x).astype(np.float64)
    wd = np.frombuffer(W, np.float32).reshape(nr, k) if name == "F32" else None
    if wd is None:
        wd = T.dequantize(int(QT[name]), W, nr * k).reshape(nr, k)
    mag = np.abs(x).astype(np.float64) @ np.abs(wd.astype(np.float64)).T
    assert np.all(np.abs(got - want) <= 2 * (k + 16) * 2.0**-24 * mag)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("pattern", ["none", "all", "some"])
@pytest.mark.parametrize("nt", [1, 3])
def test_down_projection_is_the_cpu_bits(isa, name, pattern, nt):
    # 200 rows: three full neuron groups and a partial one; the output continues what Y0 held
    nr = 200
    k = 357 if name in FLOAT_TYPES else 352
    W = weights(name, nr, k, seed=9)
    rng = np.random.default_rng(10)
    active = {"none": np.zeros(nr, bool), "all": np.ones(nr, bool), "some": rng.random(nr) < 0.3}[pattern]
    coef = rng.standard_normal((nt, nr)).astype(np.float32)
    y0 = rng.standard_normal((nt, k)).astype(np.float32)
    rows = np.flatnonzero(active).astype(np.int32)
    got = C.bm_axpy(int(QT[name]), W, nr, k, list(active.astype(np.uint8)), coef, y0)
    want = T.axpy_rows(isa, int(QT[name]), W, nr, k, list(rows), np.ascontiguousarray(coef[:, rows]), y0)
    assert_same_bits(got, want)


@pytest.mark.parametrize("act", ["relu", "fatrelu", "silu"])
def test_activation_function_is_ffn_activation(act):
    g = np.concatenate([np.random.default_rng(11).standard_normal(4000).astype(np.float32) * 4,
                        np.array([0.0, -0.0, 0.1, 0.09999, np.nan, np.inf, -np.inf, -100, 100], np.float32)])
    for t in (0.0, 0.1):
        assert_same_bits(C.bm_activation(act, g, t), C.cpu_activation(act, g, t))


def test_rope_is_the_cpu_bits():
    n_heads, hd, n_rot, nt = 3, 64, 48, 4
    x = np.random.default_rng(12).standard_normal((nt, n_heads * hd + 5)).astype(np.float32)
    cs = C.cpu_rope_table(n_rot, [0, 1, 77, 4000], 10000.0, 1.0)
    assert_same_bits(C.bm_rope(x, n_heads, hd, n_rot, cs), C.cpu_rope(x, n_heads, hd, n_rot, cs))


# ---- the hybrid FFN -----------------------------------------------------------------------------------

N_EMBD = 96


def ffn_case(types, n_ff, nt, seed, act):
    gate_t, up_t, down_t = types
    rng = np.random.default_rng(seed)
    gate = weights(gate_t, n_ff, N_EMBD, seed + 1, 0.3)
    up = weights(up_t, n_ff, N_EMBD, seed + 2, 0.3)
    down = weights(down_t, n_ff, N_EMBD, seed + 3, 0.3)
    h = rng.standard_normal((nt, N_EMBD)).astype(np.float32)
    logit = rng.standard_normal((nt, n_ff)).astype(np.float32)
    return dict(gate_type=int(QT[gate_t]), gate=gate, up_type=int(QT[up_t]), up=up, down_type=int(QT[down_t]),
                down_t=down, n_ff=n_ff, h=h, logit=logit, act=act)


# (activation, threshold): FATReLU at a typical cut, one no neuron passes, one every neuron passes
ACTS = [("fatrelu", 0.2), ("fatrelu", 1e9), ("fatrelu", -1e9), ("relu", 0.0), ("silu", 0.05)]


@pytest.mark.parametrize("strategy", ["dense", "exact", "predict"])
@pytest.mark.parametrize("act,act_t", ACTS)
@pytest.mark.parametrize("types", [("Q4_0",) * 3, ("Q8_0",) * 3, ("Q4_1",) * 3, ("Q4_0", "Q8_0", "Q4_1"),
                                   ("Q8_0", "Q4_1", "F16")])
@pytest.mark.parametrize("n_ff,n_hot", [(200, 64), (200, 192), (200, 200), (77, 77)])
@pytest.mark.parametrize("nt", [1, 2, 3])
def test_hybrid_ffn_equals_the_cpu_executor_bitwise(strategy, act, act_t, types, n_ff, n_hot, nt):
    # hot [0, n_hot) through the GPU's arithmetic, cold [n_hot, n_ff) on the CPU executor, against
    # the CPU executor on all neurons; and the hot range alone against the CPU executor on it
    c = ffn_case(types, n_ff, nt, seed=n_ff + nt, act=act)
    common = dict(strategy=strategy, act=act, act_t=act_t, gate_type=c["gate_type"], gate=c["gate"],
                  up_type=c["up_type"], up=c["up"], down_type=c["down_type"], down_t=c["down_t"], n_ff=n_ff,
                  h=c["h"], logit=c["logit"] if strategy == "predict" else None, pred_thr=0.3)
    whole = C.cpu_ffn(**common, begin=0, end=n_ff, n_threads=2)
    hot = C.cpu_ffn(**common, begin=0, end=n_hot, n_threads=1)
    assert_same_bits(C.bm_ffn(**common, n_hot=n_hot, cold=False), hot)
    assert_same_bits(C.bm_ffn(**common, n_hot=n_hot, cold=True), whole)
    if act_t == 1e9:  # no neuron active: nothing reaches the output
        assert not np.any(whole)


@pytest.mark.parametrize("strategy", ["dense", "exact", "predict"])
def test_coefficients_and_active_rows(strategy):
    # the fused kernel's outputs themselves: coef = act(gate) * up where a row's up was read, 0
    # elsewhere; a row is active when some token activates it (dense: every row)
    n_ff, nt = 200, 3
    c = ffn_case(("Q4_0",) * 3, n_ff, nt, seed=13, act="fatrelu")
    logit = c["logit"] if strategy == "predict" else None
    coef, active = C.bm_ffn_coef(strategy, "fatrelu", 0.2, c["gate_type"], c["gate"], c["up_type"], c["up"], n_ff,
                                 c["h"], logit, 0.3, n_ff)
    active = np.frombuffer(active, np.uint8).astype(bool)
    gate = T.gemm(ISAS[0], c["gate_type"], c["gate"], n_ff, N_EMBD, c["h"])
    up = T.gemm(ISAS[0], c["up_type"], c["up"], n_ff, N_EMBD, c["h"])
    a = np.where(gate >= np.float32(0.2), gate, np.float32(0))
    if strategy == "predict":
        a = np.where(c["logit"] > np.float32(0.3), a, np.float32(0))
    want_active = np.ones(n_ff, bool) if strategy == "dense" else np.any(a != 0, axis=0)
    assert np.array_equal(active, want_active)
    assert 0 < active.sum() < n_ff or strategy == "dense"
    assert_same_bits(coef, np.where(want_active, a * up, np.float32(0)))
