"""prosparse-sparsify MODEL OUT_DIR --data FILE... [options]"""
from __future__ import annotations

import argparse
import sys

from . import schedule as sched_mod


def _floats(s: str):
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prosparse-sparsify",
        description="Turn a SiLU LLaMA or MiniCPM checkpoint into an activation-sparse FATReLU model "
                    "with the ProSparse recipe: ReLU substitution, progressive L1 regularization of "
                    "the FFN intermediate x1 = act(gate)*up, then threshold shifting.",
        epilog="L1 term: for each layer the mean of |x1| over tokens and neurons, summed over layers; "
               "loss = LM loss + λ·L1 (with --distill a: (1-a)·LM + a·KL(dense‖sparse) + λ·L1). "
               "Output: a Hugging Face directory (SparseLlamaForCausalLM / MiniCPM, hidden_act fatrelu) "
               "that prosparse-convert takes, plus sparsify_report.json and sparsify_plot.png.")
    p.add_argument("model", help="Hugging Face directory (LLaMA, SparseLlama, MiniCPM) or a llama .gguf file")
    p.add_argument("out_dir")
    p.add_argument("--data", nargs="+", required=True, help="text or .jsonl files, or directories of them")
    p.add_argument("--eval-data", nargs="+", help="held-out text (default: hold out --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--max-eval-seqs", type=int, default=64, help="cap on held-out sequences evaluated")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text")
    p.add_argument("--steps", type=int, help="optimizer steps (required for presets)")
    p.add_argument("--schedule", default=sched_mod.DEFAULT, help=sched_mod.HELP)
    p.add_argument("--final-lambda", type=float, help="rescale the schedule's λ values so the last is this")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-5, help="peak AdamW learning rate (cosine decay)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, help="linear LR warm-up (default 5%% of steps)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--distill", type=float, default=0.0, metavar="A",
                   help="weight of KL distillation from the original dense model (0 = off)")
    p.add_argument("--threshold", default="auto",
                   help="FATReLU threshold t written to the output, or 'auto': the largest swept t whose "
                        "held-out perplexity is within --max-ppl-increase of t=0")
    p.add_argument("--thresholds", type=_floats, help="thresholds to sweep (default 0,0.005,0.01,0.02,0.03,0.05,0.1)")
    p.add_argument("--max-ppl-increase", type=float, default=0.01)
    p.add_argument("--sweep-lambdas", type=_floats, help="λ sweep: candidate final λ values, e.g. 0.05,0.1,0.2,0.5")
    p.add_argument("--target-sparsity", type=float, help="λ sweep: sparsity to reach (e.g. 0.85)")
    p.add_argument("--sweep-steps", type=int, help="λ sweep: steps per candidate (default --steps/10)")
    p.add_argument("--sweep-only", action="store_true", help="report the λ sweep and stop")
    p.add_argument("--baseline", action="store_true",
                   help="the fair dense baseline: the same training (data, steps, LR) keeping the original "
                        "activation, without L1; writes a dense model")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (always at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if PyTorch sees it), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast precision (auto: bf16 where the hardware has it)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .train import DEFAULT_THRESHOLDS, Config, run
    except ImportError as e:  # torch/transformers are the optional `train` extra
        print(f"prosparse-sparsify needs the train extra (pip install 'prosparse-rt[train]'): {e}", file=sys.stderr)
        return 2
    cfg = Config(
        model=args.model, out_dir=args.out_dir, data=args.data, steps=args.steps, schedule=args.schedule,
        final_lambda=args.final_lambda, eval_data=args.eval_data, eval_fraction=args.eval_fraction,
        max_eval_seqs=args.max_eval_seqs, text_field=args.text_field, seq_len=args.seq_len,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, distill=args.distill,
        threshold=args.threshold, thresholds=args.thresholds or list(DEFAULT_THRESHOLDS),
        max_ppl_increase=args.max_ppl_increase, save_every=args.save_every, resume=args.resume,
        seed=args.seed, device=args.device, dtype=args.dtype, save_dtype=args.save_dtype,
        threads=args.threads, sweep_lambdas=args.sweep_lambdas, target_sparsity=args.target_sparsity,
        sweep_steps=args.sweep_steps, sweep_only=args.sweep_only, baseline=args.baseline, progress=not args.no_progress)
    try:
        run(cfg)
    except (ValueError, FloatingPointError) as e:
        print(f"prosparse-sparsify: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
