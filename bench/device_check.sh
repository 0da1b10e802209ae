#!/usr/bin/env bash
# The device check (issue 13): on a bare GPU machine (nvcc, cmake, ninja, python3 with torch,
# numpy, nanobind, scikit-build-core and transformers; no internet), in about six minutes:
#   1. the tools are there;           2. a GPU is there (else exit 2, before anything is built);
#   3. build the CUDA wheel (sm_90 only, ninja -j16) into a venv that sees the system packages,
#      with the wheels carried in bench/wheels/ (gguf, pytest and its dependencies, sentencepiece);
#   4. the GPU tests (tests/test_gpu.py, test_cuda_build.py);
#   5. compute-sanitizer memcheck and racecheck on a tiny model ("unsupported" where refused);
#   6. the benchmark: the kernels' GB/s (bench/bench_gpu_kernels.py), then
#      a LLaMA-2-7B-shaped Q4_0 FATReLU file generated here, decode tok/s at VRAM
#      budgets 0, 25%, 50%, 100% of the weights with 8 CPU threads, GB/s per device, the byte
#      bound per budget, and transformers bf16 decode of the same shapes on the same GPU.
# Prints a table and writes JSON to $OUT (or bench/results/device_check/).
#
#   bench/device_check.sh              # everything
#   SKIP_BENCH=1 bench/device_check.sh # stop after the sanitizer
# Exit codes: 0 all done and passed, 1 a step failed, 2 no usable GPU.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
RESULTS="${OUT:-$ROOT/bench/results/device_check}"
WORK="${DEVICE_CHECK_WORK:-$ROOT/build/device-check}"
JOBS="${JOBS:-16}"
T0=$(date +%s)

step() { echo; echo "== [$(( $(date +%s) - T0 ))s] $*"; }
die() { echo "device_check: $*" >&2; exit 1; }

# --- 1. tools (seconds) ------------------------------------------------------------------------
step "1/6 tools"
for tool in python3 cmake ninja; do
    command -v "$tool" >/dev/null || die "$tool is not on the PATH"
done
NVCC="$(command -v nvcc || true)"
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
[ -n "$NVCC" ] || die "nvcc is not on the PATH nor in /usr/local/cuda/bin"
echo "nvcc: $NVCC ($("$NVCC" --version | tail -1))"
echo "cpu: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"

# --- 2. a GPU (seconds; nothing built yet) -----------------------------------------------------
step "2/6 GPU"
GPU=""
if command -v nvidia-smi >/dev/null 2>&1; then
    GPU="$(nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -8)"
fi
if [ -z "$GPU" ]; then
    echo "device_check: no usable GPU on this machine (nvidia-smi is missing or lists no GPU):" \
         "the GPU tests, the sanitizer and the benchmark need one; nothing was built." >&2
    exit 2
fi
echo "$GPU"
mkdir -p "$RESULTS" "$WORK"

# --- 3. build (about a minute on 16 cores) -----------------------------------------------------
step "3/6 build"
VENV="$WORK/venv"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv --system-site-packages "$VENV" || die "python3 -m venv failed (python3-venv missing?)"
fi
PY="$VENV/bin/python"
# the carried wheels only: no index, no internet. sentencepiece (the tests' tiny tokenizers) is a
# CPython 3.12 build: a machine that has it keeps its own
"$PY" -m pip install -q --no-index --no-deps "$ROOT"/bench/wheels/*-py3-none-any.whl \
    || die "installing bench/wheels/*.whl failed"
"$PY" -c "import sentencepiece" 2>/dev/null \
    || "$PY" -m pip install -q --no-index --no-deps "$ROOT"/bench/wheels/sentencepiece-*.whl \
    || echo "device_check: warning: no sentencepiece for this Python; the GPU tests will fail to build their models"
export CMAKE_GENERATOR=Ninja CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" CUDACXX="$NVCC"
"$PY" -m pip install -q --no-index --no-build-isolation --no-deps \
    -Cbuild-dir="$WORK/cmake" -Ccmake.define.PROSPARSE_CUDA=ON \
    -Ccmake.define.PROSPARSE_CUDA_ARCHITECTURES=90-real "$ROOT" || die "the build failed"
"$PY" - <<'EOF' || exit 2
import sys
import prosparse_rt
st = prosparse_rt.cuda_status()
if not st["devices"]:
    print(f"device_check: the build sees no usable GPU: {st['reason']}", file=sys.stderr)
    sys.exit(1)
print("usable GPUs:", [(d["index"], d["name"], d["compute_capability"]) for d in st["devices"]])
EOF
STATUS_TESTS=skipped STATUS_MEMCHECK=skipped STATUS_RACECHECK=skipped

# --- 4. GPU tests (about a minute) -------------------------------------------------------------
step "4/6 GPU tests"
# every GPU test file (the runtime's test_gpu.py, the kernels' own), and the build's
GPU_TESTS=$(ls tests/test_gpu*.py tests/test_cuda_build.py tests/test_block_math.py 2>/dev/null)
if timeout 300 "$PY" -m pytest -q -p no:cacheprovider $GPU_TESTS 2>&1 | tee "$RESULTS/gpu_tests.log"; then
    STATUS_TESTS=passed
else
    STATUS_TESTS=failed
fi

# --- 5. compute-sanitizer on a tiny model ------------------------------------------------------
step "5/6 compute-sanitizer"
SAN="$(command -v compute-sanitizer || true)"
for d in "$(dirname "$NVCC")" /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer; do
    [ -z "$SAN" ] && [ -x "$d/compute-sanitizer" ] && SAN="$d/compute-sanitizer"
done
TINY="$WORK/tiny.gguf"
"$PY" bench/device_check.py tiny-model "$TINY" || die "writing the tiny model failed"
sanitize() {  # prints passed, failed or "unsupported: why"
    local tool=$1 log="$RESULTS/sanitizer_$1.log"
    if [ -z "$SAN" ]; then echo "unsupported: compute-sanitizer not found"; return; fi
    timeout 150 "$SAN" --tool "$tool" --error-exitcode 99 --target-processes all \
        "$PY" bench/device_check.py sanitize-target "$TINY" >"$log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ] && grep -q "ERROR SUMMARY: 0 errors" "$log"; then echo passed
    elif [ $rc -eq 99 ] || grep -Eq "ERROR SUMMARY: [1-9]" "$log"; then echo failed
    elif [ $rc -eq 124 ]; then echo "unsupported: timed out after 150 s"
    else echo "unsupported: $(grep -E 'Error|error|not supported' "$log" | head -1 | cut -c1-160) (rc $rc)"
    fi
}
STATUS_MEMCHECK="$(sanitize memcheck)"
echo "memcheck: $STATUS_MEMCHECK"
STATUS_RACECHECK="$(sanitize racecheck)"
echo "racecheck: $STATUS_RACECHECK"

# --- 6. benchmark (about three minutes) --------------------------------------------------------
BENCH_RC=0
if [ -z "${SKIP_BENCH:-}" ]; then
    step "6/6 benchmark"
    # the kernels alone first (GB/s on 7B-shaped matrices, bench/bench_gpu_kernels.py), then the model
    timeout 120 "$PY" bench/bench_gpu_kernels.py --json "$RESULTS/gpu_kernels.json" \
        || echo "device_check: the kernel micro-benchmark failed (rc $?); the model benchmark follows"
    "$PY" bench/device_check.py bench --work "$WORK" --out "$RESULTS/device_check.json" \
        --threads 8 --tests "$STATUS_TESTS" --memcheck "$STATUS_MEMCHECK" --racecheck "$STATUS_RACECHECK"
    BENCH_RC=$?
fi

step "done: tests $STATUS_TESTS, memcheck $STATUS_MEMCHECK, racecheck $STATUS_RACECHECK, benchmark rc $BENCH_RC"
[ "$STATUS_TESTS" = passed ] && [ "$STATUS_MEMCHECK" != failed ] && [ "$STATUS_RACECHECK" != failed ] \
    && [ $BENCH_RC -eq 0 ] || exit 1
