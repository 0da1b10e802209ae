#!/usr/bin/env python
"""Benchmark of prosparse-server: aggregate decode tokens/s against the number of concurrent
streams. Starts the server as a process (-np = the largest count), then for each count N sends N
streamed greedy completions at once (different prompts, --tokens new tokens each, through the HTTP
API as any client would) and measures the completion tokens of all N over the wall time from the
first request sent to the last stream's end. Also checks that each prompt's text is the same at
every N (the batch-invariance rule), and reads the FFN's union sparsity by batch size from /stats.
Prints a Markdown table, writes JSON and a plot.

  python bench/bench_server.py [-m FILE] [--streams 1,2,4,8] [--tokens 64] [-t 2] [--sparsity exact]
      [--target-sparsity 0.3] [--reps 2] [--out-dir DIR]

Without -m: the default model (SmolLM2-135M-Instruct Q4_1).
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPTS = [
    "The history of the printing press begins", "In a small village by the sea, there lived",
    "The main reasons for the French Revolution were", "To make a good cup of coffee, you should",
    "The theory of relativity says that", "A recipe for bread: first, mix", "The planets of the solar system are",
    "Once upon a time, a robot named", "The best way to learn a language is", "Photosynthesis is the process by which",
    "In 1969, the first humans", "The stock market works by", "Mountains are formed when",
    "A good software engineer", "The ocean covers most of", "Music has always been",
]


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, n_parallel: int):
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "prosparse_rt.server", "--port", str(port), "-np", str(n_parallel),
           "-c", str(args.ctx), "--sparsity", args.sparsity]
    if args.model:
        cmd += ["-m", args.model]
    if args.threads:
        cmd += ["-t", str(args.threads)]
    if args.target_sparsity is not None:
        cmd += ["--target-sparsity", str(args.target_sparsity)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench_server: the server exited {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("bench_server: the server did not start in 300 s")


def one_stream(url: str, prompt: str, tokens: int, out: dict, go: threading.Barrier) -> None:
    import httpx

    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    go.wait()
    pieces, usage = [], None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                pieces.append(c["text"])
    out.update(text="".join(pieces), tokens=usage["completion_tokens"], end=time.perf_counter())


def run_streams(url: str, n: int, tokens: int) -> dict:
    outs = [dict() for _ in range(n)]
    go = threading.Barrier(n + 1)
    threads = [threading.Thread(target=one_stream, args=(url, PROMPTS[i % len(PROMPTS)], tokens, outs[i], go))
               for i in range(n)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = max(o["end"] for o in outs) - t0
    total = sum(o["tokens"] for o in outs)
    return {"wall_s": wall, "tokens": total, "tok_s": total / wall, "texts": [o["text"] for o in outs]}


def bench(args) -> dict:
    import httpx

    counts = [int(x) for x in args.streams.split(",")]
    proc, url = start_server(args, max(counts))
    try:
        run_streams(url, 1, 8)  # warm-up
        rows, first_text = [], {}
        for n in counts:
            best = None
            for _ in range(args.reps):
                r = run_streams(url, n, args.tokens)
                if best is None or r["tok_s"] > best["tok_s"]:
                    best = r
            same = True
            for i, text in enumerate(best["texts"]):
                same &= first_text.setdefault(i, text) == text
            rows.append({"streams": n, "tok_s": best["tok_s"], "tokens": best["tokens"], "wall_s": best["wall_s"],
                         "texts_as_alone": same})
            print(f"  {n} streams: {best['tok_s']:.1f} tok/s aggregate ({best['tokens']} tokens in "
                  f"{best['wall_s']:.2f} s)", file=sys.stderr, flush=True)
        stats = httpx.get(url + "/stats").json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    base = rows[0]["tok_s"]
    union = {int(k): v for k, v in stats["union_fraction_by_batch"].items()}
    for r in rows:
        r["speedup"] = r["tok_s"] / base
        u = union.get(r["streams"])
        r["union_sparsity"] = None if u is None else 1.0 - u
    return {"model": args.model or "SmolLM2-135M-Instruct Q4_1 (default)", "cpu": cpu_name(),
            "threads": args.threads, "strategy": stats["strategy"], "target_sparsity": args.target_sparsity,
            "tokens_per_stream": args.tokens, "token_sparsity": None if stats["active_fraction"] is None
            else 1.0 - stats["active_fraction"], "rows": rows}


def markdown(res: dict) -> str:
    lines = [f"{res['model']}, strategy {res['strategy']}, {res['threads'] or 'all'} threads, {res['cpu']}; "
             f"{res['tokens_per_stream']} greedy tokens per stream",
             "", "| streams | aggregate tok/s | vs 1 stream | FFN union sparsity | texts as alone |",
             "|---:|---:|---:|---:|:---:|"]
    for r in res["rows"]:
        u = "-" if r["union_sparsity"] is None else f"{100 * r['union_sparsity']:.1f}%"
        lines.append(f"| {r['streams']} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | {u} | "
                     f"{'yes' if r['texts_as_alone'] else 'NO'} |")
    if res["token_sparsity"] is not None:
        lines.append(f"\nPer-token FFN sparsity (one token alone): {100 * res['token_sparsity']:.1f}%.")
    return "\n".join(lines)


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for res in results:
        xs = [r["streams"] for r in res["rows"]]
        ax.plot(xs, [r["tok_s"] for r in res["rows"]], marker="o", label=f"{res['strategy']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate decode tok/s")
    ax.set_title(f"prosparse-server, {results[0]['cpu']}", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default=None, help="GGUF file (default: the default model)")
    p.add_argument("--streams", default="1,2,4,8", help="concurrent stream counts (default 1,2,4,8)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per stream (default 64)")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("-c", "--ctx", type=int, default=512, help="context per slot (default 512)")
    p.add_argument("--sparsity", default="dense,exact", help="strategies, comma-separated (default dense,exact)")
    p.add_argument("--target-sparsity", type=float, default=None,
                   help="shipped SiLU thresholds for this sparsity (default model; exact needs them)")
    p.add_argument("--reps", type=int, default=2, help="runs per count, the best kept (default 2)")
    p.add_argument("--out-dir", default="bench_out", help="where the JSON and the plot go")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for strategy in args.sparsity.split(","):
        print(f"bench_server: {strategy}", file=sys.stderr, flush=True)
        results.append(bench(argparse.Namespace(**{**vars(args), "sparsity": strategy})))
        print(markdown(results[-1]) + "\n")
    (out / "bench_server.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "bench_server.png")
    print(f"bench_server: wrote {out / 'bench_server.json'} and {out / 'bench_server.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
