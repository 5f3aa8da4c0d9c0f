// SPDX-License-Identifier: BSD-3-Clause
// kmoe-run: runs the MoE block of one decoder layer of a Hugging Face checkpoint (the
// families of docs/models.md) on hidden states read from a safetensors file, writes the output
// and the routing, and optionally the backward pass's gradients under checkpoint names.
// docs/models.md shows a run.

#include <kmoe/kmoe.hpp>
#include <kmoe/models/hf.hpp>
#include <kmoe/models/hf_resident.hpp>
#include <kmoe/models/hf_weight_only.hpp>
#include <kmoe/monitoring/peak_memory.hpp>
#include <kmoe/monitoring/stats_log.hpp>

#if defined(KOKKOS_ENABLE_OPENMP)
#include <omp.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <functional>
#include <iostream>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace {

namespace io = kmoe::io;
namespace models = kmoe::models;

const char* const usage_text =
    R"(usage: kmoe-run --model DIR --layer L --input X --output Y
                [--grad-output G --grads GRADS] [--threads N] [--bench [--repeats R]]
                [--dtype f32|f64|bf16|fp16|int8] [--activations f32|bf16|fp16]
                [--output-dtype f32|bf16|fp16]
                [--stats-jsonl FILE]
                [--max-resident-experts N] [--memory-budget BYTES]

Runs the MoE block of decoder layer L of the Hugging Face model in DIR (config.json and
model.safetensors or model.safetensors.index.json; a model_type docs/models.md lists:
Mixtral, Qwen3-MoE, DeepSeek-V2/V3 and the families sharing their blocks; experts stored
per expert or fused, as transformers 4.x and 5.x write them) on the hidden states in X.

  --model DIR        model directory
  --layer L          decoder layer index (must be an MoE layer)
  --input X          safetensors file with "hidden_states" [T, H] (F16, BF16, F32 or F64)
  --output Y         written: "hidden_states" [T, H] (--output-dtype), "router_logits"
                     [T, E] (F32), "topk_indices" [T, k] (I64), "topk_weights" [T, k]
                     (F32); each top-k row is ordered by decreasing weight, ties by increasing index (the
                     Hugging Face fixtures' order; for DeepSeek-V3 the biased selection
                     order can differ from the weight order)
  --grad-output G    safetensors file with "hidden_states" [T, H] = dLoss/dOutput; runs a
                     training forward and the backward pass (needs --grads)
  --grads GRADS      written: "hidden_states" = dLoss/dInput and the gradient of every
                     trainable block tensor under its checkpoint name, in the layout the
                     checkpoint uses (per expert, e.g.
                     model.layers.1.block_sparse_moe.experts.3.w1.weight, or fused, e.g.
                     model.layers.1.mlp.experts.gate_up_proj [E, 2F, H]), F32
  --threads N        host threads for Kokkos (default: Kokkos' own choice)
  --bench            also time forward (and forward + backward with --grad-output) and
                     print the median over the repeats
  --repeats R        repeats for --bench (default 20)
  --dtype D          f32 (default) or f64: the layer's float type; bf16, fp16, int8:
                     f32 activations with the routed and shared experts' weights stored
                     as bf16, fp16 or INT8 (per output channel) from load on (inference
                     only: not with --grad-output; GLU experts only); --double is f64
  --activations A    f32 (default with f32, bf16, fp16, int8): float activations, the
                     experts' weights in --dtype; bf16 or fp16 (with --dtype of the same
                     name): the whole block stored in 16 bits, weights, router weight,
                     activations and exchanges, read straight from the checkpoint (a BF16
                     checkpoint bit for bit) with no float copy of any tensor; products and
                     routing accumulate in float (docs/precision.md). Inference only: not
                     with --grad-output, --max-resident-experts or --memory-budget (GPT-OSS's
                     clamped SwiGLU experts too)
  --output-dtype D   the dtype of the output's "hidden_states": f32, bf16 or fp16 (rounded
                     to nearest even; from a 16-bit block, f32 is exact); default the
                     storage dtype of --dtype (bf16 for bf16, fp16 for fp16, else f32)
  --stats-jsonl FILE write one monitoring line per forward (kmoe::StatsLog: tokens per
                     expert, load spread, drops, phase times, bytes per peer, peak memory;
                     docs/placement.md); with --bench every timed forward is logged too,
                     and phase timing adds a fence per phase to the timed runs
  --max-resident-experts N
                     keep at most N routed experts in memory: the others stay in the
                     checkpoint and are read (one expert's tensors, not the file) when
                     a batch chooses them, evicting the least recently used; the output
                     is bit for bit the all-resident run's. Inference only. A batch
                     choosing more than N distinct experts fails naming the budget
  --memory-budget BYTES
                     the same with a budget in bytes of resident expert weights (in the
                     compute type); with both, the smaller count applies. Prints the
                     hits, misses, bytes read and the peak resident memory (docs/memory.md)
  --help             this text

Inputs are validated before anything is written: both files must be regular files holding
finite "hidden_states" of the model's width with the same number of rows, and --threads
must not exceed the backend's limit. Outputs are written to temporary files next to them
and renamed into place only when the whole run (and every output's finiteness check) has
succeeded, so a failed run leaves earlier outputs untouched.

Exit status: 0 on success, 1 if the run fails (the message says why), 2 for bad arguments.
)";

/// Host threads the Kokkos backend can run: Kokkos' OpenMP backend keeps a fixed pool of
/// 512 thread slots (OpenMPExec::MAX_THREAD_COUNT in Kokkos 3, the same 512 in Kokkos 4)
/// and writes past it when asked for more.
#if defined(KOKKOS_ENABLE_OPENMP) && KOKKOS_VERSION < 40000
constexpr int max_host_threads = Kokkos::Impl::OpenMPExec::MAX_THREAD_COUNT;
#elif defined(KOKKOS_ENABLE_OPENMP)
constexpr int max_host_threads = 512;
#elif defined(KOKKOS_ENABLE_THREADS) && KOKKOS_VERSION < 40000
constexpr int max_host_threads = Kokkos::Impl::ThreadsExec::MAX_THREAD_COUNT;
#else
constexpr int max_host_threads = std::numeric_limits<int>::max();
#endif

struct Options {
  std::string model, input, output, grad_output, grads, stats_jsonl;
  int layer = -1;
  int threads = -1;
  int repeats = 20;
  kmoe::ResidencyBudget budget;  ///< experts and bytes both 0: every expert resident
  bool bench = false;
  std::string dtype = "f32";  ///< f32, f64, bf16, fp16 or int8
  std::string activations;    ///< f32, bf16 or fp16; empty: f32 (f64 with --dtype f64)
  std::string output_dtype;   ///< f32, bf16 or fp16; empty: the storage dtype of `dtype`
};

struct UsageError {
  std::string message;
};

int parse_int(const std::string& flag, const std::string& text, int minimum) {
  std::size_t used = 0;
  long value = 0;
  try {
    value = std::stol(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || text.empty() || value < minimum || value > 0x7fffffff)
    throw UsageError{flag + " needs an integer >= " + std::to_string(minimum) + ", got '" + text +
                     "'"};
  return int(value);
}

std::int64_t parse_bytes(const std::string& flag, const std::string& text) {
  std::size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || text.empty() || value < 1)
    throw UsageError{flag + " needs a positive byte count, got '" + text + "'"};
  return value;
}

bool residency(const Options& o) { return o.budget.experts > 0 || o.budget.bytes > 0; }

/// --activations bf16 or fp16: the whole block in 16 bits (not weight-only experts).
bool sixteen_bit_block(const Options& o) {
  return o.activations == "bf16" || o.activations == "fp16";
}

bool same_file(const std::string& a, const std::string& b) {
  std::error_code ec_a, ec_b;
  const auto canonical_a = std::filesystem::weakly_canonical(a, ec_a);
  const auto canonical_b = std::filesystem::weakly_canonical(b, ec_b);
  return ec_a || ec_b ? a == b : canonical_a == canonical_b;
}

/// Returns false when --help was asked for.
bool parse(int argc, char** argv, Options& o) {
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") return false;
    if (flag == "--bench") {
      o.bench = true;
      continue;
    }
    if (flag == "--double") {
      o.dtype = "f64";
      continue;
    }
    if (i + 1 >= argc) throw UsageError{flag + " needs a value"};
    const std::string value = argv[++i];
    if (flag == "--model")
      o.model = value;
    else if (flag == "--layer")
      o.layer = parse_int(flag, value, 0);
    else if (flag == "--input")
      o.input = value;
    else if (flag == "--output")
      o.output = value;
    else if (flag == "--grad-output")
      o.grad_output = value;
    else if (flag == "--grads")
      o.grads = value;
    else if (flag == "--threads")
      o.threads = parse_int(flag, value, 1);
    else if (flag == "--repeats")
      o.repeats = parse_int(flag, value, 1);
    else if (flag == "--stats-jsonl")
      o.stats_jsonl = value;
    else if (flag == "--dtype")
      o.dtype = value;
    else if (flag == "--output-dtype")
      o.output_dtype = value;
    else if (flag == "--activations")
      o.activations = value;
    else if (flag == "--max-resident-experts")
      o.budget.experts = parse_int(flag, value, 1);
    else if (flag == "--memory-budget")
      o.budget.bytes = parse_bytes(flag, value);
    else
      throw UsageError{"unknown argument '" + flag + "'"};
  }
  if (o.model.empty()) throw UsageError{"--model is required"};
  if (o.layer < 0) throw UsageError{"--layer is required"};
  if (o.input.empty()) throw UsageError{"--input is required"};
  if (o.output.empty()) throw UsageError{"--output is required"};
  if (o.grad_output.empty() != o.grads.empty())
    throw UsageError{"--grad-output and --grads go together"};
  const bool weight_only = o.dtype == "bf16" || o.dtype == "fp16" || o.dtype == "int8";
  if (o.dtype != "f32" && o.dtype != "f64" && !weight_only)
    throw UsageError{"--dtype must be f32, f64, bf16, fp16 or int8, got '" + o.dtype + "'"};
  if (o.output_dtype.empty())
    o.output_dtype = o.dtype == "bf16" || o.dtype == "fp16" ? o.dtype : "f32";
  if (o.output_dtype != "f32" && o.output_dtype != "bf16" && o.output_dtype != "fp16")
    throw UsageError{"--output-dtype must be f32, bf16 or fp16, got '" + o.output_dtype + "'"};
  if (!o.activations.empty() && o.activations != "f32" && o.activations != "bf16" &&
      o.activations != "fp16")
    throw UsageError{"--activations must be f32, bf16 or fp16, got '" + o.activations + "'"};
  if (o.activations == "f32" && o.dtype == "f64")
    throw UsageError{"--activations f32 does not go with --dtype f64, whose layer computes in "
                     "double"};
  const bool sixteen_bit = sixteen_bit_block(o);
  if (sixteen_bit && o.dtype != o.activations)
    throw UsageError{"--activations " + o.activations + " needs --dtype " + o.activations +
                     " (the whole block is stored in " + o.activations + "), got --dtype " +
                     o.dtype};
  if (sixteen_bit && !o.grad_output.empty())
    throw UsageError{"--activations " + o.activations +
                     " is inference only: it does not take --grad-output"};
  if (sixteen_bit && residency(o))
    throw UsageError{"--activations " + o.activations +
                     " loads every expert; it does not combine with --max-resident-experts or "
                     "--memory-budget"};
  if (weight_only && !o.grad_output.empty())
    throw UsageError{"--dtype " + o.dtype + " is inference only: it does not take --grad-output"};
  if (residency(o) && !o.grad_output.empty())
    throw UsageError{"--max-resident-experts and --memory-budget are for inference: the "
                     "checkpoint holds no optimizer state (drop --grad-output)"};
  if (weight_only && residency(o))
    throw UsageError{"--dtype " + o.dtype +
                     " packs experts that are all resident; it does not combine with "
                     "--max-resident-experts or --memory-budget"};
  if (!o.grads.empty() && same_file(o.output, o.grads))
    throw UsageError{"--output and --grads name the same file '" + o.output + "'"};
  return true;
}

/// Reads "hidden_states" [T, H] from `path` into a new device matrix; every element must
/// be finite (a NaN gradient would otherwise flow into every output with exit 0).
template <class S, class X>
kmoe::Matrix<S, X> read_hidden(const std::string& path, const models::MoEBlockConfig& b) {
  const io::SafetensorsFile file(path);
  const auto& shape = file.info("hidden_states").shape;
  if (shape.size() != 2 || shape[1] != b.hidden)
    throw kmoe::runtime_error("kmoe-run: " + path + ": \"hidden_states\" has shape " +
                              models::detail::shape_string(shape) + ", must be [T, " +
                              std::to_string(b.hidden) + "] for this model");
  // The layer's [T, H] and [T, E] matrices must fit, as the loader's do.
  const std::string where = "kmoe-run: " + path;
  kmoe::detail::checked_mul(shape[0], b.hidden, where.c_str(), "tokens x hidden_size",
                            models::max_matrix_elements);
  kmoe::detail::checked_mul(shape[0], b.experts, where.c_str(), "tokens x experts",
                            models::max_matrix_elements);
  kmoe::Matrix<S, X> m("hidden_states", shape[0], shape[1]);
  auto host = Kokkos::create_mirror_view(m);
  file.read_into(std::string("hidden_states"), host.data(), host.size());
  for (std::size_t t = 0; t < host.extent(0); ++t)
    for (std::size_t h = 0; h < host.extent(1); ++h)
      if (!std::isfinite(host(t, h)))
        throw kmoe::runtime_error("kmoe-run: " + path + ": \"hidden_states\" element (" +
                                  std::to_string(t) + ", " + std::to_string(h) +
                                  ") = " + std::to_string(host(t, h)) + " is not finite");
  Kokkos::deep_copy(m, host);
  return m;
}

/// The largest finite value of a file dtype (F16: 65504; BF16: 0x7F7F, just below float's).
inline double largest_finite(io::DType dtype) {
  if (dtype == io::DType::F16) return 65504.0;
  if (dtype == io::DType::BF16) return double(io::bfloat16_bits_to_float(0x7F7F));
  return double(std::numeric_limits<float>::max());
}

/// Raises unless each of the `count` results at `data` is finite and within the range of
/// `dtype` (the file's): a run whose inputs overflow must fail rather than write non-finite
/// results with exit 0.
template <class S>
void require_finite(const S* data, std::size_t count, const std::string& what,
                    io::DType dtype = io::DType::F32) {
  for (std::size_t i = 0; i < count; ++i)
    if (!std::isfinite(data[i]) || std::abs(double(data[i])) > largest_finite(dtype))
      throw kmoe::runtime_error("kmoe-run: " + what + " element " + std::to_string(i) + " = " +
                                std::to_string(double(data[i])) + " is not finite in " +
                                io::dtype_name(dtype) +
                                " (inputs too large?); nothing was written");
}

template <class View>
std::vector<std::int64_t> shape_of(const View& v) {
  return {std::int64_t(v.extent(0)), std::int64_t(v.extent(1))};
}

/// Adds `v` in `dtype` (rounded to nearest even for BF16 and F16).
template <class View>
void add_values(io::SafetensorsWriter& writer, const std::string& name, const View& v,
                const std::string& what, io::DType dtype = io::DType::F32) {
  const auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  require_finite(host.data(), host.size(), what, dtype);
  writer.add(name, dtype, shape_of(v), host.data());
}

inline io::DType file_dtype(const std::string& output_dtype) {
  return output_dtype == "bf16" ? io::DType::BF16
                                : (output_dtype == "fp16" ? io::DType::F16 : io::DType::F32);
}

/// The plan's slots are in selection order (decreasing selection score); the files use the
/// Hugging Face fixtures' order, decreasing weight with ties by increasing index, which
/// differs from selection order when DeepSeek-V3's bias reorders the experts.
template <class Plan>
void add_topk(io::SafetensorsWriter& writer, const Plan& plan) {
  const auto expert = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plan.expert);
  const auto weight = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plan.weight);
  const std::size_t tokens = expert.extent(0), k = expert.extent(1);
  std::vector<std::int64_t> indices(tokens * k);
  std::vector<float> weights(tokens * k);
  std::vector<std::size_t> order(k);
  for (std::size_t t = 0; t < tokens; ++t) {
    std::iota(order.begin(), order.end(), std::size_t(0));
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      if (weight(t, a) != weight(t, b)) return weight(t, a) > weight(t, b);
      return expert(t, a) < expert(t, b);
    });
    for (std::size_t j = 0; j < k; ++j) {
      indices[t * k + j] = expert(t, order[j]);
      weights[t * k + j] = float(weight(t, order[j]));
    }
  }
  const std::vector<std::int64_t> shape{std::int64_t(tokens), std::int64_t(k)};
  writer.add("topk_indices", io::DType::I64, shape, indices);
  writer.add("topk_weights", io::DType::F32, shape, weights);
}

template <class Step>
double median_ms(int repeats, const Step& step) {
  std::vector<double> ms;
  step();  // warm-up: first-call allocations are not part of the steady state
  for (int r = 0; r < repeats; ++r) {
    Kokkos::fence();
    const auto start = std::chrono::steady_clock::now();
    step();
    Kokkos::fence();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                     .count());
  }
  std::sort(ms.begin(), ms.end());
  return ms.size() % 2 ? ms[ms.size() / 2] : 0.5 * (ms[ms.size() / 2 - 1] + ms[ms.size() / 2]);
}

/// Whether the layer has a backward pass here: weight-only experts are inference only, and
/// a 16-bit block is loaded for inference (no gradient buffers).
template <class Layer>
constexpr bool trainable = !kmoe::is_packed_float_v<typename Layer::scalar_type>;
template <class R, class X, class S, class P, class A, class G, class C, class M>
constexpr bool trainable<kmoe::MoELayer<R, kmoe::PackedGLUExperts<X, S, P, A, G>, C, M>> = false;

template <class Experts>
using residency_stats_of = decltype(std::declval<const Experts&>().residency_stats());

template <class Layer>
void run(Layer& layer, const models::MoEBlockConfig& b, const Options& o) {
  using X = typename Layer::execution_space;
  using S = typename Layer::scalar_type;
  const bool training = !o.grad_output.empty();
  // Every input is read and checked before the first output is touched.
  const auto x = read_hidden<S, X>(o.input, b);
  const int tokens = int(x.extent(0));
  kmoe::Matrix<S, X> grad_y, grad_x;
  if (training) {
    grad_y = read_hidden<S, X>(o.grad_output, b);
    if (grad_y.extent(0) != x.extent(0))
      throw kmoe::runtime_error("kmoe-run: " + o.grad_output + ": \"hidden_states\" has " +
                                std::to_string(grad_y.extent(0)) + " rows, the input " +
                                std::to_string(tokens));
  }
  kmoe::Matrix<S, X> y("output", tokens, b.hidden);
  kmoe::RouteContext<X> context;
  context.training = training;

  // The log is opened before the first forward, so a path it cannot write fails first.
  std::optional<kmoe::StatsLog> stats_log;
  if (!o.stats_jsonl.empty()) {
    stats_log.emplace(o.stats_jsonl, kmoe::StatsLogContext{0, b.hidden, sizeof(S)});
    layer.set_phase_timing(true);
  }
  const std::string block = b.prefix.substr(0, b.prefix.empty() ? 0 : b.prefix.size() - 1);
  std::int64_t step = 0;

  layer.zero_gradients();
  const kmoe::ForwardStats stats = layer.forward(x, y, context);
  if (stats_log) stats_log->write(step++, block, stats);
  const std::string source = "kmoe-run " + b.model_type + " layer " + std::to_string(b.layer);
  io::SafetensorsWriter output;
  output.set_metadata("source", source);
  add_values(output, "hidden_states", y, "the block's output", file_dtype(o.output_dtype));
  add_values(output, "router_logits", layer.routing().logits, "the router logits");
  add_topk(output, layer.routing());

  std::optional<io::SafetensorsWriter> grads;
  if constexpr (trainable<Layer>)
    if (training) {
      grad_x = kmoe::Matrix<S, X>("grad_input", tokens, b.hidden);
      layer.backward(grad_y, grad_x);
      grads.emplace();
      grads->set_metadata("source", source);
      add_values(*grads, "hidden_states", grad_x, "the input gradient");
      models::visit_checkpoint_tensors(
          layer, b, true,
          [&](const std::string& name, const std::vector<std::int64_t>& shape, const S* data) {
            const auto count = std::accumulate(shape.begin(), shape.end(), std::int64_t(1),
                                               std::multiplies<std::int64_t>());
            require_finite(data, std::size_t(count), "the gradient of " + name);
            grads->add(name, io::DType::F32, shape, data);
          });
    }
  // Both files are complete on disk before either replaces its destination.
  io::StagedFile staged_output = output.stage(o.output);
  std::optional<io::StagedFile> staged_grads;
  if (grads) staged_grads.emplace(grads->stage(o.grads));
  staged_output.commit();
  if (staged_grads) staged_grads->commit();

  std::printf("model %s, layer %d (%s experts): T=%d H=%d experts=%d top-k=%d%s, %s\n",
              b.model_type.c_str(), b.layer, models::layout_name(b.layout), tokens, b.hidden,
              b.experts, b.top_k, b.shared_ffn > 0 ? " +shared" : "",
              o.dtype == "f64"
                  ? "double"
                  : (o.dtype == "f32"
                         ? "float"
                         : (o.dtype +
                            (sixteen_bit_block(o) ? " weights and activations" : " expert weights"))
                               .c_str()));
  std::printf("tokens per expert:");
  for (auto c : stats.tokens_per_expert) std::printf(" %lld", static_cast<long long>(c));
  std::printf(" (imbalance %.3f)\nwrote %s\n", stats.imbalance(), o.output.c_str());
  if constexpr (kmoe::detail::is_detected_v<residency_stats_of, decltype(layer.experts())>) {
    const auto& experts = layer.experts();
    const kmoe::ResidencyStats& r = experts.residency_stats();
    std::printf("residency: %d of %d experts resident (%lld bytes each), hits %lld, misses %lld, "
                "%lld bytes read from the checkpoint\n",
                experts.slots(), experts.num_experts(),
                static_cast<long long>(experts.expert_bytes()), static_cast<long long>(r.hits),
                static_cast<long long>(r.misses), static_cast<long long>(r.store_bytes));
  }
  std::printf("peak resident memory: %lld bytes\n",
              static_cast<long long>(kmoe::peak_resident_bytes()));
  if (training) std::printf("wrote %s\n", o.grads.c_str());

  if (o.bench) {
    kmoe::RouteContext<X> inference;
    const double fwd = median_ms(o.repeats, [&] {
      const auto timed = layer.forward(x, y, inference);
      if (stats_log) stats_log->write(step++, block, timed);
    });
    std::printf("forward: median %.3f ms over %d repeats\n", fwd, o.repeats);
    if constexpr (trainable<Layer>)
      if (training) {
        const double fwd_bwd = median_ms(o.repeats, [&] {
          const auto timed = layer.forward(x, y, context);
          if (stats_log) stats_log->write(step++, block, timed);
          layer.backward(grad_y, grad_x);
        });
        std::printf("training forward + backward: median %.3f ms over %d repeats\n", fwd_bwd,
                    o.repeats);
      }
  }
}

/// The block with its experts packed to `Element` as they are read (--dtype bf16, fp16,
/// int8): no float copy of the experts is ever held.
template <class X, class Element>
void run_weight_only(const models::MoEBlockConfig& b, const Options& o) {
  using S = float;
  if (b.router == models::BlockRouter::softmax_topk) {
    auto layer =
        models::load_weight_only_block<Element, kmoe::SoftmaxTopKRouter<X, S>>(o.model, o.layer);
    run(layer, b, o);
  } else if (b.router == models::BlockRouter::topk_softmax) {
    auto layer =
        models::load_weight_only_block<Element, kmoe::TopKSoftmaxRouter<X, S>>(o.model, o.layer);
    run(layer, b, o);
  } else if (b.router == models::BlockRouter::sparse_mixer) {
    auto layer =
        models::load_weight_only_block<Element, kmoe::SparseMixerRouter<X, S>>(o.model, o.layer);
    run(layer, b, o);
  } else {
    auto layer =
        models::load_weight_only_block<Element, kmoe::SigmoidBiasRouter<X, S>>(o.model, o.layer);
    run(layer, b, o);
  }
}

/// The whole block in 16 bits (--activations bf16, fp16): every tensor read straight into
/// `Half` storage, no gradient buffers.
template <class X, class Half>
void run_sixteen_bit(const models::MoEBlockConfig& b, const Options& o) {
  if (b.expert_kind == models::BlockExperts::clamped_swiglu) {
    auto layer =
        models::load_inference_block<kmoe::TopKSoftmaxRouter<X, Half>,
                                     kmoe::ClampedSwiGLUExperts<X, Half>>(o.model, o.layer);
    run(layer, b, o);
  } else if (b.router == models::BlockRouter::softmax_topk) {
    auto layer = models::load_inference_block<kmoe::SoftmaxTopKRouter<X, Half>>(o.model, o.layer);
    run(layer, b, o);
  } else if (b.router == models::BlockRouter::topk_softmax) {
    auto layer = models::load_inference_block<kmoe::TopKSoftmaxRouter<X, Half>>(o.model, o.layer);
    run(layer, b, o);
  } else if (b.router == models::BlockRouter::sparse_mixer) {
    auto layer = models::load_inference_block<kmoe::SparseMixerRouter<X, Half>>(o.model, o.layer);
    run(layer, b, o);
  } else {
    auto layer = models::load_inference_block<kmoe::SigmoidBiasRouter<X, Half>>(o.model, o.layer);
    run(layer, b, o);
  }
}

/// The block with its routed experts left in the checkpoint, o.budget of them resident.
template <class X, class S>
void run_resident(const models::MoEBlockConfig& b, const Options& o) {
  using SwiGLU = kmoe::SwiGLUExperts<X, S>;
  if (b.expert_kind == models::BlockExperts::clamped_swiglu) {
    auto layer =
        models::load_resident_block<kmoe::TopKSoftmaxRouter<X, S>,
                                    kmoe::ClampedSwiGLUExperts<X, S>>(o.model, o.layer, o.budget);
    run(layer, b, o);
  } else if (b.router == models::BlockRouter::softmax_topk) {
    auto layer = models::load_resident_block<kmoe::SoftmaxTopKRouter<X, S>, SwiGLU>(
        o.model, o.layer, o.budget);
    run(layer, b, o);
  } else if (b.router == models::BlockRouter::topk_softmax) {
    auto layer = models::load_resident_block<kmoe::TopKSoftmaxRouter<X, S>, SwiGLU>(
        o.model, o.layer, o.budget);
    run(layer, b, o);
  } else if (b.router == models::BlockRouter::sparse_mixer) {
    auto layer = models::load_resident_block<kmoe::SparseMixerRouter<X, S>, SwiGLU>(
        o.model, o.layer, o.budget);
    run(layer, b, o);
  } else {
    auto layer = models::load_resident_block<kmoe::SigmoidBiasRouter<X, S>, SwiGLU>(
        o.model, o.layer, o.budget);
    run(layer, b, o);
  }
}

template <class S>
void dispatch(const Options& o) {
  using X = Kokkos::DefaultExecutionSpace;
  const models::MoEBlockConfig b = models::read_block(o.model, o.layer);
  const bool weight_only = o.dtype != "f32" && o.dtype != "f64" && !sixteen_bit_block(o);
  if (weight_only && b.expert_kind == models::BlockExperts::clamped_swiglu)
    throw kmoe::runtime_error("--dtype " + o.dtype + ": " + b.model_type +
                              " has clamped SwiGLU experts (GPT-OSS); weight-only experts are "
                              "GLU experts (SwiGLU) only");
  if (residency(o)) {
    run_resident<X, S>(b, o);
  } else if (sixteen_bit_block(o)) {
    if (o.activations == "bf16") run_sixteen_bit<X, kmoe::bfloat16>(b, o);
    if (o.activations == "fp16") run_sixteen_bit<X, kmoe::float16>(b, o);
  } else if (weight_only) {
    if (o.dtype == "int8") run_weight_only<X, std::int8_t>(b, o);
    if (o.dtype == "bf16") run_weight_only<X, kmoe::bfloat16>(b, o);
    if (o.dtype == "fp16") run_weight_only<X, kmoe::float16>(b, o);
  } else if (b.expert_kind == models::BlockExperts::clamped_swiglu) {
    auto layer = models::load_clamped_swiglu_block<X, S>(o.model, o.layer);
    run(layer, b, o);
  } else if (b.router == models::BlockRouter::softmax_topk) {
    auto layer = models::load_softmax_block<X, S>(o.model, o.layer);
    run(layer, b, o);
  } else if (b.router == models::BlockRouter::topk_softmax) {
    auto layer = models::load_topk_softmax_block<X, S>(o.model, o.layer);
    run(layer, b, o);
  } else if (b.router == models::BlockRouter::sparse_mixer) {
    auto layer = models::load_sparse_mixer_block<X, S>(o.model, o.layer);
    run(layer, b, o);
  } else {
    auto layer = models::load_sigmoid_bias_block<X, S>(o.model, o.layer);
    run(layer, b, o);
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  try {
    if (!parse(argc, argv, o)) {
      std::cout << usage_text;
      return 0;
    }
  } catch (const UsageError& e) {
    std::cerr << "kmoe-run: " << e.message << "\n\n" << usage_text;
    return 2;
  }
  // Checked before Kokkos starts: more threads than the backend's pool crashes inside it.
  if (o.threads > max_host_threads) {
    std::cerr << "kmoe-run: --threads " << o.threads << " exceeds the " << max_host_threads
              << " host threads the Kokkos backend supports\n";
    return 1;
  }
#if defined(KOKKOS_ENABLE_OPENMP)
  if (o.threads < 0 && omp_get_max_threads() > max_host_threads) {
    std::cerr << "kmoe-run: OMP_NUM_THREADS asks for " << omp_get_max_threads()
              << " threads, more than the " << max_host_threads
              << " host threads the Kokkos backend supports; set --threads\n";
    return 1;
  }
#endif
#if KOKKOS_VERSION >= 40000
  Kokkos::InitializationSettings settings;
  if (o.threads > 0) settings.set_num_threads(o.threads);
  Kokkos::ScopeGuard kokkos(settings);
#else
  Kokkos::InitArguments settings;
  settings.num_threads = o.threads;  // -1 lets Kokkos choose
  Kokkos::ScopeGuard kokkos(settings);
#endif
  try {
    if (o.dtype == "f64")
      dispatch<double>(o);
    else
      dispatch<float>(o);
  } catch (const std::exception& e) {
    std::cerr << "kmoe-run: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
