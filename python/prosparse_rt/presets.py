"""Per-layer |SiLU(gate)| thresholds shipped for known model files (``presets.json``), keyed by the
file's name and valid only for its exact size. ``Model(path, layer_thresholds=...)`` applies them at
load, so the default model runs sparse without a calibrated copy on disk. ``prosparse-calibrate
--target-sparsity`` computes such thresholds; docs/calibrate.md says how these were measured."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Union

PATH = Path(__file__).with_name("presets.json")

# The README's sparse command runs SmolLM2 at this sparsity. Greedy text with the shipped thresholds
# (docs/calibrate.md, "The default model"): at 30% (held-out perplexity +5.0%) the answers read like
# the dense model's; at 50% (+24.3%) it loops ("fashion, culture, gastronomy, ..."), explains the blue
# sky by absorption and invents a "Johannes Brahmerus" who printed in 1290. 30% is the highest
# sparsity whose text is still good.
DEFAULT_TARGET_SPARSITY = 0.3


def _key(target: float) -> str:
    return f"{target:.2f}"


def entry(model_path: Union[str, os.PathLike], path: Union[str, os.PathLike] = PATH) -> Optional[Dict]:
    """The presets recorded for this exact file (same name and size), or None."""
    p = Path(path)
    if not p.is_file():
        return None
    e = json.loads(p.read_text()).get(Path(model_path).name)
    if not e or e.get("size") != Path(model_path).stat().st_size:
        return None
    return e


def targets(model_path: Union[str, os.PathLike], path: Union[str, os.PathLike] = PATH) -> List[float]:
    """The target sparsities that have shipped thresholds for this file (empty if none)."""
    e = entry(model_path, path)
    return sorted(float(t) for t in e.get("thresholds", {})) if e else []


def layer_thresholds(model_path: Union[str, os.PathLike], target: float,
                     path: Union[str, os.PathLike] = PATH) -> List[float]:
    """The shipped per-layer thresholds for ``target`` on this file; ValueError naming the file and
    the targets there are when there is none."""
    if not Path(model_path).is_file():
        raise FileNotFoundError(f"model file does not exist: {model_path}")
    e = entry(model_path, path)
    thr = e.get("thresholds", {}).get(_key(target)) if e else None
    if thr is None:
        have = ", ".join(_key(t) for t in targets(model_path, path)) or "none"
        raise ValueError(
            f"no shipped thresholds for target sparsity {_key(target)} on {Path(model_path).name} "
            f"(shipped for this file: {have}); prosparse-calibrate --target-sparsity writes a calibrated copy")
    return [float(t) for t in thr]
