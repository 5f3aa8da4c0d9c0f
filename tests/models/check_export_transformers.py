# SPDX-License-Identifier: BSD-3-Clause
"""Runs an exported kmoe block (models/hf_export.hpp) in transformers and in kmoe-run.

transformers loads the directory with its own from_pretrained (its own name mapping: on 5.x
the per-expert tensors are converted to the fused expert module), the MoE block of the
chosen decoder layer runs on random hidden states, and kmoe-run runs the same block on the
same states; the script prints the largest difference and exits 1 above --tolerance
(relative to the largest output element). Not a ctest: it needs torch and transformers.

Usage (a venv with torch, transformers, safetensors):
    python tests/models/check_export_transformers.py KMOE_RUN EXPORT_DIR LAYER [--tokens T]
"""

import argparse
import os
import subprocess
import sys
import tempfile

import safetensors.torch
import torch
import transformers


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("kmoe_run")
    parser.add_argument("model")
    parser.add_argument("layer", type=int)
    parser.add_argument("--tokens", type=int, default=37)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args()

    # The export holds the MoE block only: the attention and embedding sizes transformers
    # needs to build the model around it are chosen here, small (their weights stay random
    # and are never run).
    config = transformers.AutoConfig.from_pretrained(
        args.model, num_attention_heads=2, num_key_value_heads=2, vocab_size=32)
    if config.model_type == "deepseek_v3":
        config.update(dict(q_lora_rank=None, kv_lora_rank=4, qk_rope_head_dim=2,
                           qk_nope_head_dim=2, v_head_dim=2, head_dim=2))
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, config=config,
                                                              torch_dtype=torch.float32)
    decoder = model.model.layers[args.layer]
    # transformers 4.x names Mixtral's block block_sparse_moe, 5.x mlp.
    block = decoder.block_sparse_moe if hasattr(decoder, "block_sparse_moe") else decoder.mlp
    torch.manual_seed(0)
    x = torch.randn(args.tokens, config.hidden_size)
    with torch.no_grad():
        out = block(x.unsqueeze(0))
        expected = (out[0] if isinstance(out, tuple) else out).reshape(args.tokens, -1)

    with tempfile.TemporaryDirectory() as work:
        source, result = os.path.join(work, "x.safetensors"), os.path.join(work, "y.safetensors")
        safetensors.torch.save_file({"hidden_states": x.contiguous()}, source)
        subprocess.run([args.kmoe_run, "--model", args.model, "--layer", str(args.layer),
                        "--input", source, "--output", result], check=True)
        got = safetensors.torch.load_file(result)["hidden_states"]
    scale = expected.abs().max().item()
    worst = (got - expected).abs().max().item()
    print(f"transformers {transformers.__version__}, {config.model_type} layer {args.layer}, "
          f"T={args.tokens}: max |kmoe - transformers| = {worst:.3g} (output scale {scale:.3g})")
    return 0 if worst <= args.tolerance * scale else 1


if __name__ == "__main__":
    sys.exit(main())
