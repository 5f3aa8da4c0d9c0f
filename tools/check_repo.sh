#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Repository checks that need no build, run first in CI (.ci/run):
#  1. self-contained: no tracked file refers to a path outside the repository (the semantics
#     reference used to live beside the checkout as ../shared/SPEC.md; it is
#     docs/semantics.md now), nor to the development machine's checkout path;
#  2. no flaky pipeline in the shell tools: under `set -o pipefail` a pipe into a reader
#     that exits early fails at random when the writer then dies of SIGPIPE. Flagged: a
#     pipe into `grep -q` / `grep -m` (used for its exit status), and a variable assigned
#     from a pipe into `head` (set -e then aborts on that status); capture the output into
#     a variable and test that instead. A `$(... | head)` read only for its text is safe.
# Exits 1 and prints each offending line.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0

# The patterns are assembled so that this file does not match itself.
shared_dir='\.\./'"shared"
outside="(${shared_dir}|SPEC\\.md|/work/main)"
if hits=$(git grep -n -I -E "$outside" -- . ':!tools/check_repo.sh'); then
  printf '%s\n' "$hits"
  echo "[check_repo] FAILED: the lines above refer to files outside the repository;" \
       "cite docs/semantics.md sections instead" >&2
  status=1
fi

early_exit_pipe='\|[[:space:]]*grep[[:space:]]+(-[[:alnum:]]*[qm]|--quiet|--max-count)|="?\$\([^)]*\|[[:space:]]*head\b'
mapfile -t scripts < <(git ls-files -- 'tools/*.sh' '.ci/run' ':!tools/check_repo.sh')
if hits=$(grep -n -E "$early_exit_pipe" "${scripts[@]}" | grep -v -E '^[^:]+:[0-9]+:[[:space:]]*#'); then
  printf '%s\n' "$hits"
  echo "[check_repo] FAILED: pipe into an early-exiting reader under pipefail (see above);" \
       "capture the output, then test it" >&2
  status=1
fi

[ "$status" = 0 ] && echo "[check_repo] OK: self-contained, no early-exit pipes in tools/"
exit "$status"
