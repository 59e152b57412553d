#!/usr/bin/env bash
# Creates .venv with flashcli and a llama-cpp-python built for this CPU family, then checks that
# llama.cpp really runs (a default build can die with SIGILL on AMX-advertising CPUs).
# The llama-cpp-python wheel is cached under ~/.cache/flashcli/wheels, keyed by the build flags,
# so only the first set-up on a machine pays for the ~7 minute build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LLAMA_VERSION=0.3.36
# Each ggml SIMD level is switched on only where /proc/cpuinfo lists it, AMX never: a native
# build (or one with a fixed flag list) can emit instructions the CPU advertises but faults on,
# or lacks (AVX-VNNI on AVX512-VNNI-only CPUs), and dies with SIGILL on the first matrix product.
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { for f in "$@"; do [[ " $cpu_flags " == *" $f "* ]] || return 1; done; }
CMAKE_ARGS_FLASHCLI="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
opt() { if has "${@:2}"; then CMAKE_ARGS_FLASHCLI+=" -D$1=ON"; else CMAKE_ARGS_FLASHCLI+=" -D$1=OFF"; fi; }
opt GGML_AVX avx
opt GGML_AVX2 avx2
opt GGML_FMA fma
opt GGML_F16C f16c
opt GGML_BMI2 bmi2
opt GGML_AVX512 avx512f avx512cd avx512vl avx512dq avx512bw
opt GGML_AVX512_VNNI avx512_vnni
opt GGML_AVX512_BF16 avx512_bf16
opt GGML_AVX512_VBMI avx512vbmi
opt GGML_AVX_VNNI avx_vnni
CMAKE_ARGS=${CMAKE_ARGS:-$CMAKE_ARGS_FLASHCLI}
key=$(printf '%s %s' "$LLAMA_VERSION" "$CMAKE_ARGS" | sha256sum | cut -c1-12)
WHEELS=${FLASHCLI_WHEEL_CACHE:-$HOME/.cache/flashcli/wheels}/$key

log() { echo "setup: $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

if ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_VERSION')" 2>/dev/null; then
  wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    log "building llama-cpp-python $LLAMA_VERSION from source (about 7 minutes on 2 cores)"
    mkdir -p "$WHEELS"
    tmp=$(mktemp -d)
    CMAKE_ARGS="$CMAKE_ARGS" $PIP wheel --no-cache-dir --no-deps "llama-cpp-python==$LLAMA_VERSION" -w "$tmp"
    mv "$tmp"/llama_cpp_python-*.whl "$WHEELS"/
    rmdir "$tmp" 2>/dev/null || true
    wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl | head -n 1)
  fi
  log "installing $(basename "$wheel")"
  $PIP install "$wheel"
fi

log "installing flashcli and its dependencies"
$PIP install -e ".[test]"
