#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Every GPU step in one call, for a person on a machine with an NVIDIA GPU (H100: sm_90):
# builds the CUDA dependencies and kmoe (tools/ci_cuda.sh, which also runs ctest when it
# finds a GPU), then runs the performance configurations of bench/kmoe_bench and writes
# docs/bench_gpu.json. Commit that file together with the GPU model it came from.
#
# Environment: KMOE_CUDA_ARCH (default sm_90), KMOE_JOBS (default: all cores),
# KMOE_CUDA_BUILD_DIR (default build-cuda). Extra arguments go to kmoe_bench
# (e.g. --config mixtral --repeats 5).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
  || { echo "gpu_run.sh: nvidia-smi finds no GPU; use tools/ci_cuda.sh to only build" >&2; exit 1; }
nvidia-smi -L

export KMOE_CUDA_ARCH="${KMOE_CUDA_ARCH:-sm_90}"
export KMOE_JOBS="${KMOE_JOBS:-$(nproc)}"
build="${KMOE_CUDA_BUILD_DIR:-build-cuda}"
export KMOE_CUDA_BUILD_DIR="$build"

# setup --cuda, configure, build everything, ctest (fails here if a test fails).
bash tools/ci_cuda.sh

bench="$build/bench/kmoe_bench"
if [ -x "$bench" ]; then
  echo "[gpu_run] $bench --json docs/bench_gpu.json $*"
  "$bench" --json docs/bench_gpu.json "$@"
  echo "[gpu_run] wrote docs/bench_gpu.json"
else
  echo "[gpu_run] no $bench (bench/ not in this checkout): skipped the benchmark"
fi
