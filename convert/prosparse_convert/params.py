"""Model hyper-parameters as the GGUF file states them, and the config.json reading shared by all
architectures (every supported one is LLaMA-shaped; an architecture module says how it differs)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .errors import ConvertError


@dataclass
class ModelParams:
    arch: str                    # general.architecture: "llama" or "minicpm"
    name: str
    n_vocab: int
    n_ctx: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    rms_eps: float
    rope_theta: float
    rope_linear_factor: Optional[float]  # None: no RoPE scaling
    activation: str              # silu | relu | fatrelu
    act_threshold: float         # FATReLU keeps x >= t; 0 for relu and silu
    tied: bool                   # no output tensor: the head is token_embd
    embedding_scale: Optional[float] = None   # minicpm only
    residual_scale: Optional[float] = None
    logit_scale: Optional[float] = None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _int(cfg: dict, key: str, default=None) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConvertError(f"config.json: {key} must be a positive integer, got {v!r}")
    return v


def _float(cfg: dict, key: str, default=None) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConvertError(f"config.json: {key} must be a finite number, got {v!r}")
    return float(v)


def parse_activation(cfg: dict):
    """(activation, threshold) from hidden_act / hidden_act_param (ProSparse's SparseLlama names)."""
    act = cfg.get("hidden_act", "silu")
    if act in ("silu", "swish"):
        return "silu", 0.0
    if act == "relu":
        return "relu", 0.0
    if act == "fatrelu":
        if "hidden_act_param" not in cfg:
            raise ConvertError("config.json: hidden_act fatrelu needs hidden_act_param (the threshold t)")
        t = _float(cfg, "hidden_act_param")
        if t < 0:
            raise ConvertError(f"config.json: hidden_act_param (FATReLU threshold) must be >= 0, got {t}")
        return "fatrelu", t
    raise ConvertError(f"unsupported activation: hidden_act {act!r} (supported: silu, relu, fatrelu)")


def _rope(cfg: dict):
    """(rope_theta, linear factor or None). transformers 5 nests both under rope_parameters."""
    rp = cfg.get("rope_parameters") or {}
    rs = cfg.get("rope_scaling") or {}
    if not isinstance(rp, dict) or not isinstance(rs, dict):
        raise ConvertError("config.json: rope_scaling / rope_parameters must be objects")
    theta = cfg.get("rope_theta", rp.get("rope_theta", 10000.0))
    theta = _float({"rope_theta": theta}, "rope_theta")
    scaling = rs or rp
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        factor = _float(scaling, "factor")
        if factor <= 0:
            raise ConvertError(f"config.json: linear rope scaling factor must be > 0, got {factor}")
        return theta, (None if factor == 1.0 else factor)
    raise ConvertError(f"unsupported rope_scaling type {kind!r} (supported: none, linear)")


def llama_params(cfg: dict, arch: str, name: str) -> ModelParams:
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ConvertError(f"unsupported: config.json sets {flag}=true (biases are not supported)")
    n_embd = _int(cfg, "hidden_size")
    n_head = _int(cfg, "num_attention_heads")
    n_head_kv = _int(cfg, "num_key_value_heads", n_head)
    if n_embd % n_head:
        raise ConvertError(f"config.json: hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != n_embd // n_head:
        raise ConvertError(f"unsupported: head_dim {head_dim} differs from hidden_size/num_attention_heads "
                           f"= {n_embd // n_head}")
    if n_head % n_head_kv:
        raise ConvertError(f"config.json: num_attention_heads {n_head} is not a multiple of "
                           f"num_key_value_heads {n_head_kv}")
    if (n_embd // n_head) % 2:
        raise ConvertError(f"config.json: head dimension {n_embd // n_head} is odd; RoPE needs pairs")
    theta, factor = _rope(cfg)
    activation, t = parse_activation(cfg)
    return ModelParams(
        arch=arch, name=name,
        n_vocab=_int(cfg, "vocab_size"),
        n_ctx=_int(cfg, "max_position_embeddings", 2048),
        n_embd=n_embd,
        n_layer=_int(cfg, "num_hidden_layers"),
        n_ff=_int(cfg, "intermediate_size"),
        n_head=n_head, n_head_kv=n_head_kv,
        rms_eps=_float(cfg, "rms_norm_eps", 1e-6),
        rope_theta=theta, rope_linear_factor=factor,
        activation=activation, act_threshold=t,
        tied=bool(cfg.get("tie_word_embeddings", False)),
    )
