// SPDX-License-Identifier: BSD-3-Clause
// ForwardStats::memory against byte counts computed here from the shapes alone (T tokens,
// H, F, E experts, k slots, the scalar sizes), the ExpertMode::recompute saving asserted
// both in the reported activations and in the live Kokkos allocations an
// AllocationTracker counts, its phase peaks bounded below by the buffers each phase
// allocates, and the figures in the stats log's JSON line.
#include <kmoe/combiner.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/memory_accounting.hpp>
#include <kmoe/monitoring/allocation_tracker.hpp>
#include <kmoe/monitoring/stats_log.hpp>
#include <kmoe/optimizer.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

#include "support/spaces.hpp"

using namespace kmoe;
using namespace kmoe::test;

namespace {

constexpr int tokens = 10, hidden = 8, ffn = 12, experts = 4, top_k = 2;

template <class X>
using Layer = MoELayer<SoftmaxTopKRouter<X, double>, SwiGLUExperts<X, double>>;

template <class X>
Layer<X> make_layer(ExpertMode mode) {
  LayerOptions options;
  options.training_mode = mode;
  Layer<X> layer(SoftmaxTopKRouter<X, double>({hidden, experts, top_k}),
                 SwiGLUExperts<X, double>({experts, hidden, ffn}), options);
  initialize(layer.parameters(), InitConfig{0.3, 0.3, 0.2, 0.0, 0.3}, 11);
  return layer;
}

template <class X>
ForwardStats forward(Layer<X>& layer, bool training) {
  Matrix<double, X> x("x", tokens, hidden), y("y", tokens, hidden);
  fill_normal(x, 1.0, 3);
  RouteContext<X> context;
  context.training = training;
  return layer.forward(x, y, context);
}

// Bytes from the shapes. Dropless on one rank: every one of the T x k assignments is a row.
constexpr std::int64_t s = sizeof(double), index_bytes = sizeof(int);
constexpr std::int64_t rows = std::int64_t(tokens) * top_k;
constexpr std::int64_t expert_weight_bytes = 3 * std::int64_t(experts) * ffn * hidden * s;
/// SwiGLU's gate, up and hidden rows [rows, F]: what store keeps and recompute frees.
constexpr std::int64_t saved_by_experts = 3 * rows * ffn * s;
/// The training copy of x [T, H], logits and probabilities [T, E], chosen experts and
/// weights [T, k], dispatch positions [T, k], expert outputs [rows, H].
constexpr std::int64_t kept_by_layer =
    std::int64_t(tokens) * hidden * s + 2 * std::int64_t(tokens) * experts * s +
    std::int64_t(tokens) * top_k * (index_bytes + s) + std::int64_t(tokens) * top_k * index_bytes +
    rows * hidden * s;

}  // namespace

TEMPLATE_LIST_TEST_CASE("forward reports its bytes by category as the shapes give them",
                        "[monitoring][memory]", ExecutionSpaces) {
  using X = TestType;
  auto store = make_layer<X>(ExpertMode::store);
  auto recompute = make_layer<X>(ExpertMode::recompute);
  const MemoryStats kept = forward(store, true).memory;
  const MemoryStats freed = forward(recompute, true).memory;
  CHECK(kept.expert_weights == expert_weight_bytes);
  CHECK(kept.activations == kept_by_layer + saved_by_experts);
  CHECK(freed.activations == kept_by_layer);
  CHECK(kept.activations - freed.activations == saved_by_experts);
  // One EP rank exchanges in place: the rows gathered for the experts ([rows, H]) are its
  // one buffer; the outputs it returns alias the layer's expert outputs (activations).
  CHECK(kept.exchange_buffers == rows * hidden * s);
  CHECK(kept.optimizer_state == -1);
  CHECK(kept.peak.experts == -1);  // no tracker counting
  // An inference forward keeps nothing for backward.
  CHECK(forward(store, false).memory.activations == 0);

  AdamW<X, double> optimizer(store.parameters(), {});
  const std::int64_t router_bytes = std::int64_t(experts) * hidden * s;
  CHECK(std::int64_t(optimizer.state_bytes()) == 2 * (expert_weight_bytes + router_bytes));
}

TEMPLATE_LIST_TEST_CASE("the allocation tracker sees the recompute saving and each phase's buffers",
                        "[monitoring][memory]", ExecutionSpaces) {
  using X = TestType;
  {
    auto warm = make_layer<X>(ExpertMode::store);  // the space's first-use allocations
    forward(warm, true);
  }
  AllocationTracker tracker;
  CHECK(AllocationTracker::active() == &tracker);
  CHECK_THROWS_WITH(AllocationTracker(), Catch::Matchers::ContainsSubstring("one tracker"));

  const auto growth = [&](ExpertMode mode, MemoryStats& memory, std::int64_t& before) {
    auto layer = make_layer<X>(mode);
    Kokkos::fence();
    before = tracker.live_bytes();
    memory = forward(layer, true).memory;
    Kokkos::fence();
    return tracker.live_bytes() - before;
  };
  MemoryStats kept, freed;
  std::int64_t before_store = 0, before_recompute = 0;
  const std::int64_t store_growth = growth(ExpertMode::store, kept, before_store);
  const std::int64_t recompute_growth = growth(ExpertMode::recompute, freed, before_recompute);
  // The same allocations but SwiGLU's three [rows, F] buffers, which recompute frees.
  CHECK(store_growth - recompute_growth == saved_by_experts);
  // Each phase's peak holds at least what was live before the forward and what the phase
  // itself leaves allocated: the routing plan in route; gate, up, hidden and the expert
  // outputs in experts.
  CHECK(kept.peak.route >= before_store + 2 * std::int64_t(tokens) * experts * s);
  CHECK(kept.peak.experts >= before_store + saved_by_experts + rows * hidden * s);
  CHECK(freed.peak.experts >= before_recompute + saved_by_experts + rows * hidden * s);
  for (auto peak : {kept.peak.route, kept.peak.dispatch, kept.peak.exchange, kept.peak.experts,
                    kept.peak.combine}) {
    CHECK(peak >= 0);
    CHECK(peak <= tracker.peak_bytes());
  }
  CHECK(kept.peak.shared == -1);  // no shared experts: the region never ran
}

TEMPLATE_LIST_TEST_CASE("the stats log writes the memory figures", "[monitoring][memory]",
                        ExecutionSpaces) {
  using X = TestType;
  auto layer = make_layer<X>(ExpertMode::store);
  ForwardStats stats = forward(layer, true);
  AdamW<X, double> optimizer(layer.parameters(), {});
  stats.memory.optimizer_state = std::int64_t(optimizer.state_bytes());
  const std::string path =
      (std::filesystem::temp_directory_path() / "kmoe_test_memory_stats.jsonl").string();
  {
    StatsLog log(path, {0, hidden, sizeof(double)});
    log.write(0, "moe", stats);
  }
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  const auto json = nlohmann::json::parse(line);
  CHECK(json["memory_bytes"]["expert_weights"] == expert_weight_bytes);
  CHECK(json["memory_bytes"]["activations"] == kept_by_layer + saved_by_experts);
  CHECK(json["memory_bytes"]["exchange_buffers"] == rows * hidden * s);
  CHECK(json["memory_bytes"]["optimizer_state"] == std::int64_t(optimizer.state_bytes()));
  CHECK(json["peak_bytes"]["experts"] == -1);
}

namespace {
/// SwiGLU experts that say how many of their weight bytes are resident, as an expert
/// residency wrapper does: the accounting must take that figure, not the parameters' bytes.
template <class X>
struct PartlyResidentExperts : SwiGLUExperts<X, double> {
  using SwiGLUExperts<X, double>::SwiGLUExperts;
  std::size_t resident_bytes() const { return std::size_t(expert_weight_bytes / experts); }
};
}  // namespace

TEMPLATE_LIST_TEST_CASE("expert weights count what an Experts type says is resident",
                        "[monitoring][memory]", ExecutionSpaces) {
  using X = TestType;
  const PartlyResidentExperts<X> partly({experts, hidden, ffn});
  const SwiGLUExperts<X, double> whole({experts, hidden, ffn});
  CHECK(detail::expert_weight_bytes(partly) == expert_weight_bytes / experts);
  CHECK(detail::expert_weight_bytes(whole) == expert_weight_bytes);
  CHECK(detail::expert_saved_bytes(whole) == 0);  // nothing kept before a forward
}
