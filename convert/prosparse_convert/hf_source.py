"""Reading a Hugging Face checkpoint: locating it (directory or hub id), its config and its tensors.

Safetensors files are parsed here directly (an 8-byte header length, a JSON header, raw data) and
memory-mapped, so that BF16 checkpoints need neither torch nor a full copy in memory; every offset
is checked against the file before use. `pytorch_model*.bin` needs torch, an optional extra.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np

from .errors import ConvertError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# safetensors dtype -> (numpy dtype of the stored bytes, element size)
_ST_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),   # widened to f32 by a 16-bit shift
    "F64": np.dtype("<f8"),
}


def resolve_model(model: str) -> Path:
    """A local directory or .gguf file as given; otherwise a hub id fetched with huggingface_hub."""
    p = Path(model)
    if p.exists():
        return p
    if not _HUB_ID.match(model):
        raise ConvertError(f"input not found: {model!r} is neither a file, a directory nor a hub id")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ConvertError(f"{model!r} is not a local path, and huggingface_hub is not installed") from e
    try:
        return Path(snapshot_download(
            repo_id=model,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "pytorch_model*.bin"]))
    except Exception as e:  # network, authentication, unknown repository: all one message
        raise ConvertError(f"could not fetch {model!r} from the Hugging Face hub: {e}") from e


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    cfg = read_json_optional(path)
    if cfg is None:
        raise ConvertError(f"missing file: {path} (a Hugging Face checkpoint needs config.json)")
    if not isinstance(cfg, dict):
        raise ConvertError(f"{path} is not a JSON object")
    return cfg


class TensorStore:
    """The checkpoint's tensors by Hugging Face name: shape without loading, data as f32 on demand."""

    def __init__(self) -> None:
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        self._loaders: Dict[str, Callable[[], np.ndarray]] = {}

    def add(self, name: str, shape: Tuple[int, ...], loader: Callable[[], np.ndarray], origin: str) -> None:
        if name in self._shapes:
            raise ConvertError(f"tensor {name!r} appears twice in the checkpoint (again in {origin})")
        self._shapes[name] = tuple(int(d) for d in shape)
        self._loaders[name] = loader

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def names(self):
        return list(self._shapes)

    def shape(self, name: str) -> Tuple[int, ...]:
        if name not in self._shapes:
            raise ConvertError(f"missing tensor {name!r} in the checkpoint")
        return self._shapes[name]

    def load(self, name: str) -> np.ndarray:
        """The tensor as a C-contiguous float32 array."""
        self.shape(name)
        a = self._loaders[name]()
        return np.ascontiguousarray(a, dtype=np.float32)


def _safetensors_file(store: TensorStore, path: Path, only=None) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConvertError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise ConvertError(f"{path}: safetensors header length {n} exceeds the file")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConvertError(f"{path}: bad safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: bad safetensors header (not a JSON object)")
    data_start = 8 + n
    mm = None

    for name, info in header.items():
        if name == "__metadata__":
            continue
        if only is not None and name not in only:
            continue
        try:
            dtype_name = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConvertError(f"{path}: bad safetensors entry for {name!r}") from e
        if dtype_name not in _ST_DTYPES:
            raise ConvertError(f"{path}: tensor {name!r} has dtype {dtype_name}; "
                               f"supported: {', '.join(_ST_DTYPES)}")
        dt = _ST_DTYPES[dtype_name]
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if any(d < 0 for d in shape) or not (0 <= begin <= end) or end - begin != count * dt.itemsize \
                or data_start + end > size:
            raise ConvertError(f"{path}: tensor {name!r} offsets {begin}..{end} do not match its "
                               f"shape {list(shape)} {dtype_name} or the file size")

        def loader(begin=begin, count=count, shape=shape, dt=dt, bf16=(dtype_name == "BF16")):
            nonlocal mm
            if mm is None:
                mm = np.memmap(path, dtype=np.uint8, mode="r")
            raw = mm[data_start + begin: data_start + begin + count * dt.itemsize].view(dt).reshape(shape)
            if bf16:
                return (raw.astype(np.uint32) << 16).view(np.float32)
            return raw.astype(np.float32)

        store.add(name, shape, loader, str(path))


def _torch_file(store: TensorStore, path: Path) -> None:
    try:
        import torch
    except ImportError as e:
        raise ConvertError(f"{path.name} is a PyTorch checkpoint: reading it needs torch "
                           f"(pip install 'prosparse-rt[torch]'), or convert it to safetensors") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ConvertError(f"cannot read {path}: {e}") from e
    if not isinstance(sd, dict):
        raise ConvertError(f"{path}: expected a state dict")
    for name, t in sd.items():
        if not hasattr(t, "shape"):
            continue
        store.add(name, tuple(t.shape), lambda t=t: t.detach().float().numpy(), str(path))


def open_tensors(model_dir: Path) -> TensorStore:
    """All weights of the checkpoint: safetensors (single or sharded), else pytorch_model*.bin."""
    store = TensorStore()
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise ConvertError(f"cannot read {index}: {e}") from e
        by_file: Dict[str, set] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(fname, set()).add(name)
        for fname, names in sorted(by_file.items()):
            shard = model_dir / fname
            if not shard.is_file():
                raise ConvertError(f"missing file: {shard} (listed in {index.name})")
            _safetensors_file(store, shard, only=names)
        missing = [n for n in weight_map if n not in store]
        if missing:
            raise ConvertError(f"tensor {missing[0]!r} is listed in {index.name} but absent from its shard")
        return store
    st = sorted(model_dir.glob("*.safetensors"))
    if st:
        for p in st:
            _safetensors_file(store, p)
        return store
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if bins:
        for p in bins:
            _torch_file(store, p)
        return store
    raise ConvertError(f"missing weights: no *.safetensors or pytorch_model*.bin in {model_dir}")


def read_json_optional(path: Path):
    """The JSON file at `path`, None if there is none; ConvertError naming it if it cannot be read."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"cannot read {path}: {e}") from e


__all__ = ["resolve_model", "read_config", "open_tensors", "TensorStore", "read_json_optional"]
