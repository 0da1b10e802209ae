"""The device check's Python side (bench/device_check.sh runs it; see that script for the steps).

    device_check.py tiny-model PATH          # a tiny FATReLU GGUF with a predictor (sanitizer runs)
    device_check.py sanitize-target PATH     # what compute-sanitizer watches: every GPU path once
    device_check.py bench --work DIR --out FILE.json [--threads 8] [--tokens 32]

The benchmark (issue 13, "The device check"): a LLaMA-2-7B-shaped Q4_0 FATReLU model generated
here (prosparse_bench.synth.write_fatrelu, as prosparse-bench's), decode tokens/s for exact and
predict at VRAM budgets of 0 (CPU only), 25%, 50% and 100% of the model's bytes, dense at 0 and
100%, with 8 CPU threads; per device the bytes read per token (the placement's expectation) and
GB/s; the byte bound of each budget, CPU-only speed x CPU-only bytes / the CPU's bytes at that
budget (the speed if the GPU part cost nothing and the CPU kept its CPU-only bandwidth); and
transformers bf16 decode of the same shapes on the same GPU (random weights, KV cache on).
Decode is greedy with a fixed number of steps after an 8-token prompt, as prosparse-bench's tg.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # prosparse_bench from the tree

BUDGETS = (0.0, 0.25, 0.50, 1.0)
PROMPT = [1, 300, 301, 302, 303, 304, 305, 306]


def tiny_shape():
    from prosparse_bench import synth
    return synth.Shape(n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=320, n_vocab=320, n_ctx=128)


def write_tiny(path: Path) -> Path:
    from prosparse_bench import synth
    return synth.write_fatrelu(Path(path), tiny_shape(), "q4_0", seed=3, rank=64, pred_qtype="q8_0")


def decode(path, sparsity: str, device: str, budget_gib: Optional[float], threads: int, n_tokens: int,
           n_ctx: int = 256, graphs: bool = False) -> Dict:
    """Greedy decode of n_tokens after PROMPT; tokens/s and the model's placement stats. graphs:
    PROSPARSE_CUDA_GRAPHS=1 (a model wholly on the GPU decodes through one CUDA graph per token)."""
    from prosparse_rt import _core
    os.environ["PROSPARSE_CUDA_GRAPHS"] = "1" if graphs else "0"
    m = _core.Model(str(path), n_ctx=n_ctx, n_threads=threads, sparsity=sparsity, device=device,
                    vram_budget=-1.0 if budget_gib is None else budget_gib)
    tok = int(np.argmax(m.eval(PROMPT, False)))  # eval without all_logits: the last token's [n_vocab]
    m.eval([tok], False)  # warm-up step, untimed
    s0 = m.stats()
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        tok = int(np.argmax(m.eval([tok], False)))
    secs = time.perf_counter() - t0
    s1 = m.stats()
    pl = s1["placement"]
    del m
    out = dict(sparsity=sparsity, cuda_graphs=graphs, device=pl["device"], gpu_active=pl["gpu_active"], tokens=n_tokens,
               seconds=secs, tok_s=n_tokens / secs,
               bytes_read_per_token=dict(pl["bytes_read_per_token"]), bytes_resident=dict(pl["bytes"]),
               note=pl["note"], layers_attention_on_gpu=sum(x["attention_on_gpu"] for x in pl["layers"]),
               mean_n_hot=sum(x["n_hot"] for x in pl["layers"]) / max(1, len(pl["layers"])),
               output_on_gpu=pl["output_on_gpu"], measured_bytes_per_token=dict(pl["measured_bytes_per_token"]))
    for k in ("cpu_wait_seconds", "gpu_busy_seconds"):
        if k in pl:
            out[k] = (pl[k] - s0["placement"].get(k, 0.0)) / n_tokens
    out["gb_s"] = {d: out["bytes_read_per_token"][d] * out["tok_s"] / 1e9 for d in ("cpu", "gpu")}
    return out


def byte_bound(cpu_only_tok_s: float, cpu_only_bytes: float, cpu_bytes: float) -> float:
    """The speed a budget allows if the GPU's part were free: the CPU-only speed scaled by how much
    less the CPU reads per token (infinite when the CPU reads nothing)."""
    if cpu_bytes <= 0:
        return float("inf")
    return cpu_only_tok_s * cpu_only_bytes / cpu_bytes


def with_bounds(runs: List[Dict]) -> List[Dict]:
    """Adds each run's byte bound against the CPU-only run of its strategy (budget 0)."""
    base = {r["sparsity"]: r for r in runs if r["budget"] == 0.0 and not r.get("cuda_graphs")}
    for r in runs:
        b = base.get(r["sparsity"])
        r["byte_bound_tok_s"] = None if b is None else byte_bound(
            b["tok_s"], b["bytes_read_per_token"]["cpu"], r["bytes_read_per_token"]["cpu"])
        r["x_cpu_only"] = None if b is None else r["tok_s"] / b["tok_s"]
    return runs


def table(runs: List[Dict], peer: Optional[Dict]) -> str:
    def f(x, spec):
        return "-" if x is None else ("inf" if x == float("inf") else format(x, spec))
    rows = ["| strategy | budget | tok/s | x CPU-only | byte bound tok/s | CPU GB/tok | GPU GB/tok | CPU GB/s | "
            "GPU GB/s | CPU wait ms/tok | GPU busy ms/tok |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        rows.append("| {} | {:.0%} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["sparsity"] + (" (CUDA graph)" if r.get("cuda_graphs") else ""), r["budget"], f(r["tok_s"], ".2f"), f(r.get("x_cpu_only"), ".2f"),
            f(r.get("byte_bound_tok_s"), ".2f"), f(r["bytes_read_per_token"]["cpu"] / 1e9, ".3f"),
            f(r["bytes_read_per_token"]["gpu"] / 1e9, ".3f"), f(r["gb_s"]["cpu"], ".1f"), f(r["gb_s"]["gpu"], ".1f"),
            f(r["cpu_wait_seconds"] * 1e3 if "cpu_wait_seconds" in r else None, ".2f"),
            f(r["gpu_busy_seconds"] * 1e3 if "gpu_busy_seconds" in r else None, ".2f")))
    if peer:
        rows.append(f"| transformers bf16 (dense, GPU) | 100% | {f(peer.get('tok_s'), '.2f')} | - | - | - | "
                    f"{f(peer.get('bytes_per_token', 0) / 1e9, '.3f')} | - | {f(peer.get('gb_s'), '.1f')} | - | - |")
    return "\n".join(rows)


def transformers_peer(shape, n_tokens: int) -> Dict:
    """transformers bf16 decode of the same shapes, random weights on the GPU, greedy with the KV
    cache, n_tokens after the same 8-token prompt."""
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception as e:  # noqa: BLE001
        return {"error": f"transformers/torch unavailable: {e}"}
    if not torch.cuda.is_available():
        return {"error": "torch sees no GPU"}
    cfg = LlamaConfig(vocab_size=shape.n_vocab, hidden_size=shape.n_embd, intermediate_size=shape.n_ff,
                      num_hidden_layers=shape.n_layer, num_attention_heads=shape.n_head,
                      num_key_value_heads=shape.n_head_kv, max_position_embeddings=shape.n_ctx,
                      hidden_act="relu", tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.tensor([PROMPT], device="cuda")
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False)
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    n = int(out.shape[1] - ids.shape[1])
    # per token it reads every weight except the embedding table (one row)
    per_tok = 2.0 * (n_params - shape.n_vocab * shape.n_embd)
    del model
    torch.cuda.empty_cache()
    return {"tok_s": n / secs, "tokens": n, "seconds": secs, "bytes_per_token": per_tok,
            "gb_s": per_tok * n / secs / 1e9, "torch": torch.__version__}


def host_info() -> Dict:
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        pass
    from prosparse_rt import cuda_devices
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "gpus": cuda_devices()}


def run_bench(args) -> int:
    from prosparse_bench import synth
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shape = tiny_shape() if args.tiny else synth.LLAMA2_7B
    path = work / ("tiny-fatrelu-q4_0.gguf" if args.tiny else "llama2-7b-shape-fatrelu-q4_0.gguf")
    t0 = time.perf_counter()
    if not path.is_file():
        print(f"generating {path.name} ...", flush=True)
        if args.tiny:
            write_tiny(path)
        else:
            synth.write_fatrelu(path, shape, "q4_0", seed=0)
    print(f"model ready in {time.perf_counter() - t0:.0f} s", flush=True)

    budgets = (0.0,) if args.cpu_only else BUDGETS
    runs = []
    total = None  # the model's bytes (weights, KV cache at n_ctx) as the placement counts them
    plan = [(s, b, False) for s in ("exact", "predict") for b in budgets] + [("dense", 0.0, False)]
    if not args.cpu_only:
        plan += [("dense", 1.0, False), ("exact", 1.0, True)]
    for sparsity, frac, graphs in plan:
        if frac == 0.0:
            r = decode(path, sparsity, "cpu", None, args.threads, args.tokens)
            if total is None:
                total = r["bytes_resident"]["cpu"]
        else:
            # a budget just over the fraction, so that 100% holds everything
            r = decode(path, sparsity, "cuda", frac * total / 2**30 * 1.001, args.threads, args.tokens, graphs=graphs)
        r["budget"] = frac
        runs.append(r)
        print(f"{sparsity:8s} budget {frac:4.0%}{' graph' if graphs else ''}: {r['tok_s']:8.2f} tok/s "
              f"(gpu_active {r['gpu_active']})", flush=True)
    with_bounds(runs)
    peer = None if args.cpu_only or args.no_peer else transformers_peer(shape, args.tokens)
    result = {"host": host_info(), "shape": shape.__dict__, "threads": args.threads, "tokens": args.tokens,
              "tests": args.tests, "memcheck": args.memcheck, "racecheck": args.racecheck,
              "runs": runs, "transformers_bf16": peer}
    print()
    print(f"{result['host']['cpu']}, {args.threads} threads; GPU: "
          f"{', '.join(d['name'] for d in result['host']['gpus']) or 'none'}")
    print(table(runs, peer if peer and "tok_s" in peer else None))
    if peer and "error" in peer:
        print(f"transformers peer: {peer['error']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")
    return 0


def sanitize_target(path: Path) -> int:
    """Every GPU path once on the tiny model: GPU-only (with and without the decode graph) and
    hybrid, each strategy, prompt and decode."""
    from prosparse_rt import _core
    probe = _core.Model(str(path), n_ctx=64, device="cpu")
    total = probe.stats()["placement"]["bytes"]["cpu"]
    del probe
    for sparsity in ("dense", "exact", "predict"):
        for frac, graphs in ((0.5, False), (1.0, False), (1.0, True)):
            os.environ["PROSPARSE_CUDA_GRAPHS"] = "1" if graphs else "0"
            m = _core.Model(str(path), n_ctx=64, n_threads=2, sparsity=sparsity, device="cuda",
                            vram_budget=frac * total / 2**30 * 1.001)
            assert m.stats()["placement"]["gpu_active"], m.stats()["placement"]["note"]
            logits = np.asarray(m.eval(PROMPT, True))
            tok = int(np.argmax(logits[-1]))
            for _ in range(3):
                tok = int(np.argmax(m.eval([tok], False)))
            assert np.all(np.isfinite(logits))
            del m
    print("sanitize-target: done")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny-model")
    t.add_argument("path")
    s = sub.add_parser("sanitize-target")
    s.add_argument("path")
    b = sub.add_parser("bench")
    b.add_argument("--work", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--threads", type=int, default=8)
    b.add_argument("--tokens", type=int, default=32)
    b.add_argument("--tiny", action="store_true", help="the tiny shape instead of 7B (a check of this script)")
    b.add_argument("--cpu-only", action="store_true", help="budget 0 only, no peer (a check without a GPU)")
    b.add_argument("--no-peer", action="store_true")
    for k in ("tests", "memcheck", "racecheck"):
        b.add_argument(f"--{k}", default="not run")
    a = ap.parse_args(argv)
    if a.cmd == "tiny-model":
        write_tiny(Path(a.path))
        return 0
    if a.cmd == "sanitize-target":
        return sanitize_target(Path(a.path))
    return run_bench(a)


if __name__ == "__main__":
    sys.exit(main())
