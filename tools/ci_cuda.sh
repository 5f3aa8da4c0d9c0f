#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# CUDA CI job: builds Kokkos + Kokkos Kernels for CUDA (cached by tools/setup.sh), then
# compiles and links kmoe's device code with nvcc_wrapper, so that a device-cleanliness
# break (host-only code in a KOKKOS_LAMBDA, a private enclosing function, a first capture
# inside `if constexpr`, a host view touched from a kernel...) fails CI on machines without
# a GPU. Nothing runs unless nvidia-smi finds a GPU; then ctest runs too.
#
# By default it builds the targets that instantiate every router, expert, loss, optimizer,
# the layer's forward and backward, the model loaders, the NCCL communicator and the cuBLAS
# grouped GEMM on Kokkos::Cuda (the list below); nvcc takes about 2 minutes per such file on
# 2 cores, so the whole tree (about 70 files with the header self-containment checks) is
# KMOE_CUDA_ALL=1.
#
# Environment: KMOE_CUDA_BUILD_DIR (default build-cuda), KMOE_CUDA_ARCH (default sm_90,
# see tools/setup.sh), KMOE_JOBS (default 2), CUDA_HOME (default /usr/local/cuda),
# KMOE_CUDA_ALL (1: every target).
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
log() { printf '[ci_cuda %4ds] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

jobs="${KMOE_JOBS:-2}"
build="${KMOE_CUDA_BUILD_DIR:-build-cuda}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
# nvcc_wrapper's host compiler; the one tools/setup.sh built Kokkos with.
export NVCC_WRAPPER_DEFAULT_COMPILER="${NVCC_WRAPPER_DEFAULT_COMPILER:-g++}"

log "dependencies (tools/setup.sh --cuda; cached)"
bash tools/setup.sh --cuda --jobs="$jobs"
source "${KMOE_DEPS:-$HOME/.cache/kmoe-deps}/env.sh"

# ccache in front of nvcc_wrapper (checked with ccache 4.7: hits on a rebuild, misses when
# an included header changes). nvcc_wrapper picks its host compiler from the environment,
# which ccache does not see, so the compiler check names the host compiler and nvcc.
launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=)   # the cuda preset's ccache, off without one
if command -v ccache >/dev/null 2>&1; then
  export CCACHE_DIR="${CCACHE_DIR:-$KMOE_DEPS/ccache}"
  # Paths relative to the checkout in the cache keys: a fresh clone elsewhere still hits.
  export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=true
  export CCACHE_COMPILERCHECK="string:$NVCC_WRAPPER_DEFAULT_COMPILER $("$NVCC_WRAPPER_DEFAULT_COMPILER" -dumpfullversion) $(nvcc --version | tail -1)"
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  ccache -z >/dev/null
fi
log "configuring $build (cuda preset, CMakePresets.json)"
cmake --preset cuda -B "$build" "${launcher[@]}"

# `all` is every test, example, benchmark and tool (compile-fail cases are excluded from
# it on purpose; ctest builds them). Ninja prints one line per finished step.
# kmoe-run: the three model families' layers; test_backward: every router, expert kind and
# balance loss, forward and backward; test_forward_experts: FFN/GLU activations and
# capacity; test_optimizer_state: the optimizers; custom_router: a user router on the
# public base; nccl_compile: the NCCL communicator; test_cublas_grouped_gemm: the cuBLAS
# grouped GEMM backend (kmoe::cublas) against a host loop (exit 77, skipped, without a GPU);
# test_cublas_packed_gemm: gemm::CublasMixed's bf16 / fp16 GEMMs for weight-only experts.
device_targets=(kmoe-run test_backward test_forward_experts test_optimizer_state custom_router
                nccl_compile test_cublas_grouped_gemm test_cublas_packed_gemm)
if [ "${KMOE_CUDA_ALL:-0}" = 1 ]; then
  log "building every target with -j$jobs"
  target_args=()
else
  log "building ${device_targets[*]} with -j$jobs (KMOE_CUDA_ALL=1: every target)"
  target_args=(--target "${device_targets[@]}")
fi
cmake --build "$build" -j "$jobs" "${target_args[@]}" 2>&1 | tee "$build/ci_cuda_build.log"
# nvcc only warns (#20011-D, #20014-D) when a kernel calls a host-only function; on the GPU
# that call fails at run time, so here it fails the build (ccache replays the warnings).
if grep -E 'warning #2001[14]-D|calling a __host__ function' "$build/ci_cuda_build.log"; then
  log "FAILED: host-only function called from device code (see above)"
  exit 1
fi
log "CUDA build OK"
if [ "${launcher[0]}" = -DCMAKE_CXX_COMPILER_LAUNCHER=ccache ]; then ccache -s | grep -iE '^ *(hits|misses)' || true; fi

# The GPU list is captured, not piped into head: under pipefail an early-exiting reader can
# fail the pipeline at random.
if command -v nvidia-smi >/dev/null 2>&1 && gpus=$(nvidia-smi -L 2>/dev/null); then
  log "GPU found: ${gpus%%$'\n'*}; running ctest"
  selection=()
  if [ "${KMOE_CUDA_ALL:-0}" != 1 ]; then
    built=$(IFS='|'; echo "${device_targets[*]}")
    selection=(-R "^(${built}|example_custom_router)$")
  fi
  (cd "$build" && ctest --output-on-failure -j 1 "${selection[@]}")
  log "ctest OK"
else
  log "no GPU (nvidia-smi found none): compile + link only"
fi
log "done"
