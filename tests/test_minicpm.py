"""MiniCPM: a MiniCPMForCausalLM checkpoint (scale_emb, scale_depth, dim_model_base, tied
embeddings, llama tensor names) converted and run, against transformers on the equivalent
LlamaForCausalLM (docs/design.md "Correctness comes from outside references": embeddings x scale_emb,
o_proj and down_proj x residual_scale, an untied head = embeddings / logit_scale)."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest

import helpers_models as H
from prosparse_convert import ConvertError, convert

SCALE_EMB, SCALE_DEPTH, DIM_MODEL_BASE = 12.0, 1.4, 16


@pytest.fixture(scope="module")
def minicpm(tmp_path_factory):
    d = tmp_path_factory.mktemp("minicpm")
    ref, path = H.make_minicpm_dir(d / "hf", scale_emb=SCALE_EMB, scale_depth=SCALE_DEPTH,
                                   dim_model_base=DIM_MODEL_BASE, n_head=4, n_head_kv=2, seed=20)
    return ref, path, convert(path, d / "m.gguf", outtype="f32", progress=False)


def test_minicpm_scales_are_written_unfolded_like_llama_cpp(minicpm):
    # llama.cpp's convert_hf_to_gguf.py MiniCPMModel: embedding_scale = scale_emb,
    # residual_scale = scale_depth / sqrt(n_layer), logit_scale = hidden_size / dim_model_base.
    _, _, out = minicpm
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "minicpm"
    assert f["minicpm.block_count"] == 2 and f["minicpm.embedding_length"] == 64
    assert f["minicpm.embedding_scale"] == pytest.approx(SCALE_EMB)
    assert f["minicpm.residual_scale"] == pytest.approx(SCALE_DEPTH / math.sqrt(2))
    assert f["minicpm.logit_scale"] == pytest.approx(64 / DIM_MODEL_BASE)


def test_minicpm_weights_are_stored_unscaled_and_tied(minicpm):
    ref, path, out = minicpm
    t = H.gguf_tensors_f32(out)
    assert "output.weight" not in t
    # The reference's embeddings carry the folded scale; the file's must not.
    np.testing.assert_allclose(t["token_embd.weight"] * SCALE_EMB,
                               ref.model.embed_tokens.weight.detach().numpy(), rtol=1e-6)


def test_minicpm_logits_match_the_equivalent_llama(minicpm):
    import prosparse_rt

    ref, _, out = minicpm
    ids = H.prompt_ids(20)
    with prosparse_rt.Model(str(out), n_ctx=64, kv_type="f32") as m:
        ours = m.logits(ids)
    assert H.rel_error(ours, H.hf_logits(ref, ids)) < 1e-4


def test_minicpm_s_fatrelu_logits_match_the_equivalent_llama(tmp_path):
    # MiniCPM-S: hidden_act fatrelu with hidden_act_param t; FFN down written as ffn_down_t.
    import prosparse_rt

    ref, path = H.make_minicpm_dir(tmp_path / "hf", hidden_act="fatrelu", hidden_act_param=0.3, seed=21)
    out = convert(path, tmp_path / "m.gguf", outtype="f32", progress=False)
    assert "blk.0.ffn_down_t.weight" in H.gguf_tensors_f32(out)
    ids = H.prompt_ids(20)
    with prosparse_rt.Model(str(out), n_ctx=64, kv_type="f32") as m:
        ours = m.logits(ids)
    assert H.rel_error(ours, H.hf_logits(ref, ids)) < 1e-4


@pytest.mark.parametrize("missing", ["scale_emb", "scale_depth", "dim_model_base"])
def test_minicpm_without_its_scales_is_refused(tmp_path, missing):
    _, path = H.make_minicpm_dir(tmp_path / "hf")
    H.edit_config(path, **{missing: None})
    with pytest.raises(ConvertError, match=f"MiniCPM needs {missing}"):
        convert(path, tmp_path / "m.gguf", progress=False)


def test_the_folded_reference_computes_minicpms_forward(tmp_path):
    # Guards the reference itself: MiniCPM's forward written out with hooks on a llama holding the
    # unscaled checkpoint weights (h0 = embd * scale_emb; o_proj and down_proj outputs * residual
    # scale; logits = lm_head(norm(h) / logit_scale) with lm_head = embeddings) equals the folded model.
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    ref, path = H.make_minicpm_dir(tmp_path / "hf", scale_emb=SCALE_EMB, scale_depth=SCALE_DEPTH,
                                   dim_model_base=DIM_MODEL_BASE, seed=22)
    raw = LlamaForCausalLM(H.llama_config(tied=True)).eval()
    raw.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    raw.tie_weights()
    res = SCALE_DEPTH / math.sqrt(2)
    raw.model.embed_tokens.register_forward_hook(lambda m, i, o: o * SCALE_EMB)
    for layer in raw.model.layers:
        layer.self_attn.o_proj.register_forward_hook(lambda m, i, o: o * res)
        layer.mlp.down_proj.register_forward_hook(lambda m, i, o: o * res)
    raw.lm_head.register_forward_pre_hook(lambda m, i: (i[0] / (64 / DIM_MODEL_BASE),))
    ids = H.prompt_ids(20)
    with torch.no_grad():
        assert H.rel_error(H.hf_logits(raw, ids), H.hf_logits(ref, ids)) < 1e-5
