"""Micro-benchmark of the CPU kernels on LLaMA-2-7B-shaped matrices.

For every weight type, instruction set and thread count it times one decode-step operation
(ops.cpp through the _core._testing.bench_op hook, a persistent thread pool as in the model) and
prints a table of achieved weight bandwidth (GB/s of weight bytes read) and GFLOP/s (2 per
weight per token). Several copies of each matrix are used in turn, so that the working set
(>= --working-set MB) exceeds the L3 cache and the figure is DRAM bandwidth, as in a real model.

    python bench/bench_kernels.py                        # all types, ISAs, 1 and 2 threads
    python bench/bench_kernels.py --types q4_0 --ops up,down --json out.json
    python bench/bench_kernels.py --tokens 64            # prompt-processing (GEMM) shape

Operations: attn (4096x4096 matvec), up (11008 rows of 4096: gate/up), down (4096 rows of 11008),
sparse_up (gate/up over 11% of the rows), sparse_down (axpy over 11% of ffn_down_t's rows).
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
}
TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]


def weight_bytes(qtype, nr, k):
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return nr * (k // block) * size


def make_matrix(qtype, nr, k):
    """nr x k valid weights of qtype (a 64-row random block, quantized by the gguf package,
    repeated: valid scales, no denormals, and cheap to build)."""
    import numpy as np
    from gguf import GGMLQuantizationType as QT
    from gguf import quants

    rng = np.random.default_rng(0)
    base = rng.standard_normal((64, k)).astype(np.float32)
    raw = base.tobytes() if qtype == QT.F32 else quants.quantize(base, qtype).tobytes()
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
            for threads in args.threads:
                times = sorted(T.bench_op(op, int(qtype), W, nr, k, copies, args.tokens, n_active, threads,
                                          args.seconds))
                sec = times[len(times) // 2] if args.stat == "median" else times[0]
                flops = 2.0 * touched / len(one) * nr * k * args.tokens
                print(json.dumps({
                    "isa": isa, "type": tname, "op": opname, "threads": threads, "tokens": args.tokens,
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
    ap.add_argument("--json", default=None, help="write the results here")
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

    isas = args.isas.split(",") if args.isas else _core._testing.isas()
    results = []
    for isa in isas:
        cmd = [sys.executable, __file__, "--worker", "--types", ",".join(args.types), "--ops", ",".join(args.ops),
               "--threads", ",".join(map(str, args.threads)), "--tokens", str(args.tokens),
               "--seconds", str(args.seconds), "--working-set", str(args.working_set), "--stat", args.stat]
        proc = subprocess.Popen(cmd, env=dict(os.environ, PROSPARSE_ISA=isa), stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            r = json.loads(line)
            results.append(r)
            print(f"  {r['isa']:7s} {r['type']:5s} {r['op']:12s} t={r['threads']} {r['ms']:9.3f} ms "
                  f"{r['GBps']:7.2f} GB/s {r['GFLOPs']:8.2f} GFLOP/s", file=sys.stderr, flush=True)
        if proc.wait() != 0:
            sys.exit(f"benchmark worker for {isa} failed")

    # The table: one row per (type, op), one column pair per (isa, threads).
    cols = [(isa, t) for isa in isas for t in args.threads]
    head = "| type | op | " + " | ".join(f"{i} {t}t GB/s | GFLOP/s" for i, t in cols) + " |"
    print(f"\n7B-shaped kernels, {args.tokens} token(s) per call, working set >= {args.working_set:.0f} MB, "
          f"{args.stat} call time\n")
    print(head)
    print("|" + "---|" * (2 + 2 * len(cols)))
    for tname in args.types:
        for o in args.ops:
            cells = []
            for isa, t in cols:
                r = next((r for r in results if (r["isa"], r["threads"], r["type"], r["op"]) == (isa, t, tname, o)), None)
                cells.append(f"{r['GBps']:.1f} | {r['GFLOPs']:.1f}" if r else "- | -")
            print(f"| {tname} | {o} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
