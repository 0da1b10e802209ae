"""Rebuilds tests/data/tiny-llama-cpp-q4_k_m.gguf: a tiny random LLaMA (helpers_models, the shape in
CONFIG) converted to an f32 GGUF by prosparse-convert, then quantized to Q4_K_M by llama.cpp's own
quantizer (llama-cpp-python's llama_model_quantize, no importance matrix).

    python tests/data/make_llama_cpp_q4_k_m.py PEER_PYTHON   # a Python with llama_cpp (bench/setup_peer.sh)
"""

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CONFIG = dict(hidden_act="silu", n_head=4, n_head_kv=1, n_layer=1, n_embd=256, n_ff=256)
SEED = 41
QUANTIZE = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def main():
    import helpers_models as H
    from prosparse_convert import convert

    with tempfile.TemporaryDirectory() as d:
        _, hf = H.make_llama_dir(Path(d) / "hf", seed=SEED, **CONFIG)
        f32 = Path(d) / "f32.gguf"
        convert(hf, f32, outtype="f32", format="llama.cpp", progress=False)
        subprocess.run([sys.argv[1], "-c", QUANTIZE, str(f32), str(HERE / "tiny-llama-cpp-q4_k_m.gguf")], check=True)


if __name__ == "__main__":
    main()
