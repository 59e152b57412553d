#!/usr/bin/env bash
# Prunes the llama-cpp-python source archive to what a CUDA (or CPU) build reads, for machines
# that reach no package registry: the archive is 73 MiB (a git pack, llama.cpp's docs, vocabulary
# test files, examples), a device's copied tree is limited to 64 MiB, and the build needs ~29 MiB.
#
#   bash scripts/prune_llama_sdist.sh OUT.tar.gz [SDIST.tar.gz]
#
# Without SDIST it downloads llama-cpp-python==$LLAMA_VERSION's sdist from PyPI (pip download).
# The pruned tree keeps llama-cpp-python's package and CMake files, llama.cpp's CMake files,
# include/, src/, common/, vendor/, tools/mtmd (LLAVA_BUILD) and ggml with its CPU and CUDA
# backends; scripts/setup_cuda.sh builds it with -DGGML_CUDA=ON. The CPU set-up (setup.sh) does
# not use it.
set -euo pipefail
LLAMA_VERSION=${LLAMA_VERSION:-0.3.36}
out=$(realpath -m "$1")
sdist=${2:-}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -z "$sdist" ]; then
  python3 -m pip download -q --no-deps --no-binary :all: --no-build-isolation "llama-cpp-python==$LLAMA_VERSION" -d "$tmp" \
    || python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d "$tmp"
  sdist=$(ls "$tmp"/llama_cpp_python-*.tar.gz)
fi
tar xzf "$sdist" -C "$tmp"
src=$(ls -d "$tmp"/llama_cpp_python-*/)
cd "$src"
rm -rf .git .github docker docs examples tests
cd vendor/llama.cpp
rm -rf .git .github .devops app benches ci conversion docs examples gguf-py grammars media models \
  pocs requirements skills tests convert_*.py
find tools -mindepth 1 -maxdepth 1 ! -name mtmd -exec rm -rf {} +
rm -rf tools/mtmd/tests* tools/mtmd/*.md
# ggml: the backends a CUDA build compiles (the CPU one, which flashcli binds, and CUDA)
find ggml/src -mindepth 1 -maxdepth 1 -type d -name 'ggml-*' ! -name ggml-cpu ! -name ggml-cuda -exec rm -rf {} +
cd "$tmp"
tar czf "$out.tmp" "$(basename "$src")"
mv "$out.tmp" "$out"
echo "$out: $(du -sh "$src" | cut -f1) of sources, $(du -h "$out" | cut -f1) compressed" >&2
