#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Runs kmoe-run on every case of make_hostile.py under a per-input time limit and sorts
the results: a clean error (the expected exit status, a one-paragraph message starting
"kmoe-run:" that names the file and field, the previous output untouched), a crash (a
signal, a sanitizer report, any other status), a hang (the time limit), a silent exit 0,
or a vague error (exit 1 whose message lacks the file or field, or is unbounded). Controls
must exit 0 and write their output. Prints the summary and exits 1 if anything but clean
errors and passing controls was seen.

usage: run_hostile.py KMOE_RUN FIXTURES WORK [--jobs N] [--timeout S] [--only SUBSTRING]
"""

import argparse
import collections
import concurrent.futures
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_hostile  # noqa: E402

# An error message longer than this quotes untrusted input unbounded.
MAX_MESSAGE_CHARS = 4000


def run_case(kmoe_run, case, timeout):
    env = dict(os.environ, OMP_PROC_BIND="false", OMP_NUM_THREADS="1")
    env.update(case["env"])
    start = time.monotonic()
    try:
        p = subprocess.run([kmoe_run] + case["args"], env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "hang", f"no exit after {timeout} s", time.monotonic() - start
    elapsed = time.monotonic() - start
    err = p.stderr.decode(errors="replace")
    out = p.stdout.decode(errors="replace")
    output = case["output"]
    if "Sanitizer" in err or "runtime error:" in err or p.returncode < 0 or p.returncode not in (0, 1, 2):
        return "crash", f"exit {p.returncode}: {err[-600:]}", elapsed
    if case["rc"] == 0:
        if p.returncode != 0:
            return "failed control", f"exit {p.returncode}: {err[-600:]}", elapsed
        with open(output, "rb") as f:
            if f.read(len(make_hostile.PREVIOUS_OUTPUT)) == make_hostile.PREVIOUS_OUTPUT:
                return "failed control", "exit 0 but the output was not replaced", elapsed
        return "control ok", "", elapsed
    if p.returncode == 0:
        return "silent", f"exit 0: {out[-300:]}", elapsed
    problems = []
    if p.returncode != case["rc"]:
        problems.append(f"exit {p.returncode}, expected {case['rc']}")
    if not err.startswith("kmoe-run: "):
        problems.append("message does not start with 'kmoe-run: '")
    if len(err) > MAX_MESSAGE_CHARS and case["rc"] != 2:
        problems.append(f"message is {len(err)} characters")
    missing = [e for e in case["expect"] if e not in err]
    if missing:
        problems.append(f"message lacks {missing}")
    if os.path.isfile(output) and output != os.devnull:
        with open(output, "rb") as f:
            if f.read() != make_hostile.PREVIOUS_OUTPUT:
                problems.append("the previous output was changed")
    if problems:
        return "vague", "; ".join(problems) + ": " + err[:600], elapsed
    return "clean error", "", elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("kmoe_run")
    parser.add_argument("fixtures")
    parser.add_argument("work")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=20)
    parser.add_argument("--only", default="")
    a = parser.parse_args()

    start = time.monotonic()
    cases = [c for c in make_hostile.build(a.fixtures, a.work) if a.only in c["name"]]
    built = time.monotonic() - start
    results = {}
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        futures = {pool.submit(run_case, a.kmoe_run, c, a.timeout): c for c in cases}
        for f in concurrent.futures.as_completed(futures):
            results[futures[f]["name"]] = (futures[f], *f.result())

    by_outcome = collections.Counter(r[1] for r in results.values())
    by_category = collections.defaultdict(collections.Counter)
    for case, outcome, _, _ in results.values():
        by_category[case["category"]][outcome] += 1
    bad = [(name, r) for name, r in sorted(results.items()) if r[1] not in ("clean error", "control ok")]
    for name, (case, outcome, detail, elapsed) in bad:
        print(f"[{outcome}] {name} ({elapsed:.1f} s): {detail}")
        print("    kmoe-run " + " ".join(arg if len(arg) < 200 else arg[:200] + "..." for arg in case["args"]))
    slowest = max(results.items(), key=lambda r: r[1][3])
    print(f"\nhostile-input sweep: {len(cases)} inputs tried ({built:.1f} s to build, "
          f"{time.monotonic() - start:.1f} s in all; slowest {slowest[0]} {slowest[1][3]:.1f} s)")
    for category in sorted(by_category):
        counts = ", ".join(f"{n} {o}" for o, n in sorted(by_category[category].items()))
        print(f"  {category:26} {counts}")
    print("  total: " + ", ".join(f"{by_outcome[o]} {o}" for o in
                                  ("clean error", "control ok", "crash", "hang", "silent", "vague", "failed control")))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
