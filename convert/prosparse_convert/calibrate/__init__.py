"""prosparse-calibrate: activation profiling, predictor training (ReLU/FATReLU models) and
training-free per-layer thresholds (SiLU models), written back into a GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from prosparse_rt import presets

from .calibrate import Options, Report, calibrate, evaluate_file

__all__ = ["Options", "Report", "calibrate", "evaluate_file", "write_preset"]

# The thresholds shipped for known files live in the runtime package, which applies them at load
# (prosparse_rt.presets); benchmarks and tests read them through _preset.
_PRESETS = presets.PATH


def _preset(src: Path, target: float) -> Optional[dict]:
    """{"thresholds": [...], "down_type": ...} shipped for this exact file and target, or None."""
    entry = presets.entry(src, _PRESETS)
    thr = entry.get("thresholds", {}).get(f"{target:.2f}") if entry else None
    if thr is None:
        return None
    # the type --down-type auto chose for this file (its measurement is recorded beside it)
    return {"thresholds": thr, "down_type": entry.get("down_type", "f16")}


def write_preset(src: Path, out: Path, preset: dict, progress: bool = False) -> None:
    """`src` with a shipped preset's thresholds (and ffn_down_t at its type) written to `out`,
    atomically: what calibration would write, without calibrating."""
    from .write import Additions, InputFile, write

    inp = InputFile(src)
    n_layer = int(inp.get("llama.block_count"))
    n_ff = int(inp.get("llama.feed_forward_length"))
    write(inp, out, Additions(activation="silu", layer_thresholds=preset["thresholds"],
                              down_type=preset["down_type"]), n_layer, n_ff, progress=progress)
