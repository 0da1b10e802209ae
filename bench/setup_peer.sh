#!/usr/bin/env bash
# Build the speed peer, llama-cpp-python, from source, twice, into venvs outside the repository:
#   default : llama.cpp's own defaults (GGML_NATIVE=ON: whatever this CPU has, AMX paths included)
#   avx512  : native off, AVX-512 (+VNNI, BF16) on, AMX off
# prosparse-bench compares against the faster of the two per model, so that beating the peer
# does not just mean beating a badly configured build.
# For `prosparse-bench --serve`, llama.cpp's own llama-server from the llama.cpp sources vendored in
# the same sdist, with the same two configurations:
#   server         : llama.cpp's defaults        -> $ROOT/llama-server-default/bin/llama-server
#   server-avx512  : the avx512 flags above      -> $ROOT/llama-server-avx512/bin/llama-server
# (cmake -DLLAMA_BUILD_SERVER=ON, target llama-server, static libraries; about an hour on 2 busy cores).
# No prebuilt wheels are used (none exist for this machine); each build takes minutes on 2 cores,
# so they run one after the other, niced.
#
# Usage: bash bench/setup_peer.sh [default|avx512|server|server-avx512|all]
#   PEER_ROOT overrides the location, JOBS the build's parallelism (default 2); PEER_DRY_RUN=1 prints
#   the llama-server build's commands instead of running them.
set -euo pipefail

ROOT="${PEER_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/prosparse-bench}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
WHICH="${1:-all}"
mkdir -p "$ROOT/src"

SDIST="$ROOT/src/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ] && [ -z "${PEER_DRY_RUN:-}" ]; then
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

run() {  # a command, or its echo under PEER_DRY_RUN
  if [ -n "${PEER_DRY_RUN:-}" ]; then echo "+ $*"; else "$@"; fi
}

build_server() {  # name, cmake args: llama-server alone, from the sdist's vendor/llama.cpp
  local name="$1" args="$2" dest="$ROOT/llama-server-$1"
  if [ -f "$dest/.prosparse-bench-ok" ]; then
    echo "llama-server $name: already built in $dest"; return
  fi
  local src="$ROOT/src/llama_cpp_python-$VERSION"
  if [ ! -d "$src/vendor/llama.cpp" ]; then run tar -xzf "$SDIST" -C "$ROOT/src"; fi
  echo "llama-server $name: building into $dest (cmake args: $args)"
  # shellcheck disable=SC2086  # $args is a list of -D options
  run cmake -S "$src/vendor/llama.cpp" -B "$dest/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
      -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF $args
  run nice -n 10 cmake --build "$dest/build" --target llama-server -j "${JOBS:-2}"
  run mkdir -p "$dest/bin"
  run cp "$dest/build/bin/llama-server" "$dest/bin/llama-server"
  run "$dest/bin/llama-server" --version
  # prosparse-bench --serve uses only builds that got this far
  run touch "$dest/.prosparse-bench-ok"
}

AVX512="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
case "$WHICH" in
  default|all) build default "" ;;&
  avx512|all) build avx512 "$AVX512" ;;&
  server|all) build_server default "" ;;&
  server-avx512|all) build_server avx512 "$AVX512" ;;&
  default|avx512|server|server-avx512|all) ;;
  *) echo "usage: $0 [default|avx512|server|server-avx512|all]" >&2; exit 2 ;;
esac
