"""The rest of bench/real_smollm2.sh's report: perplexity of the original SmolLM2 and of the fair
baseline on the out-of-corpus text (the same windows `prosparse-calibrate --eval` uses for the
sparse model), and decode speed of the baseline (dense), and the calibrated sparse model under
exact and predict.

    python bench/real_smollm2_eval.py OUT_DIR [--eval-tokens 2048] [--threads 2]

Writes OUT_DIR/eval.json and prints a table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prosparse_convert.calibrate import evaluate, text as text_mod
from prosparse_rt import Model, _core

PROMPT = "The history of the printing press begins"


def perplexity(path: Path, text: str, ctx: int, tokens: int, threads: int) -> dict:
    m = _core.Model(str(path), n_ctx=ctx, n_threads=threads, sparsity="dense")
    bos = m.bos if m.add_bos_default and m.bos >= 0 else None
    win = text_mod.make_windows(lambda s: m.tokenize(s, False, False), text, bos, ctx, tokens, held_out_every=0).calib
    return {"perplexity": evaluate.perplexity(m, win), "tokens": sum(len(w) for w in win)}


def decode_speed(path: Path, strategy: str, threads: int, n: int = 64, repeats: int = 3) -> float:
    """Best of `repeats` greedy decodes of n tokens, tokens per second of the decode phase."""
    best = 0.0
    for _ in range(repeats):
        m = Model(str(path), n_ctx=256, n_threads=threads, sparsity=strategy)
        m.generate(PROMPT, max_tokens=n, temperature=0.0)
        best = max(best, m.stats["decode_tokens_per_second"])
        del m
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calibrated", default="sparse-cal.gguf", help="the calibrated sparse file, in OUT_DIR")
    ap.add_argument("--skip-perplexity", action="store_true", help="decode speed only")
    ap.add_argument("--original", type=Path, default=Path.home() / ".cache/prosparse-rt/SmolLM2-135M-Instruct.Q4_1.gguf")
    a = ap.parse_args()
    d = a.out_dir
    text = (d / "outside.txt").read_text()
    res = {"outside_text": {}, "decode_tok_s": {}}
    for name, path in (("original SmolLM2 (SiLU, Q4_1)", a.original), ("baseline (SiLU, same training)", d / "baseline.gguf")):
        if not a.skip_perplexity:
            res["outside_text"][name] = perplexity(path, text, a.ctx, a.eval_tokens, a.threads)
    for name, path, strategy in (("baseline, dense", d / "baseline.gguf", "dense"),
                                 ("sparse, exact", d / a.calibrated, "exact"),
                                 ("sparse, predict", d / a.calibrated, "predict")):
        res["decode_tok_s"][name] = decode_speed(path, strategy, a.threads)
    (d / ("eval.json" if not a.skip_perplexity else "speed.json")).write_text(json.dumps(res, indent=2))
    print("| model | out-of-corpus perplexity | tokens |\n|---|---|---|")
    for k, v in res["outside_text"].items():
        print(f"| {k} | {v['perplexity']:.3f} | {v['tokens']} |")
    print(f"\n| configuration | decode tok/s ({a.threads} threads, best of 3, 64 tokens) |\n|---|---|")
    for k, v in res["decode_tok_s"].items():
        print(f"| {k} | {v:.1f} |")


if __name__ == "__main__":
    main()
