#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Runs an MPI job that should be ended by kmoe's watchdog and checks that it was: within
# LIMIT seconds, with a diagnostic line from every rank in ALIVE that contains PATTERN
# (a grep -E expression), and without an ALIVE rank's "finished" line.
#   expect_watchdog.sh LIMIT "ALIVE RANKS" PATTERN command...
set -u
limit=$1 alive=$2 pattern=$3
shift 3
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$(date +%s%N)
# The job has ended when mpiexec exits, or when a rank has aborted and none of mpiexec's
# rank processes is left alive: Open MPI 4.1.4's mpirun was seen (about one run in ten
# under load) to hang in its abort handling with every rank already a zombie; it is killed
# then. The hard stop (4x the limit) keeps a hung job from outliving the test.
"$@" >"$log" 2>&1 &
job=$!
status=
while [ -z "$status" ]; do
  sleep 0.2
  if ! kill -0 "$job" 2>/dev/null; then
    wait "$job"
    status=$?
  elif grep -q "aborts the job" "$log" &&
       [ "$(ps --ppid "$job" -o stat= | grep -vc '^Z')" -eq 0 ]; then
    echo "expect_watchdog: every rank ended; mpiexec did not exit, so it is killed"
    kill -9 "$job"
    status=134
  elif (( ($(date +%s%N) - start) / 1000000000 > limit * 4 )); then
    pkill -9 -P "$job"
    kill -9 "$job"
    status=124
  fi
done
elapsed_ms=$((($(date +%s%N) - start) / 1000000))
cat "$log"
echo "expect_watchdog: exit status $status after ${elapsed_ms} ms (limit ${limit} s)"
failed=0
if ((elapsed_ms > limit * 1000)); then
  echo "expect_watchdog: FAIL: the job took ${elapsed_ms} ms, over ${limit} s"
  failed=1
fi
if [ "$status" -eq 0 ]; then
  echo "expect_watchdog: FAIL: the job exited 0"
  failed=1
fi
for rank in $alive; do
  if grep -q "^rank $rank finished all steps" "$log"; then
    echo "expect_watchdog: FAIL: rank $rank finished as if nothing were wrong"
    failed=1
  fi
  if ! grep -E "^kmoe: rank $rank: kmoe watchdog: " "$log" | grep -Eq -- "$pattern"; then
    echo "expect_watchdog: FAIL: no watchdog diagnostic from rank $rank matching: $pattern"
    failed=1
  fi
done
[ "$failed" -eq 0 ] && echo "expect_watchdog: PASS"
exit "$failed"
