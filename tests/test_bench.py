"""prosparse-bench's synthetic models and measurement loop, on tiny shapes.

References: the `gguf` package's reader and dequantizer (not our loader) for what the generator
writes; the runtime's own byte count for the bench's GGUF-based one; the runtime's activation
statistics for the sparsity the FATReLU generator promises."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from prosparse_bench import report, synth, worker  # noqa: E402

gguf = pytest.importorskip("gguf")
TINY = synth.Shape(n_embd=512, n_layer=2, n_head=8, n_head_kv=4, n_ff=1536, n_vocab=600, n_ctx=256)


@pytest.fixture(scope="module")
def dense_q4(tmp_path_factory):
    return synth.write_dense(tmp_path_factory.mktemp("b") / "d.gguf", TINY, "q4_0")


@pytest.fixture(scope="module")
def fatrelu_q4(tmp_path_factory):
    return synth.write_fatrelu(tmp_path_factory.mktemp("b") / "f.gguf", TINY, "q4_0", rank=128)


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_generator_writes_llama_layout_with_unit_scale_activations(tmp_path, qtype):
    path = synth.write_dense(tmp_path / "m.gguf", TINY, qtype)
    ts = _tensors(path)
    assert ts["blk.1.ffn_down.weight"].tensor_type.name == qtype.upper()
    assert list(ts["blk.0.ffn_gate.weight"].shape) == [TINY.n_embd, TINY.n_ff]  # ggml order
    assert list(ts["blk.0.attn_k.weight"].shape) == [TINY.n_embd, TINY.n_embd // 2]  # GQA
    assert list(ts["token_embd.weight"].shape) == [TINY.n_embd, TINY.n_vocab]
    for name, fan_in in (("blk.0.ffn_gate.weight", TINY.n_embd), ("blk.0.ffn_down.weight", TINY.n_ff)):
        w = gguf.quants.dequantize(ts[name].data, ts[name].tensor_type)
        assert abs(w.std() * np.sqrt(fan_in) - 1) < 0.1, name
        assert abs(w.mean()) < 0.02 * w.std(), name  # random scale signs cancel Q4_0's -0.5 offset
    tok = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"]
    assert len(tok.data) == TINY.n_vocab


def test_dense_bytes_per_token_match_the_runtimes_count(dense_q4):
    from prosparse_rt import _core
    m = _core.Model(str(dense_q4), n_ctx=32, n_threads=1, sparsity="dense")
    m.eval([1])
    m.eval([5])  # a decode step: the runtime counts bytes per decoded token
    assert report.weight_bytes_per_token(dense_q4)["bytes_per_token"] == m.stats()["weight_bytes_per_token"]


@pytest.mark.parametrize("cache_type", ["f16", "f32", "q8_0"])
def test_cache_bytes_per_token_from_the_file_equal_the_runtimes_count(dense_q4, cache_type):
    from prosparse_rt import _core
    m = _core.Model(str(dense_q4), n_ctx=32, n_threads=1, sparsity="dense", kv_type=cache_type)
    m.eval([1, 2, 3, 4])
    m.eval([5])  # a decode step at 5 cached positions
    assert report.kv_bytes_per_token(dense_q4, 5, cache_type) == m.stats()["kv_bytes_per_token"]


@pytest.mark.parametrize("depth", [0, 40])
def test_worker_counts_processed_tokens_and_logits_are_finite(dense_q4, depth):
    rt = worker.Ours(dense_q4, n_ctx=96, n_threads=1, n_batch=32, sparsity="dense", extra_bufts=False,
                     cache_type="f16", flash_attn=False)
    out = worker.run(rt, pp=24, tg=5, reps=2, depth=depth, batch=32)
    # the tokens counted are those after the depth's context, which every repetition keeps
    assert out["pp"]["n_tokens"] == [24, 24] and out["tg"]["n_tokens"] == [5, 5]
    assert out["depth"] == depth and rt.n_past() == depth + 5
    assert out["logits_finite"]
    mean, sd, rates = report.summarize(out["tg"]["seconds"], out["tg"]["n_tokens"])
    assert len(rates) == 2 and mean > 0 and sd >= 0


def test_fatrelu_model_is_89_percent_sparse_and_predicts_about_20_percent(fatrelu_q4):
    from prosparse_rt import _core
    rng = np.random.default_rng(1)
    ids = [int(t) for t in rng.integers(3, TINY.n_vocab, size=24)]
    frac = {}
    for strategy in ("exact", "predict"):
        m = _core.Model(str(fatrelu_q4), n_ctx=64, n_threads=1, sparsity=strategy)
        for t in ids:
            m.eval([t])
        st = m.stats()
        frac[strategy] = st["active_fraction" if strategy == "exact" else "predicted_fraction"]
    assert all(abs(a - 0.11) < 0.03 for a in frac["exact"]), frac["exact"]
    assert all(abs(p - 0.20) < 0.04 for p in frac["predict"]), frac["predict"]
    ts = _tensors(fatrelu_q4)
    assert "blk.0.ffn_down.weight" not in ts and "blk.0.ffn_down_t.weight" in ts
    freq = np.asarray(ts["blk.0.ffn_act_freq"].data)
    assert np.all(np.diff(freq) <= 0) and abs(freq.mean() - 0.11) < 1e-3  # frequency order


def test_markdown_table_reports_gbps_and_ratio_to_llama_cpp():
    run = lambda rt, tg: {"runtime": rt, "threads": 2, "bytes_per_token": 3e9,  # noqa: E731
                          "tg": {"mean": tg, "sd": 0.1}}
    res = {"models": [{"name": "m", "weights_bytes": 3.8e9, "bytes_per_token": 3e9, "pp": 512,
                       "tg": 128, "runs": [dict(run("llama.cpp", 2.0), build="a"),
                                           dict(run("llama.cpp", 3.0), build="b"),
                                           dict(run("prosparse-rt", 6.0), strategy="dense")]}]}
    table = report.markdown_table(res)
    ours = [line for line in table.splitlines() if "prosparse-rt" in line][0]
    assert "2.00x" in ours and "18.0 (60%)" in ours  # vs the faster build; 3 GB x 6 tok/s


def test_markdown_table_gives_the_byte_bound_from_the_best_llama_cpp_and_both_byte_counts():
    run = lambda rt, tg, b: {"runtime": rt, "threads": 2, "bytes_per_token": b,  # noqa: E731
                             "kv_bytes_per_token": 1e9, "tg": {"mean": tg, "sd": 0.1}}
    res = {"models": [{"name": "m", "weights_bytes": 3.8e9, "bytes_per_token": 3e9, "pp": 512,
                       "tg": 128, "runs": [dict(run("llama.cpp", 2.0, 3e9), build="a"),
                                           dict(run("llama.cpp", 4.0, 3e9), build="b"),
                                           dict(run("prosparse-rt", 9.0, 1e9), strategy="predict")]}]}
    table = report.markdown_table(res)
    ours = [line for line in table.splitlines() if "prosparse-rt" in line][0]
    # the faster peer reads 3 + 1 GB at 4 tok/s; at that bandwidth 1 + 1 GB give 8 tok/s: 9 is 112%
    assert ours.rstrip().endswith("| 8.00 (112%) |"), ours


def test_markdown_table_takes_the_share_of_the_bandwidth_measured_in_the_run():
    run = {"runtime": "prosparse-rt", "threads": 2, "bytes_per_token": 3e9, "strategy": "dense",
           "tg": {"mean": 6.0, "sd": 0.1}}
    res = {"dram_gbps_measured": {"mean": 24.0},
           "models": [{"name": "m", "weights_bytes": 3.8e9, "bytes_per_token": 3e9, "pp": 512, "tg": 128,
                       "runs": [run]}]}
    table = report.markdown_table(res)
    assert "of 24.0 measured" in table and "18.0 (75%)" in table  # 3 GB x 6 tok/s of 24 GB/s


def test_read_bandwidth_reads_the_whole_buffer_and_refuses_bad_parameters():
    from prosparse_bench.bandwidth import read_gbps
    from prosparse_rt import _core
    nbytes, times, _ = _core._testing.read_bandwidth(8.0, 2, 0.0)
    assert nbytes == 8 * 2**20 and len(times) >= 3 and min(times) > 0
    r = read_gbps(threads=1, mb=16, seconds=0.0)
    assert r["best_gbps"] >= r["median_gbps"] > 0
    for bad in ((0.0, 1, 0.1), (8.0, 0, 0.1), (8.0, 1, -1.0), (float("nan"), 1, 0.1)):
        with pytest.raises(Exception, match="read_bandwidth"):
            _core._testing.read_bandwidth(*bad)


def test_cli_writes_table_json_and_plot(dense_q4, tmp_path, capsys):
    import json
    from prosparse_bench import cli
    assert cli.main(["-m", str(dense_q4), "--peer", "none", "-p", "16", "-n", "3", "-r", "2",
                     "-t", "1", "--results", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| tg3 |" in table and "| pp16 |" in table
    (js,) = tmp_path.glob("bench-*.json")
    res = json.loads(js.read_text())
    run = res["models"][0]["runs"][0]
    assert run["runtime"] == "prosparse-rt" and run["tg"]["n_tokens"] == [3, 3]
    assert len(list(tmp_path.glob("bench-*.png"))) == 1
    bw = res["dram_gbps_measured"]  # the host's read bandwidth, before and after, in the same run
    assert bw["before"]["median_gbps"] > 0 and bw["after"]["median_gbps"] > 0 and res["dram_gbps"] == bw["mean"]
    assert "measured in this run" in table


def test_rounds_pool_the_repetitions_of_every_configuration(dense_q4, tmp_path, capsys):
    import json
    from prosparse_bench import cli
    assert cli.main(["-m", str(dense_q4), "--peer", "none", "-p", "8", "-n", "2", "-r", "1",
                     "--rounds", "2", "-t", "1", "--results", str(tmp_path)]) == 0
    assert "1 repetitions x 2 rounds" in capsys.readouterr().out
    (js,) = tmp_path.glob("bench-*.json")
    res = json.loads(js.read_text())
    run = res["models"][0]["runs"][0]
    assert res["rounds"] == 2
    assert run["tg"]["n_tokens"] == [2, 2] and len(run["tg"]["rates"]) == 2
    assert run["pp"]["n_tokens"] == [8, 8]


@pytest.mark.parametrize("flag", ["--rounds", "-r"])
def test_zero_rounds_or_repetitions_are_refused(flag):
    from prosparse_bench import cli
    with pytest.raises(SystemExit):
        cli.main(["--peer", "none", flag, "0"])


def test_7b_fatrelu_rank_spec_is_parsed_and_bad_ranks_refused(tmp_path, monkeypatch):
    from prosparse_bench import cli

    monkeypatch.setattr(synth, "cache_dir", lambda: tmp_path)
    ns = type("A", (), {"qtype": "q4_0", "gen": False})()
    # not generated: the cached file's name carries the rank, and nothing is written
    with pytest.raises(FileNotFoundError, match="fatrelu-q4_0-r256-s0"):
        cli.resolve_model("7b-fatrelu-r256", ns)
    with pytest.raises(FileNotFoundError, match=r"fatrelu-q4_0-s0"):
        cli.resolve_model("7b-fatrelu", ns)
    with pytest.raises(SystemExit, match="multiple of 32"):
        cli.resolve_model("7b-fatrelu-r100", ns)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["", "x", "default,spin", "active,"])
def test_unknown_openmp_wait_policy_is_refused(value):
    from prosparse_bench import cli

    with pytest.raises(ValueError, match="--peer-omp-wait: expected default, active or passive"):
        cli.parse_omp_waits(value)
    assert cli.parse_omp_waits("default,passive") == ["default", "passive"]


def test_peer_configs_cover_every_build_buffer_and_policy():
    from prosparse_bench import cli

    got = list(cli.peer_configs([("b1", "p1"), ("b2", "p2")], [False, True], ["default", "active"]))
    assert len(got) == 8 and len({g[0] for g in got}) == 8
    assert ("b2+extra-bufts omp-active", "p2", True, "active") in got
    assert [g[0] for g in cli.peer_configs([("b", "p")], [False], ["active"])] == ["b"]


@pytest.mark.parametrize("depth", ["x", "0,-5", ""])
def test_a_bad_depth_list_is_refused_naming_the_option(depth, capsys):
    from prosparse_bench import cli

    with pytest.raises(SystemExit):
        cli.parse_args(["--depth", depth])
    assert "--depth" in capsys.readouterr().err


def test_every_model_gets_each_peer_configuration_and_our_strategies():
    from prosparse_bench import cli

    args = cli.parse_args(["--peer-extra-bufts", "on", "--peer-omp-wait", "default,active", "--peer-flash-attn", "off"])
    target = cli.Target("7b-fatrelu", "m", Path("sparse.gguf"), Path("dense.gguf"))
    jobs = [j for make in cli.JOB_MAKERS for j in make(target, args, [("b", "py")])]
    assert [j.label for j in jobs] == ["llama.cpp b+extra-bufts omp-default", "llama.cpp b+extra-bufts omp-active",
                                       "ours dense", "ours exact", "ours predict"]
    # every configuration at every depth, llama.cpp with flash attention on and off
    args = cli.parse_args(["--peer-omp-wait", "active", "--peer-extra-bufts", "off", "--depth", "0,512",
                           "--sparsity", "exact"])
    jobs = [j for make in cli.JOB_MAKERS for j in make(target, args, [("b", "py")])]
    assert [j.label for j in jobs] == ["llama.cpp b", "llama.cpp b fa", "llama.cpp b d512", "llama.cpp b fa d512",
                                       "ours exact", "ours exact d512"]
    assert [j.flash_attn for j in jobs[:4]] == [False, True, False, True]
    assert {j.model for j in jobs if j.runtime == "llama.cpp"} == {Path("dense.gguf")}
    assert {j.model for j in jobs if j.runtime == "ours"} == {Path("sparse.gguf")}
    args = cli.parse_args(["--no-ours", "--sparsity", "exact"])
    assert [j.runtime for make in cli.JOB_MAKERS for j in make(target, args, [])] == []
