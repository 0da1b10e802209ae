"""prosparse-calibrate: activation profiling, predictor training (ReLU/FATReLU models) and
training-free per-layer thresholds (SiLU models), written back into a GGUF file."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

from .calibrate import Options, Report, calibrate, evaluate_file

__all__ = ["Options", "Report", "calibrate", "evaluate_file", "default_sparse_model", "sparse_model_path",
           "write_preset"]

# The README's first command runs SmolLM2 at this sparsity. Greedy text with the shipped thresholds
# (docs/calibrate.md, "The default model"): at 30% (held-out perplexity +5.0%) the answers read like
# the dense model's; at 50% (+24.3%) it loops ("fashion, culture, gastronomy, ..."), explains the blue
# sky by absorption and invents a "Johannes Brahmerus" who printed in 1290. 30% is the highest
# sparsity whose text is still good.
DEFAULT_TARGET_SPARSITY = 0.3
# Thresholds that `prosparse-calibrate --target-sparsity S` computed for the default model
# (bench/bench_calibrate.py's run, see docs/calibrate.md), so that the README's first command does not
# spend minutes calibrating: keyed by target, valid only for the exact file (its size).
_PRESETS = Path(__file__).with_name("presets.json")
log = logging.getLogger(__name__)


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


def write_preset(src: Path, out: Path, preset: dict, progress: bool = False) -> None:
    """`src` with a shipped preset's thresholds (and ffn_down_t at its type) written to `out`,
    atomically: what calibration would write, without calibrating."""
    from .write import Additions, InputFile, write

    inp = InputFile(src)
    n_layer = int(inp.get("llama.block_count"))
    n_ff = int(inp.get("llama.feed_forward_length"))
    write(inp, out, Additions(activation="silu", layer_thresholds=preset["thresholds"],
                              down_type=preset["down_type"]), n_layer, n_ff, progress=progress)


def sparse_model_path(target_sparsity: float = DEFAULT_TARGET_SPARSITY) -> Path:
    """Where default_sparse_model() caches its file: beside the default model."""
    from prosparse_rt import default_model

    src = default_model.path(download=False)
    return src.with_name(f"{src.stem}.sparse{int(round(target_sparsity * 100))}.gguf")


def _cached_file_problem(path: Path, preset: Optional[dict]) -> Optional[str]:
    """Why a cached sparse model cannot be used (None if it can): it must load (the runtime checks
    that every tensor lies inside the file, so a truncated copy fails), carry thresholds, and, when
    it was made from a preset, the preset's thresholds and ffn_down_t type (presets change). Read
    through the native loader: the gguf package's reader takes ~3 s on SmolLM2's vocabulary, at
    every start of prosparse-run."""
    import numpy as np

    from prosparse_rt import _core

    from .. import names as N

    try:
        _core.Model(str(path), n_ctx=16, n_threads=1, sparsity="dense")
        info = _core.gguf_summary(str(path))
    except ValueError as e:
        return str(e)
    thr = info["metadata"].get(N.PS_LAYER_THRESHOLDS)
    if not thr:
        return "it has no layer thresholds"
    if preset is not None:
        if len(thr) != len(preset["thresholds"]) or not np.allclose(thr, preset["thresholds"], rtol=1e-6):
            return "its thresholds are not the shipped preset's"
        types = {t.lower() for name, t, _, _ in info["tensors"] if ".ffn_down_t." in name}
        if types != {preset["down_type"]}:
            return f"its ffn_down_t is {sorted(types)}, the preset says {preset['down_type']}"
    return None


def default_sparse_model(target_sparsity: float = DEFAULT_TARGET_SPARSITY, progress: bool = True,
                         recalibrate: bool = False) -> Path:
    """The default model (SmolLM2-135M-Instruct) with per-layer SiLU thresholds for
    `target_sparsity`, written once beside it (cached, atomically). Uses the shipped preset
    thresholds when they match the file; otherwise (or with recalibrate=True) calibrates on text the
    model writes itself. A cached file that does not load or does not match the preset is rebuilt."""
    from prosparse_rt import default_model

    src = default_model.path()
    out = sparse_model_path(target_sparsity)
    preset = None if recalibrate else _preset(src, target_sparsity)
    if out.is_file() and not recalibrate:
        problem = _cached_file_problem(out, preset)
        if problem is None:
            return out
        log.warning("rebuilding %s: %s", out, problem)
    if preset is not None:
        write_preset(src, out, preset, progress=progress)
        return out
    calibrate(src, out, Options(target_sparsity=target_sparsity, tokens=4096, progress=progress,
                                n_threads=min(2, os.cpu_count() or 1)))
    return out
