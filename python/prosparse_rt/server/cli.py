"""prosparse-server: an OpenAI-compatible HTTP server (``python -m prosparse_rt.server`` too)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prosparse-server",
        description="Serve a GGUF model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models, "
                    "/health), decoding up to --parallel requests together. Without -m, serves the default "
                    "model as prosparse-run does.")
    p.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free one)")
    p.add_argument("-np", "--parallel", type=int, default=4,
                   help="requests decoded together, each with a KV cache slot of its own (default 4)")
    p.add_argument("-c", "--ctx-size", type=int, default=2048,
                   help="context per slot, prompt and generated tokens (0 = the model's own; default 2048)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("-b", "--batch-size", type=int, default=256,
                   help="the most tokens one step runs over all slots (default 256)")
    p.add_argument("--queue", type=int, default=64,
                   help="requests that may wait for a slot; more are answered 503 (default 64)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--alias", default=None, help="the model id /v1/models reports (default: the file's name)")
    p.add_argument("--sparsity", default="auto", choices=["auto", "dense", "exact", "predict"],
                   help="FFN strategy (default auto: exact where the activation is sparse, else dense)")
    p.add_argument("--target-sparsity", type=float, default=None,
                   help="run with the per-layer |SiLU| thresholds shipped for this fraction of FFN neurons zeroed")
    p.add_argument("--act-threshold", type=float, default=None, help="override the FATReLU threshold t")
    p.add_argument("--pred-threshold", type=float, default=None, help="override the predictor's logit cut-off")
    p.add_argument("--cache-type", default="f16", choices=["f16", "f32", "q8_0"], help="the KV cache's type")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (as prosparse-run)")
    p.add_argument("-v", "--verbose", action="store_true", help="log loading details and each request")
    return p


def _check_args(args) -> None:
    from ..model import MAX_THREADS_PER_CORE, usable_cores

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {args.parallel}")
    if args.queue < 0:
        raise ValueError(f"--queue must be >= 0, got {args.queue}")
    if args.ctx_size < 0:
        raise ValueError(f"-c must be >= 0 (0 = the model's own context), got {args.ctx_size}")
    if args.batch_size < 1:
        raise ValueError(f"-b must be >= 1, got {args.batch_size}")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS_PER_CORE * usable_cores():
        raise ValueError(f"-t must be in [1, {MAX_THREADS_PER_CORE * usable_cores()}], got {args.threads}")
    if args.target_sparsity is not None and not 0.0 < args.target_sparsity < 1.0:
        raise ValueError(f"--target-sparsity must be in (0, 1), got {args.target_sparsity}")
    if args.api_key is not None and not args.api_key:
        raise ValueError("--api-key is empty")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="prosparse-server: %(message)s")
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        print(f"prosparse-server: error: {e.name} is missing; install the server extra: "
              "pip install 'prosparse-rt[server]'", file=sys.stderr)
        return 1
    from ..cli import _model_and_thresholds
    from ..model import Model

    try:
        _check_args(args)
        path, _, thresholds = _model_and_thresholds(args)
        model = Model(path, n_ctx=args.ctx_size, n_threads=args.threads, sparsity=args.sparsity,
                      verbose=args.verbose, n_batch=args.batch_size, activation_threshold=args.act_threshold,
                      predictor_threshold=args.pred_threshold, layer_thresholds=thresholds,
                      kv_type=args.cache_type, device=args.device, n_seq=args.parallel)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"prosparse-server: error: {e}", file=sys.stderr)
        return 1
    name = args.alias or Path(path).name
    print(f"prosparse-server: {path}, FFN strategy {model.strategy}, {args.parallel} slots of {model.n_ctx} "
          f"tokens, on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    app = create_app(model, name=name, api_key=args.api_key, queue_size=args.queue)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
