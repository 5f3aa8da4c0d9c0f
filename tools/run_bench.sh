#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Benchmarks from nothing: builds kmoe_bench, runs every configuration with both cores into
# docs/bench/kmoe.json, then, in the same invocation, the peers that are asked for:
#   KMOE_GGML_PEER=1          the llama.cpp/ggml peer (bench/ggml_peer, built here into
#                             ~/.cache/kmoe-peers on first use): the three main configurations
#                             with F32, F16, BF16 and Q8_0 weights into docs/bench/ggml.json,
#                             the sweeps with F32 weights into docs/bench/ggml-sweeps.json
#   KMOE_PEER_PYTHON="py..."  one or more Pythons with torch and transformers (e.g. a
#                             transformers 5.x and a 4.57 venv): the HF peer of each into
#                             docs/bench/hf-tf<major>.json
# then prints the tables (bench/tables.py) and, where the first Python has matplotlib,
# writes the plots. Every side runs with OMP_NUM_THREADS threads (default: all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/prepare.sh
build="${KMOE_BUILD_DIR:-build}"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DKMOE_ENABLE_BENCHMARKS=ON >/dev/null
cmake --build "$build" --target kmoe_bench
ggml_peer=""
if [ -n "${KMOE_GGML_PEER:-}" ]; then
  # Built before anything is timed, so that its compilation never overlaps a measurement.
  ggml_peer="$(bash bench/ggml_peer/build.sh | tail -n 1)"
fi
export OMP_PROC_BIND=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
echo "load before kmoe_bench: $(cat /proc/loadavg)"
"$build/bench/kmoe_bench" --json docs/bench/kmoe.json "$@"
tables=(--kmoe docs/bench/kmoe.json)
if [ -n "$ggml_peer" ]; then
  echo "load before ggml_moe_peer: $(cat /proc/loadavg)"
  "$ggml_peer" --threads "$OMP_NUM_THREADS" --json docs/bench/ggml.json \
    --config mixtral-prefill --config deepseek-prefill --config decode
  "$ggml_peer" --threads "$OMP_NUM_THREADS" --json docs/bench/ggml-sweeps.json \
    --config sweep-T --config sweep-E --type f32
  tables+=(--ggml docs/bench/ggml.json --ggml docs/bench/ggml-sweeps.json)
fi
peers=()
for py in ${KMOE_PEER_PYTHON:-}; do
  major="$("$py" -c 'import transformers; print(transformers.__version__.split(".")[0])')"
  echo "load before hf_peer.py (transformers $major): $(cat /proc/loadavg)"
  "$py" bench/hf_peer.py --threads "$OMP_NUM_THREADS" --json "docs/bench/hf-tf$major.json"
  peers+=(--peer "docs/bench/hf-tf$major.json")
done
echo "load after the last peer: $(cat /proc/loadavg)"
python3 bench/tables.py "${tables[@]}" "${peers[@]}"
if [ -n "${KMOE_PEER_PYTHON:-}" ]; then
  py="${KMOE_PEER_PYTHON%% *}"
  if "$py" -c 'import matplotlib' 2>/dev/null; then
    plot=(--kmoe docs/bench/kmoe.json "${peers[@]}")
    [ -n "$ggml_peer" ] && plot+=(--peer docs/bench/ggml.json --peer docs/bench/ggml-sweeps.json)
    "$py" bench/plot.py "${plot[@]}" --out docs
  fi
fi
