"""A GGUF file as input (ours, llama.cpp's or PowerInfer's): read with the gguf package, dequantized
to float32 so that it can be requantized, relaid out (ffn_down <-> ffn_down_t) or given predictors.

PowerInfer files start with the magic `PWRI` instead of `GGUF` and carry no prosparse keys: they are
ReLU models (t = 0) whose `powerinfer.sparse_threshold`, if any, is the predictor cut-off
(DESIGN.md "Compatibility"). A plain llama.cpp file without prosparse keys is SiLU, as in llama.cpp.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from gguf.quants import dequantize

from . import names as N
from .errors import ConvertError
from .gguf_file import copy_field, open_gguf_file
from .params import ModelParams
from .source import Source

def _per_layer(template: str, i: int) -> str:
    return N.blk(template, i)


def open_gguf(path: Path) -> Source:
    r = open_gguf_file(path)
    powerinfer = r.powerinfer
    fields = r.fields

    def get(key, default=None):
        f = fields.get(key)
        return default if f is None else f.contents()

    arch = get(N.GENERAL_ARCHITECTURE)
    if arch not in ("llama", "minicpm"):
        raise ConvertError(f"unsupported architecture in {path.name}: general.architecture {arch!r} "
                           f"(supported: llama, minicpm)")
    tensors = {t.name: t for t in r.tensors}
    if N.TOKEN_EMBD not in tensors:
        raise ConvertError(f"{path.name}: missing tensor {N.TOKEN_EMBD}")

    def k(template):
        return N.key(template, arch)

    def need(template):
        v = get(k(template))
        if v is None:
            raise ConvertError(f"{path.name}: missing key {k(template)}")
        return v

    n_embd, n_head = int(need(N.EMBEDDING_LENGTH)), int(need(N.HEAD_COUNT))
    n_vocab = int(tensors[N.TOKEN_EMBD].shape[1])
    activation = get(N.PS_ACTIVATION, "relu" if powerinfer else "silu")
    if activation not in N.ACTIVATIONS:
        raise ConvertError(f"{path.name}: unsupported activation {activation!r}")
    scaling = get(k(N.ROPE_SCALING_TYPE), "none")
    if scaling not in ("none", "linear"):
        raise ConvertError(f"{path.name}: unsupported rope scaling type {scaling!r} (supported: none, linear)")
    factor = float(get(k(N.ROPE_SCALING_FACTOR), 1.0)) if scaling == "linear" else None
    p = ModelParams(
        arch=arch, name=str(get(N.GENERAL_NAME, path.stem)),
        n_vocab=n_vocab, n_ctx=int(get(k(N.CONTEXT_LENGTH), 2048)), n_embd=n_embd,
        n_layer=int(need(N.BLOCK_COUNT)), n_ff=int(need(N.FEED_FORWARD_LENGTH)),
        n_head=n_head, n_head_kv=int(get(k(N.HEAD_COUNT_KV), n_head)),
        rms_eps=float(get(k(N.RMS_EPS), 1e-5)), rope_theta=float(get(k(N.ROPE_FREQ_BASE), 10000.0)),
        rope_linear_factor=None if factor in (None, 1.0) else factor,
        activation=activation,
        act_threshold=float(get(N.PS_ACTIVATION_THRESHOLD, 0.0)) if activation == "fatrelu" else 0.0,
        tied=N.OUTPUT not in tensors,
    )
    if n_embd % n_head or n_head % p.n_head_kv:
        raise ConvertError(f"{path.name}: head counts {n_head}/{p.n_head_kv} do not divide {n_embd}")
    rope_dims = get(k(N.ROPE_DIMENSION_COUNT), p.head_dim)
    if rope_dims != p.head_dim:
        raise ConvertError(f"{path.name}: partial RoPE ({rope_dims} of {p.head_dim} dimensions) is unsupported")
    if arch == "minicpm":
        p.embedding_scale = float(need(N.EMBEDDING_SCALE))
        p.residual_scale = float(need(N.RESIDUAL_SCALE))
        p.logit_scale = float(need(N.LOGIT_SCALE))

    def shape_of(t) -> tuple:
        return tuple(int(d) for d in reversed(t.shape))

    def loader(t):
        def load():
            try:
                a = dequantize(t.data, t.tensor_type)
            except NotImplementedError as e:
                raise ConvertError(f"{path.name}: tensor {t.name} has type {t.tensor_type.name}, which "
                                   f"the gguf package cannot dequantize") from e
            return np.asarray(a, dtype=np.float32).reshape(shape_of(t))
        return load

    hd, kv = p.head_dim, p.n_head_kv * p.head_dim
    expected = {N.TOKEN_EMBD: (p.n_vocab, n_embd), N.OUTPUT_NORM: (n_embd,)}
    if not p.tied:
        expected[N.OUTPUT] = (p.n_vocab, n_embd)
    used = set()
    canonical: Dict[str, tuple] = {}

    def take(name, shape, transposed_from=None):
        src_name = transposed_from or name
        if src_name not in tensors:
            raise ConvertError(f"{path.name}: missing tensor {src_name}")
        t = tensors[src_name]
        got = shape_of(t)
        want = shape if transposed_from is None else shape[::-1]
        if got != tuple(want):
            raise ConvertError(f"{path.name}: tensor {src_name} has shape {list(got)}, expected {list(want)}")
        used.add(src_name)
        load = loader(t)
        canonical[name] = (shape, (lambda load=load: np.ascontiguousarray(load().T)) if transposed_from else load)

    take(N.TOKEN_EMBD, expected[N.TOKEN_EMBD])
    for i in range(p.n_layer):
        b = lambda tpl: _per_layer(tpl, i)  # noqa: E731
        take(b(N.ATTN_NORM), (n_embd,))
        take(b(N.ATTN_Q), (n_head * hd, n_embd))
        take(b(N.ATTN_K), (kv, n_embd))
        take(b(N.ATTN_V), (kv, n_embd))
        take(b(N.ATTN_OUT), (n_embd, n_head * hd))
        take(b(N.FFN_NORM), (n_embd,))
        take(b(N.FFN_GATE), (p.n_ff, n_embd))
        take(b(N.FFN_UP), (p.n_ff, n_embd))
        if b(N.FFN_DOWN) in tensors:
            take(b(N.FFN_DOWN), (n_embd, p.n_ff))
        else:
            take(b(N.FFN_DOWN), (n_embd, p.n_ff), transposed_from=b(N.FFN_DOWN_T))
    take(N.OUTPUT_NORM, (n_embd,))
    if not p.tied:
        take(N.OUTPUT, (p.n_vocab, n_embd))

    predictors = _FilePredictors.find(tensors, p, path.name, used, shape_of, loader)
    act_freq = None
    if _per_layer(N.FFN_ACT_FREQ, 0) in tensors:
        act_freq = []
        for i in range(p.n_layer):
            name = _per_layer(N.FFN_ACT_FREQ, i)
            if name not in tensors or shape_of(tensors[name]) != (p.n_ff,):
                raise ConvertError(f"{path.name}: {name} missing or not [{p.n_ff}]")
            used.add(name)
            act_freq.append(loader(tensors[name])())
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise ConvertError(f"{path.name}: unexpected tensor {unknown[0]!r} "
                           f"(not part of a {p.n_layer}-layer {arch} model)")

    extra_kv = {}
    lt = get(N.PS_LAYER_THRESHOLDS)
    if lt is not None:
        extra_kv[N.PS_LAYER_THRESHOLDS] = (lt, "f32[]")
    pthr = get(N.PS_PREDICTOR_THRESHOLD, get(N.PWI_SPARSE_THRESHOLD))
    if pthr is not None and predictors is not None:
        extra_kv[N.PS_PREDICTOR_THRESHOLD] = (float(pthr), "f32")
    order = get(N.PS_NEURON_ORDER, "original")
    if order not in ("original", "frequency"):
        raise ConvertError(f"{path.name}: unknown prosparse.neuron_order {order!r}")

    tok_fields = [(key, f) for key, f in fields.items() if key.startswith("tokenizer.")]

    def add_tokenizer(w) -> None:
        for _, f in tok_fields:
            copy_field(w, f)

    return Source(params=p, tensors=canonical, add_tokenizer=add_tokenizer, act_freq=act_freq,
                  predictors=predictors, neuron_order=order, extra_kv=extra_kv)


class _FilePredictors:
    """Predictors already in a GGUF (fc1/fc2 per layer), in the interface of powerinfer_dirs.Predictors."""

    def __init__(self, ranks: List[int], loads: List[tuple]) -> None:
        self.ranks, self._loads = ranks, loads

    def layer(self, i: int):
        return self._loads[i][0](), self._loads[i][1]()

    @classmethod
    def find(cls, tensors, p: ModelParams, fname: str, used: set, shape_of, loader) -> Optional["_FilePredictors"]:
        if _per_layer(N.FC1, 0) not in tensors:
            return None
        ranks, loads = [], []
        for i in range(p.n_layer):
            f1, f2 = _per_layer(N.FC1, i), _per_layer(N.FC2, i)
            if f1 not in tensors or f2 not in tensors:
                raise ConvertError(f"{fname}: predictor tensors {f1}/{f2} missing (layer {i})")
            s1, s2 = shape_of(tensors[f1]), shape_of(tensors[f2])
            if len(s1) != 2 or s1[1] != p.n_embd or s2 != (p.n_ff, s1[0]):
                raise ConvertError(f"{fname}: predictor shapes {list(s1)} / {list(s2)} in layer {i} do not "
                                   f"match n_embd {p.n_embd}, n_ff {p.n_ff}")
            used.update((f1, f2))
            ranks.append(s1[0])
            loads.append((loader(tensors[f1]), loader(tensors[f2])))
        return cls(ranks, loads)


