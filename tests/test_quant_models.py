"""Whole models in the types llama.cpp users download: Q5_0, Q5_1, IQ4_NL and the K-quant mixes
(q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k), written by prosparse-convert (our quantizer, llama.cpp's
per-tensor mix) and run by the runtime. References: transformers on the weights the gguf package
dequantizes from the file, and the dense strategy for exact (docs/design.md "Correctness comes from
outside references").

The models have n_embd 256 so that the K-quants' 256-weight super-blocks fit the attention and
gate/up rows; n_ff 384 is not a multiple of 256, so ffn_down (rows of n_ff) takes llama.cpp's
fallback type, and the neuron-major ffn_down_t (rows of n_embd) keeps the K type.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader

import helpers_models as H
from prosparse_convert import convert, quant
from prosparse_rt import Model

# As test_logits.QUANT_TOL: activations are quantized per block (Q8_0, Q8_1 or Q8_K) before each
# product, which transformers on the dequantized weights does not do; a layout or scale bug gives
# errors of order 1.
QUANT_TOL = 0.06
MIXES = ["q5_0", "q5_1", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k", "iq4_nl"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kq")
    relu, relu_dir = H.make_llama_dir(root / "relu", hidden_act="relu", n_head=4, n_head_kv=1, n_embd=256,
                                      n_ff=384, tied=True, seed=31)
    silu, silu_dir = H.make_llama_dir(root / "silu", hidden_act="silu", n_head=4, n_head_kv=2, n_embd=256,
                                      n_ff=384, seed=32)
    return {"relu": (relu, relu_dir), "silu": (silu, silu_dir), "root": root}


def _file(models, kind, outtype):
    out = models["root"] / f"{kind}-{outtype}.gguf"
    if not out.exists():
        convert(models[kind][1], out, outtype=outtype, progress=False)
    return out


def _types(path):
    return {t.name: T(int(t.tensor_type)) for t in GGUFReader(str(path)).tensors}


def _logits(path, **kw):
    with Model(str(path), n_ctx=64, kv_type="f32", n_threads=2, **kw) as m:
        return m.logits(H.prompt_ids(20))


# each mix on one of the two models (tied ReLU with GQA 4, untied SiLU with GQA 2), alternating
@pytest.mark.parametrize("kind,outtype", [(("relu", "silu")[i % 2], t) for i, t in enumerate(MIXES)])
def test_logits_match_transformers_on_the_dequantized_weights(models, kind, outtype):
    path = _file(models, kind, outtype)
    ref = H.hf_logits(H.llama_from_gguf(path, models[kind][0].config), H.prompt_ids(20))
    assert H.rel_error(_logits(path), ref) < QUANT_TOL


def test_q4_k_m_file_holds_llama_cpps_mix(models):
    types = _types(_file(models, "relu", "q4_k_m"))
    assert types["blk.0.attn_q.weight"] == T.Q4_K
    assert types["blk.0.ffn_gate.weight"] == T.Q4_K
    assert types["blk.0.attn_v.weight"] == T.Q4_K
    assert types["blk.1.attn_v.weight"] == T.Q6_K  # use_more_bits: the last eighth of the layers
    assert types["token_embd.weight"] == T.Q6_K  # tied: the output head's type
    assert types["blk.0.ffn_down_t.weight"] == T.Q4_K  # rows of n_embd = 256: stays a K type
    assert types["blk.1.ffn_down_t.weight"] == T.Q6_K
    assert types["blk.0.attn_norm.weight"] == T.F32
    plain = _types(_file(models, "silu", "q4_k_m"))
    assert plain["blk.0.ffn_down.weight"] == T.Q5_0  # Q4_K over rows of 384: llama.cpp's fallback
    assert plain["blk.1.ffn_down.weight"] == T.Q8_0  # Q6_K's
    assert plain["output.weight"] == T.Q6_K and plain["token_embd.weight"] == T.Q4_K


def test_mix_rules_on_smollm2_and_7b_shapes():
    def mt(outtype, name, shape, n_layer=30):
        return quant.mixed_type(outtype, name, shape, n_layer, 3, True)

    # SmolLM2-135M: n_embd 576 is not a multiple of 256
    assert mt("q4_k_m", "blk.5.attn_q.weight", (576, 576)) == T.Q5_0
    assert mt("q4_k_m", "blk.0.ffn_down.weight", (576, 1536)) == T.Q6_K  # rows of n_ff 1536: fit
    assert mt("q4_k_m", "blk.4.ffn_down.weight", (576, 1536)) == T.Q4_K
    assert mt("q4_k_m", "blk.4.ffn_down_t.weight", (1536, 576)) == T.Q5_0
    assert mt("q4_k_m", "token_embd.weight", (49152, 576)) == T.Q8_0  # tied output head
    assert mt("q5_k_m", "blk.4.attn_k.weight", (192, 576)) == T.Q5_1
    assert mt("q6_k", "blk.4.attn_k.weight", (192, 576)) == T.Q8_0
    # the 7B shape: every row length a multiple of 256
    assert mt("q4_k_m", "blk.3.attn_v.weight", (4096, 4096), 32) == T.Q6_K  # the first eighth
    assert mt("q4_k_m", "blk.4.attn_v.weight", (4096, 4096), 32) == T.Q4_K
    assert mt("q4_k_m", "blk.6.attn_v.weight", (4096, 4096), 32) == T.Q6_K  # every third after it
    assert mt("q3_k_m", "blk.0.attn_v.weight", (4096, 4096), 32) == T.Q5_K
    assert mt("q3_k_m", "blk.9.attn_output.weight", (4096, 4096), 32) == T.Q4_K
    assert mt("q2_k", "blk.9.ffn_down.weight", (4096, 11008), 32) == T.Q3_K
    assert mt("q2_k", "blk.9.ffn_down_t.weight", (11008, 4000), 32) == T.Q4_0  # rows of 4000: fallback
    assert mt("q3_k_m", "blk.9.attn_q.weight", (576, 576), 32) == T.Q4_0
    assert mt("q2_k", "blk.9.attn_v.weight", (4096, 4096), 32) == T.Q3_K
    assert mt("q5_0", "output.weight", (32000, 4096), 32) == T.Q6_K


@pytest.mark.parametrize("outtype", ["q4_k_m", "q6_k", "q5_0"])
def test_exact_equals_dense_on_a_k_quant_file(models, outtype):
    path = _file(models, "relu", outtype)
    dense = _logits(path, sparsity="dense")
    np.testing.assert_array_equal(_logits(path, sparsity="exact"), dense)


def test_logits_are_bitwise_the_same_for_every_thread_count_in_every_isa(models):
    """The weight products are the same bits in every ISA; attention's float dots have each ISA's own
    lane order (docs/design.md "Determinism"), so across ISAs the logits agree to rounding."""
    import subprocess
    import sys

    from prosparse_rt import _core

    path = _file(models, "silu", "q4_k_m")
    code = ("import sys, numpy as np; sys.path.insert(0, 'tests'); import helpers_models as H; "
            "from prosparse_rt import Model\n"
            f"m = Model({str(path)!r}, n_ctx=64, kv_type='f32', n_threads=int(sys.argv[1]))\n"
            "sys.stdout.buffer.write(m.logits(H.prompt_ids(20)).tobytes())")
    per_isa = []
    for isa in _core._testing.isas():
        outs = []
        for n in ("1", "3"):
            r = subprocess.run([sys.executable, "-c", code, n], capture_output=True,
                               env={**__import__("os").environ, "PROSPARSE_ISA": isa})
            assert r.returncode == 0, r.stderr.decode()
            outs.append(r.stdout)
        assert outs[0] == outs[1], isa
        per_isa.append(np.frombuffer(outs[0], np.float32))
    for other in per_isa[1:]:
        assert H.rel_error(other, per_isa[0]) < 1e-5


def test_a_file_quantized_by_llama_cpp_loads_and_matches_transformers():
    """tests/data/tiny-llama-cpp-q4_k_m.gguf: made once by llama.cpp's own quantizer
    (tests/data/make_llama_cpp_q4_k_m.py), not by our converter."""
    from pathlib import Path

    import importlib.util

    data = Path(__file__).resolve().parent / "data"
    spec = importlib.util.spec_from_file_location("make_fixture", data / "make_llama_cpp_q4_k_m.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)  # for its CONFIG: the fixture's shape
    path = data / "tiny-llama-cpp-q4_k_m.gguf"
    types = _types(path)
    assert {types["blk.0.attn_q.weight"], types["blk.0.ffn_down.weight"]} == {T.Q4_K, T.Q6_K}
    ref = H.hf_logits(H.llama_from_gguf(path, H.llama_config(**maker.CONFIG)), H.prompt_ids(20))
    assert H.rel_error(_logits(path), ref) < QUANT_TOL


def test_llama_cpp_q4_k_m_file_gives_the_same_logits_interleaved(monkeypatch):
    """The fixture's Q4_K and Q6_K matrices get interleaved copies (cpu/kernels.h, "Interleaved
    rows"); a row gives the same bits in either layout, so the logits are equal with and without
    them (PROSPARSE_INTERLEAVE=0), for a prompt batch and token by token."""
    from pathlib import Path

    path = Path(__file__).resolve().parent / "data" / "tiny-llama-cpp-q4_k_m.gguf"

    n = H.interleaving_changes_no_bit(path, monkeypatch, H.prompt_ids(20), {"n_threads": 2}, {"n_threads": 1})
    types = _types(path)
    # q, k, v, o, gate, up, down per layer and the output head, all Q4_K or Q6_K here
    n_layer = sum(1 for name in types if name.endswith("attn_q.weight"))
    assert {types["blk.0.attn_q.weight"], types["blk.0.attn_v.weight"], types["output.weight"]} == {T.Q4_K, T.Q6_K}
    assert n == 7 * n_layer + 1


@pytest.mark.parametrize("kind,outtype", [("silu", "q2_k"), ("silu", "q3_k_m"), ("relu", "q2_k")])
def test_q2_k_and_q3_k_files_give_the_same_logits_interleaved(models, monkeypatch, kind, outtype):
    """Q2_K and Q3_K matrices get interleaved copies too (block_q2_Kx8, block_q3_Kx8); a row gives
    the same bits in either layout, so the logits equal those without the copies
    (PROSPARSE_INTERLEAVE=0), for a prompt batch and token by token."""
    path = _file(models, kind, outtype)
    types = _types(path)
    k23 = {name for name, t in types.items() if t in (T.Q2_K, T.Q3_K)}
    assert {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight"} & k23  # the mix's own types

    n = H.interleaving_changes_no_bit(path, monkeypatch, H.prompt_ids(20), {"n_threads": 2}, {"n_threads": 1})
    n_layer = sum(1 for name in types if name.endswith("attn_q.weight"))
    if kind == "silu":  # q, k, v, o, gate, up, down per layer and the untied head: every one copied
        assert n == 7 * n_layer + 1
    else:
        assert n >= 5 * n_layer


def test_iq4_nl_file_holds_llama_cpps_mix(models):
    types = _types(_file(models, "relu", "iq4_nl"))  # GQA 4: attn_v one step up
    assert types["blk.0.attn_q.weight"] == T.IQ4_NL
    assert types["blk.0.attn_v.weight"] == T.Q5_K
    assert types["blk.0.ffn_gate.weight"] == T.IQ4_NL
    assert types["token_embd.weight"] == T.Q6_K  # tied: the output head's type
    assert types["blk.0.ffn_down_t.weight"] == T.IQ4_NL  # 2 layers: no first eighth
    plain = _types(_file(models, "silu", "iq4_nl"))  # GQA 2
    assert plain["blk.0.attn_v.weight"] == T.IQ4_NL
    assert plain["blk.0.ffn_down.weight"] == T.IQ4_NL
    assert plain["output.weight"] == T.Q6_K and plain["token_embd.weight"] == T.IQ4_NL
