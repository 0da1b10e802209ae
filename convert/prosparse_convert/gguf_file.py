"""GGUF files through the gguf package: a reader that also takes PowerInfer's files and says which
tensor a truncated file cuts off, and copying a metadata field with its own GGUF type (what the
converter, prosparse-calibrate and the tests do when they rewrite a file)."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
from gguf import GGUFValueType as V

from .errors import ConvertError

_PWRI = int.from_bytes(b"PWRI", "little")


class Reader(gguf.GGUFReader):
    """GGUFReader that also accepts PowerInfer's magic `PWRI` (the layout after it is GGUF's;
    `powerinfer` says which magic the file had), and refuses a file whose tensor data runs past
    its end with the tensor's name and sizes instead of numpy's reshape error."""

    powerinfer = False

    def _get(self, offset, dtype, count=1, override_order=None):
        r = super()._get(offset, dtype, count, override_order)
        if offset == 0 and count == 1 and np.dtype(dtype) == np.uint32 and int(r[0]) == _PWRI:
            self.powerinfer = True
            return np.array([gguf.GGUF_MAGIC], dtype=np.uint32)
        return r

    def _build_tensors(self, start_offs, fields):
        size = len(self.data)
        for f in fields:
            try:  # the tensor-info layout the gguf package parses (name, n_dims, dims, type, offset)
                _, name, _, dims, raw_type, offset = f.parts
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
            except (ValueError, KeyError):
                continue  # an unknown type or layout: the package's own error says what it is
            n_bytes = int(np.prod(dims, dtype=np.int64)) * type_size // block
            end = int(start_offs) + int(offset[0]) + n_bytes
            if end > size:
                tensor = bytes(name).decode("utf-8", "replace")
                raise TruncatedError(f"truncated: tensor {tensor} needs {n_bytes} bytes up to byte {end}, "
                                     f"the file has {size}")
        return super()._build_tensors(start_offs, fields)


class TruncatedError(ValueError):
    """Raised by Reader for tensor data past the end of the file."""


def open_gguf_file(path) -> Reader:
    """The file read with Reader; ConvertError naming the file and the problem when it cannot be."""
    path = Path(path)
    try:
        return Reader(os.fspath(path))
    except TruncatedError as e:
        raise ConvertError(f"{path} is {e}") from None
    except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise ConvertError(f"cannot read GGUF file {path}: {e}") from e


def copy_field(writer: gguf.GGUFWriter, field) -> None:
    """Add a field of a GGUFReader to `writer` under its own name and GGUF type (arrays keep their
    element type, so a u32 stays a u32 and an f32 array an f32 array)."""
    kind = field.types[0]
    if kind == V.ARRAY:
        if len(field.types) > 2:
            raise ConvertError(f"key {field.name}: nested arrays are not supported")
        writer.add_key_value(field.name, field.contents(), kind, sub_type=field.types[-1])
    else:
        writer.add_key_value(field.name, field.contents(), kind)


__all__ = ["Reader", "TruncatedError", "open_gguf_file", "copy_field"]
