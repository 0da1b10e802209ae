"""bench/bench_calibrate.py: llama.cpp's column from prosparse-bench's peer builds, and --reuse.

On a tiny random SiLU model (llama.cpp layout, Q8_0); the peer test runs only where
bench/setup_peer.sh has built llama-cpp-python."""
import json
import sys
from pathlib import Path

import pytest

from helpers_models import make_llama_dir

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
pytest.importorskip("torch")
pytest.importorskip("transformers")

import bench_calibrate as B  # noqa: E402
from prosparse_bench import worker  # noqa: E402
from prosparse_bench.cli import find_peers  # noqa: E402
from prosparse_convert.convert import convert  # noqa: E402

QUICK = ["--targets", "0.3", "--allocations", "uniform", "--tokens", "600", "--probe-tokens", "64",
         "--eval-tokens", "300", "--decode-tokens", "4", "--reps", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def silu(tmp_path_factory):
    d = tmp_path_factory.mktemp("bc")
    _, hf = make_llama_dir(d / "hf", n_layer=2)
    return convert(hf, d / "model.gguf", outtype="q8_0", format="llama.cpp", progress=False)


def _rows(out_dir):
    return {r["config"]: r for r in json.loads((out_dir / "bench_calibrate.json").read_text())}


def test_reuse_skips_calibration_and_measures_only_speeds(silu, tmp_path, capsys):
    out = tmp_path / "out"
    assert B.main(["--model", str(silu), "--out-dir", str(out), "--peer", "none"] + QUICK) == 0
    first = _rows(out)
    gguf_file = out / "model.uniform30.gguf"
    stamp = gguf_file.stat().st_mtime_ns
    capsys.readouterr()

    assert B.main(["--model", str(silu), "--out-dir", str(out), "--peer", "none", "--reuse"] + QUICK) == 0
    assert "uniform 30%: reusing model.uniform30.gguf" in capsys.readouterr().out
    assert gguf_file.stat().st_mtime_ns == stamp  # not calibrated again
    again = _rows(out)
    for config in ("dense (input file)", "uniform 30%"):
        assert again[config]["perplexity"] == first[config]["perplexity"]
        assert again[config]["tok_s"] > 0  # measured again

    # a row made with other settings is not reused
    other = [a if a != "600" else "700" for a in QUICK]
    assert B.main(["--model", str(silu), "--out-dir", str(out), "--peer", "none", "--reuse"] + other) == 0
    assert "reusing" not in capsys.readouterr().out
    assert gguf_file.stat().st_mtime_ns != stamp


def test_decode_only_worker_run_counts_its_tokens(silu):
    """The bench measures decode alone (pp 0): the warm-up must not eval an empty prompt."""
    rt = worker.Ours(silu, n_ctx=32, n_threads=1, n_batch=32, sparsity="dense", extra_bufts=False)
    assert worker.run(rt, pp=0, tg=3, reps=2)["tg"]["n_tokens"] == [3, 3]


def test_llama_cpp_column_reports_the_fastest_peer_build(silu):
    peers = find_peers("auto")
    if not peers:
        pytest.skip("no llama-cpp-python build (bash bench/setup_peer.sh)")
    args = B.build_parser().parse_args(["--peer", "auto"] + QUICK)
    r = B.llama_cpp_speed(silu, args)
    # every build, with and without its extra buffer types
    assert {b.split(" omp-")[0] for b in r["builds"]} == {n + x for n, _ in peers for x in ("", "+extra-bufts")}
    assert {b.split(" omp-")[1] for b in r["builds"]} == {"default", "active"}  # each wait policy
    assert r["build"] in r["builds"] and r["tok_s"] > 0
    assert r["tok_s"] == max(b["tok_s"] for b in r["builds"].values() if "error" not in b)


def test_a_broken_peer_is_reported_not_fatal(silu):
    """An interpreter without llama_cpp (this one) stands for a failed build."""
    args = B.build_parser().parse_args(["--peer", f"broken={sys.executable}"] + QUICK)
    r = B.llama_cpp_speed(silu, args)
    assert r["tok_s"] != r["tok_s"] and "broken" in r["strategy"] and "failed" in r["strategy"]


def test_shipped_presets_are_measured_beside_the_calibrations(silu, tmp_path, monkeypatch):
    """For a model with shipped thresholds (the default model), a 'preset' row measures the file
    prosparse-run runs: those thresholds, not calibrated again."""
    import gguf
    import numpy as np

    import prosparse_convert.calibrate as C

    thr = [0.05, 0.07]
    (tmp_path / "presets.json").write_text(json.dumps({silu.name: {
        "size": silu.stat().st_size, "down_type": "f16", "thresholds": {"0.30": thr}}}))
    monkeypatch.setattr(C, "_PRESETS", tmp_path / "presets.json")
    out = tmp_path / "out"
    assert B.main(["--model", str(silu), "--out-dir", str(out), "--peer", "none"] + QUICK) == 0
    row = _rows(out)["preset 30%"]
    assert row["allocation"] == "preset" and "calibrate_seconds" not in row
    assert row["perplexity"] > 0 and 0 < row["sparsity"] < 1
    r = gguf.GGUFReader(str(out / "model.preset30.gguf"))
    np.testing.assert_allclose(r.fields["prosparse.layer_thresholds"].contents(), thr, rtol=1e-6)
