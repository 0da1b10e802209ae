"""The device check (bench/device_check.sh, issue 13): without a GPU it stops at its GPU step with
exit code 2 and a clear message, before building anything; its Python driver's arithmetic and its
benchmark loop run here on a tiny model on the CPU. The GPU figures come from a run on a GPU."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import prosparse_rt

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "device_check.sh"


def _driver():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "bench" / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(bool(shutil.which("nvidia-smi")) or bool(prosparse_rt.cuda_devices()),
                    reason="this machine has a GPU: the script would run for real")
def test_without_a_gpu_it_stops_at_the_gpu_step_with_exit_code_2_having_built_nothing(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), DEVICE_CHECK_WORK=str(tmp_path / "work"))
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no usable GPU" in r.stderr and "nothing was built" in r.stderr
    assert "1/6 tools" in r.stdout and "2/6 GPU" in r.stdout and "3/6 build" not in r.stdout
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_the_wheels_it_installs_offline_are_in_the_tree():
    # the machine has no internet and no gguf (nor pytest, nor sentencepiece for the tests' tiny
    # tokenizers): the script installs these, --no-index
    wheels = sorted(p.name.split("-")[0] for p in (ROOT / "bench" / "wheels").glob("*.whl"))
    assert wheels == ["gguf", "iniconfig", "pluggy", "pygments", "pytest", "sentencepiece"]
    for p in (ROOT / "bench" / "wheels").glob("*.whl"):
        assert zipfile.ZipFile(p).testzip() is None
    tracked = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "bench/wheels/gguf.whl"])
    assert tracked.returncode == 1, "bench/wheels/ is git-ignored: the wheels would not travel with the tree"


def test_byte_bound_is_the_cpu_only_speed_scaled_by_the_cpus_bytes():
    dc = _driver()
    assert dc.byte_bound(10.0, 4e9, 2e9) == pytest.approx(20.0)
    assert dc.byte_bound(10.0, 4e9, 4e9) == pytest.approx(10.0)
    assert dc.byte_bound(10.0, 4e9, 0.0) == float("inf")
    runs = [dict(sparsity="exact", budget=0.0, tok_s=5.0, bytes_read_per_token={"cpu": 3e9, "gpu": 0.0}),
            dict(sparsity="exact", budget=0.5, tok_s=12.0, bytes_read_per_token={"cpu": 1e9, "gpu": 2e9})]
    dc.with_bounds(runs)
    assert runs[0]["byte_bound_tok_s"] == pytest.approx(5.0) and runs[0]["x_cpu_only"] == pytest.approx(1.0)
    assert runs[1]["byte_bound_tok_s"] == pytest.approx(15.0) and runs[1]["x_cpu_only"] == pytest.approx(2.4)


def test_the_benchmark_loop_runs_on_a_tiny_model_on_the_cpu(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "device_check.py"), "bench", "--work", str(tmp_path),
                        "--out", str(out), "--tiny", "--cpu-only", "--threads", "2", "--tokens", "4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert [(x["sparsity"], x["budget"]) for x in res["runs"]] == [("exact", 0.0), ("predict", 0.0), ("dense", 0.0)]
    for x in res["runs"]:
        assert x["tok_s"] > 0 and x["device"] == "cpu" and not x["gpu_active"]
        assert x["bytes_read_per_token"]["gpu"] == 0 and x["bytes_read_per_token"]["cpu"] > 0
        assert x["byte_bound_tok_s"] == pytest.approx(x["tok_s"])
    assert "| exact | 0% |" in r.stdout
