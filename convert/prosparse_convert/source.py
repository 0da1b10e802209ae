"""A model to convert, whatever it was read from: hyper-parameters, tensors under llama.cpp's names in
one canonical layout (Q/K rows permuted for llama.cpp's RoPE, `ffn_down` [n_embd, n_ff] as in
Hugging Face, float32 on demand), a way to write its tokenizer, and any per-neuron extras."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from . import hf_source, layout
from . import names as N
from .archs import params_from_config
from .errors import ConvertError
from .params import ModelParams


@dataclass
class Source:
    params: ModelParams
    # gguf name -> (numpy shape, loader returning float32), in llama.cpp's file order
    tensors: Dict[str, Tuple[Tuple[int, ...], Callable[[], np.ndarray]]]
    add_tokenizer: Callable[[object], None]
    act_freq: Optional[List[np.ndarray]] = None          # per layer, from a GGUF input
    predictors: Optional[object] = None                  # .ranks and .layer(i) -> (fc1, fc2)
    neuron_order: str = "original"
    extra_kv: Dict[str, object] = field(default_factory=dict)


def _vocab_writer(model_dir: Path) -> Callable[[object], None]:
    """Writes tokenizer.ggml.* and the chat template from the checkpoint's tokenizer files
    (vocab.py), when the output file is written: a bad tokenizer fails the conversion."""
    def add(writer) -> None:
        from .vocab import add_vocab
        add_vocab(writer, model_dir)
    return add


def open_hf(model_dir: Path) -> Source:
    cfg = hf_source.read_config(model_dir)
    p = params_from_config(cfg, model_dir.resolve().name)
    store = hf_source.open_tensors(model_dir)
    plan = layout.hf_tensor_plan(p)
    layout.check_hf_tensors(store, plan, p)
    tensors = {}
    for gguf_name, hf_name, shape, transform in plan:
        tensors[gguf_name] = (shape, lambda hf_name=hf_name, transform=transform: transform(store.load(hf_name)))
    return Source(params=p, tensors=tensors, add_tokenizer=_vocab_writer(model_dir))


def open_source(model: str) -> Source:
    path = hf_source.resolve_model(model)
    if path.is_dir():
        return open_hf(path)
    if path.suffix == ".gguf" or _is_gguf(path):
        from .gguf_source import open_gguf
        return open_gguf(path)
    raise ConvertError(f"unsupported input {path}: expected a Hugging Face directory, a hub id or a .gguf file")


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in (b"GGUF", b"PWRI")
    except OSError:
        return False


__all__ = ["Source", "open_source", "open_hf", "N"]
