#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The main job from nothing: installs/caches the dependencies, builds kmoe's examples and
# runs examples/mixtral_layer (a Mixtral-shaped layer on a batch) with both CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/prepare.sh
build="${KMOE_BUILD_DIR:-build}"
# The same configuration as tools/test.sh (CMakePresets.json), so the two share a build.
cmake --preset openmp -B "$build" >/dev/null
cmake --build "$build" --target mixtral_layer
OMP_PROC_BIND=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}" "$build/examples/mixtral_layer" "$@"
