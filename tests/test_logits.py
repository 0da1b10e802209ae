"""The runtime's logits against Hugging Face transformers on the same weights (docs/design.md "Correctness
comes from outside references"): tiny random LLaMA checkpoints, converted by prosparse-convert, loaded
by prosparse_rt.Model, 20-token prompt, error = max |ours - ref| / max |ref| over all logits."""

from __future__ import annotations

import numpy as np
import pytest

import prosparse_rt  # never skipped: without the runtime these tests must fail

import helpers_models as H
from prosparse_convert import convert

F32_TOL = 1e-4

# Against F16/BF16 weights the runtime multiplies f32 activations (cpu/kernels.h act_row_bytes), so
# the only difference from transformers on the dequantized weights is summation order: same bound
# as f32.
FLOAT_WEIGHT_TOL = 1e-4

# Against Q8_0/Q4_0 weights the runtime quantizes activations to Q8_0 blocks (llama.cpp's scheme:
# 32 values, scale max|x|/127) before each matrix product, which transformers on the dequantized
# weights does not. Emulating exactly that (every nn.Linear input rounded through gguf's Q8_0
# quantizer) on these tiny models moves the logits by 0.019-0.031 of max|ref| (6 seeds, silu and relu,
# Q4_0 weights); 0.06 leaves 2x headroom while a layout or scale bug gives errors of order 1.
QUANT_TOL = 0.06


def _case(tmp_path, kind):
    """(reference model, converted-from directory) for each architecture and activation the converter supports."""
    d = tmp_path / "hf"
    if kind == "silu":
        return H.make_llama_dir(d, hidden_act="silu", seed=10)
    if kind == "relu":
        return H.make_llama_dir(d, hidden_act="relu", seed=11)
    if kind == "silu_gqa_tied":
        return H.make_llama_dir(d, hidden_act="silu", n_head=4, n_head_kv=1, tied=True, seed=12)
    if kind == "relu_gqa":
        return H.make_llama_dir(d, hidden_act="relu", n_head=4, n_head_kv=2, seed=13)
    if kind == "fatrelu":
        # Gate pre-activations are roughly N(0, 1) here, so t = 0.3 zeroes a real share of the
        # positive ones as well: a runtime that ignored t (plain ReLU) would fail.
        return H.make_fatrelu_dir(d, 0.3, n_head=4, n_head_kv=2, seed=14)
    raise AssertionError(kind)


def _ours(path, ids):
    with prosparse_rt.Model(str(path), n_ctx=64, kv_type="f32") as m:
        return m.logits(ids)


@pytest.mark.parametrize("kind", ["silu", "relu", "silu_gqa_tied", "relu_gqa", "fatrelu"])
def test_f32_logits_match_transformers(tmp_path, kind):
    ref_model, path = _case(tmp_path, kind)
    out = convert(path, tmp_path / "m.gguf", outtype="f32", progress=False)
    ids = H.prompt_ids(20)
    ours, ref = _ours(out, ids), H.hf_logits(ref_model, ids)
    assert ours.shape == ref.shape == (20, H.N_VOCAB)
    assert H.rel_error(ours, ref) < F32_TOL


def test_fatrelu_reference_differs_from_relu(tmp_path):
    # Guards the test above: with this threshold FATReLU and ReLU really compute different things.
    ref_model, _ = _case(tmp_path, "fatrelu")
    relu_model = H.random_llama(H.llama_config(hidden_act="relu", n_head=4, n_head_kv=2), 14)
    ids = H.prompt_ids(20)
    assert H.rel_error(H.hf_logits(relu_model, ids), H.hf_logits(ref_model, ids)) > 1e-2


@pytest.mark.parametrize("outtype,tol", [("f16", FLOAT_WEIGHT_TOL), ("bf16", FLOAT_WEIGHT_TOL),
                                         ("q8_0", QUANT_TOL), ("q4_0", QUANT_TOL)])
@pytest.mark.parametrize("kind", ["silu_gqa_tied", "relu_gqa"])
def test_quantized_logits_match_transformers_on_dequantized_weights(tmp_path, kind, outtype, tol):
    ref_model, path = _case(tmp_path, kind)
    out = convert(path, tmp_path / "m.gguf", outtype=outtype, progress=False)
    ids = H.prompt_ids(20)
    ref = H.hf_logits(H.llama_from_gguf(out, ref_model.config), ids)
    assert H.rel_error(_ours(out, ids), ref) < tol


def test_quantization_really_changes_the_reference(tmp_path):
    # Guards the test above: the dequantized reference is not the original model.
    ref_model, path = _case(tmp_path, "relu_gqa")
    out = convert(path, tmp_path / "m.gguf", outtype="q4_0", progress=False)
    ids = H.prompt_ids(20)
    deq = H.hf_logits(H.llama_from_gguf(out, ref_model.config), ids)
    assert H.rel_error(deq, H.hf_logits(ref_model, ids)) > 1e-3


def test_frequency_ordered_file_computes_the_same_model(tmp_path):
    # docs/design.md "Neuron order": permuting every per-neuron tensor together leaves outputs unchanged.
    import torch

    ref_model, path = _case(tmp_path, "fatrelu")
    act = tmp_path / "act"
    act.mkdir()
    g = torch.Generator().manual_seed(7)
    for i in range(2):
        torch.save(torch.randint(0, 1000, (128,), generator=g), act / f"activation_{i}.pt")
    out = convert(path, tmp_path / "m.gguf", outtype="f32", activation=act, neuron_order="frequency",
                  progress=False)
    ids = H.prompt_ids(20)
    assert H.rel_error(_ours(out, ids), H.hf_logits(ref_model, ids)) < F32_TOL


def test_llama_cpp_format_file_computes_the_same_model(tmp_path):
    ref_model, path = _case(tmp_path, "silu_gqa_tied")
    out = convert(path, tmp_path / "m.gguf", outtype="f32", format="llama.cpp", progress=False)
    ids = H.prompt_ids(20)
    assert H.rel_error(_ours(out, ids), H.hf_logits(ref_model, ids)) < F32_TOL


@pytest.mark.parametrize("kind,outtype", [("silu_gqa_tied", "q4_0"), ("relu_gqa", "q4_0"), ("silu_gqa_tied", "q5_0"),
                                          ("relu_gqa", "iq4_nl")])
def test_interleaved_weights_compute_the_same_model(tmp_path, kind, outtype, monkeypatch):
    # Quantized matrices that matmul reads whole are re-laid out at load (cpu/kernels.h "Interleaved
    # rows"); PROSPARSE_INTERLEAVE=0 keeps the file's rows. A row gives the same bits in either
    # layout (docs/design.md, "Determinism"), so the logits are equal, for a prompt batch and
    # token by token.
    _, path = _case(tmp_path, kind)
    out = convert(path, tmp_path / "m.gguf", outtype=outtype, progress=False)
    n = H.interleaving_changes_no_bit(out, monkeypatch, H.prompt_ids(20))
    # per layer (2) q, k, v, o, gate, up; down only in the SiLU file (the ReLU one's down
    # projection is the neuron-major ffn_down_t, which the axpy reads); and the output head
    # (tied: a copy)
    assert n == 2 * (7 if kind.startswith("silu") else 6) + 1
