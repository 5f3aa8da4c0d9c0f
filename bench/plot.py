# SPDX-License-Identifier: BSD-3-Clause
"""Plots kmoe_bench (and peer: hf_peer.py, ggml_moe_peer) JSON into PNGs for docs/performance.md.

    python bench/plot.py --kmoe docs/bench/kmoe.json --peer docs/bench/ggml.json \
        --peer docs/bench/hf-tf5.json --out docs
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


def label(r):
    """The implementation, with the transformers major version for the HF peers (one file
    per version, the same implementation names in each)."""
    impl = r.get("implementation", "kmoe")
    return f"{impl} tf{r['transformers'].split('.')[0]}" if "transformers" in r else impl


def sweep(records, prefix, key, impl="kmoe"):
    rows = sorted((r for r in records
                   if r["name"].startswith(prefix) and label(r) == impl
                   and r.get("layer_ms") is not None), key=lambda r: r[key])
    return [r[key] for r in rows], rows


def plot_T(records, peer, out):
    xs, rows = sweep(records, "sweep-T-", "T")
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(xs, [r["layer_ms"] for r in rows], "o-", label="kmoe layer forward")
    ax.loglog(xs, [r["dense_equivalent_ms"] for r in rows], "s--", label="dense equivalent")
    for impl in sorted({label(r) for r in peer if r["name"].startswith("sweep-T-")}):
        pxs, prow = sweep(peer, "sweep-T-", "T", impl)
        ax.loglog(pxs, [r["layer_ms"] for r in prow], "^:", label=impl)
    ax.set_xlabel("tokens T")
    ax.set_ylabel("forward time [ms]")
    ax.set_title("Mixtral shapes (H=1024, F=3584, E=8, k=2), fp32 weights")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path = os.path.join(out, "perf_time_vs_T.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_E(records, peer, out):
    xs, rows = sweep(records, "sweep-E-", "E")
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogx(xs, [r["layer_ms"] for r in rows], "o-", base=2, label="kmoe layer forward")
    ax.semilogx(xs, [r["dense_equivalent_ms"] for r in rows], "s--", base=2,
                label="dense equivalent")
    for impl in sorted({label(r) for r in peer if r["name"].startswith("sweep-E-")}):
        pxs, prow = sweep(peer, "sweep-E-", "E", impl)
        ax.semilogx(pxs, [r["layer_ms"] for r in prow], "^:", base=2, label=impl)
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
    impls = ["kmoe"] + sorted({label(r) for r in peer})
    by = {(label(r), r["name"]): r for r in records + peer}
    fig, axes = plt.subplots(1, len(names), figsize=(1.2 * len(impls) * len(names), 4))
    axes = axes if len(names) > 1 else [axes]
    for ax, name in zip(axes, names):
        for i, impl in enumerate(impls):
            r = by.get((impl, name))
            for j, (key, what) in enumerate((("layer_ms", "fwd"), ("layer_fwdbwd_ms", "fwd+bwd"))):
                if r and r.get(key) is not None:
                    ax.bar(i + 0.4 * j, r[key], width=0.4, color=f"C{j}",
                           label=what if i == 0 else None)
        ax.set_xticks([i + 0.2 for i in range(len(impls))])
        ax.set_xticklabels(impls, rotation=60, ha="right", fontsize=7)
        ax.set_title(name)
        ax.set_ylabel("ms")
        ax.legend()
    path = os.path.join(out, "perf_kmoe_vs_peers.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kmoe", action="append", required=True, help="kmoe_bench --json output")
    p.add_argument("--peer", action="append", help="hf_peer.py or ggml_moe_peer --json output")
    p.add_argument("--out", default="docs")
    args = p.parse_args()
    records, peer = load(args.kmoe), load(args.peer)
    for path in (plot_T(records, peer, args.out), plot_E(records, peer, args.out),
                 plot_peer(records, peer, args.out)):
        if path:
            print("wrote", path)


if __name__ == "__main__":
    main()
