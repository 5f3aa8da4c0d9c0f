#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Builds the llama.cpp/ggml peer (bench/ggml_peer/ggml_moe_peer.cpp) into
# $KMOE_PEERS/ggml-peer/ (default ~/.cache/kmoe-peers). ggml's C source is taken from the
# llama-cpp-python sdist on PyPI (vendor/llama.cpp/ggml), downloaded here, outside the
# repository; nothing of it is committed and kmoe's own build never uses it.
#   bash bench/ggml_peer/build.sh        # prints the path of the built binary last
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
peers="${KMOE_PEERS:-$HOME/.cache/kmoe-peers}"
# Pinned so that figures name the ggml they measured; override to try another.
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
src="$peers/llama_cpp_python-$version"
mkdir -p "$peers"
if [ ! -f "$src/vendor/llama.cpp/ggml/CMakeLists.txt" ]; then
  python3 -m pip download "llama-cpp-python==$version" --no-binary :all: --no-deps -d "$peers/sdist" >&2
  tar -xzf "$peers/sdist/llama_cpp_python-$version.tar.gz" -C "$peers"
fi
build="$peers/ggml-peer"
cmake -S "$here" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DGGML_SOURCE_DIR="$src/vendor/llama.cpp/ggml" >&2
cmake --build "$build" --target ggml_moe_peer -j "${KMOE_PEER_JOBS:-2}" >&2
echo "$build/ggml_moe_peer"
