"""prosparse-convert MODEL_DIR|HUB_ID|IN.gguf OUT.gguf [options]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_run import run_cli
from .convert import FORMATS, NEURON_ORDERS, Options, convert
from .quant import OUTTYPES


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="prosparse-convert",
        description="Convert a Hugging Face checkpoint (directory or hub id) or a GGUF file "
                    "(ours, llama.cpp's, PowerInfer's) into a prosparse-rt GGUF file.")
    ap.add_argument("model", help="Hugging Face model directory, hub id, or input .gguf")
    ap.add_argument("out", help="output .gguf path")
    ap.add_argument("--outtype", default="f16", choices=list(OUTTYPES),
                    help="weight type of matrices (norms stay f32; default f16)")
    ap.add_argument("--format", default="prosparse", choices=FORMATS,
                    help="prosparse (default) or llama.cpp: a plain dense file llama.cpp loads")
    ap.add_argument("--predictor", type=Path, metavar="DIR",
                    help="PowerInfer predictor directory (model_{i}.pt with fc1.weight, fc2.weight)")
    ap.add_argument("--predictor-type", default="f16", choices=["f32", "f16", "q8_0", "q4_0"],
                    help="weight type of predictor matrices (default f16)")
    ap.add_argument("--predictor-threshold", type=float, default=None,
                    help="cut-off on predictor logits written to the file "
                         "(default: the input file's, else 0 = sigmoid 0.5)")
    ap.add_argument("--activation", type=Path, metavar="DIR",
                    help="PowerInfer activation directory (activation_{i}.pt neuron counts)")
    ap.add_argument("--neuron-order", default="original", choices=NEURON_ORDERS,
                    help="frequency: permute each layer's neurons hottest first (needs --activation)")
    ap.add_argument("--name", help="general.name (default: the model directory's name)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    o = Options(outtype=args.outtype, format=args.format, predictor=args.predictor,
                predictor_type=args.predictor_type, predictor_threshold=args.predictor_threshold,
                activation=args.activation, neuron_order=args.neuron_order, name=args.name,
                progress=not args.no_progress)

    def body() -> int:
        print(f"wrote {convert(args.model, args.out, o)}")
        return 0
    return run_cli("prosparse-convert", body)


if __name__ == "__main__":
    sys.exit(main())
