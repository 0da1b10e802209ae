"""prosparse-bench --serve: finding llama-server, the setup script's destination, the arithmetic of
the table, and a whole run on a tiny model against prosparse-server and a stand-in llama-server (a
stdlib HTTP server that speaks llama-server's command line and streaming API and records what it
was asked), so that what both servers are sent can be checked."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from prosparse_bench import cli, report, serve, synth  # noqa: E402

pytest.importorskip("uvicorn")
REPO = Path(__file__).resolve().parent.parent
TINY = synth.Shape(n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512, n_vocab=600, n_ctx=256)


def _exe(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_llama_servers_come_from_the_env_then_the_cache(tmp_path):
    a = _exe(tmp_path / "x" / "llama-server")
    built = _exe(tmp_path / "cache" / "llama-server-avx512" / "bin" / "llama-server")
    (built.parent.parent / ".prosparse-bench-ok").touch()
    _exe(tmp_path / "cache" / "llama-server-default" / "bin" / "llama-server")  # unfinished build: no marker
    env = {serve.ENV_LLAMA_SERVER: f"tmpbuild={a}"}
    assert serve.find_llama_servers("auto", tmp_path / "cache", env) == [("tmpbuild", str(a)), ("avx512", str(built))]
    assert serve.find_llama_servers("auto", tmp_path / "cache", {}) == [("avx512", str(built))]
    # the same binary listed and cached is measured once; two unnamed ones get distinct names
    env = {serve.ENV_LLAMA_SERVER: str(built)}
    assert serve.find_llama_servers("auto", tmp_path / "cache", env) == [("avx512", str(built))]
    b = _exe(tmp_path / "y" / "llama-server")
    assert [n for n, _ in serve.find_llama_servers(f"{a},{b}", tmp_path, {})] == ["llama-server0", "llama-server1"]
    assert serve.find_llama_servers("none", tmp_path / "cache", env) == []
    with pytest.raises(ValueError, match=serve.ENV_LLAMA_SERVER + ".*nowhere"):
        serve.find_llama_servers("auto", tmp_path, {serve.ENV_LLAMA_SERVER: str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="--llama-server.*not an executable"):
        serve.find_llama_servers(str(tmp_path), tmp_path, {})  # a folder


def test_setup_peer_builds_llama_server_where_the_bench_looks(tmp_path):
    """The setup script's llama-server step (dry run: its commands) ends with the binary and the
    marker that find_llama_servers('auto') takes."""
    r = subprocess.run(["bash", str(REPO / "bench" / "setup_peer.sh"), "server"], capture_output=True, text=True,
                       env={**os.environ, "PEER_ROOT": str(tmp_path), "PEER_DRY_RUN": "1"}, check=True)
    cmds = [line[2:] for line in r.stdout.splitlines() if line.startswith("+ ")]
    cmake = next(c for c in cmds if c.startswith("cmake -S"))
    assert f"{tmp_path}/src/llama_cpp_python-0.3.36/vendor/llama.cpp" in cmake and "-DLLAMA_BUILD_SERVER=ON" in cmake
    assert any(c.endswith("--target llama-server -j 2") for c in cmds)
    dest = tmp_path / "llama-server-default"
    assert cmds[-1] == f"touch {dest}/.prosparse-bench-ok"
    assert f"cp {dest}/build/bin/llama-server {dest}/bin/llama-server" in cmds
    _exe(dest / "bin" / "llama-server")
    (dest / ".prosparse-bench-ok").touch()
    assert serve.find_llama_servers("auto", tmp_path, {}) == [("default", str(dest / "bin" / "llama-server"))]
    bad = subprocess.run(["bash", str(REPO / "bench" / "setup_peer.sh"), "nonsense"], capture_output=True, text=True,
                         env={**os.environ, "PEER_ROOT": str(tmp_path)})
    assert bad.returncode == 2 and "usage" in bad.stderr


@pytest.mark.parametrize("argv, msg", [(["--serve", "1,x"], "--serve: expected"), (["--serve", "2,1"], "--serve"),
                                       (["--serve", "0,1"], "--serve"),
                                       (["--serve", "1", "--serve-ctx", "32", "-n", "64"], "--serve-ctx 32")])
def test_bad_serve_options_are_refused_naming_them(argv, msg, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert msg in capsys.readouterr().err


def test_serve_defaults_differ_from_the_token_bench_only_where_unset():
    a = cli.parse_args(["--serve", "1,2,4,8"])
    assert (a.serve_counts, a.tg, a.reps) == ([1, 2, 4, 8], 64, 2)
    b = cli.parse_args([])
    assert (b.serve, b.tg, b.reps) == (None, 128, 3)
    c = cli.parse_args(["--serve", "1", "-n", "8", "-r", "1"])
    assert (c.tg, c.reps) == (8, 1)


def _run(streams, label, runtime, tok_s, **kw):
    return {"streams": streams, "config": label, "runtime": runtime, "tok_s": tok_s, "sd": 0.0,
            "texts": kw.pop("texts", ["a"] * streams), **kw}


def test_table_ratios_and_aims_are_computed_from_the_runs():
    ours, peer_a, peer_b = "prosparse-server predict", "llama-server (x)", "llama-server (x fa)"
    runs = [_run(1, ours, "ours", 10.0, union_sparsity=0.8), _run(2, ours, "ours", 17.0, gbps=1.25),
            _run(4, ours, "ours", 26.0, union_sparsity=0.5),
            _run(1, peer_a, "llama-server", 8.0), _run(1, peer_b, "llama-server", 9.0),
            _run(2, peer_a, "llama-server", 18.0), _run(2, peer_b, "llama-server", 12.0),
            _run(4, peer_a, "llama-server", 20.0), {"streams": 4, "config": peer_b, "runtime": "llama-server",
                                                     "error": "exit 132"}]
    res = {"streams": [1, 2, 4], "threads": 2, "cpu": "CPU", "tokens_per_stream": 8, "prompt_tokens": 16,
           "reps": 1, "rounds": 1, "models": [{"spec": "7b-fatrelu", "name": "m", "path": "a", "peer_path": "b",
                                                "runs": runs}]}
    serve.summarize(res)
    m = res["models"][0]
    rows = {r["streams"]: r for r in m["table"]}
    assert rows[1]["peer"] == peer_b and rows[1]["vs_peer"] == pytest.approx(10 / 9)
    assert rows[2]["peer"] == peer_a and rows[2]["vs_peer"] == pytest.approx(17 / 18)
    assert rows[4]["vs_ours_1"] == pytest.approx(2.6) and rows[4]["peer_vs_1"] == pytest.approx(20 / 9)
    assert rows[4]["union_sparsity"] == 0.5
    assert m["aims"] == {"four_vs_one": pytest.approx(2.6), "four_vs_one_aim": 2.5, "four_vs_one_met": True,
                         "ahead_of_llama_server_everywhere": False}  # behind at 2 streams
    md = serve.markdown(res)
    assert "| 2 | prosparse-server predict | 17.00 ± 0.00 | 1.2 | 1.70x | - | llama-server (x) | 18.00 ± 0.00 | - | 2.00x | 0.94x |" in md
    assert "4 streams vs 1: 2.60x (aim >= 2.5x: met)" in md and "ahead of llama-server at every concurrency: NO" in md
    assert "llama-server (x fa) at 4 streams failed: exit 132" in md


FAKE = textwrap.dedent('''\
    #!{python}
    """A stand-in llama-server: llama-server's flags, /health, and streamed /v1/completions."""
    import json, os, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    argv = sys.argv[1:]
    log = os.environ["FAKE_LLAMA_LOG"]
    with open(os.path.join(log, "argv.jsonl"), "a") as f:
        f.write(json.dumps(argv) + "\\n")
    if "--repack" in argv:  # as the native build's repacked weights do on this VM's CPU
        sys.exit(132)
    port = int(argv[argv.index("--port") + 1])

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b'{{"status": "ok"}}')

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with open(os.path.join(log, "bodies.jsonl"), "a") as f:
                f.write(json.dumps(body) + "\\n")
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            n = body["max_tokens"]
            for i in range(n):
                time.sleep(0.002)
                self.wfile.write(b"data: " + json.dumps({{"choices": [{{"text": "t", "index": 0}}]}}).encode() + b"\\n\\n")
            final = {{"choices": [{{"text": "", "index": 0, "finish_reason": "length"}}],
                     "usage": {{"completion_tokens": n, "prompt_tokens": len(body["prompt"])}}}}
            self.wfile.write(b"data: " + json.dumps(final).encode() + b"\\n\\ndata: [DONE]\\n\\n")

    ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
''')


@pytest.mark.slow
def test_a_serving_run_beside_a_stand_in_llama_server(tmp_path, monkeypatch, capsys):
    model = synth.write_dense(tmp_path / "tiny.gguf", TINY, "q4_0")
    fake = _exe(tmp_path / "fake" / "llama-server", FAKE.format(python=sys.executable))
    log = tmp_path / "log"
    log.mkdir()
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(log))
    monkeypatch.setenv(serve.ENV_LLAMA_SERVER, f"fake={fake}")
    out = tmp_path / "res"
    rc = cli.main(["--serve", "1,2", "-m", str(model), "-n", "5", "-r", "1", "-t", "2", "--serve-ctx", "64",
                   "--peer-omp-wait", "default", "--llama-server", "auto", "--results", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    res = json.loads(next(out.glob("serve-*.json")).read_text())
    assert next(out.glob("serve-*.png")).stat().st_size > 0
    m = res["models"][0]
    ok = [r for r in m["runs"] if "error" not in r]
    failed = [r for r in m["runs"] if "error" in r]
    # ours and the two flash-attention settings of the fake at 1 and 2 streams; its repack runs fail
    # to start at 1 stream, and are not tried again
    assert sorted((r["config"], r["streams"]) for r in ok) == sorted(
        (c, n) for c in ("prosparse-server auto", "llama-server (fake)", "llama-server (fake fa)") for n in (1, 2))
    assert sorted((r["config"], r["streams"]) for r in failed) == sorted(
        (c, 1) for c in ("llama-server (fake repack)", "llama-server (fake repack fa)"))
    assert all("exited with 132 while starting" in r["error"] for r in failed)
    assert set(m["dropped"]) == {"llama-server (fake repack)", "llama-server (fake repack fa)"}
    assert "llama-server (fake repack fa): not run at more streams: did not start at 1 streams" in text
    for r in ok:  # every stream generated -n tokens; the aggregate is their sum over the wall time
        assert r["tokens"] == 5 * r["streams"]
        assert r["tok_s"] == pytest.approx(r["tokens"] / r["wall_s"][0])
    ours = {r["streams"]: r for r in ok if r["runtime"] == "ours"}
    assert ours[2]["union_sparsity"] is None  # a dense model: no union to report
    # GB/s: a dense step reads every weight once, whatever its token count: the file's bytes
    dense = report.weight_bytes_per_token(m["path"])["bytes_per_token"]
    for r in ok:
        if r["runtime"] == "ours" and r["streams"] > 1 and r["weight_bytes_per_step"] is None:
            continue  # 5 tokens per stream: the streams may never all decode in one step
        assert r["weight_bytes_per_step"] == pytest.approx(dense, rel=0.02)
        assert r["gbps"] == pytest.approx(r["weight_bytes_per_step"] * r["tok_s"] / r["streams"] / 1e9)
    assert m["texts_same_at_every_concurrency"] == {"prosparse-server auto": True}
    rows = {r["streams"]: r for r in m["table"]}
    best2 = max((r for r in ok if r["runtime"] == "llama-server" and r["streams"] == 2), key=lambda r: r["tok_s"])
    assert rows[2]["vs_peer"] == pytest.approx(ours[2]["tok_s"] / best2["tok_s"])
    assert rows[2]["vs_ours_1"] == pytest.approx(ours[2]["tok_s"] / ours[1]["tok_s"])
    assert "| 2 | prosparse-server auto |" in text and res["cpu"] in text
    # llama-server got its fair flags: -np N, -c N x the slot context, the threads for both phases
    for argv in map(json.loads, (log / "argv.jsonl").read_text().splitlines()):
        n = int(argv[argv.index("-np") + 1])
        assert int(argv[argv.index("-c") + 1]) == 64 * n
        assert argv[argv.index("-t") + 1] == argv[argv.index("-tb") + 1] == "2"
        assert argv[argv.index("-fa") + 1] in ("on", "off")
    # the same greedy, ignore_eos requests with the same prompts as ours (which counted 5 tokens each)
    bodies = [json.loads(x) for x in (log / "bodies.jsonl").read_text().splitlines()]
    timed = [b for b in bodies if b["max_tokens"] == 5]
    assert {(b["temperature"], b["ignore_eos"], b["stream"]) for b in timed} == {(0, True, True)}
    assert {tuple(b["prompt"]) for b in timed} == {tuple(p) for p in serve.prompts(TINY.n_vocab, 2)}
    assert all(len(b["prompt"]) == serve.PROMPT_TOKENS for b in bodies)


def test_peer_keep_runs_only_the_fastest_llama_server_configurations_further():
    cfgs = [serve.ServerConfig("ours", "ours")] + [serve.ServerConfig("llama-server", f"p{i}") for i in range(4)]
    cells = {("ours", 1): {"tok_s": 1.0}, ("p0", 1): {"tok_s": 5.0}, ("p1", 1): {"tok_s": 9.0},
             ("p2", 1): {"error": "the server was killed by SIGILL while starting (log: x): ..."},
             ("p3", 1): {"tok_s": 7.0}}
    assert set(serve._drop_peers(cfgs, cells, 1, 0, {})) == {"p2"}
    dropped = serve._drop_peers(cfgs, cells, 1, 2, {})
    assert set(dropped) == {"p0", "p2"} and "--peer-keep" in dropped["p0"]  # p1 and p3 go on, and ours
    # a failure during the timed run (not at start) keeps the configuration: it is reported where it fails
    cells[("p2", 1)] = {"error": "streams generated [3] tokens, not 4 each"}
    assert set(serve._drop_peers(cfgs, cells, 1, 0, {})) == set()


def test_aims_need_every_figure_but_one_shortfall_decides():
    row = lambda n, v1, vp: {"streams": n, "vs_ours_1": v1, "vs_peer": vp}  # noqa: E731
    a = serve._aims("smollm2", [row(1, 1.0, 1.2), row(2, 1.3, None), row(4, 1.5, 1.1)])
    assert (a["four_vs_one_met"], a["ahead_of_llama_server_everywhere"]) == (False, None)  # 1.5 < 1.6
    a = serve._aims("smollm2", [row(1, 1.0, 0.9), row(2, 1.3, None), row(4, 1.7, 1.1)])
    assert (a["four_vs_one_met"], a["ahead_of_llama_server_everywhere"]) == (True, False)
    a = serve._aims("7b-fatrelu-r256", [row(2, 1.0, 1.2), row(4, 2.6, 1.1)])  # no 1-stream figure
    assert (a["four_vs_one_aim"], a["four_vs_one"], a["four_vs_one_met"]) == (2.5, None, None)
    assert serve._aims("model.gguf", [row(1, 1.0, 1.2)])["four_vs_one_aim"] is None
