"""The CPU kernels (cpu/kernels_*.cpp) and the deterministic ops built on them (ops.cpp).

References we did not write: the gguf package's quantizers and dequantizers (llama.cpp's block
layouts and rounding) and numpy in float64. Every available instruction set is checked; the
scalar set is the reference the SIMD sets must agree with.

Error bounds. Our kernels sum in float32, so a dot product of n terms carries a rounding error of
at most about n * u * sum|w_j x_j| with u = 2**-24 (the textbook gamma_n bound; the SIMD sets add
a few levels of horizontal sums). For the quantized types the 32 products inside a block are
exact integers and only the per-block terms are rounded, so n = k / 32. We allow (n + 8) * u
times that magnitude, doubled for slack. A single wrong weight, wrong nibble order or wrong scale
gives an error of the order of one term, |w_j x_j| ~ sum / k, far above the bound.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants

from prosparse_rt import _core

from helpers_quant import random_blocks

T = _core._testing
ISAS = T.isas()
U = 2.0 ** -24

FLOAT_TYPES = {"F32": QT.F32, "F16": QT.F16, "BF16": QT.BF16}
K_TYPES = {"Q2_K": QT.Q2_K, "Q3_K": QT.Q3_K, "Q4_K": QT.Q4_K, "Q5_K": QT.Q5_K, "Q6_K": QT.Q6_K}
QUANT_TYPES = {"Q8_0": QT.Q8_0, "Q4_0": QT.Q4_0, "Q4_1": QT.Q4_1, "Q5_0": QT.Q5_0, "Q5_1": QT.Q5_1,
               "IQ4_NL": QT.IQ4_NL, **K_TYPES}
TYPES = {**FLOAT_TYPES, **QUANT_TYPES}
Q8_1_TYPES = {QT.Q4_1, QT.Q5_1}  # the types whose activations are our Q8_1; the K-quants' are Q8_K


def k_for(name):
    # Float types take any row length: 357 leaves a tail after 16- and 8-wide vectors.
    # Quantized rows are whole blocks: 11 of 32 weights, or 2 super-blocks of 256.
    return 357 if name in FLOAT_TYPES else 512 if name in K_TYPES else 352


def cut_for(name):
    """A column where a row may be cut: a block boundary."""
    return 256 if name in K_TYPES else 128


def make_weights(name, nr, k, seed=0):
    """(raw bytes as a GGUF stores them, dequantized float64 [nr, k]) via the gguf package
    (its quantizer where it has one, else random blocks; its dequantizer)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((nr, k)).astype(np.float32)
    qt = TYPES[name]
    if qt == QT.F32:
        return w.tobytes(), w.astype(np.float64)
    try:
        q = quants.quantize(w, qt)
    except NotImplementedError:
        q = random_blocks(qt, nr, k, rng)
    return q.tobytes(), quants.dequantize(q, qt).astype(np.float64).reshape(nr, k)


def np_roundf(x):
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5)).astype(np.float32)


def act_as_kernels_see_it(name, x):
    """The activation rows after the kernels' conversion: unchanged for float weights, Q8_0
    (the gguf package's quantizer) for Q8_0/Q4_0/Q5_0/IQ4_NL, our Q8_1 (float d = amax/127,
    llama.cpp's rounding) for Q4_1/Q5_1, llama.cpp's Q8_K for the K-quants."""
    qt = TYPES[name]
    if qt in FLOAT_TYPES.values():
        return x.astype(np.float64)
    if qt in K_TYPES.values():
        return q8_k_reference(x)[0]
    if qt in Q8_1_TYPES:
        return q8_1_reference(x)[0]
    return quants.dequantize(quants.quantize(x, QT.Q8_0), QT.Q8_0).astype(np.float64).reshape(x.shape)


def q8_k_reference(x):
    """ggml's quantize_row_q8_K_ref with numpy: (dequantized, d, qs, bsums). Per 256 values, the one
    of largest magnitude m (first of equals, sign kept) maps to -127: q = rint(x * (-127 / m))
    (half to even), at most 127; d = 1 / (-127 / m)."""
    blocks = x.reshape(-1, 256).astype(np.float32)
    m = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(m == 0, np.float32(0), np.float32(-127) / m).astype(np.float32)
        d = np.where(m == 0, np.float32(0), np.float32(1) / iscale).astype(np.float32)
    qs = np.minimum(np.rint(blocks * iscale), 127).astype(np.int8)
    bsums = qs.astype(np.int32).reshape(-1, 16, 16).sum(axis=2).astype(np.int16)
    deq = (d.astype(np.float64) * qs).reshape(x.shape)
    return deq, d[:, 0], qs, bsums


def q8_1_reference(x):
    """Our Q8_1 activation format computed with numpy: (dequantized, d, s, qs)."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    d = (np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    qs = np_roundf(blocks * inv).astype(np.int8)
    s = (d[:, 0] * qs.astype(np.int32).sum(axis=1).astype(np.float32)).astype(np.float32)
    deq = (d.astype(np.float64) * qs).reshape(x.shape)
    return deq, d[:, 0], s, qs


def dot_bound(name, k, xq, wd):
    n_terms = k if name in FLOAT_TYPES else k // 32
    return 2 * (n_terms + 8) * U * (np.abs(xq) @ np.abs(wd).T)


# ---- activation conversion ----------------------------------------------------------------------

def tie_heavy_rows(n_rows, k, seed):
    """Rows whose blocks hit exact .5 rounding ties: amax = 127 makes d = 1, and x = j + 0.5."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, k)).astype(np.float32) * 3
    x[:, ::32] = 127.0
    x[:, 1::32] = 2.5
    x[:, 2::32] = -3.5
    x[0, 64:96] = 0.0  # an all-zero block: d = 0, every q = 0
    return x


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wtype", [QT.Q4_0, QT.Q8_0])
def test_q8_0_activation_equals_gguf_quantizer(isa, wtype):
    """The row against Q8_0/Q4_0 weights holds the gguf package's Q8_0 codes and fp16 scales
    (as floats), field by field (codes, scales, then each block's sum of codes)."""
    x = tie_heavy_rows(3, 128, seed=1)
    nb = 128 // 32
    ref_dtype = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
    for row in x:
        ours = T.quantize_act(isa, int(wtype), row)
        assert len(ours) == nb * 40
        ref = np.frombuffer(quants.quantize(row, QT.Q8_0).tobytes(), dtype=ref_dtype)
        qs = np.frombuffer(ours[: nb * 32], dtype=np.int8).reshape(nb, 32)
        d = np.frombuffer(ours[nb * 32 : nb * 36], dtype="<f4")
        sums = np.frombuffer(ours[nb * 36 :], dtype="<i4")
        np.testing.assert_array_equal(qs, ref["qs"])
        np.testing.assert_array_equal(d, ref["d"].astype(np.float32))
        np.testing.assert_array_equal(sums, ref["qs"].astype(np.int32).sum(axis=1))


@pytest.mark.parametrize("isa", ISAS)
def test_q8_1_activation_matches_numpy_reference(isa):
    x = tie_heavy_rows(2, 128, seed=2)
    rec = np.dtype([("d", "<f4"), ("s", "<f4"), ("qs", "i1", 32)])
    for row in x:
        got = np.frombuffer(T.quantize_act(isa, int(QT.Q4_1), row), dtype=rec)
        _, d, s, qs = q8_1_reference(row)
        np.testing.assert_array_equal(got["qs"], qs)
        np.testing.assert_array_equal(got["d"], d)
        np.testing.assert_array_equal(got["s"], s)


@pytest.mark.parametrize("isa", ISAS)
def test_q8_k_activation_matches_numpy_reference(isa):
    x = np.random.default_rng(3).standard_normal((2, 512)).astype(np.float32) * 5
    x[0, 256:] = 0.0  # an all-zero super-block: d = 0, every q = 0
    x[1, 7] = -40.0  # the largest magnitude negative: it maps to +127
    rec = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])
    for row in x:
        got = np.frombuffer(T.quantize_act(isa, int(QT.Q4_K), row), dtype=rec)
        _, d, qs, bsums = q8_k_reference(row)
        np.testing.assert_array_equal(got["qs"], qs)
        np.testing.assert_array_equal(got["d"], d)
        np.testing.assert_array_equal(got["bsums"], bsums)


# ---- dense gemm -------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("nc", [1, 3, 6])
def test_gemm_matches_numpy_on_gguf_dequantized_weights(isa, name, nc):
    nr, k = 37, k_for(name)  # 37 rows: a short last row tile
    wb, wd = make_weights(name, nr, k)
    x = np.random.default_rng(10 + nc).standard_normal((nc, k)).astype(np.float32)
    xq = act_as_kernels_see_it(name, x)
    got = T.gemm(isa, int(TYPES[name]), wb, nr, k, x)
    assert got.shape == (nc, nr)
    ref = xq @ wd.T
    assert np.all(np.abs(got - ref) <= dot_bound(name, k, xq, wd))


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "scalar"])
@pytest.mark.parametrize("name", TYPES)
def test_simd_gemm_agrees_with_scalar(isa, name):
    nr, k = 19, k_for(name)
    wb, wd = make_weights(name, nr, k, seed=3)
    x = np.random.default_rng(4).standard_normal((5, k)).astype(np.float32)
    xq = act_as_kernels_see_it(name, x)
    simd = T.gemm(isa, int(TYPES[name]), wb, nr, k, x)
    scalar = T.gemm("scalar", int(TYPES[name]), wb, nr, k, x)
    assert np.all(np.abs(simd - scalar) <= 2 * dot_bound(name, k, xq, wd))


@pytest.mark.parametrize("name", TYPES)
def test_matmul_bitwise_identical_for_1_2_3_threads(name):
    nr, k = 70, k_for(name)  # 70 rows: three row chunks, the last one short
    wb, _ = make_weights(name, nr, k, seed=5)
    for nt in (1, 5):
        x = np.random.default_rng(nt).standard_normal((nt, k)).astype(np.float32)
        outs = [T.matmul(int(TYPES[name]), wb, nr, k, x, n) for n in (1, 2, 3)]
        for o in outs[1:]:
            np.testing.assert_array_equal(o, outs[0])
        # Chunking never changes a result: the op equals one kernel call over all rows.
        np.testing.assert_array_equal(outs[0], T.gemm(T.active_isa(), int(TYPES[name]), wb, nr, k, x))


# ---- interleaved rows (weights that matmul reads whole, re-laid out 8 rows a group) ----------------

IL_TYPES = ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# The later x8 types keep the plain rows' own arithmetic (row_dot; Q2_K/Q3_K's plain rows run the
# x8 tiles on transposed blocks); their interleaved copies give the same bits per row.
IL_PLAIN_ROWS = ["Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", IL_TYPES)
@pytest.mark.parametrize("nc", [1, 3, 6])
def test_interleaved_gemm_matches_numpy_and_equals_scalar_bitwise(isa, name, nc):
    nr, k = 40, k_for(name)  # 5 groups of 8 rows
    qt = int(TYPES[name])
    wb, wd = make_weights(name, nr, k, seed=7)
    x = np.random.default_rng(20 + nc).standard_normal((nc, k)).astype(np.float32)
    xq = act_as_kernels_see_it(name, x)
    got = T.gemm(isa, qt, wb, nr, k, x, interleaved=True)
    assert got.shape == (nc, nr)
    assert np.all(np.abs(got - xq @ wd.T) <= dot_bound(name, k, xq, wd))
    # every instruction set does the same operations per row as the scalar reference
    np.testing.assert_array_equal(got, T.gemm("scalar", qt, wb, nr, k, x, interleaved=True))
    # and agrees with the plain layout up to float rounding
    plain = T.gemm(isa, qt, wb, nr, k, x)
    assert np.all(np.abs(got - plain) <= 2 * dot_bound(name, k, xq, wd))


@pytest.mark.parametrize("name", IL_TYPES)
def test_interleaved_matmul_bitwise_identical_for_1_2_3_threads(name):
    nr, k = 1040, 1024  # 130 groups: several chunks, the last one short
    qt = int(TYPES[name])
    wb, _ = make_weights(name, nr, k, seed=8)
    for nt in (1, 5):
        x = np.random.default_rng(nt).standard_normal((nt, k)).astype(np.float32)
        outs = [T.matmul(qt, wb, nr, k, x, n, interleaved=True) for n in (1, 2, 3)]
        for o in outs[1:]:
            np.testing.assert_array_equal(o, outs[0])
        np.testing.assert_array_equal(outs[0], T.gemm(T.active_isa(), qt, wb, nr, k, x, interleaved=True))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", IL_TYPES)
def test_gathered_decode_rows_equal_the_interleaved_matrix_bitwise(isa, name):
    """One token over listed rows (the sparse gate/up) goes through the interleaved arithmetic:
    each row gives the same bits as from the interleaved copy of its matrix, in every ISA (and
    in the scalar reference, whose plain dot accumulates the same way)."""
    nr, k = 40, k_for(name)
    qt = int(TYPES[name])
    wb, wd = make_weights(name, nr, k, seed=9)
    x = np.random.default_rng(9).standard_normal((1, k)).astype(np.float32)
    il = T.gemm(isa, qt, wb, nr, k, x, interleaved=True)
    for rows in ([39, 0, 7, 7, 22, 3, 31, 5, 9, 11, 13], [4], list(range(40))):  # short, single, whole groups
        got = T.gemm_rows(isa, qt, wb, nr, k, rows, x)
        np.testing.assert_array_equal(got, il[:, rows])
    if isa == "scalar":  # the scalar plain dot accumulates as the interleaved reference does
        np.testing.assert_array_equal(T.gemm(isa, qt, wb, nr, k, x), il)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", IL_TYPES)
@pytest.mark.parametrize("nc", [1, 2, 3, 5])
def test_interleaved_rows_give_the_plain_rows_bits(isa, name, nc):
    """The batch-invariance rule: a row gives the same bits from the interleaved copy as from the
    file's rows, in every ISA, for any number of activation rows (odd sizes: 3 groups, 13 blocks
    or 3 super-blocks)."""
    nr, k = 24, 768 if name in K_TYPES else 416
    qt = int(TYPES[name])
    wb, _ = make_weights(name, nr, k, seed=11 + nc)
    x = np.random.default_rng(30 + nc).standard_normal((nc, k)).astype(np.float32)
    x[:, :32] *= 50.0  # a large first block: codes at the ends of their ranges
    il = T.gemm(isa, qt, wb, nr, k, x, interleaved=True)
    np.testing.assert_array_equal(il, T.gemm(isa, qt, wb, nr, k, x))
    np.testing.assert_array_equal(il, T.gemm("scalar", qt, wb, nr, k, x))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", IL_PLAIN_ROWS)
def test_interleaved_extreme_codes_equal_plain_rows(isa, name):
    """Random bytes as blocks (every code and scale bit pattern, not only what a quantizer makes)
    through the interleaved kernels equal the plain rows, bit for bit."""
    nr, k = 16, 512
    qt = TYPES[name]
    rng = np.random.default_rng(5)
    wb = random_blocks(qt, nr, k, rng).tobytes()
    x = rng.standard_normal((3, k)).astype(np.float32)
    il = T.gemm(isa, int(qt), wb, nr, k, x, interleaved=True)
    np.testing.assert_array_equal(il, T.gemm(isa, int(qt), wb, nr, k, x))


@pytest.mark.parametrize("name,nr", [("Q4_0", 36), ("Q8_0", 20), ("Q4_K", 12), ("F16", 40), ("Q2_K", 44), ("Q3_K", 12)])
def test_interleaving_refuses_other_types_and_row_counts(name, nr):
    wb, _ = make_weights(name, nr, k_for(name))
    x = np.ones((1, k_for(name)), dtype=np.float32)
    with pytest.raises(ValueError, match="cannot be interleaved"):
        T.matmul(int(TYPES[name]), wb, nr, k_for(name), x, 1, interleaved=True)


def test_kernel_bench_times_every_quantized_type_interleaved():
    """bench_kernels' attn_il times the interleaved product for every quantized type (Q2_K/Q3_K
    included) and plain rows only for the float types, which have no x8 form."""
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "bench_kernels.py"
    r = subprocess.run([sys.executable, str(script), "--worker", "--types", "q2_k,q3_k,q4_0,f16", "--ops", "attn_il",
                        "--threads", "1", "--seconds", "0.001", "--working-set", "1"],
                       capture_output=True, text=True, check=True)
    layouts = {d["type"]: d["layout"] for d in map(json.loads, r.stdout.splitlines())}
    assert layouts == {"q2_k": "interleaved", "q3_k": "interleaved", "q4_0": "interleaved", "f16": "plain"}


# ---- sparse kernels: gathered rows and the down projection as a sum of rows ----------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_gemm_rows_equals_gemm_on_the_listed_rows(isa, name):
    nr, k = 40, k_for(name)
    wb, wd = make_weights(name, nr, k, seed=6)
    rows = [39, 0, 7, 7, 22, 3, 31]  # unsorted, with a repeat
    x = np.random.default_rng(7).standard_normal((3, k)).astype(np.float32)
    got = T.gemm_rows(isa, int(TYPES[name]), wb, nr, k, rows, x)
    full = T.gemm(isa, int(TYPES[name]), wb, nr, k, x)
    np.testing.assert_array_equal(got, full[:, rows])
    xq = act_as_kernels_see_it(name, x)
    assert np.all(np.abs(got - xq @ wd[rows].T) <= dot_bound(name, k, xq, wd[rows]))


def axpy_bound(n, c, wsel, y0):
    # n fused multiply-adds into y, each rounding once: n * u * (|y0| + sum |c_i w_ij|).
    return 2 * (n + 4) * U * (np.abs(y0) + np.abs(c) @ np.abs(wsel))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TYPES)
# 9 tokens: whole register tiles of 4 (AVX-512) or 2 (AVX2) tokens and a remainder
@pytest.mark.parametrize("nc", [1, 3, 9])
def test_axpy_rows_matches_numpy(isa, name, nc):
    nr, k = 50, k_for(name)
    wb, wd = make_weights(name, nr, k, seed=8)
    rng = np.random.default_rng(9)
    for rows in ([3, 49, 17, 0, 8, 8, 25], None):
        sel = wd if rows is None else wd[rows]
        c = rng.standard_normal((nc, len(sel))).astype(np.float32)
        y0 = rng.standard_normal((nc, k)).astype(np.float32)
        got = T.axpy_rows(isa, int(TYPES[name]), wb, nr, k, rows, c, y0)
        ref = y0 + c.astype(np.float64) @ sel
        assert np.all(np.abs(got - ref) <= axpy_bound(len(sel), c, sel, y0))


def column_slice(name, wb, nr, k, j0, j1):
    """The weights of columns [j0, j1) of every row, as their own buffer (block boundaries)."""
    per = len(wb) // nr
    to_bytes = (lambda j: j * per // k)
    raw = np.frombuffer(wb, np.uint8).reshape(nr, per)
    return raw[:, to_bytes(j0):to_bytes(j1)].tobytes()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_axpy_rows_columns_are_independent_of_how_a_call_is_cut(isa, name):
    # ops.axpy_rows splits a batch's output columns between tasks: a column's sum must not
    # depend on which other columns the same call covered.
    nr, k = 24, k_for(name)
    wb, _ = make_weights(name, nr, k, seed=11)
    rows = [5, 1, 20, 9, 13]
    rng = np.random.default_rng(12)
    c = rng.standard_normal((2, len(rows))).astype(np.float32)
    y0 = rng.standard_normal((2, k)).astype(np.float32)
    cut = cut_for(name)
    whole = T.axpy_rows(isa, int(TYPES[name]), wb, nr, k, rows, c, y0)
    left = T.axpy_rows(isa, int(TYPES[name]), column_slice(name, wb, nr, k, 0, cut), nr, cut, rows, c,
                       np.ascontiguousarray(y0[:, :cut]))
    right = T.axpy_rows(isa, int(TYPES[name]), column_slice(name, wb, nr, k, cut, k), nr, k - cut, rows, c,
                        np.ascontiguousarray(y0[:, cut:]))
    np.testing.assert_array_equal(whole, np.concatenate([left, right], axis=1))


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "scalar"])
@pytest.mark.parametrize("name", TYPES)
def test_simd_axpy_rows_agrees_with_scalar(isa, name):
    nr, k = 30, k_for(name)
    wb, wd = make_weights(name, nr, k, seed=13)
    rows = list(range(0, 30, 2))
    rng = np.random.default_rng(14)
    c = rng.standard_normal((1, len(rows))).astype(np.float32)
    y0 = np.zeros((1, k), np.float32)
    simd = T.axpy_rows(isa, int(TYPES[name]), wb, nr, k, rows, c, y0)
    scalar = T.axpy_rows("scalar", int(TYPES[name]), wb, nr, k, rows, c, y0)
    assert np.all(np.abs(simd - scalar) <= 2 * axpy_bound(len(rows), c, wd[rows], y0))


# ---- batch invariance (docs/design.md, "Determinism") ------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", QUANT_TYPES)
def test_quantized_rows_give_the_same_bits_alone_in_a_batch_and_in_every_isa(isa, name):
    """Whole or gathered, one activation row or nine: every quantized (row, token) product is the
    interleaved reference's sequence, so it equals the scalar set's bits and itself in any call."""
    nr, k = 44, k_for(name)  # 44 rows: five groups of 8, the last one short
    wb, _ = make_weights(name, nr, k, seed=40)
    x = np.random.default_rng(41).standard_normal((9, k)).astype(np.float32)
    qt = int(TYPES[name])
    ref = T.gemm("scalar", qt, wb, nr, k, x)
    np.testing.assert_array_equal(T.gemm(isa, qt, wb, nr, k, x), ref)
    for c in (0, 4, 8):
        np.testing.assert_array_equal(T.gemm(isa, qt, wb, nr, k, x[c:c + 1])[0], ref[c])
    rows = [43, 2, 17, 18, 30, 5, 41, 0, 9, 11, 12]
    np.testing.assert_array_equal(T.gemm_rows(isa, qt, wb, nr, k, rows, x), ref[:, rows])
    np.testing.assert_array_equal(T.gemm_rows(isa, qt, wb, nr, k, rows, x[3:4])[0], ref[3, rows])


def _group_rule(wd32, rows, c, y0):
    """kernels.h's axpy_rows in float32, for one token: per group of 64 neurons a partial from zero
    over the group's rows in order, then added to y; numpy has no fma, so the reference rounds the
    product and the sum apart and is compared with a bound, the structure with the bits below."""
    y = y0.astype(np.float32).copy()
    groups = {}
    for i, r in enumerate(rows):
        groups.setdefault(r // 64, []).append(i)
    for g in sorted(groups):
        p = np.zeros_like(y)
        for i in groups[g]:
            p = (p + np.float32(c[i]) * wd32[rows[i]]).astype(np.float32)
        y = (y + p).astype(np.float32)
    return y


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_axpy_rows_sums_in_neuron_groups_and_a_token_sees_only_its_own_rows(isa, name):
    nr, k = 300, k_for(name)  # five groups of 64 neurons, the last one partial
    wb, wd = make_weights(name, nr, k, seed=42)
    rng = np.random.default_rng(43)
    union = sorted(rng.choice(nr, 120, replace=False).tolist())
    nt = 9
    c = rng.standard_normal((nt, len(union))).astype(np.float32)
    c[rng.random(c.shape) < 0.5] = 0.0  # each token selects its own half of the union
    y0 = np.zeros((nt, k), np.float32)
    qt = int(TYPES[name])
    batch = T.axpy_rows(isa, qt, wb, nr, k, union, c, y0)
    np.testing.assert_array_equal(batch, T.axpy_rows("scalar", qt, wb, nr, k, union, c, y0))
    for t in range(nt):
        own = [i for i in range(len(union)) if c[t, i] != 0.0]
        alone = T.axpy_rows(isa, qt, wb, nr, k, [union[i] for i in own], c[t:t + 1, own], y0[t:t + 1])
        np.testing.assert_array_equal(batch[t], alone[0], err_msg=f"token {t}")
        in_union = T.axpy_rows(isa, qt, wb, nr, k, union, c[t:t + 1], y0[t:t + 1])
        np.testing.assert_array_equal(batch[t], in_union[0], err_msg=f"token {t}")
        ref = _group_rule(wd.astype(np.float32), union, c[t], y0[t])
        assert np.all(np.abs(batch[t] - ref) <= axpy_bound(len(union), c[t:t + 1], wd[union], y0[t:t + 1])[0])
    # dense: rows == None is the same as listing every row
    cd = rng.standard_normal((2, nr)).astype(np.float32)
    np.testing.assert_array_equal(T.axpy_rows(isa, qt, wb, nr, k, None, cd, y0[:2]),
                                  T.axpy_rows(isa, qt, wb, nr, k, list(range(nr)), cd, y0[:2]))


def _check_batch_is_each_token_alone(isa, qt, wb, wd, nr, k, union, c, y0):
    """axpy_rows over the union for every token at once: the scalar reference's bits, each token's
    row the one-token kernel's bits on its own (non-zero) rows alone, and close to float64."""
    batch = T.axpy_rows(isa, qt, wb, nr, k, union, c, y0)
    np.testing.assert_array_equal(batch, T.axpy_rows("scalar", qt, wb, nr, k, union, c, y0))
    for t in range(c.shape[0]):
        own = [i for i in range(len(union)) if c[t, i] != 0.0]
        alone = T.axpy_rows(isa, qt, wb, nr, k, [union[i] for i in own], c[t:t + 1, own], y0[t:t + 1])
        np.testing.assert_array_equal(batch[t], alone[0], err_msg=f"token {t}")
    sel = wd[union]
    assert np.all(np.abs(batch - (y0 + c.astype(np.float64) @ sel)) <= 2 * axpy_bound(len(union) + 20, c, sel, y0))
    return batch


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_axpy_rows_decode_batch_skips_other_tokens_rows_with_the_same_bits(isa, name):
    # A decode batch: each token's own rows are a small part of the step's union (most of its
    # coefficients zero), so the kernel runs each token over its non-zero rows only; one token has
    # no rows at all, one has rows in a single group. Every token must get the bits of the one-token
    # kernel on its own rows and of the scalar reference.
    nr, k = 300, k_for(name)
    wb, wd = make_weights(name, nr, k, seed=44)
    rng = np.random.default_rng(45)
    union = sorted(rng.choice(nr, 200, replace=False).tolist())
    nt = 6
    c = rng.standard_normal((nt, len(union))).astype(np.float32)
    c[rng.random(c.shape) < 0.85] = 0.0
    c[2] = 0.0  # a token without rows in this union
    c[4] = 0.0
    c[4, :3] = 1.5  # rows in the first group only
    y0 = rng.standard_normal((nt, k)).astype(np.float32)
    qt = int(TYPES[name])
    batch = _check_batch_is_each_token_alone(isa, qt, wb, wd, nr, k, union, c, y0)
    np.testing.assert_array_equal(batch[2], y0[2])


def _prompt_case(name, nr, nt, seed):
    """A prompt-like down projection: weights of 3 column panels and a bit (odd block counts,
    float tails), a union of most rows with gaps, each token its own subset of it with zeros
    elsewhere (what ffn.cpp passes)."""
    k = {"F32": 357 + 64, "F16": 357 + 64, "BF16": 357 + 64}.get(name, 768 if name in K_TYPES else 416)
    wb, wd = make_weights(name, nr, k, seed=seed)
    rng = np.random.default_rng(seed + 1)
    union = sorted(rng.choice(nr, int(nr * 0.8), replace=False).tolist())
    c = rng.standard_normal((nt, len(union))).astype(np.float32)
    c[rng.random(c.shape) < 0.3] = 0.0
    return k, wb, wd, union, c


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_axpy_rows_prompt_batch_gives_each_token_its_decode_bits(isa, name):
    # 23 tokens: several register tiles of 4 (AVX-512) or 2 (AVX2) tokens and a remainder; 200
    # rows: panels that hold whole groups, and groups cut short by the union's gaps. Each token's
    # row of the batch must be the bits of the one-token (decode) kernel on its own rows alone,
    # and of the scalar reference.
    nr, nt = 200, 23
    k, wb, wd, union, c = _prompt_case(name, nr, nt, seed=60)
    qt = int(TYPES[name])
    y0 = np.random.default_rng(62).standard_normal((nt, k)).astype(np.float32)
    _check_batch_is_each_token_alone(isa, qt, wb, wd, nr, k, union, c, y0)


@pytest.mark.parametrize("name", TYPES)
def test_axpy_rows_op_prompt_batch_equals_decode_for_1_2_3_threads(name):
    # ops.axpy_rows cuts a batch's columns into fixed slices and a single token's into one slice
    # per thread: whatever the cut and the thread count, a token's output in the batch is the
    # bits it gets decoded alone, on the union (zero coefficients elsewhere) or on its own rows.
    nr, nt = 300, 9
    k, wb, wd, union, c = _prompt_case(name, nr, nt, seed=63)
    qt = int(TYPES[name])
    batch = [T.axpy_rows_op(qt, wb, nr, k, union, c, n) for n in (1, 2, 3)]
    for b in batch[1:]:
        np.testing.assert_array_equal(b, batch[0])
    for t in range(nt):
        own = [i for i in range(len(union)) if c[t, i] != 0.0]
        for n in (1, 2, 3):
            alone = T.axpy_rows_op(qt, wb, nr, k, [union[i] for i in own], np.ascontiguousarray(c[t:t + 1, own]), n)
            np.testing.assert_array_equal(batch[0][t], alone[0], err_msg=f"token {t}, {n} threads")
        in_union = T.axpy_rows_op(qt, wb, nr, k, union, np.ascontiguousarray(c[t:t + 1]), 2)
        np.testing.assert_array_equal(batch[0][t], in_union[0], err_msg=f"token {t}")
    # every row (the dense fallback): the union's coefficients scattered, zeros elsewhere
    full = np.zeros((nt, nr), np.float32)
    full[:, union] = c
    np.testing.assert_array_equal(T.axpy_rows_op(qt, wb, nr, k, None, full, 2), batch[0])


@pytest.mark.parametrize("n, hd", [(1, 64), (37, 64), (128, 64), (100, 40), (128, 128)])
def test_attention_tile_matches_numpy_in_every_isa(n, hd):
    rng = np.random.default_rng(n * 1000 + hd)
    q = rng.standard_normal(hd).astype(np.float32)
    K = rng.standard_normal((n, hd)).astype(np.float32)
    V = rng.standard_normal((n, hd)).astype(np.float32)
    scale = 1.0 / np.sqrt(hd)
    s = (K.astype(np.float64) @ q) * scale
    m = s.max()
    e = np.exp(s - m)
    for isa in ISAS:  # a dot's lane order is the instruction set's own: compared with a bound
        got = T.attn_tile(isa, q, K, V, scale)
        np.testing.assert_array_equal(got, T.attn_tile(isa, q, K, V, scale))
        assert abs(got[0] - m) <= 1e-5 * max(1.0, abs(m)), isa
        assert abs(got[1] - e.sum()) <= 1e-5 * e.sum(), isa
        np.testing.assert_allclose(got[2:] / got[1], (e @ V) / e.sum(), rtol=0, atol=1e-5, err_msg=isa)


@pytest.mark.parametrize("n, hd", [(1, 64), (37, 64), (128, 64), (100, 40), (5, 24), (128, 128)])
def test_attention_tile_on_f16_rows_equals_it_on_their_floats(n, hd):
    # an f16 KV cache's rows are read in place (attn_tile_f16); the conversion is exact, so every
    # instruction set gives the bits its attn_tile gives on the converted floats (tails included:
    # hd not a multiple of the vector width, n not a multiple of 4)
    rng = np.random.default_rng(n * 7 + hd)
    q = rng.standard_normal(hd).astype(np.float32)
    K = (3 * rng.standard_normal((n, hd))).astype(np.float16)
    V = rng.standard_normal((n, hd)).astype(np.float16)
    scale = 1.0 / np.sqrt(hd)
    for isa in ISAS:
        want = T.attn_tile(isa, q, K.astype(np.float32), V.astype(np.float32), scale)
        got = T.attn_tile_f16(isa, q, K.view(np.uint16), V.view(np.uint16), scale)
        np.testing.assert_array_equal(got, want, err_msg=isa)


def test_axpy_rows_op_refuses_rows_out_of_order():
    wb, _ = make_weights("Q4_0", 8, 64)
    with pytest.raises(ValueError, match="ascending"):
        T.axpy_rows_op(int(QT.Q4_0), wb, 8, 64, [3, 1], np.ones((1, 2), np.float32), 2)


@pytest.mark.parametrize("name", TYPES)
def test_matmul_rows_bitwise_identical_for_1_2_3_threads(name):
    nr, k = 120, k_for(name)
    wb, _ = make_weights(name, nr, k, seed=15)
    rows = list(range(119, 0, -3))  # 40 rows: two chunks
    for nt in (1, 4):
        x = np.random.default_rng(nt).standard_normal((nt, k)).astype(np.float32)
        outs = [T.matmul_rows(int(TYPES[name]), wb, nr, k, rows, x, n) for n in (1, 2, 3)]
        for o in outs[1:]:
            np.testing.assert_array_equal(o, outs[0])
        np.testing.assert_array_equal(outs[0], T.gemm_rows(T.active_isa(), int(TYPES[name]), wb, nr, k, rows, x))


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("nt", [1, 4])
def test_axpy_rows_op_bitwise_identical_for_1_2_3_threads_and_matches_numpy(name, nt):
    # 300 rows: five neuron groups, each summed apart and added in order; the output columns are
    # cut into one slice per thread (a single token) or fixed slices (a batch).
    nr, k = 300, k_for(name)
    wb, wd = make_weights(name, nr, k, seed=16)
    rng = np.random.default_rng(17)
    for rows in (sorted(rng.choice(nr, 150, replace=False).tolist()), None):
        sel = wd if rows is None else wd[rows]
        c = rng.standard_normal((nt, len(sel))).astype(np.float32)
        outs = [T.axpy_rows_op(int(TYPES[name]), wb, nr, k, rows, c, n) for n in (1, 2, 3)]
        for o in outs[1:]:
            np.testing.assert_array_equal(o, outs[0])
        zero = np.zeros((nt, k))
        # The groups' partials added at the end: one more rounding per group on top of the chain bound.
        assert np.all(np.abs(outs[0] - c.astype(np.float64) @ sel) <= 2 * axpy_bound(len(sel) + 20, c, sel, zero))


# ---- bad input and the thread pool -------------------------------------------------------------

def test_row_index_out_of_range_is_a_value_error():
    wb, _ = make_weights("Q4_0", 8, 64)
    x = np.ones((1, 64), np.float32)
    with pytest.raises(ValueError, match="row index 8 out of range"):
        T.matmul_rows(int(QT.Q4_0), wb, 8, 64, [1, 8], x, 2)
    with pytest.raises(ValueError, match="row index -1 out of range"):
        T.axpy_rows_op(int(QT.Q4_0), wb, 8, 64, [-1], np.ones((1, 1), np.float32), 2)


def test_exception_in_a_task_reaches_the_caller_and_stops_the_rest():
    with pytest.raises(ValueError, match="task 37 failed"):
        T.parallel_for_raises(2, 10_000, 37)
    with pytest.raises(ValueError, match="thread count"):
        T.parallel_for_raises(0, 1, -1)


def test_parallel_for_runs_every_task_once():
    assert T.parallel_for_raises(3, 1000, -1) == 1000


def test_pool_keeps_working_after_a_task_threw():
    assert T.pool_runs_after_error(2, 500) == 500


def run_with_isa(value):
    env = dict(os.environ, PROSPARSE_ISA=value)
    code = "from prosparse_rt import _core\nprint(_core._testing.active_isa())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_prosparse_isa_forces_the_kernel_set():
    r = run_with_isa("scalar")
    assert r.returncode == 0 and r.stdout.strip() == "scalar"


def test_prosparse_isa_with_an_unknown_name_is_refused():
    r = run_with_isa("avx9000")
    assert r.returncode != 0 and "PROSPARSE_ISA=avx9000" in r.stderr


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "scalar"])
@pytest.mark.parametrize("name", IL_PLAIN_ROWS)
def test_gathered_rows_and_down_sums_of_random_blocks_equal_scalar_bitwise(isa, name):
    """The later x8 types' SIMD gemm_rows (8 rows transposed at a time) and one-token axpy_rows
    (steps of 2 or 8 blocks, AVX-512 table permutes in a transposed lane order) on random bytes
    (every code and scale bit pattern): the scalar reference's bits for row lists of every length
    around the group and step sizes, empty, single, unsorted with repeats (gemm_rows) or ascending
    over several neuron groups (axpy_rows), and row lengths that leave partial steps."""
    qt = TYPES[name]
    rng = np.random.default_rng(77)
    nr = 200
    for nblocks in ((1, 2, 3) if name in K_TYPES else (1, 7, 9, 11, 17)):
        k = nblocks * (256 if name in K_TYPES else 32)
        wb = random_blocks(qt, nr, k, rng).tobytes()
        x = rng.standard_normal((3, k)).astype(np.float32)
        for n in (0, 1, 7, 8, 9, 16, 23):
            rows = rng.integers(0, nr, n).tolist()  # unsorted, repeats allowed
            for nc in (1, 3):
                np.testing.assert_array_equal(T.gemm_rows(isa, int(qt), wb, nr, k, rows, x[:nc]),
                                              T.gemm_rows("scalar", int(qt), wb, nr, k, rows, x[:nc]),
                                              err_msg=f"gemm_rows k={k} n={n} nc={nc}")
        for n in (0, 1, 5, 64, 65, 130):
            rows = sorted(rng.choice(nr, n, replace=False).tolist())
            c = rng.standard_normal((1, n)).astype(np.float32)
            y0 = rng.standard_normal((1, k)).astype(np.float32)
            np.testing.assert_array_equal(T.axpy_rows(isa, int(qt), wb, nr, k, rows, c, y0),
                                          T.axpy_rows("scalar", int(qt), wb, nr, k, rows, c, y0),
                                          err_msg=f"axpy_rows k={k} n={n}")
