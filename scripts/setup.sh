#!/usr/bin/env bash
# Creates .venv with flashcli and a llama-cpp-python built for this CPU family, then checks that
# llama.cpp really runs (a default build can die with SIGILL on AMX-advertising CPUs).
# GPU=cuda adds ggml's CUDA backend (-DGGML_CUDA=ON, for CUDA_ARCH, default "native"): never
# chosen by itself, since nvcc is found on machines with no GPU; the CPU build is the default.
# LLAMA_SOURCE=PATH builds from that source archive (scripts/prune_llama_sdist.sh makes a small
# one) instead of PyPI's; with --wheel-only the wheel is built (or found) and its path printed,
# nothing installed: a machine with no package registry installs it by hand.
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
case "${GPU:-}" in
  "") ;;
  cuda) CMAKE_ARGS_FLASHCLI+=" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-native}"
        # llama.cpp's FlashAttention kernels are most of a CUDA build's time and flashcli's
        # graphs do not use them: CUDA_FA=ON builds them (llama.cpp then uses them by default)
        CMAKE_ARGS_FLASHCLI+=" -DGGML_CUDA_FA=${CUDA_FA:-OFF}" ;;
  *) echo "setup: GPU=$GPU: only GPU=cuda is known" >&2; exit 2 ;;
esac
CMAKE_ARGS=${CMAKE_ARGS:-$CMAKE_ARGS_FLASHCLI}
WHEEL_ONLY=0
[ "${1:-}" = "--wheel-only" ] && WHEEL_ONLY=1
key=$(printf '%s %s' "$LLAMA_VERSION" "$CMAKE_ARGS" | sha256sum | cut -c1-12)
WHEELS=${FLASHCLI_WHEEL_CACHE:-$HOME/.cache/flashcli/wheels}/$key

log() { echo "setup: $*" >&2; }

build_wheel() {  # -> the cached wheel's path
  local wheel tmp
  wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    local what="llama-cpp-python==$LLAMA_VERSION" isolation=()
    if [ -n "${LLAMA_SOURCE:-}" ]; then  # a pruned archive: its build needs are installed already
      what=$(realpath "$LLAMA_SOURCE")
      isolation=(--no-build-isolation)
    fi
    log "building llama-cpp-python $LLAMA_VERSION from source (about 7 minutes on 2 cores) with $CMAKE_ARGS"
    mkdir -p "$WHEELS"
    tmp=$(mktemp -d)
    CMAKE_ARGS="$CMAKE_ARGS" $PIP wheel --no-cache-dir --no-deps "${isolation[@]}" "$what" -w "$tmp" >&2
    mv "$tmp"/llama_cpp_python-*.whl "$WHEELS"/
    rmdir "$tmp" 2>/dev/null || true
    wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl | head -n 1)
  fi
  echo "$wheel"
}

if [ "$WHEEL_ONLY" = 1 ]; then
  PIP="$PYTHON -m pip --disable-pip-version-check -q"
  build_wheel
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

# the installed build is kept where it is this version and, for GPU=cuda, has the CUDA backend
HAS="import llama_cpp, sys, pathlib; lib = pathlib.Path(llama_cpp.__file__).parent / 'lib'
sys.exit(llama_cpp.__version__ != '$LLAMA_VERSION' or ('${GPU:-}' == 'cuda') != (lib / 'libggml-cuda.so').exists())"
if ! "$VENV/bin/python" -c "$HAS" 2>/dev/null; then
  wheel=$(build_wheel)
  log "installing $(basename "$wheel")"
  $PIP install --force-reinstall --no-deps "$wheel"
  $PIP install "$wheel"  # its dependencies
fi

log "installing flashcli and its dependencies"
$PIP install -e ".[test]"

# The columns library (flashcli/engine/columns.py): exact batches at one read of the weights. It
# calls ggml's own kernels, and has one of its own (Q4_K, AVX-512 VNNI by function attributes,
# used only where the CPU runs it and its bits match ggml's), so it needs no CPU flags; where no
# C compiler is found (or the build fails) flashcli keeps multiplying a few columns at a time,
# with the same results.
native=flashcli/engine/native
build_columns() { "${CC:-cc}" -O2 -fPIC -shared "$@" -o "$native/libcolumns.so.tmp" "$native"/*.c; }
if command -v "${CC:-cc}" >/dev/null 2>&1 && { build_columns || build_columns -DFC_NO_FUSED; }; then
  mv "$native/libcolumns.so.tmp" "$native/libcolumns.so"
  log "built $native/libcolumns.so"
else
  rm -f "$native/libcolumns.so.tmp"
  log "warning: $native/*.c did not build (no C compiler?): exact batches keep the slower path"
fi
