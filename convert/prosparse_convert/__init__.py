"""prosparse-convert: Hugging Face checkpoints and GGUF files to prosparse-rt's GGUF (docs/design.md)."""

from .convert import Options, convert
from .errors import ConvertError

__all__ = ["convert", "Options", "ConvertError"]
