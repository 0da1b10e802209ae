"""Per-tensor quantization error of prosparse-convert's K-quant mixes against llama.cpp's quantizer.

Both quantize the same float32 weights (a GGUF's tensors as the gguf package dequantizes them,
written as an f32 GGUF by prosparse-convert) to the same file type; each output tensor is
dequantized by the gguf package and compared with the float32 input:

    rel_rmse = sqrt(mean((deq - w)^2)) / sqrt(mean(w^2))

llama.cpp's side runs its own quantize (llama-cpp-python's llama_model_quantize, no importance
matrix) in a peer build's Python (bench/setup_peer.sh). The table lists every tensor, the type each
tool chose, both errors and ours / llama.cpp's; the summary line gives the largest ratio. Our
quantizer follows llama.cpp's reference algorithms, so the ratios sit at 1 up to float
summation order.

    python bench/bench_quant.py --model ~/.cache/prosparse-rt/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --mixes q4_k_m,q6_k --json quant.json

--speed times our quantizer alone instead (no model, no llama.cpp): seconds per million weights
for each type on random float32 matrices of the given shapes, wall clock and CPU time, with the
threads the converter uses and with one; --speed-before also times the straightforward version
it replaced (tests/oracle_*.py, run from a source checkout), and checks that the bytes agree.
The machine's load changes these figures: take them on a quiet one.

    python bench/bench_quant.py --speed --speed-shapes 576x1536,4096x11008 --speed-before
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FTYPES = {"q2_k": 10, "q3_k_m": 12, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "q5_0": 8, "q5_1": 9, "iq4_nl": 25}

LLAMA_QUANTIZE = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3])
p.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def default_peer() -> str:
    peers = sorted((Path.home() / ".cache" / "prosparse-bench").glob("peer-*/bin/python"))
    return str(peers[0]) if peers else ""


def tensors(path) -> dict:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = {}
    for t in GGUFReader(str(path)).tensors:
        if len(t.shape) >= 2:
            out[t.name] = (t.tensor_type.name, np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(-1))
    return out


def rel_rmse(a, ref) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - ref) ** 2)) / np.sqrt(np.mean(ref.astype(np.float64) ** 2)))


SPEED_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")


def speed(shapes, types, before: bool, json_path) -> int:
    """Seconds per million weights of our quantizer for each type and shape (wall and CPU)."""
    from prosparse_convert import iq4nl, kquants

    oracles = None
    if before:
        tests = Path(__file__).resolve().parents[1] / "tests"
        if not (tests / "oracle_kquants.py").exists():
            print(f"--speed-before: no {tests / 'oracle_kquants.py'} (run from a source checkout)", file=sys.stderr)
            return 1
        sys.path.insert(0, str(tests))
        import oracle_iq4nl
        import oracle_kquants
        oracles = (oracle_kquants, oracle_iq4nl)

    def run(mods, t, a):
        kq, iq = mods
        return iq.quantize(a) if t == "IQ4_NL" else kq.quantize(a, t)

    threads = kquants._threads()
    res = {"cpu": cpu_name(), "threads": threads, "numpy": np.__version__, "seconds_per_mweight": []}
    print(f"quantizer speed on {res['cpu']} (numpy {np.__version__}), seconds per million weights; "
          f"wall clock and CPU time, on a machine that may be busy")
    print(f"{'type':7s} {'shape':>11s} {f'{threads} thr wall':>12s} {'cpu':>7s} {'1 thr wall':>10s}"
          + (f" {'before wall':>11s} {'cpu':>7s} {'speedup':>7s}" if oracles else ""))
    rng = np.random.default_rng(0)
    saved = kquants.THREADS
    try:
        for shape in shapes:
            a = (rng.standard_normal(shape) * 0.02).astype(np.float32)
            mw = a.size / 1e6
            for t in types:
                row = {"type": t, "shape": list(shape)}
                for key, n in (("now", None), ("now_1thread", 1)):
                    kquants.THREADS = n
                    w0, c0 = time.perf_counter(), time.process_time()
                    out = run((kquants, iq4nl), t, a)
                    row[key] = (time.perf_counter() - w0) / mw
                    row[key + "_cpu"] = (time.process_time() - c0) / mw
                kquants.THREADS = saved
                line = (f"{t:7s} {shape[0]:>5d}x{shape[1]:<5d} {row['now']:12.3f} {row['now_cpu']:7.3f} "
                        f"{row['now_1thread']:10.3f}")
                if oracles:
                    w0, c0 = time.perf_counter(), time.process_time()
                    with np.errstate(all="ignore"):
                        old = run(oracles, t, a)
                    row["before"] = (time.perf_counter() - w0) / mw
                    row["before_cpu"] = (time.process_time() - c0) / mw
                    row["same_bytes"] = bool(np.array_equal(old, out))
                    line += (f" {row['before']:11.3f} {row['before_cpu']:7.3f} {row['before'] / row['now']:6.1f}x"
                             + ("" if row["same_bytes"] else "  BYTES DIFFER"))
                print(line, flush=True)
                res["seconds_per_mweight"].append(row)
    finally:
        kquants.THREADS = saved
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=1))
    return 0 if all(r.get("same_bytes", True) for r in res["seconds_per_mweight"]) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GGUF (any type the gguf package dequantizes)")
    ap.add_argument("--speed", action="store_true", help="time our quantizer alone (no model, no llama.cpp)")
    ap.add_argument("--speed-shapes", default="576x1536,4096x11008", help="comma list of ROWSxCOLS")
    ap.add_argument("--speed-types", default=",".join(SPEED_TYPES), help="comma list of " + ", ".join(SPEED_TYPES))
    ap.add_argument("--speed-before", action="store_true", help="also time the version it replaced (tests/oracle_*)")
    ap.add_argument("--mixes", default="q4_k_m,q6_k", help="comma list of " + ", ".join(FTYPES))
    ap.add_argument("--peer-python", default=default_peer(), help="a Python with llama_cpp (bench/setup_peer.sh)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.speed:
        try:
            shapes = [tuple(int(v) for v in sh.lower().split("x")) for sh in args.speed_shapes.split(",") if sh]
        except ValueError:
            ap.error(f"--speed-shapes: not ROWSxCOLS: {args.speed_shapes!r}")
        types = [t.strip().upper() for t in args.speed_types.split(",") if t.strip()]
        for t in types:
            if t not in SPEED_TYPES:
                ap.error(f"--speed-types: unknown type {t!r} (one of {', '.join(SPEED_TYPES)})")
        for sh in shapes:
            if len(sh) != 2 or sh[1] % 256 or sh[0] < 1:
                ap.error(f"--speed-shapes: {sh} is not ROWSxCOLS with COLS a multiple of 256")
        return speed(shapes, types, args.speed_before, args.json)
    if not args.model:
        ap.error("--model is required (or --speed)")
    mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    for m in mixes:
        if m not in FTYPES:
            ap.error(f"--mixes: unknown mix {m!r} (one of {', '.join(FTYPES)})")
    if not args.peer_python or not Path(args.peer_python).exists():
        ap.error("--peer-python: no Python with llama_cpp found (run bench/setup_peer.sh)")

    from prosparse_convert import convert

    results = {"cpu": cpu_name(), "model": str(args.model), "mixes": {}}
    with tempfile.TemporaryDirectory() as d:
        f32 = Path(d) / "f32.gguf"
        convert(args.model, f32, outtype="f32", format="llama.cpp", progress=False)
        ref = {n: w for n, (_, w) in tensors(f32).items()}
        for mix in mixes:
            ours_p, theirs_p = Path(d) / f"ours-{mix}.gguf", Path(d) / f"llama-{mix}.gguf"
            t0 = time.time()
            convert(f32, ours_p, outtype=mix, format="llama.cpp", progress=False)
            t_ours = time.time() - t0
            t0 = time.time()
            r = subprocess.run([args.peer_python, "-c", LLAMA_QUANTIZE, str(f32), str(theirs_p), str(FTYPES[mix])],
                               capture_output=True, text=True)
            t_theirs = time.time() - t0
            if r.returncode != 0:
                print(r.stderr[-2000:], file=sys.stderr)
                return 1
            ours, theirs = tensors(ours_p), tensors(theirs_p)
            rows = []
            for name, w in ref.items():
                if name not in ours or name not in theirs:
                    continue
                (to, wo), (tt, wt) = ours[name], theirs[name]
                e_o, e_t = rel_rmse(wo, w), rel_rmse(wt, w)
                rows.append({"tensor": name, "ours_type": to, "llama_type": tt, "ours": e_o, "llama": e_t,
                             "ratio": 1.0 if e_o == e_t else e_o / e_t if e_t > 0 else float("inf")})
            results["mixes"][mix] = {"tensors": rows, "seconds_ours": t_ours, "seconds_llama": t_theirs}
            print(f"\n{mix}: {Path(args.model).name} on {results['cpu']} "
                  f"(ours {t_ours:.1f} s in numpy, llama.cpp {t_theirs:.1f} s)")
            print(f"{'tensor':34s} {'ours':>6s} {'llama':>6s} {'rmse ours':>10s} {'rmse llama':>10s} {'ratio':>6s}")
            for row in rows:
                print(f"{row['tensor']:34s} {row['ours_type']:>6s} {row['llama_type']:>6s} {row['ours']:10.5f} "
                      f"{row['llama']:10.5f} {row['ratio']:6.3f}")
            mismatched = [r["tensor"] for r in rows if r["ours_type"] != r["llama_type"]]
            ratios = np.array([r["ratio"] for r in rows])
            print(f"{mix}: {len(rows)} tensors, types differ on {len(mismatched)}, ratio max {np.nanmax(ratios):.4f} "
                  f"median {np.nanmedian(ratios):.4f}")
            for t in sorted({r["ours_type"] for r in rows}):
                sel = ratios[[r["ours_type"] == t for r in rows]]
                print(f"  {t:6s} {len(sel):4d} tensors  ratio max {np.nanmax(sel):.4f}  median {np.nanmedian(sel):.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
