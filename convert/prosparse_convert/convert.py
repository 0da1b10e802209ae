"""From a Source to a GGUF file: choose the output layout (neuron-major `ffn_down_t` for sparse
activations, llama.cpp's `ffn_down` otherwise), move per-neuron tensors together, quantize, and write
atomically (OUT.tmp-<pid>, renamed only when complete; removed when writing fails or is interrupted,
and by the next writer of OUT when a killed process left it)."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUFWriter, GGMLQuantizationType as T

from . import names as N
from . import quant
from .errors import ConvertError
from .powerinfer_dirs import Predictors, read_activation_freq
from .source import Source, open_source

FORMATS = ("prosparse", "llama.cpp")
NEURON_ORDERS = ("original", "frequency")


@dataclass
class Options:
    outtype: str = "f16"
    format: str = "prosparse"           # "llama.cpp": a plain dense file that llama.cpp loads
    predictor: Optional[Path] = None    # PowerInfer predictor directory
    predictor_type: str = "f16"
    predictor_threshold: Optional[float] = None  # cut-off on predictor logits (0 = sigmoid 0.5);
    #                                              None: the input file's, else 0
    activation: Optional[Path] = None   # PowerInfer activation-count directory
    neuron_order: str = "original"
    name: Optional[str] = None
    progress: bool = True


@dataclass
class _Out:
    name: str
    shape: Tuple[int, ...]       # numpy shape
    qtype: T
    produce: Callable[[], np.ndarray]
    # True: produce() returns the tensor's bytes already at qtype (a tensor copied from an input
    # file untouched or with its rows permuted, as prosparse-calibrate does), written as they are
    raw: bool = False


def _check_options(o: Options) -> None:
    quant.outtype(o.outtype)
    if o.predictor_type not in ("f16", "f32", "q8_0", "q4_0"):
        raise ConvertError(f"unsupported predictor type {o.predictor_type!r} (supported: f32, f16, q8_0, q4_0)")
    if o.format not in FORMATS:
        raise ConvertError(f"unsupported format {o.format!r} (supported: {', '.join(FORMATS)})")
    if o.neuron_order not in NEURON_ORDERS:
        raise ConvertError(f"unsupported neuron order {o.neuron_order!r} (supported: {', '.join(NEURON_ORDERS)})")
    if o.format == "llama.cpp":
        extras = [flag for flag, on in (("--predictor", o.predictor), ("--activation", o.activation),
                                        ("--neuron-order frequency", o.neuron_order == "frequency")) if on]
        if extras:
            raise ConvertError(f"--format llama.cpp writes a plain dense file; it cannot take {extras[0]}")


# --- moving a layer's neurons together (docs/design.md, "Neuron order": gate/up rows, ffn_down_t rows, fc2 rows and
# ffn_act_freq alike); prosparse-calibrate's writer uses the same functions

def hottest_first(freq: List[np.ndarray]) -> List[np.ndarray]:
    """Per layer, the new position -> old neuron index map that puts the most often firing neurons
    first. Stable: equally hot neurons keep their relative order, so the result is reproducible."""
    return [np.argsort(-np.asarray(f), kind="stable") for f in freq]


def in_neuron_order(load: Callable[[], np.ndarray], perm: Optional[np.ndarray]) -> Callable[[], np.ndarray]:
    """`load` with its rows (one per neuron) taken in the order `perm` (None: unchanged)."""
    return load if perm is None else (lambda: load()[perm])


def layer_extras(i: int, predictors, freq: Optional[List[np.ndarray]], perm: Optional[np.ndarray],
                 n_embd: int, n_ff: int, pred_want: T) -> List[_Out]:
    """What layer i stores after its down projection: the predictor (fc1, and fc2 whose rows are
    neurons) when `predictors` (.ranks, .layer(i) -> (fc1, fc2)) is given, and the neurons' firing
    frequencies (ffn_act_freq) when `freq` is; both in the order `perm`."""
    outs = []
    if predictors is not None:
        r = predictors.ranks[i]
        fc1_shape, fc2_shape = (r, n_embd), (n_ff, r)
        outs.append(_Out(N.blk(N.FC1, i), fc1_shape, quant.tensor_type(fc1_shape, pred_want),
                         lambda: predictors.layer(i)[0]))
        outs.append(_Out(N.blk(N.FC2, i), fc2_shape, quant.tensor_type(fc2_shape, pred_want),
                         in_neuron_order(lambda: predictors.layer(i)[1], perm)))
    if freq is not None:
        outs.append(_Out(N.blk(N.FFN_ACT_FREQ, i), (n_ff,), T.F32,
                         in_neuron_order(lambda: np.asarray(freq[i], np.float32), perm)))
    return outs


def _layer_perms(src: Source, freq: Optional[List[np.ndarray]], order: str):
    """Per layer, the new position -> old neuron index map (hottest first), or None for no change."""
    n = src.params.n_layer
    if order == "original" or (src.neuron_order == "frequency" and freq is src.act_freq):
        return [None] * n  # nothing asked, or the input is already hottest first
    if freq is None:
        raise ConvertError("--neuron-order frequency needs neuron statistics (--activation DIR)")
    return hottest_first(freq)


def plan_outputs(src: Source, o: Options) -> Tuple[List[_Out], dict]:
    p = src.params
    _check_options(o)
    sparse = p.activation in N.SPARSE_ACTIVATIONS
    if o.format == "llama.cpp" and p.activation != "silu":
        raise ConvertError(f"--format llama.cpp: this is a {p.activation} model, but llama.cpp's "
                           f"{p.arch} computes SiLU; the file would run as a different model")
    predictors = src.predictors
    if o.predictor is not None:
        predictors = Predictors(o.predictor, p.n_layer, p.n_embd, p.n_ff)
    if predictors is not None and not sparse:
        raise ConvertError(f"predictors need a relu or fatrelu model; this one uses {p.activation}")
    freq = src.act_freq
    if o.activation is not None and src.neuron_order == "frequency":
        raise ConvertError("the input's neurons are already reordered (prosparse.neuron_order frequency); "
                           "PowerInfer activation counts refer to the original order")
    if o.activation is not None:
        freq = read_activation_freq(o.activation, p.n_layer, p.n_ff)
    perms = _layer_perms(src, freq, o.neuron_order)
    if o.format == "llama.cpp":
        predictors, freq = None, None
    pred_want = quant.outtype(o.predictor_type)

    def wtype(name, shape):  # llama.cpp's per-tensor choice for the K mixes (quant.mixed_type)
        return quant.mixed_type(o.outtype, name, shape, p.n_layer, p.n_head // p.n_head_kv, p.tied)

    outs: List[_Out] = []
    for name, (shape, load) in src.tensors.items():
        layer = _layer_of(name)
        perm = perms[layer] if layer is not None else None
        if layer is not None and name in (N.blk(N.FFN_GATE, layer), N.blk(N.FFN_UP, layer)):
            outs.append(_Out(name, shape, wtype(name, shape), in_neuron_order(load, perm)))
        elif layer is not None and name == N.blk(N.FFN_DOWN, layer):
            if sparse and o.format == "prosparse":
                # Neuron-major: one contiguous row per neuron, so skipping a neuron skips whole blocks.
                t_shape = (shape[1], shape[0])
                outs.append(_Out(N.blk(N.FFN_DOWN_T, layer), t_shape, wtype(N.blk(N.FFN_DOWN_T, layer), t_shape),
                                 in_neuron_order(lambda load=load: load().T, perm)))
            else:
                f = (lambda load=load, perm=perm: load()[:, perm]) if perm is not None else load
                outs.append(_Out(name, shape, wtype(name, shape), f))
            outs += layer_extras(layer, predictors, freq, perm, p.n_embd, p.n_ff, pred_want)
        else:
            outs.append(_Out(name, shape, wtype(name, shape), load))

    kv = _metadata(src, o, predictors is not None, freq is not None,
                   "frequency" if perms[0] is not None or src.neuron_order == "frequency" else "original")
    return outs, kv


def _layer_of(name: str) -> Optional[int]:
    if not name.startswith("blk."):
        return None
    return int(name.split(".")[1])


def _metadata(src: Source, o: Options, has_predictors: bool, has_freq: bool, order: str) -> dict:
    """Key -> (value, kind); kind is 'u32', 'f32', 'str', 'f32[]'. llama.cpp's types for its keys."""
    p, a = src.params, src.params.arch
    kv = {
        N.GENERAL_NAME: (o.name or p.name, "str"),
        N.GENERAL_FILE_TYPE: (int(quant.FILE_TYPES[o.outtype]), "u32"),
        N.GENERAL_QUANTIZATION_VERSION: (GGML_QUANT_VERSION, "u32"),
        N.key(N.CONTEXT_LENGTH, a): (p.n_ctx, "u32"),
        N.key(N.EMBEDDING_LENGTH, a): (p.n_embd, "u32"),
        N.key(N.BLOCK_COUNT, a): (p.n_layer, "u32"),
        N.key(N.FEED_FORWARD_LENGTH, a): (p.n_ff, "u32"),
        N.key(N.ROPE_DIMENSION_COUNT, a): (p.head_dim, "u32"),
        N.key(N.HEAD_COUNT, a): (p.n_head, "u32"),
        N.key(N.HEAD_COUNT_KV, a): (p.n_head_kv, "u32"),
        N.key(N.RMS_EPS, a): (p.rms_eps, "f32"),
        N.key(N.ROPE_FREQ_BASE, a): (p.rope_theta, "f32"),
        N.key(N.VOCAB_SIZE, a): (p.n_vocab, "u32"),
    }
    if p.rope_linear_factor is not None:
        kv[N.key(N.ROPE_SCALING_TYPE, a)] = ("linear", "str")
        kv[N.key(N.ROPE_SCALING_FACTOR, a)] = (p.rope_linear_factor, "f32")
    if p.arch == "minicpm":
        kv[N.key(N.EMBEDDING_SCALE, a)] = (p.embedding_scale, "f32")
        kv[N.key(N.RESIDUAL_SCALE, a)] = (p.residual_scale, "f32")
        kv[N.key(N.LOGIT_SCALE, a)] = (p.logit_scale, "f32")
    if o.format == "prosparse":
        kv[N.PS_ACTIVATION] = (p.activation, "str")
        if p.activation in N.SPARSE_ACTIVATIONS:
            kv[N.PS_ACTIVATION_THRESHOLD] = (p.act_threshold, "f32")
        if has_freq or order == "frequency":
            kv[N.PS_NEURON_ORDER] = (order, "str")
        if has_predictors and o.predictor_threshold is not None:
            kv[N.PS_PREDICTOR_THRESHOLD] = (o.predictor_threshold, "f32")
        elif has_predictors and N.PS_PREDICTOR_THRESHOLD not in src.extra_kv:
            kv[N.PS_PREDICTOR_THRESHOLD] = (0.0, "f32")
        for k, v in src.extra_kv.items():
            kv.setdefault(k, v)
    return kv


def _add_kv(w: GGUFWriter, kv: dict) -> None:
    for k, (v, kind) in kv.items():
        if kind == "u32":
            w.add_uint32(k, int(v))
        elif kind == "f32":
            w.add_float32(k, float(v))
        elif kind == "str":
            w.add_string(k, str(v))
        elif kind == "f32[]":
            w.add_array(k, [float(x) for x in v])
        else:  # pragma: no cover - a programming error
            raise AssertionError(kind)


def _temporary(out: Path, pid: int) -> Path:
    """Where the process `pid` writes `out` until it is complete."""
    return out.with_name(f"{out.name}.tmp-{pid}")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists (POSIX)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_temporaries(out: Path) -> List[Path]:
    """Remove the temporaries of `out` (OUT.tmp-<pid>) that writers left when they were killed
    (SIGKILL runs no cleanup): only those whose process is gone, since a live one may still be
    writing. Returns the files removed."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return []
    prefix = f"{out.name}.tmp-"
    removed = []
    for p in out.parent.glob(glob.escape(prefix) + "*"):
        pid = p.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_exists(int(pid)) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_gguf(out: Path, src: Source, outs: List[_Out], kv: dict, progress: bool) -> None:
    out = Path(out)
    if out.is_dir():
        raise ConvertError(f"output {out} is a directory")
    if not out.parent.is_dir():
        raise ConvertError(f"output directory {out.parent} does not exist")
    remove_stale_temporaries(out)
    tmp = _temporary(out, os.getpid())
    w = GGUFWriter(tmp, src.params.arch)
    try:
        _add_kv(w, kv)
        src.add_tokenizer(w)  # tokenizer.ggml.* and tokenizer.chat_template (vocab.py)
        for t in outs:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), quant.nbytes(t.shape, t.qtype),
                              raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        from tqdm import tqdm
        # Progress in output bytes: the embedding and FFN matrices dominate the time, not the count.
        bar = tqdm(total=sum(quant.nbytes(t.shape, t.qtype) for t in outs), desc="converting",
                   unit="B", unit_scale=True, disable=not progress)
        for t in outs:
            a = t.produce()
            if t.raw:
                data = np.ascontiguousarray(a)
                if data.nbytes != quant.nbytes(t.shape, t.qtype):
                    raise ConvertError(f"tensor {t.name}: {data.nbytes} bytes, expected "
                                       f"{quant.nbytes(t.shape, t.qtype)} for {list(t.shape)} {t.qtype.name}")
                w.write_tensor_data(data)
                bar.update(data.nbytes)
                continue
            if tuple(a.shape) != tuple(t.shape):
                raise ConvertError(f"tensor {t.name} has shape {list(a.shape)}, expected {list(t.shape)}")
            try:
                data = quant.encode(a, t.qtype)
            except ConvertError as e:
                raise ConvertError(f"tensor {t.name}: {e}") from None
            w.write_tensor_data(data)
            bar.update(data.nbytes)
        bar.close()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        try:
            w.close()
        finally:
            tmp.unlink(missing_ok=True)
        raise


def convert(model, out, options: Optional[Options] = None, **kw) -> Path:
    """Convert MODEL (a Hugging Face directory, a hub id or a GGUF file) into the GGUF file OUT."""
    o = options or Options(**kw)
    _check_options(o)
    from .hf_source import resolve_model
    path = resolve_model(str(model))
    src = open_source(str(path))
    if not Path(str(model)).exists():
        # A hub snapshot's directory is named after a commit hash; the repository name says more.
        src.params.name = str(model).split("/")[-1]
    outs, kv = plan_outputs(src, o)
    write_gguf(Path(out), src, outs, kv, o.progress)
    return Path(out)
