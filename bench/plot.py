# SPDX-License-Identifier: BSD-3-Clause
"""Plots kmoe_bench (and hf_peer.py) JSON records into PNGs for docs/performance.md.

    python bench/plot.py --kmoe docs/bench/kmoe.json \
        --peer docs/bench/hf.json --out docs
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display on build machines
import matplotlib.pyplot as plt  # noqa: E402


def load(paths):
    records = []
    for path in paths or []:
        with open(path) as f:
            records += json.load(f)
    return records


def sweep(records, prefix, key, impl="kmoe"):
    rows = sorted((r for r in records
                   if r["name"].startswith(prefix) and r.get("implementation", "kmoe") == impl
                   and r.get("layer_ms") is not None), key=lambda r: r[key])
    return [r[key] for r in rows], rows


def plot_T(records, peer, out):
    xs, rows = sweep(records, "sweep-T-", "T")
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(xs, [r["layer_ms"] for r in rows], "o-", label="kmoe layer forward")
    ax.loglog(xs, [r["dense_equivalent_ms"] for r in rows], "s--", label="dense equivalent")
    for impl in ("hf", "torch-sorted"):
        pxs, prow = sweep(peer, "sweep-T-", "T", impl)
        if prow:
            ax.loglog(pxs, [r["layer_ms"] for r in prow], "^:", label=f"PyTorch {impl}")
    ax.set_xlabel("tokens T")
    ax.set_ylabel("forward time [ms]")
    ax.set_title("Mixtral shapes (H=1024, F=3584, E=8, k=2), fp32")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path = os.path.join(out, "perf_time_vs_T.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_E(records, out):
    xs, rows = sweep(records, "sweep-E-", "E")
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogx(xs, [r["layer_ms"] for r in rows], "o-", base=2, label="kmoe layer forward")
    ax.semilogx(xs, [r["dense_equivalent_ms"] for r in rows], "s--", base=2,
                label="dense equivalent")
    ax.set_xlabel("experts E (fixed active FLOPs: T=4096, H=1024, F=512, k=2)")
    ax.set_ylabel("forward time [ms]")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path = os.path.join(out, "perf_time_vs_E.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_peer(records, peer, out):
    names = [n for n in ("mixtral-prefill", "deepseek-prefill", "decode")
             if any(r["name"] == n for r in records)]
    if not names or not peer:
        return None
    impls = ["kmoe"] + sorted({r["implementation"] for r in peer})
    by = {(r.get("implementation", "kmoe"), r["name"]): r for r in records + peer}
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4))
    axes = axes if len(names) > 1 else [axes]
    for ax, name in zip(axes, names):
        for i, impl in enumerate(impls):
            r = by.get((impl, name))
            for j, (key, label) in enumerate((("layer_ms", "fwd"), ("layer_fwdbwd_ms", "fwd+bwd"))):
                if r and r.get(key) is not None:
                    ax.bar(i + 0.4 * j, r[key], width=0.4, color=f"C{j}",
                           label=label if i == 0 else None)
        ax.set_xticks([i + 0.2 for i in range(len(impls))])
        ax.set_xticklabels(impls, rotation=20)
        ax.set_title(name)
        ax.set_ylabel("ms")
        ax.legend()
    path = os.path.join(out, "perf_kmoe_vs_pytorch.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kmoe", action="append", required=True, help="kmoe_bench --json output")
    p.add_argument("--peer", action="append", help="hf_peer.py --json output")
    p.add_argument("--out", default="docs")
    args = p.parse_args()
    records, peer = load(args.kmoe), load(args.peer)
    for path in (plot_T(records, peer, args.out), plot_E(records, args.out),
                 plot_peer(records, peer, args.out)):
        if path:
            print("wrote", path)


if __name__ == "__main__":
    main()
