"""prosparse-calibrate: activation profiling, predictor training (ReLU/FATReLU models) and
training-free per-layer thresholds (SiLU models), written back into a GGUF file."""

from __future__ import annotations

from pathlib import Path

from .calibrate import Options, Report, calibrate, evaluate_file

__all__ = ["Options", "Report", "calibrate", "evaluate_file", "default_sparse_model"]

DEFAULT_TARGET_SPARSITY = 0.5


def default_sparse_model(target_sparsity: float = DEFAULT_TARGET_SPARSITY, progress: bool = True) -> Path:
    """The default model (SmolLM2-135M-Instruct) with calibrated SiLU thresholds, built on first use
    from text the model writes itself and cached beside it; the README's first command runs it."""
    import os

    from prosparse_rt import default_model

    src = default_model.path()
    out = src.with_name(f"{src.stem}.sparse{int(round(target_sparsity * 100))}.gguf")
    if out.is_file():
        return out
    calibrate(src, out, Options(target_sparsity=target_sparsity, tokens=4096, progress=progress,
                                n_threads=min(2, os.cpu_count() or 1)))
    return out
