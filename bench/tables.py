# SPDX-License-Identifier: BSD-3-Clause
"""Prints the Markdown tables of docs/performance.md from kmoe_bench and hf_peer.py JSON.

    python bench/tables.py --kmoe docs/bench/kmoe.json --peer docs/bench/hf.json
"""
import argparse
import json


def fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def by_name(records, name, impl):
    for r in records:
        if r["name"] == name and r.get("implementation", "kmoe") == impl:
            return r
    return None


def main_table(kmoe):
    print("| config | fwd ms | bwd ms | fwd+bwd ms | dense fwd | dense fwd+bwd | ratio fwd "
          "| ratio fwd+bwd | route | permute | experts | shared | combine | floor |")
    print("|---" * 14 + "|")
    for name in ("mixtral-prefill", "deepseek-prefill", "decode"):
        r = by_name(kmoe, name, "kmoe")
        if r is None:
            continue
        b = r["breakdown"]
        print(f"| {name} | {fmt(r['layer_ms'])} | {fmt(r['backward_ms'])} | "
              f"{fmt(r['layer_fwdbwd_ms'])} | {fmt(r['dense_equivalent_ms'])} | "
              f"{fmt(r['dense_fwdbwd_ms'])} | {fmt(r['ratio'], 3)} | {fmt(r['ratio_fwdbwd'], 3)} | "
              f"{fmt(b['route_ms'])} | {fmt(b['permute_ms'])} | {fmt(b['experts_ms'])} | "
              f"{fmt(b['shared_ms'])} | {fmt(b['combine_ms'])} | {fmt(r['floor_ms'])} |")


def sweep_tables(kmoe):
    rows = sorted((r for r in kmoe if r["name"].startswith("sweep-T-")), key=lambda r: r["T"])
    print("\nToken sweep (forward):\n")
    print("| config | fwd ms | dense ms | ratio | ms per 1k tokens |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {fmt(r['layer_ms'])} | {fmt(r['dense_equivalent_ms'])} | "
              f"{fmt(r['ratio'], 3)} | {r['layer_ms'] * 1000 / r['T']:.0f} |")
    rows = sorted((r for r in kmoe if r["name"].startswith("sweep-E-")), key=lambda r: r["E"])
    print("\nExpert sweep at fixed active FLOPs (forward):\n")
    print("| config | fwd ms | dense ms | ratio | route ms | experts ms | fwd / fwd at E = 8 |")
    print("|---|---|---|---|---|---|---|")
    base = rows[0]["layer_ms"] if rows else None
    for r in rows:
        b = r["breakdown"]
        print(f"| {r['name']} | {fmt(r['layer_ms'])} | {fmt(r['dense_equivalent_ms'])} | "
              f"{fmt(r['ratio'], 3)} | {fmt(b['route_ms'])} | {fmt(b['experts_ms'])} | "
              f"{r['layer_ms'] / base:.3f} |")


def peer_table(kmoe, peer):
    labels = {"hf": None, "torch-sorted": "torch-sorted (kmoe's layout in eager torch)",
              "torch-grouped_mm": "torch-grouped_mm (`torch._grouped_mm`)"}
    blocks = {"mixtral-prefill": "HF MixtralSparseMoeBlock", "decode": "HF MixtralSparseMoeBlock",
              "deepseek-prefill": "HF DeepseekV3MoE"}
    print("\n| config | implementation | fwd ms | fwd+bwd ms | kmoe fwd ms | kmoe fwd+bwd ms "
          "| kmoe speed-up fwd |")
    print("|---|---|---|---|---|---|---|")
    for r in peer:
        name, impl = r["name"], r["implementation"]
        label = labels.get(impl) or blocks.get(name, impl)
        k = by_name(kmoe, name, "kmoe") if impl == "hf" else None
        speedup = (f"{r['layer_ms'] / k['layer_ms']:.2f}×" if k else "")
        print(f"| {name} | {label} | {fmt(r['layer_ms'])} | {fmt(r.get('layer_fwdbwd_ms'))} | "
              f"{fmt(k['layer_ms']) if k else ''} | {fmt(k['layer_fwdbwd_ms']) if k else ''} | "
              f"{speedup} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kmoe", required=True)
    parser.add_argument("--peer")
    args = parser.parse_args()
    with open(args.kmoe) as f:
        kmoe = json.load(f)
    main_table(kmoe)
    sweep_tables(kmoe)
    if args.peer:
        with open(args.peer) as f:
            peer_table(kmoe, json.load(f))


if __name__ == "__main__":
    main()
