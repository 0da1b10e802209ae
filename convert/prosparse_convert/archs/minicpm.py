"""MiniCPM / MiniCPM-S: LLaMA weights plus three scales, written unfolded as llama.cpp does
(convert_hf_to_gguf.py MiniCPMModel): h0 = embd * embedding_scale, each branch * residual_scale
before its residual add, logits = head(norm(h)) / logit_scale."""

import math

from ..errors import ConvertError
from ..params import ModelParams, _float, llama_params

HF_CLASSES = ("MiniCPMForCausalLM",)
HF_MODEL_TYPES = ("minicpm",)


def params(cfg: dict, name: str) -> ModelParams:
    for k in ("scale_emb", "scale_depth", "dim_model_base"):
        if k not in cfg:
            raise ConvertError(f"config.json: MiniCPM needs {k}")
    p = llama_params(cfg, "minicpm", name)
    p.embedding_scale = _float(cfg, "scale_emb")
    p.residual_scale = _float(cfg, "scale_depth") / math.sqrt(p.n_layer)
    dim_model_base = _float(cfg, "dim_model_base")
    if dim_model_base <= 0:
        raise ConvertError(f"config.json: dim_model_base must be > 0, got {dim_model_base}")
    p.logit_scale = p.n_embd / dim_model_base
    # MiniCPM's own config class ties the head by default.
    p.tied = bool(cfg.get("tie_word_embeddings", True))
    return p
