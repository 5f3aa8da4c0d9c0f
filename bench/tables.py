# SPDX-License-Identifier: BSD-3-Clause
"""Prints the Markdown tables of docs/performance.md from kmoe_bench, ggml_moe_peer and
hf_peer.py JSON. "kmoe speed-up" is the peer's time over kmoe's, from the same invocation.

    python bench/tables.py --kmoe docs/bench/kmoe.json --ggml docs/bench/ggml.json \
        --peer docs/bench/hf-tf5.json --peer docs/bench/hf-tf4.json
"""
import argparse
import json


def load(paths):
    records = []
    for path in paths:
        with open(path) as f:
            records += json.load(f)
    return records


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
    if rows:
        print("\nToken sweep (forward):\n")
        print("| config | fwd ms | dense ms | ratio | ms per 1k tokens |")
        print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {fmt(r['layer_ms'])} | {fmt(r['dense_equivalent_ms'])} | "
              f"{fmt(r['ratio'], 3)} | {r['layer_ms'] * 1000 / r['T']:.0f} |")
    rows = sorted((r for r in kmoe if r["name"].startswith("sweep-E-")), key=lambda r: r["E"])
    if not rows:
        return
    print("\nExpert sweep at fixed active FLOPs (forward):\n")
    print("| config | fwd ms | dense ms | ratio | route ms | experts ms | fwd / fwd at E = 8 |")
    print("|---|---|---|---|---|---|---|")
    base = rows[0]["layer_ms"]
    for r in rows:
        b = r["breakdown"]
        print(f"| {r['name']} | {fmt(r['layer_ms'])} | {fmt(r['dense_equivalent_ms'])} | "
              f"{fmt(r['ratio'], 3)} | {fmt(b['route_ms'])} | {fmt(b['experts_ms'])} | "
              f"{r['layer_ms'] / base:.3f} |")


def peer_table(kmoe, peer):
    labels = {"torch-sorted": "torch-sorted (kmoe's layout in eager torch)",
              "torch-grouped_mm": "torch-grouped_mm (`torch._grouped_mm`)"}
    experts = {None: "per-expert module loop", "grouped_mm": "`grouped_mm` experts (default)",
               "eager": "`eager` experts loop"}
    print("\n| config | transformers | implementation | fwd ms | fwd+bwd ms | kmoe fwd ms "
          "| kmoe fwd+bwd ms | kmoe speed-up fwd | kmoe speed-up fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in peer:
        name, impl = r["name"], r["implementation"]
        label = labels.get(impl, impl)
        if impl.startswith("hf"):
            block = "DeepseekV3MoE" if name.startswith("deepseek") else "MixtralSparseMoeBlock"
            label = f"{block}, {experts[r.get('experts_implementation')]}"
        k = by_name(kmoe, name, "kmoe")
        fb = r.get("layer_fwdbwd_ms")
        kf, kfb = (k["layer_ms"], k["layer_fwdbwd_ms"]) if k else (None, None)
        up = f"{r['layer_ms'] / kf:.2f}×" if kf else ""
        up_fb = f"{fb / kfb:.2f}×" if fb and kfb else ""
        print(f"| {name} | {r.get('transformers', '-')} | {label} | {fmt(r['layer_ms'])} | "
              f"{fmt(fb)} | {fmt(kf)} | {fmt(kfb)} | {up} | {up_fb} |")


def ggml_table(kmoe, ggml):
    """kmoe (fp32) against ggml at F32 weights, the equal-precision pair; the other weight
    types as context (ggml then also rounds the activations to the weights' dot type)."""
    types = [t for t in ("f32", "f16", "bf16", "q8_0")
             if any(r["weight_type"] == t for r in ggml)]
    names = list(dict.fromkeys(r["name"] for r in ggml))
    print("\n| config | kmoe fwd ms (fp32) | "
          + " | ".join(f"ggml {t.upper()} fwd ms | kmoe speed-up vs {t.upper()}" for t in types)
          + " |")
    print("|---" * (2 + 2 * len(types)) + "|")
    for name in names:
        k = by_name(kmoe, name, "kmoe")
        cells = []
        for t in types:
            g = by_name(ggml, name, f"ggml-{t}")
            speedup = f"{g['layer_ms'] / k['layer_ms']:.2f}×" if g and k else "-"
            cells += [fmt(g["layer_ms"]) if g else "-", speedup]
        print(f"| {name} | {fmt(k['layer_ms']) if k else '-'} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kmoe", required=True)
    parser.add_argument("--peer", action="append", help="hf_peer.py --json output")
    parser.add_argument("--ggml", action="append", help="ggml_moe_peer --json output")
    args = parser.parse_args()
    with open(args.kmoe) as f:
        kmoe = json.load(f)
    main_table(kmoe)
    sweep_tables(kmoe)
    if args.ggml:
        ggml_table(kmoe, load(args.ggml))
    if args.peer:
        peer_table(kmoe, load(args.peer))


if __name__ == "__main__":
    main()
