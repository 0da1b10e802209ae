#!/usr/bin/env bash
# Build the speed peer, llama-cpp-python, from source, twice, into venvs outside the repository:
#   default : llama.cpp's own defaults (GGML_NATIVE=ON: whatever this CPU has, AMX paths included)
#   avx512  : native off, AVX-512 (+VNNI, BF16) on, AMX off
# prosparse-bench compares against the faster of the two per model, so that beating the peer
# does not just mean beating a badly configured build.
# No prebuilt wheels are used (none exist for this machine); each build takes minutes on 2 cores,
# so they run one after the other, niced.
#
# Usage: bash bench/setup_peer.sh [default|avx512|all]   (PEER_ROOT overrides the location)
set -euo pipefail

ROOT="${PEER_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/prosparse-bench}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
WHICH="${1:-all}"
mkdir -p "$ROOT/src"

SDIST="$ROOT/src/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  # --no-build-isolation: only the sdist is wanted; its metadata step then reuses installed tools.
  (cd "$ROOT/src" && pip download --no-deps --no-binary :all: --no-build-isolation \
      "llama-cpp-python==$VERSION")
fi

build() {  # name, CMAKE_ARGS
  local name="$1" args="$2" venv="$ROOT/peer-$1"
  if [ -f "$venv/.prosparse-bench-ok" ]; then
    echo "peer $name: already built in $venv"; return
  fi
  echo "peer $name: building into $venv (CMAKE_ARGS=$args)"
  python -m venv --system-site-packages "$venv"
  CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-2}" \
    nice -n 10 "$venv/bin/pip" install --no-cache-dir --force-reinstall --no-deps -v "$SDIST" \
    > "$ROOT/build-$name.log" 2>&1 || { tail -40 "$ROOT/build-$name.log"; return 1; }
  "$venv/bin/pip" install -q diskcache >/dev/null 2>&1 || true
  "$venv/bin/python" -c 'import llama_cpp; print("peer", "'"$name"'", "llama-cpp-python", llama_cpp.__version__)'
  # prosparse-bench uses only builds that got this far
  touch "$venv/.prosparse-bench-ok"
}

case "$WHICH" in
  default|all) build default "" ;;&
  avx512|all) build avx512 "-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
  default|avx512|all) ;;
  *) echo "usage: $0 [default|avx512|all]" >&2; exit 2 ;;
esac
