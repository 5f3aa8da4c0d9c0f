// SPDX-License-Identifier: BSD-3-Clause
// Experts larger than memory (docs/memory.md): the cost of keeping 25% or 50% of the experts
// resident (kmoe::ResidentExperts over a BF16 HostExpertStore) against the all-resident
// layer, on a DeepSeek-style sigmoid router whose selection bias gives the experts a
// Zipf-like popularity (bias 1/(rank+1)^0.8); and kmoe-run's start-up time and peak RSS with
// the experts read lazily against reading the whole checkpoint.
//
// Part 1, in process. Both sides run the same token batches through forward (inference) and
// are timed over the same steps; the resident side's time includes bringing the missed
// experts in (BF16 -> float conversion into a slot). Decode runs one token per step; prefill
// runs batches of T tokens, which the caller splits into chunks whose experts fit the budget
// (the all-resident side runs the same chunks). Reported: median and total time per step,
// slowdown (resident / all-resident), hit rate, bytes read from the store per token.
//
// Part 2 (with --kmoe-run PATH): writes a synthetic Mixtral checkpoint into /tmp (never the
// repository), runs `kmoe-run` on one decode token with every expert loaded and with
// --max-resident-experts N, and reports wall time and peak RSS of each.
//
//   residency_bench [--experts E] [--hidden H] [--ffn F] [--steps N] [--prefill T]
//                   [--kmoe-run PATH] [--checkpoint-experts E2]
#include <kmoe/init.hpp>
#include <kmoe/io/safetensors.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/memory/host_expert_store.hpp>
#include <kmoe/memory/resident_experts.hpp>
#include <kmoe/routers/sigmoid_bias.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "support/flags.hpp"
#include "support/timing.hpp"

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = float;
using Router = kmoe::SigmoidBiasRouter<X, S>;
using Inner = kmoe::SwiGLUExperts<X, S>;
using Store = kmoe::HostExpertStore<>;
using Resident = kmoe::ResidentExperts<Inner, Store>;

constexpr int top_k = 4;

std::string arg_text(int argc, char** argv, const char* flag) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], flag) == 0) return argv[i + 1];
  return "";
}

double ms_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

Router skewed_router(int hidden, int experts) {
  kmoe::SigmoidBiasConfig config;
  config.hidden = hidden, config.experts = experts, config.top_k = top_k;
  Router router(config);
  kmoe::ParameterList<X, S> list;
  router.collect_parameters(list);
  kmoe::fill_normal(list, 0.02, 1);
  // Zipf-like popularity over a random order of the experts.
  std::vector<int> rank(static_cast<std::size_t>(experts));
  for (int e = 0; e < experts; ++e) rank[std::size_t(e)] = e;
  std::shuffle(rank.begin(), rank.end(), std::mt19937(5));
  auto bias = Kokkos::create_mirror_view(router.bias());
  for (int e = 0; e < experts; ++e) bias(e) = S(1.0 / std::pow(rank[std::size_t(e)] + 1.0, 0.8));
  Kokkos::deep_copy(router.bias(), bias);
  return router;
}

/// Token chunks (first row, rows) of each batch whose distinct experts fit `slots`.
std::vector<std::pair<int, int>> chunks_within(const kmoe::Matrix<int, X>& expert, int slots) {
  std::vector<std::pair<int, int>> chunks;
  std::set<int> distinct;
  int first = 0;
  for (int t = 0; t < int(expert.extent(0)); ++t) {
    std::set<int> with = distinct;
    for (int s = 0; s < int(expert.extent(1)); ++s) with.insert(expert(t, s));
    if (int(with.size()) > slots) {
      chunks.emplace_back(first, t - first);
      first = t;
      with.clear();
      for (int s = 0; s < int(expert.extent(1)); ++s) with.insert(expert(t, s));
    }
    distinct = with;
  }
  chunks.emplace_back(first, int(expert.extent(0)) - first);
  return chunks;
}

struct Workload {
  const char* name;
  int tokens;  ///< per batch
  int batches;
};

/// Times `batches` batches on both layers: each batch's chunks, all-resident then resident.
void compare(kmoe::MoELayer<Router, Inner>& all, const Inner& inner_all, int experts, int hidden,
             int ffn, int slots, bool prefetch, const Workload& w) {
  const Store store = Store::from_experts(inner_all, kmoe::StorageType::bf16);
  kmoe::ExpertShape slot_shape{slots, hidden, ffn};
  slot_shape.gradients = false;  // inference: the slots hold weights only
  kmoe::MoELayer<Router, Resident> resident(all.router(), Resident(Inner(slot_shape), store));
  std::vector<kmoe::Matrix<S, X>> xs;
  std::vector<std::vector<std::pair<int, int>>> chunks;
  std::vector<std::vector<std::vector<int>>> chosen;  // per batch, per chunk
  std::int64_t chunk_count = 0;
  for (int b = 0; b < w.batches; ++b) {
    xs.emplace_back("x", w.tokens, hidden);
    kmoe::fill_normal(xs.back(), 1.0, 100 + b);
    kmoe::Matrix<S, X> y("y", w.tokens, hidden);
    all.forward(xs.back(), y);
    const auto expert =
        Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), all.routing().expert);
    chunks.push_back(chunks_within(expert, slots));
    chosen.emplace_back();
    for (const auto& [first, rows] : chunks.back()) {
      std::set<int> set;
      for (int t = first; t < first + rows; ++t)
        for (int s = 0; s < top_k; ++s) set.insert(expert(t, s));
      chosen.back().emplace_back(set.begin(), set.end());
    }
    chunk_count += std::int64_t(chunks.back().size());
  }
  std::vector<double> all_ms, resident_ms;
  double all_total = 0, resident_total = 0;
  for (int b = 0; b < w.batches; ++b) {
    for (int side = 0; side < 2; ++side) {
      const auto start = std::chrono::steady_clock::now();
      for (std::size_t c = 0; c < chunks[std::size_t(b)].size(); ++c) {
        const auto [first, rows] = chunks[std::size_t(b)][c];
        const auto x = Kokkos::subview(xs[std::size_t(b)], Kokkos::make_pair(first, first + rows),
                                       Kokkos::ALL);
        kmoe::Matrix<S, X> y("y", rows, hidden);
        if (side == 0) {
          all.forward(x, y);
        } else {
          // The next chunk's (or batch's) experts are known: its routing ran ahead.
          if (prefetch) {
            const bool last = c + 1 == chunks[std::size_t(b)].size();
            if (!last)
              resident.experts().prefetch(chosen[std::size_t(b)][c + 1]);
            else if (b + 1 < w.batches)
              resident.experts().prefetch(chosen[std::size_t(b) + 1][0]);
          }
          resident.forward(x, y);
        }
      }
      const double ms = ms_since(start);
      (side == 0 ? all_ms : resident_ms).push_back(ms);
      (side == 0 ? all_total : resident_total) += ms;
    }
  }
  const kmoe::ResidencyStats& r = resident.experts().residency_stats();
  const double tokens = double(w.tokens) * w.batches;
  std::printf("%-7s T=%-3d %2d/%d resident (%2.0f%%)%-9s median per batch: all-resident %7.3f ms, "
              "resident %7.3f ms, slowdown %5.2fx (totals %7.1f / %7.1f ms)  hit rate %5.1f%%  "
              "%6.1f KB read per token  chunks/batch %.2f  loads %4.1f%% of resident time\n",
              w.name, w.tokens, slots, experts, 100.0 * slots / experts,
              prefetch ? " prefetch" : "", kmoe::bench::median(all_ms),
              kmoe::bench::median(resident_ms),
              kmoe::bench::median(resident_ms) / kmoe::bench::median(all_ms), all_total,
              resident_total, 100 * r.hit_rate(), double(r.store_bytes) / tokens / 1024.0,
              double(chunk_count) / w.batches, 100 * r.load_ms / resident_total);
}

/// Share of assignments taken by the most popular eighth of the experts.
void report_skew(kmoe::MoELayer<Router, Inner>& all, int hidden, int experts) {
  kmoe::Matrix<S, X> x("x", 4096, hidden), y("y", 4096, hidden);
  kmoe::fill_normal(x, 1.0, 7);
  const auto stats = all.forward(x, y);
  std::vector<std::int64_t> counts = stats.tokens_per_expert;
  std::sort(counts.rbegin(), counts.rend());
  std::int64_t top = 0, sum = 0;
  for (std::size_t i = 0; i < counts.size(); ++i) {
    sum += counts[i];
    if (int(i) < std::max(1, experts / 8)) top += counts[i];
  }
  std::printf("routing skew: the top 1/8 of the experts take %.1f%% of the assignments "
              "(uniform: 12.5%%)\n",
              100.0 * double(top) / double(sum));
}

/// A Mixtral checkpoint of `experts` experts (BF16) in `dir`, and a one-token input.
std::int64_t write_checkpoint(const std::filesystem::path& dir, int experts, int hidden, int ffn) {
  namespace io = kmoe::io;
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json")
      << "{\"architectures\": [\"MixtralForCausalLM\"], \"model_type\": \"mixtral\", "
         "\"hidden_size\": "
      << hidden << ", \"intermediate_size\": " << ffn << ", \"num_local_experts\": " << experts
      << ", \"num_experts_per_tok\": 2, \"num_hidden_layers\": 2, \"hidden_act\": \"silu\", "
         "\"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"vocab_size\": 32, "
         "\"rms_norm_eps\": 1e-05, \"router_jitter_noise\": 0.0}";
  io::SafetensorsWriter writer;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 0.03f);
  const std::string prefix = "model.layers.1.block_sparse_moe.";
  std::vector<float> gate(std::size_t(experts) * hidden);
  for (auto& v : gate) v = normal(rng);
  writer.add(prefix + "gate.weight", io::DType::BF16, {experts, hidden}, gate);
  std::vector<float> w(std::size_t(ffn) * hidden);
  for (int e = 0; e < experts; ++e) {
    for (auto& v : w) v = normal(rng);
    writer.add(prefix + "experts." + std::to_string(e) + ".w1.weight", io::DType::BF16,
               {ffn, hidden}, w);
    writer.add(prefix + "experts." + std::to_string(e) + ".w3.weight", io::DType::BF16,
               {ffn, hidden}, w);
    writer.add(prefix + "experts." + std::to_string(e) + ".w2.weight", io::DType::BF16,
               {hidden, ffn}, w);
  }
  writer.write((dir / "model.safetensors").string());
  io::SafetensorsWriter input;
  std::vector<float> x(static_cast<std::size_t>(hidden));
  for (auto& v : x) v = normal(rng) * 30;
  input.add("hidden_states", io::DType::F32, {1, hidden}, x);
  input.write((dir / "input.safetensors").string());
  return std::int64_t(std::filesystem::file_size(dir / "model.safetensors"));
}

/// Runs `command`, returning its wall time (ms) and the peak RSS it prints.
std::pair<double, double> run_kmoe(const std::string& command) {
  const auto start = std::chrono::steady_clock::now();
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return {-1, -1};
  char line[4096];
  double peak = -1;
  std::string all;
  while (std::fgets(line, sizeof line, pipe) != nullptr) {
    all += line;
    long long bytes = 0;
    if (std::sscanf(line, "peak resident memory: %lld bytes", &bytes) == 1) peak = double(bytes);
  }
  const int status = pclose(pipe);
  const double ms = ms_since(start);
  if (status != 0) std::printf("command failed (%d): %s\n%s", status, command.c_str(), all.c_str());
  return {ms, peak};
}

void startup(const std::string& kmoe_run, int experts, int hidden, int ffn) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "kmoe_residency_bench";
  std::filesystem::remove_all(dir);
  const std::int64_t file_bytes = write_checkpoint(dir, experts, hidden, ffn);
  const double expert_float_mb = 3.0 * ffn * hidden * sizeof(float) / 1048576.0;
  std::printf("\nkmoe-run start-up: synthetic Mixtral block, %d experts, H=%d, F=%d: checkpoint "
              "%.1f MB (BF16), %.1f MB per expert as float; one decode token\n",
              experts, hidden, ffn, file_bytes / 1048576.0, expert_float_mb);
  const std::string base = kmoe_run + " --model " + dir.string() + " --layer 1 --input " +
                           (dir / "input.safetensors").string() + " --output " +
                           (dir / "y.safetensors").string();
  // Warm the page cache once so that both sides read from memory.
  run_kmoe(base);
  for (int repeat = 0; repeat < 2; ++repeat) {
    const auto full = run_kmoe(base);
    std::printf("  all experts loaded       : %8.1f ms  peak RSS %7.1f MB\n", full.first,
                full.second / 1048576.0);
    for (const int n : {experts / 4, experts / 8}) {
      const auto lazy = run_kmoe(base + " --max-resident-experts " + std::to_string(n));
      std::printf("  --max-resident-experts %2d: %8.1f ms  peak RSS %7.1f MB  (budget %.1f MB; "
                  "start-up %.2fx faster, RSS %.2fx smaller)\n",
                  n, lazy.first, lazy.second / 1048576.0, n * expert_float_mb,
                  full.first / lazy.first, full.second / lazy.second);
    }
  }
  std::filesystem::remove_all(dir);
}

}  // namespace

int main(int argc, char** argv) {
  Kokkos::ScopeGuard kokkos(argc, argv);
  const int experts = kmoe::bench::integer_flag(argc, argv, "--experts", 64);
  const int hidden = kmoe::bench::integer_flag(argc, argv, "--hidden", 512);
  const int ffn = kmoe::bench::integer_flag(argc, argv, "--ffn", 256);
  const int steps = kmoe::bench::integer_flag(argc, argv, "--steps", 200);
  const int prefill = kmoe::bench::integer_flag(argc, argv, "--prefill", 64);
  std::printf("residency_bench: %d experts, H=%d, F=%d, top-%d, float compute, BF16 store, "
              "%d threads\n",
              experts, hidden, ffn, top_k, X().concurrency());
  {
    kmoe::MoELayer<Router, Inner> all(skewed_router(hidden, experts),
                                      Inner({experts, hidden, ffn}));
    kmoe::ParameterList<X, S> list;
    all.experts().collect_parameters(list);
    kmoe::fill_normal(list, 0.05, 2);
    report_skew(all, hidden, experts);
    for (const int percent : {25, 50})
      for (const bool prefetch : {false, true})
        compare(all, all.experts(), experts, hidden, ffn, experts * percent / 100, prefetch,
                {"decode", 1, steps});
    for (const int percent : {25, 50})
      compare(all, all.experts(), experts, hidden, ffn, experts * percent / 100, false,
              {"prefill", prefill, std::max(4, steps / 20)});
  }
  const std::string kmoe_run = arg_text(argc, argv, "--kmoe-run");
  if (!kmoe_run.empty())
    startup(kmoe_run, kmoe::bench::integer_flag(argc, argv, "--checkpoint-experts", 32), 1024,
            1024);
  return 0;
}
