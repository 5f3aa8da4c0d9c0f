# SPDX-License-Identifier: BSD-3-Clause
"""Writes output_bf16.safetensors beside three transformers-5 fixtures (tests/fixtures/hf5):
the MoE block of decoder layer 1 run by transformers itself in bfloat16 (weights as stored,
the fixture's input rounded to bf16), the reference for kmoe's bf16 layer (issue 15, item 6).

The fixtures' output.safetensors holds the float32 computation on the same bf16 weights; this
file holds what a bf16 deployment of the same checkpoint computes, so a test can tell a bf16
layer's rounding from a wrong result. Run from the repository root with torch and
transformers >= 5 installed (tests/fixtures/README.md names the versions used):

    /path/to/venv5/bin/python tools/make_hf_bf16_outputs.py
"""

import argparse
import os

import safetensors.torch
import torch
import transformers
from transformers import AutoModelForCausalLM

FAMILIES = ("mixtral", "deepseek_v3", "qwen3_moe")


def moe_block(model):
    """The MoE block of decoder layer 1 (Mixtral calls it block_sparse_moe in 4.x, mlp in 5.x)."""
    layer = model.model.layers[1]
    return getattr(layer, "mlp", None) or layer.block_sparse_moe


def write_bf16_output(directory):
    """Runs the block in bf16 on the fixture's input and writes its output; returns the
    output's largest deviation from the float32 output, relative to that output's largest
    magnitude (printed for tests/fixtures/README.md)."""
    model = AutoModelForCausalLM.from_pretrained(
        os.path.join(directory, "model"), dtype=torch.bfloat16
    )
    x = safetensors.torch.load_file(os.path.join(directory, "input.safetensors"))["hidden_states"]
    with torch.no_grad():
        y = moe_block(model)(x.to(torch.bfloat16).unsqueeze(0))
    y = (y[0] if isinstance(y, tuple) else y)[0]
    source = (
        f"model={os.path.basename(directory)} block=model.layers.1 dtype=bfloat16 "
        f"torch={torch.__version__} transformers={transformers.__version__}"
    )
    safetensors.torch.save_file(
        {"hidden_states": y.contiguous()},
        os.path.join(directory, "output_bf16.safetensors"),
        {"source": source},
    )
    fp32 = safetensors.torch.load_file(os.path.join(directory, "output.safetensors"))
    reference = fp32["hidden_states"]
    return float((y.float() - reference).abs().max() / reference.abs().max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", default=os.path.join("tests", "fixtures", "hf5"))
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for family in FAMILIES:
        deviation = write_bf16_output(os.path.join(args.fixtures, family))
        print(f"{family}: bf16 output vs float32 output, max |diff| / max |y| = {deviation:.2e}")


if __name__ == "__main__":
    main()
