"""Weight types and their reference conversions (cpp/src/quant.cpp).

The reference is the gguf package (gguf-py, maintained with llama.cpp): its type table
(gguf.constants) and its numpy quantizers (gguf.quants), which are documented as bit-exact with
ggml-quants.c's quantize_row_*_ref. Where gguf-py is exact we require identical bytes/bits.
"""

import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.quants import dequantize as ref_dequantize  # noqa: E402
from gguf.quants import quantize as ref_quantize  # noqa: E402

from prosparse_rt._core import _testing as core  # noqa: E402

# gguf-py's numpy code warns on the overflowing and NaN inputs these tests feed it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SUPPORTED = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1]  # quantize_row and dequantize_row
# Loaded and dequantized (the converter quantizes them in Python: prosparse_convert.kquants).
DEQUANT_ONLY = [T.Q5_0, T.Q5_1, T.IQ4_NL, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def _inputs(seed: int) -> dict[str, np.ndarray]:
    """Rows of 32*64 floats with the shapes of data that trip quantizers up."""
    rng = np.random.default_rng(seed)
    n = 32 * 64
    tied = rng.integers(-16, 17, n).astype(np.float32) / 2  # many exact .5 ties after scaling
    zero_blocks = rng.standard_normal(n).astype(np.float32)
    zero_blocks[: 32 * 8] = 0.0  # whole blocks of zeros: d = 0, id = 0 branch
    one_sign = np.abs(rng.standard_normal(n)).astype(np.float32)  # Q4_0: max element positive
    one_sign[n // 2 :] *= -1  # and negative
    constant = np.full(n, 0.7, np.float32)  # Q4_1: max == min
    return {
        "normal": rng.standard_normal(n).astype(np.float32),
        "heavy_tailed": (rng.standard_t(2, n) * 3).astype(np.float32),
        "tiny": (rng.standard_normal(n) * 1e-6).astype(np.float32),  # fp16 subnormal scales
        "large": (rng.standard_normal(n) * 3e4).astype(np.float32),  # near the fp16 limit
        "ties": tied,
        "zero_blocks": zero_blocks,
        "one_sign": one_sign,
        "constant": constant,
    }


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", list(_inputs(0)))
def test_quantize_is_byte_identical_to_gguf_py(qtype, kind):
    x = _inputs(1)[kind]
    expected = ref_quantize(x, qtype).tobytes()
    assert core.quantize(int(qtype), x) == expected


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_dequantize_of_random_bytes_is_bit_identical_to_gguf_py(qtype):
    # Arbitrary bytes cover every scale and nibble, including fp16 subnormal, inf and NaN
    # scales; the result is compared bit for bit (NaN payloads included).
    rng = np.random.default_rng(2)
    block, nbytes = GGML_QUANT_SIZES[qtype]
    n = 32 * 256
    raw = rng.integers(0, 256, n // block * nbytes, dtype=np.uint8)
    if qtype == T.F32:  # keep f32 simple: gguf's f32 path is a view
        raw = rng.standard_normal(n).astype(np.float32).view(np.uint8)
    ours = core.dequantize(int(qtype), raw.tobytes(), n)
    expected = ref_dequantize(raw, qtype).reshape(-1)
    np.testing.assert_array_equal(ours.view(np.uint32), expected.astype(np.float32).view(np.uint32))


def test_fp16_to_fp32_matches_numpy_for_all_65536_halves():
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ours = core.dequantize(int(T.F16), halves.tobytes(), halves.size)
    np.testing.assert_array_equal(ours.view(np.uint32), halves.view(np.float16).astype(np.float32).view(np.uint32))


def test_fp32_to_fp16_rounds_like_numpy():
    # numpy's float32 -> float16 cast rounds to nearest even with subnormals, overflow to inf.
    # Sample every float32 exponent densely, plus exact halfway points between halves.
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)].astype(np.float32)
    finite.sort()
    mid = ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(np.float32)  # exact ties
    edges = np.array([65504, 65519.996, 65520, 65536, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001,
                      2.0**-14, 0.0, -0.0, np.inf, -np.inf], np.float32)
    x = np.concatenate([bits.view(np.float32), mid, edges, -mid])
    ours = np.frombuffer(core.quantize(int(T.F16), x), np.uint16)
    expected = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], expected[~nan])
    # NaN stays NaN with its sign (numpy and F16C differ in the payload's quiet bit)
    assert np.all(np.isnan(ours[nan].view(np.float16)))
    np.testing.assert_array_equal(ours[nan] >> 15, expected[nan] >> 15)


def test_bf16_quantize_matches_gguf_py_on_random_bit_patterns_including_nan():
    rng = np.random.default_rng(4)
    bits = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)
    bits[:4] = [0x7F800001, 0xFFFFFFFF, 0x7F7FFFFF, 0x7F7F8000]  # NaNs, max finite, its tie
    x = bits.view(np.float32)
    assert core.quantize(int(T.BF16), x) == ref_quantize(x, T.BF16).tobytes()


def test_q4_0_uses_the_signed_largest_magnitude_element_as_minus_8():
    # ggml: d = max / -8 with max the element of largest |x|, sign kept; it maps to q = 0.
    x = np.linspace(-1.0, 0.5, 32, dtype=np.float32)  # largest |x| is -1.0
    block = core.quantize(int(T.Q4_0), x)
    (d,) = struct.unpack("<e", block[:2])
    assert d == pytest.approx(-1.0 / -8)
    assert block[2] & 0x0F == 0  # element 0 (-1.0) -> q = 0


@pytest.mark.parametrize("zero", [0.0, -0.0])
def test_all_zero_blocks_quantize_like_ggml(zero):
    # ggml-quants.c starts Q4_0's search at max = 0.0f and only replaces it on a strictly larger
    # |x|, so a block of zeros (of either sign) gets d = 0.0f / -8 = -0.0 (fp16 0x8000). gguf-py
    # takes the element itself and writes +0.0 for a block of -0.0; we follow the C reference.
    x = np.full(32, zero, np.float32)
    assert core.quantize(int(T.Q8_0), x) == b"\x00\x00" + bytes(32)
    assert core.quantize(int(T.Q4_0), x) == b"\x00\x80" + bytes([0x88] * 16)  # q = 8 means 0
    assert core.quantize(int(T.Q4_1), x) == b"\x00\x00" + struct.pack("<e", zero) + bytes(16)


@pytest.mark.parametrize("kind", ["normal", "ties", "zero_blocks", "large"])
def test_q8_1_activation_blocks_follow_ggml_q8_1_with_fp32_scales(kind):
    # Our Q8_1 is ggml's quantize_row_q8_1_ref with d and s kept as fp32: the quants are exactly
    # gguf-py's Q8_0 quants (both use id = 1/d with the fp32 d), d = amax/127, s = d*sum(q).
    x = _inputs(5)[kind]
    raw = np.frombuffer(core.quantize_q8_1(x), np.uint8).reshape(-1, 40)
    d = raw[:, 0:4].copy().view(np.float32).reshape(-1)
    s = raw[:, 4:8].copy().view(np.float32).reshape(-1)
    qs = raw[:, 8:].copy().view(np.int8)
    ref_q8_0 = ref_quantize(x, T.Q8_0).reshape(-1, 34)
    np.testing.assert_array_equal(qs, ref_q8_0[:, 2:].view(np.int8))
    blocks = x.reshape(-1, 32)
    np.testing.assert_array_equal(d, np.abs(blocks).max(axis=1) / np.float32(127))
    np.testing.assert_array_equal(s, qs.astype(np.int32).sum(axis=1).astype(np.float32) * d)


def test_type_table_matches_gguf_py_names_and_block_layouts():
    for t in T:
        layout = core.type_layout(int(t))
        if t.name in ("NVFP4", "Q1_0") and layout is None:
            continue  # newer than our table is allowed to be
        assert layout is not None, t.name
        name, block, nbytes, _ = layout
        assert name == t.name.lower()
        assert core.type_name(int(t)) == name
        if t == T.Q8_1:
            # gguf-py still lists the old fp32-scaled Q8_1 (40 bytes); ggml-common.h's
            # block_q8_1 has two fp16 halves: 2*2 + 32 = 36 bytes. Neither is ever in a file.
            assert (block, nbytes) == (32, 36)
            continue
        assert (block, nbytes) == GGML_QUANT_SIZES[t], t.name


def test_exactly_the_supported_types_are_marked_supported():
    supported = {core.type_layout(i)[0] for i in range(64)
                 if core.type_layout(i) is not None and core.type_layout(i)[3]}
    assert supported == {t.name.lower() for t in SUPPORTED + DEQUANT_ONLY}


@pytest.mark.parametrize("t", DEQUANT_ONLY, ids=lambda t: t.name)
def test_dequantization_equals_gguf_bit_for_bit(t):
    """Every field of the layout from random bits (finite fp16 scales), 3 rows of 2 super-blocks."""
    from helpers_quant import random_blocks

    raw = random_blocks(t, 3, 512, np.random.default_rng(int(t)))
    for row in raw:
        ours = core.dequantize(int(t), row.tobytes(), 512)
        ref = ref_dequantize(row, t).reshape(-1)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))


def test_q5_0_and_q5_1_from_the_gguf_quantizer_dequantize_bit_for_bit():
    for t in (T.Q5_0, T.Q5_1):
        for name, x in _inputs(5).items():
            q = ref_quantize(x, t)
            ours = core.dequantize(int(t), q.tobytes(), x.size)
            np.testing.assert_array_equal(ours.view(np.uint32), ref_dequantize(q, t).reshape(-1).view(np.uint32), name)


def test_type_names_for_removed_and_undefined_ids():
    assert core.type_name(4) == "q4_2"  # defined once by ggml, since removed: still named
    assert core.type_layout(4)[1:] == (0, 0, False)
    assert core.type_name(1000) == "unknown(1000)"
    assert core.type_layout(1000) is None


def test_rows_that_are_not_whole_blocks_are_refused():
    with pytest.raises(ValueError):
        core.quantize(int(T.Q8_0), np.zeros(33, np.float32))
    with pytest.raises(ValueError):
        core.quantize_q8_1(np.zeros(33, np.float32))
    with pytest.raises(ValueError):
        core.dequantize(int(T.Q4_0), bytes(18), 16)


def test_non_finite_input_quantizes_without_crashing():
    # llama.cpp's casts are undefined for NaN; ours are defined. Only "no crash" is specified.
    x = np.full(32, np.nan, np.float32)
    x[1], x[2] = np.inf, -np.inf
    for t in SUPPORTED:
        core.quantize(int(t), x)
    core.quantize_q8_1(x)
