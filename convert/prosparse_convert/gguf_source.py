"""A GGUF file as input (ours, llama.cpp's or PowerInfer's): read with the gguf package, dequantized
to float32 so that it can be requantized, relaid out (ffn_down <-> ffn_down_t) or given predictors.

PowerInfer files start with the magic `PWRI` instead of `GGUF` and carry no prosparse keys: they are
ReLU models (t = 0) whose `powerinfer.sparse_threshold`, if any, is the predictor cut-off
(docs/design.md "Compatibility"). A plain llama.cpp file without prosparse keys is SiLU, as in llama.cpp.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Set

import numpy as np
from gguf.quants import dequantize

from . import names as N
from .errors import ConvertError
from .gguf_file import copy_field, open_gguf_file
from .params import ModelParams
from .source import Source


def open_gguf(path: Path) -> Source:
    """The GGUF file as a Source: hyper-parameters, the model's tensors in the canonical layout,
    any predictors and neuron statistics, the keys to keep; every tensor accounted for."""
    f = _File(Path(path))
    p = _params(f)
    tensors = _model_tensors(f, p)
    predictors = _FilePredictors.find(f, p)
    act_freq = _act_freq(f, p)
    unknown = sorted(set(f.tensors) - f.used)
    if unknown:
        raise ConvertError(f"{f.name}: unexpected tensor {unknown[0]!r} "
                           f"(not part of a {p.n_layer}-layer {p.arch} model)")
    order = f.get(N.PS_NEURON_ORDER, "original")
    if order not in ("original", "frequency"):
        raise ConvertError(f"{f.name}: unknown prosparse.neuron_order {order!r}")
    return Source(params=p, tensors=tensors, add_tokenizer=_tokenizer_copier(f), act_freq=act_freq,
                  predictors=predictors, neuron_order=order, extra_kv=_extra_kv(f, predictors is not None))


class _File:
    """The input file's keys and tensors, and which tensors the model has claimed so far (any left
    over at the end are refused rather than dropped)."""

    def __init__(self, path: Path) -> None:
        r = open_gguf_file(path)
        self.name, self.powerinfer, self.fields = path.name, r.powerinfer, r.fields
        self.tensors = {t.name: t for t in r.tensors}
        self.used: Set[str] = set()
        self.arch = self.get(N.GENERAL_ARCHITECTURE)
        if self.arch not in ("llama", "minicpm"):
            raise ConvertError(f"unsupported architecture in {self.name}: general.architecture {self.arch!r} "
                               f"(supported: llama, minicpm)")

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.contents()

    def arch_key(self, template: str, default=None):
        """An architecture key (llama.*, minicpm.*) by its template."""
        return self.get(N.key(template, self.arch), default)

    def need(self, template: str):
        v = self.arch_key(template)
        if v is None:
            raise ConvertError(f"{self.name}: missing key {N.key(template, self.arch)}")
        return v

    def shape(self, name: str) -> tuple:
        """A tensor's numpy shape (GGUF lists dimensions fastest first)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape))

    def loader(self, name: str) -> Callable[[], np.ndarray]:
        """Reads the tensor as float32 in its numpy shape, when called."""
        t = self.tensors[name]

        def load():
            try:
                a = dequantize(t.data, t.tensor_type)
            except NotImplementedError as e:
                raise ConvertError(f"{self.name}: tensor {t.name} has type {t.tensor_type.name}, which "
                                   f"the gguf package cannot dequantize") from e
            return np.asarray(a, dtype=np.float32).reshape(self.shape(name))
        return load


def _params(f: _File) -> ModelParams:
    """The hyper-parameters, from llama.cpp's keys and ours. PowerInfer files carry no prosparse
    keys and are ReLU; a llama.cpp file without them is SiLU."""
    if N.TOKEN_EMBD not in f.tensors:
        raise ConvertError(f"{f.name}: missing tensor {N.TOKEN_EMBD}")
    n_embd, n_head = int(f.need(N.EMBEDDING_LENGTH)), int(f.need(N.HEAD_COUNT))
    activation = f.get(N.PS_ACTIVATION, "relu" if f.powerinfer else "silu")
    if activation not in N.ACTIVATIONS:
        raise ConvertError(f"{f.name}: unsupported activation {activation!r}")
    scaling = f.arch_key(N.ROPE_SCALING_TYPE, "none")
    if scaling not in ("none", "linear"):
        raise ConvertError(f"{f.name}: unsupported rope scaling type {scaling!r} (supported: none, linear)")
    factor = float(f.arch_key(N.ROPE_SCALING_FACTOR, 1.0)) if scaling == "linear" else None
    p = ModelParams(
        arch=f.arch, name=str(f.get(N.GENERAL_NAME, Path(f.name).stem)),
        n_vocab=f.shape(N.TOKEN_EMBD)[0], n_ctx=int(f.arch_key(N.CONTEXT_LENGTH, 2048)), n_embd=n_embd,
        n_layer=int(f.need(N.BLOCK_COUNT)), n_ff=int(f.need(N.FEED_FORWARD_LENGTH)),
        n_head=n_head, n_head_kv=int(f.arch_key(N.HEAD_COUNT_KV, n_head)),
        rms_eps=float(f.arch_key(N.RMS_EPS, 1e-5)), rope_theta=float(f.arch_key(N.ROPE_FREQ_BASE, 10000.0)),
        rope_linear_factor=None if factor in (None, 1.0) else factor,
        activation=activation,
        act_threshold=float(f.get(N.PS_ACTIVATION_THRESHOLD, 0.0)) if activation == "fatrelu" else 0.0,
        tied=N.OUTPUT not in f.tensors,
    )
    if n_embd % n_head or n_head % p.n_head_kv:
        raise ConvertError(f"{f.name}: head counts {n_head}/{p.n_head_kv} do not divide {n_embd}")
    rope_dims = f.arch_key(N.ROPE_DIMENSION_COUNT, p.head_dim)
    if rope_dims != p.head_dim:
        raise ConvertError(f"{f.name}: partial RoPE ({rope_dims} of {p.head_dim} dimensions) is unsupported")
    if f.arch == "minicpm":
        p.embedding_scale = float(f.need(N.EMBEDDING_SCALE))
        p.residual_scale = float(f.need(N.RESIDUAL_SCALE))
        p.logit_scale = float(f.need(N.LOGIT_SCALE))
    return p


def _model_tensors(f: _File, p: ModelParams) -> Dict[str, tuple]:
    """The model's tensors in the canonical layout (Source.tensors), shapes checked: llama.cpp's
    ffn_down [n_embd, n_ff], transposed back from our neuron-major ffn_down_t where that is stored."""
    canonical: Dict[str, tuple] = {}

    def take(name, shape, stored_as=None):
        src = stored_as or name
        if src not in f.tensors:
            raise ConvertError(f"{f.name}: missing tensor {src}")
        want = shape if stored_as is None else shape[::-1]
        if f.shape(src) != tuple(want):
            raise ConvertError(f"{f.name}: tensor {src} has shape {list(f.shape(src))}, expected {list(want)}")
        f.used.add(src)
        load = f.loader(src)
        canonical[name] = (shape, (lambda: np.ascontiguousarray(load().T)) if stored_as else load)

    E, hd, kv = p.n_embd, p.head_dim, p.n_head_kv * p.head_dim
    take(N.TOKEN_EMBD, (p.n_vocab, E))
    for i in range(p.n_layer):
        b = lambda tpl: N.blk(tpl, i)  # noqa: E731
        take(b(N.ATTN_NORM), (E,))
        take(b(N.ATTN_Q), (p.n_head * hd, E))
        take(b(N.ATTN_K), (kv, E))
        take(b(N.ATTN_V), (kv, E))
        take(b(N.ATTN_OUT), (E, p.n_head * hd))
        take(b(N.FFN_NORM), (E,))
        take(b(N.FFN_GATE), (p.n_ff, E))
        take(b(N.FFN_UP), (p.n_ff, E))
        take(b(N.FFN_DOWN), (E, p.n_ff), None if b(N.FFN_DOWN) in f.tensors else b(N.FFN_DOWN_T))
    take(N.OUTPUT_NORM, (E,))
    if not p.tied:
        take(N.OUTPUT, (p.n_vocab, E))
    return canonical


def _act_freq(f: _File, p: ModelParams) -> Optional[List[np.ndarray]]:
    """Per layer, the neurons' firing frequencies (ffn_act_freq), if the file has them."""
    if N.blk(N.FFN_ACT_FREQ, 0) not in f.tensors:
        return None
    freq = []
    for i in range(p.n_layer):
        name = N.blk(N.FFN_ACT_FREQ, i)
        if name not in f.tensors or f.shape(name) != (p.n_ff,):
            raise ConvertError(f"{f.name}: {name} missing or not [{p.n_ff}]")
        f.used.add(name)
        freq.append(f.loader(name)())
    return freq


def _extra_kv(f: _File, has_predictors: bool) -> dict:
    """Our keys that the output keeps: SiLU layer thresholds, and the predictor cut-off (ours, or
    PowerInfer's sparse_threshold) when there are predictors."""
    extra = {}
    lt = f.get(N.PS_LAYER_THRESHOLDS)
    if lt is not None:
        extra[N.PS_LAYER_THRESHOLDS] = (lt, "f32[]")
    pthr = f.get(N.PS_PREDICTOR_THRESHOLD, f.get(N.PWI_SPARSE_THRESHOLD))
    if pthr is not None and has_predictors:
        extra[N.PS_PREDICTOR_THRESHOLD] = (float(pthr), "f32")
    return extra


def _tokenizer_copier(f: _File) -> Callable[[object], None]:
    """Writes the input's tokenizer.* keys unchanged, each with its own GGUF type."""
    tok_fields = [field for key, field in f.fields.items() if key.startswith("tokenizer.")]

    def add_tokenizer(w) -> None:
        for field in tok_fields:
            copy_field(w, field)
    return add_tokenizer


class _FilePredictors:
    """Predictors already in a GGUF (fc1/fc2 per layer), in the interface of powerinfer_dirs.Predictors."""

    def __init__(self, ranks: List[int], loads: List[tuple]) -> None:
        self.ranks, self._loads = ranks, loads

    def layer(self, i: int):
        return self._loads[i][0](), self._loads[i][1]()

    @classmethod
    def find(cls, f: _File, p: ModelParams) -> Optional["_FilePredictors"]:
        if N.blk(N.FC1, 0) not in f.tensors:
            return None
        ranks, loads = [], []
        for i in range(p.n_layer):
            f1, f2 = N.blk(N.FC1, i), N.blk(N.FC2, i)
            if f1 not in f.tensors or f2 not in f.tensors:
                raise ConvertError(f"{f.name}: predictor tensors {f1}/{f2} missing (layer {i})")
            s1, s2 = f.shape(f1), f.shape(f2)
            if len(s1) != 2 or s1[1] != p.n_embd or s2 != (p.n_ff, s1[0]):
                raise ConvertError(f"{f.name}: predictor shapes {list(s1)} / {list(s2)} in layer {i} do not "
                                   f"match n_embd {p.n_embd}, n_ff {p.n_ff}")
            f.used.update((f1, f2))
            ranks.append(s1[0])
            loads.append((f.loader(f1), f.loader(f2)))
        return cls(ranks, loads)
