#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Benchmarks from nothing: builds kmoe_bench and runs it into $KMOE_BENCH_OUT/kmoe.json
# (default docs/bench) with both cores, then, in the same invocation, the peers asked for:
#   KMOE_GGML_PEER=1          the llama.cpp/ggml peer (bench/ggml_peer, built into
#                             ~/.cache/kmoe-peers on first use; or the path of a built
#                             ggml_moe_peer), F32, F16, BF16 and Q8_0 weights, into ggml.json
#   KMOE_PEER_PYTHON="py..."  one or more Pythons with torch and transformers (e.g. a
#                             transformers 5.x and a 4.57 venv): the HF peer of each into
#                             hf-tf<major>.json
# Arguments go to kmoe_bench; its --config and --repeats go to the peers too, so that every
# side times the same configurations (without --config: kmoe_bench and the ggml peer run
# every configuration, hf_peer.py its default three). Then prints the tables
# (bench/tables.py) and, where the first Python has matplotlib, writes the plots (into docs/,
# or into KMOE_BENCH_OUT where that is given). Every side runs with OMP_NUM_THREADS threads
# (default: all cores); /proc/loadavg is printed before each, the machine may be shared.
#   KMOE_GGML_PEER=1 KMOE_PEER_PYTHON="$HOME/.cache/kmoe-peers/venv5/bin/python" \
#     bash tools/run_bench.sh --config decode --config deepseek-prefill
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/prepare.sh
build="${KMOE_BUILD_DIR:-build}"
out="${KMOE_BENCH_OUT:-docs/bench}"
plots="${KMOE_BENCH_OUT:-docs}"
mkdir -p "$out"
selection=()
args=("$@")
for ((i = 0; i + 1 < ${#args[@]}; ++i)); do
  case "${args[i]}" in
    --config | --repeats) selection+=("${args[i]}" "${args[i + 1]}") ;;
  esac
done
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DKMOE_ENABLE_BENCHMARKS=ON >/dev/null
cmake --build "$build" --target kmoe_bench
ggml_peer="${KMOE_GGML_PEER:-}"
if [ -n "$ggml_peer" ] && [ ! -x "$ggml_peer" ]; then
  # Built before anything is timed, so that its compilation never overlaps a measurement.
  ggml_peer="$(bash bench/ggml_peer/build.sh | tail -n 1)"
fi
export OMP_PROC_BIND=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
echo "$(date -u +%H:%M:%S) load before kmoe_bench: $(cat /proc/loadavg)"
"$build/bench/kmoe_bench" --json "$out/kmoe.json" "$@"
tables=(--kmoe "$out/kmoe.json")
peers=()
if [ -n "$ggml_peer" ]; then
  echo "$(date -u +%H:%M:%S) load before ggml_moe_peer: $(cat /proc/loadavg)"
  "$ggml_peer" --threads "$OMP_NUM_THREADS" --json "$out/ggml.json" "${selection[@]}"
  tables+=(--ggml "$out/ggml.json")
  peers+=(--peer "$out/ggml.json")
fi
for py in ${KMOE_PEER_PYTHON:-}; do
  major="$("$py" -c 'import transformers; print(transformers.__version__.split(".")[0])')"
  echo "$(date -u +%H:%M:%S) load before hf_peer.py (transformers $major): $(cat /proc/loadavg)"
  "$py" bench/hf_peer.py --threads "$OMP_NUM_THREADS" --json "$out/hf-tf$major.json" \
    "${selection[@]}"
  tables+=(--peer "$out/hf-tf$major.json")
  peers+=(--peer "$out/hf-tf$major.json")
done
echo "$(date -u +%H:%M:%S) load after the last run: $(cat /proc/loadavg)"
python3 bench/tables.py "${tables[@]}"
if [ -n "${KMOE_PEER_PYTHON:-}" ]; then
  py="${KMOE_PEER_PYTHON%% *}"
  if "$py" -c 'import matplotlib' 2>/dev/null; then
    "$py" bench/plot.py --kmoe "$out/kmoe.json" "${peers[@]}" --out "$plots"
  fi
fi
