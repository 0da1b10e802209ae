"""prosparse-calibrate IN.gguf OUT.gguf [--text FILE ...] [--target-sparsity S] [--eval FILE] ..."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli_run import run_cli
from .calibrate import Options, calibrate


def _rank(s: str):
    try:
        return [int(v) for v in s.split(",")] if "," in s else int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rank takes an integer or a comma-separated list, got {s!r}")


def _recall(s: str):
    try:
        return [float(v) for v in s.split(",")] if "," in s else float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--recall takes a number or a comma-separated list, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    d = Options()
    ap = argparse.ArgumentParser(
        prog="prosparse-calibrate",
        description="Profile a model's FFN activations over calibration text and write a new GGUF with "
                    "neuron firing frequencies, plus trained predictors (ReLU/FATReLU models) or "
                    "per-layer thresholds reaching a target sparsity (SiLU models).")
    ap.add_argument("model", type=Path, help="input .gguf (ours, llama.cpp's or PowerInfer's)")
    ap.add_argument("out", type=Path, help="output .gguf (written atomically)")
    g = ap.add_argument_group("calibration text")
    g.add_argument("--text", type=Path, action="append", default=[], metavar="FILE",
                   help="calibration text (repeatable); default: text the model writes itself from varied prompts")
    g.add_argument("--tokens", type=int, default=d.tokens, help=f"calibration tokens (default {d.tokens})")
    g.add_argument("--ctx", type=int, default=d.ctx, help=f"tokens per window (default {d.ctx})")
    g.add_argument("--max-samples", type=int, default=d.max_samples,
                   help=f"token samples kept for training/quantiles (default {d.max_samples})")
    g.add_argument("--max-memory-mb", type=int, default=d.max_memory >> 20,
                   help=f"memory for kept samples in MiB (default {d.max_memory >> 20})")
    g = ap.add_argument_group("SiLU models: thresholds")
    g.add_argument("--target-sparsity", type=float, help="mean fraction of FFN neurons to zero, e.g. 0.5")
    g.add_argument("--allocation", default=d.allocation, choices=["greedy", "uniform"],
                   help="per-layer sparsity: greedy on measured layer sensitivity (default) or uniform")
    g.add_argument("--probe-tokens", type=int, default=d.probe_tokens,
                   help=f"tokens for measuring layer sensitivity (default {d.probe_tokens})")
    g = ap.add_argument_group("ReLU/FATReLU models: predictors")
    g.add_argument("--no-predictors", dest="predictors", action="store_false", default=None,
                   help="only profile (ffn_act_freq), train no predictors")
    g.add_argument("--predictors", dest="predictors", action="store_true",
                   help="train predictors (the default for relu/fatrelu models)")
    g.add_argument("--rank", type=_rank, help="predictor rank, or one per layer (default: n_embd/4, at most 1024)")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"training epochs (default {d.epochs})")
    g.add_argument("--pos-weight", type=float, help="weight of active neurons in the loss "
                   "(default: twice the inactive/active ratio, at most 30)")
    g.add_argument("--recall", type=_recall, default=d.recall,
                   help=f"recall each layer's cut-off reaches on the tuning windows, or one per layer "
                        f"(default {d.recall})")
    g.add_argument("--always-on", default=d.always_on, choices=["auto", "none"],
                   help="auto (default): per layer, the prefix of most frequent neurons always computed, chosen "
                        "on the tuning windows; only with frequency order (--neuron-order frequency)")
    g.add_argument("--pin-first", type=float, default=d.pin_first,
                   help="sink neurons (firing on the first token of most calibration windows, rarely elsewhere) are "
                        "always computed, first in the neuron order, in layers where they are at most this fraction "
                        f"of the neurons; frequency order only; 0: off (default {d.pin_first:g})")
    g.add_argument("--policy-rounds", type=int, default=d.policy_rounds,
                   help="times the cut-offs are re-chosen on the written file's own predict runs over the tuning "
                        f"windows (0: on the dense model's activations only; default {d.policy_rounds})")
    g.add_argument("--predictor-type", default=d.predictor_type, choices=["f32", "f16", "q8_0", "q4_0"],
                   help=f"stored predictor type (default {d.predictor_type})")
    g = ap.add_argument_group("output")
    g.add_argument("--neuron-order", default=d.neuron_order, choices=["original", "frequency"],
                   help="frequency: reorder each layer's neurons hottest first")
    g.add_argument("--down-type", default=d.down_type, choices=["auto", "f16", "q8_0"],
                   help="type of ffn_down_t made from ffn_down (auto: Q8_0 when perplexity moves < 0.5%% against "
                        "F16 ffn_down_t, else F16)")
    g.add_argument("--eval", type=Path, metavar="FILE", help="held-out text: perplexity dense vs each sparse strategy")
    g.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
    g.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    ap.add_argument("-t", "--threads", type=int, default=0, help="threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    o = Options(text=args.text, tokens=args.tokens, ctx=args.ctx, target_sparsity=args.target_sparsity,
                allocation=args.allocation, probe_tokens=args.probe_tokens, predictors=args.predictors,
                rank=args.rank, epochs=args.epochs, pos_weight=args.pos_weight,
                recall=args.recall, always_on=args.always_on, pin_first=args.pin_first, policy_rounds=args.policy_rounds,
                predictor_type=args.predictor_type, neuron_order=args.neuron_order, down_type=args.down_type,
                max_samples=args.max_samples, max_memory=args.max_memory_mb << 20, eval_text=args.eval,
                eval_tokens=args.eval_tokens, n_threads=args.threads, seed=args.seed,
                progress=not args.no_progress)
    return run_cli("prosparse-calibrate", lambda: _report(calibrate(args.model, args.out, o), args))


def _report(r, args) -> int:
    """Prints what calibration did (and writes it as JSON with --json)."""
    print(f"calibrated on {r.n_calib_tokens} tokens ({r.n_held_out_tokens} held out), {r.activation} model")
    if r.overall:
        o = r.overall
        print(f"predictors: cut-offs chosen on {r.n_tune_tokens} tuning tokens; on {r.n_test_tokens} test tokens "
              f"neither training nor the cut-offs saw: recall {100 * o['recall']:.1f}%, predicted sparsity "
              f"{100 * o['predicted_sparsity']:.1f}%, true sparsity {100 * o['actual_sparsity']:.1f}% (pooled "
              f"over layers; per layer below)" + (
                  f"; measured in predict's own run by the runtime's counters (on the dense model's "
                  f"stream: recall {100 * o['tf_recall']:.1f}%)" if "tf_recall" in o else ""))
    if r.allocation:
        kl = ", ".join(f"{k} {v:.4f}" for k, v in r.allocation_kl.items())
        print(f"sparsity allocation: {r.allocation}" + (f" (KL from dense on probe tokens: {kl})" if kl else ""))
    print(r.table())
    if r.down_type:
        c = r.down_check
        extra = (f" (held-out perplexity with ffn_down_t at Q8_0 {c['q8_0_ppl']:.3f}, at F16 {c['f16_ppl']:.3f}: "
                 f"{100 * c['rel_change']:+.3f}%, dense, thresholds cleared, {int(c['tokens'])} tokens)") if c else ""
        print(f"ffn_down_t written at {r.down_type}{extra}")
    if r.eval:
        pct = lambda row, k: f"{100 * row[k]:.1f}%" if row.get(k) is not None else ""  # noqa: E731
        print(f"\n--eval {args.eval} ({r.eval[0]['tokens']} tokens):\n"
              "| model | strategy | perplexity | change | sparsity | recall | true sparsity | top-1 vs exact | "
              "KL vs exact |\n|---|---|---|---|---|---|---|---|---|")
        for row in r.eval:
            print(f"| {row['model']} | {row['strategy']} | {row['perplexity']:.3f} | {100 * row['ppl_change']:+.2f}% | "
                  f"{pct(row, 'sparsity')} | {pct(row, 'recall')} | {pct(row, 'true_sparsity')} | "
                  f"{pct(row, 'top1_vs_exact')} | " + (f"{row['kl_vs_exact']:.4f}" if 'kl_vs_exact' in row else "")
                  + " |")
        if r.eval_layers:
            print("\npredict per layer on the --eval text:\n| layer | recall | predicted sparsity | true sparsity |"
                  "\n|---|---|---|---|")
            for i, row in enumerate(r.eval_layers):
                print(f"| {i} | {pct(row, 'recall')} | {pct(row, 'predicted_sparsity')} | {pct(row, 'actual_sparsity')} |")
    if args.json:
        import dataclasses
        args.json.write_text(json.dumps(dataclasses.asdict(r), indent=2, default=float))
    print(f"wrote {args.out} in {r.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
