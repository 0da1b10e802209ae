"""Output weight types: which type each tensor gets, and its bytes (the gguf package's own quantizers,
which follow llama.cpp's block layouts bit for bit)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType
from gguf.quants import quantize

from .errors import ConvertError

OUTTYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}
FILE_TYPES = {
    "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0,
}
QUANTIZED = (T.Q8_0, T.Q4_0)
# Rows quantized at once: bounds the f32 temporaries of the gguf quantizer on 7B-sized matrices.
_ROWS_PER_CHUNK = 1024


def outtype(name: str) -> T:
    if name not in OUTTYPES:
        raise ConvertError(f"unsupported output type {name!r} (supported: {', '.join(OUTTYPES)})")
    return OUTTYPES[name]


def tensor_type(shape: Sequence[int], wanted: T) -> T:
    """Norms, frequencies and other 1-D tensors stay F32 (llama.cpp does the same); a matrix whose
    rows do not fill whole 32-weight blocks cannot be block-quantized and falls back to F16."""
    if len(shape) < 2:
        return T.F32
    if wanted in QUANTIZED:
        block = GGML_QUANT_SIZES[wanted][0]
        if shape[-1] % block:
            return T.F16
    return wanted


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
    if a.ndim >= 2 and a.shape[0] > _ROWS_PER_CHUNK:
        return np.concatenate([quantize(a[i:i + _ROWS_PER_CHUNK], qtype)
                               for i in range(0, a.shape[0], _ROWS_PER_CHUNK)], axis=0)
    return quantize(a, qtype)
