"""bench/bench_gpu_kernels.py: a table of the CUDA kernels' GB/s on a GPU, exit code 2 and the reason
without one."""

import json
import subprocess
import sys
from pathlib import Path

import prosparse_rt

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_gpu_kernels.py"


def test_bench_runs_on_a_gpu_or_says_why_not(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(BENCH), "--types", "q4_0", "--ops", "attn,sparse_down", "--seconds", "0.01",
                        "--working-set", "20", "--json", str(out)], capture_output=True, text=True, timeout=300)
    if not prosparse_rt.cuda_devices():
        assert p.returncode == 2, p.stderr
        assert "no usable CUDA GPU" in p.stderr
        assert not out.exists()
        return
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["results"]
    assert [r["op"] for r in rows] == ["attn", "sparse_down"]
    assert all(r["gb_s"] > 0 for r in rows)
    assert "GB/s" in p.stdout
