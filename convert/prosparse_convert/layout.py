"""Steps shared by every LLaMA-shaped architecture: Hugging Face tensor names to llama.cpp's, and the
Q/K row permutation for llama.cpp's RoPE."""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np

from . import names as N
from .errors import ConvertError
from .params import ModelParams


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotates the two halves of each head's dimensions (rotate_half); llama.cpp rotates adjacent
    pairs. Interleaving each head's halves makes the two agree: exactly llama.cpp's
    convert_hf_to_gguf.py LlamaModel.permute (called with n_head_kv for K)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


# Tensors some checkpoints carry that the model does not need (recomputed at load time).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_tensor_plan(p: ModelParams) -> List[Tuple[str, str, Tuple[int, ...], Callable]]:
    """(gguf name, HF name, expected numpy shape, transform) for every tensor the model needs."""
    hd = p.head_dim
    ident = lambda w: w  # noqa: E731
    plan = [(N.TOKEN_EMBD, "model.embed_tokens.weight", (p.n_vocab, p.n_embd), ident)]
    for i in range(p.n_layer):
        pre = f"model.layers.{i}."
        plan += [
            (N.blk(N.ATTN_NORM, i), pre + "input_layernorm.weight", (p.n_embd,), ident),
            (N.blk(N.ATTN_Q, i), pre + "self_attn.q_proj.weight", (p.n_head * hd, p.n_embd),
             lambda w: permute_qk(w, p.n_head)),
            (N.blk(N.ATTN_K, i), pre + "self_attn.k_proj.weight", (p.n_head_kv * hd, p.n_embd),
             lambda w: permute_qk(w, p.n_head_kv)),
            (N.blk(N.ATTN_V, i), pre + "self_attn.v_proj.weight", (p.n_head_kv * hd, p.n_embd), ident),
            (N.blk(N.ATTN_OUT, i), pre + "self_attn.o_proj.weight", (p.n_embd, p.n_head * hd), ident),
            (N.blk(N.FFN_NORM, i), pre + "post_attention_layernorm.weight", (p.n_embd,), ident),
            (N.blk(N.FFN_GATE, i), pre + "mlp.gate_proj.weight", (p.n_ff, p.n_embd), ident),
            (N.blk(N.FFN_UP, i), pre + "mlp.up_proj.weight", (p.n_ff, p.n_embd), ident),
            (N.blk(N.FFN_DOWN, i), pre + "mlp.down_proj.weight", (p.n_embd, p.n_ff), ident),
        ]
    plan.append((N.OUTPUT_NORM, "model.norm.weight", (p.n_embd,), ident))
    if not p.tied:
        plan.append((N.OUTPUT, "lm_head.weight", (p.n_vocab, p.n_embd), ident))
    return plan


def check_hf_tensors(store, plan, p: ModelParams) -> None:
    """Every needed tensor present with the shape config.json implies; nothing unexplained left over
    (a bias or an extra layer would otherwise be dropped silently)."""
    wanted: Dict[str, Tuple[int, ...]] = {hf: shape for _, hf, shape, _ in plan}
    for hf, shape in wanted.items():
        if hf not in store:
            if hf == "lm_head.weight":
                raise ConvertError("missing tensor 'lm_head.weight' (config.json says "
                                   "tie_word_embeddings is false)")
            raise ConvertError(f"missing tensor {hf!r} in the checkpoint")
        got = store.shape(hf)
        if got != shape:
            raise ConvertError(f"tensor {hf!r} has shape {list(got)}, but config.json implies {list(shape)}")
    for name in store.names():
        if name in wanted or name.endswith(_IGNORED_SUFFIXES):
            continue
        if p.tied and name == "lm_head.weight":
            continue  # a tied head saved anyway: the runtime uses token_embd
        raise ConvertError(f"unexpected tensor {name!r} in the checkpoint (not part of a "
                           f"{p.n_layer}-layer {p.arch} model without biases)")
