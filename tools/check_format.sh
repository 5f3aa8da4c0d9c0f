#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Checks that every tracked C++ file (*.hpp, *.cpp, *.h, *.cu, *.cuh) is formatted as
# .clang-format says, with clang-format 14 (the version whose output .clang-format was
# tuned against; other versions format differently). Exits 1 naming the files that differ.
# Installs clang-format-14 from Debian when it is missing, as tools/ci_fuzz.sh does clang 14.
#
# usage: tools/check_format.sh [--fix] [PATH...]
#   --fix    rewrite the files in place (clang-format-14 -i) instead of checking them
#   PATH...  limit the check to these files or folders (git pathspecs; default: the tree)
# Environment: CLANG_FORMAT  the clang-format binary (default clang-format-14)
set -euo pipefail
cd "$(dirname "$0")/.."

fix=0
paths=()
for arg in "$@"; do
  case "$arg" in
    --fix) fix=1 ;;
    -h|--help) sed -n '3,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "check_format.sh: unknown option '$arg' (see --help)" >&2; exit 2 ;;
    *) paths+=("$arg") ;;
  esac
done

clang_format="${CLANG_FORMAT:-clang-format-14}"
if ! command -v "$clang_format" >/dev/null; then
  if [ -n "${CLANG_FORMAT:-}" ]; then
    echo "[check_format] CLANG_FORMAT=$CLANG_FORMAT: not found" >&2
    exit 2
  fi
  echo "[check_format] installing clang-format-14 (Debian package)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends clang-format-14
fi
version=$("$clang_format" --version)
[[ "$version" == *"version 14."* ]] ||
  echo "[check_format] warning: $version; .clang-format is tuned for clang-format 14" >&2

# Tracked files only (build folders and untracked scratch are never looked at); a file
# deleted from the work tree but still in the index is skipped. Nothing is excluded
# today: there is no vendored code, and tests/compile_fail is ordinary code that must
# not compile for reasons clang-format does not touch.
files=()
while IFS= read -r -d '' f; do
  case "$f" in
    *.hpp|*.cpp|*.h|*.cu|*.cuh) if [ -f "$f" ]; then files+=("$f"); fi ;;
  esac
done < <(git ls-files -z -- "${paths[@]:-.}")
if [ "${#files[@]}" -eq 0 ]; then
  echo "[check_format] no C++ files to check"
  exit 0
fi

# A broken .clang-format would otherwise read as "every file differs".
"$clang_format" --style=file --dump-config "${files[0]}" >/dev/null

if [ "$fix" = 1 ]; then
  printf '%s\0' "${files[@]}" | xargs -0 -n 32 "$clang_format" -i --style=file
  echo "[check_format] formatted ${#files[@]} files with $clang_format -i"
  exit 0
fi

# One file at a time, so that each differing file is named once (clang-format's own
# --dry-run output is one warning per changed line).
bad=()
for f in "${files[@]}"; do
  if ! "$clang_format" --dry-run --Werror --style=file "$f" >/dev/null 2>&1; then
    bad+=("$f")
  fi
done
if [ "${#bad[@]}" -gt 0 ]; then
  printf '  %s\n' "${bad[@]}" >&2
  echo "[check_format] FAILED: ${#bad[@]} of ${#files[@]} files are not formatted as" \
       ".clang-format says (above)." >&2
  echo "[check_format] to fix: tools/check_format.sh --fix [PATH...]  (runs $clang_format -i;" \
       "review and commit the result); to see the changes of one file:" \
       "$clang_format --style=file FILE | diff FILE -" >&2
  exit 1
fi
echo "[check_format] OK: ${#files[@]} files formatted ($clang_format)"
