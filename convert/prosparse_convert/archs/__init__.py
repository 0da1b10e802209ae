"""One module per architecture; this table maps config.json's `architectures` to them."""

from __future__ import annotations

from ..errors import ConvertError
from ..params import ModelParams
from . import llama, minicpm

_BY_HF_CLASS = {cls: mod for mod in (llama, minicpm) for cls in mod.HF_CLASSES}
_BY_MODEL_TYPE = {mt: mod for mod in (llama, minicpm) for mt in mod.HF_MODEL_TYPES}


def params_from_config(cfg: dict, name: str) -> ModelParams:
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        raise ConvertError("config.json: architectures must be a list")
    for cls in archs:
        if cls in _BY_HF_CLASS:
            return _BY_HF_CLASS[cls].params(cfg, name)
    mt = cfg.get("model_type")
    if not archs and mt in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[mt].params(cfg, name)
    what = ", ".join(map(str, archs)) if archs else f"model_type {mt!r}"
    raise ConvertError(f"unsupported architecture: {what} (supported: {', '.join(sorted(_BY_HF_CLASS))})")
