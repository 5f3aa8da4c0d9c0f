#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Builds the libFuzzer targets in fuzz/ (safetensors reader, index reader, config parser)
# with clang 14 under AddressSanitizer + UndefinedBehaviorSanitizer and runs each for
# SECONDS seconds (default 60) on one core, starting from a seed corpus made from
# tests/fixtures (inputs up to 64 KiB: every fixture header fits, and small inputs keep
# the executions fast). Exits non-zero on any finding; the input is kept under
# build-fuzz/artifacts/. The readers need no Kokkos, so clang builds them alone.
#
# usage: tools/ci_fuzz.sh [SECONDS] [TARGET...]     (targets: safetensors index config)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors index config)

# clang 14 and its fuzzer runtime, from Debian, if missing.
if ! command -v clang++-14 >/dev/null ||
   ! ls /usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q clang-14 libclang-rt-14-dev nlohmann-json3-dev
fi

out=build-fuzz
# Scratch files on tmpfs where there is one: the safetensors target's round trip fsyncs.
scratch="$PWD/$out/scratch"
[ -w /dev/shm ] && scratch="/dev/shm/kmoe-fuzz-$$"
mkdir -p "$out/artifacts" "$scratch"
flags=(-std=c++17 -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined
       -fno-sanitize-recover=undefined -Iinclude -Ifuzz)

# Seeds: the fixture files, and two indexes over the target's own shards.
rm -rf "$out/seeds"
mkdir -p "$out/seeds/safetensors" "$out/seeds/config" "$out/seeds/index"
for file in tests/fixtures/*/*.safetensors tests/fixtures/*/model/*; do
  kind=safetensors
  [[ "$file" == *.json ]] && kind=config
  cp "$file" "$out/seeds/$kind/$(echo "${file#tests/fixtures/}" | tr / _)"
done
printf '%s' '{"metadata":{"total_size":40},"weight_map":{"a":"a.safetensors","b":"b.safetensors"}}' \
  > "$out/seeds/index/two_shards.json"
printf '%s' '{"weight_map":{"a":"a.safetensors","b":"fifo.safetensors","c":"../a.safetensors"}}' \
  > "$out/seeds/index/hazards.json"

status=0
for target in "${targets[@]}"; do
  binary="$out/fuzz_$target"
  # Rebuilt only when a source is newer: each build takes minutes under the sanitizers.
  if [ ! -x "$binary" ] || [ -n "$(find fuzz include/kmoe -newer "$binary" -type f | head -1)" ]; then
    clang++-14 "${flags[@]}" "fuzz/fuzz_$target.cpp" -o "$binary"
  fi
  mkdir -p "$out/corpus/$target"
  echo "[fuzz] $target: ${seconds} s"
  log="$out/fuzz_$target.log"
  if KMOE_FUZZ_SCRATCH="$scratch" UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
     ASAN_OPTIONS=detect_leaks=1 \
     "$binary" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
       -dict=fuzz/json.dict -print_final_stats=1 -artifact_prefix="$out/artifacts/${target}-" \
       "$out/corpus/$target" "$out/seeds/$target" >"$log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    echo "[fuzz] $target: ${runs} executions, no finding"
  else
    status=1
    echo "[fuzz] $target: FINDING (see $log and $out/artifacts/)"
    tail -40 "$log"
  fi
done
rm -rf "$scratch"
exit $status
