"""Micro-benchmark of the CUDA kernels (cpp/src/cuda/kernels.h) on LLaMA-2-7B-shaped matrices.

For every weight type it times one decode-step operation on GPU 0 through the
_core._testing_cuda.gpu_bench hook and prints a table of the weight bytes the kernel reads per
second (GB/s), beside the GPU's name. Several copies of each matrix are cycled so that the working
set (>= --working-set MB) exceeds the GPU's L2 cache, as a model's layers do.

    python bench/bench_gpu_kernels.py                            # every type and operation
    python bench/bench_gpu_kernels.py --types q4_0 --tokens 8 --json out.json --plot out.png

Operations: attn (gemm 4096x4096), up (gemm 11008 rows of 4096), down (gemm 4096 rows of 11008),
coef (ffn_hot_coef under exact with ReLU over 11008 neurons: every gate row, the up rows of the
neurons the synthetic activations switch on), sparse_down (ffn_hot_down over 11% of 11008
ffn_down_t rows). GB/s counts the bytes of the rows read (coef: the gate rows and the up rows of
about half the neurons; sparse_down: the active rows). Without a usable GPU it says so and exits 2.
"""

import argparse
import json
import sys

from bench_kernels import make_matrix  # the CPU bench's inputs: bench/ is the script's folder

OPS = {
    # name: (hook op, rows, k, fraction of rows whose bytes count)
    "attn": ("gemm", 4096, 4096, 1.0),
    "up": ("gemm", 11008, 4096, 1.0),
    "down": ("gemm", 4096, 11008, 1.0),
    "coef": ("coef", 11008, 4096, 1.5),  # gate whole + up of ~half the rows (ReLU of a symmetric gate)
    "sparse_down": ("down", 11008, 4096, 0.11),
    # a prompt's up projection by each path of gemm (not in the default list; the tiled one takes
    # q8_0, q4_0 and q4_1 on sm_80+): --ops up_rows,up_tiled --types q4_0 --tokens 512
    "up_rows": ("gemm_rows", 11008, 4096, 1.0),
    "up_tiled": ("gemm_tiled", 11008, 4096, 1.0),
}
DEFAULT_OPS = ["attn", "up", "down", "coef", "sparse_down"]
# the default: the original types and those of llama.cpp's Q4_K_M files (--types takes any of q5_1,
# iq4_nl, q2_k, q3_k, q5_k too)
TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q4_k", "q6_k"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--ops", default=",".join(DEFAULT_OPS))
    ap.add_argument("--tokens", type=int, default=1, help="activation rows per call (1 = decode)")
    ap.add_argument("--seconds", type=float, default=0.3, help="minimum time per measurement")
    ap.add_argument("--working-set", type=float, default=400, help="MB of weight copies cycled")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--plot", default=None, help="write a bar chart of GB/s here (PNG)")
    args = ap.parse_args()

    import prosparse_rt
    from gguf import GGMLQuantizationType as QT
    from prosparse_rt import _core

    devices = prosparse_rt.cuda_devices()
    if not devices or not hasattr(_core._testing_cuda, "gpu_bench"):
        print("bench_gpu_kernels: no usable CUDA GPU: " + (prosparse_rt.cuda_status()["reason"] or "a build without CUDA"),
              file=sys.stderr)
        return 2
    gpu = devices[0]["name"]
    results = []
    print(f"GPU: {gpu}; {args.tokens} token(s) per call")
    print(f"{'op':<12} {'type':<6} {'rows x k':>12} {'us/call':>9} {'GB/s':>8}")
    for tname in args.types.split(","):
        qt = QT[tname.upper()]
        for op in args.ops.split(","):
            hook_op, nr, k, frac = OPS[op]
            one = make_matrix(qt, nr, k)
            copies = max(1, int(args.working_set * 1e6 // len(one)))
            secs = _core._testing_cuda.gpu_bench(hook_op, int(qt), one * copies, nr, k, copies, args.tokens,
                                                 min(frac, 1.0), args.seconds)
            gbs = len(one) * frac / secs / 1e9
            results.append(dict(op=op, type=tname, rows=nr, k=k, tokens=args.tokens, seconds=secs, gb_s=gbs))
            print(f"{op:<12} {tname:<6} {f'{nr}x{k}':>12} {secs * 1e6:9.1f} {gbs:8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": gpu, "args": vars(args), "results": results}, f, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 4))
        labels = [f"{r['op']}\n{r['type']}" for r in results]
        ax.bar(range(len(results)), [r["gb_s"] for r in results])
        ax.set_xticks(range(len(results)), labels, fontsize=7)
        ax.set_ylabel("GB/s of weights read")
        ax.set_title(f"prosparse-rt CUDA kernels, {gpu}, {args.tokens} token(s)")
        fig.tight_layout()
        fig.savefig(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
