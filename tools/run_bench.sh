#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Benchmarks from nothing: builds kmoe_bench, runs every configuration with both cores into
# docs/bench/kmoe.json, then (if a Python with torch and transformers is given as
# KMOE_PEER_PYTHON) the HF transformers peer into docs/bench/hf.json and the plots.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/prepare.sh
build="${KMOE_BUILD_DIR:-build}"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DKMOE_ENABLE_BENCHMARKS=ON >/dev/null
cmake --build "$build" --target kmoe_bench
export OMP_PROC_BIND=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
"$build/bench/kmoe_bench" --json docs/bench/kmoe.json "$@"
if [ -n "${KMOE_PEER_PYTHON:-}" ]; then
  "$KMOE_PEER_PYTHON" bench/hf_peer.py --threads "$OMP_NUM_THREADS" --json docs/bench/hf.json
  "$KMOE_PEER_PYTHON" bench/plot.py --kmoe docs/bench/kmoe.json --peer docs/bench/hf.json --out docs
fi
