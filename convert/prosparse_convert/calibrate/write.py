"""Writes the calibrated model: the input GGUF with every tensor's bytes and every metadata key kept,
plus what calibration adds (ffn_act_freq, fc1/fc2, prosparse.layer_thresholds, ffn_down_t where the
input had llama.cpp's ffn_down), optionally with each layer's neurons reordered hottest first.
Reordering permutes rows, which quantized tensors allow without re-quantizing (a row is whole
blocks). Written with the converter's writer (convert.write_gguf), atomically."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from .. import names as N
from .. import quant
from ..convert import _Out, hottest_first, in_neuron_order, layer_extras, write_gguf
from ..errors import ConvertError
from ..gguf_file import copy_field, open_gguf_file

# Keys the writer sets itself, or that describe the input file's own layout.
_SKIP_KEYS = (N.GENERAL_ARCHITECTURE, "general.alignment")
_OURS = (N.PS_ACTIVATION, N.PS_ACTIVATION_THRESHOLD, N.PS_LAYER_THRESHOLDS, N.PS_NEURON_ORDER,
         N.PS_PREDICTOR_THRESHOLD, N.PS_PREDICTOR_LAYER_THRESHOLDS, N.PS_PREDICTOR_ALWAYS_ON)


@dataclass
class Additions:
    activation: str                                   # prosparse.activation of the output
    act_threshold: float = 0.0
    act_freq: Optional[List[np.ndarray]] = None       # per layer [n_ff], input neuron order
    predictors: Optional[List[tuple]] = None          # per layer (fc1 [R, E], fc2 [n_ff, R])
    predictor_type: str = "q8_0"
    predictor_threshold: float = 0.0
    predictor_layer_thresholds: Optional[List[float]] = None  # per-layer logit cut-offs
    predictor_always_on: Optional[List[int]] = None  # per layer, neurons [0, k) of the output always run
    layer_thresholds: Optional[List[float]] = None
    neuron_order: str = "original"                    # "frequency": reorder by act_freq
    neuron_perms: Optional[List[np.ndarray]] = None   # with "frequency": per layer new -> old index, instead of
                                                      # hottest first (calibration's pinned neurons first)
    down_type: str = "q8_0"                           # ffn_down_t made from ffn_down: f16 or q8_0
    extra: Dict[str, object] = field(default_factory=dict)


class InputFile:
    """The input GGUF's fields and tensors (raw bytes as stored), via the converter's reader."""

    def __init__(self, path: Path) -> None:
        self.reader = open_gguf_file(path)
        self.powerinfer = self.reader.powerinfer
        self.path = Path(path)
        self.fields = self.reader.fields
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.get(N.GENERAL_ARCHITECTURE)

    def get(self, key, default=None):
        f = self.fields.get(key)
        return default if f is None else f.contents()


def _shape(t) -> tuple:
    return tuple(int(d) for d in reversed(t.shape))


def _raw(t, perm: Optional[np.ndarray]):
    """The tensor's stored bytes, rows (whole quant blocks) in the order `perm`."""
    def rows():
        d = np.asarray(t.data)
        return d.reshape(d.shape[0], -1)
    return (lambda: np.asarray(t.data)) if perm is None else in_neuron_order(rows, perm)


class _Trained:
    """Trained predictors [(fc1, fc2)] per layer, as layer_extras takes them."""

    def __init__(self, layers: List[tuple]) -> None:
        self._layers, self.ranks = layers, [fc1.shape[0] for fc1, _ in layers]

    def layer(self, i: int) -> tuple:
        return self._layers[i]


def _dequant(t) -> np.ndarray:
    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(_shape(t))


def plan(inp: InputFile, add: Additions, n_layer: int, n_ff: int) -> List[_Out]:
    """Output tensors in the input's order, each layer's additions after its down projection."""
    perms: List[Optional[np.ndarray]] = [None] * n_layer
    if add.neuron_order == "frequency":
        if add.act_freq is None:
            raise ConvertError("--neuron-order frequency needs activation frequencies")
        perms = hottest_first(add.act_freq) if add.neuron_perms is None else list(add.neuron_perms)
    replaced = set()
    if add.predictors is not None:
        replaced |= {N.blk(k, i) for i in range(n_layer) for k in (N.FC1, N.FC2)}
    if add.act_freq is not None:
        replaced |= {N.blk(N.FFN_ACT_FREQ, i) for i in range(n_layer)}
    per_neuron_rows = {N.FFN_GATE, N.FFN_UP, N.FFN_DOWN_T, N.FC2}
    templates = {N.blk(k, i): (k, i) for i in range(n_layer)
                 for k in (N.FFN_GATE, N.FFN_UP, N.FFN_DOWN, N.FFN_DOWN_T, N.FC1, N.FC2, N.FFN_ACT_FREQ)}
    pred_want = quant.outtype(add.predictor_type)
    predictors = _Trained(add.predictors) if add.predictors is not None else None
    outs: List[_Out] = []
    for name, t in inp.tensors.items():
        if name in replaced:
            continue
        kind, i = templates.get(name, (None, None))
        shape, qtype = _shape(t), T(int(t.tensor_type))
        perm = perms[i] if i is not None else None
        if kind == N.FFN_DOWN:
            # llama.cpp's [n_embd, n_ff] becomes neuron-major ffn_down_t (docs/design.md "The down projection")
            t_shape = (shape[1], shape[0])
            want = quant.tensor_type(t_shape, quant.outtype(add.down_type))

            outs.append(_Out(N.blk(N.FFN_DOWN_T, i), t_shape, want,
                             in_neuron_order(lambda t=t: np.ascontiguousarray(_dequant(t).T), perm)))
        elif kind == N.FFN_ACT_FREQ:
            outs.append(_Out(name, shape, qtype, in_neuron_order(lambda t=t: _dequant(t), perm)))
        elif kind in per_neuron_rows:
            outs.append(_Out(name, shape, qtype, _raw(t, perm), raw=True))
        else:
            outs.append(_Out(name, shape, qtype, _raw(t, None), raw=True))
        if kind in (N.FFN_DOWN, N.FFN_DOWN_T):
            n_embd = shape[1] if kind == N.FFN_DOWN_T else shape[0]
            outs += layer_extras(i, predictors, add.act_freq, perm, n_embd, n_ff, pred_want)
    return outs


def metadata(inp: InputFile, add: Additions, n_layer: int) -> dict:
    kv = {N.PS_ACTIVATION: (add.activation, "str")}
    if add.activation in N.SPARSE_ACTIVATIONS:
        kv[N.PS_ACTIVATION_THRESHOLD] = (add.act_threshold, "f32")
    lt = add.layer_thresholds if add.layer_thresholds is not None else inp.get(N.PS_LAYER_THRESHOLDS)
    if lt is not None:
        if len(lt) != n_layer:
            raise ConvertError(f"{len(lt)} layer thresholds for {n_layer} layers")
        kv[N.PS_LAYER_THRESHOLDS] = ([float(v) for v in lt], "f32[]")
    order = "frequency" if add.neuron_order == "frequency" else inp.get(N.PS_NEURON_ORDER, "original")
    if add.act_freq is not None or order == "frequency":
        kv[N.PS_NEURON_ORDER] = (order, "str")
    has_pred = add.predictors is not None or N.blk(N.FC1, 0) in inp.tensors
    if add.predictors is not None:
        kv[N.PS_PREDICTOR_THRESHOLD] = (add.predictor_threshold, "f32")
        layer_thr, always_on = add.predictor_layer_thresholds, add.predictor_always_on
    elif has_pred:
        pthr = inp.get(N.PS_PREDICTOR_THRESHOLD, inp.get(N.PWI_SPARSE_THRESHOLD, 0.0))
        kv[N.PS_PREDICTOR_THRESHOLD] = (float(pthr), "f32")
        # the input's cut-offs follow its predictors; its prefix counts hold only in its own order
        layer_thr = inp.get(N.PS_PREDICTOR_LAYER_THRESHOLDS)
        always_on = inp.get(N.PS_PREDICTOR_ALWAYS_ON) if add.neuron_order == "original" else None
    if has_pred:
        if layer_thr is not None:
            if len(layer_thr) != n_layer or not all(np.isfinite(v) for v in layer_thr):
                raise ConvertError(f"{N.PS_PREDICTOR_LAYER_THRESHOLDS}: need {n_layer} finite cut-offs, got {list(layer_thr)}")
            kv[N.PS_PREDICTOR_LAYER_THRESHOLDS] = ([float(v) for v in layer_thr], "f32[]")
        if always_on is not None:
            if len(always_on) != n_layer:
                raise ConvertError(f"{N.PS_PREDICTOR_ALWAYS_ON}: need {n_layer} counts, got {len(always_on)}")
            kv[N.PS_PREDICTOR_ALWAYS_ON] = ([int(v) for v in always_on], "i32[]")
    kv.update(add.extra)
    return kv


class _Copy:
    """What write_gguf needs of a Source: the architecture, and a hook that writes the keys it does
    not set itself: here every input key not overridden, with its own GGUF type."""

    def __init__(self, inp: InputFile, overridden) -> None:
        class P:
            arch = inp.arch
        self.params = P()
        self._inp, self._over = inp, set(overridden)

    def add_tokenizer(self, w) -> None:
        for key, f in self._inp.fields.items():
            if key.startswith("GGUF.") or key in _SKIP_KEYS or key in self._over:
                continue
            copy_field(w, f)


def write(inp: InputFile, out: Path, add: Additions, n_layer: int, n_ff: int, progress: bool = True) -> Path:
    outs = plan(inp, add, n_layer, n_ff)
    kv = metadata(inp, add, n_layer)
    write_gguf(Path(out), _Copy(inp, set(kv) | set(_OURS)), outs, kv, progress)
    return Path(out)


def patch_predictor_cutoffs(path: Path, cutoffs: List[float]) -> None:
    """Rewrites prosparse.predictor.layer_thresholds of a written file in place (same length: the
    values change, nothing moves), so that cut-offs chosen on the file's own predict runs land in it."""
    from gguf import GGUFReader

    r = GGUFReader(str(path), "r+")
    f = r.fields.get(N.PS_PREDICTOR_LAYER_THRESHOLDS)
    if f is None or len(f.data) != len(cutoffs):
        raise ConvertError(f"{path} has no {N.PS_PREDICTOR_LAYER_THRESHOLDS} of {len(cutoffs)} entries to rewrite")
    for i, di in enumerate(f.data):
        f.parts[di][...] = np.float32(cutoffs[i])
    r.data.flush()
    del r
