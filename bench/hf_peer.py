# SPDX-License-Identifier: BSD-3-Clause
"""PyTorch peers of kmoe_bench: HF transformers' MixtralSparseMoeBlock and DeepseekV3MoE
on the CPU, same shapes, float32 and thread count, writing the same JSON fields.

Runs with transformers 4.x (experts as a ModuleList of per-expert MLPs, looped over in the
block) and 5.x (experts as one fused module with 3-D gate_up_proj / down_proj, dispatched
through `config._experts_implementation`). On 5.x, "hf" is the implementation a model loaded
with from_pretrained gets by default, `grouped_mm` (torch.nn.functional.grouped_mm), and
"hf-eager" the fused module's own per-expert loop; on 4.x "hf" is the block as it is.

Also times a "torch-sorted" version (sort assignments by expert, one matmul per contiguous
segment, index_add back: kmoe's algorithm in eager PyTorch), and, on 4.x, torch._grouped_mm
where this torch build runs it on the CPU (the script reports whether it does).

    python bench/hf_peer.py --threads 2 --json docs/bench/hf-tf5.json
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
import transformers
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock


def mixtral(name, T, repeats, backward=True, H=1024, F_=3584, E=8):
    return dict(name=name, kind="mixtral", T=T, H=H, F=F_, E=E, k=2, shared_F=0,
                repeats=repeats, backward=backward)


# The same configurations as bench/kmoe_bench.cpp (all_configs).
CONFIGS = [
    mixtral("mixtral-prefill", 4096, 3),
    dict(name="deepseek-prefill", kind="deepseek", T=4096, H=1024, F=256, E=64, k=6,
         shared_F=512, repeats=3, backward=True),
    mixtral("decode", 8, 20),
] + [mixtral(f"sweep-T-{T}", T, 2 if T >= 16384 else 3, backward=False)
     for T in (64, 256, 1024, 4096, 16384)] + [
    mixtral(f"sweep-E-{E}", 4096, 3, backward=False, F_=512, E=E) for E in (8, 32, 64, 128, 256)]


def machine():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def timed(repeats, fn):
    """Median of `repeats` calls after one warm-up call, in milliseconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def build_hf(c):
    if c["kind"] == "mixtral":
        cfg = MixtralConfig(hidden_size=c["H"], intermediate_size=c["F"],
                            num_local_experts=c["E"], num_experts_per_tok=c["k"],
                            router_jitter_noise=0.0)
        return MixtralSparseMoeBlock(cfg)
    cfg = DeepseekV3Config(hidden_size=c["H"], moe_intermediate_size=c["F"],
                           n_routed_experts=c["E"], num_experts_per_tok=c["k"],
                           n_shared_experts=c["shared_F"] // c["F"], n_group=8, topk_group=3,
                           norm_topk_prob=True, routed_scaling_factor=2.5)
    return DeepseekV3MoE(cfg)


def fused_experts(block):
    """transformers 5.x: the experts are one module holding [E, 2F, H] gate_up_proj."""
    return hasattr(block.experts, "gate_up_proj")


def hf_implementations(block):
    """(implementation name, experts implementation) pairs to time for this block.

    A standalone 5.x block reads `config._experts_implementation`, which from_pretrained
    would set (to grouped_mm by default) and a bare config leaves unset, so it is set here.
    """
    if not fused_experts(block):
        return [("hf", None)]
    return [("hf", "grouped_mm"), ("hf-eager", "eager")]


def hf_call(block):
    def call(x):
        out = block(x)
        return out[0] if isinstance(out, tuple) else out
    return call


class SortedMixtral(torch.nn.Module):
    """Mixtral routing, then kmoe's layout: assignments sorted by expert, one matmul per
    contiguous segment (concatenated gate+up), index_add back with the routing weights.
    With `grouped`, the per-segment loop is one torch._grouped_mm per projection."""

    def __init__(self, block, grouped=False):
        super().__init__()
        self.gate = block.gate
        experts = block.experts
        if fused_experts(block):  # already [gate; up] per expert, as w13 below
            w13, w2 = experts.gate_up_proj, experts.down_proj
        else:
            w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in experts])
            w2 = torch.stack([e.w2.weight for e in experts])
        self.w13 = torch.nn.Parameter(w13.detach().clone())
        self.w2 = torch.nn.Parameter(w2.detach().clone())
        self.k = block.top_k
        self.grouped = grouped

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(F.linear(x, self.gate.weight), dim=-1)
        weight, expert = torch.topk(probs, self.k, dim=-1)
        weight = weight / weight.sum(-1, keepdim=True)
        flat = expert.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // self.k
        counts = torch.bincount(flat, minlength=self.w2.shape[0]).tolist()
        rows = x.index_select(0, token)
        if self.grouped:
            offs = torch.tensor(counts).cumsum(0).to(torch.int32)
            g, u = torch._grouped_mm(rows, self.w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
            y_rows = torch._grouped_mm(F.silu(g) * u, self.w2.transpose(1, 2), offs=offs)
            y_rows = y_rows * weight.reshape(-1)[order].unsqueeze(-1)
            return torch.zeros_like(x).index_add(0, token, y_rows).reshape(shape)
        outs, begin = [], 0
        for e, n in enumerate(counts):
            if n:
                gu = rows[begin:begin + n] @ self.w13[e].t()
                g, u = gu.chunk(2, dim=-1)
                outs.append((F.silu(g) * u) @ self.w2[e].t())
            begin += n
        y_rows = torch.cat(outs) * weight.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add(0, token, y_rows).reshape(shape)


def grouped_mm_status():
    """Whether torch._grouped_mm runs float32 on this CPU (it targets CUDA bf16)."""
    if not hasattr(torch, "_grouped_mm"):
        return "absent"
    try:
        a = torch.randn(8, 16)
        b = torch.randn(2, 16, 32)
        offs = torch.tensor([4, 8], dtype=torch.int32)
        torch._grouped_mm(a, b, offs=offs)
        return "available"
    except Exception as exc:  # reported, not fatal: the peer runs without it
        return f"unavailable on CPU float32: {type(exc).__name__}: {str(exc).splitlines()[0]}"


def measure(c, impl, module, threads):
    torch.manual_seed(0)
    x = torch.randn(1, c["T"], c["H"])
    call = hf_call(module) if impl.startswith("hf") else module
    with torch.no_grad():
        layer_ms = timed(c["repeats"], lambda: call(x))
    rec = dict(name=c["name"], implementation=impl, T=c["T"], H=c["H"], F=c["F"], E=c["E"],
               k=c["k"], shared_F=c["shared_F"], threads=threads,
               backend=f"torch {torch.__version__} cpu, transformers {transformers.__version__}",
               transformers=transformers.__version__,
               machine=machine(), repeats=c["repeats"], layer_ms=layer_ms,
               layer_fwdbwd_ms=None, backward_ms=None)
    if c["backward"]:
        xg = x.clone().requires_grad_(True)
        gy = torch.randn_like(x)

        def step():
            module.zero_grad(set_to_none=True)
            call(xg).backward(gy)
        rec["layer_fwdbwd_ms"] = timed(c["repeats"], step)
        rec["backward_ms"] = rec["layer_fwdbwd_ms"] - layer_ms
    return rec


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", help="name or prefix (sweep-T, sweep-E)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int)
    p.add_argument("--json")
    p.add_argument("--no-sorted", action="store_true", help="skip the torch-sorted variant")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    default = ("mixtral-prefill", "deepseek-prefill", "decode")
    wanted = args.config or default
    configs = [c for c in CONFIGS
               if any(c["name"] == w or c["name"].startswith(w + "-") for w in wanted)]
    status = grouped_mm_status()
    print(f"machine: {machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"torch._grouped_mm: {status}")
    records = []
    for c in configs:
        if args.repeats:
            c = dict(c, repeats=args.repeats)
        torch.manual_seed(0)
        block = build_hf(c)
        for prm in block.parameters():
            torch.nn.init.normal_(prm, std=0.02)  # DeepseekV3's router weight is torch.empty
        impls = [(impl, block, experts) for impl, experts in hf_implementations(block)]
        if c["kind"] == "mixtral" and not args.no_sorted:
            impls.append(("torch-sorted", SortedMixtral(block), None))
            # On 5.x the block's own grouped_mm path already times this kernel.
            if status == "available" and not fused_experts(block):
                impls.append(("torch-grouped_mm", SortedMixtral(block, grouped=True), None))
        for impl, module, experts in impls:
            if experts:
                block.experts.config._experts_implementation = experts
            rec = measure(c, impl, module, args.threads)
            rec["grouped_mm"] = status
            rec["experts_implementation"] = experts
            records.append(rec)
            fb = rec["layer_fwdbwd_ms"]
            print(f"{c['name']:18s} {impl:13s} fwd {rec['layer_ms']:9.2f} ms  fwd+bwd "
                  f"{'-' if fb is None else f'{fb:9.2f}'} ms", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
