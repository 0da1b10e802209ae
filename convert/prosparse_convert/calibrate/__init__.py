"""prosparse-calibrate: activation profiling, predictor training (ReLU/FATReLU models) and
training-free per-layer thresholds (SiLU models), written back into a GGUF file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from .calibrate import Options, Report, calibrate, evaluate_file

__all__ = ["Options", "Report", "calibrate", "evaluate_file", "default_sparse_model"]

DEFAULT_TARGET_SPARSITY = 0.5
# Thresholds that `prosparse-calibrate --target-sparsity S` computed for the default model
# (bench/bench_calibrate.py's run, see docs/calibrate.md), so that the README's first command does not
# spend minutes calibrating: keyed by target, valid only for the exact file (its size).
_PRESETS = Path(__file__).with_name("presets.json")


def _preset(src: Path, target: float) -> Optional[dict]:
    """{"thresholds": [...], "down_type": ...} shipped for this exact file and target, or None."""
    if not _PRESETS.is_file():
        return None
    p = json.loads(_PRESETS.read_text())
    entry = p.get(Path(src).name)
    if not entry or entry.get("size") != Path(src).stat().st_size:
        return None
    thr = entry.get("thresholds", {}).get(f"{target:.2f}")
    if thr is None:
        return None
    # the type --down-type auto chose for this file (its measurement is recorded beside it)
    return {"thresholds": thr, "down_type": entry.get("down_type", "f16")}


def default_sparse_model(target_sparsity: float = DEFAULT_TARGET_SPARSITY, progress: bool = True,
                         recalibrate: bool = False) -> Path:
    """The default model (SmolLM2-135M-Instruct) with per-layer SiLU thresholds for
    `target_sparsity`, written once beside it (cached). Uses the shipped preset thresholds when they
    match the file; otherwise (or with recalibrate=True) calibrates on text the model writes itself."""
    from prosparse_rt import default_model

    src = default_model.path()
    out = src.with_name(f"{src.stem}.sparse{int(round(target_sparsity * 100))}.gguf")
    if out.is_file() and not recalibrate:
        return out
    preset = None if recalibrate else _preset(src, target_sparsity)
    if preset is not None:
        from .write import Additions, InputFile, write

        inp = InputFile(src)
        n_layer = int(inp.get("llama.block_count"))
        n_ff = int(inp.get("llama.feed_forward_length"))
        write(inp, out, Additions(activation="silu", layer_thresholds=preset["thresholds"],
                                  down_type=preset["down_type"]), n_layer, n_ff, progress=progress)
        return out
    calibrate(src, out, Options(target_sparsity=target_sparsity, tokens=4096, progress=progress,
                                n_threads=min(2, os.cpu_count() or 1)))
    return out
