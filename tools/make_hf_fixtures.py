# SPDX-License-Identifier: BSD-3-Clause
"""Builds the Hugging Face reference fixtures under tests/fixtures/.

For each of Mixtral, DeepSeek-V3 and Qwen3-MoE this makes a tiny randomly initialised model
(fixed seeds), saves it with save_pretrained, runs the MoE block of decoder layer 1 forward
and backward in float32 on a fixed random input, and stores inputs, outputs, routing and
gradients as safetensors. tests/fixtures/README.md documents every file.

Usage (from the repository root, in a venv with torch, transformers 4.57.x, safetensors):
    python tools/make_hf_fixtures.py [--out tests/fixtures]

Under transformers >= 5 (made with 5.24.0) the same script instead writes
tests/fixtures/hf5/<name>/ for Mixtral, DeepSeek-V3, Qwen3-MoE, OLMoE, FlexOlmo, MiniMax,
GLM-4-MoE, dots1, DeepSeek-V2 (group-limited and greedy), Jamba, GraniteMoe,
GraniteMoeShared, Qwen3-VL-MoE (its text decoder's block), Qwen2-MoE and Qwen3-Next (their
shared expert scaled per token by a sigmoid gate), DBRX (2-D expert tensors that
transformers does not convert: model/ only, see build5_dbrx), Hunyuan-MoE (router
gate.wg, per-layer top-k, a shared MLP inside the block), Phi-MoE (sparsemixer, run in
eval mode: its inference path and that path's gradient), ERNIE-4.5-MoE (selection by
softmax probability plus a bias, clamped renormalisation, a dense layer before the MoE
one) and GPT-OSS (router and expert biases, interleaved gate/up, clamped SwiGLU; model/
only, see build5_gpt_oss): each checkpoint twice
(model/: transformers' default per-expert "original" layout; model_fused/:
save_original_format=False, fused 3-D expert tensors; Qwen3-VL-MoE's model/ is the
released fused-and-transposed layout, which save_pretrained does not write, see build5) and
the gradients under both sets of names (see build5 and tests/fixtures/README.md):
    python tools/make_hf_fixtures.py [--out tests/fixtures/hf5] [--only NAME ...]

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
import collections
import json
import os
import shutil
import tempfile

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

# DeepSeek-V3's and DeepSeek-V2's multi-head latent attention, kept small.
SMALL_MLA_ATTENTION = dict(
    num_attention_heads=2,
    num_key_value_heads=2,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
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
        **SMALL_MLA_ATTENTION,
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


# The routers' decisions, written independently of HF. build (4.x) uses them for the margins
# of its input draws; build5 (5.x) also for the selections it checks the block's against.
# Settings are passed in where the 4.x and 5.x routers name them differently.


def softmax_router_choice(router_logits, k):
    """Top-k experts of softmax(logits) (index rows sorted ascending) and the smallest gap
    between any token's k-th and (k+1)-th probability."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
    ranked, order = probs.sort(dim=-1, descending=True)
    return order[:, :k].sort(dim=-1)[0], (ranked[:, k - 1] - ranked[:, k]).min().item()


def group_limited_choice(grouped, group_scores, topk_group, top_k):
    """The top_k experts of the topk_group best groups: the step that the grouped sigmoid
    router and DeepSeek-V2's group_limited_greedy share (they score experts and groups
    differently). grouped: [tokens, groups, experts per group] expert scores; group_scores:
    [tokens, groups]. Returns the selection (index rows sorted ascending), all experts'
    scores sorted descending with those of dropped groups at -inf, and the smallest winning
    gaps of the group decisions and of the expert decisions."""
    tokens, num_group = group_scores.shape
    if topk_group < num_group:
        ranked_groups = group_scores.sort(dim=-1, descending=True)[0]
        group_gap = (ranked_groups[:, topk_group - 1] - ranked_groups[:, topk_group]).min().item()
    else:  # every group is kept: there is no group decision to win
        group_gap = float("inf")
    kept = torch.zeros_like(group_scores, dtype=torch.bool)
    kept.scatter_(1, group_scores.topk(topk_group, dim=-1)[1], True)
    masked = torch.where(kept.unsqueeze(-1), grouped, float("-inf")).view(tokens, -1)
    ranked, order = masked.sort(dim=-1, descending=True)
    expert_gap = (ranked[:, top_k - 1] - ranked[:, top_k]).min().item()
    return order[:, :top_k].sort(dim=-1)[0], ranked, group_gap, expert_gap


def sigmoid_router_choice(router_logits, bias, num_group, topk_group, top_k):
    """Selected experts (index rows sorted ascending) and the smallest winning gap of the
    grouped sigmoid router (DeepSeek-V3 / GLM-4-MoE / dots1): choice = sigmoid(logits) +
    bias; group score = sum of the group's top-2 choices; keep the topk_group best groups;
    the top_k experts of the kept groups by choice."""
    choice = router_logits.sigmoid() + bias.unsqueeze(0)
    grouped = choice.view(-1, num_group, choice.shape[-1] // num_group)
    group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    chosen, ranked, group_gap, expert_gap = group_limited_choice(
        grouped, group_scores, topk_group, top_k
    )
    # Kept experts' choices also > 0, where the 4.x router's masked_fill(0.0) of dropped
    # groups agrees with the -inf masking above and in 5.x, so a fixture is equally valid
    # for both.
    positive = ranked[:, top_k - 1].min().item()
    return chosen, min(group_gap, expert_gap, positive)


def check_combine(x, indices, weights, expert, expected, shared=()):
    """Evaluates an MoE block from its recorded routing, one token and one expert at a time
    and independently of the block's own dispatch, and compares with its output `expected`:
    out[t] = sum_j weights[t, j] * expert(indices[t, j], x[t]), plus each output in `shared`
    (shared experts / MLPs applied to all of x). Shared by check_block_output (4.x: one module
    per expert) and check_block_output_fused (5.x: fused expert tensors), which differ only
    in how they evaluate one expert."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            out[t] += weights[t, j] * expert(int(indices[t, j]), x[t])
    for extra in shared:
        out = out + extra
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def check_block_output(block, x, indices, weights, expected):
    """check_combine for a 4.x block: experts[e] and shared_experts are MLP modules."""
    shared = [block.shared_experts(x)] if hasattr(block, "shared_experts") else []
    check_combine(
        x, indices, weights, lambda e, row: block.experts[e](row.unsqueeze(0))[0], expected, shared
    )


def sort_by_weight(indices, weights):
    """Orders each token's experts by decreasing weight (ties: increasing index) so that
    fixtures do not depend on torch.topk's unspecified order for sorted=False."""
    indices, order = indices.sort(dim=-1)
    weights, order = weights.gather(1, order).sort(dim=-1, descending=True, stable=True)
    return indices.gather(1, order), weights


def require_effect(name, what, scores, top_k, chosen):
    """Raises unless the top_k of `scores` (the routing without `what`) differ from `chosen`
    (index rows sorted ascending) for some token, i.e. unless the fixture exercises `what`."""
    without = torch.topk(scores, top_k, dim=-1)[1]
    if torch.equal(without.sort(dim=-1)[0], chosen):
        raise RuntimeError(f"{name}: {what} does not change any routing")


# The steps below are the same in build (4.x) and build5 (5.x), so that both write their
# checkpoints and fixture files the same way.


def bf16_checkpoint(model, bias_gates, seed):
    """Gives the routers in bias_gates (the modules holding e_score_correction_bias: the
    sigmoid routers, ERNIE-4.5's moe_statics) nonzero correction biases of the size of the
    score spread, so they change routing, then converts the model to bfloat16 like the
    released checkpoints (and to keep fixtures small), except those biases: they stay
    float32 as in the released DeepSeek-V3 weights. The float32 computation after saving uses
    exactly the stored (bf16-rounded) values. Returns the converted model."""
    generator = torch.Generator().manual_seed(seed + 1)
    for gate in bias_gates:
        bias = gate.e_score_correction_bias
        bias.copy_((torch.rand(bias.shape, generator=generator) - 0.5) * 0.2)
    model = model.to(torch.bfloat16)
    for gate in bias_gates:
        gate.e_score_correction_bias.data = gate.e_score_correction_bias.data.float()
    return model


def save_checkpoint(model, directory, **kwargs):
    """save_pretrained into a fresh directory, keeping only config.json and the model*
    files (the weights, and the shard index of a sharded checkpoint)."""
    shutil.rmtree(directory, ignore_errors=True)
    model.save_pretrained(directory, **kwargs)
    for extra in os.listdir(directory):
        if not (extra == "config.json" or extra.startswith("model")):
            os.remove(os.path.join(directory, extra))


def run_recording_router(block, gate, x):
    """Runs the block on the tokens x (as a batch of one) and returns its output and what its
    router returned, recorded by a forward hook: the routing exactly as the block used it."""
    recorded = {}
    handle = gate.register_forward_hook(lambda module, args, result: recorded.update(r=result))
    y = block(x.unsqueeze(0))
    handle.remove()
    return y, recorded["r"]


def param_grads(named_params):
    """{name: gradient} of (name, parameter) pairs. Experts no token was routed to get no
    gradient from autograd; they get zeros."""
    return {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in named_params}


def fixture_writer(directory, name, blocks):
    """Returns save(filename, tensors), which writes the tensors (detached, contiguous) to
    directory/filename with one metadata key, "source": the model, its blocks' prefixes
    (blocks: (label, prefix) pairs) and the torch and transformers versions. One key only:
    safetensors writes a multi-key metadata map in hash order, which would make re-runs
    differ byte-wise."""
    fields = [f"model={name}"] + [f"{label}={prefix.rstrip('.')}" for label, prefix in blocks]
    fields += [f"torch={torch.__version__}", f"transformers={transformers.__version__}"]
    metadata = {"source": " ".join(fields)}

    def save(filename, tensors):
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        safetensors.torch.save_file(tensors, os.path.join(directory, filename), metadata)

    return save


def save_forward(save, x, y, grad_output, router_logits, indices, weights):
    """Writes input / output / grad_output.safetensors (tests/fixtures/README.md) with a
    save from fixture_writer."""
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


def build(spec, out_root, seed):
    name, config, model_class, mlp_attr = spec
    torch.manual_seed(seed)
    model = model_class(config).eval()
    block = getattr(model.model.layers[LAYER], mlp_attr)
    prefix = f"model.layers.{LAYER}.{mlp_attr}."
    is_deepseek = hasattr(block, "shared_experts")

    # Every DeepSeek-V3 layer is MoE (first_k_dense_replace=0).
    bias_gates = [layer.mlp.gate for layer in model.model.layers] if is_deepseek else []
    model = bf16_checkpoint(model, bias_gates, seed)
    directory = os.path.join(out_root, name)
    save_checkpoint(model, os.path.join(directory, "model"), safe_serialization=True)
    model = model.float()
    block = getattr(model.model.layers[LAYER], mlp_attr)
    hidden = config.hidden_size

    generator = torch.Generator().manual_seed(seed + 2)
    for attempt in range(100):
        x = torch.randn(TOKENS, hidden, generator=generator)
        with torch.no_grad():
            if is_deepseek:
                gate = block.gate
                logits = F.linear(x.float(), gate.weight.float())
                bias = gate.e_score_correction_bias
                margin = sigmoid_router_choice(
                    logits, bias, gate.n_group, gate.topk_group, gate.top_k
                )[1]
            else:
                logits = block.gate(x)
                margin = softmax_router_choice(logits, block.top_k)[1]
        if margin > MIN_MARGIN:
            break
    else:
        raise RuntimeError(f"{name}: no input with routing margin > {MIN_MARGIN}")
    grad_output = torch.randn(TOKENS, hidden, generator=generator)

    x = x.clone().requires_grad_(True)
    if is_deepseek:
        y, (indices, weights) = run_recording_router(block, block.gate, x)
        router_logits = F.linear(x.detach().float(), block.gate.weight.detach().float())
        torch.testing.assert_close(
            weights, expected_weights("sigmoid", block.gate, router_logits, indices), rtol=0, atol=0
        )
        require_effect(
            name, "correction bias", router_logits.sigmoid(), block.gate.top_k,
            indices.sort(dim=-1)[0],
        )
    else:
        y, router_logits = block(x.unsqueeze(0))
        indices, weights = softmax_topk_routing(block, router_logits)
    y = y.reshape(TOKENS, hidden)
    y.backward(grad_output)

    with torch.no_grad():
        check_block_output(block, x.detach(), indices, weights.detach(), y.detach())
    indices, weights = sort_by_weight(indices, weights.detach())

    save = fixture_writer(directory, name, [("block", prefix)])
    save_forward(save, x, y, grad_output, router_logits, indices, weights)
    grads = {"hidden_states": x.grad}
    grads.update(param_grads((prefix + n, p) for n, p in block.named_parameters()))
    save("grads.safetensors", grads)
    return {
        "routing_margin": margin,
        "input_draws": attempt + 1,
        "experts_hit": sorted(set(indices.flatten().tolist())),
    }


# ---------------------------------------------------------------------------------------------
# transformers >= 5: fused experts, more families, written to tests/fixtures/hf5/<name>/.
# ---------------------------------------------------------------------------------------------
#
# In 5.x every family's experts are one module holding 3-D tensors gate_up_proj [E, 2F, H]
# (the F gate rows first, then the F up rows) and down_proj [E, H, F]; save_pretrained
# converts them back to the per-expert checkpoint layout unless save_original_format=False.
# Every 5.x router returns (router_logits, topk_weights, topk_indices); a forward hook on it
# records the routing exactly as the block used it.

# Attention of the new families kept small (4 heads of 16, 1 KV head) to save space.
SMALL_ATTENTION = dict(num_attention_heads=4, num_key_value_heads=1)


Spec5 = collections.namedtuple(
    "Spec5",
    "name seed config model_class layer orig_attr kind shard block_attr router_attr shared_attr "
    "layout layers",
    # block_attr: the block's attribute on the decoder layer in the model (and in model_fused/);
    # router_attr: the router's on the block; shared_attr: a shared MLP on the decoder layer
    # whose output the layer adds to the block's (GraniteMoeShared), or None; layout:
    # "per_expert" (experts.{e}.* in model/), "granite" (3-D input_linear / output_linear) or
    # "transposed" (Qwen3-VL-MoE's released fused tensors, see build5); layers: the decoder
    # layers' module path (and name prefix) in the model.
    defaults=("mlp", "gate", None, "per_expert", "model.layers"),
)


def specs5():
    """Spec5 of each family: name, seed, config, model class, decoder layer, attribute of the
    block in the original checkpoint layout, router kind, max_shard_size or None, ..."""
    t = transformers
    yield "mixtral", 1000, mixtral()[1], MixtralForCausalLM, 1, "block_sparse_moe", "softmax", None
    yield "deepseek_v3", 2000, deepseek_v3()[1], DeepseekV3ForCausalLM, 1, "mlp", "sigmoid", None
    yield "qwen3_moe", 3000, qwen3_moe()[1], Qwen3MoeForCausalLM, 1, "mlp", "softmax", None
    olmoe = t.OlmoeConfig(
        **COMMON,
        **SMALL_ATTENTION,
        intermediate_size=8,  # 64 experts: F 8 keeps the fixture small
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=False,
    )
    yield "olmoe", 4000, olmoe, t.OlmoeForCausalLM, 1, "mlp", "softmax", None
    flex_olmo = t.FlexOlmoConfig(
        **COMMON,
        **SMALL_ATTENTION,
        intermediate_size=16,
        num_experts=7,
        num_experts_per_tok=5,
        norm_topk_prob=False,
        pad_token_id=1,  # the defaults lie outside the 32-token vocabulary
        eos_token_id=2,
    )
    yield "flex_olmo", 5000, flex_olmo, t.FlexOlmoForCausalLM, 1, "mlp", "softmax", None
    minimax = t.MiniMaxConfig(
        **COMMON,
        **SMALL_ATTENTION,
        head_dim=16,
        intermediate_size=16,
        num_local_experts=16,
        num_experts_per_tok=2,
        router_jitter_noise=0.0,
        block_size=16,  # lightning attention's saved decay buffer is [1, heads, block, block]
    )
    # Saved in several shards plus model.safetensors.index.json.
    yield "minimax", 6000, minimax, t.MiniMaxForCausalLM, 1, "block_sparse_moe", "softmax", "40KB"
    glm4_moe = t.Glm4MoeConfig(
        **dict(COMMON, num_hidden_layers=3),
        **SMALL_ATTENTION,
        intermediate_size=48,  # the dense MLP of layer 0
        moe_intermediate_size=16,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=1,
        topk_group=1,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=1,
    )
    yield "glm4_moe", 7000, glm4_moe, t.Glm4MoeForCausalLM, 1, "mlp", "sigmoid", None
    dots1 = t.Dots1Config(
        **COMMON,
        **SMALL_ATTENTION,
        intermediate_size=48,  # dense MLP size; unused since every layer is MoE
        moe_intermediate_size=16,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=2,
        routed_scaling_factor=2.0,
        norm_topk_prob=False,
        first_k_dense_replace=0,
    )
    yield "dots1", 8000, dots1, t.Dots1ForCausalLM, 1, "mlp", "sigmoid", None
    deepseek_v2 = t.DeepseekV2Config(
        **dict(COMMON, num_hidden_layers=3),
        **SMALL_MLA_ATTENTION,
        intermediate_size=48,  # the dense MLP of layer 0
        moe_intermediate_size=16,
        n_routed_experts=16,
        num_experts_per_tok=4,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.0,
        norm_topk_prob=False,  # 5.24's DeepseekV2TopkRouter never renormalises anyway
        first_k_dense_replace=1,
    )
    yield Spec5("deepseek_v2", 9000, deepseek_v2, t.DeepseekV2ForCausalLM, 1, "mlp", "v2", None)
    deepseek_v2_greedy = t.DeepseekV2Config(
        **COMMON,
        **SMALL_MLA_ATTENTION,
        intermediate_size=48,  # dense MLP size; unused since every layer is MoE
        moe_intermediate_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        topk_method="greedy",
        n_shared_experts=2,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        first_k_dense_replace=0,
    )
    yield Spec5(
        "deepseek_v2_greedy", 10000, deepseek_v2_greedy, t.DeepseekV2ForCausalLM, 1, "mlp", "v2",
        None,
    )
    jamba = t.JambaConfig(
        **COMMON,
        **SMALL_ATTENTION,
        intermediate_size=16,  # the experts' F and the dense MLP of layer 0
        num_experts=8,
        num_experts_per_tok=2,
        # Layer 0: attention + dense MLP; layer 1: Mamba + MoE.
        attn_layer_period=2,
        attn_layer_offset=0,
        expert_layer_period=2,
        expert_layer_offset=1,
        use_mamba_kernels=False,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=1,
    )
    yield Spec5(
        "jamba", 11000, jamba, t.JambaForCausalLM, 1, "feed_forward", "softmax_raw", None,
        block_attr="feed_forward", router_attr="router",
    )
    granitemoe = t.GraniteMoeConfig(
        **COMMON,
        **SMALL_ATTENTION,
        intermediate_size=16,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    yield Spec5(
        "granitemoe", 12000, granitemoe, t.GraniteMoeForCausalLM, 1, "block_sparse_moe",
        "logit_topk", None, block_attr="block_sparse_moe", router_attr="router",
        layout="granite",
    )
    granitemoeshared = t.GraniteMoeSharedConfig(
        **COMMON,
        **SMALL_ATTENTION,
        intermediate_size=16,
        shared_intermediate_size=32,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    yield Spec5(
        "granitemoeshared", 13000, granitemoeshared, t.GraniteMoeSharedForCausalLM, 1,
        "block_sparse_moe", "logit_topk", None, block_attr="block_sparse_moe",
        router_attr="router", shared_attr="shared_mlp", layout="granite",
    )
    # Qwen3-VL-MoE: the text decoder's blocks (the only ones run); config nested in
    # text_config / vision_config; released checkpoints hold the experts fused and transposed.
    qwen3_vl_moe_text = dict(
        **COMMON,
        **SMALL_ATTENTION,
        head_dim=16,
        intermediate_size=48,  # dense MLP size; unused since every layer is MoE
        moe_intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        # Multimodal RoPE as released (the sections sum to head_dim / 2); outside the block.
        rope_parameters=dict(
            rope_type="default",
            rope_theta=5000000.0,
            mrope_section=[2, 3, 3],
            mrope_interleaved=True,
        ),
    )
    # The smallest vision tower (never run): one block of width 8, one head, 2x2 patches.
    qwen3_vl_moe_vision = dict(
        depth=1,
        hidden_size=8,
        intermediate_size=16,
        num_heads=1,
        patch_size=2,
        temporal_patch_size=2,
        spatial_merge_size=2,
        out_hidden_size=COMMON["hidden_size"],
        num_position_embeddings=4,
        deepstack_visual_indexes=[],
        initializer_range=COMMON["initializer_range"],
    )
    qwen3_vl_moe = t.Qwen3VLMoeConfig(
        text_config=qwen3_vl_moe_text,
        vision_config=qwen3_vl_moe_vision,
        tie_word_embeddings=False,
        # Special tokens inside the 32-token vocabulary (the defaults lie outside).
        vision_start_token_id=28,
        vision_end_token_id=29,
        image_token_id=30,
        video_token_id=31,
    )
    yield Spec5(
        "qwen3_vl_moe", 14000, qwen3_vl_moe, t.Qwen3VLMoeForConditionalGeneration, 1, "mlp",
        "softmax", None, layout="transposed", layers="model.language_model.layers",
    )
    # Qwen2-MoE and Qwen3-Next: Qwen3-MoE's router plus a shared expert whose output is scaled
    # per token by sigmoid(shared_expert_gate(x)); renormalisation off / on as released.
    qwen2_moe = t.Qwen2MoeConfig(
        **COMMON,
        **SMALL_ATTENTION,
        intermediate_size=48,  # dense MLP size; unused since every layer is MoE
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    yield "qwen2_moe", 15000, qwen2_moe, t.Qwen2MoeForCausalLM, 1, "mlp", "softmax", None
    qwen3_next = t.Qwen3NextConfig(
        **COMMON,
        **SMALL_ATTENTION,
        head_dim=16,
        intermediate_size=48,  # dense MLP size; unused since every layer is MoE
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        # Layer 0 gated DeltaNet (its torch fallback runs on CPU), layer 1 gated attention;
        # outside the block.
        layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
    )
    yield "qwen3_next", 16000, qwen3_next, t.Qwen3NextForCausalLM, 1, "mlp", "softmax", None
    # DBRX: its own config names (d_model, n_layers, n_heads; the MoE settings nested in
    # ffn_config) and its own experts, three 2-D [E * F, H] tensors with no 5.x conversion, so
    # model/ and model_fused/ would be byte-identical (build5_dbrx writes model/ only).
    dbrx = t.DbrxConfig(
        d_model=COMMON["hidden_size"],
        n_layers=COMMON["num_hidden_layers"],
        n_heads=4,
        max_seq_len=COMMON["max_position_embeddings"],
        vocab_size=COMMON["vocab_size"],
        initializer_range=COMMON["initializer_range"],
        tie_word_embeddings=False,
        # 5.24's DbrxAttention reads attn_config.rope_theta (the released configs have it),
        # which DbrxAttentionConfig no longer declares; the rotary embedding itself uses
        # rope_parameters, set to the same theta.
        attn_config=dict(kv_n_heads=1, rope_theta=500000.0),
        rope_parameters=dict(rope_type="default", rope_theta=500000.0),
        ffn_config=dict(
            moe_num_experts=8,
            moe_top_k=2,
            ffn_hidden_size=16,
            ffn_act_fn={"name": "silu"},
            moe_normalize_expert_weights=1.0,
            moe_jitter_eps=None,
        ),
    )
    yield Spec5(
        "dbrx", 17000, dbrx, t.DbrxForCausalLM, 1, "ffn", "dbrx", None, block_attr="ffn",
        router_attr="router", layout="dbrx", layers="transformer.blocks",
    )
    # Hunyuan-MoE (HunYuanMoEV1Moe): softmax top-k, always renormalised, router gate.wg (built
    # in float32); top-k per layer (moe_topk a list: layer 1 picks 3); a shared MLP of width
    # intermediate_size (= the experts' F) inside the block, added with weight 1.
    hunyuan_v1_moe = t.HunYuanMoEV1Config(
        **COMMON,
        **SMALL_ATTENTION,
        head_dim=16,  # None (the default) breaks HunYuanMoEV1Attention
        intermediate_size=16,
        num_experts=8,  # an int: the config and HunYuanMoEV1Experts reject a list
        moe_topk=[2, 3],
    )
    yield (
        "hunyuan_v1_moe", 18000, hunyuan_v1_moe, t.HunYuanMoEV1ForCausalLM, 1, "mlp", "softmax",
        None,
    )
    # Phi-MoE (PhimoeSparseMoeBlock, `mlp` in the model, `block_sparse_moe` with router
    # `gate.weight` in the original layout): sparsemixer, two slots each weighted by a softmax
    # over the experts within a relative distance 2 router_jitter_noise of the slot's winner.
    # The released 0.01 keeps almost only the winner for logits of this size; 0.2 keeps some
    # runners-up and masks others (build5 checks both happen in each slot).
    phimoe = t.PhimoeConfig(
        **COMMON,
        **SMALL_ATTENTION,
        intermediate_size=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_jitter_noise=0.2,
        input_jitter_noise=0.0,
    )
    yield Spec5(
        "phimoe", 19000, phimoe, t.PhimoeForCausalLM, 1, "block_sparse_moe", "sparsemixer", None,
        router_attr="router",
    )
    # Llama 4 (Llama4TextMoe under feed_forward): top-k of the logits, each chosen expert run
    # on sigmoid(logit) * x and added with weight 1, a shared expert of the experts' width;
    # experts fused and transposed with no 5.x conversion (build5_llama4 writes model/ only).
    # k = 2 (the released models route to 1) so that a token's slots are summed; layer 0 is
    # dense (interleave step 2, as in the 128-expert model).
    llama4_text_fields = dict(
        **COMMON,
        **SMALL_ATTENTION,
        head_dim=16,
        intermediate_size=16,
        intermediate_size_mlp=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        interleave_moe_layer_step=2,
        pad_token_id=1,  # the defaults lie outside the 32-token vocabulary
        bos_token_id=0,
        eos_token_id=2,
    )
    llama4_text = t.Llama4TextConfig(**llama4_text_fields)
    yield Spec5(
        "llama4_text", 20000, llama4_text, t.Llama4ForCausalLM, 1, "feed_forward", "llama4",
        None, block_attr="feed_forward", router_attr="router", layout="llama4",
    )
    # Llama 4 multimodal (Llama4ForConditionalGeneration): the same text model under
    # text_config and language_model.model.layers, with the smallest vision tower (never run).
    llama4_vision = dict(
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=16,
        vision_output_dim=8,
        image_size=8,
        patch_size=2,
        projector_input_dim=8,
        projector_output_dim=COMMON["hidden_size"],
        initializer_range=COMMON["initializer_range"],
    )
    llama4 = t.Llama4Config(
        # The fields, not llama4_text (building a model writes into its config).
        text_config=dict(llama4_text_fields),
        vision_config=llama4_vision,
        tie_word_embeddings=False,
        # Special tokens inside the 32-token vocabulary (the defaults lie outside).
        boi_token_index=28,
        eoi_token_index=29,
        image_token_index=30,
    )
    yield Spec5(
        "llama4", 21000, llama4, t.Llama4ForConditionalGeneration, 1, "feed_forward", "llama4",
        None, block_attr="feed_forward", router_attr="router", layout="llama4",
        layers="language_model.model.layers",
    )
    # ERNIE-4.5-MoE (Ernie4_5_MoeSparseMoeBlock): top-k of softmax(logits) + the correction
    # bias gate.moe_statics.e_score_correction_bias [1, E] (mlp.moe_statics.* in model/),
    # weights p / clamp(sum, moe_norm_min); 2 shared experts as one MLP of width 2 F; layer 0
    # dense (moe_layer_start_index 1, its MLP intermediate_size wide).
    ernie4_5_moe = t.Ernie4_5_MoeConfig(
        **COMMON,
        **SMALL_ATTENTION,
        intermediate_size=48,  # the dense MLP of layer 0
        moe_intermediate_size=16,
        moe_num_experts=8,
        moe_k=2,
        moe_num_shared_experts=2,
        moe_layer_start_index=1,
        moe_layer_end_index=-1,
        moe_layer_interval=1,
        moe_norm_min=1e-12,
        pad_token_id=0,  # the defaults lie inside the 32-token vocabulary, kept explicit
        bos_token_id=1,
        eos_token_id=2,
    )
    yield "ernie4_5_moe", 19000, ernie4_5_moe, t.Ernie4_5_MoeForCausalLM, 1, "mlp", "ernie", None
    # GPT-OSS (GptOssMLP): router with a bias, top-k logits then a softmax over them; experts
    # with biases, gate/up interleaved in gate_up_proj [E, H, 2F], and the clamped SwiGLU.
    # transformers has no conversion for these tensors: model/ only (build5_gpt_oss).
    # swiglu_limit 1.0 (released: 7.0) so that every clamp is active for some elements at
    # this scale; the attention settings (sliding window, layer types, rope) lie outside
    # the block and are only kept small and valid.
    gpt_oss = t.GptOssConfig(
        **COMMON,
        **SMALL_ATTENTION,
        head_dim=16,
        intermediate_size=16,
        num_local_experts=8,
        num_experts_per_tok=3,
        swiglu_alpha=1.702,
        swiglu_limit=1.0,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters=dict(rope_type="default", rope_theta=150000.0),
    )
    yield Spec5(
        "gpt_oss", 19000, gpt_oss, t.GptOssForCausalLM, 1, "mlp", "gpt_oss", None,
        router_attr="router", layout="gpt_oss",
    )


def deepseek_v2_router_choice(gate, router_logits):
    """Selected experts and smallest winning gap of DeepSeek-V2's router, written
    independently of HF: p = softmax(logits); "greedy": the top_k of p; "group_limited_greedy":
    group score = max p of the group, keep the topk_group best groups, the top_k of the kept
    experts' p (dropped groups masked with -inf here, 0.0 in HF: the same, as p > 0 and
    top_k <= the kept experts)."""
    if gate.topk_method == "greedy":
        return softmax_router_choice(router_logits, gate.top_k)
    assert gate.topk_method == "group_limited_greedy", gate.topk_method
    e, g = gate.num_experts, gate.num_group
    assert gate.top_k <= gate.topk_group * (e // g)
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
    grouped = probs.view(-1, g, e // g)
    chosen, _, group_gap, expert_gap = group_limited_choice(
        grouped, grouped.max(dim=-1).values, gate.topk_group, gate.top_k
    )
    return chosen, min(group_gap, expert_gap)


def logit_topk_router_choice(router_logits, k):
    """GraniteMoe: top-k of the raw logits (the softmax comes after, over the k chosen)."""
    ranked, order = router_logits.sort(dim=-1, descending=True)
    return order[:, :k].sort(dim=-1)[0], (ranked[:, k - 1] - ranked[:, k]).min().item()


def sparsemixer_choice(router_logits, eps):
    """Phi-MoE's sparsemixer on its inference path, written independently of HF: slot 1 is the
    largest logit's expert i1, slot 2 the largest of the others' i2; a slot won with logit m
    keeps expert e unless (m - l_e) / max(|l_e|, m) > 2 eps (slot 2 never keeps i1), and its
    weight is the softmax over the kept logits at its winner. Returns the winners [T, 2]
    (slot order), both keep masks [T, E] and the smallest winning gap: of the two selections
    (in logits) and of every mask decision (|ratio - 2 eps|, which is dimensionless but of
    the logits' size here, O(1))."""
    threshold = 2 * eps
    ranked, order = router_logits.sort(dim=-1, descending=True, stable=True)
    winners = order[:, :2]
    gaps = [(ranked[:, 0] - ranked[:, 1]).min().item(), (ranked[:, 1] - ranked[:, 2]).min().item()]
    keeps = []
    for slot in range(2):
        best = ranked[:, slot : slot + 1]
        ratio = (best - router_logits) / torch.maximum(router_logits.abs(), best)
        keep = ~(ratio > threshold)
        if slot == 1:  # slot 1's expert is out of slot 2's race
            keep.scatter_(1, winners[:, :1], False)
            ratio = ratio.scatter(1, winners[:, :1], float("inf"))
        keeps.append(keep)
        gaps.append((ratio - threshold).abs().min().item())
    return winners, keeps, min(gaps)


def sparsemixer_weights(router_logits, keeps, winners):
    """Each slot's weight: the softmax over the logits its mask keeps, at its winner."""
    return torch.cat(
        [
            torch.softmax(router_logits.masked_fill(~keep, float("-inf")), dim=-1).gather(
                1, winners[:, slot : slot + 1]
            )
            for slot, keep in enumerate(keeps)
        ],
        dim=-1,
    )


def require_sparsemixer_masks(name, keeps):
    """Raises unless each sparsemixer slot keeps a runner-up (besides its winner) for some
    token and masks some expert it could choose for some token, so that the fixture tells the
    masks from a plain softmax and from a weight of 1. Returns the kept counts per slot."""
    counts = []
    for slot, keep in enumerate(keeps):
        kept = keep.sum(dim=-1)
        candidates = keep.shape[-1] - slot
        if not (kept > 1).any() or not (kept < candidates).any():
            raise RuntimeError(f"{name}: slot {slot + 1}'s mask is trivial: kept {kept.tolist()}")
        counts.append(kept.tolist())
    return counts
def ernie_router_choice(router_logits, bias, k):
    """ERNIE-4.5-MoE: top-k of softmax(logits) + bias (bias [1, E]; the weights are the
    unbiased probabilities), and the smallest winning gap of that biased score."""
    choice = F.softmax(router_logits, dim=-1, dtype=torch.float) + bias
    ranked, order = choice.sort(dim=-1, descending=True)
    return order[:, :k].sort(dim=-1)[0], (ranked[:, k - 1] - ranked[:, k]).min().item()


def router_weight(gate):
    """The router's [E, H] weight: gate.weight, or Hunyuan-MoE's gate.wg.weight."""
    return gate.wg.weight if hasattr(gate, "wg") else gate.weight


def router_choice(kind, gate, router_logits):
    if kind == "sigmoid":
        return sigmoid_router_choice(
            router_logits, gate.e_score_correction_bias, gate.num_group, gate.topk_group, gate.top_k
        )
    if kind == "v2":
        return deepseek_v2_router_choice(gate, router_logits)
    if kind == "logit_topk":
        return logit_topk_router_choice(router_logits, gate.top_k)
    if kind == "sparsemixer":
        winners, _, margin = sparsemixer_choice(router_logits, gate.router_jitter_noise)
        return winners.sort(dim=-1)[0], margin
    if kind == "ernie":
        return ernie_router_choice(
            router_logits, gate.moe_statics.e_score_correction_bias, gate.top_k
        )
    assert kind in ("softmax", "softmax_raw"), kind
    return softmax_router_choice(router_logits, gate.top_k)


def expected_weights(kind, gate, router_logits, indices):
    """The combine weights the family's router computes for the given selection."""
    if kind == "sigmoid":
        weights = router_logits.sigmoid().gather(1, indices)
        if gate.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * gate.routed_scaling_factor
    if kind == "logit_topk":  # softmax over the chosen logits, in the router's order
        return torch.softmax(router_logits.gather(1, indices), dim=-1)
    if kind == "sparsemixer":  # in slot order: indices are (slot 1, slot 2)
        winners, keeps, _ = sparsemixer_choice(router_logits, gate.router_jitter_noise)
        assert torch.equal(winners, indices)
        return sparsemixer_weights(router_logits, keeps, indices)
    weights = F.softmax(router_logits, dim=-1, dtype=torch.float).gather(1, indices)
    if kind == "v2":  # never renormalised in 5.24, whatever norm_topk_prob says
        return weights * gate.routed_scaling_factor
    if kind == "softmax_raw":  # Jamba: never renormalised, no flag
        return weights
    if kind == "ernie":  # the divisor clamped from below by moe_norm_min
        return weights / weights.sum(dim=-1, keepdim=True).clamp(min=gate.norm_min)
    if getattr(gate, "norm_topk_prob", True):  # Mixtral's and MiniMax's always renormalise
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights


def check_block_output_fused(block, x, indices, weights, expected, shared_mlp=None):
    """check_combine for a 5.x block, from the fused expert tensors: gate, up =
    chunk(gate_up_proj[e] @ x, 2) (gate rows first, as in every 5.x *Experts.forward);
    down_proj[e] @ (silu(gate) * up); plus shared experts (Qwen2-MoE / Qwen3-Next: one,
    scaled per token by sigmoid(x @ shared_expert_gate.weight^T); Hunyuan-MoE: the block's
    shared_mlp, weight 1; GraniteMoeShared: gate, up = chunk(input_linear @ x, 2);
    output_linear @ (silu(gate) * up))."""
    experts = block.experts

    def expert(e, row):
        gate, up = (experts.gate_up_proj[e] @ row).chunk(2)
        return experts.down_proj[e] @ (F.silu(gate) * up)

    def mlp_output(mlp):
        inner = F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
        return inner @ mlp.down_proj.weight.T

    shared = []
    if hasattr(block, "shared_experts"):
        shared.append(mlp_output(block.shared_experts))
    if hasattr(block, "shared_expert_gate"):
        scale = torch.sigmoid(x @ block.shared_expert_gate.weight.T)  # [T, 1]
        shared.append(scale * mlp_output(block.shared_expert))
    if hasattr(block, "shared_mlp"):
        shared.append(mlp_output(block.shared_mlp))
    if shared_mlp is not None:
        gate, up = (x @ shared_mlp.input_linear.weight.T).chunk(2, dim=-1)
        shared.append((F.silu(gate) * up) @ shared_mlp.output_linear.weight.T)
    check_combine(x, indices, weights, expert, expected, shared)


def shared_gate_range(name, block, x):
    """Qwen2-MoE / Qwen3-Next: raises unless sigmoid(x @ shared_expert_gate.weight^T) lies in
    (0.1, 0.9) for all but 2 tokens, so that the gate's gradient (a factor s (1 - s)) is not
    vanishing; returns its smallest and largest value."""
    scale = torch.sigmoid(x @ block.shared_expert_gate.weight.T).flatten()
    if ((scale > 0.1) & (scale < 0.9)).sum().item() < len(scale) - 2:
        raise RuntimeError(f"{name}: shared expert gate saturated: {scale.tolist()}")
    return [round(scale.min().item(), 4), round(scale.max().item(), 4)]


def read_checkpoint(directory):
    tensors = {}
    for filename in sorted(os.listdir(directory)):
        if filename.endswith(".safetensors"):
            tensors.update(safetensors.torch.load_file(os.path.join(directory, filename)))
    return tensors


FUSED_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


def transposed(tensors):
    """Qwen3-VL-MoE's released layout of a state dict in 5.x's: every fused expert tensor
    with its last two dimensions swapped, gate_up_proj [E, H, 2F] (gate columns first) and
    down_proj [E, F, H]. conversion_mapping.py ("qwen3_vl_moe") undoes this on load with
    Transpose(1, 2, check_dims=True), which transposes only where the shape differs from the
    model's, so it can tell the layouts apart only where 2F != H and F != H (here 32, 16 vs
    64)."""
    return {
        k: v.transpose(1, 2).contiguous() if k.endswith(FUSED_EXPERTS) else v
        for k, v in tensors.items()
    }


def check_layouts(original, fused, blocks, layout="per_expert", renames=()):
    """Checks that the per-expert tensors of the original layout are the gate rows / up rows
    of gate_up_proj[e] and down_proj[e] of the fused layout, and that everything else is
    only renamed. blocks: (original prefix, fused prefix, experts, F) of each MoE block;
    renames: (original, fused) names relative to the block prefixes of tensors that move
    within the block (ERNIE-4.5: moe_statics. -> gate.moe_statics.).
    layout "granite": the original layout holds the same 3-D tensors as input_linear.weight /
    output_linear.weight and the router as router.layer.weight (renamed only); "transposed":
    the same names, the fused expert tensors transposed (see transposed)."""
    original, fused = dict(original), dict(fused)
    for orig_prefix, fused_prefix, num_experts, width in blocks:
        gate_up = fused.pop(fused_prefix + "experts.gate_up_proj")
        down = fused.pop(fused_prefix + "experts.down_proj")
        assert gate_up.shape[:2] == (num_experts, 2 * width) and down.shape[0] == num_experts
        if layout == "transposed":
            assert orig_prefix == fused_prefix
            released_gate_up = original.pop(orig_prefix + "experts.gate_up_proj")
            assert released_gate_up.shape == (num_experts, gate_up.shape[2], 2 * width)
            assert torch.equal(released_gate_up, gate_up.transpose(1, 2))
            released_down = original.pop(orig_prefix + "experts.down_proj")
            assert torch.equal(released_down, down.transpose(1, 2))
            continue
        if layout == "granite":
            assert orig_prefix == fused_prefix
            assert torch.equal(original.pop(orig_prefix + "input_linear.weight"), gate_up)
            assert torch.equal(original.pop(orig_prefix + "output_linear.weight"), down)
            router = fused.pop(fused_prefix + "router.weight")
            assert torch.equal(original.pop(orig_prefix + "router.layer.weight"), router)
            continue
        assert layout == "per_expert", layout
        if orig_prefix.endswith("block_sparse_moe."):
            names = ("w1", "w3", "w2")
        else:
            names = ("gate_proj", "up_proj", "down_proj")
        # Phi-MoE's router: gate.weight in the original layout, router.weight in the fused one.
        if orig_prefix + "gate.weight" in original and fused_prefix + "router.weight" in fused:
            original[orig_prefix + "router.weight"] = original.pop(orig_prefix + "gate.weight")
        for e in range(num_experts):
            parts = [original.pop(f"{orig_prefix}experts.{e}.{n}.weight") for n in names]
            assert torch.equal(parts[0], gate_up[e, :width]), "gate rows are not first"
            assert torch.equal(parts[1], gate_up[e, width:])
            assert torch.equal(parts[2], down[e])
        for old, new in renames:
            for k in [k for k in original if k.startswith(orig_prefix + old)]:
                original[fused_prefix + new + k[len(orig_prefix + old) :]] = original.pop(k)
        original = {k.replace(orig_prefix, fused_prefix): v for k, v in original.items()}
    assert original.keys() == fused.keys(), sorted(original.keys() ^ fused.keys())
    for k in fused:
        assert torch.equal(original[k], fused[k]), k


def saved_as_gradients(model, params, block_grads):
    """The checkpoint transformers' save_pretrained writes for `model` with each block
    parameter (`params`, by name) replaced by its gradient: the gradients under the names
    and slicing of the checkpoint layout, done by transformers rather than by us."""
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(block_grads[n])
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return read_checkpoint(tmp)


def draw_inputs(name, seed, hidden, margin_of):
    """The block input [TOKENS, hidden] and output gradient of a 5.x fixture. Tokens are
    drawn one at a time, each redrawn until its routing decisions win by more than
    MIN_MARGIN (`margin_of(row)`; with 64 experts a whole 13-token draw would hardly ever
    pass). Returns (x, grad_output, per-token margins, draws)."""
    generator = torch.Generator().manual_seed(seed + 2)
    rows, margins, draws = [], [], 0
    while len(rows) < TOKENS:
        row = torch.randn(1, hidden, generator=generator)
        draws += 1
        if draws > 100 * TOKENS:
            raise RuntimeError(f"{name}: no input with routing margin > {MIN_MARGIN}")
        with torch.no_grad():
            margin = margin_of(row)
        if margin > MIN_MARGIN:
            rows.append(row)
            margins.append(margin)
    x = torch.cat(rows)
    grad_output = torch.randn(TOKENS, hidden, generator=generator)
    return x, grad_output, margins, draws


def build5(spec, out_root):
    spec = Spec5(*spec)
    if spec.layout == "dbrx":
        return build5_dbrx(spec, out_root)
    if spec.layout == "llama4":
        return build5_llama4(spec, out_root)
    if spec.layout == "gpt_oss":
        return build5_gpt_oss(spec, out_root)
    name, seed, config, model_class, layer, orig_attr, kind, shard = spec[:8]
    block_attr, router_attr, shared_attr, layout, layers_path = spec[8:]
    torch.manual_seed(seed)
    model = model_class(config).eval()
    # The reference loop over experts (5.x defaults to grouped_mm where it can).
    model.set_experts_implementation("eager")
    fused_prefix = f"{layers_path}.{layer}.{block_attr}."
    orig_prefix = f"{layers_path}.{layer}.{orig_attr}."
    shared_prefix = f"{layers_path}.{layer}.{shared_attr}." if shared_attr else None
    layers = model.get_submodule(layers_path)
    moe_layers = [
        i for i, m in enumerate(layers) if hasattr(getattr(m, block_attr, None), "experts")
    ]
    assert layer in moe_layers

    bias_gates = [layers[i].mlp.gate for i in moe_layers] if kind == "sigmoid" else []
    if kind == "ernie":
        bias_gates = [layers[i].mlp.gate.moe_statics for i in moe_layers]
    model = bf16_checkpoint(model, bias_gates, seed)
    directory = os.path.join(out_root, name)
    model_dir = os.path.join(directory, "model")
    fused_dir = os.path.join(directory, "model_fused")
    save_checkpoint(model, model_dir, **({"max_shard_size": shard} if shard else {}))
    save_checkpoint(model, fused_dir, save_original_format=False)
    original, fused = read_checkpoint(model_dir), read_checkpoint(fused_dir)
    if layout == "transposed":
        # save_pretrained does not write the released layout in either mode (the reverse of
        # Transpose(check_dims=True) compares with the model's own shapes, so it never
        # transposes): model/ is what it wrote, the expert tensors transposed, with
        # save_pretrained's metadata. The from_pretrained check below authenticates it.
        assert original.keys() == fused.keys()
        assert all(torch.equal(original[k], fused[k]) for k in fused)
        assert [f for f in os.listdir(model_dir) if f.endswith(".safetensors")] == [
            "model.safetensors"
        ]
        safetensors.torch.save_file(
            transposed(fused), os.path.join(model_dir, "model.safetensors"), {"format": "pt"}
        )
        original = read_checkpoint(model_dir)
    else:
        assert original.keys() != fused.keys(), f"{name}: both layouts are identical"
    layouts = [
        (
            f"{layers_path}.{i}.{orig_attr}.",
            f"{layers_path}.{i}.{block_attr}.",
            getattr(layers[i], block_attr).experts.num_experts,
            getattr(layers[i], block_attr).experts.intermediate_dim,
        )
        for i in moe_layers
    ]
    # conversion_mapping.py: ernie4_5_moe is qwen2_moe's mapping plus this renaming.
    renames = [("moe_statics.", "gate.moe_statics.")] if kind == "ernie" else []
    check_layouts(original, fused, layouts, layout, renames)
    # Both directories load back into the same model.
    reference = {k: v.float() for k, v in model.state_dict().items()}
    for d in (model_dir, fused_dir):
        loaded = model_class.from_pretrained(d).state_dict()
        assert loaded.keys() == reference.keys(), d
        for k, v in loaded.items():
            assert torch.equal(v.float(), reference[k]), (d, k)

    model = model.float()
    block = getattr(layers[layer], block_attr)
    gate = getattr(block, router_attr)
    shared_mlp = getattr(layers[layer], shared_attr) if shared_attr else None
    text_config = config.get_text_config()  # config itself except for Qwen3-VL-MoE
    hidden = text_config.hidden_size
    assert text_config.hidden_act == "silu"

    x, grad_output, margins, draws = draw_inputs(
        name,
        seed,
        hidden,
        lambda row: router_choice(kind, gate, F.linear(row, router_weight(gate)))[1],
    )

    x = x.clone().requires_grad_(True)
    y, (router_logits, weights, indices) = run_recording_router(block, gate, x)
    assert isinstance(y, torch.Tensor)
    if shared_mlp is not None:  # GraniteMoeSharedDecoderLayer: moe + shared_mlp(same input)
        y = y + shared_mlp(x.unsqueeze(0))
    y = y.reshape(TOKENS, hidden)
    y.backward(grad_output)

    with torch.no_grad():
        torch.testing.assert_close(
            router_logits, x @ router_weight(gate).T, rtol=1e-6, atol=1e-6
        )
        chosen, margin = router_choice(kind, gate, router_logits)
        assert torch.equal(chosen, indices.sort(dim=-1)[0]), f"{name}: selection differs"
        assert margin > MIN_MARGIN
        torch.testing.assert_close(
            weights, expected_weights(kind, gate, router_logits, indices), rtol=0, atol=0
        )
        if kind == "sigmoid":
            require_effect(name, "correction bias", router_logits.sigmoid(), gate.top_k, chosen)
        if kind == "ernie":
            scores = router_logits.softmax(dim=-1)
            require_effect(name, "correction bias", scores, gate.top_k, chosen)
        if kind == "v2" and gate.topk_method == "group_limited_greedy":
            scores = router_logits.softmax(dim=-1)
            require_effect(name, "the group limit", scores, gate.top_k, chosen)
        if kind == "sparsemixer":  # the inference path, whose gradient kmoe reproduces
            assert not block.training and gate.top_k == 2
            kept = require_sparsemixer_masks(
                name, sparsemixer_choice(router_logits, gate.router_jitter_noise)[1]
            )
        check_block_output_fused(
            block, x.detach(), indices, weights.detach(), y.detach(), shared_mlp
        )
        gated = hasattr(block, "shared_expert_gate")
        gate_range = shared_gate_range(name, block, x.detach()) if gated else None
    indices, weights = sort_by_weight(indices, weights.detach())

    blocks = [("block", orig_prefix), ("fused_block", fused_prefix)]
    if shared_prefix:
        blocks.append(("shared", shared_prefix))
    save = fixture_writer(directory, name, blocks)
    save_forward(save, x, y, grad_output, router_logits, indices, weights)

    def is_block_param(key, prefix):
        if shared_prefix and key.startswith(shared_prefix):
            return True
        return key.startswith(prefix) and not key.endswith("e_score_correction_bias")

    # Fused names are the block's own parameter names (and the shared MLP's, for
    # GraniteMoeShared); not ERNIE-4.5's correction bias, a parameter without gradient.
    params = {fused_prefix + n: p for n, p in block.named_parameters() if p.requires_grad}
    if shared_mlp is not None:
        params.update({shared_prefix + n: p for n, p in shared_mlp.named_parameters()})
    block_grads = {n: g.detach().clone() for n, g in param_grads(params.items()).items()}
    grads_fused = {"hidden_states": x.grad}
    grads_fused.update(block_grads)
    assert {k for k in fused if is_block_param(k, fused_prefix)} == grads_fused.keys() - {
        "hidden_states"
    }
    # Original names: transformers' own conversion names and slices them.
    converted = saved_as_gradients(model, params, block_grads)
    if layout == "transposed":
        # Saved as the fused tensors (see above), then transposed like model/; a
        # checkpoint of them loads into the block as exactly the fused gradients.
        assert all(torch.equal(converted[k], block_grads[k]) for k in block_grads)
        converted = transposed(converted)
        with tempfile.TemporaryDirectory() as tmp:
            model.config.save_pretrained(tmp)
            safetensors.torch.save_file(
                converted, os.path.join(tmp, "model.safetensors"), {"format": "pt"}
            )
            reloaded = model_class.from_pretrained(tmp, dtype=torch.float32)
        reloaded_block = getattr(reloaded.get_submodule(layers_path)[layer], block_attr)
        for n, p in reloaded_block.named_parameters():
            assert torch.equal(p, block_grads[fused_prefix + n]), n
    grads = {"hidden_states": x.grad}
    grads.update({k: v for k, v in converted.items() if is_block_param(k, orig_prefix)})
    assert {k for k in original if is_block_param(k, orig_prefix)} == grads.keys() - {
        "hidden_states"
    }
    assert all(v.dtype == torch.float32 for v in grads.values())
    check_layouts(
        {k: v for k, v in grads.items() if k != "hidden_states"},
        {k: v for k, v in grads_fused.items() if k != "hidden_states"},
        [(orig_prefix, fused_prefix, block.experts.num_experts, block.experts.intermediate_dim)],
        layout,
    )
    save("grads.safetensors", grads)
    save("grads_fused.safetensors", grads_fused)
    hit = set(indices.flatten().tolist())
    summary = {
        "routing_margin": min(margins),
        "input_draws": draws,
        "experts_unused": sorted(set(range(block.experts.num_experts)) - hit),
    }
    if gated:
        summary["shared_gate_range"] = gate_range
    if kind == "sparsemixer":
        summary["experts_kept_per_slot"] = kept
    return summary


def dbrx_expected_weights(router_logits, indices, p):
    """DbrxFFN.route_tokens_to_experts, written independently: softmax over all E in the
    logits' dtype (float32 here), the chosen probabilities divided by their L_p norm
    (moe_normalize_expert_weights = p; 1.0: by their sum, as they are positive)."""
    weights = F.softmax(router_logits, dim=-1).gather(1, indices)
    return weights / (weights.abs() ** p).sum(dim=-1, keepdim=True) ** (1.0 / p)


def check_block_output_dbrx(experts, x, indices, weights, expected):
    """check_combine for DBRX's experts: w1, v1, w2 are [E * F, H], expert e owning rows
    e * F ... (e + 1) * F - 1 of each; gate = w1[e] @ x, up = v1[e] @ x, and the down
    projection is (act(gate) * up) @ w2[e], w2[e] being [F, H] (not [H, F] like an nn.Linear
    weight, as down_proj is elsewhere). Also checks that reading w2 as the [E, H, F] weights
    of nn.Linear layers would not reproduce the output (so the check can tell)."""
    mlp = experts.mlp
    width = experts.ffn_hidden_size

    def rows(tensor, e):
        return tensor[e * width : (e + 1) * width]

    def expert(e, row):
        inner = F.silu(rows(mlp.w1, e) @ row) * (rows(mlp.v1, e) @ row)
        return inner @ rows(mlp.w2, e)

    check_combine(x, indices, weights, expert, expected)

    as_linear = mlp.w2.reshape(experts.num_experts, experts.hidden_size, width)

    def wrong(e, row):
        return as_linear[e] @ (F.silu(rows(mlp.w1, e) @ row) * (rows(mlp.v1, e) @ row))

    try:
        check_combine(x, indices, weights, wrong, expected)
    except AssertionError:
        return
    raise RuntimeError("dbrx: the w2 layout check cannot tell [F, H] from [H, F]")


def save_single_layout(model, name, out_root):
    """model/ of a family whose experts transformers 5.x does not convert: save_pretrained
    writes the same bytes with and without save_original_format (checked), so there is no
    model_fused/ (a stale one is removed). Returns the fixture directory, model/, the saved
    tensors (checked equal to the model's) and the model's state in float32."""
    directory = os.path.join(out_root, name)
    model_dir = os.path.join(directory, "model")
    save_checkpoint(model, model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model, tmp, save_original_format=False)
        for filename in ("config.json", "model.safetensors"):
            with open(os.path.join(model_dir, filename), "rb") as a:
                with open(os.path.join(tmp, filename), "rb") as b:
                    assert a.read() == b.read(), f"{name}: {filename} differs in model_fused/"
        assert sorted(os.listdir(tmp)) == sorted(os.listdir(model_dir))
    shutil.rmtree(os.path.join(directory, "model_fused"), ignore_errors=True)
    original = read_checkpoint(model_dir)
    reference = {k: v.float() for k, v in model.state_dict().items()}
    assert original.keys() == reference.keys()
    for k, v in original.items():
        assert torch.equal(v.float(), reference[k]), k
    return directory, model_dir, original, reference


def check_reloads(model_class, model_dir, reference):
    """from_pretrained(model_dir) gives back the model's state (`reference`, float32)."""
    loaded = model_class.from_pretrained(model_dir).state_dict()
    assert loaded.keys() == reference.keys()
    for k, v in loaded.items():
        assert torch.equal(v.float(), reference[k]), k


def save_single_layout_fixture(directory, name, prefix, model, block, original, run, routing):
    """Writes input / output / grad_output and grads.safetensors of a single-layout family
    (block parameters under `prefix`, the names transformers saves: the same names and
    tensors, no conversion). run: (x with its gradient, y, grad_output); routing:
    (router_logits, indices, weights). Returns the unused experts for the summary."""
    x, y, grad_output = run
    router_logits, indices, weights = routing
    indices, weights = sort_by_weight(indices, weights.detach())

    save = fixture_writer(directory, name, [("block", prefix)])
    save_forward(save, x, y, grad_output, router_logits, indices, weights)

    params = {prefix + n: p for n, p in block.named_parameters()}
    assert params.keys() == {k for k in original if k.startswith(prefix)}
    block_grads = {n: g.detach().clone() for n, g in param_grads(params.items()).items()}
    converted = saved_as_gradients(model, params, block_grads)
    grads = {"hidden_states": x.grad}
    grads.update({k: v for k, v in converted.items() if k.startswith(prefix)})
    assert grads.keys() - {"hidden_states"} == block_grads.keys()
    assert all(torch.equal(grads[k], block_grads[k]) for k in block_grads)
    assert all(v.dtype == torch.float32 for v in grads.values())
    save("grads.safetensors", grads)
    hit = set(indices.flatten().tolist())
    return {"experts_unused": sorted(set(range(block.experts.num_experts)) - hit)}


def build5_dbrx(spec, out_root):
    """build5 for DBRX (DbrxFFN at transformer.blocks.{layer}.ffn: router.layer.weight [E, H],
    experts.mlp.{w1, v1, w2} [E * F, H]). transformers has no conversion for these tensors:
    save_pretrained writes the same bytes with and without save_original_format (checked), so
    only model/ and grads.safetensors are written, under the block's own parameter names
    (which are also what save_pretrained writes: checked with the gradients). The router
    returns only its logits; the selection and weights the block used are recorded by a
    forward pre-hook on its experts (DbrxExperts.forward(hidden_states, top_k_index,
    top_k_weights))."""
    name, seed, config, model_class, layer, orig_attr, kind, shard = spec[:8]
    block_attr, router_attr, shared_attr, layout, layers_path = spec[8:]
    assert kind == layout == "dbrx" and orig_attr == block_attr and not shard and not shared_attr
    ffn_config = config.ffn_config
    assert ffn_config.ffn_act_fn == {"name": "silu"} and ffn_config.moe_jitter_eps is None
    torch.manual_seed(seed)
    model = model_class(config).eval()
    prefix = f"{layers_path}.{layer}.{block_attr}."
    layers = model.get_submodule(layers_path)
    assert all(hasattr(getattr(m, block_attr), "experts") for m in layers)

    model = bf16_checkpoint(model, [], seed)
    directory, model_dir, original, reference = save_single_layout(model, name, out_root)
    num_experts, width = ffn_config.moe_num_experts, ffn_config.ffn_hidden_size
    hidden = config.d_model
    for i in range(len(layers)):
        for n in ("w1", "v1", "w2"):
            assert original[f"{layers_path}.{i}.{block_attr}.experts.mlp.{n}"].shape == (
                num_experts * width,
                hidden,
            )
    check_reloads(model_class, model_dir, reference)

    model = model.float()
    block = getattr(layers[layer], block_attr)
    gate = getattr(block, router_attr).layer
    top_k, norm_p = block.top_k, block.moe_normalize_expert_weights
    assert (top_k, norm_p) == (ffn_config.moe_top_k, 1.0)

    x, grad_output, margins, draws = draw_inputs(
        name, seed, hidden, lambda row: softmax_router_choice(F.linear(row, gate.weight), top_k)[1]
    )

    x = x.clone().requires_grad_(True)
    recorded = {}
    handles = [
        gate.register_forward_hook(lambda module, args, result: recorded.update(logits=result)),
        block.experts.register_forward_pre_hook(
            lambda module, args: recorded.update(indices=args[1], weights=args[2])
        ),
    ]
    y = block(x.unsqueeze(0))
    for handle in handles:
        handle.remove()
    router_logits, indices, weights = recorded["logits"], recorded["indices"], recorded["weights"]
    assert router_logits.dtype == torch.float32
    y = y.reshape(TOKENS, hidden)
    y.backward(grad_output)

    with torch.no_grad():
        torch.testing.assert_close(router_logits, x @ gate.weight.T, rtol=1e-6, atol=1e-6)
        chosen, margin = softmax_router_choice(router_logits, top_k)
        assert torch.equal(chosen, indices.sort(dim=-1)[0]), f"{name}: selection differs"
        assert margin > MIN_MARGIN
        torch.testing.assert_close(
            weights, dbrx_expected_weights(router_logits, indices, norm_p), rtol=0, atol=0
        )
        check_block_output_dbrx(block.experts, x.detach(), indices, weights.detach(), y.detach())
    return {
        **save_single_layout_fixture(
            directory, name, prefix, model, block, original, (x, y, grad_output),
            (router_logits, indices, weights),
        ),
        "routing_margin": min(margins),
        "input_draws": draws,
    }


def logit_router_choice(router_logits, k):
    """Top-k experts of the logits (index rows sorted ascending) and the smallest gap between
    any token's k-th and (k+1)-th logit."""
    ranked, order = router_logits.sort(dim=-1, descending=True)
    return order[:, :k].sort(dim=-1)[0], (ranked[:, k - 1] - ranked[:, k]).min().item()


def check_block_output_llama4(block, x, indices, weights, expected):
    """Llama4TextMoe evaluated independently from its recorded routing: out[t] =
    shared_expert(x[t]) + sum_j expert(indices[t, j], weights[t, j] * x[t]), expert e's
    gate_up_proj[e] [H, 2F] holding the gate columns then the up columns and down_proj[e]
    [F, H] (x @ W, not nn.Linear's W @ x). Also checks that weighting the expert outputs
    instead (every other family's combine) would not reproduce the output (so the check
    can tell)."""
    experts = block.experts
    width = experts.expert_dim

    def expert(e, row):
        gate_up = row @ experts.gate_up_proj[e]
        return (F.silu(gate_up[:width]) * gate_up[width:]) @ experts.down_proj[e]

    out = block.shared_expert(x)
    wrong = out.clone()
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            e, w = int(indices[t, j]), weights[t, j]
            out[t] += expert(e, w * x[t])
            wrong[t] += w * expert(e, x[t])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if torch.allclose(wrong, expected, rtol=1e-5, atol=1e-5):
        raise RuntimeError("llama4: weighting the outputs gives the same block output")


def build5_llama4(spec, out_root):
    """build5 for Llama 4 (Llama4TextMoe at model.layers.{layer}.feed_forward: router.weight
    [E, H], experts.gate_up_proj [E, H, 2F], experts.down_proj [E, F, H], shared_expert.
    {gate,up,down}_proj). transformers has no conversion for these tensors: save_pretrained
    writes the same bytes with and without save_original_format (checked), so only model/ and
    grads.safetensors are written, under the block's own parameter names (which are also what
    save_pretrained writes: checked with the gradients). The router returns (scores, logits),
    scores [T, E] holding sigmoid(logit) at the chosen experts and 0 elsewhere; a forward hook
    records them as the block used them."""
    name, seed, config, model_class, layer, orig_attr, kind, shard = spec[:8]
    block_attr, router_attr, shared_attr, layout, layers_path = spec[8:]
    assert kind == layout == "llama4" and orig_attr == block_attr and not shard and not shared_attr
    text = getattr(config, "text_config", config)  # the multimodal model's text fields
    assert text.hidden_act == "silu" and text.moe_layers == [layer]
    torch.manual_seed(seed)
    model = model_class(config).eval()
    prefix = f"{layers_path}.{layer}.{block_attr}."
    layers = model.get_submodule(layers_path)

    model = bf16_checkpoint(model, [], seed)
    directory, model_dir, original, reference = save_single_layout(model, name, out_root)
    num_experts, width, hidden = text.num_local_experts, text.intermediate_size, text.hidden_size
    assert original[prefix + "experts.gate_up_proj"].shape == (num_experts, hidden, 2 * width)
    assert original[prefix + "experts.down_proj"].shape == (num_experts, width, hidden)
    assert original[prefix + "experts.gate_up_proj"].abs().min() > 0
    check_reloads(model_class, model_dir, reference)

    model = model.float()
    block = getattr(layers[layer], block_attr)
    gate = getattr(block, router_attr)
    top_k = block.top_k
    assert top_k == text.num_experts_per_tok

    x, grad_output, margins, draws = draw_inputs(
        name, seed, hidden, lambda row: logit_router_choice(F.linear(row, gate.weight), top_k)[1]
    )

    x = x.clone().requires_grad_(True)
    y, (scores, router_logits) = run_recording_router(block, gate, x)
    assert router_logits.dtype == torch.float32
    y = y[0].reshape(TOKENS, hidden)
    y.backward(grad_output)

    with torch.no_grad():
        torch.testing.assert_close(router_logits, x @ gate.weight.T, rtol=1e-6, atol=1e-6)
        chosen, margin = logit_router_choice(router_logits, top_k)
        assert margin > MIN_MARGIN
        assert torch.equal((scores > 0).sum(dim=-1), torch.full((TOKENS,), top_k))
        indices = scores.topk(top_k, dim=-1)[1]
        assert torch.equal(chosen, indices.sort(dim=-1)[0]), f"{name}: selection differs"
        weights = scores.gather(1, indices)
        # To the last bit but one: torch's vectorised sigmoid can round differently for the
        # same value in a [T, E] tensor (the router's) and a [T, k] one.
        torch.testing.assert_close(
            weights, torch.sigmoid(router_logits.gather(1, indices)), rtol=2e-7, atol=0
        )
        check_block_output_llama4(block, x.detach(), indices, weights, y.detach())
    return {
        **save_single_layout_fixture(
            directory, name, prefix, model, block, original, (x, y, grad_output),
            (router_logits, indices, weights),
        ),
        "routing_margin": min(margins),
        "input_draws": draws,
    }


def gpt_oss_expert(experts, e, row, interleaved=True):
    """GptOssExperts for one token and expert, written independently: gate_up = row @
    gate_up_proj[e] + gate_up_proj_bias[e] ([H] @ [H, 2F]); gate the even columns, up the odd
    ones (interleaved; chunked halves with interleaved=False, to show the check can tell);
    gate clamped above at limit, up to [-limit, limit]; (up + 1) * gate * sigmoid(alpha *
    gate) @ down_proj[e] ([F, H]) + down_proj_bias[e]."""
    gate_up = row @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
    if interleaved:
        gate, up = gate_up[0::2], gate_up[1::2]
    else:
        gate, up = gate_up.chunk(2)
    gate = torch.minimum(gate, torch.tensor(experts.limit))
    up = torch.maximum(torch.minimum(up, torch.tensor(experts.limit)), torch.tensor(-experts.limit))
    return ((up + 1) * gate * torch.sigmoid(experts.alpha * gate)) @ experts.down_proj[
        e
    ] + experts.down_proj_bias[e]


def gpt_oss_pre_activations(experts, x, indices):
    """Gate and up pre-activations [T, k, F] of the chosen experts (interleaved columns)."""
    gate_up = torch.stack(
        [
            torch.stack(
                [x[t] @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e] for e in row]
            )
            for t, row in enumerate(indices.tolist())
        ]
    )
    return gate_up[..., 0::2], gate_up[..., 1::2]


def build5_gpt_oss(spec, out_root):
    """build5 for GPT-OSS (GptOssMLP at model.layers.{layer}.mlp: router.weight [E, H],
    router.bias [E], experts.gate_up_proj [E, H, 2F], gate_up_proj_bias [E, 2F], down_proj
    [E, F, H], down_proj_bias [E, H]). transformers has no conversion for these tensors:
    save_pretrained writes the same bytes with and without save_original_format (checked), so
    only model/ and grads.safetensors are written (as for DBRX). transformers initialises the
    expert biases to zero; they are drawn here (before the bf16 conversion) so that they
    matter. Tokens are drawn until the routing margin and every chosen expert's distance of
    its gate and up pre-activations from the clamp's kinks (gate = limit, up = +-limit)
    exceed MIN_MARGIN; the script checks that the clamps are active for some elements (gate
    above, up above and below), so their gradient paths are exercised."""
    name, seed, config, model_class, layer, orig_attr, kind, shard = spec[:8]
    block_attr, router_attr, shared_attr, layout, layers_path = spec[8:]
    assert kind == layout == "gpt_oss" and orig_attr == block_attr and not shard and not shared_attr
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.set_experts_implementation("eager")
    prefix = f"{layers_path}.{layer}.{block_attr}."
    layers = model.get_submodule(layers_path)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in layers:
            experts = getattr(m, block_attr).experts
            assert not experts.gate_up_proj_bias.any() and not experts.down_proj_bias.any()
            experts.gate_up_proj_bias.copy_(
                torch.randn(experts.gate_up_proj_bias.shape, generator=generator) * 0.3
            )
            experts.down_proj_bias.copy_(
                torch.randn(experts.down_proj_bias.shape, generator=generator) * 0.1
            )

    model = bf16_checkpoint(model, [], seed)
    directory, model_dir, original, reference = save_single_layout(model, name, out_root)
    num_experts, width = config.num_local_experts, config.intermediate_size
    hidden = config.hidden_size
    for i in range(len(layers)):
        p = f"{layers_path}.{i}.{block_attr}."
        assert original[p + "router.weight"].shape == (num_experts, hidden)
        assert original[p + "router.bias"].shape == (num_experts,)
        assert original[p + "experts.gate_up_proj"].shape == (num_experts, hidden, 2 * width)
        assert original[p + "experts.gate_up_proj_bias"].shape == (num_experts, 2 * width)
        assert original[p + "experts.down_proj"].shape == (num_experts, width, hidden)
        assert original[p + "experts.down_proj_bias"].shape == (num_experts, hidden)
    check_reloads(model_class, model_dir, reference)

    model = model.float()
    block = getattr(layers[layer], block_attr)
    router, experts = getattr(block, router_attr), block.experts
    top_k, limit = router.top_k, experts.limit
    assert (top_k, limit, experts.alpha) == (
        config.num_experts_per_tok,
        config.swiglu_limit,
        config.swiglu_alpha,
    )

    def margin_of(row):
        chosen, margin = logit_topk_router_choice(F.linear(row, router.weight, router.bias), top_k)
        gate, up = gpt_oss_pre_activations(experts, row, chosen)
        kink = min((gate - limit).abs().min().item(), (up.abs() - limit).abs().min().item())
        return min(margin, kink)

    x, grad_output, margins, draws = draw_inputs(name, seed, hidden, margin_of)

    x = x.clone().requires_grad_(True)
    y, (router_logits, weights, indices) = run_recording_router(block, router, x)
    y = y[0].reshape(TOKENS, hidden)
    y.backward(grad_output)

    with torch.no_grad():
        torch.testing.assert_close(
            router_logits, x @ router.weight.T + router.bias, rtol=1e-6, atol=1e-6
        )
        chosen, margin = logit_topk_router_choice(router_logits, top_k)
        assert torch.equal(chosen, indices.sort(dim=-1)[0]), f"{name}: selection differs"
        assert margin > MIN_MARGIN
        torch.testing.assert_close(
            weights, torch.softmax(router_logits.gather(1, indices), dim=-1), rtol=0, atol=0
        )
        require_effect(name, "the router bias", router_logits - router.bias, top_k, chosen)
        xd = x.detach()
        check_combine(
            xd, indices, weights, lambda e, row: gpt_oss_expert(experts, e, row), y.detach()
        )
        try:
            check_combine(
                xd,
                indices,
                weights,
                lambda e, row: gpt_oss_expert(experts, e, row, interleaved=False),
                y.detach(),
            )
        except AssertionError:
            pass
        else:
            raise RuntimeError(f"{name}: the check cannot tell interleaved from chunked gate/up")
        gate, up = gpt_oss_pre_activations(experts, xd, indices)
        clamped = {
            "gate_above": int((gate > limit).sum()),
            "up_above": int((up > limit).sum()),
            "up_below": int((up < -limit).sum()),
        }
        assert all(clamped.values()), f"{name}: a clamp is never active: {clamped}"
    return {
        **save_single_layout_fixture(
            directory, name, prefix, model, block, original, (x, y, grad_output),
            (router_logits, indices, weights),
        ),
        "routing_margin": min(margins),
        "input_draws": draws,
        "clamped_elements": clamped,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    major = int(transformers.__version__.split(".")[0])
    parser.add_argument(
        "--out",
        default=os.path.join("tests", "fixtures", *(["hf5"] if major >= 5 else [])),
    )
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="transformers >= 5: build only these families"
    )
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if major >= 5:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        for spec in specs5():
            if args.only and spec[0] not in args.only:
                continue
            summary = build5(spec, args.out)
            print(spec[0], json.dumps(summary))
        return
    for seed, spec in ((1000, mixtral()), (2000, deepseek_v3()), (3000, qwen3_moe())):
        summary = build(spec, args.out, seed)
        print(spec[0], json.dumps(summary))


if __name__ == "__main__":
    main()
