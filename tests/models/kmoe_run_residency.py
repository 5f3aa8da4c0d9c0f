#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""kmoe-run with a residency budget (--max-resident-experts, --memory-budget) against the
all-resident run: the outputs equal bit for bit on the Hugging Face fixtures and on a
synthetic Mixtral block whose experts (50 MB of BF16, 100 MB as float) are 4x the budget;
the budgeted run's peak RSS stays within the budget plus the overhead docs/memory.md
documents, and far below the all-resident run's; --dtype bf16's peak holds the packed
experts and one float expert, not a float copy of all of them, and so does --activations
bf16's (the whole block in bf16); a budget below a batch's experts, a
missing shard and a truncated shard exit 1 naming the budget or the file.

usage: kmoe_run_residency.py KMOE_RUN FIXTURES WORK
"""

import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys

# kmoe-run's peak RSS beyond its resident expert weights: Kokkos, the OpenMP runtime, the
# C++ runtime, the checkpoint headers, activations (docs/memory.md, "Lazy loading").
OVERHEAD_BYTES = 64 << 20

failures = []


def check(condition, message):
    if not condition:
        failures.append(message)
        print("FAIL:", message)


def run(kmoe_run, args):
    env = dict(os.environ, OMP_PROC_BIND="false", OMP_NUM_THREADS="2")
    p = subprocess.run([kmoe_run] + args, env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def peak_of(out):
    m = re.search(r"peak resident memory: (\d+) bytes", out)
    return int(m.group(1)) if m else -1


def read_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


def write_safetensors(path, tensors):
    """tensors: name -> (dtype, shape, bytes), written in insertion order."""
    header, offset = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for _, (_, _, data) in tensors.items():
            f.write(data)


def first_rows(input_path, rows, out_path):
    """A decode-sized input: the first `rows` tokens of a fixture input."""
    header, start = read_header(input_path)
    info = header["hidden_states"]
    hidden = info["shape"][1]
    size = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}[info["dtype"]]
    with open(input_path, "rb") as f:
        f.seek(start + info["data_offsets"][0])
        data = f.read(rows * hidden * size)
    write_safetensors(out_path, {"hidden_states": (info["dtype"], [rows, hidden], data)})


def bf16_block(rng, count):
    """`count` BF16 values of magnitude 2^-6..2^-4 with random signs and mantissas."""
    words = [(rng.getrandbits(1) << 15) | ((rng.randrange(121, 124)) << 7) | rng.getrandbits(7)
             for _ in range(4096)]
    block = struct.pack("<4096H", *words)
    reps = -(-count // 4096)
    return (block * reps)[: 2 * count]


def synthetic_model(directory, experts, hidden, ffn):
    """A Mixtral block (layer 1) of `experts` experts, its weights BF16."""
    os.makedirs(directory, exist_ok=True)
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
              "hidden_size": hidden, "intermediate_size": ffn, "num_local_experts": experts,
              "num_experts_per_tok": 2, "num_hidden_layers": 2, "hidden_act": "silu",
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32,
              "rms_norm_eps": 1e-5, "router_jitter_noise": 0.0, "dtype": "bfloat16"}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    rng = random.Random(7)
    prefix = "model.layers.1.block_sparse_moe."
    tensors = {prefix + "gate.weight": ("BF16", [experts, hidden],
                                        bf16_block(rng, experts * hidden))}
    for e in range(experts):
        block = bf16_block(rng, ffn * hidden)
        for w, shape in (("w1", [ffn, hidden]), ("w2", [hidden, ffn]), ("w3", [ffn, hidden])):
            tensors[f"{prefix}experts.{e}.{w}.weight"] = ("BF16", shape, block)
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
    rows = [[(((t * 31 + h * 17) % 23) - 11) / 8.0 for h in range(hidden)] for t in range(2)]
    data = b"".join(struct.pack(f"<{hidden}f", *r) for r in rows)
    write_safetensors(os.path.join(directory, "input.safetensors"),
                      {"hidden_states": ("F32", [2, hidden], data)})
    return 3 * ffn * hidden * 4  # bytes of one expert in float


def same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def main():
    kmoe_run, fixtures, work = sys.argv[1:4]
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    # The fixtures, decoding one token: 25% and 50% of the experts resident.
    for model, budgets in (("mixtral", (2, 4)), ("qwen3_moe", (2, 4)), ("deepseek_v3", (4, 8))):
        one = os.path.join(work, model + "_one.safetensors")
        first_rows(os.path.join(fixtures, model, "input.safetensors"), 1, one)
        full = os.path.join(work, model + "_full.safetensors")
        rc, out, err = run(kmoe_run, ["--model", os.path.join(fixtures, model, "model"),
                                      "--layer", "1", "--input", one, "--output", full])
        check(rc == 0, f"{model}: all-resident run exit {rc}: {err}")
        for n in budgets:
            lazy = os.path.join(work, f"{model}_{n}.safetensors")
            rc, out, err = run(kmoe_run, ["--model", os.path.join(fixtures, model, "model"),
                                          "--layer", "1", "--input", one, "--output", lazy,
                                          "--max-resident-experts", str(n)])
            check(rc == 0, f"{model} --max-resident-experts {n}: exit {rc}: {err}")
            check(rc == 0 and same_bytes(full, lazy),
                  f"{model} --max-resident-experts {n}: output differs from the all-resident run")
            check(f"{n} of " in out, f"{model}: no residency line in:\n{out}")

    # A synthetic block 4x the budget: equal output, peak RSS within budget + overhead.
    model = os.path.join(work, "synthetic")
    expert_bytes = synthetic_model(model, experts=16, hidden=512, ffn=1024)
    x = os.path.join(model, "input.safetensors")
    full = os.path.join(work, "synthetic_full.safetensors")
    rc, out, err = run(kmoe_run, ["--model", model, "--layer", "1", "--input", x,
                                  "--output", full])
    check(rc == 0, f"synthetic all-resident run: exit {rc}: {err}")
    peak_full = peak_of(out)
    print(f"synthetic all-resident: peak RSS {peak_full / 2**20:.1f} MiB")
    budget = 4 * expert_bytes
    for args in (["--max-resident-experts", "4"], ["--memory-budget", str(budget)]):
        lazy = os.path.join(work, "synthetic_lazy.safetensors")
        rc, out, err = run(kmoe_run, ["--model", model, "--layer", "1", "--input", x,
                                      "--output", lazy] + args)
        check(rc == 0, f"synthetic {args}: exit {rc}: {err}")
        peak = peak_of(out)
        print(f"synthetic {' '.join(args)}: peak RSS {peak / 2**20:.1f} MiB, budget "
              f"{budget / 2**20:.1f} MiB\n{out}")
        check(rc == 0 and same_bytes(full, lazy), f"synthetic {args}: output differs")
        check(0 < peak <= budget + OVERHEAD_BYTES,
              f"synthetic {args}: peak RSS {peak} exceeds budget {budget} + overhead "
              f"{OVERHEAD_BYTES}")
        # The all-resident run holds 12 more experts' weights (and their gradients).
        check(peak + 12 * expert_bytes <= peak_full,
              f"synthetic {args}: peak RSS {peak} not below the all-resident {peak_full} "
              f"by the 12 experts left out")

    # --dtype bf16 packs each expert as it is read: the peak holds the 16 packed experts and
    # one float expert, never the float copy of all of them (100 MB here) that loading in
    # float and packing afterwards needs.
    packed_bytes = 16 * expert_bytes // 2
    # --activations bf16 reads every tensor straight into the bf16 block, and allocates no
    # gradients: the peak holds the 16 bf16 experts, the float panel one expert's product
    # widens into (docs/precision.md) and the runtime, never a float copy of the experts.
    # Both runs are bounded by the 16 experts in bf16 + one float expert + overhead.
    for name, args in (("synthetic_bf16", ["--dtype", "bf16"]),
                       ("synthetic_bf16_block", ["--dtype", "bf16", "--activations", "bf16"])):
        what = f"synthetic {' '.join(args)}"
        rc, out, err = run(kmoe_run, ["--model", model, "--layer", "1", "--input", x, "--output",
                                      os.path.join(work, name + ".safetensors")] + args)
        peak = peak_of(out)
        print(f"{what}: peak RSS {peak / 2**20:.1f} MiB, bf16 experts "
              f"{packed_bytes / 2**20:.1f} MiB, float experts "
              f"{16 * expert_bytes / 2**20:.1f} MiB")
        check(rc == 0, f"{what}: exit {rc}: {err}")
        check(0 < peak <= packed_bytes + expert_bytes + OVERHEAD_BYTES,
              f"{what}: peak RSS {peak} exceeds the bf16 experts {packed_bytes} + one float "
              f"expert {expert_bytes} + overhead {OVERHEAD_BYTES}")

    # Hostile: a budget below the batch's experts, a missing shard, a truncated shard.
    rc, out, err = run(kmoe_run, ["--model", model, "--layer", "1", "--input", x,
                                  "--output", os.path.join(work, "y.safetensors"),
                                  "--max-resident-experts", "1"])
    check(rc == 1 and "budget" in err and "raise the budget to at least" in err,
          f"budget 1: exit {rc}, message: {err}")
    sharded = os.path.join(work, "sharded")
    os.makedirs(sharded)
    shutil.copy(os.path.join(model, "config.json"), sharded)
    shutil.copy(os.path.join(model, "model.safetensors"),
                os.path.join(sharded, "model-00001-of-00002.safetensors"))
    header, _ = read_header(os.path.join(model, "model.safetensors"))
    weight_map = {name: ("model-00002-of-00002.safetensors" if ".experts.15." in name
                         else "model-00001-of-00002.safetensors") for name in header}
    with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    rc, out, err = run(kmoe_run, ["--model", sharded, "--layer", "1", "--input", x,
                                  "--output", os.path.join(work, "y.safetensors"),
                                  "--max-resident-experts", "4"])
    check(rc == 1 and "model-00002-of-00002.safetensors" in err,
          f"missing shard: exit {rc}, message: {err}")
    truncated = os.path.join(work, "truncated")
    shutil.copytree(model, truncated)
    shard = os.path.join(truncated, "model.safetensors")
    os.truncate(shard, os.path.getsize(shard) // 2)
    rc, out, err = run(kmoe_run, ["--model", truncated, "--layer", "1", "--input", x,
                                  "--output", os.path.join(work, "y.safetensors"),
                                  "--max-resident-experts", "4"])
    check(rc == 1 and shard in err, f"truncated shard: exit {rc}, message: {err}")

    if failures:
        print(f"{len(failures)} failure(s)")
        return 1
    print("all residency checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
