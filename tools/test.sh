#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Runs the whole test suite from nothing: installs/caches the dependencies, configures,
# builds every test, example and benchmark, and runs ctest (Serial and OpenMP, MPI at 2
# and 4 ranks). Set KMOE_BUILD_DIR to choose the build folder (default build/).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/prepare.sh
build="${KMOE_BUILD_DIR:-build}"
echo "[test] configuring $build"
# The openmp preset (CMakePresets.json) holds the options; -B keeps KMOE_BUILD_DIR working.
cmake --preset openmp -B "$build"
echo "[test] building"
cmake --build "$build" -j "$(nproc)"
echo "[test] running ctest"
cd "$build" && ctest --output-on-failure -j 1 -LE soak "$@"
