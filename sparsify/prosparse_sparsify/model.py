"""Loading LLaMA-family and MiniCPM checkpoints for training, the FATReLU activation with the
statistics ProSparse needs, and writing the ProSparse-style output directory.

Every architecture trains as a transformers ``LlamaForCausalLM``:

- LLaMA / SparseLlama directories (config.json + safetensors or pytorch_model*.bin) load as is.
- A llama GGUF (SmolLM2's) loads through transformers' own GGUF reader (dequantized to f32, Q/K
  un-permuted by transformers); its tokenizer is re-saved with ``save_pretrained`` so the output
  directory has a tokenizer.json.
- MiniCPM (remote code upstream) is a LlamaForCausalLM plus forward hooks for its three scale
  factors, which keeps MiniCPM's own parameterization (tied embeddings included) during training, so
  the trained weights are written back under MiniCPM's config unchanged:
  h0 = embed × scale_emb; attention and FFN branch outputs × scale_depth / sqrt(n_layer) before the
  residual add; logits = head(norm(h)) / (hidden_size / dim_model_base).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from prosparse_convert.activations import activation

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "SparseLlamaForCausalLM": "llama",
    "MiniCPMForCausalLM": "minicpm",
}
MODEL_TYPES = {"llama": "llama", "sparsellama": "llama", "minicpm": "minicpm"}
INPUT_ACTIVATIONS = ("silu", "relu", "fatrelu")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
# keys of config.json that are not LlamaConfig arguments, or that we set ourselves
_NOT_LLAMA_KEYS = {"architectures", "model_type", "auto_map", "hidden_act_param", "hidden_act",
                   "scale_emb", "scale_depth", "dim_model_base", "transformers_version"}


class FATReLU(nn.Module):
    """FATReLU(x) = x where x >= t, else 0 (t = 0 is ReLU). Counts zeros of its output while
    ``record`` is on: the fraction of inactive FFN neurons is the sparsity ProSparse reports."""

    def __init__(self, threshold: float = 0.0):
        super().__init__()
        self.threshold = float(threshold)
        self.record = False
        self.zeros = 0
        self.count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = activation("fatrelu", x, self.threshold)
        if self.record:
            with torch.no_grad():
                self.zeros += int((y == 0).sum())
                self.count += y.numel()
        return y

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


class Sparsifier:
    """Owns the per-layer FATReLU modules and the L1 term on x1 = act(gate) ⊙ up.

    L1 reduction (the paper does not say): for each layer, the mean of |x1| over every token and
    every neuron; the regularizer is the sum of these over layers (the paper's "Σ over layers").
    The mean keeps λ independent of batch size, sequence length and FFN width, so the paper's λ
    values are of the right magnitude for any model (an element-wise sum would make λ = 0.2 on a 7B
    model thousands of times the LM loss)."""

    def __init__(self, model: nn.Module):
        self.layers = list(model.model.layers)
        self.acts: List[FATReLU] = []
        self._l1: List[torch.Tensor] = []
        self.collect_l1 = False
        for layer in self.layers:
            act = FATReLU(0.0)
            layer.mlp.act_fn = act
            self.acts.append(act)
            layer.mlp.down_proj.register_forward_pre_hook(self._capture)

    def _capture(self, module, inputs):
        if self.collect_l1:
            self._l1.append(inputs[0].float().abs().mean())

    def set_threshold(self, t: float) -> None:
        for a in self.acts:
            a.threshold = float(t)

    def start(self, l1: bool = False) -> None:
        self._l1 = []
        self.collect_l1 = l1
        for a in self.acts:
            a.record, a.zeros, a.count = True, 0, 0

    def stop(self) -> None:
        self.collect_l1 = False
        for a in self.acts:
            a.record = False

    def l1(self) -> torch.Tensor:
        if not self._l1:
            raise RuntimeError("no FFN activations captured (start(l1=True) before the forward pass)")
        out = torch.stack(self._l1).sum()
        self._l1 = []
        return out

    def sparsity(self) -> float:
        count = sum(a.count for a in self.acts)
        return sum(a.zeros for a in self.acts) / count if count else float("nan")

    def layer_sparsity(self) -> List[float]:
        return [a.zeros / a.count if a.count else float("nan") for a in self.acts]


@dataclass
class Loaded:
    model: nn.Module            # LlamaForCausalLM, SiLU still in place
    tokenizer: object
    arch: str                   # "llama" | "minicpm"
    source: Path
    source_config: Dict         # config.json as read (or derived from the GGUF)
    gguf: bool = False
    tied: bool = True
    minicpm_scales: Optional[Dict[str, float]] = None
    hooks: list = field(default_factory=list)


def _read_config(path: Path) -> Dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{path} has no config.json (expected a Hugging Face model directory or a .gguf file)")
    with open(cfg_path) as f:
        return json.load(f)


def detect_arch(cfg: Dict) -> str:
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    mt = cfg.get("model_type")
    if not archs and mt in MODEL_TYPES:
        return MODEL_TYPES[mt]
    raise ValueError(
        f"unsupported architecture {archs or mt!r}: prosparse-sparsify handles "
        f"{', '.join(ARCHITECTURES)} (model_type {', '.join(MODEL_TYPES)})")


def _llama_config(cfg: Dict, arch: str):
    from transformers import LlamaConfig

    act = cfg.get("hidden_act", "silu")
    if act not in INPUT_ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {act!r}: expected one of {', '.join(INPUT_ACTIVATIONS)}")
    kwargs = {k: v for k, v in cfg.items() if k not in _NOT_LLAMA_KEYS}
    kwargs["hidden_act"] = "silu"  # replaced by FATReLU (or kept, for the dense teacher)
    if arch == "minicpm":
        kwargs.setdefault("tie_word_embeddings", True)  # MiniCPM ties unless it says otherwise
    return LlamaConfig(**kwargs)


def _load_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files: List[Path] = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        idx = path / index_name
        if idx.is_file():
            with open(idx) as f:
                files = [path / n for n in sorted(set(json.load(f)["weight_map"].values()))]
            break
    if not files:
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"{path} has no weights (*.safetensors or pytorch_model*.bin)")
    sd: Dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            sd.update(load_file(str(f)))
        else:
            sd.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return sd


def _assign(model: nn.Module, sd: Dict[str, torch.Tensor], tied: bool, source: Path) -> None:
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    res = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [k for k in res.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or res.unexpected_keys:
        raise ValueError(f"{source}: weights do not match the config: missing {missing[:5]}, "
                         f"unexpected {list(res.unexpected_keys)[:5]}")
    if tied:
        model.tie_weights()


def _minicpm_hooks(model: nn.Module, cfg: Dict) -> (Dict[str, float], list):
    n_layer = cfg["num_hidden_layers"]
    scales = {
        "scale_emb": float(cfg.get("scale_emb", 1.0)),
        "residual_scale": float(cfg.get("scale_depth", 1.0)) / math.sqrt(n_layer),
        "logit_scale": float(cfg["hidden_size"]) / float(cfg.get("dim_model_base", cfg["hidden_size"])),
    }

    def mul(c):
        return lambda module, inputs, output: output * c

    hooks = [model.model.embed_tokens.register_forward_hook(mul(scales["scale_emb"]))]
    for layer in model.model.layers:
        hooks.append(layer.self_attn.o_proj.register_forward_hook(mul(scales["residual_scale"])))
        hooks.append(layer.mlp.down_proj.register_forward_hook(mul(scales["residual_scale"])))
    hooks.append(model.lm_head.register_forward_hook(mul(1.0 / scales["logit_scale"])))
    return scales, hooks


class SentencePieceTokenizer:
    """Just enough of a tokenizer for training data (ids with BOS as tokenizer_config says, EOS id),
    straight from tokenizer.model: transformers 5 converts SentencePiece models to its fast
    tokenizers only with protobuf installed, and training needs nothing more than this."""

    def __init__(self, model_dir: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
        tc = {}
        if (model_dir / "tokenizer_config.json").is_file():
            with open(model_dir / "tokenizer_config.json") as f:
                tc = json.load(f)
        self.add_bos = bool(tc.get("add_bos_token", True))
        self.add_eos = bool(tc.get("add_eos_token", False))
        self.bos_token_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_token_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    def __call__(self, text: str):
        ids = self.sp.encode(text)
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        if self.add_eos and self.eos_token_id is not None:
            ids = ids + [self.eos_token_id]
        return {"input_ids": ids}

    def save_pretrained(self, out_dir: str) -> None:
        raise ValueError("a bare SentencePiece tokenizer is copied, not re-saved")


def load_tokenizer(model_dir: Path):
    """tokenizer.json through transformers; a directory with only tokenizer.model (LLaMA, MiniCPM)
    through sentencepiece itself."""
    from transformers import AutoTokenizer

    if not (model_dir / "tokenizer.json").is_file() and (model_dir / "tokenizer.model").is_file():
        return SentencePieceTokenizer(model_dir)
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise ValueError(f"{model_dir}: cannot load its tokenizer ({e})") from None


def load(source: str | os.PathLike) -> Loaded:
    """A Hugging Face directory (LLaMA, SparseLlama, MiniCPM) or a llama-architecture .gguf file."""
    from transformers import LlamaForCausalLM

    src = Path(source)
    if not src.exists():
        raise ValueError(f"model not found: {src}")
    if src.is_file() and src.suffix == ".gguf":
        return _load_gguf(src)
    if not src.is_dir():
        raise ValueError(f"{src}: expected a Hugging Face model directory or a .gguf file")
    cfg = _read_config(src)
    arch = detect_arch(cfg)
    config = _llama_config(cfg, arch)
    model = LlamaForCausalLM(config)
    tied = bool(config.tie_word_embeddings)
    _assign(model, _load_state_dict(src), tied, src)
    scales, hooks = (None, [])
    if arch == "minicpm":
        scales, hooks = _minicpm_hooks(model, cfg)
    return Loaded(model, load_tokenizer(src), arch, src, cfg, False, tied, scales, hooks)


def _load_gguf(path: Path) -> Loaded:
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    reader = GGUFReader(str(path))
    field_ = reader.fields.get("general.architecture")
    gguf_arch = bytes(field_.parts[field_.data[0]]).decode() if field_ else None
    if gguf_arch != "llama":
        raise ValueError(f"unsupported architecture {gguf_arch!r} in {path}: only 'llama' GGUF files can be sparsified")
    del reader
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    config.hidden_act = "silu"
    model = LlamaForCausalLM(config)
    # transformers' own reader: dequantizes every tensor and undoes llama.cpp's Q/K permutation.
    # (from_pretrained(gguf_file=...) would do the same but insists on `accelerate`.)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    tied = bool(config.tie_word_embeddings)
    _assign(model, tensors, tied, path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    cfg = config.to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    return Loaded(model, tokenizer, "llama", path, cfg, True, tied, None, [])


def clone_dense(loaded: Loaded) -> nn.Module:
    """A frozen copy of the original (SiLU) model for distillation; MiniCPM hooks re-attached."""
    from transformers import LlamaForCausalLM

    teacher = LlamaForCausalLM(loaded.model.config)
    teacher.load_state_dict(loaded.model.state_dict())
    if loaded.tied:
        teacher.tie_weights()
    if loaded.arch == "minicpm":
        _minicpm_hooks(teacher, loaded.source_config)
    teacher.eval().requires_grad_(False)
    return teacher


def _llama_out_config(loaded: Loaded, threshold: float, dtype: torch.dtype) -> Dict:
    cfg = loaded.model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "architectures", "model_type", "auto_map",
              "dtype", "torch_dtype", "output_attentions", "output_hidden_states", "use_return_dict"):
        cfg.pop(k, None)
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]  # as ProSparse releases and older readers expect
    if rope.get("rope_type", "default") not in ("default", None) and "rope_scaling" not in cfg:
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    out = {"architectures": ["SparseLlamaForCausalLM"], "model_type": "sparsellama"}
    out.update(cfg)
    return out


def save(loaded: Loaded, out_dir: str | os.PathLike, threshold: float,
         dtype: torch.dtype = torch.float32, extra: Optional[Dict] = None,
         hidden_act: str = "fatrelu") -> Path:
    """The ProSparse release layout: config.json (hidden_act fatrelu, hidden_act_param t),
    model.safetensors, tokenizer files. `hidden_act` other than fatrelu (the dense baseline) keeps
    the original LLaMA/MiniCPM config and writes no hidden_act_param."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in loaded.model.state_dict().items()
          if not k.endswith("rotary_emb.inv_freq")}
    if loaded.tied:
        sd.pop("lm_head.weight", None)
    tmp = out / "model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")

    dtype_name = str(dtype).replace("torch.", "")
    if loaded.arch == "minicpm":
        cfg = dict(loaded.source_config)
    else:
        cfg = _llama_out_config(loaded, threshold, dtype)
        if hidden_act != "fatrelu":
            cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    cfg["hidden_act"] = hidden_act
    if hidden_act == "fatrelu":
        cfg["hidden_act_param"] = float(threshold)
    else:
        cfg.pop("hidden_act_param", None)
    cfg["tie_word_embeddings"] = loaded.tied
    cfg["torch_dtype"] = dtype_name
    if extra:
        cfg.update(extra)
    with open(out / "config.json", "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=False)

    copied = []
    if not loaded.gguf:
        for name in TOKENIZER_FILES:
            if (loaded.source / name).is_file():
                shutil.copyfile(loaded.source / name, out / name)
                copied.append(name)
        if loaded.arch == "minicpm":  # keep the remote code next to its config
            for py in loaded.source.glob("*.py"):
                shutil.copyfile(py, out / py.name)
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        loaded.tokenizer.save_pretrained(str(out))
    return out
