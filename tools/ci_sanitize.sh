#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Builds kmoe's tests and examples with AddressSanitizer + UndefinedBehaviorSanitizer (and
# LeakSanitizer, which ASan runs at exit) in their own build folder and runs ctest there.
# Kokkos, Kokkos Kernels and Catch2 stay uninstrumented: only kmoe's headers, which are
# compiled into every test, are under the sanitizers. Any report fails the run: UBSan is
# made fatal (-fno-sanitize-recover, halt_on_error) so a finding cannot scroll past.
# Set KMOE_SANITIZE_BUILD_DIR to choose the build folder (default build-asan/); extra
# arguments go to ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/prepare.sh
build="${KMOE_SANITIZE_BUILD_DIR:-build-asan}"

# The sanitize preset (CMakePresets.json): Debug keeps NDEBUG undefined, so kmoe's
# debug-only invariant checks run too; -O1 keeps the instrumented tests fast enough for CI.
# configure DIR MPI EXAMPLES (ON/OFF each)
configure() {
  echo "[sanitize] configuring $1"
  cmake --preset sanitize -B "$1" -DKMOE_ENABLE_MPI="$2" -DKMOE_ENABLE_EXAMPLES="$3"
}
configure "$build" OFF ON
# What handles untrusted input (files, command lines, API arguments) and the layer's
# forward and backward on every router, expert and loss, with failover and elastic resizing; the header self-containment
# objects, benchmarks and the remaining property tests run no other kmoe code and would
# double this job (KMOE_SANITIZE_ALL=1 builds and runs them too).
targets=(test_api_misuse test_validation test_optimizer_state test_losses test_backward
         test_forward_routers test_safetensors test_file_hazards test_hf_fixtures
         test_config_hazards kmoe-run compare_safetensors train_toy custom_router
         test_sparse_mixer test_clamped_swiglu test_input_weighting test_failover test_elastic
         kmoe-plan test_layout_planner test_node_limit test_topology_placement
         test_packed_experts test_low_precision test_sharded_optimizer test_memory_accounting
         test_resident_experts test_resident_checkpoint test_low_precision_layer)
if [ "${KMOE_SANITIZE_ALL:-0}" = 1 ]; then
  target_args=()
  selection=(-E '^(consumer_project|compile_fail_.*)$')
else
  target_args=(--target "${targets[@]}")
  built=$(IFS='|'; echo "${targets[*]}")
  selection=(-R "^(${built}|hostile_inputs|kmoe_run_cli|kmoe_plan_cli|example_(train_toy|custom_router))$")
fi
echo "[sanitize] building ${target_args[*]:-every target}"
cmake --build "$build" -j "$(nproc)" "${target_args[@]}"

# LeakSanitizer works as root in the CI container (it needs ptrace-like thread
# suspension, which the container allows), so leaks are checked too.
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:strict_string_checks=1:check_initialization_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
echo "[sanitize] running ctest"
# consumer_project (a CMake packaging check) and compile_fail_* (expected compile errors)
# run no kmoe code; the soak test is long and has its own job.
(cd "$build" && ctest --output-on-failure -j 1 -LE soak "${selection[@]}" "$@")

# The distributed tests (expert-parallel dispatch and its deduplication, the exchanges, TP
# and DP) in a build of their own with the same sanitizers, but without the leak check:
# OpenMPI's allocations still held at exit, many in components it dlopen()s and unloads
# (LeakSanitizer cannot even name those), would bury any report. Leaks in kmoe's own code
# are caught by the single-process suite above, which runs the same layer code.
mpi_build="${build}-mpi"
configure "$mpi_build" ON OFF
cmake --build "$mpi_build" -j "$(nproc)" --target test_mpi_layer test_mpi_placement test_mpi_nodes \
  test_mpi_zero test_mpi_compressed_sync
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:strict_string_checks=1:check_initialization_order=1"
echo "[sanitize] running the MPI tests"
(cd "$mpi_build" && ctest --output-on-failure -j 1 -R '^test_mpi_(layer|placement|nodes|zero|compressed_sync)_np')
