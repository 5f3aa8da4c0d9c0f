# SPDX-License-Identifier: BSD-3-Clause
"""Draws kmoe's monitoring log (kmoe::StatsLog JSON lines, docs/placement.md).

From one or more .jsonl files (one per rank) it writes:
  <out>_load.png    heat map of tokens per expert over the steps of one layer, with the
                    max/mean load underneath;
  <out>_phases.png  mean time per forward phase, one bar group per rank;
  <out>_bytes.png   (several ranks with exchanged bytes) bytes sent per (rank, peer),
                    dispatch plus combine, summed over the steps.

    python tools/plot_routing.py stats.jsonl [more.jsonl ...] --out docs/routing [--layer moe]

Needs matplotlib (tooling only, never a dependency of kmoe).
"""
import argparse
import collections
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PHASES = ("route", "dispatch", "imbalance", "exchange", "shared", "experts", "combine")


def read_records(paths):
    records = []
    for path in paths:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    sys.exit(f"plot_routing: {path}:{number}: not a JSON line: {e}")
    if not records:
        sys.exit("plot_routing: no records in " + ", ".join(paths))
    for r in records:
        for field in ("step", "layer", "rank", "tokens_per_expert", "phase_ms"):
            if field not in r:
                sys.exit(f"plot_routing: a record has no field \"{field}\": {str(r)[:120]}")
    return records


def plot_load(records, layer, out):
    rows = sorted((r for r in records if r["layer"] == layer and r["rank"] == records[0]["rank"]),
                  key=lambda r: r["step"])
    if not rows:
        sys.exit(f"plot_routing: no records of layer \"{layer}\"")
    steps = [r["step"] for r in rows]
    load = [r["tokens_per_expert"] for r in rows]  # [steps][experts]
    experts = len(load[0])
    fig, (heat, spread) = plt.subplots(
        2, 1, figsize=(8, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    image = heat.imshow(list(map(list, zip(*load))), aspect="auto", origin="lower",
                        interpolation="nearest", cmap="viridis",
                        extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, experts - 0.5))
    heat.set_ylabel("expert")
    heat.set_title(f"tokens per expert, layer {layer}")
    fig.colorbar(image, ax=heat, label="tokens")
    spread.plot(steps, [r.get("load_max_over_mean", 0) for r in rows], label="max/mean")
    spread.plot(steps, [r.get("load_min_over_mean", 0) for r in rows], label="min/mean")
    spread.set_xlabel("step")
    spread.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out + "_load.png", dpi=110)
    plt.close(fig)


def plot_phases(records, out):
    per_rank = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in records:
        for phase in PHASES:
            value = r["phase_ms"].get(phase)
            if value is not None:
                per_rank[r["rank"]][phase].append(value)
    ranks = sorted(per_rank)
    width = 0.8 / len(ranks)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, rank in enumerate(ranks):
        means = [sum(per_rank[rank][p]) / max(1, len(per_rank[rank][p])) for p in PHASES]
        ax.bar([x + i * width for x in range(len(PHASES))], means, width, label=f"rank {rank}")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(PHASES))], PHASES)
    ax.set_ylabel("mean ms per forward")
    ax.set_title("time per forward phase")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out + "_phases.png", dpi=110)
    plt.close(fig)


def plot_bytes(records, out):
    sent = collections.defaultdict(lambda: collections.defaultdict(int))
    for r in records:
        peers = r.get("bytes_per_peer", {})
        for direction in ("dispatch_sent", "combine_sent"):
            for peer, count in enumerate(peers.get(direction, [])):
                sent[r["rank"]][peer] += count
    if len(sent) < 2:
        return False
    ranks = sorted(sent)
    matrix = [[sent[r][p] for p in ranks] for r in ranks]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    image = ax.imshow(matrix, cmap="magma", interpolation="nearest")
    ax.set_xlabel("to rank")
    ax.set_ylabel("from rank")
    ax.set_title("bytes sent (dispatch + combine)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out + "_bytes.png", dpi=110)
    plt.close(fig)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", help="kmoe::StatsLog .jsonl files")
    parser.add_argument("--out", required=True, help="prefix of the PNG files")
    parser.add_argument("--layer", help="layer to draw (default: the first record's)")
    args = parser.parse_args()
    records = read_records(args.logs)
    plot_load(records, args.layer or records[0]["layer"], args.out)
    plot_phases(records, args.out)
    wrote = ["_load.png", "_phases.png"] + (["_bytes.png"] if plot_bytes(records, args.out) else [])
    print("wrote " + ", ".join(args.out + w for w in wrote))


if __name__ == "__main__":
    main()
