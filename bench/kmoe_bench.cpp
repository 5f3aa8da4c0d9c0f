// SPDX-License-Identifier: BSD-3-Clause
// kmoe_bench: times MoELayer forward / backward against the dense equivalent (the same
// expert GEMMs and activation on one weight set for all T*k assignments, through the same
// GEMM backend), timed in turn with the layer so that the machine's drift cancels in the
// ratio; with a phase breakdown and, for decode, the weight-streaming floor and the same
// layer with weight-only bf16 and INT8 experts (each timed in turn with the fp32 layer, and
// against its own floor: one read of the packed weights of the experts the batch chose), and
// for prefill-bf16 the layer with bf16 experts timed in turn with the fp32 layer.
// Usage: kmoe_bench [--config NAME]... [--repeats N] [--quick] [--json FILE]
#include <kmoe/kmoe.hpp>
#include <kmoe/quantized_layer.hpp>

#include "support/flags.hpp"
#include "support/timing.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using X = Kokkos::DefaultExecutionSpace;
using S = float;
using Experts = kmoe::SwiGLUExperts<X, S>;
using MixtralLayer = kmoe::MoELayer<kmoe::SoftmaxTopKRouter<X, S>, Experts>;
using DeepSeekLayer = kmoe::MoELayer<kmoe::SigmoidBiasRouter<X, S>, Experts>;

enum class Kind { mixtral, deepseek };

struct Config {
  std::string name;
  Kind kind = Kind::mixtral;
  int T = 0, H = 0, F = 0, E = 0, k = 0;
  int shared_F = 0;  // 0: no shared expert
  int n_group = 1, topk_group = 1;
  bool backward = true;         // also time backward and fwd+bwd
  bool decode_floor = false;    // also time the weight-streaming floor
  bool packed_prefill = false;  // also time the layer with bf16 experts (no floor)
  int repeats = 3;
};

// Unset figures print as null in the JSON and "-" in the table.
constexpr double none = -1.0;

struct Record {
  Config c;
  double layer_ms = none, layer_fwdbwd_ms = none, backward_ms = none;
  double dense_ms = none, dense_fwdbwd_ms = none;
  double route_ms = none, permute_ms = none, comm_ms = none, experts_ms = none, shared_ms = none,
         combine_ms = none;
  double floor_ms = none, floor_bytes = none;
  // Weight-only experts (decode): each packed layer and the fp32 layer timed in turn.
  struct Packed {
    double ms = none, fp32_ms = none, floor_ms = none, floor_bytes = none;
  } bf16, int8;
  int active_experts = 0;
  double imbalance = 0;
  double gflop = 0;  // expert (+ shared) GEMM FLOPs of one forward
};

using kmoe::bench::median;

double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// One warm-up call (allocations, first-touch, BLAS thread start-up), then the median of
// `repeats` timed calls, each fenced so that asynchronous backends are measured fully.
double time_ms(int repeats, const std::function<void()>& f) {
  f();
  Kokkos::fence();
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    const double start = now_ms();
    f();
    Kokkos::fence();
    t.push_back(now_ms() - start);
  }
  return median(t);
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

// Reads the given contiguous weight blocks once (a sum, so nothing is optimised away): the
// time no decode step can beat, since every activated expert's weights must be read. T is
// the stored type, Sum the type the lanes add in.
template <class T, class Sum>
double stream_ms(int repeats, const std::vector<const T*>& blocks, std::size_t block_elements) {
  constexpr std::size_t lanes = 16, chunk = 256;
  const std::size_t chunks = block_elements / chunk;
  volatile double sink = 0;
  const double ms = time_ms(repeats, [&] {
    double total = 0;
    for (const T* p : blocks) {
      Sum sum = 0;
      Kokkos::parallel_reduce(
          "bench::stream", Kokkos::RangePolicy<X>(0, chunks),
          KOKKOS_LAMBDA(std::size_t i, Sum & acc) {
            // Independent lanes let the compiler vectorise without reassociating.
            Sum lane[lanes] = {};
            const T* q = p + i * chunk;
            for (std::size_t j = 0; j < chunk; j += lanes)
              for (std::size_t l = 0; l < lanes; ++l) lane[l] += q[j + l];
            for (std::size_t l = 0; l < lanes; ++l) acc += lane[l];
          },
          sum);
      total += sum;
    }
    sink = sink + total;
  });
  return ms;
}

// Dense equivalent: one SwiGLU weight set applied to all T*k assignment rows (plus the
// shared expert on T rows where the layer has one): the layer's expert FLOPs, no routing.
class DenseEquivalent {
 public:
  explicit DenseEquivalent(const Config& c)
      : dense_({1, c.H, c.F}),
        seg_(kmoe::Segments<X>::single(c.T * c.k)),
        x_("bench::dense_x", c.T * c.k, c.H),
        y_("bench::dense_y", c.T * c.k, c.H),
        gy_("bench::dense_gy", c.T * c.k, c.H),
        gx_("bench::dense_gx", c.T * c.k, c.H) {
    kmoe::fill_normal(dense_.w_gate().value, 0.02, 21);
    kmoe::fill_normal(dense_.w_up().value, 0.02, 22);
    kmoe::fill_normal(dense_.w_down().value, 0.02, 23);
    kmoe::fill_normal(x_, 1.0, 24);
    kmoe::fill_normal(gy_, 1.0, 25);
    if (c.shared_F > 0) {
      shared_.emplace(kmoe::ExpertShape{1, c.H, c.shared_F});
      kmoe::fill_normal(shared_->w_gate().value, 0.02, 26);
      kmoe::fill_normal(shared_->w_up().value, 0.02, 27);
      kmoe::fill_normal(shared_->w_down().value, 0.02, 28);
      shared_seg_ = kmoe::Segments<X>::single(c.T);
      sx_ = kmoe::Matrix<S, X>("bench::shared_x", c.T, c.H);
      sy_ = kmoe::Matrix<S, X>("bench::shared_y", c.T, c.H);
      sgy_ = kmoe::Matrix<S, X>("bench::shared_gy", c.T, c.H);
      sgx_ = kmoe::Matrix<S, X>("bench::shared_gx", c.T, c.H);
      kmoe::fill_normal(sx_, 1.0, 29);
    }
  }
  void forward(kmoe::ExpertMode mode = kmoe::ExpertMode::inference) {
    dense_.forward(x_, seg_, y_, mode);
    if (shared_) shared_->forward(sx_, shared_seg_, sy_, mode);
  }
  void forward_backward() {
    forward(kmoe::ExpertMode::store);
    dense_.backward(x_, seg_, gy_, gx_);
    if (shared_) shared_->backward(sx_, shared_seg_, sgy_, sgx_);
  }

 private:
  Experts dense_;
  kmoe::Segments<X> seg_;
  kmoe::Matrix<S, X> x_, y_, gy_, gx_;
  std::optional<Experts> shared_;
  kmoe::Segments<X> shared_seg_;
  kmoe::Matrix<S, X> sx_, sy_, sgy_, sgx_;
};

// Calls a() and b() in turn, `repeats` times after one warm-up each, and returns the median
// time of each: the machine's drift (this VM's speed varies by tens of percent over
// minutes) then affects both sides of a ratio alike.
std::pair<double, double> interleaved_ms(int repeats, const std::function<void()>& a,
                                         const std::function<void()>& b) {
  std::vector<double> ta, tb;
  for (int i = 0; i <= repeats; ++i) {
    for (int side = 0; side < 2; ++side) {
      const double start = now_ms();
      (side == 0 ? a : b)();
      Kokkos::fence();
      if (i > 0) (side == 0 ? ta : tb).push_back(now_ms() - start);
    }
  }
  return {median(ta), median(tb)};
}

// The layer with weight-only experts in Element, timed in turn with the float layer, and
// (with_floor) its floor: the packed weights of the experts the batch chose, read once (Sum:
// the type the floor's lanes add in). INT8's scales (one float per output channel) add
// under 0.1% at these shapes and are not in the floor.
template <class Element, class Sum, class Layer>
void measure_packed(Layer& layer, const Record& r, const kmoe::Matrix<S, X>& x,
                    const kmoe::ForwardStats& stats, Record::Packed& out, bool with_floor) {
  const Config& c = r.c;
  auto packed = kmoe::weight_only_layer<Element>(layer);
  kmoe::Matrix<S, X> y("bench::y", c.T, c.H), y_packed("bench::y_packed", c.T, c.H);
  kmoe::RouteContext<X> infer;
  std::tie(out.fp32_ms, out.ms) = interleaved_ms(
      c.repeats, [&] { layer.forward(x, y, infer); }, [&] { packed.forward(x, y_packed, infer); });
  if (!with_floor) return;
  std::vector<const Element*> blocks;
  const std::size_t block = std::size_t(c.F) * c.H;
  const auto& experts = packed.experts();
  for (int e = 0; e < c.E; ++e)
    if (stats.tokens_per_expert[e] > 0)
      for (const auto* w : {&experts.w_gate(), &experts.w_up(), &experts.w_down()})
        blocks.push_back(w->values.data() + e * block);
  out.floor_bytes = double(blocks.size()) * double(block) * sizeof(Element);
  out.floor_ms = stream_ms<Element, Sum>(std::max(c.repeats, 5), blocks, block);
}

template <class Layer>
void measure_layer(Layer& layer, Record& r, const kmoe::Matrix<S, X>& x, DenseEquivalent& dense) {
  const Config& c = r.c;
  kmoe::fill_normal(layer.parameters(), 0.02, 11);
  kmoe::Matrix<S, X> y("bench::y", c.T, c.H), gy("bench::grad_y", c.T, c.H),
      gx("bench::grad_x", c.T, c.H);
  kmoe::fill_normal(gy, 1.0, 13);
  kmoe::RouteContext<X> infer, train;
  train.training = true;

  kmoe::ForwardStats stats;
  std::tie(r.layer_ms, r.dense_ms) = interleaved_ms(
      c.repeats, [&] { stats = layer.forward(x, y, infer); }, [&] { dense.forward(); });
  r.imbalance = stats.imbalance();
  if (c.backward) {
    std::vector<double> bwd;
    const auto layer_step = [&] {
      layer.forward(x, y, train);
      Kokkos::fence();
      const double start = now_ms();
      layer.backward(gy, gx);
      Kokkos::fence();
      bwd.push_back(now_ms() - start);
    };
    std::tie(r.layer_fwdbwd_ms, r.dense_fwdbwd_ms) =
        interleaved_ms(c.repeats, layer_step, [&] { dense.forward_backward(); });
    bwd.erase(bwd.begin());  // the warm-up call
    r.backward_ms = median(bwd);
  }

  // Breakdown: the layer's own fenced phase timers (LayerOptions::time_phases), medians
  // over separate timed calls so that the fences do not slow the runs above.
  layer.set_phase_timing(true);
  std::vector<kmoe::PhaseTimes> phases;
  for (int i = 0; i < c.repeats; ++i) phases.push_back(layer.forward(x, y, infer).phase_ms);
  layer.set_phase_timing(false);
  const auto phase_median = [&](double kmoe::PhaseTimes::*field) {
    std::vector<double> v;
    for (const auto& p : phases) v.push_back(p.*field);
    return median(v);
  };
  r.route_ms = phase_median(&kmoe::PhaseTimes::route);
  r.permute_ms = phase_median(&kmoe::PhaseTimes::dispatch);
  r.comm_ms = phase_median(&kmoe::PhaseTimes::exchange);
  r.shared_ms = phase_median(&kmoe::PhaseTimes::shared);
  r.experts_ms = phase_median(&kmoe::PhaseTimes::experts);
  r.combine_ms = phase_median(&kmoe::PhaseTimes::combine);
  for (auto n : stats.tokens_per_expert) r.active_experts += n > 0;

  if (c.decode_floor) {
    std::vector<const S*> blocks;
    const std::size_t block = std::size_t(c.F) * c.H;
    const auto& ex_ = layer.experts();
    for (int e = 0; e < c.E; ++e)
      if (stats.tokens_per_expert[e] > 0)
        for (const auto* w : {&ex_.w_gate(), &ex_.w_up(), &ex_.w_down()})
          blocks.push_back(w->value.data() + e * block);
    r.floor_bytes = double(blocks.size()) * double(block) * sizeof(S);
    r.floor_ms = stream_ms<S, S>(std::max(c.repeats, 5), blocks, block);

    measure_packed<kmoe::bfloat16, float>(layer, r, x, stats, r.bf16, true);
    measure_packed<std::int8_t, int>(layer, r, x, stats, r.int8, true);
  }
  if (c.packed_prefill) measure_packed<kmoe::bfloat16, float>(layer, r, x, stats, r.bf16, false);
}

Record run(const Config& c) {
  Record r;
  r.c = c;
  r.gflop = 6.0 * c.H * (double(c.T) * c.k * c.F + double(c.T) * c.shared_F) * 1e-9;
  kmoe::Matrix<S, X> x("bench::x", c.T, c.H);
  kmoe::fill_normal(x, 1.0, 7);
  DenseEquivalent dense(c);
  {
    Experts experts({c.E, c.H, c.F});
    if (c.kind == Kind::mixtral) {
      kmoe::SoftmaxTopKConfig rc;
      rc.hidden = c.H;
      rc.experts = c.E;
      rc.top_k = c.k;
      rc.normalize = true;
      MixtralLayer layer(kmoe::SoftmaxTopKRouter<X, S>(rc), std::move(experts));
      measure_layer(layer, r, x, dense);
    } else {
      kmoe::SigmoidBiasConfig rc;
      rc.hidden = c.H;
      rc.experts = c.E;
      rc.top_k = c.k;
      rc.normalize = true;
      rc.scaling_factor = 2.5;
      rc.group = {c.n_group, c.topk_group, 2};
      std::optional<Experts> shared;
      if (c.shared_F > 0) shared.emplace(kmoe::ExpertShape{1, c.H, c.shared_F}, "shared");
      DeepSeekLayer layer(kmoe::SigmoidBiasRouter<X, S>(rc), std::move(experts), {},
                          std::move(shared));
      measure_layer(layer, r, x, dense);
    }
  }
  return r;
}

Config mixtral(const std::string& name, int T, int repeats) {
  Config c;
  c.name = name;
  c.T = T;
  c.H = 1024;
  c.F = 3584;
  c.E = 8;
  c.k = 2;
  c.repeats = repeats;
  return c;
}

Config deepseek(const std::string& name, int T, int H, int F, int E, int shared_F, int repeats) {
  Config c;
  c.name = name;
  c.kind = Kind::deepseek;
  c.T = T;
  c.H = H;
  c.F = F;
  c.E = E;
  c.k = 6;
  c.shared_F = shared_F;
  c.n_group = 8;
  c.topk_group = 3;
  c.repeats = repeats;
  return c;
}

std::vector<Config> all_configs() {
  std::vector<Config> list;
  list.push_back(mixtral("mixtral-prefill", 4096, 3));
  list.push_back(deepseek("deepseek-prefill", 4096, 1024, 256, 64, 512, 3));
  Config decode = mixtral("decode", 8, 20);
  decode.decode_floor = true;
  list.push_back(decode);
  Config decode_64 = mixtral("decode-64", 64, 20);
  decode_64.decode_floor = true;
  decode_64.backward = false;
  list.push_back(decode_64);
  // Prefill with bf16 experts against fp32 (every segment takes the unpacked-panel GEMM).
  Config prefill_bf16 = mixtral("prefill-bf16", 2048, 3);
  prefill_bf16.packed_prefill = true;
  prefill_bf16.backward = false;
  list.push_back(prefill_bf16);
  // Token sweep on Mixtral shapes, forward only (fwd+bwd at T = 16384 would take minutes).
  for (int T : {64, 256, 1024, 4096, 16384}) {
    Config c = mixtral("sweep-T-" + std::to_string(T), T, T >= 16384 ? 2 : 3);
    c.backward = false;
    list.push_back(c);
  }
  // Expert sweep at fixed active FLOPs: T, H, F and k = 2 fixed, so every token does the
  // same GEMM work whatever E; only the rows per expert (T*k/E) shrink. F = 512 keeps
  // E = 256 (weights + gradients 3.2 GB) in memory.
  for (int E : {8, 32, 64, 128, 256}) {
    Config c = mixtral("sweep-E-" + std::to_string(E), 4096, 3);
    c.F = 512;
    c.E = E;
    c.backward = false;
    list.push_back(c);
  }
  return list;
}

// Tiny shapes for CI: every code path of the full run, in seconds.
std::vector<Config> quick_configs() {
  std::vector<Config> list;
  Config m = mixtral("mixtral-quick", 64, 2);
  m.H = 64;
  m.F = 96;
  m.packed_prefill = true;
  list.push_back(m);
  list.push_back(deepseek("deepseek-quick", 64, 64, 32, 16, 64, 2));
  Config d = m;
  d.name = "decode-quick";
  d.T = 4;
  d.decode_floor = true;
  list.push_back(d);
  return list;
}

void json_number(FILE* f, const char* key, double v, bool comma = true) {
  if (v == none)
    std::fprintf(f, "\"%s\": null", key);
  else
    std::fprintf(f, "\"%s\": %.6g", key, v);
  if (comma) std::fprintf(f, ", ");
}

double ratio(double a, double b) { return a == none || b == none || b <= 0 ? none : a / b; }

void write_json(const std::string& path, const std::vector<Record>& records,
                const std::string& machine, const std::string& backend, int threads) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (!f) {
    std::fprintf(stderr, "kmoe_bench: cannot write %s\n", path.c_str());
    std::exit(1);
  }
  std::fprintf(f, "[\n");
  for (std::size_t i = 0; i < records.size(); ++i) {
    const Record& r = records[i];
    const Config& c = r.c;
    std::fprintf(f,
                 "  {\"name\": \"%s\", \"implementation\": \"kmoe\", \"T\": %d, \"H\": %d, "
                 "\"F\": %d, \"E\": %d, \"k\": %d, \"shared_F\": %d, \"threads\": %d, "
                 "\"backend\": \"%s\", \"machine\": \"%s\", \"repeats\": %d, ",
                 c.name.c_str(), c.T, c.H, c.F, c.E, c.k, c.shared_F, threads, backend.c_str(),
                 machine.c_str(), c.repeats);
    json_number(f, "gflop", r.gflop);
    json_number(f, "layer_ms", r.layer_ms);
    json_number(f, "layer_fwdbwd_ms", r.layer_fwdbwd_ms);
    json_number(f, "backward_ms", r.backward_ms);
    json_number(f, "dense_equivalent_ms", r.dense_ms);
    json_number(f, "dense_fwdbwd_ms", r.dense_fwdbwd_ms);
    json_number(f, "ratio", ratio(r.layer_ms, r.dense_ms));
    json_number(f, "ratio_fwdbwd", ratio(r.layer_fwdbwd_ms, r.dense_fwdbwd_ms));
    json_number(f, "imbalance", r.imbalance);
    json_number(f, "active_experts", r.active_experts);
    json_number(f, "floor_bytes", r.floor_bytes);
    json_number(f, "floor_ms", r.floor_ms);
    json_number(f, "decode_floor_ratio", ratio(r.layer_ms, r.floor_ms));
    for (const auto& [name, p] :
         {std::pair<const char*, const Record::Packed&>{"bf16", r.bf16}, {"int8", r.int8}}) {
      const std::string key = name;
      json_number(f, (key + "_ms").c_str(), p.ms);
      json_number(f, (key + "_fp32_ms").c_str(), p.fp32_ms);
      json_number(f, (key + "_ratio").c_str(), ratio(p.ms, p.fp32_ms));
      json_number(f, (key + "_floor_bytes").c_str(), p.floor_bytes);
      json_number(f, (key + "_floor_ms").c_str(), p.floor_ms);
      json_number(f, (key + "_floor_ratio").c_str(), ratio(p.ms, p.floor_ms));
    }
    std::fprintf(f, "\"breakdown\": {");
    json_number(f, "route_ms", r.route_ms);
    json_number(f, "permute_ms", r.permute_ms);
    json_number(f, "experts_ms", r.experts_ms);
    json_number(f, "shared_ms", r.shared_ms);
    json_number(f, "combine_ms", r.combine_ms);
    json_number(f, "comm_ms", r.comm_ms);
    json_number(f, "route_permute_combine_fraction",
                ratio(r.route_ms + r.permute_ms + r.combine_ms, r.route_ms + r.permute_ms +
                                                                    r.comm_ms + r.shared_ms +
                                                                    r.experts_ms + r.combine_ms),
                false);
    std::fprintf(f,
                 "}, \"breakdown_method\": \"kmoe::LayerOptions::time_phases: fenced phase "
                 "timers inside forward (route: router + non-finite check; permute: counting "
                 "sort, capacity, counts, losses, gather; comm: exchanges; experts: "
                 "arrangement + expert GEMMs; combine: weighted sum), medians of separate "
                 "calls\"}%s\n",
                 i + 1 < records.size() ? "," : "");
  }
  std::fprintf(f, "]\n");
  std::fclose(f);
}

std::string cell(double v, const char* fmt = "%.2f") {
  if (v == none) return "-";
  char b[32];
  std::snprintf(b, sizeof b, fmt, v);
  return b;
}

void usage() {
  std::fprintf(stderr,
               "usage: kmoe_bench [--config NAME]... [--repeats N] [--quick] [--json FILE]\n"
               "  NAME: a configuration, or a prefix of several (sweep-T, sweep-E)\n");
}

}  // namespace

int main(int argc, char** argv) {
  Kokkos::ScopeGuard kokkos(argc, argv);
  std::vector<std::string> wanted;
  std::string json;
  // 0: each configuration's own count.
  int repeats = kmoe::bench::integer_flag(argc, argv, "--repeats", 0, 0);
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a == "--config" && has_value)
      wanted.push_back(argv[++i]);
    else if (a == "--repeats" && has_value)
      ++i;  // read above
    else if (a == "--json" && has_value)
      json = argv[++i];
    else if (a == "--quick")
      quick = true;
    else if (a == "--help" || a == "-h") {
      usage();
      return 0;
    } else if (a.rfind("--kokkos", 0) != 0) {
      usage();
      return 2;
    }
  }

  std::vector<Config> configs;
  for (const auto& c : quick ? quick_configs() : all_configs()) {
    bool take = wanted.empty();
    for (const auto& w : wanted) take = take || c.name == w || c.name.rfind(w + "-", 0) == 0;
    if (take) configs.push_back(c);
  }
  if (configs.empty()) {
    std::fprintf(stderr, "kmoe_bench: no configuration matches\n");
    return 2;
  }
  if (repeats > 0)
    for (auto& c : configs) c.repeats = repeats;

  const std::string machine = machine_name();
  const int threads = X().concurrency();
  const std::string backend = std::string(kmoe::DefaultGemm::name) + " / " + X::name();
  std::printf("machine: %s\nkokkos: %s, %d threads; gemm: %s\n\n", machine.c_str(), X::name(),
              threads, kmoe::DefaultGemm::name);
  std::printf(
      "%-18s %6s %5s %5s %4s %2s | %9s %9s %9s | %9s %9s | %5s %5s | %7s %7s %7s %7s %7s | %6s\n",
      "config", "T", "H", "F", "E", "k", "fwd_ms", "bwd_ms", "fb_ms", "dense", "dense_fb", "ratio",
      "r_fb", "route", "permute", "experts", "shared", "combine", "floor");
  std::vector<Record> records;
  for (const auto& c : configs) {
    const Record r = run(c);
    records.push_back(r);
    std::printf(
        "%-18s %6d %5d %5d %4d %2d | %9s %9s %9s | %9s %9s | %5s %5s | %7s %7s %7s %7s %7s | %6s\n",
        c.name.c_str(), c.T, c.H, c.F, c.E, c.k, cell(r.layer_ms).c_str(),
        cell(r.backward_ms).c_str(), cell(r.layer_fwdbwd_ms).c_str(), cell(r.dense_ms).c_str(),
        cell(r.dense_fwdbwd_ms).c_str(), cell(ratio(r.layer_ms, r.dense_ms), "%.3f").c_str(),
        cell(ratio(r.layer_fwdbwd_ms, r.dense_fwdbwd_ms), "%.3f").c_str(), cell(r.route_ms).c_str(),
        cell(r.permute_ms).c_str(), cell(r.experts_ms).c_str(), cell(r.shared_ms).c_str(),
        cell(r.combine_ms).c_str(), cell(r.floor_ms).c_str());
    std::fflush(stdout);
    if (!json.empty()) write_json(json, records, machine, backend, threads);
  }
  std::printf("\nweight-only experts (the fp32 layer and each packed one timed in turn; "
              "floors: one read of the chosen experts' weights)\n%-18s %5s | %9s %9s %6s | %9s "
              "%9s %6s\n",
              "config", "dtype", "fp32_ms", "ms", "ratio", "fp32_flr", "floor", "/floor");
  for (const Record& r : records)
    for (const auto& [name, p] :
         {std::pair<const char*, const Record::Packed&>{"bf16", r.bf16}, {"int8", r.int8}})
      if (p.ms != none)
        std::printf("%-18s %5s | %9s %9s %6s | %9s %9s %6s\n", r.c.name.c_str(), name,
                    cell(p.fp32_ms).c_str(), cell(p.ms).c_str(),
                    cell(ratio(p.ms, p.fp32_ms), "%.3f").c_str(), cell(r.floor_ms).c_str(),
                    cell(p.floor_ms).c_str(), cell(ratio(p.ms, p.floor_ms), "%.3f").c_str());
  return 0;
}
