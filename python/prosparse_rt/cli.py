"""prosparse-run: llama.cpp-like command line for generating text."""
from __future__ import annotations

import argparse
import math
import re
import sys
import time

from .presets import DEFAULT_TARGET_SPARSITY

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prosparse-run",
        description="Generate text with a GGUF model (llama.cpp-style flags). Without -m, runs the default "
                    "model, SmolLM2-135M-Instruct (downloaded once into ~/.cache/prosparse-rt), densely; "
                    "--sparsity exact applies its shipped per-layer thresholds (--target-sparsity) at load "
                    "and skips the neurons they zero.")
    p.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--target-sparsity", type=float, default=None,
                   help="run with the per-layer |SiLU| thresholds shipped for this fraction of FFN neurons "
                        f"zeroed (the default model has 0.3 and 0.5; default {DEFAULT_TARGET_SPARSITY} "
                        "with --sparsity exact and no -m)")
    p.add_argument("-p", "--prompt", default=None, help=f"prompt (default: {DEFAULT_PROMPT!r} as a chat)")
    p.add_argument("-f", "--file", help="read the prompt from a file")
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=2048, help="context size (0 = model's own; default 2048)")
    p.add_argument("-b", "--batch-size", type=int, default=256, help="prompt tokens per forward pass")
    p.add_argument("--temp", type=float, default=0.8, help="temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("-s", "--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--sparsity", default="auto", choices=["auto", "dense", "exact", "predict"],
                   help="FFN strategy (default auto: exact where the activation is sparse, else dense)")
    p.add_argument("--act-threshold", type=float, default=None,
                   help="override the FATReLU threshold t (keep x >= t)")
    p.add_argument("--pred-threshold", type=float, default=None,
                   help="override the predictor's logit cut-off (predict)")
    p.add_argument("--diag-recall", action="store_true",
                   help="predict: also compute the full gate to report the predictor's recall")
    p.add_argument("--cache-type", default="f16", choices=["f16", "f32", "q8_0"],
                   help="the KV cache's type (default f16, as llama.cpp's -ctk/-ctv)")
    p.add_argument("--device", default="auto",
                   help="auto (a GPU where there is one), cpu, cuda or cuda:N: a GPU runs the attention and "
                        "the most frequently firing neurons its budget holds, the CPU the rest")
    p.add_argument("--vram-budget", type=float, default=None,
                   help="GiB of GPU memory for weights and KV cache (default: its free memory less a margin)")
    p.add_argument("-v", "--verbose", action="store_true", help="log loading details")
    return p


# The generation options as the command line spells them.
_FLAGS = {"max_tokens": "-n", "temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p",
          "min_p": "--min-p", "repeat_penalty": "--repeat-penalty", "seed": "-s"}


def _check_args(args) -> None:
    """Every argument that can be checked without the model, before anything is printed or
    fetched; errors name the flag."""
    from .model import MAX_THREADS_PER_CORE, option_problem, usable_cores

    values = {"max_tokens": args.n_predict, "temperature": args.temp, "top_k": args.top_k, "top_p": args.top_p,
              "min_p": args.min_p, "repeat_penalty": args.repeat_penalty, "seed": args.seed}
    for name, value in values.items():
        problem = option_problem(name, value)
        if problem:
            raise ValueError(f"{_FLAGS[name]} ({name}) {problem}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"-t must be >= 1, got {args.threads}")
    if args.threads is not None and args.threads > MAX_THREADS_PER_CORE * usable_cores():
        raise ValueError(f"-t {args.threads} is more than {MAX_THREADS_PER_CORE}x the {usable_cores()} cores "
                         f"this process may use")
    if args.ctx_size < 0:
        raise ValueError(f"-c must be >= 0 (0 = the model's own context), got {args.ctx_size}")
    if args.batch_size < 1:
        raise ValueError(f"-b must be >= 1, got {args.batch_size}")
    if args.vram_budget is not None and not (args.vram_budget >= 0 and math.isfinite(args.vram_budget)):
        raise ValueError(f"--vram-budget must be a number of GiB >= 0, got {args.vram_budget}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,4})?", args.device):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.target_sparsity is not None and not 0.0 < args.target_sparsity < 1.0:
        raise ValueError(f"--target-sparsity must be in (0, 1), got {args.target_sparsity}")


def _mean(xs):
    xs = [x for x in xs if x == x]  # drop NaN (not known for this strategy)
    return sum(xs) / len(xs) if xs else None


def _sparsity_line(s) -> str:
    parts = [f"FFN strategy {s['strategy']}", f"weights read {s['weight_bytes_per_token'] / 1e6:.1f} MB/token"]
    act, pred, rec = _mean(s["active_fraction"]), _mean(s["predicted_fraction"]), _mean(s["recall"])
    if act is not None:
        parts.append(f"active neurons {100 * act:.1f}% (sparsity {100 * (1 - act):.1f}%)")
    if pred is not None:
        parts.append(f"predicted {100 * pred:.1f}%")
    if rec is not None:
        parts.append(f"recall {100 * rec:.1f}%")
    return " | ".join(parts)


def _model_and_thresholds(args):
    """The model file, and the shipped layer thresholds to apply at load (None: the file's own).
    The default model runs densely from the original file unless a sparse strategy or a target is
    asked for; then the thresholds for the target (default DEFAULT_TARGET_SPARSITY) apply."""
    from . import default_model, presets

    target = args.target_sparsity
    if args.model:
        path = args.model
    else:
        path = str(default_model.path())
        if target is None and args.sparsity in ("exact", "predict"):
            target = DEFAULT_TARGET_SPARSITY
    return path, target, (None if target is None else presets.layer_thresholds(path, target))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import logging
    import warnings
    logging.basicConfig(level=logging.WARNING, format="prosparse-run: %(message)s")
    from .model import Model

    try:
        _check_args(args)
        prompt = args.prompt
        chat = args.chat
        if args.file:
            with open(args.file, encoding="utf-8") as fh:
                prompt = fh.read()
        if prompt is None:
            prompt, chat = DEFAULT_PROMPT, True
        path, target, thresholds = _model_and_thresholds(args)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = Model(path, n_ctx=args.ctx_size, n_threads=args.threads, sparsity=args.sparsity,
                          verbose=args.verbose, n_batch=args.batch_size, activation_threshold=args.act_threshold,
                          predictor_threshold=args.pred_threshold, diag_recall=args.diag_recall,
                          layer_thresholds=thresholds, kv_type=args.cache_type, device=args.device,
                          vram_budget=args.vram_budget)
        for w in caught:
            print(f"prosparse-run: warning: {w.message}", file=sys.stderr)
        hp = model.hparams
        sparse = f", thresholds for {100 * target:.0f}% FFN sparsity" if target is not None else ""
        print(f"prosparse-run: {path} ({hp['arch']}, {hp['n_layer']} layers, activation {hp['activation']}{sparse}), "
              f"FFN strategy: {model.strategy}", file=sys.stderr)
        kwargs = dict(max_tokens=args.n_predict, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                      min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop,
                      stream=True)
        t0 = time.perf_counter()
        # generate checks the prompt (empty, longer than the context) before returning the stream
        if chat:
            stream = model.chat([{"role": "user", "content": prompt}], **kwargs)
        else:
            stream = model.generate(prompt, **kwargs)
            sys.stdout.write(prompt)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        s = model.stats
        print(f"prompt: {s['n_prompt_tokens']} tokens, {s['prompt_tokens_per_second']:.1f} tok/s | "
              f"decode: {s['n_decode_tokens']} tokens, {s['decode_tokens_per_second']:.1f} tok/s | "
              f"total {time.perf_counter() - t0:.2f} s", file=sys.stderr)
        print(_sparsity_line(s), file=sys.stderr)
        pl = s["placement"]
        if pl["device"] != "cpu":
            on_gpu = sum(x["attention_on_gpu"] for x in pl["layers"])
            hot = sum(x["n_hot"] for x in pl["layers"]) / max(1, len(pl["layers"]))
            print(f"device {pl['device']}: placement {pl['bytes']['gpu'] / 2**30:.2f} GiB on the GPU (attention of "
                  f"{on_gpu}/{len(pl['layers'])} layers, mean n_hot {hot:.0f}); GPU busy {pl['gpu_busy_seconds']:.2f} s, "
                  f"CPU waited {pl['cpu_wait_seconds']:.2f} s{'; ' + pl['note'] if pl['note'] else ''}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        print(f"prosparse-run: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
