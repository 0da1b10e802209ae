"""Micro-benchmark of the CPU kernels on LLaMA-2-7B-shaped matrices.

For every weight type, instruction set and thread count it times one decode-step operation
(ops.cpp through the _core._testing.bench_op hook, a persistent thread pool as in the model) and
prints a table of achieved weight bandwidth (GB/s of weight bytes read) and GFLOP/s (2 per
weight per token). Several copies of each matrix are used in turn, so that the working set
(>= --working-set MB) exceeds the L3 cache and the figure is DRAM bandwidth, as in a real model.

    python bench/bench_kernels.py                        # all types, ISAs, 1 and 2 threads
    python bench/bench_kernels.py --types q4_0 --ops up,down --json out.json
    python bench/bench_kernels.py --tokens 64            # prompt-processing (GEMM) shape
    python bench/bench_kernels.py --builds before=/tmp/old,after= --rounds 3   # A/B in one run

--builds compares kernel builds in the same run: NAME=DIR puts DIR (a folder holding another
build's prosparse_rt package) first on the workers' PYTHONPATH, NAME= uses the installed one.
--rounds runs every build that many times in turn and reports each measurement's median over
the rounds, so that a VM whose bandwidth drifts over minutes affects every build alike.

Operations: attn (4096x4096 matvec), up (11008 rows of 4096: gate/up), down (4096 rows of 11008),
sparse_up (gate/up over 11% of the rows), sparse_down (axpy over 11% of ffn_down_t's rows),
dense_down_t and union_down_t (axpy over all and over 90% of ffn_down_t's rows: a prompt's down
projection on a sparse file, with --tokens 64).
Each ISA runs in its own process (PROSPARSE_ISA picks the kernel set once per process).
"""

import argparse
import json
import math
import os
import subprocess
import sys

OPS = {
    # name: (op, rows, k, fraction of rows touched)
    "attn": ("matmul", 4096, 4096, 1.0),
    "attn_il": ("matmul_interleaved", 4096, 4096, 1.0),
    "down_il": ("matmul_interleaved", 4096, 11008, 1.0),
    "up": ("matmul", 11008, 4096, 1.0),
    "down": ("matmul", 4096, 11008, 1.0),
    "sparse_up": ("matmul_rows", 11008, 4096, 0.11),
    "sparse_down": ("axpy_rows", 11008, 4096, 0.11),
    # a prompt's down projection on a sparse file (run with --tokens 64): every row of ffn_down_t
    # (the dense fallback, or dense), and a union of 90% of the rows (exact, predict)
    "dense_down_t": ("axpy_rows", 11008, 4096, 1.0),
    "union_down_t": ("axpy_rows", 11008, 4096, 0.9),
}
TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q2_k", "q3_k", "q4_k", "q5_k",
         "q6_k"]


FLOAT_QTYPES = {0, 1, 30}  # F32, F16, BF16 (ggml type ids)


def weight_bytes(qtype, nr, k):
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return nr * (k // block) * size


def make_matrix(qtype, nr, k):
    """nr x k valid weights of qtype (a 64-row random block, quantized by the gguf package or, for
    the K-quants, prosparse_convert.kquants, repeated: valid scales, no denormals, and cheap to
    build). IQ4_NL, which neither quantizes, is Q4_0's bytes read as IQ4_NL (the same layout)."""
    import numpy as np
    from gguf import GGMLQuantizationType as QT
    from gguf import quants

    rng = np.random.default_rng(0)
    base = rng.standard_normal((64, k)).astype(np.float32)
    if qtype == QT.F32:
        raw = base.tobytes()
    elif qtype.name.endswith("_K"):
        from prosparse_convert import kquants

        raw = kquants.quantize(base, qtype.name).tobytes()
    else:
        raw = quants.quantize(base, QT.Q4_0 if qtype == QT.IQ4_NL else qtype).tobytes()
    reps = math.ceil(nr / 64)
    return (raw * reps)[: weight_bytes(qtype, nr, k)]


def worker(args):
    """Runs in a child process with PROSPARSE_ISA set; prints one JSON line per measurement."""
    from gguf import GGMLQuantizationType as QT

    from prosparse_rt import _core

    T = _core._testing
    isa = T.active_isa()
    for tname in args.types:
        qtype = QT[tname.upper()]
        for opname in args.ops:
            op, nr, k, frac = OPS[opname]
            one = make_matrix(qtype, nr, k)
            copies = max(1, math.ceil(args.working_set * 1e6 / len(one)))
            W = one * copies
            n_active = max(1, int(round(nr * frac)))
            touched = len(one) * n_active / nr
            # Every quantized type has an interleaved form; the float types (no x8 form) keep plain
            # rows in the model, so their "_il" ops time the plain product.
            run_op = "matmul" if op == "matmul_interleaved" and qtype in FLOAT_QTYPES else op
            layout = "interleaved" if run_op == "matmul_interleaved" else "plain"
            for threads in args.threads:
                try:
                    times = sorted(T.bench_op(run_op, int(qtype), W, nr, k, copies, args.tokens, n_active, threads,
                                              args.seconds))
                except ValueError as e:  # an older build given to --builds (Q2_K/Q3_K had no x8 form)
                    if run_op != "matmul_interleaved" or "cannot be interleaved" not in str(e):
                        raise
                    run_op, layout = "matmul", "plain"
                    times = sorted(T.bench_op(run_op, int(qtype), W, nr, k, copies, args.tokens, n_active,
                                              threads, args.seconds))
                sec = times[len(times) // 2] if args.stat == "median" else times[0]
                flops = 2.0 * touched / len(one) * nr * k * args.tokens
                print(json.dumps({
                    "isa": isa, "type": tname, "op": opname, "layout": layout, "threads": threads, "tokens": args.tokens,
                    "rows": nr, "k": k, "active": n_active, "stat": args.stat, "calls": len(times),
                    "ms": sec * 1e3, "GBps": touched / sec / 1e9, "GFLOPs": flops / sec / 1e9,
                }), flush=True)
            del W


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--ops", default="attn,up,down,sparse_up,sparse_down")
    ap.add_argument("--isas", default=None, help="comma list (default: every ISA this CPU has)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", type=int, default=1, help="activation rows per call (1 = decode)")
    ap.add_argument("--seconds", type=float, default=0.3, help="minimum time per measurement")
    ap.add_argument("--working-set", type=float, default=400, help="MB of weight copies cycled")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="per-call time reported: median, or min (the best call: on a shared machine "
                         "the one least disturbed by other processes)")
    ap.add_argument("--builds", default="=", help="NAME=DIR,... builds to compare (DIR empty: the installed one)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of every build, in turn")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--plot", default=None, help="write a bar chart of GB/s here (PNG)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    args.threads = [int(t) for t in args.threads.split(",")]
    for o in args.ops:
        if o not in OPS:
            ap.error(f"unknown op {o!r}; choose from {', '.join(OPS)}")
    if args.worker:
        worker(args)
        return

    from prosparse_rt import _core

    builds = []
    for item in args.builds.split(","):
        name, _, path = item.partition("=")
        builds.append((name.strip(), path.strip()))
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    isas = args.isas.split(",") if args.isas else _core._testing.isas()
    from prosparse_bench.bandwidth import read_gbps
    bw_before = {t: read_gbps(t) for t in args.threads}
    raw = []
    for rnd in range(args.rounds):
        for bname, bpath in builds:
            env = dict(os.environ)
            if bpath:
                env["PYTHONPATH"] = os.pathsep.join(p for p in (bpath, env.get("PYTHONPATH", "")) if p)
            for isa in isas:
                raw.extend(run_worker(args, isa, env, bname, rnd))
    bw_after = {t: read_gbps(t) for t in args.threads}
    # the host's read bandwidth per thread count, mean of before and after the kernels ran
    bw = {t: (bw_before[t]["median_gbps"] + bw_after[t]["median_gbps"]) / 2 for t in args.threads}
    results = pool_rounds(raw)
    for r in results:
        r["of_read_bandwidth"] = r["GBps"] / bw[r["threads"]]
    print_table(args, builds, isas, results, bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "args": vars(args), "read_bandwidth": {"before": bw_before, "after": bw_after},
                       "results": results, "runs": raw}, f, indent=1)
    if args.plot:
        plot(args, builds, isas, results)


def run_worker(args, isa, env, build, rnd):
    cmd = [sys.executable, __file__, "--worker", "--types", ",".join(args.types), "--ops", ",".join(args.ops),
           "--threads", ",".join(map(str, args.threads)), "--tokens", str(args.tokens),
           "--seconds", str(args.seconds), "--working-set", str(args.working_set), "--stat", args.stat]
    proc = subprocess.Popen(cmd, env=dict(env, PROSPARSE_ISA=isa), stdout=subprocess.PIPE, text=True)
    out = []
    for line in proc.stdout:
        r = dict(json.loads(line), build=build, round=rnd)
        out.append(r)
        print(f"  {build:8s} r{rnd} {r['isa']:7s} {r['type']:5s} {r['op']:12s} t={r['threads']} {r['ms']:9.3f} ms "
              f"{r['GBps']:7.2f} GB/s {r['GFLOPs']:8.2f} GFLOP/s", file=sys.stderr, flush=True)
    if proc.wait() != 0:
        sys.exit(f"benchmark worker for {isa} ({build or 'installed'}) failed")
    return out


def _key(r):
    return (r["build"], r["isa"], r["threads"], r["type"], r["op"])


def pool_rounds(raw):
    """One result per measurement: the median over the rounds of its time."""
    groups = {}
    for r in raw:
        groups.setdefault(_key(r), []).append(r)
    out = []
    for rs in groups.values():
        rs = sorted(rs, key=lambda r: r["ms"])
        out.append(dict(rs[len(rs) // 2], rounds=len(rs)))
    return out


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def print_table(args, builds, isas, results, bw):
    """One row per (type, op), one column per (build, isa, threads): GB/s of weight bytes read, and
    its share of the host's read bandwidth measured in the same run with as many threads."""
    cols = [(b, isa, t) for isa in isas for t in args.threads for b, _ in builds]
    label = lambda b, i, t: f"{b + ' ' if b else ''}{i} {t}t"
    print(f"\n7B-shaped kernels on {cpu_name()}, {args.tokens} token(s) per call, working set >= "
          f"{args.working_set:.0f} MB, {args.stat} call time, median of {args.rounds} round(s); GB/s of weights "
          f"read (share of the host's read bandwidth, GFLOP/s)")
    print("host read bandwidth measured in this run (mean of before and after): "
          + ", ".join(f"{t} thread(s) {g:.1f} GB/s" for t, g in bw.items()) + "\n")
    print("| type | op | " + " | ".join(label(*c) for c in cols) + " |")
    print("|" + "---|" * (2 + len(cols)))
    index = {_key(r): r for r in results}
    for tname in args.types:
        for o in args.ops:
            cells = []
            for b, isa, t in cols:
                r = index.get((b, isa, t, tname, o))
                plain = "plain rows: " if r and o.endswith("_il") and r.get("layout") == "plain" else ""
                cells.append(f"{plain}{r['GBps']:.1f} ({100 * r['of_read_bandwidth']:.0f}%, {r['GFLOPs']:.1f})"
                             if r else "-")
            print(f"| {tname} | {o} | " + " | ".join(cells) + " |")


def plot(args, builds, isas, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = {_key(r): r for r in results}
    rows = [(t, o) for t in args.types for o in args.ops]
    cols = [(b, isa, th) for isa in isas for th in args.threads for b, _ in builds]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) * len(cols) / 2), 4))
    width = 0.8 / len(cols)
    for j, (b, isa, th) in enumerate(cols):
        vals = [index[(b, isa, th, t, o)]["GBps"] if (b, isa, th, t, o) in index else 0 for t, o in rows]
        ax.bar([i + j * width for i in range(len(rows))], vals, width, label=f"{b + ' ' if b else ''}{isa} {th}t")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{t}\n{o}" for t, o in rows], fontsize=7)
    ax.set_ylabel("GB/s of weights read")
    ax.set_title(f"{cpu_name()}: {args.tokens} token(s) per call", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
