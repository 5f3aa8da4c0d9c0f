// SPDX-License-Identifier: BSD-3-Clause
// ggml_moe_peer: the llama.cpp peer of kmoe_bench. Builds the MoE FFN graph that llama.cpp's
// llm_graph_context::build_moe_ffn builds (router matmul, softmax or sigmoid + selection
// bias with group-limited selection, top-k by ggml_argsort_top_k, ggml_get_rows of the
// weights, renormalisation, scaling, ggml_mul_mat_id for up / gate / down, SwiGLU, weighted
// sum over the k experts; DeepSeek's shared expert as build_ffn adds it) for kmoe_bench's
// configurations, on ggml's CPU backend, with F32, F16, BF16 or Q8_0 expert weights (the
// router stays F32, as llama-quantize keeps ffn_gate_inp), and times the graph compute only:
// the median of `repeats` ggml_backend_graph_compute calls after one warm-up call.
// Forward only: llama.cpp has no backward for this layer.
// Usage: ggml_moe_peer [--config NAME]... [--type f32|f16|bf16|q8_0]... [--threads N]
//                      [--repeats N] [--json FILE]
#include <ggml-alloc.h>
#include <ggml-backend.h>
#include <ggml-cpu.h>
#include <ggml.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace {

struct Config {
  std::string name;
  bool deepseek = false;
  int T = 0, H = 0, F = 0, E = 0, k = 0;
  int shared_F = 0;
  int n_group = 1, topk_group = 1;
  int repeats = 3;
};

Config mixtral(const std::string& name, int T, int repeats, int F = 3584, int E = 8) {
  Config c;
  c.name = name;
  c.T = T;
  c.H = 1024;
  c.F = F;
  c.E = E;
  c.k = 2;
  c.repeats = repeats;
  return c;
}

// The same configurations as bench/kmoe_bench.cpp (all_configs) and bench/hf_peer.py.
std::vector<Config> all_configs() {
  std::vector<Config> list{mixtral("mixtral-prefill", 4096, 3)};
  Config d;
  d.name = "deepseek-prefill";
  d.deepseek = true;
  d.T = 4096;
  d.H = 1024;
  d.F = 256;
  d.E = 64;
  d.k = 6;
  d.shared_F = 512;
  d.n_group = 8;
  d.topk_group = 3;
  list.push_back(d);
  list.push_back(mixtral("decode", 8, 20));
  for (int T : {64, 256, 1024, 4096, 16384})
    list.push_back(mixtral("sweep-T-" + std::to_string(T), T, T >= 16384 ? 2 : 3));
  for (int E : {8, 32, 64, 128, 256})
    list.push_back(mixtral("sweep-E-" + std::to_string(E), 4096, 3, 512, E));
  return list;
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string machine_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      return colon == std::string::npos ? line : line.substr(colon + 2);
    }
  return "unknown";
}

// N(0, std) values from splitmix64 + Box-Muller: the values only need kmoe_bench's
// distribution (weights 0.02, inputs 1.0), and a mt19937 would take seconds per GB here.
void fill_normal(std::vector<float>& v, float std_dev, std::uint64_t seed) {
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  const auto next = [&s] {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return double((z ^ (z >> 31)) >> 11) * 0x1.0p-53;
  };
  for (std::size_t i = 0; i < v.size(); i += 2) {
    const double r = std::sqrt(-2.0 * std::log(1.0 - next())), a = 6.283185307179586 * next();
    v[i] = float(r * std::cos(a)) * std_dev;
    if (i + 1 < v.size()) v[i + 1] = float(r * std::sin(a)) * std_dev;
  }
}

// Writes float values into a tensor of any of the measured types, converting as
// llama-quantize / convert_hf_to_gguf would (row-wise; Q8_0 blocks of 32 along a row).
void set_weights(ggml_tensor* t, const std::vector<float>& v) {
  const int64_t n_per_row = t->ne[0], rows = ggml_nelements(t) / n_per_row;
  std::vector<std::uint8_t> buf(ggml_nbytes(t));
  switch (t->type) {
    case GGML_TYPE_F32:
      std::memcpy(buf.data(), v.data(), buf.size());
      break;
    case GGML_TYPE_F16:
      ggml_fp32_to_fp16_row(v.data(), reinterpret_cast<ggml_fp16_t*>(buf.data()), v.size());
      break;
    case GGML_TYPE_BF16:
      ggml_fp32_to_bf16_row(v.data(), reinterpret_cast<ggml_bf16_t*>(buf.data()), v.size());
      break;
    default:
      ggml_quantize_chunk(t->type, v.data(), buf.data(), 0, rows, n_per_row, nullptr);
  }
  ggml_backend_tensor_set(t, buf.data(), 0, buf.size());
}

struct Weights {
  ggml_tensor *x, *gate_inp, *exp_probs_b = nullptr;
  ggml_tensor *up_exps, *gate_exps, *down_exps;
  ggml_tensor *up_shexp = nullptr, *gate_shexp = nullptr, *down_shexp = nullptr;
};

// llm_graph_context::build_moe_ffn with the arguments llama.cpp's Mixtral (softmax, norm_w)
// and DeepSeek-V3 (sigmoid, exp_probs_b, expert groups, norm_w, w_scale) graphs pass, the
// branches for other architectures left out; then DeepSeek's shared expert (build_ffn with
// LLM_FFN_SILU, LLM_FFN_PAR) added to the routed output, as src/models/deepseek2.cpp does.
ggml_tensor* build_moe_ffn(ggml_context* ctx, ggml_cgraph* gf, const Config& c, const Weights& w) {
  const int64_t n_embd = c.H, n_tokens = c.T, n_expert = c.E, n_expert_used = c.k;
  ggml_tensor* cur = w.x;
  ggml_tensor* logits = ggml_mul_mat(ctx, w.gate_inp, cur);  // [n_expert, n_tokens]
  ggml_tensor* probs = c.deepseek ? ggml_sigmoid(ctx, logits) : ggml_soft_max(ctx, logits);
  ggml_tensor* selection_probs = probs;
  if (w.exp_probs_b) selection_probs = ggml_add(ctx, probs, w.exp_probs_b);
  if (c.n_group > 1) {
    // Group score: sum of the two best experts of each group; keep topk_group groups.
    const int64_t n_exp_per_group = n_expert / c.n_group;
    ggml_tensor* groups =
        ggml_reshape_3d(ctx, selection_probs, n_exp_per_group, c.n_group, n_tokens);
    ggml_tensor* scores = ggml_argsort_top_k(ctx, groups, 2);
    scores = ggml_get_rows(
        ctx, ggml_reshape_4d(ctx, groups, 1, groups->ne[0], groups->ne[1], groups->ne[2]), scores);
    scores = ggml_sum_rows(ctx, ggml_reshape_3d(ctx, scores, scores->ne[1], scores->ne[2],
                                                scores->ne[3]));
    scores = ggml_reshape_2d(ctx, scores, scores->ne[1], scores->ne[2]);
    ggml_tensor* kept = ggml_argsort_top_k(ctx, scores, c.topk_group);
    selection_probs = ggml_get_rows(ctx, groups, kept);
    selection_probs = ggml_set_rows(ctx, ggml_fill(ctx, groups, -INFINITY), selection_probs, kept);
    selection_probs = ggml_reshape_2d(ctx, selection_probs, n_expert, n_tokens);
  }
  ggml_tensor* selected = ggml_argsort_top_k(ctx, selection_probs, n_expert_used);
  probs = ggml_reshape_3d(ctx, probs, 1, n_expert, n_tokens);
  ggml_tensor* weights = ggml_get_rows(ctx, probs, selected);  // [1, n_expert_used, n_tokens]
  weights = ggml_reshape_2d(ctx, weights, n_expert_used, n_tokens);
  ggml_tensor* weights_sum = ggml_sum_rows(ctx, weights);
  weights_sum = ggml_clamp(ctx, weights_sum, 6.103515625e-5f, INFINITY);
  weights = ggml_div(ctx, weights, weights_sum);
  weights = ggml_reshape_3d(ctx, weights, 1, n_expert_used, n_tokens);
  if (c.deepseek) weights = ggml_scale(ctx, weights, 2.5f);
  ggml_build_forward_expand(gf, weights);

  cur = ggml_reshape_3d(ctx, cur, n_embd, 1, n_tokens);
  ggml_tensor* up = ggml_mul_mat_id(ctx, w.up_exps, cur, selected);  // [F, k, n_tokens]
  ggml_tensor* gate = ggml_mul_mat_id(ctx, w.gate_exps, cur, selected);
  ggml_tensor* act = ggml_swiglu_split(ctx, gate, up);
  ggml_tensor* experts = ggml_mul_mat_id(ctx, w.down_exps, act, selected);  // [H, k, T]
  experts = ggml_mul(ctx, experts, weights);
  ggml_build_forward_expand(gf, experts);
  std::vector<ggml_tensor*> views;
  for (int64_t i = 0; i < n_expert_used; ++i) {
    views.push_back(
        ggml_view_2d(ctx, experts, n_embd, n_tokens, experts->nb[2], i * experts->nb[1]));
    ggml_build_forward_expand(gf, views.back());
  }
  ggml_tensor* out = views[0];
  for (int64_t i = 1; i < n_expert_used; ++i) {
    out = ggml_add(ctx, out, views[i]);
    ggml_build_forward_expand(gf, out);
  }
  if (w.up_shexp) {
    ggml_tensor* s_up = ggml_mul_mat(ctx, w.up_shexp, w.x);
    ggml_tensor* s_gate = ggml_mul_mat(ctx, w.gate_shexp, w.x);
    ggml_tensor* s = ggml_mul_mat(ctx, w.down_shexp, ggml_swiglu_split(ctx, s_gate, s_up));
    out = ggml_add(ctx, out, s);
  }
  ggml_build_forward_expand(gf, out);
  return out;
}

struct Result {
  Config c;
  ggml_type type;
  double layer_ms = -1;
  double weight_bytes = 0;
};

bool measure(const Config& c, ggml_type type, ggml_backend_t backend, Result& r) {
  const std::size_t n_tensors = 16;
  ggml_init_params wp{ggml_tensor_overhead() * n_tensors, nullptr, true};
  ggml_context* wctx = ggml_init(wp);
  Weights w;
  w.x = ggml_new_tensor_2d(wctx, GGML_TYPE_F32, c.H, c.T);
  w.gate_inp = ggml_new_tensor_2d(wctx, GGML_TYPE_F32, c.H, c.E);
  if (c.deepseek) w.exp_probs_b = ggml_new_tensor_1d(wctx, GGML_TYPE_F32, c.E);
  w.up_exps = ggml_new_tensor_3d(wctx, type, c.H, c.F, c.E);
  w.gate_exps = ggml_new_tensor_3d(wctx, type, c.H, c.F, c.E);
  w.down_exps = ggml_new_tensor_3d(wctx, type, c.F, c.H, c.E);
  if (c.shared_F > 0) {
    w.up_shexp = ggml_new_tensor_2d(wctx, type, c.H, c.shared_F);
    w.gate_shexp = ggml_new_tensor_2d(wctx, type, c.H, c.shared_F);
    w.down_shexp = ggml_new_tensor_2d(wctx, type, c.shared_F, c.H);
  }
  ggml_backend_buffer_t wbuf = ggml_backend_alloc_ctx_tensors(wctx, backend);
  std::uint64_t seed = 1;
  for (ggml_tensor* t = ggml_get_first_tensor(wctx); t; t = ggml_get_next_tensor(wctx, t)) {
    std::vector<float> v(ggml_nelements(t));
    // kmoe_bench's scales: inputs N(0, 1), every parameter N(0, 0.02) (the bias too).
    fill_normal(v, t == w.x ? 1.0f : 0.02f, seed++);
    set_weights(t, v);
    if (t != w.x && t != w.gate_inp && t != w.exp_probs_b) r.weight_bytes += ggml_nbytes(t);
  }

  ggml_init_params gp{ggml_tensor_overhead() * GGML_DEFAULT_GRAPH_SIZE + ggml_graph_overhead(),
                      nullptr, true};
  ggml_context* gctx = ggml_init(gp);
  ggml_cgraph* gf = ggml_new_graph(gctx);
  build_moe_ffn(gctx, gf, c, w);
  bool supported = true;
  for (int i = 0; i < ggml_graph_n_nodes(gf); ++i)
    supported = supported && ggml_backend_supports_op(backend, ggml_graph_node(gf, i));
  if (supported) {
    ggml_gallocr_t galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend));
    ggml_gallocr_alloc_graph(galloc, gf);
    // One warm-up compute (thread start-up, first touch of the work buffers), then the
    // median of the timed ones; CPU compute is synchronous, so each call is complete.
    ggml_backend_graph_compute(backend, gf);
    std::vector<double> t;
    for (int i = 0; i < c.repeats; ++i) {
      const double start = now_ms();
      ggml_backend_graph_compute(backend, gf);
      t.push_back(now_ms() - start);
    }
    r.layer_ms = median(t);
    ggml_gallocr_free(galloc);
  }
  ggml_free(gctx);
  ggml_backend_buffer_free(wbuf);
  ggml_free(wctx);
  return supported;
}

void write_json(const std::string& path, const std::vector<Result>& results, int threads,
                const std::string& machine) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (!f) {
    std::fprintf(stderr, "ggml_moe_peer: cannot write %s\n", path.c_str());
    std::exit(1);
  }
  std::fprintf(f, "[\n");
  for (std::size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    const Config& c = r.c;
    std::fprintf(f,
                 "  {\"name\": \"%s\", \"implementation\": \"ggml-%s\", \"weight_type\": \"%s\", "
                 "\"T\": %d, \"H\": %d, \"F\": %d, \"E\": %d, \"k\": %d, \"shared_F\": %d, "
                 "\"threads\": %d, \"backend\": \"ggml %s (%s) cpu\", \"machine\": \"%s\", "
                 "\"repeats\": %d, \"layer_ms\": %.6g, \"layer_fwdbwd_ms\": null, "
                 "\"backward_ms\": null, \"expert_weight_bytes\": %.6g}%s\n",
                 c.name.c_str(), ggml_type_name(r.type), ggml_type_name(r.type), c.T, c.H, c.F, c.E,
                 c.k, c.shared_F, threads, ggml_version(), ggml_commit(), machine.c_str(),
                 c.repeats, r.layer_ms, r.weight_bytes, i + 1 < results.size() ? "," : "");
  }
  std::fprintf(f, "]\n");
  std::fclose(f);
}

void usage() {
  std::fprintf(stderr, "usage: ggml_moe_peer [--config NAME]... [--type f32|f16|bf16|q8_0]... "
                       "[--threads N] [--repeats N] [--json FILE]\n"
                       "  NAME: a configuration, or a prefix of several (sweep-T, sweep-E);\n"
                       "  default: every configuration, every type\n");
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> wanted;
  std::vector<ggml_type> types;
  std::string json;
  int threads = 2, repeats = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a == "--config" && has_value) {
      wanted.push_back(argv[++i]);
    } else if (a == "--type" && has_value) {
      const std::string t = argv[++i];
      const ggml_type known[] = {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0};
      const auto it = std::find_if(std::begin(known), std::end(known),
                                   [&](ggml_type k) { return t == ggml_type_name(k); });
      if (it == std::end(known)) {
        usage();
        return 2;
      }
      types.push_back(*it);
    } else if (a == "--threads" && has_value) {
      threads = std::atoi(argv[++i]);
    } else if (a == "--repeats" && has_value) {
      repeats = std::atoi(argv[++i]);
    } else if (a == "--json" && has_value) {
      json = argv[++i];
    } else {
      usage();
      return a == "--help" || a == "-h" ? 0 : 2;
    }
  }
  if (types.empty()) types = {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0};
  std::vector<Config> configs;
  for (Config c : all_configs()) {
    bool take = wanted.empty();
    for (const auto& w : wanted) take = take || c.name == w || c.name.rfind(w + "-", 0) == 0;
    if (repeats > 0) c.repeats = repeats;
    if (take) configs.push_back(c);
  }
  if (configs.empty()) {
    std::fprintf(stderr, "ggml_moe_peer: no configuration matches\n");
    return 2;
  }

  ggml_backend_t backend = ggml_backend_cpu_init();
  ggml_backend_cpu_set_n_threads(backend, threads);
  const std::string machine = machine_name();
  std::printf("machine: %s\nggml %s (%s), CPU backend, %d threads\n\n", machine.c_str(),
              ggml_version(), ggml_commit(), threads);
  std::printf("%-18s %6s %5s %5s %4s %2s %5s | %9s\n", "config", "T", "H", "F", "E", "k", "type",
              "fwd_ms");
  std::vector<Result> results;
  for (const auto& c : configs)
    for (ggml_type type : types) {
      Result r;
      r.c = c;
      r.type = type;
      if (!measure(c, type, backend, r)) {
        std::printf("%-18s %6d %5d %5d %4d %2d %5s | not supported by this CPU backend\n",
                    c.name.c_str(), c.T, c.H, c.F, c.E, c.k, ggml_type_name(type));
        continue;
      }
      results.push_back(r);
      std::printf("%-18s %6d %5d %5d %4d %2d %5s | %9.2f\n", c.name.c_str(), c.T, c.H, c.F, c.E,
                  c.k, ggml_type_name(type), r.layer_ms);
      std::fflush(stdout);
      if (!json.empty()) write_json(json, results, threads, machine);
    }
  ggml_backend_free(backend);
  return 0;
}
