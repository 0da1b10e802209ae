"""Where a model runs: Model(device=..., vram_budget=...), stats["placement"], and the CLI's
--device. This machine has no GPU (the CUDA side is compiled; the driver is missing), so these
check the CPU path and the errors; the placement function itself is tested in test_placement.py."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

import helpers_models as H
import prosparse_rt
from prosparse_convert import convert
from prosparse_rt import Model

pytestmark = pytest.mark.skipif(bool(prosparse_rt.cuda_devices()), reason="a usable GPU is present")


@pytest.fixture(scope="module")
def fat(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    _, d = H.make_fatrelu_dir(root / "hf", 0.1, seed=71)
    return convert(d, root / "fat.gguf", outtype="q8_0", progress=False)


def test_auto_runs_on_the_cpu_and_the_placement_says_so(fat):
    with Model(fat, n_ctx=64, n_threads=2) as m:
        m.generate(H.prompt_ids(6), max_tokens=4, temperature=0.0)
        pl = m.stats["placement"]
    assert pl["device"] == "cpu" and not pl["gpu_active"]
    assert "no usable GPU" in pl["note"] and prosparse_rt.cuda_status()["reason"] in pl["note"]
    assert len(pl["layers"]) == 2
    assert all(not x["attention_on_gpu"] and x["n_hot"] == 0 for x in pl["layers"]) and not pl["output_on_gpu"]
    assert pl["bytes"]["gpu"] == 0 and pl["bytes"]["cpu"] > 0
    assert pl["bytes_read_per_token"]["gpu"] == 0 and 0 < pl["bytes_read_per_token"]["cpu"] <= pl["bytes"]["cpu"]
    assert pl["seconds"]["gpu"] == 0 and pl["seconds"]["cpu"] > 0


def test_on_the_cpu_the_overlap_counters_say_the_gpu_did_nothing(fat):
    with Model(fat, n_ctx=64, n_threads=2) as m:
        m.generate(H.prompt_ids(6), max_tokens=4, temperature=0.0)
        s = m.stats
    pl = s["placement"]
    assert pl["cpu_wait_seconds"] == 0 and pl["gpu_busy_seconds"] == 0 and pl["gpu_idle_seconds"] == 0
    assert pl["seconds"]["cpu"] == pytest.approx(s["prompt_seconds"] + s["decode_seconds"])
    assert pl["gpu_resident_bytes"] == 0
    assert pl["measured_bytes_per_token"] == {"gpu": 0.0, "cpu": s["weight_bytes_per_token"]}


def test_cpu_asked_for_has_no_note(fat):
    with Model(fat, n_ctx=64, device="cpu") as m:
        pl = m.stats["placement"]
    assert pl["device"] == "cpu" and pl["note"] == ""


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_a_gpu_asked_for_without_one_is_a_value_error_saying_why(fat, device):
    reason = prosparse_rt.cuda_status()["reason"]  # no driver here; "built without CUDA" in an OFF build
    assert reason
    with pytest.raises(ValueError, match=rf"device '{device}': no usable GPU: {re.escape(reason)}"):
        Model(fat, n_ctx=64, device=device)


@pytest.mark.parametrize("kw, msg", [
    (dict(device="gpu"), "device must be"), (dict(device="cuda:x"), "device must be"),
    (dict(device=0), "device must be"), (dict(vram_budget=-1), "vram_budget"),
    (dict(vram_budget=float("nan")), "vram_budget"), (dict(vram_budget="6"), "vram_budget"),
])
def test_bad_device_arguments_are_value_errors(fat, kw, msg):
    with pytest.raises(ValueError, match=msg):
        Model(fat, n_ctx=64, **kw)


@pytest.mark.parametrize("flags, msg", [
    (["--device", "cuda"], "no usable GPU"), (["--device", "tpu"], "--device"), (["--vram-budget", "-2"], "--vram-budget"),
])
def test_cli_device_errors_are_one_line(fat, flags, msg):
    r = subprocess.run([sys.executable, "-m", "prosparse_rt.cli", "-m", str(fat), "-p", "Hi", "-n", "2", *flags],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""
