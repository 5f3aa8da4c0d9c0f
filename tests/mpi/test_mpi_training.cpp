// SPDX-License-Identifier: BSD-3-Clause
// Training state across parallel layouts, against the single-rank layer computed on every
// rank: initialisation gives every layout the single-rank weights (each shard element
// located by this file's own index arithmetic from the tensor shapes, not by the library's
// ShardMap), and the global clip returns the single-rank norm of the global batch and
// scales every rank's gradients alike.
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/global_clip.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <catch2/catch_test_macros.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "shard_index.hpp"

using namespace kmoe;

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = double;
using Router = SoftmaxTopKRouter<X, S>;
using GLU = SwiGLUExperts<X, S>;
using FFN = FFNExperts<X, S, activation::Silu>;
template <class E>
using DistLayer = MoELayer<Router, E, WeightedSumCombiner<X, S>, MpiCommunicator>;
template <class E>
using RefLayer = MoELayer<Router, E>;

constexpr int hidden = 8, ffn = 12, shared_ffn = 10, experts = 6, top_k = 2, tokens_per_rank = 9;

std::vector<ParallelLayout> layouts_of_world(int world) {
  std::vector<ParallelLayout> all;
  for (auto placement : {Placement::block, Placement::round_robin})
    for (auto [tp, ep, dp] : {std::array<int, 3>{1, 2, 1},
                              {2, 1, 1},
                              {1, 1, 2},
                              {1, 4, 1},
                              {1, 2, 2},
                              {2, 2, 1},
                              {2, 1, 2},
                              {1, 1, 4}}) {
      ParallelLayout l;
      l.tp = tp, l.ep = ep, l.dp = dp, l.placement = placement;
      if (l.world_size() == world) all.push_back(l);
    }
  return all;
}

std::string describe(const ParallelLayout& l) {
  return "TP" + std::to_string(l.tp) + " EP" + std::to_string(l.ep) + " DP" + std::to_string(l.dp) +
         " placement " + std::to_string(int(l.placement));
}

template <class E>
E make_experts(int count, int f, const std::string& name = "experts");
template <>
GLU make_experts<GLU>(int count, int f, const std::string& name) {
  return GLU({count, hidden, f}, name);
}
template <>
FFN make_experts<FFN>(int count, int f, const std::string& name) {
  return FFN({count, hidden, f, true}, name);
}

Matrix<S, X> rows_of(const Matrix<S, X>& full, int first, int count) {
  Matrix<S, X> part("part", count, full.extent(1));
  Kokkos::deep_copy(part, Kokkos::subview(full, std::make_pair(first, first + count), Kokkos::ALL));
  return part;
}

template <class E>
void check_layout(const MpiCommunicator& world, const ParallelLayout& layout) {
  auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  const auto owned = layout.local_experts(experts, groups.ep_rank);
  const int token_group = groups.ep_rank + layout.ep * groups.dp_rank;
  const int token_groups = layout.ep * layout.dp;
  CAPTURE(describe(layout), world.rank());

  RefLayer<E> ref(Router({hidden, experts, top_k}), make_experts<E>(experts, ffn), {},
                  make_experts<E>(1, shared_ffn, "shared_experts"));
  DistLayer<E> dist(Router({hidden, experts, top_k}),
                    make_experts<E>(int(owned.size()), ffn / layout.tp), {},
                    make_experts<E>(1, shared_ffn, "shared_experts"), groups);
  InitConfig init;
  init.router_std = 0.4, init.input_std = 0.3, init.output_std = 0.2, init.bias_std = 0.1;
  initialize(ref.parameters(), init, 2026);
  initialize(dist.parameters(), init, 2026);
  const auto full = ref.parameters(), mine = dist.parameters();
  REQUIRE(full.size() == mine.size());

  // Every shard element equals the single-rank element it stands for, bitwise.
  std::size_t mismatches = 0;
  for (std::size_t p = 0; p < full.size(); ++p) {
    const bool routed = kmoe::test::is_routed_expert(mine[p].name);
    for (std::size_t i = 0; i < mine[p].value.size(); ++i) {
      const auto j =
          kmoe::test::full_index(full[p].shape, mine[p].shape, i,
                                 routed ? owned : std::vector<int>{}, routed ? groups.tp_rank : 0);
      if (mine[p].value(i) != full[p].value(j)) ++mismatches;
    }
  }
  CHECK(mismatches == 0);

  // One training step of the global batch: the reference sees all of it, each token group
  // its rows; loss_g = sum <U, y> / T per group, the global loss their mean.
  const int global_tokens = tokens_per_rank * token_groups;
  Matrix<S, X> x("x", global_tokens, hidden), grad_y("grad_y", global_tokens, hidden);
  fill_normal(x, 1.0, 41);
  fill_normal(grad_y, 1.0 / tokens_per_rank, 42);
  RouteContext<X> training;
  training.training = true;
  Matrix<S, X> ref_y("ref_y", global_tokens, hidden), ref_gx("ref_gx", global_tokens, hidden);
  ref.zero_gradients();
  ref.forward(x, ref_y, training);
  ref.backward(grad_y, ref_gx);
  // The reference holds the sum over groups; the synchronised layer holds their mean.
  for (const auto& p : full)
    for (std::size_t i = 0; i < p.grad.size(); ++i) p.grad(i) /= token_groups;

  Matrix<S, X> y("y", tokens_per_rank, hidden), gx("gx", tokens_per_rank, hidden);
  dist.zero_gradients();
  dist.forward(rows_of(x, token_group * tokens_per_rank, tokens_per_rank), y, training);
  dist.backward(rows_of(grad_y, token_group * tokens_per_rank, tokens_per_rank), gx);
  dist.synchronize_gradients();

  // A max_norm below the norm, so that clipping scales.
  double norm_sq = 0;
  for (const auto& p : full)
    for (std::size_t i = 0; i < p.grad.size(); ++i) norm_sq += p.grad(i) * p.grad(i);
  const double max_norm = 0.5 * std::sqrt(norm_sq);
  const double ref_norm = clip_grad_norm(full, max_norm);
  const double dist_norm = clip_grad_norm(dist, max_norm);
  CHECK(std::abs(dist_norm - ref_norm) <= 1e-12 * ref_norm);
  // The same norm on every rank, bit for bit.
  Kokkos::View<double*, X::memory_space> norms("norms", world.size()), one("one", 1);
  one(0) = dist_norm;
  world.all_gather(one, norms);
  for (int r = 0; r < world.size(); ++r) CHECK(norms(r) == dist_norm);

  double worst = 0, scale = 0;
  for (std::size_t p = 0; p < full.size(); ++p) {
    const bool routed = kmoe::test::is_routed_expert(mine[p].name);
    for (std::size_t i = 0; i < mine[p].grad.size(); ++i) {
      const auto j =
          kmoe::test::full_index(full[p].shape, mine[p].shape, i,
                                 routed ? owned : std::vector<int>{}, routed ? groups.tp_rank : 0);
      worst = std::max(worst, std::abs(mine[p].grad(i) - full[p].grad(j)));
      scale = std::max(scale, std::abs(full[p].grad(j)));
    }
  }
  CHECK(worst <= 1e-10 * scale);
}

}  // namespace

TEST_CASE("every layout initialises to the single-rank weights and clips by the global norm",
          "[mpi][training]") {
  const MpiCommunicator world = MpiCommunicator::world();
  for (const auto& layout : layouts_of_world(world.size())) {
    check_layout<GLU>(world, layout);
    check_layout<FFN>(world, layout);  // with biases: b2 is whole on every TP rank
  }
}
