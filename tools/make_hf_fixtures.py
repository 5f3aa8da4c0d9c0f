# SPDX-License-Identifier: BSD-3-Clause
"""Builds the Hugging Face reference fixtures under tests/fixtures/.

For each of Mixtral, DeepSeek-V3 and Qwen3-MoE this makes a tiny randomly initialised model
(fixed seeds), saves it with save_pretrained, runs the MoE block of decoder layer 1 forward
and backward in float32 on a fixed random input, and stores inputs, outputs, routing and
gradients as safetensors. tests/fixtures/README.md documents every file.

Usage (from the repository root, in a venv with torch, transformers 4.57.x, safetensors):
    python tools/make_hf_fixtures.py [--out tests/fixtures]

Deterministic: re-running with the same torch/transformers versions rewrites byte-identical
files.

How routing is captured (no private HF code is copied):
  * Mixtral / Qwen3-MoE: the block's forward returns router_logits; top-k indices and
    weights are recomputed from them with the exact expressions of the block's forward
    (softmax in float32, torch.topk, renormalise), and the script checks that an
    independent evaluation of the block from those weights reproduces its output.
  * DeepSeek-V3: the block's router (DeepseekV3TopkRouter) returns (topk_indices,
    topk_weights); a forward hook on it records them as the block computed them. The router
    does not return its logits, so they are recomputed as HF does
    (F.linear(x.float(), weight.float())) and checked against the recorded weights.
"""

import argparse
import json
import os
import shutil

import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

TOKENS = 13  # deliberately not a multiple of anything a kernel might tile by
LAYER = 1
# Fixtures are redrawn until every routing decision wins by at least this much (in score
# units), so that a correct float32 reimplementation cannot pick different experts.
MIN_MARGIN = 1e-3

COMMON = dict(
    vocab_size=32,
    hidden_size=64,
    num_hidden_layers=2,
    max_position_embeddings=64,
    # Larger than the default 0.02 so router logits are O(1) and routing is decisive.
    initializer_range=0.1,
    tie_word_embeddings=False,
)


def mixtral():
    config = MixtralConfig(
        **COMMON,
        intermediate_size=96,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        router_jitter_noise=0.0,
    )
    return "mixtral", config, MixtralForCausalLM, "block_sparse_moe"


def deepseek_v3():
    config = DeepseekV3Config(
        **COMMON,
        intermediate_size=64,  # dense MLP size; unused since every layer is MoE
        moe_intermediate_size=32,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=0,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    )
    return "deepseek_v3", config, DeepseekV3ForCausalLM, "mlp"


def qwen3_moe():
    config = Qwen3MoeConfig(
        **COMMON,
        intermediate_size=96,  # dense MLP size; unused since every layer is MoE
        moe_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    return "qwen3_moe", config, Qwen3MoeForCausalLM, "mlp"


def softmax_topk_routing(block, router_logits):
    """Top-k indices and weights exactly as MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock
    compute them from their router logits."""
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, block.top_k, dim=-1)
    if getattr(block, "norm_topk_prob", True):  # Mixtral always renormalises
        routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
    return selected_experts, routing_weights


def softmax_margin(router_logits, k):
    probs = F.softmax(router_logits, dim=1, dtype=torch.float).sort(dim=-1, descending=True)[0]
    return (probs[:, k - 1] - probs[:, k]).min().item()


def deepseek_margin(gate, router_logits):
    """Smallest winning gap of any of the router's decisions: which groups are kept, which
    experts are picked inside them; also requires kept experts' biased scores to be > 0,
    where HF's masked_fill(0.0) agrees with masking to -inf."""
    e, g = gate.n_routed_experts, gate.n_group
    choice = router_logits.sigmoid() + gate.e_score_correction_bias.unsqueeze(0)
    grouped = choice.view(-1, g, e // g)
    group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    ranked_groups = group_scores.sort(dim=-1, descending=True)[0]
    group_gap = (ranked_groups[:, gate.topk_group - 1] - ranked_groups[:, gate.topk_group]).min()
    kept = torch.zeros_like(group_scores, dtype=torch.bool)
    kept.scatter_(1, group_scores.topk(gate.topk_group, dim=-1)[1], True)
    candidates = grouped[kept].view(choice.shape[0], -1).sort(dim=-1, descending=True)[0]
    expert_gap = (candidates[:, gate.top_k - 1] - candidates[:, gate.top_k]).min()
    positive = candidates[:, gate.top_k - 1].min()
    return min(group_gap.item(), expert_gap.item(), positive.item())


def check_block_output(block, x, indices, weights, expected):
    """Evaluates the block from the recorded routing, independently of its own dispatch."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            out[t] += weights[t, j] * block.experts[int(indices[t, j])](x[t : t + 1])[0]
    if hasattr(block, "shared_experts"):
        out = out + block.shared_experts(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def sort_by_weight(indices, weights):
    """Orders each token's experts by decreasing weight (ties: increasing index) so that
    fixtures do not depend on torch.topk's unspecified order for sorted=False."""
    indices, order = indices.sort(dim=-1)
    weights, order = weights.gather(1, order).sort(dim=-1, descending=True, stable=True)
    return indices.gather(1, order), weights


def build(spec, out_root, seed):
    name, config, model_class, mlp_attr = spec
    torch.manual_seed(seed)
    model = model_class(config).eval()
    block = getattr(model.model.layers[LAYER], mlp_attr)
    prefix = f"model.layers.{LAYER}.{mlp_attr}."
    is_deepseek = hasattr(block, "shared_experts")

    if is_deepseek:
        # Nonzero correction biases of the size of the score spread, so they change routing.
        generator = torch.Generator().manual_seed(seed + 1)
        for layer in model.model.layers:
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_((torch.rand(bias.shape, generator=generator) - 0.5) * 0.2)

    # Checkpoints ship in bfloat16 like the real models (and to keep fixtures small); the
    # correction bias stays float32 as in the released DeepSeek-V3 weights. The float32
    # computation below uses exactly the stored (bf16-rounded) values.
    model = model.to(torch.bfloat16)
    if is_deepseek:
        for layer in model.model.layers:
            layer.mlp.gate.e_score_correction_bias.data = (
                layer.mlp.gate.e_score_correction_bias.data.float()
            )
    model_dir = os.path.join(out_root, name, "model")
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    for extra in os.listdir(model_dir):
        if extra not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(model_dir, extra))
    model = model.float()
    block = getattr(model.model.layers[LAYER], mlp_attr)
    hidden = config.hidden_size

    generator = torch.Generator().manual_seed(seed + 2)
    for attempt in range(100):
        x = torch.randn(TOKENS, hidden, generator=generator)
        with torch.no_grad():
            if is_deepseek:
                logits = F.linear(x.float(), block.gate.weight.float())
                margin = deepseek_margin(block.gate, logits)
            else:
                logits = block.gate(x)
                margin = softmax_margin(logits, block.top_k)
        if margin > MIN_MARGIN:
            break
    else:
        raise RuntimeError(f"{name}: no input with routing margin > {MIN_MARGIN}")
    grad_output = torch.randn(TOKENS, hidden, generator=generator)

    x = x.clone().requires_grad_(True)
    recorded = {}
    if is_deepseek:
        handle = block.gate.register_forward_hook(
            lambda module, args, result: recorded.update(routing=result)
        )
        y = block(x.unsqueeze(0))
        handle.remove()
        indices, weights = recorded["routing"]
        router_logits = F.linear(x.detach().float(), block.gate.weight.detach().float())
        scores = router_logits.sigmoid()
        expected = scores.gather(1, indices)
        expected = expected / (expected.sum(dim=-1, keepdim=True) + 1e-20) * config.routed_scaling_factor
        torch.testing.assert_close(weights, expected, rtol=0, atol=0)
        unbiased = torch.topk(scores, config.num_experts_per_tok, dim=-1)[1]
        if torch.equal(unbiased.sort(dim=-1)[0], indices.sort(dim=-1)[0]):
            raise RuntimeError("deepseek_v3: correction bias does not change any routing")
    else:
        y, router_logits = block(x.unsqueeze(0))
        indices, weights = softmax_topk_routing(block, router_logits)
    y = y.reshape(TOKENS, hidden)
    y.backward(grad_output)

    with torch.no_grad():
        check_block_output(block, x.detach(), indices, weights.detach(), y.detach())
    indices, weights = sort_by_weight(indices, weights.detach())

    # One key only: safetensors writes a multi-key metadata map in hash order, which would
    # make re-runs differ byte-wise.
    metadata = {
        "source": f"model={name} block={prefix.rstrip('.')} torch={torch.__version__} "
        f"transformers={transformers.__version__}"
    }
    directory = os.path.join(out_root, name)

    def save(filename, tensors):
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        safetensors.torch.save_file(tensors, os.path.join(directory, filename), metadata)

    save("input.safetensors", {"hidden_states": x})
    save(
        "output.safetensors",
        {
            "hidden_states": y,
            "router_logits": router_logits,
            "topk_indices": indices.to(torch.int64),
            "topk_weights": weights,
        },
    )
    save("grad_output.safetensors", {"hidden_states": grad_output})
    grads = {"hidden_states": x.grad}
    for param_name, param in block.named_parameters():
        # Experts no token was routed to get no gradient from autograd; store the zeros.
        grads[prefix + param_name] = (
            param.grad if param.grad is not None else torch.zeros_like(param)
        )
    save("grads.safetensors", grads)
    return {
        "routing_margin": margin,
        "input_draws": attempt + 1,
        "experts_hit": sorted(set(indices.flatten().tolist())),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join("tests", "fixtures"))
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for seed, spec in ((1000, mixtral()), (2000, deepseek_v3()), (3000, qwen3_moe())):
        summary = build(spec, args.out, seed)
        print(spec[0], json.dumps(summary))


if __name__ == "__main__":
    main()
