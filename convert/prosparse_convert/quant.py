"""Output weight types: which type each tensor gets, and its bytes (the gguf package's own quantizers,
which follow llama.cpp's block layouts bit for bit; the K-quants and IQ4_NL by our own, kquants.py
and iq4nl.py).

The K-quant outtypes and iq4_nl are llama.cpp's mixes (llama-quant.cpp, llama_tensor_get_type, without an
importance matrix): the output head gets Q6_K, some attn_v and ffn_down layers more bits, and a
matrix whose rows are not whole 256-weight super-blocks falls back to the 32-weight type llama.cpp
picks (Q4_0, Q5_0, Q5_1 or Q8_0)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType
from gguf.quants import quantize

from . import iq4nl, kquants
from .errors import ConvertError

OUTTYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0,
            "q5_0": T.Q5_0, "q5_1": T.Q5_1, "q6_k": T.Q6_K, "q5_k_m": T.Q5_K, "q4_k_m": T.Q4_K,
            "q3_k_m": T.Q3_K, "q2_k": T.Q2_K, "iq4_nl": T.IQ4_NL}
FILE_TYPES = {
    "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0,
    "q5_0": LlamaFileType.MOSTLY_Q5_0, "q5_1": LlamaFileType.MOSTLY_Q5_1, "q6_k": LlamaFileType.MOSTLY_Q6_K,
    "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M, "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
    "q3_k_m": LlamaFileType.MOSTLY_Q3_K_M, "q2_k": LlamaFileType.MOSTLY_Q2_K,
    "iq4_nl": LlamaFileType.MOSTLY_IQ4_NL,
}
K_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
QUANTIZED = (T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1, T.IQ4_NL) + K_TYPES
# llama.cpp's tensor_type_fallback: a K type for rows that are not whole super-blocks.
FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
# The outtypes whose tensors follow llama.cpp's per-tensor choice (mixed_type).
MIXES = ("q5_0", "q5_1", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k", "iq4_nl")
# Rows quantized at once: bounds the f32 temporaries of the gguf quantizer on 7B-sized matrices.
_ROWS_PER_CHUNK = 1024


def outtype(name: str) -> T:
    if name not in OUTTYPES:
        raise ConvertError(f"unsupported output type {name!r} (supported: {', '.join(OUTTYPES)})")
    return OUTTYPES[name]


def tensor_type(shape: Sequence[int], wanted: T) -> T:
    """Norms, frequencies and other 1-D tensors stay F32 (llama.cpp does the same); a matrix whose
    rows do not fill whole blocks takes llama.cpp's fallback type (a K type's 32-weight one), and
    one whose rows are not whole 32-weight blocks either falls back to F16."""
    if len(shape) < 2:
        return T.F32
    if wanted in QUANTIZED and shape[-1] % GGML_QUANT_SIZES[wanted][0]:
        wanted = FALLBACK.get(wanted, wanted)
        if shape[-1] % GGML_QUANT_SIZES[wanted][0]:
            return T.F16
    return wanted


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mixed_type(outtype_name: str, name: str, shape: Sequence[int], n_layer: int, n_gqa: int, tied: bool) -> T:
    """The type of tensor `name` in file type `outtype_name`: llama.cpp's choice for its mixes
    (llama_tensor_get_type_impl without an importance matrix), the plain type otherwise.
    ffn_down_t counts as ffn_down; its rows are n_embd long, so it keeps a K type only where
    n_embd is a multiple of 256."""
    t = outtype(outtype_name)
    if outtype_name not in MIXES or len(shape) < 2 or name.endswith("_norm.weight"):
        return tensor_type(shape, t)
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    role = name.split(".")[-2] if name.startswith("blk.") else name.rsplit(".", 1)[0]
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        t = T.Q8_0 if shape[-1] % GGML_QUANT_SIZES[t][0] else (t if t == T.Q8_0 else T.Q6_K)
    elif role == "attn_v":
        if outtype_name == "q2_k":
            t = T.Q4_K if n_gqa >= 4 else T.Q3_K
        elif outtype_name == "q3_k_m":
            t = T.Q5_K if layer < 2 else T.Q4_K
        elif outtype_name == "iq4_nl" and n_gqa >= 4:
            t = T.Q5_K
        elif outtype_name in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, n_layer):
            t = T.Q6_K
    elif role in ("ffn_down", "ffn_down_t"):
        if outtype_name == "q2_k":
            t = T.Q3_K
        elif outtype_name == "q3_k_m":
            t = T.Q5_K if layer < n_layer // 16 else T.Q4_K
        elif outtype_name == "q4_k_m" and _use_more_bits(layer, n_layer):
            t = T.Q6_K
        elif outtype_name == "iq4_nl" and layer < n_layer // 8:  # llama.cpp: without an importance matrix
            t = T.Q5_K
        elif outtype_name == "q5_k_m" and _use_more_bits(layer, n_layer):
            t = T.Q6_K
    elif role == "attn_output":
        if outtype_name == "q2_k":
            t = T.Q3_K
        elif outtype_name == "q3_k_m":
            t = T.Q4_K
    return tensor_type(shape, t)


def nbytes(shape: Sequence[int], qtype: T) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    assert shape[-1] % block == 0
    return n // block * size


def encode(a: np.ndarray, qtype: T) -> np.ndarray:
    """The tensor's bytes at qtype, as a numpy array whose nbytes is what the GGUF stores."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.all(np.isfinite(a)):
        raise ConvertError("tensor contains NaN or infinity")
    if qtype == T.F32:
        return a
    if qtype == T.F16:
        return a.astype(np.float16)
    if qtype in K_TYPES:
        q = lambda b: kquants.quantize(b, qtype.name)  # noqa: E731
    elif qtype == T.IQ4_NL:
        q = iq4nl.quantize
    else:
        q = lambda b: quantize(b, qtype)  # noqa: E731
    if a.ndim >= 2 and a.shape[0] > _ROWS_PER_CHUNK:
        return np.concatenate([q(a[i:i + _ROWS_PER_CHUNK]) for i in range(0, a.shape[0], _ROWS_PER_CHUNK)], axis=0)
    return q(a)
