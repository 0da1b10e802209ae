"""Random blocks of the weight types the gguf package can dequantize but not quantize (the
K-quants, IQ4_NL), for the kernel and conversion tests: every code and packed-scale bit a random
pattern, the fp16 scale fields finite, so that every field of a layout is exercised."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants

# Byte offsets of each block's fp16 scale fields (ggml-common.h): (offset, "d" for a positive
# scale, "m" for a signed min).
SCALE_FIELDS = {QT.Q5_0: [(0, "d")], QT.Q5_1: [(0, "d"), (2, "m")], QT.IQ4_NL: [(0, "d")],
                QT.Q2_K: [(80, "d"), (82, "d")], QT.Q3_K: [(108, "d")], QT.Q4_K: [(0, "d"), (2, "d")],
                QT.Q5_K: [(0, "d"), (2, "d")], QT.Q6_K: [(208, "d")]}


def random_blocks(qt, nr, k, rng):
    """nr rows of k weights of type qt as raw blocks, uint8 [nr, row bytes]."""
    block, size = quants.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(nr * (k // block), size), dtype=np.uint8)
    for off, kind in SCALE_FIELDS[qt]:
        v = rng.uniform(0.002, 0.02, raw.shape[0]) if kind == "d" else rng.standard_normal(raw.shape[0]) * 0.1
        raw[:, off:off + 2] = v.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(nr, -1)
