#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Generates the hostile-input sweep for kmoe-run: several hundred model directories,
hidden-state files and command lines, each broken in one way (safetensors headers,
offsets, shapes, dtypes, JSON depth and size, numbers, config types and ranges, index
paths with traversal and symbolic links, FIFOs and devices, huge sparse files), plus a
few controls that must succeed. run_hostile.py runs them; this module only builds them.

Every case is a dict: name, category, args (kmoe-run arguments), expect (substrings the
error message must contain: the file and, where there is one, the field), rc (1 for an
error, 2 for a usage error, 0 for a control), env (extra environment), output (the
--output path, pre-filled with a marker so that a clobbered previous output is seen).
Only the standard library is used, so the sweep runs wherever CI runs.
"""

import json
import os
import shutil
import struct

# The base model: layer 1 of the Mixtral fixture (H = 64, F = 96, E = 8, k = 2).
LAYER = 1
PREFIX = "model.layers.1.block_sparse_moe."
ROUTER = PREFIX + "gate.weight"
EXPERT0_W1 = PREFIX + "experts.0.w1.weight"
PREVIOUS_OUTPUT = b"previous good output\n"


# --- safetensors ------------------------------------------------------------------------

def read_safetensors(path):
    """(metadata, [(name, dtype, shape, data bytes)]) of a well-formed file."""
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    meta = header.pop("__metadata__", None)
    tensors = []
    for name, e in header.items():
        b, end = e["data_offsets"]
        tensors.append((name, e["dtype"], e["shape"], data[b:end]))
    return meta, tensors


def header_of(tensors, meta=None):
    """The header dict and the data section of `tensors`, laid out back to back."""
    header, data, offset = {}, b"", 0
    if meta is not None:
        header["__metadata__"] = meta
    for name, dtype, shape, payload in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(payload)]}
        data += payload
        offset += len(payload)
    return header, data


def file_bytes(header_text, data):
    if isinstance(header_text, str):
        header_text = header_text.encode()
    return struct.pack("<Q", len(header_text)) + header_text + data


def dumps(header):
    return json.dumps(header, separators=(",", ":"))


def deep(levels, leaf="1"):
    return "[" * levels + leaf + "]" * levels


def f32(values):
    return struct.pack("<%df" % len(values), *values)


# --- the sweep --------------------------------------------------------------------------

class Sweep:
    def __init__(self, fixtures, work):
        self.fixtures = fixtures
        self.work = work
        self.cases = []
        if os.path.exists(work):
            shutil.rmtree(work)
        os.makedirs(work)
        self.base = {}
        for family in ("mixtral", "deepseek_v3", "qwen3_moe"):
            self.base[family] = self._base_model(family)
        self.input = os.path.join(fixtures, "mixtral", "input.safetensors")
        self.grad = os.path.join(fixtures, "mixtral", "grad_output.safetensors")
        self.meta, self.tensors = read_safetensors(os.path.join(self.base["mixtral"], "model.safetensors"))
        with open(os.path.join(fixtures, "mixtral", "model", "config.json")) as f:
            self.config = json.load(f)

    def _base_model(self, family):
        """A copy of the fixture keeping only layer 1's MoE tensors (fewer bytes per case)."""
        d = os.path.join(self.work, "base", family)
        os.makedirs(d)
        src = os.path.join(self.fixtures, family, "model")
        shutil.copy(os.path.join(src, "config.json"), d)
        meta, tensors = read_safetensors(os.path.join(src, "model.safetensors"))
        keep = [t for t in tensors if t[0].startswith("model.layers.1.mlp.") or t[0].startswith(PREFIX)]
        header, data = header_of(keep, meta)
        with open(os.path.join(d, "model.safetensors"), "wb") as f:
            f.write(file_bytes(dumps(header), data))
        return d

    # A case directory: model/ holds config.json and the weights, linked to the base model
    # unless the case replaces them.
    def case_dir(self, name, family="mixtral", link_weights=True, link_config=True):
        d = os.path.join(self.work, "cases", name)
        os.makedirs(os.path.join(d, "model"))
        base = self.base[family]
        if link_config:
            os.symlink(os.path.join(base, "config.json"), os.path.join(d, "model", "config.json"))
        if link_weights:
            os.symlink(os.path.join(base, "model.safetensors"), os.path.join(d, "model", "model.safetensors"))
        return d

    def add(self, name, category, d, expect, rc=1, input=None, extra=(), env=None, family="mixtral",
            model=None, output=None):
        output = output or os.path.join(d, "output.safetensors")
        if not os.path.lexists(output) and os.path.isdir(os.path.dirname(output)) and \
                len(os.path.basename(output)) <= 255:
            with open(output, "wb") as f:
                f.write(PREVIOUS_OUTPUT)
        fixture = os.path.join(self.fixtures, family)
        args = ["--model", model or os.path.join(d, "model"), "--layer", str(LAYER),
                "--input", input or os.path.join(fixture, "input.safetensors"), "--output", output]
        args += list(extra)
        self.cases.append({"name": name, "category": category, "args": args, "expect": expect,
                           "rc": rc, "env": env or {}, "output": output})

    # -- model.safetensors --
    def weights(self, name, content, expect=None, category="safetensors header"):
        d = self.case_dir(name, link_weights=False)
        path = os.path.join(d, "model", "model.safetensors")
        with open(path, "wb") as f:
            f.write(content)
        self.add(name, category, d, expect or ["model.safetensors"])
        return path

    def edited(self, name, edit, expect=None, category="safetensors header"):
        """Weights whose header dict `edit` changes (data section unchanged)."""
        header, data = header_of(self.tensors, self.meta)
        result = edit(header)
        text = result if isinstance(result, str) else dumps(header)
        self.weights(name, file_bytes(text, data), expect, category)

    def router_field(self, name, field, value, category, expect=None):
        def edit(h):
            h[ROUTER][field] = value
        self.edited(name, edit, expect or ["model.safetensors", ROUTER[-20:]], category)

    def router_field_text(self, name, field, text, category, expect=None):
        """The router's `field` replaced by raw JSON text (values json cannot write)."""
        def edit(h):
            h[ROUTER][field] = "@@PLACEHOLDER@@"
            return dumps(h).replace('"@@PLACEHOLDER@@"', text)
        self.edited(name, edit, expect or ["model.safetensors"], category)

    # -- config.json --
    def config_case(self, name, edit, expect, family="mixtral", category="config values", raw=None):
        d = self.case_dir(name, family=family, link_config=False)
        path = os.path.join(d, "model", "config.json")
        if raw is not None:
            content = raw if isinstance(raw, bytes) else raw.encode()
        else:
            with open(os.path.join(self.base[family], "config.json")) as f:
                config = json.load(f)
            edited = edit(config)
            content = (edited if isinstance(edited, str) else json.dumps(config, indent=1)).encode()
        with open(path, "wb") as f:
            f.write(content)
        self.add(name, category, d, expect, family=family)

    def config_field_text(self, name, field, text, expect, family="mixtral", category="config values"):
        def edit(c):
            c[field] = "@@PLACEHOLDER@@"
            return json.dumps(c).replace('"@@PLACEHOLDER@@"', text)
        self.config_case(name, edit, expect, family=family, category=category)

    # -- index --
    def index_case(self, name, index_text, expect, shards=None, category="index"):
        """A sharded directory: the index text and, per shard name, bytes or a callable
        making the entry (a link, a FIFO)."""
        d = self.case_dir(name, link_weights=False)
        model = os.path.join(d, "model")
        with open(os.path.join(model, "model.safetensors.index.json"), "wb") as f:
            f.write(index_text if isinstance(index_text, bytes) else index_text.encode())
        for shard, make in (shards or {}).items():
            path = os.path.join(model, shard)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if callable(make):
                make(path)
            else:
                with open(path, "wb") as f:
                    f.write(make)
        self.add(name, category, d, expect)

    def index_text(self, shard_of):
        """An index mapping every base tensor to shard_of(name)."""
        return json.dumps({"metadata": {}, "weight_map": {t[0]: shard_of(t[0]) for t in self.tensors}})

    def split_shards(self):
        """The base weights as two valid shards: router and experts 0-3 in a, the rest in b."""
        a = [t for t in self.tensors if t[0] == ROUTER or any(f"experts.{e}." in t[0] for e in range(4))]
        b = [t for t in self.tensors if t not in a]
        files = {}
        for shard, part in (("a.safetensors", a), ("b.safetensors", b)):
            header, data = header_of(part, self.meta)
            files[shard] = file_bytes(dumps(header), data)
        shard_of = {t[0]: "a.safetensors" for t in a}
        shard_of.update({t[0]: "b.safetensors" for t in b})
        return files, shard_of

    # -- hidden-state files --
    def input_case(self, name, content, expect=None, grad=False, category="input file"):
        d = self.case_dir(name)
        path = os.path.join(d, "hidden.safetensors")
        if callable(content):
            content(path)
        else:
            with open(path, "wb") as f:
                f.write(content)
        if grad:
            self.add(name, category, d, expect or ["hidden.safetensors"], input=self.input,
                     extra=["--grad-output", path, "--grads", os.path.join(d, "grads.safetensors")])
        else:
            self.add(name, category, d, expect or ["hidden.safetensors"], input=path)

    def hidden(self, shape, values=None, dtype="F32", name="hidden_states", extra_header=""):
        count = 1
        for s in shape:
            count *= s
        payload = f32(values if values is not None else [0.5] * count) if dtype == "F32" else values
        header = {name: {"dtype": dtype, "shape": shape, "data_offsets": [0, len(payload)]}}
        return file_bytes(dumps(header) + extra_header, payload)


def build(fixtures, work):
    s = Sweep(fixtures, work)
    T, H = 13, 64
    x = read_safetensors(s.input)[1][0][3]

    # ---- controls: must succeed, so that the errors below are the breakage's, not the base's.
    for family in ("mixtral", "deepseek_v3", "qwen3_moe"):
        d = s.case_dir("control_" + family, family=family)
        s.add("control_" + family, "control", d, [], rc=0, family=family)
    d = s.case_dir("control_training")
    s.add("control_training", "control", d, [], rc=0,
          extra=["--grad-output", s.grad, "--grads", os.path.join(d, "grads.safetensors")])
    files, shard_of = s.split_shards()
    s.index_case("control_sharded", s.index_text(lambda n: shard_of[n]), [], shards=files, category="control")
    s.cases[-1]["rc"] = 0
    # The Hugging Face hub cache layout: every file a symbolic link to ../../blobs/<hash>.
    d = os.path.join(work, "cases", "control_hub_cache")
    os.makedirs(os.path.join(d, "blobs"))
    snapshot = os.path.join(d, "snapshots", "rev")
    os.makedirs(snapshot)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(s.base["mixtral"], f), os.path.join(d, "blobs", f + ".blob"))
        os.symlink(os.path.join("..", "..", "blobs", f + ".blob"), os.path.join(snapshot, f))
    s.add("control_hub_cache", "control", d, [], rc=0, model=snapshot)

    # ---- safetensors file structure (model.safetensors)
    good_header, good_data = header_of(s.tensors, s.meta)
    good = file_bytes(dumps(good_header), good_data)
    for n in (0, 1, 7, 8, 9, 100, len(good) // 2, len(good) - 1):
        s.weights(f"st_truncated_at_{n}", good[:n], category="safetensors truncated")
    header_len = struct.unpack("<Q", good[:8])[0]
    for label, value in (("zero", 0), ("one_past", len(good) - 8 + 1), ("huge", 2**63),
                         ("max", 2**64 - 1), ("over_limit", 100_000_001), ("short_by_one", header_len - 1)):
        s.weights(f"st_header_length_{label}", struct.pack("<Q", value) + good[8:])
    for label, text in (("not_json", "hello"), ("array", "[]"), ("string", '"x"'), ("number", "5"),
                        ("null", "null"), ("trailing_garbage", dumps(good_header) + "}}"),
                        ("unterminated", dumps(good_header)[:-1]), ("nul_byte", "{\"a\0\":1}"),
                        ("bom", "\ufeff" + dumps(good_header)), ("comment", "/*x*/" + dumps(good_header)),
                        ("single_quotes", dumps(good_header).replace('"', "'")),
                        ("nan_literal", dumps(good_header).replace("[0,", "[NaN,", 1))):
        s.weights(f"st_header_{label}", file_bytes(text, good_data))
    s.weights("st_header_invalid_utf8", file_bytes(b'{"\xff\xfe":{}}', good_data))
    s.weights("st_header_lone_surrogate", file_bytes('{"\\ud800":{}}', good_data))
    s.weights("st_header_empty_object", file_bytes("{}", b""), expect=["no tensor", ROUTER])
    s.weights("st_header_only_metadata", file_bytes('{"__metadata__":{}}', b""), expect=["no tensor"])
    # Nesting: 80,000 levels (stack overflow in a recursive dump()), and just past the bound.
    for levels in (65, 1000, 80_000):
        s.router_field_text(f"st_deep_shape_{levels}", "shape", deep(levels), "JSON depth")
        s.router_field_text(f"st_deep_offsets_{levels}", "data_offsets", deep(levels), "JSON depth")
    s.router_field_text("st_deep_dtype", "dtype", deep(80_000), "JSON depth")
    s.edited("st_deep_metadata", lambda h: dumps(h).replace('"format":"pt"', '"format":' + deep(80_000)),
             category="JSON depth")
    s.weights("st_deep_top_level", file_bytes(deep(80_000), b""), category="JSON depth")
    s.weights("st_deep_objects", file_bytes('{"a":' * 80_000 + "1" + "}" * 80_000, b""), category="JSON depth")
    s.weights("st_deep_unbalanced", file_bytes("[" * 200_000, b""), category="JSON depth")
    # Size: valid headers with a 20 MB tensor name or 50,000 empty tensors are controls (they
    # must load, in bounded time); a 10 MB dtype string is refused with a bounded message.
    big = dumps(good_header)[:-1] + ',"' + "n" * 20_000_000 + '":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    s.weights("st_huge_tensor_name_is_fine", file_bytes(big, good_data), category="JSON size")
    s.cases[-1].update(rc=0, expect=[])
    many = dict(good_header)
    many.update({f"dummy.{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(50_000)})
    s.weights("st_50k_empty_tensors_are_fine", file_bytes(dumps(many), good_data), category="JSON size")
    s.cases[-1].update(rc=0, expect=[])
    s.edited("st_huge_bad_dtype_string", lambda h: h[ROUTER].update(dtype="X" * 10_000_000), category="JSON size",
             expect=["model.safetensors", "unsupported dtype"])
    # dtype
    for label, value in (("F8", "F8_E4M3"), ("BOOL", "BOOL"), ("U8", "U8"), ("empty", ""), ("lower", "f32"),
                         ("I16", "I16"), ("C64", "C64")):
        s.router_field(f"st_dtype_{label}", "dtype", value, "dtype")
    for label, text in (("number", "4"), ("null", "null"), ("array", '["F32"]'), ("object", '{"a":1}'), ("true", "true")):
        s.router_field_text(f"st_dtype_{label}_value", "dtype", text, "dtype")
    def integer_router(h):
        h[ROUTER]["dtype"] = "I16"  # same bytes per element as the BF16 weights
    s.edited("st_dtype_I16_router", integer_router, category="dtype")
    def i32_router(h):  # I32 with the byte count of an [8, 64] BF16 tensor: [8, 32]
        h[ROUTER].update(dtype="I32", shape=[8, 32])
    s.edited("st_dtype_I32_router_shape", i32_router, category="dtype", expect=["model.safetensors", ROUTER])
    def i32_router_bytes(h):  # an integer router of the right shape: [8, 64] I32, twice the bytes
        h[ROUTER].update(dtype="I32")
        h[ROUTER]["data_offsets"][1] = h[ROUTER]["data_offsets"][0] + 8 * 64 * 4
    s.edited("st_dtype_I32_router_bytes", i32_router_bytes, category="dtype")
    # shape
    for label, text in (("negative", "[-8,64]"), ("float", "[8.0,64]"), ("string", '["8",64]'), ("null", "[null,64]"),
                        ("nested", "[[8],64]"), ("object", "{}"), ("not_array", "512"), ("true", "[true,64]"),
                        ("two_pow_63", "[9223372036854775808,1]"), ("two_pow_64", "[18446744073709551616,1]"),
                        ("exp_1e400", "[1e400,64]"), ("minus_zero", "[-0,64]"), ("exp_small", "[8e0,64]"),
                        ("overflow_product", "[4294967296,4294967296,4]"), ("overflow_then_zero", "[4294967296,4294967296,0]"),
                        ("rank3", "[8,8,8]"), ("rank1", "[512]"), ("scalar", "[]"), ("transposed", "[64,8]"),
                        ("huge_rank", "[" + ",".join(["1"] * 100_000) + ",512]")):
        s.router_field_text(f"st_shape_{label}", "shape", text, "shape")
    # data_offsets
    rb, re_ = good_header[ROUTER]["data_offsets"]
    for label, text in (("reversed", f"[{re_},{rb}]"), ("past_end", f"[{rb},{len(good_data) + 1}]"),
                        ("negative", f"[-1,{re_}]"), ("float", f"[{rb}.0,{re_}]"), ("three", f"[{rb},{re_},{re_}]"),
                        ("one", f"[{rb}]"), ("empty", "[]"), ("strings", f'["{rb}","{re_}"]'), ("null", "null"),
                        ("huge", "[18446744073709551615,18446744073709551615]"), ("exp_1e400", "[0,1e400]"),
                        ("wrap", f"[18446744073709551615,{re_}]"), ("short", f"[{rb},{re_ - 2}]"),
                        ("long", f"[{rb},{re_ + 2}]"), ("object", '{"begin":0}')):
        s.router_field_text(f"st_offsets_{label}", "data_offsets", text, "offsets")
    def overlap(h):
        other = next(n for n in h if n not in ("__metadata__", ROUTER))
        h[other]["data_offsets"] = list(h[ROUTER]["data_offsets"])
    s.edited("st_offsets_overlap", overlap, category="offsets")
    def missing(key):
        return lambda h: h[ROUTER].pop(key)
    for key in ("dtype", "shape", "data_offsets"):
        s.edited(f"st_missing_{key}", missing(key), category="header fields",
                 expect=["model.safetensors", key])
    s.edited("st_entry_not_object", lambda h: h.update({ROUTER: [1, 2]}), category="header fields")
    # Duplicate names: the same tensor twice with different data, and a duplicated field.
    def duplicate_tensor(h):
        text = dumps(h)
        entry = dumps({ROUTER: h[EXPERT0_W1]})[1:-1]
        return text[:-1] + "," + entry + "}"
    s.edited("st_duplicate_tensor_name", duplicate_tensor, category="duplicate names",
             expect=["model.safetensors", ROUTER, "twice"])
    s.edited("st_duplicate_field", lambda h: dumps(h).replace('"dtype":"BF16"', '"dtype":"BF16","dtype":"F16"', 1),
             category="duplicate names", expect=["model.safetensors", "dtype", "twice"])
    s.edited("st_duplicate_metadata", lambda h: dumps(h).replace('"__metadata__"', '"__metadata__":{},"__metadata__"', 1),
             category="duplicate names", expect=["model.safetensors", "__metadata__", "twice"])
    # __metadata__
    for label, text in (("array", "[]"), ("number_value", '{"a":1}'), ("nested_value", '{"a":{"b":"c"}}'),
                        ("null_value", '{"a":null}'), ("string", '"pt"')):
        s.edited(f"st_metadata_{label}", lambda h, t=text: dumps(h).replace('{"format":"pt"}', t),
                 category="metadata", expect=["model.safetensors", "__metadata__"])
    # Tensors config.json needs, missing or with another shape.
    s.edited("st_router_missing", lambda h: h.pop(ROUTER), category="tensor set", expect=["no tensor", ROUTER])
    s.edited("st_expert_missing", lambda h: h.pop(PREFIX + "experts.7.w2.weight"), category="tensor set",
             expect=["no tensor", "experts.7.w2"])
    for label, shape in (("router_E_plus_one", [9, 32]), ("expert_transposed", [64, 96])):
        def reshape(h, shape=shape, label=label):
            name = ROUTER if label.startswith("router") else EXPERT0_W1
            h[name]["shape"] = shape
        s.edited(f"st_{label}", reshape, category="tensor set", expect=["model.safetensors", "shape"])
    # Special files as model.safetensors: FIFO (blocks open() without O_NONBLOCK), devices, a
    # directory, a dangling link, a link loop.
    for label, make in (("fifo", os.mkfifo), ("dev_zero", lambda p: os.symlink("/dev/zero", p)),
                        ("dev_null", lambda p: os.symlink("/dev/null", p)),
                        ("dev_urandom", lambda p: os.symlink("/dev/urandom", p)),
                        ("directory", os.mkdir), ("dangling_link", lambda p: os.symlink("nowhere", p)),
                        ("link_loop", lambda p: os.symlink(os.path.basename(p), p)),
                        ("link_to_fifo", lambda p: (os.mkfifo(p + ".fifo"), os.symlink(p + ".fifo", p)))):
        d = s.case_dir(f"st_special_{label}", link_weights=False)
        make(os.path.join(d, "model", "model.safetensors"))
        s.add(f"st_special_{label}", "special files", d, ["model.safetensors"])
    # Huge sparse files: a terabyte the header describes consistently, but whose shapes
    # disagree with config.json; and a tensor whose claimed bytes exceed the file.
    def sparse_weights(name, shape_of, size, expect):
        header, _ = header_of(s.tensors, s.meta)
        offset = 0
        for n in header:
            if n == "__metadata__":
                continue
            shape = shape_of(n, header[n]["shape"])
            count = 1
            for e in shape:
                count *= e
            header[n].update(shape=shape, data_offsets=[offset, offset + 2 * count])
            offset += 2 * count
        d = s.case_dir(name, link_weights=False)
        path = os.path.join(d, "model", "model.safetensors")
        with open(path, "wb") as f:
            f.write(file_bytes(dumps(header), b""))
            f.truncate(max(size, 8 + len(dumps(header)) + offset))
        s.add(name, "huge sparse files", d, expect)
    sparse_weights("sparse_1tb_expert", lambda n, sh: [2**20, 2**18] if n == EXPERT0_W1 else sh, 2**40,
                   ["has shape", "experts.0.w1"])
    sparse_weights("sparse_router_2e30", lambda n, sh: [2**30, 64] if n == ROUTER else sh, 2**37,
                   ["has shape", "gate.weight"])
    d = s.case_dir("sparse_claims_past_end", link_weights=False)
    with open(os.path.join(d, "model", "model.safetensors"), "wb") as f:
        h = {ROUTER: {"dtype": "BF16", "shape": [2**20, 2**20], "data_offsets": [0, 2**41]}}
        f.write(file_bytes(dumps(h), b""))
        f.truncate(2**40)
    s.add("sparse_claims_past_end", "huge sparse files", d, ["model.safetensors", "out of range"])

    # ---- config.json
    int_fields = ("hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok", "num_hidden_layers")
    bad_values = (("zero", "0"), ("negative", "-1"), ("two_pow_31", "2147483648"), ("two_pow_63", "9223372036854775808"),
                  ("two_pow_64", "18446744073709551616"), ("exp_1e400", "1e400"), ("fraction", "1.5"),
                  ("float_integral", "64.0"), ("string", '"64"'), ("true", "true"), ("array", "[64]"),
                  ("object", '{"v":64}'), ("deep", deep(80_000)), ("minus_exp_1e400", "-1e400"))
    for field in int_fields:
        for label, text in bad_values:
            # num_hidden_layers = 2^31 etc. would be valid counts: layer 1 < 2^31 is fine there.
            if field == "num_hidden_layers" and label == "two_pow_31":
                continue
            category = "JSON depth" if label == "deep" else ("numbers" if "e400" in label or "pow" in label else "config types and ranges")
            s.config_field_text(f"cfg_{field}_{label}", field, text, ["config.json"], category=category)
    for field in int_fields + ("model_type", "hidden_act"):
        s.config_case(f"cfg_missing_{field}", lambda c, f=field: c.pop(f), ["config.json", field])
        s.config_case(f"cfg_null_{field}", lambda c, f=field: c.update({f: None}), ["config.json", field])
    for label, value in (("llama", "llama"), ("empty", ""), ("long", "m" * 1_000_000)):
        s.config_case(f"cfg_model_type_{label}", lambda c, v=value: c.update(model_type=v), ["config.json", "model_type"])
    s.config_field_text("cfg_model_type_number", "model_type", "7", ["config.json", "model_type"])
    s.config_case("cfg_hidden_act_gelu", lambda c: c.update(hidden_act="gelu"), ["config.json", "hidden_act"])
    s.config_case("cfg_top_k_above_experts", lambda c: c.update(num_experts_per_tok=9), ["config.json", "num_experts_per_tok"])
    s.config_case("cfg_layer_out_of_range", lambda c: c.update(num_hidden_layers=1), ["config.json", "num_hidden_layers"])
    # Products: H × F ≥ 2^32 (wrapped extents), 2^31 exactly, and E × H past an int.
    for label, edit in (("hf_2e32", {"hidden_size": 65536, "intermediate_size": 65536}),
                        ("hf_2e31", {"hidden_size": 65536, "intermediate_size": 32768}),
                        ("eh_2e31", {"hidden_size": 65536, "num_local_experts": 32768}),
                        ("hf_max_int", {"hidden_size": 2147483647, "intermediate_size": 2147483647})):
        s.config_case(f"cfg_product_{label}", lambda c, e=edit: c.update(e), ["config.json", " x "],
                      category="config sizes")
    s.config_case("cfg_20000_experts", lambda c: c.update(num_local_experts=20000), ["has shape", "gate.weight"],
                  category="config sizes")
    s.config_case("cfg_experts_above_max", lambda c: c.update(num_local_experts=2**21), ["config.json", "num_local_experts"],
                  category="config sizes")
    s.config_case("cfg_intermediate_mismatch", lambda c: c.update(intermediate_size=95), ["has shape", "[95, 64]"],
                  category="config sizes")
    for label, raw in (("empty", ""), ("not_json", "{model_type: mixtral}"), ("array", "[]"), ("string", '"mixtral"'),
                       ("deep_array", deep(80_000)), ("deep_object", '{"a":' * 80_000 + "1" + "}" * 80_000),
                       ("invalid_utf8", b'{"model_type":"\xff"}'), ("nul", '{"model_type":"mix\u0000tral"}'),
                       ("trailing", '{"model_type":"mixtral"} x')):
        s.config_case(f"cfg_file_{label}", None, ["config.json"], raw=raw, category="config file")
    s.config_case("cfg_duplicate_key", lambda c: json.dumps(c)[:-1] + ', "hidden_size": 32}', ["config.json", "hidden_size", "twice"],
                  category="duplicate names")
    s.config_case("cfg_deep_unused_field", lambda c: json.dumps(c)[:-1] + ', "rope_scaling": ' + deep(80_000) + "}",
                  ["config.json", "deeper"], category="JSON depth")
    s.config_case("cfg_1e400_unused_field", lambda c: json.dumps(c)[:-1] + ', "rope_theta": 1e400}', ["config.json"],
                  category="numbers")
    for label, make in (("fifo", os.mkfifo), ("dev_zero", lambda p: os.symlink("/dev/zero", p)),
                        ("directory", os.mkdir), ("dangling_link", lambda p: os.symlink("nowhere", p)),
                        ("sparse_10gb", lambda p: open(p, "wb").truncate(10 * 2**30))):
        d = s.case_dir(f"cfg_special_{label}", link_config=False)
        make(os.path.join(d, "model", "config.json"))
        s.add(f"cfg_special_{label}", "special files", d, ["config.json"])
    # DeepSeek-V3 and Qwen3-MoE fields.
    ds_cases = (("n_group_zero", {"n_group": 0}, "n_group"), ("n_group_not_dividing", {"n_group": 3}, "n_group"),
                ("n_group_65", {"n_group": 65}, "n_group"), ("topk_group_zero", {"topk_group": 0}, "topk_group"),
                ("topk_group_above", {"topk_group": 5}, "topk_group"),
                ("top_k_past_groups", {"topk_group": 1, "num_experts_per_tok": 5}, "num_experts_per_tok"),
                ("scaling_zero", {"routed_scaling_factor": 0}, "routed_scaling_factor"),
                ("scaling_negative", {"routed_scaling_factor": -2.5}, "routed_scaling_factor"),
                ("scaling_string", {"routed_scaling_factor": "2.5"}, "routed_scaling_factor"),
                ("shared_negative", {"n_shared_experts": -1}, "n_shared_experts"),
                ("shared_overflow", {"n_shared_experts": 2**26}, "n_shared_experts x moe_intermediate_size"),
                ("shared_overflow_wrap", {"n_shared_experts": 2**27 + 1}, "n_shared_experts x moe_intermediate_size"),
                ("shared_two", {"n_shared_experts": 2}, "has shape"),
                ("shared_zero", {"n_shared_experts": 0}, None),
                ("dense_layer", {"first_k_dense_replace": 2}, "first_k_dense_replace"),
                ("moe_freq", {"moe_layer_freq": 2}, "moe_layer_freq"),
                ("scoring_softmax", {"scoring_func": "softmax"}, "scoring_func"),
                ("topk_method", {"topk_method": "greedy"}, "topk_method"),
                ("norm_string", {"norm_topk_prob": "true"}, "norm_topk_prob"),
                ("experts_mismatch", {"n_routed_experts": 32}, "has shape"))
    for label, edit, field in ds_cases:
        if field is None:
            # Dropping the shared expert leaves its tensors unused: a valid, different model.
            continue
        s.config_case(f"ds_{label}", lambda c, e=edit: c.update(e), ["config.json" if "shape" not in field else "has shape", field],
                      family="deepseek_v3", category="config types and ranges")
    s.config_field_text("ds_scaling_1e400", "routed_scaling_factor", "1e400", ["config.json"], family="deepseek_v3",
                        category="numbers")
    qw_cases = (("norm_missing", lambda c: c.pop("norm_topk_prob"), "norm_topk_prob"),
                ("mlp_only_layer", lambda c: c.update(mlp_only_layers=[1]), "mlp_only_layers"),
                ("mlp_only_not_list", lambda c: c.update(mlp_only_layers=1), "mlp_only_layers"),
                ("mlp_only_strings", lambda c: c.update(mlp_only_layers=["1"]), "mlp_only_layers"),
                ("mlp_only_2e64", lambda c: json.dumps(c)[:-1] + ', "mlp_only_layers": [18446744073709551615]}', "mlp_only_layers"),
                ("sparse_step_zero", lambda c: c.update(decoder_sparse_step=0), "decoder_sparse_step"),
                ("sparse_step_three", lambda c: c.update(decoder_sparse_step=3), "decoder_sparse_step"),
                ("experts_field_mixtral", lambda c: c.pop("num_experts"), "num_experts"))
    for label, edit, field in qw_cases:
        s.config_case(f"qw_{label}", edit, ["config.json", field], family="qwen3_moe", category="config types and ranges")

    # ---- model.safetensors.index.json
    index_path = "model.safetensors.index.json"
    files, shard_of = s.split_shards()
    def with_shard(path_for_b):
        return s.index_text(lambda n: path_for_b if shard_of[n] == "b.safetensors" else "a.safetensors")
    for label, name in (("dotdot", "../b.safetensors"), ("dotdot_inner", "sub/../../b.safetensors"),
                        ("absolute", "/etc/passwd"), ("absolute_dev", "/dev/zero"), ("empty", ""),
                        ("nul", "b.safe\u0000tensors"), ("dot_only", "."), ("dotdot_only", ".."),
                        ("trailing_slash", "b.safetensors/"), ("missing", "c.safetensors")):
        expect = {"missing": ["c.safetensors"], "trailing_slash": ["b.safetensors"],
                  "dot_only": ["a directory"]}.get(label, [index_path])
        s.index_case(f"idx_path_{label}", with_shard(name), expect,
                     shards={"a.safetensors": files["a.safetensors"]}, category="index paths")
    # Links: out of the directory to a file that is not safetensors, to devices, to a FIFO,
    # looping, dangling, and a shard that is itself a FIFO or a directory.
    outside = os.path.join(work, "outside.txt")
    with open(outside, "w") as f:
        f.write("not a checkpoint\n")
    for label, make in (("link_out_of_dir", lambda p: os.symlink(outside, p)),
                        ("link_traversal", lambda p: os.symlink("../../../../outside.txt", p)),
                        ("link_dev_zero", lambda p: os.symlink("/dev/zero", p)),
                        ("link_dev_null", lambda p: os.symlink("/dev/null", p)),
                        ("link_fifo", lambda p: (os.mkfifo(p + ".fifo"), os.symlink(p + ".fifo", p))),
                        ("link_loop", lambda p: os.symlink(os.path.basename(p), p)),
                        ("link_dangling", lambda p: os.symlink("gone.safetensors", p)),
                        ("fifo", os.mkfifo), ("directory", os.mkdir),
                        ("truncated", lambda p: open(p, "wb").write(files["b.safetensors"][:100])),
                        ("lacks_tensor", lambda p: open(p, "wb").write(files["a.safetensors"])),
                        ("deep_header", lambda p: open(p, "wb").write(file_bytes(deep(80_000), b""))),
                        ("sparse_1tb", lambda p: open(p, "wb").truncate(2**40))):
        s.index_case(f"idx_shard_{label}", with_shard("b.safetensors"), ["b.safetensors"],
                     shards={"a.safetensors": files["a.safetensors"], "b.safetensors": make}, category="index paths")
    good_index = with_shard("b.safetensors")
    for label, text in (("not_json", "weight_map"), ("array", "[]"), ("no_weight_map", '{"metadata":{}}'),
                        ("weight_map_array", '{"weight_map":[]}'), ("weight_map_string", '{"weight_map":"a"}'),
                        ("shard_number", s.index_text(lambda n: 5)[:-2] + "}}"),
                        ("shard_null", good_index.replace('"b.safetensors"', "null", 1)),
                        ("shard_array", good_index.replace('"b.safetensors"', '["b.safetensors"]', 1)),
                        ("shard_deep", good_index.replace('"b.safetensors"', deep(80_000), 1)),
                        ("metadata_deep", good_index.replace('"metadata": {}', '"metadata": ' + deep(80_000), 1)),
                        ("metadata_1e400", good_index.replace('"metadata": {}', '"metadata": {"total_size": 1e400}', 1)),
                        ("duplicate_tensor", good_index[:-2] + ', "' + ROUTER + '": "b.safetensors"}}'),
                        ("duplicate_weight_map", good_index[:-1] + ', "weight_map": {}}'),
                        ("empty_weight_map", '{"weight_map":{}}'), ("empty", ""),
                        ("invalid_utf8", b'{"weight_map":{"\xff":"a"}}'),
                        ("huge_key", '{"weight_map":{"' + "k" * 20_000_000 + '":"a.safetensors"}}')):
        expect = [index_path]
        if label in ("empty_weight_map", "huge_key"):
            expect = ["no tensor"]
        s.index_case(f"idx_file_{label}", text, expect, shards={"a.safetensors": files["a.safetensors"],
                                                                  "b.safetensors": files["b.safetensors"]},
                     category="index file")
    for label, make in (("fifo", os.mkfifo), ("dev_zero", lambda p: os.symlink("/dev/zero", p)),
                        ("directory", os.mkdir), ("sparse_10gb", lambda p: open(p, "wb").truncate(10 * 2**30))):
        d = s.case_dir(f"idx_special_{label}", link_weights=False)
        make(os.path.join(d, "model", index_path))
        s.add(f"idx_special_{label}", "special files", d, [index_path])

    # ---- --input and --grad-output
    for grad in (False, True):
        kind = "grad" if grad else "input"
        s.input_case(f"{kind}_missing", lambda p: None, grad=grad)
        for label, make in (("fifo", os.mkfifo), ("dev_zero", lambda p: os.symlink("/dev/zero", p)),
                            ("dev_null", lambda p: os.symlink("/dev/null", p)), ("directory", os.mkdir),
                            ("link_loop", lambda p: os.symlink(os.path.basename(p), p))):
            s.input_case(f"{kind}_special_{label}", make, grad=grad, category="special files")
        shaped = (("width_63", [T, 63]), ("width_65", [T, 65]), ("rank1", [T * H]), ("rank3", [1, T, H]),
                  ("rows_12", [12, H]) if grad else ("transposed", [H, T]))
        for label, shape in shaped:
            s.input_case(f"{kind}_shape_{label}", s.hidden(shape), grad=grad, category="input file")
        for label, value in (("nan", float("nan")), ("inf", float("inf")), ("minus_inf", float("-inf"))):
            values = [0.5] * (T * H)
            values[T * H // 2] = value
            s.input_case(f"{kind}_{label}", s.hidden([T, H], values), grad=grad, category="numbers",
                         expect=["hidden.safetensors", "not finite"])
        big = [3e38 if i % 2 else -3e38 for i in range(T * H)]
        s.input_case(f"{kind}_overflowing_values", s.hidden([T, H], big), grad=grad, category="numbers",
                     expect=["finite"])
        s.input_case(f"{kind}_i64", s.hidden([T, H], struct.pack("<%dq" % (T * H), *([1] * T * H)), dtype="I64"),
                     grad=grad, category="dtype")
        s.input_case(f"{kind}_wrong_name", s.hidden([T, H], name="hidden"), grad=grad, category="input file",
                     expect=["hidden.safetensors", "hidden_states"])
        s.input_case(f"{kind}_deep_header", file_bytes('{"hidden_states":' + deep(80_000) + "}", b""), grad=grad,
                     category="JSON depth")
        s.input_case(f"{kind}_duplicate_hidden_states",
                     file_bytes('{"hidden_states":{"dtype":"F32","shape":[1,64],"data_offsets":[0,256]},'
                                '"hidden_states":{"dtype":"F32","shape":[13,64],"data_offsets":[0,3328]}}', x),
                     grad=grad, category="duplicate names", expect=["hidden.safetensors", "hidden_states", "twice"])
        s.input_case(f"{kind}_truncated", s.hidden([T, H])[:-4], grad=grad, category="safetensors truncated")
        s.input_case(f"{kind}_offsets_1e400",
                     file_bytes('{"hidden_states":{"dtype":"F32","shape":[13,64],"data_offsets":[0,1e400]}}', x),
                     grad=grad, category="numbers")

        def sparse_hidden(path, rows=2**27):
            header = {"hidden_states": {"dtype": "F32", "shape": [rows, H], "data_offsets": [0, rows * H * 4]}}
            with open(path, "wb") as f:
                f.write(file_bytes(dumps(header), b""))
                f.truncate(8 + len(dumps(header)) + rows * H * 4)
        s.input_case(f"{kind}_sparse_32gb", sparse_hidden, grad=grad, category="huge sparse files",
                     expect=["hidden.safetensors", "tokens x hidden_size"])

    # ---- the command line
    def cli(name, extra, expect, rc=1, env=None, output=None, model=None):
        d = s.case_dir(name)
        s.add(name, "command line", d, expect, rc=rc, extra=extra, env=env, output=output, model=model)
        return d
    for n in (513, 1024, 100000, 2147483647):
        cli(f"cli_threads_{n}", ["--threads", str(n)], ["--threads", str(n)])
    cli("cli_omp_num_threads_1000", [], ["OMP_NUM_THREADS"], env={"OMP_NUM_THREADS": "1000"})
    for label, value in (("2e31", "2147483648"), ("negative", "-1"), ("text", "1x"), ("empty", "")):
        cli(f"cli_threads_usage_{label}", ["--threads", value], ["--threads"], rc=2)
    cli("cli_layer_2e31", ["--layer", "2147483648"], ["--layer"], rc=2)
    cli("cli_layer_past_end", ["--layer", "2"], ["num_hidden_layers", "config.json"])
    d = cli("cli_output_is_grads", [], ["same file"], rc=2)
    s.cases[-1]["args"] += ["--grad-output", s.grad, "--grads", s.cases[-1]["output"]]
    d = os.path.join(work, "cases", "cli_output_dev_null")
    os.makedirs(d)
    s.add("cli_output_dev_null", "command line", d, ["/dev/null", "not a regular file"], model=os.path.join(s.base["mixtral"]),
          output="/dev/null")
    for label, make in (("fifo", os.mkfifo), ("directory", os.mkdir)):
        d = os.path.join(work, "cases", f"cli_output_{label}")
        os.makedirs(d)
        out = os.path.join(d, "out")
        make(out)
        s.add(f"cli_output_{label}", "command line", d, ["out"], model=s.base["mixtral"], output=out)
    d = os.path.join(work, "cases", "cli_output_missing_dir")
    os.makedirs(d)
    s.add("cli_output_missing_dir", "command line", d, ["no_such_dir"], model=s.base["mixtral"],
          output=os.path.join(d, "no_such_dir", "out.safetensors"))
    # A 250-character output name is valid (NAME_MAX is 255): the staged temporary file
    # must not lengthen it.
    d = os.path.join(work, "cases", "control_output_name_250")
    os.makedirs(d)
    s.add("control_output_name_250", "control", d, [], rc=0, model=s.base["mixtral"],
          output=os.path.join(d, "o" * 250))
    d = os.path.join(work, "cases", "cli_output_name_too_long")
    os.makedirs(d)
    s.add("cli_output_name_too_long", "command line", d, ["o" * 40], model=s.base["mixtral"],
          output=os.path.join(d, "o" * 256))
    d = os.path.join(work, "cases", "cli_grads_missing_dir")
    os.makedirs(d)
    s.add("cli_grads_missing_dir", "command line", d, ["no_such_dir"], model=s.base["mixtral"],
          extra=["--grad-output", s.grad, "--grads", os.path.join(d, "no_such_dir", "grads.safetensors")])
    cli("cli_model_missing", [], ["no_such_model"], model=os.path.join(work, "no_such_model"))
    cli("cli_model_is_file", [], ["config.json"], model=os.path.join(s.base["mixtral"], "model.safetensors"))
    cli("cli_model_dev_null", [], ["/dev/null"], model="/dev/null")
    return s.cases


if __name__ == "__main__":
    import sys
    cases = build(sys.argv[1], sys.argv[2])
    print(f"{len(cases)} cases written under {sys.argv[2]}")
