"""Tiny random Hugging Face checkpoints for the converter and runtime tests (seeded, built with
transformers, saved as the hub would ship them: config.json, model.safetensors, tokenizer files).

Shapes: hidden 64, 2 layers, n_ff 128, head_dim 16, vocab = the SentencePiece model's (384), so that
every tensor's rows fill whole 32-weight quant blocks. Weights are drawn wider than transformers'
default (std 0.02) so that logits are far from uniform and activations straddle FATReLU thresholds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

N_VOCAB = 384
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_TRAINING_TEXT_LINES = 4000


def _training_text() -> str:
    """English text that every Python install has (docs/design.md "Correctness comes from outside references")."""
    from pydoc_data import topics

    text = "\n".join(topics.topics.values())
    return "\n".join(line for line in text.splitlines() if line.strip())[:400_000]


def write_sentencepiece(model_dir: Path, vocab_size: int = N_VOCAB) -> Path:
    """A SentencePiece model trained like LLaMA's (bpe, byte_fallback, identity normalization,
    whitespace kept, digits split); writes tokenizer.model and tokenizer_config.json."""
    import io

    import sentencepiece as spm

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_text().splitlines()[:_TRAINING_TEXT_LINES]),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (model_dir / "tokenizer.model").write_bytes(buf.getvalue())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }))
    return model_dir / "tokenizer.model"


_SP_CACHE: dict = {}


def _tokenizer_files(model_dir: Path) -> None:
    # Training takes a second; every checkpoint in a session shares one tokenizer.
    if "bytes" not in _SP_CACHE:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            write_sentencepiece(Path(d))
            _SP_CACHE["bytes"] = {n: (Path(d) / n).read_bytes()
                                  for n in ("tokenizer.model", "tokenizer_config.json")}
    for name, data in _SP_CACHE["bytes"].items():
        (model_dir / name).write_bytes(data)


def llama_config(*, hidden_act="silu", n_head=4, n_head_kv=4, tied=False, n_layer=2, n_embd=64,
                 n_ff=128, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=N_VOCAB, hidden_size=n_embd, intermediate_size=n_ff, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_head_kv, hidden_act=hidden_act,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2, **extra)


def random_llama(config, seed: int = 0):
    """A LlamaForCausalLM with seeded, deliberately non-trivial weights (norm weights not all 1)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
    return model


def save_llama(model_dir: Path, model, *, safe=True) -> Path:
    model_dir = Path(model_dir)
    model.save_pretrained(model_dir, safe_serialization=safe)
    _tokenizer_files(model_dir)
    return model_dir


def edit_config(model_dir: Path, **changes) -> dict:
    """Rewrite keys of config.json (None deletes a key); returns the new config."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg, indent=2))
    return cfg


def make_llama_dir(model_dir: Path, *, seed: int = 0, **cfg_kw):
    """(model, directory): a LlamaForCausalLM saved with tokenizer files."""
    model = random_llama(llama_config(**cfg_kw), seed)
    return model, save_llama(model_dir, model)


def make_fatrelu_dir(model_dir: Path, threshold: float, *, seed: int = 0, **cfg_kw):
    """(reference model, directory): ProSparse's SparseLlama checkpoint (model_type sparsellama,
    hidden_act fatrelu, hidden_act_param t). The reference is the LlamaForCausalLM on the same
    weights with each layer's act_fn replaced by x * (x >= t) (docs/design.md "Correctness comes from outside references")."""
    model = random_llama(llama_config(hidden_act="relu", **cfg_kw), seed)
    save_llama(model_dir, model)
    edit_config(model_dir, architectures=["SparseLlamaForCausalLM"], model_type="sparsellama",
                hidden_act="fatrelu", hidden_act_param=threshold)
    _use_fatrelu(model, threshold)
    return model, Path(model_dir)


def _use_fatrelu(model, threshold: float) -> None:
    import torch

    class FATReLU(torch.nn.Module):
        def forward(self, x):
            return x * (x >= threshold).to(x.dtype)

    for layer in model.model.layers:
        layer.mlp.act_fn = FATReLU()


def make_minicpm_dir(model_dir: Path, *, scale_emb=12.0, scale_depth=1.4, dim_model_base=16,
                     seed: int = 0, hidden_act="silu", hidden_act_param=None, **cfg_kw):
    """(equivalent LlamaForCausalLM, directory): a MiniCPMForCausalLM checkpoint with tied embeddings
    and llama tensor names, and the LlamaForCausalLM that computes the same function (docs/design.md
    "Correctness comes from outside references"): embeddings x scale_emb, o_proj and down_proj x
    residual_scale, and an untied head = embeddings / logit_scale."""
    import torch
    from safetensors.torch import save_file

    cfg = llama_config(tied=False, hidden_act="relu" if hidden_act == "fatrelu" else hidden_act, **cfg_kw)
    base = random_llama(cfg, seed)
    if hidden_act == "fatrelu":
        _use_fatrelu(base, hidden_act_param)
    n_layer, n_embd = cfg.num_hidden_layers, cfg.hidden_size
    residual_scale = scale_depth / math.sqrt(n_layer)
    logit_scale = n_embd / dim_model_base

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    mcfg = {
        "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm",
        "vocab_size": N_VOCAB, "hidden_size": n_embd, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": n_layer, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "hidden_act": hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": True,
        "scale_emb": scale_emb, "scale_depth": scale_depth, "dim_model_base": dim_model_base,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }
    if hidden_act_param is not None:
        mcfg["hidden_act_param"] = hidden_act_param
    (model_dir / "config.json").write_text(json.dumps(mcfg, indent=2))
    _tokenizer_files(model_dir)

    with torch.no_grad():
        emb = base.model.embed_tokens.weight.detach().clone()
        base.model.embed_tokens.weight.copy_(emb * scale_emb)
        base.lm_head.weight.copy_(emb / logit_scale)
        for layer in base.model.layers:
            layer.self_attn.o_proj.weight.mul_(residual_scale)
            layer.mlp.down_proj.weight.mul_(residual_scale)
    return base, model_dir


def unpermute_qk(w, n_head: int):
    """Inverse of llama.cpp's Q/K row permutation, stated directly: within each head, stored rows
    2j and 2j+1 are HF rows j and j + head_dim/2 (HF rotates halves, llama.cpp adjacent pairs)."""
    import numpy as np

    hd = w.shape[0] // n_head
    heads = w.reshape(n_head, hd // 2, 2, *w.shape[1:])
    return np.ascontiguousarray(np.concatenate([heads[:, :, 0], heads[:, :, 1]], axis=1).reshape(w.shape))


def gguf_tensors_f32(path) -> dict:
    """Every tensor of a GGUF file as float32 in numpy order, dequantized by the gguf package."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    r = gguf.GGUFReader(str(path))
    return {t.name: dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
            .astype(np.float32) for t in r.tensors}


def llama_from_gguf(path, config):
    """A LlamaForCausalLM (config as given) holding the weights a converted llama GGUF stores,
    dequantized: the reference for quantized files (docs/design.md: "compare against transformers on the
    same dequantized weights")."""
    import torch
    from transformers import LlamaForCausalLM

    t = gguf_tensors_f32(path)
    sd = {"model.embed_tokens.weight": t["token_embd.weight"], "model.norm.weight": t["output_norm.weight"]}
    sd["lm_head.weight"] = t.get("output.weight", t["token_embd.weight"])
    for i in range(config.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        down = t[b + "ffn_down.weight"] if b + "ffn_down.weight" in t else t[b + "ffn_down_t.weight"].T
        sd.update({
            p + "input_layernorm.weight": t[b + "attn_norm.weight"],
            p + "self_attn.q_proj.weight": unpermute_qk(t[b + "attn_q.weight"], config.num_attention_heads),
            p + "self_attn.k_proj.weight": unpermute_qk(t[b + "attn_k.weight"], config.num_key_value_heads),
            p + "self_attn.v_proj.weight": t[b + "attn_v.weight"],
            p + "self_attn.o_proj.weight": t[b + "attn_output.weight"],
            p + "post_attention_layernorm.weight": t[b + "ffn_norm.weight"],
            p + "mlp.gate_proj.weight": t[b + "ffn_gate.weight"],
            p + "mlp.up_proj.weight": t[b + "ffn_up.weight"],
            p + "mlp.down_proj.weight": down,
        })
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()},
                                                strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def prompt_ids(n: int = 20, seed: int = 0):
    """n token ids, never the specials 0..2, the same every run."""
    import numpy as np

    return [int(x) for x in np.random.default_rng(seed).integers(3, N_VOCAB, n)]


def rel_error(ours, ref) -> float:
    """The error measure of docs/design.md: max |ours - ref| / max |ref| over the whole logits array."""
    import numpy as np

    return float(np.abs(np.asarray(ours) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())


def edited_gguf(src, dest, keys=None, drop_keys=(), drop=(), extra_tensor=None):
    """A copy of the GGUF src with metadata keys set (key -> (value, GGUFValueType[, element type]),
    None deletes it; general.architecture included), the keys starting with a prefix in `drop_keys`
    and the tensors named in `drop` left out, and `extra_tensor` (name, array) added."""
    import gguf
    import numpy as np

    from prosparse_convert.gguf_file import copy_field

    keys = dict(keys or {})
    r = gguf.GGUFReader(str(src))
    arch = keys.pop("general.architecture", (r.fields["general.architecture"].contents(),))[0]
    w = gguf.GGUFWriter(str(dest), arch)
    for k, f in r.fields.items():
        if not k.startswith(("GGUF.", "general.architecture") + tuple(drop_keys)) and k not in keys:
            copy_field(w, f)
    for k, v in keys.items():
        if v is not None:
            w.add_key_value(k, v[0], v[1], sub_type=v[2] if len(v) > 2 else None)
    for t in r.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    if extra_tensor:
        w.add_tensor(*extra_tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(dest)


def powerinfer_file(ours: Path, dest: Path, sparse_threshold: float) -> Path:
    """PowerInfer's layout from one of our relu files: same tensors (ffn_down_t, fc1, fc2), no
    prosparse keys, powerinfer.sparse_threshold, and the magic PWRI."""
    import gguf

    edited_gguf(ours, dest, keys={"powerinfer.sparse_threshold": (sparse_threshold, gguf.GGUFValueType.FLOAT32)},
                drop_keys=("prosparse.",))
    data = bytearray(dest.read_bytes())
    data[:4] = b"PWRI"
    dest.write_bytes(bytes(data))
    return dest


def exact_predictor_dir(model, d):
    """PowerInfer-format predictors whose logit is the gate scaled by a positive factor:
    rank 2*n_embd, fc1 = [I; -I], fc2 = [W_gate diag(ffn_norm), -W_gate diag(ffn_norm)], so that
    fc2 relu(fc1 x) = W_gate diag(w) x = gate(rmsnorm(x)) * rms(x)."""
    import torch

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    for i, layer in enumerate(model.model.layers):
        wg = layer.mlp.gate_proj.weight.detach().float()
        w = layer.post_attention_layernorm.weight.detach().float()
        e = wg.shape[1]
        eye = torch.eye(e)
        fc1 = torch.cat([eye, -eye], 0)
        g = wg * w[None, :]
        fc2 = torch.cat([g, -g], 1)
        torch.save({"fc1.weight": fc1, "fc2.weight": fc2}, d / f"model_{i}.pt")
    return d


def interleaving_changes_no_bit(path, monkeypatch, ids, batch_kw=None, single_kw=None) -> int:
    """Logits of a prompt batch and token by token (n_batch=1), with the interleaved copies the
    loader makes and without them (PROSPARSE_INTERLEAVE=0): all four must be the same bits (a row
    gives the same bits in either layout, cpu/kernels.h). Returns how many matrices the first
    load interleaved (the second must interleave none)."""
    import numpy as np
    from prosparse_rt import Model

    def run():
        with Model(str(path), n_ctx=64, sparsity="dense", kv_type="f32", **(batch_kw or {})) as m:
            batch, n = m.logits(ids), m.stats["n_interleaved"]
        with Model(str(path), n_ctx=64, n_batch=1, sparsity="dense", kv_type="f32", **(single_kw or {})) as m:
            single = m.logits(ids)
        return batch, single, n

    batch, single, n = run()
    monkeypatch.setenv("PROSPARSE_INTERLEAVE", "0")
    batch0, single0, n0 = run()
    assert n0 == 0
    np.testing.assert_array_equal(batch, batch0)
    np.testing.assert_array_equal(single, single0)
    np.testing.assert_array_equal(single, batch)
    return n
