"""Synthetic LLaMA-2-7B-shaped GGUF files with random weights, written straight as quant blocks.

An f32 7B model (27 GB) does not fit in this machine's memory, and converting one would take
longer than the benchmark; speed depends only on shapes and weight types, so random blocks do.
The scales are chosen so that every matrix-vector product keeps unit-order activations
(weights of standard deviation ~1/sqrt(fan_in)), and the vocabulary is a minimal valid
SentencePiece-style ("llama") one so that llama.cpp and prosparse-rt both load the file.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GENERATOR_VERSION = 1  # bump when the bytes written change, so stale cached files are not reused


@dataclass(frozen=True)
class Shape:
    n_embd: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_head_kv: int = 32
    n_ff: int = 11008
    n_vocab: int = 32000
    n_ctx: int = 4096


LLAMA2_7B = Shape()

# bytes per block of 32 weights, and the standard deviation of the integer part of a weight
_QTYPES = {
    "q4_0": (18, np.sqrt(((np.arange(16) - 8.0) ** 2).mean())),  # values -8..7
    "q8_0": (34, np.sqrt((np.arange(-127, 128, dtype=np.float64) ** 2).mean())),
}
_FILE_TYPE = {"q4_0": 2, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("PROSPARSE_BENCH_CACHE", Path(base) / "prosparse-bench"))


def quant_blocks(rng: np.random.Generator, n_rows: int, n_cols: int, qtype: str,
                 std) -> np.ndarray:
    """Random rows of llama.cpp blocks as a uint8 array [n_rows, bytes_per_row] whose weights
    have roughly the given standard deviation and mean zero (scales vary by ±25% block to
    block, with random signs)."""
    if n_cols % 32:
        raise ValueError(f"row length {n_cols} is not a multiple of the block size 32")
    bsize, qstd = _QTYPES[qtype]
    nb = n_rows * (n_cols // 32)
    out = np.empty((nb, bsize), dtype=np.uint8)
    # random signs: Q4_0's integers -8..7 have mean -0.5, which a negative scale cancels on average
    # std may be one value or one per row
    row_std = np.broadcast_to(np.asarray(std, dtype=np.float64).reshape(-1, 1), (n_rows, n_cols // 32))
    d = (row_std.reshape(-1) / qstd) * rng.uniform(0.75, 1.25, size=nb) * rng.choice([-1.0, 1.0], size=nb)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(nb, 2)
    if qtype == "q4_0":
        out[:, 2:] = rng.integers(0, 256, size=(nb, 16), dtype=np.uint8)
    else:  # int8 in -127..127 (llama.cpp's quantizer never writes -128)
        out[:, 2:] = rng.integers(-127, 128, size=(nb, 32), dtype=np.int8).view(np.uint8)
    return out.reshape(n_rows, (n_cols // 32) * bsize)


def _vocab(n_vocab: int):
    """<unk> <s> </s>, the 256 byte tokens (llama.cpp looks up <0x0A> for newline), then unique
    word pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, BYTE (gguf.TokenType)
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(tokens) < n_vocab:
        # base-26 words, with and without the SentencePiece space marker
        w, k = "", i
        while True:
            w = letters[k % 26] + w
            k = k // 26 - 1
            if k < 0:
                break
        tokens.append(w if i % 2 else "\u2581" + w)
        types.append(1)
        i += 1
    scores = [0.0] * 259 + [-float(j) for j in range(n_vocab - 259)]
    return tokens[:n_vocab], scores, types[:n_vocab]


def _add_model_keys(w, name: str, shape: Shape, qtype: str) -> None:
    """general.* and llama.* hyper-parameters of a random `shape` model stored as `qtype`."""
    w.add_name(name)
    w.add_context_length(shape.n_ctx)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_rope_dimension_count(shape.n_embd // shape.n_head)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(_FILE_TYPE[qtype])
    w.add_uint32("prosparse_bench.generator_version", GENERATOR_VERSION)


def _add_vocab(w, n_vocab: int) -> None:
    """tokenizer.ggml.* of the minimal SentencePiece-style vocabulary (`_vocab`)."""
    tokens, scores, types = _vocab(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def tensor_plan(shape: Shape):
    """(name, numpy shape [rows, cols], kind) for every tensor, llama.cpp's names and order."""
    E, F, V = shape.n_embd, shape.n_ff, shape.n_vocab
    kv = E * shape.n_head_kv // shape.n_head
    plan = [("token_embd.weight", (V, E), "embd")]
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", (E,), "norm"),
                 (p + "attn_q.weight", (E, E), "w"), (p + "attn_k.weight", (kv, E), "w"),
                 (p + "attn_v.weight", (kv, E), "w"), (p + "attn_output.weight", (E, E), "w"),
                 (p + "ffn_norm.weight", (E,), "norm"),
                 (p + "ffn_gate.weight", (F, E), "w"), (p + "ffn_up.weight", (F, E), "w"),
                 (p + "ffn_down.weight", (E, F), "w")]
    plan += [("output_norm.weight", (E,), "norm"), ("output.weight", (V, E), "w")]
    return plan


def file_size_estimate(shape: Shape, qtype: str) -> int:
    bsize = _QTYPES[qtype][0]
    total = 0
    for _, s, kind in tensor_plan(shape):
        total += 4 * s[0] if kind == "norm" else s[0] * s[1] // 32 * bsize
    return total + 2_000_000  # metadata and vocabulary



def _check_disk(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need + (1 << 30):
        raise RuntimeError(f"not enough free disk in {folder}: {need / 1e9:.1f} GB needed "
                           f"(+1 GB margin), {free / 1e9:.1f} GB free")


@contextlib.contextmanager
def _atomic_file(path: Path):
    """A temporary file beside `path`, renamed to it when the block completes, removed if it fails:
    never a half-written model in the cache."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is as readable as any download
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_dense(path: Path, shape: Shape = LLAMA2_7B, qtype: str = "q4_0", seed: int = 0,
                progress=None) -> Path:
    """Write a dense SiLU llama GGUF with random `qtype` weights, streaming tensor by tensor
    (peak memory: one tensor). Written to a temporary file, renamed when complete."""
    import gguf

    if qtype not in _QTYPES:
        raise ValueError(f"unsupported weight type {qtype!r} (choose from {sorted(_QTYPES)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    need = file_size_estimate(shape, qtype)
    _check_disk(path.parent, need)
    rng = np.random.default_rng(seed)
    gtype = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}[qtype]
    bsize = _QTYPES[qtype][0]
    with _atomic_file(path) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        _add_model_keys(w, f"random llama-2-7b shape {qtype} seed {seed}", shape, qtype)
        _add_vocab(w, shape.n_vocab)
        plan = tensor_plan(shape)
        for name, s, kind in plan:
            if kind == "norm":
                w.add_tensor_info(name, s, np.dtype(np.float32), 4 * s[0])
            else:
                bshape = (s[0], s[1] // 32 * bsize)
                w.add_tensor_info(name, bshape, np.dtype(np.uint8), bshape[0] * bshape[1], gtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (name, s, kind) in enumerate(plan):
            if kind == "norm":
                data = np.ones(s, dtype=np.float32)
            else:
                # embeddings of unit scale (RMSNorm follows); matrices ~1/sqrt(fan_in)
                std = 1.0 if kind == "embd" else 1.0 / np.sqrt(s[1])
                data = quant_blocks(rng, s[0], s[1], qtype, std)
            w.write_tensor_data(data)
            if progress:
                progress(i + 1, len(plan), name)
        w.close()
    return path


def dense_7b(qtype: str = "q4_0", generate: bool = True, seed: int = 0, progress=None) -> Path:
    """The cached LLaMA-2-7B-shaped random model, generated on first request."""
    path = cache_dir() / f"llama2-7b-shape-random-{qtype}-s{seed}-v{GENERATOR_VERSION}.gguf"
    return _cached(path, generate, lambda: write_dense(path, LLAMA2_7B, qtype, seed, progress))


def _cached(path: Path, generate: bool, write) -> Path:
    """path if it was generated before, else write() when generating is allowed."""
    if path.is_file():
        return path
    if not generate:
        raise FileNotFoundError(f"{path} not generated yet (run with --gen)")
    return write()


# --- a FATReLU model whose activations are sparse by construction --------------------------------

def firing_probabilities(rng: np.random.Generator, n_ff: int, mean: float = 0.11) -> np.ndarray:
    """Per-neuron firing probabilities, hottest first, skewed as in real ReLU LLMs (a few neurons
    fire for many tokens, most rarely): Beta(a, b) with mean `mean` and a = 0.5, sorted. Capped
    at 0.45: a zero-mean gate crosses a positive threshold for less than half the tokens."""
    a = 0.5
    b = a * (1 - mean) / mean
    p = np.sort(rng.beta(a, b, size=n_ff))[::-1]
    for _ in range(20):  # cap, then restore the mean on the rest
        p = np.clip(p * (mean / p.mean()), 1e-4, 0.45)
    return p


def sparse_plan_stats(shape: Shape, qtype: str, rank: int, pred_qtype: str) -> dict:
    """Bytes per token the strategies should read (for sanity checks against Model.stats)."""
    bsize = _QTYPES[qtype][0]
    E, F, V = shape.n_embd, shape.n_ff, shape.n_vocab
    mat = lambda r, c, bs=bsize: r * c // 32 * bs  # noqa: E731
    attn = shape.n_layer * (2 * mat(E, E) + 2 * mat(E * shape.n_head_kv // shape.n_head, E))
    ffn = shape.n_layer * 3 * mat(F, E)
    pred = shape.n_layer * (mat(rank, E, _QTYPES[pred_qtype][0]) + mat(F, rank, _QTYPES[pred_qtype][0]))
    return {"attention_and_output": attn + mat(V, E), "ffn_dense": ffn, "predictor": pred}


def write_fatrelu(path: Path, shape: Shape = LLAMA2_7B, qtype: str = "q4_0", seed: int = 0,
                  sparsity: float = 0.89, threshold: float = 0.01, rank: int = 1024,
                  pred_qtype: str = "q4_0", predicted: float = 0.20, progress=None) -> Path:
    """A LLaMA-2-7B-shaped FATReLU GGUF in prosparse-rt's sparse layout (docs/design.md "The GGUF contract"):
    neurons in frequency order, `ffn_down_t` instead of `ffn_down`, `ffn_act_freq`, and a
    rank-`rank` predictor (`fc1`, `fc2`) stored as `pred_qtype`.

    How the sparsity is made: the gate input h is RMS-normalised, so with random rows the gate
    pre-activation of neuron i is close to N(0, (sigma_i * sqrt(n_embd))^2). Choosing the row scale
    sigma_i = t / (z_i sqrt(n_embd)), z_i the standard normal quantile of 1 - p_i, makes the neuron
    fire (gate >= t) with probability p_i; the p_i are skewed (`firing_probabilities`) with mean
    1 - `sparsity`.

    The predictor: with cut-off 0 (sigmoid 0.5) the predicted set depends only on the direction of
    its input, whatever the residual stream's scale. fc2 rows are noise plus a constant c_i, and for
    r = relu(fc1 x) with Gaussian pre-activations sum(r)/|r| ~ sqrt(R/pi), so
    c_i = sigma_n sqrt(pi/R) Phi^-1(q_i) predicts neuron i with probability ~q_i; q_i follows the
    firing frequency, scaled to a mean of `predicted`. It is a random predictor: its recall on
    these weights means nothing, only how many neurons it selects (and so the bytes read) does.
    """
    import gguf
    from statistics import NormalDist

    for q in (qtype, pred_qtype):
        if q not in _QTYPES:
            raise ValueError(f"unsupported weight type {q!r} (choose from {sorted(_QTYPES)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    st = sparse_plan_stats(shape, qtype, rank, pred_qtype)
    need = st["attention_and_output"] + st["ffn_dense"] + st["predictor"] + 2 * shape.n_vocab * shape.n_embd
    _check_disk(path.parent, need)
    rng = np.random.default_rng(seed)
    GT = gguf.GGMLQuantizationType
    gtype = {"q4_0": GT.Q4_0, "q8_0": GT.Q8_0}
    E, F, R = shape.n_embd, shape.n_ff, rank
    nd = NormalDist()
    inv = np.vectorize(nd.inv_cdf)

    with _atomic_file(path) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        _add_model_keys(w, f"random llama-2-7b shape fatrelu {qtype} seed {seed}", shape, qtype)
        w.add_string("prosparse.activation", "fatrelu")
        w.add_float32("prosparse.activation_threshold", threshold)
        w.add_string("prosparse.neuron_order", "frequency")
        w.add_float32("prosparse.predictor.threshold", 0.0)
        _add_vocab(w, shape.n_vocab)

        plan = []  # (name, numpy shape, make())
        for name, s, kind in tensor_plan(shape):
            if name.endswith("ffn_down.weight"):
                i = name.split(".")[1]
                # neuron-major: row n is neuron n's column of the down projection
                plan.append((f"blk.{i}.ffn_down_t.weight", (F, E), "down_t"))
                plan.append((f"blk.{i}.fc1.weight", (R, E), "fc1"))
                plan.append((f"blk.{i}.fc2.weight", (F, R), "fc2"))
                plan.append((f"blk.{i}.ffn_act_freq", (F,), "freq"))
            else:
                plan.append((name, s, kind))
        for name, s, kind in plan:
            if kind in ("norm", "freq"):
                w.add_tensor_info(name, s, np.dtype(np.float32), 4 * s[0])
            else:
                q = pred_qtype if kind in ("fc1", "fc2") else qtype
                bshape = (s[0], s[1] // 32 * _QTYPES[q][0])
                w.add_tensor_info(name, bshape, np.dtype(np.uint8), bshape[0] * bshape[1], gtype[q])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()

        p = None
        for k, (name, s, kind) in enumerate(plan):
            if kind == "norm":
                data = np.ones(s, dtype=np.float32)
            elif kind == "freq":
                data = p.astype(np.float32)
            if kind == "w" and name.endswith("ffn_gate.weight"):
                p = firing_probabilities(rng, F, 1.0 - sparsity)
                z = inv(1.0 - p)
                data = quant_blocks(rng, F, E, qtype, threshold / (z * np.sqrt(E)))
            elif kind in ("w", "embd", "down_t"):
                fan_in = {"embd": None, "down_t": F}.get(kind, s[1])
                std = 1.0 if fan_in is None else 1.0 / np.sqrt(fan_in)
                data = quant_blocks(rng, s[0], s[1], qtype, std)
            elif kind == "fc1":
                data = quant_blocks(rng, R, E, pred_qtype, 1.0 / np.sqrt(E))
            elif kind == "fc2":
                qi = np.clip(p * (predicted / p.mean()), 1e-3, 0.999)
                sigma_n = 1.0 / np.sqrt(R)
                c = sigma_n * np.sqrt(np.pi / R) * inv(qi)
                f = (rng.standard_normal((F, R), dtype=np.float32) * sigma_n + c[:, None]).astype(np.float32)
                data = gguf.quants.quantize(f, gtype[pred_qtype])
            w.write_tensor_data(data)
            if progress:
                progress(k + 1, len(plan), name)
        w.close()
    return path


def fatrelu_7b(qtype: str = "q4_0", generate: bool = True, seed: int = 0, progress=None,
               rank: int = 1024) -> Path:
    """The cached FATReLU LLaMA-2-7B-shaped model with a rank-`rank` predictor (the sparse
    strategies' benchmark; other ranks compare what predictor size costs), generated on request."""
    if rank < 1 or rank % 32:
        raise ValueError(f"predictor rank must be a positive multiple of 32, got {rank}")
    suffix = "" if rank == 1024 else f"-r{rank}"
    path = cache_dir() / f"llama2-7b-shape-fatrelu-{qtype}{suffix}-s{seed}-v{GENERATOR_VERSION}.gguf"
    return _cached(path, generate, lambda: write_fatrelu(path, LLAMA2_7B, qtype, seed, rank=rank,
                                                         progress=progress))
