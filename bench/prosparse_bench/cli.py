"""prosparse-bench: prompt processing (pp) and decode (tg) tokens/s of prosparse-rt beside
llama.cpp (llama-cpp-python) on the same GGUF with the same threads, llama-bench style.

    prosparse-bench                       # SmolLM2-135M Q4_1 and the 7B shape (if generated)
    prosparse-bench -m 7b --gen           # generate the random LLaMA-2-7B-shaped Q4_0 file first
    prosparse-bench -m smollm2 -p 512 -n 128 -r 5 -t 2 -o json
    prosparse-bench -m 7b-fatrelu --gen   # ours dense/exact/predict vs llama.cpp dense
    prosparse-bench -m smollm2 --depth 0,1024,4096   # pp and tg after that many tokens of context
    prosparse-bench --serve 1,2,4,8 -m smollm2 -m 7b-fatrelu -n 64 -r 2
                                          # prosparse-server beside llama-server -np N (serve.py)

llama-cpp-python builds are found as ~/.cache/prosparse-bench/peer-*/ (bench/setup_peer.sh makes
them); each model is run with every build and ours is compared with the faster one.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from . import bandwidth, report, serve, synth

BENCH_DIR = Path(__file__).resolve().parent.parent


def find_peers(spec: str):
    """[(build name, python executable)] for llama-cpp-python."""
    if spec == "none":
        return []
    if spec == "auto":
        return [(p.name[len("peer-"):], str(p / "bin" / "python"))
                for p in sorted(synth.cache_dir().glob("peer-*"))
                if (p / ".prosparse-bench-ok").exists()]  # written when setup_peer.sh's build succeeded
    out = []
    for item in spec.split(","):
        name, _, exe = item.rpartition("=")
        out.append((name or Path(exe).parent.parent.name, exe))
    return out


def resolve_model(spec: str, args):
    if spec == "smollm2":
        from prosparse_rt import default_model
        path = Path(default_model.path())
        return "SmolLM2-135M Q4_1", path, path
    fat = re.fullmatch(r"7b-fatrelu(?:-r(\d+))?", spec)
    if fat:
        # ours on the sparse FATReLU file, llama.cpp on a dense SiLU file of the same shapes and
        # weight type (llama.cpp refuses files with our extra tensors); -rN: a rank-N predictor
        # instead of rank 1024, to compare what predictor rank costs in bytes and speed
        rank = int(fat.group(1) or 1024)
        try:
            path = synth.fatrelu_7b(args.qtype, generate=args.gen, progress=_progress, rank=rank)
        except ValueError as e:
            raise SystemExit(f"prosparse-bench: {spec}: {e}")
        peer_path = synth.dense_7b(args.qtype, generate=args.gen, progress=_progress)
        return (f"LLaMA-2-7B shape FATReLU {args.qtype.upper()} (random, 89% sparse, rank-{rank} predictor)",
                path, peer_path)
    if spec in ("7b", "7b-q4_0", "7b-q8_0"):
        qtype = spec[3:] if "-" in spec else args.qtype
        path = synth.dense_7b(qtype, generate=args.gen, progress=_progress)
        return f"LLaMA-2-7B shape {qtype.upper()} (random)", path, path
    p = Path(spec)
    if not p.is_file():
        raise SystemExit(f"prosparse-bench: no such model file: {spec}")
    return p.name, p, p


def _progress(i, n, name):
    if i % 25 == 0 or i == n:
        print(f"  generating: {i}/{n} tensors ({name})", file=sys.stderr, flush=True)


OMP_WAITS = ("default", "active", "passive")


def parse_omp_waits(value: str) -> list:
    """--peer-omp-wait's comma-separated policies; ValueError naming the option if any is unknown."""
    waits = value.split(",") if value else []
    if not waits or any(w not in OMP_WAITS for w in waits):
        raise ValueError(f"--peer-omp-wait: expected default, active or passive, got {value!r}")
    return waits


def peer_configs(peers, extra_bufts, waits):
    """Every llama.cpp configuration to measure, as (label, python, extra_bufts, omp_wait): each
    build with each extra-buffer setting under each OpenMP wait policy."""
    for build, exe in peers:
        for x in extra_bufts:
            for w in waits:
                yield build + ("+extra-bufts" if x else "") + (f" omp-{w}" if len(waits) > 1 else ""), exe, x, w


def run_worker(python, runtime, model, args, sparsity=None, extra_bufts=False, omp_wait=None, depth=0,
               flash_attn=False):
    cmd = [python, "-m", "prosparse_bench.worker", "--runtime", runtime, "--model", str(model),
           "--threads", str(args.threads), "--pp", str(args.pp), "--tg", str(args.tg),
           "--reps", str(args.reps), "--batch", str(args.batch), "--depth", str(depth),
           "--cache-type", args.cache_type]
    if flash_attn:
        cmd.append("--flash-attn")
    if runtime == "ours":
        cmd += ["--device", args.device] + (["--vram-budget", str(args.vram_budget)] if args.vram_budget is not None else [])
    if sparsity:
        cmd += ["--sparsity", sparsity]
    if extra_bufts and runtime == "llama.cpp":
        cmd.append("--extra-bufts")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if runtime == "llama.cpp" and omp_wait:
        # llama.cpp's ggml runs its threads with OpenMP: "passive" sleeps at every barrier (hundreds
        # per token: on a small model that halves its 2-thread speed), "active" always spins
        # (collapses when another process wants the cores), unset is libgomp's spin-then-sleep.
        if omp_wait == "default":
            env.pop("OMP_WAIT_POLICY", None)
        else:
            env["OMP_WAIT_POLICY"] = omp_wait.upper()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {res.returncode}: " + " / ".join(tail)}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _pool_rounds(a: dict, b: dict) -> dict:
    """One configuration's results over two rounds: the repetitions of both (a failed round
    fails the configuration); everything else from the first round."""
    if "error" in a:
        return a
    if "error" in b:
        return b
    for t in ("pp", "tg"):
        if t in a and t in b:
            a[t]["seconds"] = list(a[t]["seconds"]) + list(b[t]["seconds"])
            a[t]["n_tokens"] = list(a[t]["n_tokens"]) + list(b[t]["n_tokens"])
    a["logits_finite"] = a.get("logits_finite", True) and b.get("logits_finite", True)
    return a


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prosparse-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", action="append",
                    help="smollm2, 7b (the random LLaMA-2-7B shape), 7b-q4_0, 7b-q8_0, 7b-fatrelu "
                         "(89%% sparse, with a rank-1024 predictor; llama.cpp runs the dense 7b file), "
                         "7b-fatrelu-rN (the same with a rank-N predictor), or a "
                         "GGUF path; repeatable (default: smollm2 and 7b)")
    ap.add_argument("-p", "--pp", type=int, default=512, help="prompt tokens (pp test; 0 skips)")
    ap.add_argument("-n", "--tg", type=int, default=None,
                    help="decoded tokens (tg test; 0 skips; default 128); with --serve, tokens per stream (default 64)")
    ap.add_argument("-r", "--reps", type=int, default=None,
                    help="repetitions (mean ± sd; default 3); with --serve, runs at each concurrency (default 2)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every configuration this many times in turn (round robin), pooling "
                         "the repetitions: on a VM whose memory bandwidth drifts over minutes, each "
                         "configuration then samples the whole run instead of one stretch of it")
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads, same for both runtimes")
    ap.add_argument("-b", "--batch", type=int, default=512, help="prompt batch size, both runtimes")
    ap.add_argument("--qtype", default="q4_0", choices=["q4_0", "q8_0"], help="weights of the 7B shape")
    ap.add_argument("--gen", action="store_true", help="generate the 7B-shaped file if not cached")
    ap.add_argument("--sparsity", default=None,
                    help="our FFN strategies to run, comma-separated (dense, exact, predict, auto); "
                         "default dense, and dense,exact,predict for 7b-fatrelu")
    ap.add_argument("--peer", default="auto",
                    help="llama-cpp-python builds: auto (all under the cache), none, or "
                         "NAME=PYTHON,... interpreters that import llama_cpp")
    ap.add_argument("--peer-extra-bufts", choices=["off", "on", "both"], default="both",
                    help="llama.cpp's extra buffer types (weight repacking, AMX): 'both' (default) "
                         "runs each build with and without them, since they are llama.cpp's fastest "
                         "Q4_0 path here; on CPUs with AMX they may crash on the first decode, which "
                         "is reported as such (then use 'off')")
    ap.add_argument("--peer-omp-wait", default="default,active",
                    help="llama.cpp's OpenMP wait policies to run, comma-separated: default (libgomp's "
                         "spin-then-sleep), active (spin), passive (sleep at every barrier); each "
                         "build runs with each, and ours is compared with the fastest")
    ap.add_argument("--peer-flash-attn", choices=["off", "on", "both"], default="both",
                    help="llama.cpp's flash attention: 'both' (default) runs each configuration with "
                         "and without it, and ours is compared with the faster")
    ap.add_argument("--depth", default="0",
                    help="tokens of context before each test, comma-separated (llama-bench's -d): "
                         "every test runs at every depth")
    ap.add_argument("--cache-type", default="f16", choices=["f16", "f32", "q8_0"],
                    help="the KV cache's type, both runtimes (llama.cpp's -ctk/-ctv)")
    ap.add_argument("--device", default="cpu",
                    help="ours: cpu (default), auto, cuda or cuda:N (a GPU runs what its budget places there, "
                         "the CPU the rest; the placement is in the results)")
    ap.add_argument("--vram-budget", type=float, default=None, help="ours: GiB of GPU memory to place weights in")
    ap.add_argument("--no-ours", action="store_true", help="run only llama.cpp")
    ap.add_argument("--serve", default=None, metavar="N,N,...",
                    help="serving mode: aggregate decode tok/s of prosparse-server at these concurrent stream "
                         "counts beside llama.cpp's llama-server -np N on the same file (default models smollm2 "
                         "and 7b-fatrelu; -n tokens per stream, -r runs per count; see prosparse_bench/serve.py)")
    ap.add_argument("--serve-ctx", type=int, default=512,
                    help="--serve: context per slot (llama-server gets -c N x this; default 512)")
    ap.add_argument("--peer-keep", type=int, default=0, metavar="K",
                    help="--serve: past the first concurrency, run only the K llama-server configurations that "
                         "were fastest there (default 0: all; those that could not start there are dropped anyway)")
    ap.add_argument("--estimate", action="store_true",
                    help="--serve: print what would run and its estimated duration, and exit")
    ap.add_argument("--llama-server", default="auto",
                    help="--serve: llama-server binaries: auto ($PROSPARSE_LLAMA_SERVER, then "
                         "~/.cache/prosparse-bench/llama-server-*/ from bench/setup_peer.sh server), none, "
                         "or NAME=PATH,...")
    ap.add_argument("-o", "--output", choices=["md", "json"], default="md", help="stdout format")
    ap.add_argument("--results", default=str(BENCH_DIR / "results"),
                    help="folder for the JSON and the PNG plot")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per runtime and model")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        args.omp_waits = parse_omp_waits(args.peer_omp_wait)
    except ValueError as e:
        ap.error(str(e))
    if args.serve is not None:
        try:
            args.serve_counts = serve.parse_counts(args.serve)
        except ValueError as e:
            ap.error(str(e))
    if args.tg is None:
        args.tg = 64 if args.serve is not None else 128
    if args.reps is None:
        args.reps = 2 if args.serve is not None else 3
    if args.rounds < 1 or args.reps < 1:
        ap.error("--rounds and --reps must be >= 1")
    if args.peer_keep < 0:
        ap.error("--peer-keep must be >= 0")
    if args.serve is not None and args.tg < 1:
        ap.error("-n: --serve needs at least one token per stream")
    if args.serve is not None and args.serve_ctx < serve.PROMPT_TOKENS + args.tg + 1:
        ap.error(f"--serve-ctx {args.serve_ctx} does not hold a {serve.PROMPT_TOKENS}-token prompt and "
                 f"{args.tg} tokens (-n)")
    try:
        args.depths = [int(d) for d in args.depth.split(",")]
    except ValueError:
        ap.error(f"--depth: expected comma-separated token counts, got {args.depth!r}")
    if any(d < 0 for d in args.depths):
        ap.error("--depth: depths must be >= 0")
    return args


@dataclass
class Target:
    """A model to measure: ours runs `path`, llama.cpp `peer_path` (the same file, or a dense one
    of the same shapes where ours has tensors llama.cpp refuses)."""
    spec: str
    name: str
    path: Path
    peer_path: Path


@dataclass
class Job:
    """One configuration to measure: a runtime (its worker run by `python`) on one file."""
    runtime: str                     # "llama.cpp" or "ours"
    python: str
    model: Path
    build: Optional[str] = None      # llama.cpp: build, buffer and OpenMP settings, as a label
    sparsity: Optional[str] = None   # ours: the FFN strategy
    extra_bufts: bool = False
    omp_wait: Optional[str] = None
    depth: int = 0
    flash_attn: bool = False

    @property
    def label(self) -> str:
        return " ".join(x for x in (self.runtime, self.build, self.sparsity, f"d{self.depth}" if self.depth else "") if x)

    def run(self, args) -> dict:
        return run_worker(self.python, self.runtime, self.model, args, self.sparsity, self.extra_bufts,
                          self.omp_wait, self.depth, self.flash_attn)


_ON_OFF = {"off": [False], "on": [True], "both": [False, True]}


def peer_jobs(target: Target, args, peers) -> List[Job]:
    """llama.cpp: every build with each extra-buffer setting under each OpenMP wait policy, with
    flash attention on and off, at every depth."""
    return [Job("llama.cpp", exe, target.peer_path, build=label + (" fa" if fa else ""), extra_bufts=x, omp_wait=w,
                depth=d, flash_attn=fa)
            for d in args.depths
            for label, exe, x, w in peer_configs(peers, _ON_OFF[args.peer_extra_bufts], args.omp_waits)
            for fa in _ON_OFF[args.peer_flash_attn]]


def our_jobs(target: Target, args, peers) -> List[Job]:
    """prosparse-rt: each FFN strategy asked for (all three on the sparse 7B files), at every depth."""
    if args.no_ours:
        return []
    strategies = args.sparsity or ("dense,exact,predict" if target.spec.startswith("7b-fatrelu") else "dense")
    return [Job("ours", sys.executable, target.path, sparsity=s, depth=d)
            for d in args.depths for s in strategies.split(",")]


# What runs on every model, in this order. A new mode (another peer, another device) is a
# function (target, args, peers) -> [Job] added here.
JOB_MAKERS: List[Callable[[Target, argparse.Namespace, list], List[Job]]] = [peer_jobs, our_jobs]


def run_rounds(jobs: List[Job], args, name: str) -> List[dict]:
    """Every job once per round, in turn; each job's repetitions pooled over the rounds."""
    pooled: List[Optional[dict]] = [None] * len(jobs)
    for rnd in range(args.rounds):
        for j, job in enumerate(jobs):
            of = f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""
            print(f"prosparse-bench: {name}: {job.label}{of} ...", file=sys.stderr, flush=True)
            r = job.run(args)
            if "error" not in r:
                print("  " + ", ".join(f"{t}: {report.summarize(r[t]['seconds'], r[t]['n_tokens'])[0]:.2f} tok/s"
                                       for t in ("pp", "tg") if t in r), file=sys.stderr, flush=True)
            pooled[j] = r if pooled[j] is None else _pool_rounds(pooled[j], r)
    return pooled


def _summarize_run(job: Job, r: dict, args, bytes_per_token: float, name: str) -> dict:
    """The worker's result with runtime, settings, weight bytes per token and tok/s statistics."""
    r.setdefault("runtime", "llama.cpp" if job.runtime == "llama.cpp" else "prosparse-rt")
    r.setdefault("threads", args.threads)
    if job.build:
        r["build"] = job.build
    r["bytes_per_token"] = bytes_per_token
    r["depth"] = job.depth
    if job.sparsity and "error" not in r:
        r["strategy"] = r.get("strategy") or job.sparsity
        st = r.get("stats_after_tg", {})
        # a sparse strategy reads fewer bytes: take the runtime's own count
        if job.sparsity != "dense" and st.get("weight_bytes_per_token"):
            r["bytes_per_token"] = st["weight_bytes_per_token"]
    for test in ("pp", "tg"):
        if test in r:
            mean, sd, rates = report.summarize(r[test]["seconds"], r[test]["n_tokens"])
            r[test].update(mean=mean, sd=sd, rates=rates)
    what = f"{job.runtime} {job.build or job.sparsity or ''}"
    if "error" in r:
        print(f"prosparse-bench: {name}: {what} failed: {r['error']}", file=sys.stderr)
    elif not r.get("logits_finite", True):
        print(f"prosparse-bench: {name}: {what}: non-finite logits", file=sys.stderr)
    return r


def _greedy_tokens_agree(runs: List[dict]) -> Optional[dict]:
    """A cross-check that both runtimes compute the same model: per llama.cpp build, whether the
    greedy tokens of its first tg repetition (same start token) equal ours with the dense strategy."""
    runs = [r for r in runs if r.get("depth", 0) == min(x.get("depth", 0) for x in runs)]
    peer_toks = {r.get("build"): r["tg"].get("tokens_first_rep") for r in runs
                 if r.get("runtime") == "llama.cpp" and "tg" in r}
    ours = next((r["tg"].get("tokens_first_rep") for r in runs if r.get("runtime") ==
                 "prosparse-rt" and r.get("strategy") == "dense" and "tg" in r), None)
    if not ours or not peer_toks:
        return None
    return {b: t == ours for b, t in peer_toks.items()}


def bench_model(spec: str, args, peers) -> Optional[dict]:
    """Every job on one model, as the results' model entry; None (and a line) if it is not there."""
    try:
        target = Target(spec, *resolve_model(spec, args))
    except FileNotFoundError as e:
        print(f"prosparse-bench: skipping {spec}: {e}", file=sys.stderr)
        return None
    bpt = report.weight_bytes_per_token(target.path)
    peer_bpt = report.weight_bytes_per_token(target.peer_path)["bytes_per_token"]
    m = {"name": target.name, "path": str(target.path), "peer_path": str(target.peer_path), "pp": args.pp,
         "tg": args.tg, **bpt, "runs": []}
    jobs = [job for make in JOB_MAKERS for job in make(target, args, peers)]
    for job, r in zip(jobs, run_rounds(jobs, args, target.name)):
        per_token = peer_bpt if job.runtime == "llama.cpp" else bpt["bytes_per_token"]
        r = _summarize_run(job, r, args, per_token, target.name)
        # the cache a decode step reads, on average over the tg steps: the same for both runtimes
        r["kv_bytes_per_token"] = report.kv_bytes_per_token(target.path, job.depth + args.tg / 2, args.cache_type)
        m["runs"].append(r)
    agree = _greedy_tokens_agree(m["runs"]) if target.path == target.peer_path else None
    if agree:
        m["greedy_tokens_agree"] = agree
    return m


def print_results(results: dict, args) -> None:
    if args.output == "json":
        print(json.dumps(results, indent=1))
        return
    reps = f"{args.reps} repetitions" + (f" x {args.rounds} rounds" if args.rounds > 1 else "")
    print(f"\n{args.threads} threads, pp{args.pp} / tg{args.tg}, {reps}, "
          f"{results['cpu']}; GB/s = (weight + cache) bytes read per token x tok/s; "
          f"{_bandwidth_line(results)}\n")
    print(report.markdown_table(results))
    for m in results["models"]:
        if "greedy_tokens_agree" in m:
            agree = m["greedy_tokens_agree"]
            print(f"\n{m['name']}: first 16 greedy tokens identical to llama.cpp: "
                  + ", ".join(f"{b}: {'yes' if a else 'NO'}" for b, a in agree.items()))


def main(argv=None):
    args = parse_args(argv)
    if args.serve is not None:
        return serve.main(args, resolve_model, _cpu_name())
    peers = find_peers(args.peer)
    if not peers and args.peer != "none":
        print("prosparse-bench: no llama-cpp-python build found (run bench/setup_peer.sh); "
              "measuring prosparse-rt alone", file=sys.stderr)
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": args.threads,
               "pp": args.pp, "tg": args.tg, "reps": args.reps, "rounds": args.rounds,
               "dram_gbps": report.DRAM_GBPS, "cpu": _cpu_name(), "models": []}
    bw_before = bandwidth.read_gbps(args.threads)
    for spec in args.model or ["smollm2", "7b"]:
        m = bench_model(spec, args, peers)
        if m is not None:
            results["models"].append(m)
    bw_after = bandwidth.read_gbps(args.threads)
    results["dram_gbps_measured"] = {"before": bw_before, "after": bw_after,
                                     "mean": (bw_before["median_gbps"] + bw_after["median_gbps"]) / 2}
    results["dram_gbps"] = results["dram_gbps_measured"]["mean"]

    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    jpath = out / f"bench-{stamp}.json"
    jpath.write_text(json.dumps(results, indent=1))
    ppath = report.plot(results, out / f"bench-{stamp}.png") if results["models"] else None
    print_results(results, args)
    print(f"\nwrote {jpath}" + (f" and {ppath}" if ppath else ""), file=sys.stderr)
    return 0


def _bandwidth_line(results: dict) -> str:
    m = results.get("dram_gbps_measured")
    if not m:
        return f"DRAM ~{report.DRAM_GBPS:.0f} GB/s (not measured in this run)"
    return (f"DRAM read bandwidth measured in this run: {m['before']['median_gbps']:.1f} GB/s before, "
            f"{m['after']['median_gbps']:.1f} after ({m['before']['threads']} threads)")


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
