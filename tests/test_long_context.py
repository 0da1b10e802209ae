"""Long contexts: the KV cache's types (f16 default, f32, q8_0), tiled attention at depth, prefix
reuse there, a cache too large for the machine, and the end of the context.

Reference: transformers on the same weights, its cache rounding keys and values the way ours stores
them (to f16, or through Q8_0 blocks of 32 along the head as llama.cpp's reference quantizer
rounds), so that the comparison measures our attention and not the cache's rounding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import helpers_models as H
from prosparse_convert import convert
from prosparse_rt import Model

N_CTX = 4096
DEPTH = 4000


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    cfg = H.llama_config(n_embd=128, n_head=2, n_head_kv=1)  # heads of 64: two Q8_0 blocks
    cfg.max_position_embeddings = N_CTX
    ref = H.random_llama(cfg, seed=61)
    d = H.save_llama(root / "hf", ref)
    return ref, convert(d, root / "long.gguf", outtype="f32", progress=False)


def _round_f16(x):
    return x.half().float()


def _q8_0(x):
    """llama.cpp's quantize_row_q8_0_ref then dequantize: per 32 values d = amax / 127 kept as
    f16, q = round half away from zero of x / d."""
    shape = x.shape
    b = x.reshape(-1, 32)
    d = b.abs().amax(dim=1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    v = b * inv
    q = torch.sign(v) * torch.floor(v.abs() + 0.5)
    return (q * d.half().float()).reshape(shape)


def _keys_in_our_order(fn, head_dim):
    """Keys as our cache holds them: the converter permutes each head's rows so that element
    2i + s is Hugging Face's s * d/2 + i (llama.cpp's RoPE convention); a block of 32 therefore
    holds other elements than Hugging Face's first 32."""
    def f(k):
        ours = k.reshape(*k.shape[:-1], 2, head_dim // 2).transpose(-1, -2).reshape(k.shape)
        back = fn(ours)
        return back.reshape(*k.shape[:-1], head_dim // 2, 2).transpose(-1, -2).reshape(k.shape)
    return f


def _hf_logits_with_cache(model, ids, kv_type):
    from transformers import DynamicCache

    head_dim = model.config.hidden_size // model.config.num_attention_heads
    fn = {"f32": lambda x: x, "f16": _round_f16, "q8_0": _q8_0}[kv_type]
    kfn = _keys_in_our_order(fn, head_dim)

    class RoundingCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return super().update(kfn(key_states), fn(value_states), layer_idx, *args, **kwargs)

    with torch.no_grad():
        out = model(torch.tensor([list(ids)]), cache=RoundingCache(), use_cache=True)
    return out.logits[0].float().numpy()


@pytest.mark.parametrize("kv_type", ["f16", "q8_0", "f32"])
def test_logits_at_depth_match_transformers_with_the_same_cache_rounding(long_model, kv_type):
    ref, path = long_model
    ids = H.prompt_ids(DEPTH, seed=62)
    with Model(path, n_ctx=N_CTX, n_threads=2, kv_type=kv_type) as m:
        ours = m.logits(ids)
        assert m.stats["kv_type"] == kv_type
        row = {"f32": 4 * 64, "f16": 2 * 64, "q8_0": 2 * 34}[kv_type]  # one head's 64 values at one position
        assert m.stats["kv_cache_bytes"] == 2 * 2 * 1 * N_CTX * row  # k and v, 2 layers, 1 KV head
    want = _hf_logits_with_cache(ref, ids, kv_type)
    # every 100th position and the last ones: the whole array is large, and the error grows with depth
    sel = list(range(0, DEPTH, 100)) + list(range(DEPTH - 8, DEPTH))
    # Q8_0: a key or value whose f32 value differs from the reference's by an ulp can round to the
    # neighbouring code (a step of amax/127) when it sits on a rounding boundary, and a million
    # rounded values at this depth make some such flips (2.6e-4 measured here); f16's step is
    # 2^-11 of the value, so its flips stay inside 1e-4.
    assert H.rel_error(ours[sel], want[sel]) < (1e-3 if kv_type == "q8_0" else 1e-4)
    if kv_type != "f32":  # the reference's rounding is what we match: without it the error is larger
        plain = _hf_logits_with_cache(ref, ids, "f32")
        assert H.rel_error(ours[sel], plain[sel]) > 2 * H.rel_error(ours[sel], want[sel])


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_decode_and_prefix_reuse_at_depth_give_the_prompts_bits(long_model, kv_type):
    _, path = long_model
    ids = H.prompt_ids(1500, seed=63)
    with Model(path, n_ctx=2048, n_threads=2, kv_type=kv_type) as m:
        full = m.logits(ids)
        m.logits(ids[:1490])  # the cache now holds a prefix; the rest one token at a time
        core = m._native()
        tail = np.concatenate([core.eval([t], True) for t in ids[1490:]], axis=0)
        core.rewind(700)  # rewind into the middle and continue in one batch
        again = core.eval(ids[700:], True)
    np.testing.assert_array_equal(tail, full[1490:])
    np.testing.assert_array_equal(again, full[700:])
    with Model(path, n_ctx=2048, n_threads=3, n_batch=37, kv_type=kv_type) as m:
        np.testing.assert_array_equal(m.logits(ids), full)


def test_a_cache_larger_than_the_memory_is_refused_with_the_largest_n_ctx_that_fits(long_model):
    _, path = long_model
    with pytest.raises(ValueError, match=r"largest n_ctx that fits is \d+"):
        Model(path, n_ctx=2_000_000_000, kv_type="f32")


def test_generation_ends_with_length_at_the_end_of_a_deep_context(long_model):
    _, path = long_model
    with Model(path, n_ctx=N_CTX, n_threads=2) as m:
        prompt = H.prompt_ids(N_CTX - 6, seed=64)
        out = m.create_completion(prompt, max_tokens=50, temperature=0.0)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] <= 6


def test_unknown_cache_type_is_refused(long_model):
    with pytest.raises(ValueError, match="kv_type"):
        Model(long_model[1], kv_type="q4_0")
