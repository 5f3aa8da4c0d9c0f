// SPDX-License-Identifier: BSD-3-Clause
// Bucketed gradient sync on every layout of the world: started inside backward (overlap)
// it gives the bits of the blocking sync; both equal a plain per-tensor average computed
// here from the unsynchronised gradients (bitwise at 2 ranks, where a sum of two has one
// order); misuse of the overlapped form raises on every rank and is recoverable.
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include "training_step.hpp"

#include <catch2/catch_test_macros.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

using namespace kmoe;

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = double;
using Router = SoftmaxTopKRouter<X, S>;
using GLU = SwiGLUExperts<X, S>;
using Layer = MoELayer<Router, GLU, WeightedSumCombiner<X, S>, MpiCommunicator>;

constexpr int hidden = 8, ffn = 12, shared_ffn = 10, experts = 4, top_k = 2, tokens = 11;

std::vector<ParallelLayout> layouts_of_world(int world) {
  std::vector<ParallelLayout> all;
  for (auto [tp, ep, dp] : {std::array<int, 3>{1, 2, 1},
                            {2, 1, 1},
                            {1, 1, 2},
                            {1, 4, 1},
                            {1, 2, 2},
                            {2, 2, 1},
                            {1, 1, 4}}) {
    ParallelLayout l;
    l.tp = tp, l.ep = ep, l.dp = dp;
    if (l.world_size() == world) all.push_back(l);
  }
  return all;
}

std::string describe(const ParallelLayout& l) {
  return "TP" + std::to_string(l.tp) + " EP" + std::to_string(l.ep) + " DP" + std::to_string(l.dp);
}

Layer make_layer(const ParallelGroups<MpiCommunicator>& groups, const ParallelLayout& layout,
                 const GradientSyncOptions& sync) {
  LayerOptions options;
  options.gradient_sync = sync;
  const auto owned = layout.local_experts(experts, groups.ep_rank);
  // The Communicator deduced from the groups, the Combiner defaulted.
  MoELayer layer(Router({hidden, experts, top_k}),
                 GLU({int(owned.size()), hidden, ffn / layout.tp}), options,
                 GLU({1, hidden, shared_ffn}, "shared_experts"), groups);
  static_assert(std::is_same_v<decltype(layer), Layer>);
  InitConfig init;
  init.router_std = 0.4, init.input_std = 0.3, init.output_std = 0.2;
  initialize(layer.parameters(), init, 7);
  return layer;
}

void step(Layer& layer, const ParallelGroups<MpiCommunicator>& groups, bool synchronise) {
  test::training_step(layer, groups, tokens, hidden, synchronise);
}

std::vector<std::vector<S>> gradients(const Layer& layer) {
  std::vector<std::vector<S>> all;
  for (const auto& p : layer.parameters())
    all.emplace_back(p.grad.data(), p.grad.data() + p.grad.size());
  return all;
}

/// The reference: each tensor summed alone over the ranks holding it (a started sum, as
/// MPI may add in another order in its blocking form), then divided as the layer defines.
std::vector<std::vector<S>> averaged_by_hand(const Layer& layer,
                                             const ParallelGroups<MpiCommunicator>& groups) {
  std::vector<std::vector<S>> all;
  for (const auto& p : layer.parameters()) {
    const bool routed = p.name.rfind("experts.", 0) == 0;
    const MpiCommunicator& over = routed ? groups.dp : groups.world;
    const int divisor = routed ? groups.tokens.size() : groups.world.size();
    Kokkos::View<S*, X::memory_space> sum("sum", p.grad.size());
    Kokkos::deep_copy(sum, p.grad);
    over.all_reduce_sum_start(sum).wait();
    std::vector<S> mean(p.grad.size());
    for (std::size_t i = 0; i < mean.size(); ++i) mean[i] = sum(i) * (S(1) / S(divisor));
    all.push_back(mean);
  }
  return all;
}

/// Largest |a - b| relative to the largest |b|, over every tensor.
double relative_difference(const std::vector<std::vector<S>>& a,
                           const std::vector<std::vector<S>>& b) {
  double worst = 0, scale = 0;
  for (std::size_t t = 0; t < b.size(); ++t)
    for (std::size_t i = 0; i < b[t].size(); ++i) {
      worst = std::max(worst, std::abs(a[t][i] - b[t][i]));
      scale = std::max(scale, std::abs(b[t][i]));
    }
  return scale > 0 ? worst / scale : worst;
}

}  // namespace

TEST_CASE(
    "overlapped bucketed gradient sync gives the blocking sync's bits and the per-tensor mean",
    "[mpi][gradient_sync]") {
  const MpiCommunicator world = MpiCommunicator::world();
  for (const auto& layout : layouts_of_world(world.size())) {
    CAPTURE(describe(layout), world.rank());
    auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);

    Layer unsynchronised = make_layer(groups, layout, {});
    step(unsynchronised, groups, false);
    const auto reference = averaged_by_hand(unsynchronised, groups);

    // 0: every tensor alone, in place; 64 bytes: several packed buckets; the default: one.
    for (std::size_t bucket_bytes :
         {std::size_t(0), std::size_t(64), GradientSyncOptions{}.bucket_bytes}) {
      CAPTURE(bucket_bytes);
      Layer blocking = make_layer(groups, layout, {false, bucket_bytes});
      Layer overlapped = make_layer(groups, layout, {true, bucket_bytes});
      step(blocking, groups, true);
      step(overlapped, groups, true);
      const auto blocking_grads = gradients(blocking), overlapped_grads = gradients(overlapped);
      CHECK(overlapped_grads == blocking_grads);
      if (world.size() == 2)
        CHECK(blocking_grads == reference);
      else
        CHECK(relative_difference(blocking_grads, reference) <= 1e-14);
    }
  }
}

TEST_CASE("an overlapped sync must complete before the next backward", "[mpi][gradient_sync]") {
  const MpiCommunicator world = MpiCommunicator::world();
  ParallelLayout layout;
  layout.ep = world.size();
  auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  Layer layer = make_layer(groups, layout, {true, 64});
  Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden), grad_x("grad_x", tokens, hidden);
  fill_normal(x, 1.0, 300 + world.rank());
  RouteContext<X> training;
  training.training = true;
  layer.zero_gradients();
  layer.forward(x, y, training);
  layer.backward(y, grad_x);
  layer.forward(x, y, training);
  // Every rank refuses, naming the state; nothing has been started twice.
  bool refused = false;
  try {
    layer.backward(y, grad_x);
  } catch (const invalid_argument& error) {
    refused = std::string(error.what()).find("gradient sync pending") != std::string::npos;
  }
  CHECK(refused);
  // zero_gradients completes the pending sync; training then goes on.
  step(layer, groups, true);
  Layer fresh = make_layer(groups, layout, {false, 64});
  step(fresh, groups, true);
  CHECK(gradients(layer) == gradients(fresh));
}
