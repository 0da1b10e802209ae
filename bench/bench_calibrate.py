#!/usr/bin/env python
"""Benchmark of prosparse-calibrate on a SiLU model (default: SmolLM2-135M-Instruct, real weights):
for each target sparsity, uniform and greedy per-layer allocation, held-out perplexity and decode
speed next to the dense model (and llama.cpp on the original file when llama-cpp-python is
installed). Prints a Markdown table, writes JSON and a plot.

  python bench/bench_calibrate.py [--targets 0.3 0.5 0.7] [--threads 2] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in ("python", "convert"):
    sys.path.insert(0, str(HERE.parent / p))

PROMPT = "The history of the printing press begins"


def offline_texts(out_dir: Path):
    """Calibration: the first half of Python's pydoc topics; held out: the second half."""
    from pydoc_data import topics

    vals = list(topics.topics.values())
    half = len(vals) // 2
    cal, held = out_dir / "calib.txt", out_dir / "held_out.txt"
    cal.write_text("\n\n".join(vals[:half]))
    held.write_text("\n\n".join(vals[half:]))
    return cal, held


def decode_speed(path, threads: int, n: int, sparsity: str = "auto"):
    from prosparse_rt import Model

    with Model(str(path), n_ctx=512, n_threads=threads, sparsity=sparsity) as m:
        m.generate(PROMPT, max_tokens=8, temperature=0.0)  # warm the mapping
        m2 = m.stats
        t0, d0 = m2["decode_seconds"], m2["n_decode_tokens"]
        m.generate(PROMPT + " ", max_tokens=n, temperature=0.0)
        s = m.stats
        secs, toks = s["decode_seconds"] - t0, s["n_decode_tokens"] - d0
        tps = toks / secs if secs else float("nan")
        return {"tok_s": tps, "strategy": s["strategy"], "bytes_per_token": s["weight_bytes_per_token"],
                "gb_s": tps * s["weight_bytes_per_token"] / 1e9}


def llama_cpp_speed(path, threads: int, n: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, verbose=False)
    llm(PROMPT, max_tokens=8, temperature=0.0)
    t = time.perf_counter()
    out = llm(PROMPT + " ", max_tokens=n, temperature=0.0)
    return {"tok_s": out["usage"]["completion_tokens"] / (time.perf_counter() - t)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="SiLU GGUF (default: the default SmolLM2 model)")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--allocations", nargs="+", default=["uniform", "greedy"])
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    ap.add_argument("--probe-tokens", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=Path("bench-calibrate"))
    args = ap.parse_args(argv)

    from prosparse_convert.calibrate import Options, calibrate, evaluate_file
    from prosparse_rt import default_model

    model = args.model or default_model.path()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    cal, held = offline_texts(args.out_dir)
    rows = []
    dense = None
    for target in args.targets:
        for alloc in args.allocations:
            out = args.out_dir / f"{model.stem}.{alloc}{int(round(100 * target))}.gguf"
            t0 = time.perf_counter()
            rep = calibrate(model, out, Options(text=[cal], tokens=args.tokens, target_sparsity=target,
                                                allocation=alloc, probe_tokens=args.probe_tokens,
                                                n_threads=args.threads, progress=False))
            secs = time.perf_counter() - t0
            ev = evaluate_file(model, out, held, max_tokens=args.eval_tokens, n_threads=args.threads, progress=False)
            if dense is None:
                d = ev[0]
                dense = {"config": "dense (input file)", "target": 0.0, "perplexity": d["perplexity"],
                         "ppl_change": 0.0, "sparsity": 0.0, **decode_speed(model, args.threads, args.decode_tokens)}
                rows.append(dense)
                peer = llama_cpp_speed(model, args.threads, args.decode_tokens)
                rows.append({"config": "llama.cpp (input file)", "target": 0.0,
                             "perplexity": float("nan"), "ppl_change": float("nan"), "sparsity": 0.0,
                             "tok_s": peer["tok_s"] if peer else float("nan"), "strategy": "llama.cpp" if peer
                             else "not installed", "bytes_per_token": float("nan"), "gb_s": float("nan")})
            ex = next(r for r in ev if r["strategy"] == "exact")
            row = {"config": f"{alloc} {int(round(100 * target))}%", "target": target, "allocation": alloc,
                   "perplexity": ex["perplexity"], "ppl_change": ex["ppl_change"], "sparsity": ex["sparsity"],
                   "calibrate_seconds": secs, "down_type": rep.down_type,
                   "probe_kl": rep.allocation_kl, **decode_speed(out, args.threads, args.decode_tokens)}
            rows.append(row)
            print(f"{row['config']}: ppl {row['perplexity']:.3f} ({100 * row['ppl_change']:+.2f}%), "
                  f"sparsity {100 * row['sparsity']:.1f}%, {row['tok_s']:.1f} tok/s, calibrated in {secs:.0f} s",
                  flush=True)

    print(f"\n{model.name}, {args.threads} threads, held-out: {held.name} ({rows[0].get('perplexity'):.3f} dense)\n")
    print("| configuration | held-out ppl | change | FFN sparsity | decode tok/s | GB/s | strategy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda v, fmt: "n/a" if v != v else format(v, fmt)  # noqa: E731
        print(f"| {r['config']} | {f(r['perplexity'], '.3f')} | "
              f"{'n/a' if r['ppl_change'] != r['ppl_change'] else format(100 * r['ppl_change'], '+.1f') + '%'} | "
              f"{100 * r['sparsity']:.1f}% | {f(r['tok_s'], '.1f')} | {f(r['gb_s'], '.2f')} | {r['strategy']} |")
    (args.out_dir / "bench_calibrate.json").write_text(json.dumps(rows, indent=2, default=str))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for alloc, mk in (("uniform", "o--"), ("greedy", "s-")):
            pts = [(r["sparsity"], 100 * r["ppl_change"]) for r in rows if r.get("allocation") == alloc]
            if pts:
                ax.plot(*zip(*pts), mk, label=alloc)
        ax.set_xlabel("FFN sparsity (held-out)")
        ax.set_ylabel("perplexity change vs dense (%)")
        ax.set_title(model.stem)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out_dir / "bench_calibrate.png", dpi=120)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
