// SPDX-License-Identifier: BSD-3-Clause
// Placement tools across ranks: each EP rank's redundancy diagnostics equal the block of the
// single-rank layer's that its experts own; an elastic resize of a data-parallel layer
// equals the same resize of the single-rank layer on every rank's tokens, and is refused
// under expert parallelism.
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/monitoring/redundancy.hpp>
#include <kmoe/placement/elastic.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cmath>
#include <vector>

#include "shard_index.hpp"

using namespace kmoe;

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = double;
using Router = SoftmaxTopKRouter<X, S>;
using GLU = SwiGLUExperts<X, S>;
using DistLayer = MoELayer<Router, GLU, WeightedSumCombiner<X, S>, MpiCommunicator>;
using RefLayer = MoELayer<Router, GLU>;

constexpr int hidden = 8, ffn = 6, tokens = 9;

void copy_experts(const RefLayer& from_layer, const DistLayer& to_layer,
                  const std::vector<int>& owned) {
  ParameterList<X, S> from, to;
  from_layer.router().collect_parameters(from);
  to_layer.router().collect_parameters(to);
  for (std::size_t p = 0; p < to.size(); ++p) Kokkos::deep_copy(to[p].value, from[p].value);
  from.clear(), to.clear();
  from_layer.experts().collect_parameters(from);
  to_layer.experts().collect_parameters(to);
  for (std::size_t p = 0; p < to.size(); ++p)
    for (std::size_t i = 0; i < to[p].value.size(); ++i)
      to[p].value(i) =
          from[p].value(kmoe::test::full_index(from[p].shape, to[p].shape, i, owned, 0));
}

}  // namespace

TEST_CASE("each EP rank's redundancy diagnostics are its block of the single-rank ones",
          "[mpi][placement]") {
  const MpiCommunicator world = MpiCommunicator::world();
  ParallelLayout layout;
  layout.ep = world.size();
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  const int experts = 2 * world.size();
  const auto owned = layout.local_experts(experts, groups.ep_rank);
  RefLayer ref(Router({hidden, experts, 2, true}), GLU({experts, hidden, ffn}));
  fill_normal(ref.parameters(), 0.4, 71);
  DistLayer layer(Router({hidden, experts, 2, true}), GLU({int(owned.size()), hidden, ffn}), {},
                  std::nullopt, groups);
  copy_experts(ref, layer, owned);
  Matrix<S, X> x("x", tokens, hidden);
  fill_normal(x, 1.0, 72);
  const auto full_weights = expert_weight_similarity(ref.experts());
  const auto full_outputs = expert_output_similarity(ref.experts(), x);
  const auto mine_weights = expert_weight_similarity(layer.experts());
  const auto mine_outputs = expert_output_similarity(layer.experts(), x);
  const std::size_t n = owned.size();
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < n; ++j) {
      const std::size_t global = std::size_t(owned[i]) * experts + std::size_t(owned[j]);
      CHECK(std::abs(mine_weights[i * n + j] - full_weights[global]) < 1e-12);
      CHECK(std::abs(mine_outputs[i * n + j] - full_outputs[global]) < 1e-12);
    }
  CHECK_THROWS_WITH(resized_layer(layer, {0}, {}),
                    Catch::Matchers::ContainsSubstring("EP = TP = 1"));
}

TEST_CASE("an elastic resize of a data-parallel layer equals the single-rank resize",
          "[mpi][placement]") {
  const MpiCommunicator world = MpiCommunicator::world();
  ParallelLayout layout;
  layout.dp = world.size();
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  const int experts = 5;
  RefLayer ref(Router({hidden, experts, 2, true}), GLU({experts, hidden, ffn}));
  fill_normal(ref.parameters(), 0.4, 81);
  DistLayer layer(Router({hidden, experts, 2, true}), GLU({experts, hidden, ffn}), {}, std::nullopt,
                  groups);
  std::vector<int> all(experts);
  for (int e = 0; e < experts; ++e) all[e] = e;
  copy_experts(ref, layer, all);
  const std::vector<int> keep = {3, 1, 4};
  const std::vector<NewExpert> added = {{0, 0.02, 0.05, 9}};
  // The same random rows on every rank (same seeds): the replicas check inside passes.
  const auto resized = resized_layer(layer, keep, added);
  auto single = resized_layer(ref, keep, added);
  auto copy = resized;
  Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden), y_single("y_single", tokens, hidden);
  fill_normal(x, 1.0, 82 + world.rank());
  copy.forward(x, y);
  single.forward(x, y_single);
  for (int t = 0; t < tokens; ++t)
    for (int h = 0; h < hidden; ++h) CHECK(y(t, h) == y_single(t, h));
  CHECK(copy.num_experts() == 4);
}
