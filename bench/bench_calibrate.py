#!/usr/bin/env python
"""Benchmark of prosparse-calibrate on a SiLU model (default: SmolLM2-135M-Instruct, real weights):
for each target sparsity, uniform and greedy per-layer allocation, held-out perplexity and decode
speed next to the dense model and next to llama.cpp on the original file (every llama-cpp-python
build that bench/setup_peer.sh made, the fastest reported). Prints a Markdown table, writes JSON and
a plot.

  python bench/bench_calibrate.py [--targets 0.3 0.5 0.7] [--threads 2] [--out-dir DIR] [--reuse]

Decode speed is measured as prosparse-bench measures it (its worker, one process per runtime and
file): --decode-tokens greedy one-token evals from position 0, --reps repetitions, the best kept.
With --reuse, a configuration whose file and JSON row are already in --out-dir is not calibrated
again: only the speeds are measured, e.g. later on a quiet machine with other --threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
# prosparse_bench lives beside this script. prosparse_rt and prosparse_convert come from the install,
# or, in a checkout without one, from `source scripts/devenv.sh` (PYTHONPATH, which the speed
# workers inherit). Importing this module must not change sys.path or the environment: the test
# suite imports it, and pointing every later subprocess at the source tree broke a fresh clone's run.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from prosparse_bench import report as bench_report  # noqa: E402
from prosparse_bench.cli import find_peers, parse_omp_waits, peer_configs, run_worker  # noqa: E402


def offline_texts(out_dir: Path):
    """Calibration: the first half of Python's pydoc topics; held out: the second half."""
    from pydoc_data import topics

    vals = list(topics.topics.values())
    half = len(vals) // 2
    cal, held = out_dir / "calib.txt", out_dir / "held_out.txt"
    cal.write_text("\n\n".join(vals[:half]))
    held.write_text("\n\n".join(vals[half:]))
    return cal, held


def _worker_args(args):
    return SimpleNamespace(threads=args.threads, pp=0, tg=args.decode_tokens, reps=args.reps, batch=512,
                           timeout=args.timeout, cache_type="f16", device="cpu", vram_budget=None)


def _tg(r: dict) -> dict:
    if "error" in r or "tg" not in r:
        return {"tok_s": float("nan"), "error": r.get("error", "no tg result")}
    mean, sd, rates = bench_report.summarize(r["tg"]["seconds"], r["tg"]["n_tokens"])
    return {"tok_s": max(rates), "tok_s_mean": mean, "tok_s_sd": sd, "tok_s_reps": rates}


def ours_speed(path, args, sparsity: str = "auto") -> dict:
    """prosparse-rt's decode tok/s on `path` (auto: exact on a thresholded file), and the weight
    bytes it reads per token by its own count."""
    r = run_worker(sys.executable, "ours", path, _worker_args(args), sparsity)
    out = _tg(r)
    st = r.get("stats_after_tg", {})
    out["strategy"] = r.get("strategy") or sparsity
    out["bytes_per_token"] = float(st.get("weight_bytes_per_token", float("nan")))
    return out


def llama_cpp_speed(path, args) -> dict:
    """llama.cpp's decode tok/s on `path` with every llama-cpp-python build found (prosparse-bench's
    discovery: ~/.cache/prosparse-bench/peer-*), each in its own process; the fastest is reported.
    As in prosparse-bench, each build runs with and without its extra buffer types (repacked
    weights: its fastest Q4_0 path here) and under each --peer-omp-wait policy
    (OMP_WAIT_POLICY=passive halves its 2-thread decode on SmolLM2, docs/bench.md)."""
    peers = find_peers(args.peer)
    bpt = float(bench_report.weight_bytes_per_token(path)["bytes_per_token"])
    if not peers:
        return {"tok_s": float("nan"), "strategy": "no llama-cpp-python build (bash bench/setup_peer.sh)",
                "bytes_per_token": bpt, "builds": {}}
    builds = {}
    for label, exe, xb, wait in peer_configs(peers, (False, True), parse_omp_waits(args.peer_omp_wait)):
        builds[label] = b = _tg(run_worker(exe, "llama.cpp", path, _worker_args(args), extra_bufts=xb, omp_wait=wait))
        print(f"  llama.cpp {label}: " + (f"{b['tok_s']:.1f} tok/s" if "error" not in b else b["error"]), flush=True)
    ok = {n: b for n, b in builds.items() if "error" not in b}
    if not ok:
        return {"tok_s": float("nan"), "strategy": "llama.cpp failed: " + "; ".join(
            f"{n}: {b['error']}" for n, b in builds.items()), "bytes_per_token": bpt, "builds": builds}
    best = max(ok, key=lambda n: ok[n]["tok_s"])
    return {**ok[best], "build": best, "strategy": f"llama.cpp ({best})", "bytes_per_token": bpt,
            "builds": builds}


def _write_preset(model: Path, out: Path, preset: dict):
    """The model `prosparse-run --sparsity exact` runs, written to a file: the shipped thresholds and
    ffn_down_t at the preset's type (F16 for the shipped ones, as the runtime builds it), no calibration."""
    from prosparse_convert.calibrate import Report, write_preset

    write_preset(model, out, preset)
    rep = Report(activation="silu", down_type=preset["down_type"])
    rep.layers = [{"threshold": t} for t in preset["thresholds"]]
    return rep


def _settings(args, model: Path) -> dict:
    """What a stored row's perplexity and sparsity depend on (not the threads: perplexity does not)."""
    return {"model": model.name, "model_size": model.stat().st_size, "tokens": args.tokens,
            "probe_tokens": args.probe_tokens, "eval_tokens": args.eval_tokens}


def _load_row(meta: Path, out: Path, settings: dict):
    """The stored row of a configuration, if --reuse may take it: the file and its row exist, the row
    was made with the same settings and describes this very file (its size)."""
    if not (meta.is_file() and out.is_file()):
        return None
    try:
        row = json.loads(meta.read_text())
    except ValueError:
        return None
    if row.get("settings") != settings or row.get("file_size") != out.stat().st_size:
        return None
    return row


def _save(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="SiLU GGUF (default: the default SmolLM2 model)")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--allocations", nargs="+", default=["uniform", "greedy"])
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    ap.add_argument("--probe-tokens", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3, help="decode repetitions (the best is reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer", default="auto",
                    help="llama-cpp-python builds, as prosparse-bench --peer: auto, none or NAME=PYTHON,...")
    ap.add_argument("--peer-omp-wait", default="default,active",
                    help="llama.cpp's OpenMP wait policies, as prosparse-bench --peer-omp-wait: each build "
                         "runs with each, the fastest is reported")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per speed measurement")
    ap.add_argument("--no-presets", dest="presets", action="store_false",
                    help="leave out the thresholds shipped for the default model (rows 'preset S%%', added "
                         "for each target that has them)")
    ap.add_argument("--out-dir", type=Path, default=Path("bench-calibrate"))
    ap.add_argument("--reuse", action="store_true",
                    help="skip calibration where --out-dir already holds the configuration's file and JSON "
                         "row (same settings); measure only the speeds")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        parse_omp_waits(args.peer_omp_wait)
    except ValueError as e:
        ap.error(str(e))

    from prosparse_convert.calibrate import Options, calibrate, evaluate_file
    from prosparse_rt import default_model

    model = Path(args.model or default_model.path())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    cal, held = offline_texts(args.out_dir)
    settings = _settings(args, model)
    rows = []

    def flush():
        _save(args.out_dir / "bench_calibrate.json", rows)

    dense_meta = args.out_dir / f"{model.stem}.dense.json"
    dense = _load_row(dense_meta, model, settings) if args.reuse else None
    if dense is None:
        dense = {"config": "dense (input file)", "target": 0.0, "settings": settings,
                 "file_size": model.stat().st_size, "perplexity": float("nan"), "ppl_change": 0.0,
                 "sparsity": 0.0}
    print(f"dense (input file): measuring speeds, {args.threads} threads ...", flush=True)
    dense.update(ours_speed(model, args, "auto"), threads=args.threads)
    peer = {"config": "llama.cpp (input file)", "target": 0.0, "perplexity": float("nan"),
            "ppl_change": float("nan"), "sparsity": 0.0, "threads": args.threads,
            **llama_cpp_speed(model, args)}
    rows += [dense, peer]
    flush()
    from prosparse_convert.calibrate import _preset

    for target in args.targets:
        # the thresholds shipped for the default model (what prosparse-run runs), when the file has some
        preset = _preset(model, target) if args.presets else None
        for alloc in args.allocations + (["preset"] if preset else []):
            name = f"{model.stem}.{alloc}{int(round(100 * target))}"
            out, meta = args.out_dir / f"{name}.gguf", args.out_dir / f"{name}.json"
            row = _load_row(meta, out, settings) if args.reuse else None
            if row is not None:
                print(f"{row['config']}: reusing {out.name}", flush=True)
            else:
                t0 = time.perf_counter()
                if alloc == "preset":
                    rep = _write_preset(model, out, preset)
                else:
                    rep = calibrate(model, out, Options(text=[cal], tokens=args.tokens, target_sparsity=target,
                                                        allocation=alloc, probe_tokens=args.probe_tokens,
                                                        n_threads=args.threads, progress=False))
                secs = time.perf_counter() - t0
                ev = evaluate_file(model, out, held, max_tokens=args.eval_tokens, n_threads=args.threads,
                                   progress=False)
                ex = next(r for r in ev if r["strategy"] == "exact")
                row = {"config": f"{alloc} {int(round(100 * target))}%", "target": target, "allocation": alloc,
                       "settings": settings, "file_size": out.stat().st_size,
                       "perplexity": ex["perplexity"], "ppl_change": ex["ppl_change"], "sparsity": ex["sparsity"],
                       "down_type": rep.down_type, "down_check": rep.down_check, "probe_kl": rep.allocation_kl,
                       "levels": [r.get("level") for r in rep.layers],
                       "thresholds": [r["threshold"] for r in rep.layers]}
                if alloc != "preset":
                    row.update(calibrate_seconds=secs, calibrate_threads=args.threads)
                if dense["perplexity"] != dense["perplexity"]:
                    dense["perplexity"] = ev[0]["perplexity"]
                    _save(dense_meta, dense)
            if dense["perplexity"] != dense["perplexity"]:  # every configuration reused, dense row lost
                dense["perplexity"] = evaluate_file(model, out, held, max_tokens=args.eval_tokens,
                                                    n_threads=args.threads, progress=False)[0]["perplexity"]
                _save(dense_meta, dense)
            row.update(ours_speed(out, args, "auto"), threads=args.threads)
            _save(meta, row)
            rows.append(row)
            flush()
            print(f"{row['config']}: ppl {row['perplexity']:.3f} ({100 * row['ppl_change']:+.2f}%), "
                  f"sparsity {100 * row['sparsity']:.1f}%, ffn_down_t {row['down_type']}, "
                  f"{row['tok_s']:.1f} tok/s", flush=True)

    print(f"\n{model.name}, decode {args.decode_tokens} tokens (best of {args.reps}), {args.threads} threads, "
          f"held-out: {held.name} ({dense['perplexity']:.3f} dense)\n")
    print(markdown(rows))
    flush()
    plot(rows, model, args.out_dir / "bench_calibrate.png")
    return 0


def markdown(rows) -> str:
    f = lambda v, fmt: "n/a" if v != v else format(v, fmt)  # noqa: E731
    lines = ["| configuration | held-out ppl | change | FFN sparsity (held-out) | decode tok/s | "
             "MB read/token | ffn_down_t | calibration time |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = r["config"]
        if r.get("build"):
            label = f"llama.cpp (input file, best build: {r['build']})"
        elif r["config"].startswith("llama.cpp") and r["tok_s"] != r["tok_s"]:
            label += f" ({r['strategy']})"
        ch = "" if r["ppl_change"] != r["ppl_change"] or r["target"] == 0 else f"{100 * r['ppl_change']:+.1f}%"
        ppl = "" if r["perplexity"] != r["perplexity"] else f"{r['perplexity']:.3f}"
        secs = (f"{r['calibrate_seconds']:.0f} s" if "calibrate_seconds" in r else
                "shipped" if r.get("allocation") == "preset" else "")
        lines.append(f"| {label} | {ppl} | {ch} | {100 * r['sparsity']:.1f}% | {f(r['tok_s'], '.1f')} | "
                     f"{f(r['bytes_per_token'] / 1e6, '.1f')} | {r.get('down_type') or ''} | {secs} |")
    return "\n".join(lines)


def plot(rows, model: Path, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for alloc, mk, label in (("uniform", "o--", "uniform"), ("greedy", "s-", "greedy"),
                             ("preset", "D", "shipped presets (prosparse-run)")):
        pts = [(r["sparsity"], 100 * r["ppl_change"]) for r in rows if r.get("allocation") == alloc]
        if pts:
            ax.plot(*zip(*pts), mk, label=label, **({"markerfacecolor": "none", "markersize": 9}
                                                     if alloc == "preset" else {}))
    ax.set_xlabel("FFN sparsity (held-out)")
    # 5% and 25% would vanish beside 70%'s +230% on a linear axis (symlog where a change is <= 0)
    changes = [r["ppl_change"] for r in rows if r.get("allocation")]
    ax.set_yscale("log" if changes and min(changes) > 0 else "symlog")
    ax.set_ylabel("perplexity change vs dense (%, log)")
    ax.set_title(model.stem)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
