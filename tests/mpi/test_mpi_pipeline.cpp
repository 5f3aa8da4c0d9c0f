// SPDX-License-Identifier: BSD-3-Clause
// The pipelined exchange (LayerOptions::exchange_chunks > 1) against the sequential one
// (exchange_chunks = 1) of the same layer, forward and backward (which runs the forward's
// chunks): forward outputs, input gradients and every parameter gradient compared with ==,
// on every layout of the world size, for several routers, expert kinds, capacities,
// placements and gradient syncs. The sequential path is itself checked against the
// single-rank layer by test_mpi_layer.cpp.
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/routers/sigmoid_bias.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <vector>

using namespace kmoe;

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = double;
using SoftmaxRouter = SoftmaxTopKRouter<X, S>;
using SigmoidRouter = SigmoidBiasRouter<X, S>;
using GLU = SwiGLUExperts<X, S>;
using FFN = FFNExperts<X, S>;

constexpr int hidden = 8, ffn = 12, tokens = 29, experts = 8;

struct PipelineCase {
  std::string name;
  bool shared = false;
  double capacity_factor = 0.0;  // 0: dropless
  int alignment = 1;
  Placement placement = Placement::block;
  bool overlap_gradient_sync = false;  // start the sums inside backward (gradient_buckets.hpp)
};

std::vector<ParallelLayout> layouts_of_world(int world) {
  std::vector<ParallelLayout> all;
  for (const auto& [tp, ep, dp] : std::vector<std::array<int, 3>>{
           {1, 2, 1}, {2, 1, 1}, {1, 1, 2}, {1, 4, 1}, {1, 2, 2}, {2, 2, 1}, {1, 1, 4}})
    if (tp * ep * dp == world) {
      ParallelLayout l;
      l.tp = tp, l.ep = ep, l.dp = dp;
      all.push_back(l);
    }
  return all;
}

SoftmaxRouter make_router(SoftmaxRouter*) { return SoftmaxRouter({hidden, experts, 2, true, 1.0}); }
SigmoidRouter make_router(SigmoidRouter*) {
  return SigmoidRouter(SigmoidBiasConfig{hidden, experts, 3, true, 2.5, {4, 2, 2}});
}
template <class E>
E make_experts(int count, int f, const std::string& name = "experts") {
  if constexpr (std::is_same_v<E, FFN>)
    return E({count, hidden, f, true}, name);
  else
    return E({count, hidden, f}, name);
}

/// Output, input gradient and parameter gradients of one forward (+ backward in training).
struct Result {
  std::vector<S> y, grad_x, grads;
  int chunks = 0;
  ExchangeTraffic backward_traffic;  ///< what backward's exchanges handed to MPI
};

template <class R, class E>
Result run(const PipelineCase& c, const ParallelLayout& base, int chunks, bool training) {
  const MpiCommunicator world = MpiCommunicator::world();
  ParallelLayout layout = base;
  layout.placement = c.placement;
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  const auto owned = layout.local_experts(experts, groups.ep_rank);
  LayerOptions options;
  options.capacity.factor = c.capacity_factor;
  options.capacity.alignment = c.alignment;
  options.training_mode = ExpertMode::recompute;  // the pipeline keeps no stored activations
  options.exchange_chunks = chunks;
  options.gradient_sync.overlap = c.overlap_gradient_sync;
  std::optional<E> shared;
  if (c.shared) shared = make_experts<E>(1, 2 * ffn, "shared_experts");
  MoELayer<R, E, WeightedSumCombiner<X, S>, MpiCommunicator> layer(
      make_router((R*)nullptr), make_experts<E>(int(owned.size()), ffn / layout.tp), options,
      shared, groups);
  fill_normal(layer.parameters(), 0.3, 91);  // replicas (router, shared, DP) must agree
  Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden), gy("gy", tokens, hidden),
      gx("gx", tokens, hidden);
  const int token_group = groups.ep_rank + layout.ep * groups.dp_rank;
  fill_normal(x, 1.0, 300 + token_group);
  fill_normal(gy, 1.0, 400 + token_group);
  RouteContext<X> context;
  context.training = training;
  Result result;
  layer.zero_gradients();
  result.chunks = layer.forward(x, y, context).exchange_chunks;
  result.y.assign(y.data(), y.data() + y.size());
  if (!training) return result;
  const ExchangeTraffic before_backward = layer.exchange_traffic();
  layer.backward(gy, gx);
  result.backward_traffic = layer.exchange_traffic() - before_backward;
  layer.synchronize_gradients();
  result.grad_x.assign(gx.data(), gx.data() + gx.size());
  for (const auto& p : layer.parameters())
    for (std::size_t i = 0; i < p.grad.size(); ++i) result.grads.push_back(p.grad(i));
  return result;
}

template <class R, class E>
void check_case(const PipelineCase& c) {
  const int world = MpiCommunicator::world().size();
  for (const auto& layout : layouts_of_world(world))
    for (bool training : {false, true}) {
      const Result sequential = run<R, E>(c, layout, 1, training);
      CHECK(sequential.chunks == 1);
      for (int chunks : {0, 2, 3}) {
        CAPTURE(c.name, layout.tp, layout.ep, layout.dp, training, chunks);
        const Result pipelined = run<R, E>(c, layout, chunks, training);
        // The pipeline runs under expert parallelism without TP; elsewhere it is C = 1.
        if (layout.ep > 1 && layout.tp == 1)
          CHECK(pipelined.chunks == (chunks == 0 ? std::min(4, experts / layout.ep) : chunks));
        else
          CHECK(pipelined.chunks == 1);
        // The backward runs the forward's chunks: the same bytes in more messages (one
        // per peer and chunk), which shows that it pipelined.
        const auto messages = [](const ExchangeTraffic& t) {
          return t.intra_node_messages + t.inter_node_messages;
        };
        const auto bytes = [](const ExchangeTraffic& t) {
          return t.intra_node_bytes + t.inter_node_bytes;
        };
        CHECK(bytes(pipelined.backward_traffic) == bytes(sequential.backward_traffic));
        if (training && pipelined.chunks > 1)
          CHECK(messages(pipelined.backward_traffic) > messages(sequential.backward_traffic));
        else
          CHECK(messages(pipelined.backward_traffic) == messages(sequential.backward_traffic));
        CHECK(pipelined.y == sequential.y);
        CHECK(pipelined.grad_x == sequential.grad_x);
        CHECK(pipelined.grads == sequential.grads);
      }
    }
}

}  // namespace

TEST_CASE("pipelined exchange: softmax top-k, SwiGLU, shared expert, dropless", "[mpi][pipeline]") {
  check_case<SoftmaxRouter, GLU>({"softmax-swiglu-shared", true});
}

TEST_CASE("pipelined exchange: sigmoid router, FFN experts with biases, capacity drops",
          "[mpi][pipeline]") {
  check_case<SigmoidRouter, FFN>({"sigmoid-ffn-capacity", false, 0.6});
}

TEST_CASE("pipelined exchange: padded segments, round-robin placement", "[mpi][pipeline]") {
  check_case<SoftmaxRouter, GLU>({"softmax-swiglu-aligned", true, 0.0, 4, Placement::round_robin});
}

TEST_CASE("pipelined exchange: FFN experts, shared expert, gradient sync inside backward",
          "[mpi][pipeline]") {
  check_case<SoftmaxRouter, FFN>(
      {"softmax-ffn-overlapped-sync", true, 0.0, 1, Placement::block, true});
}

TEST_CASE("pipelined exchange: a negative chunk count raises on every rank", "[mpi][pipeline]") {
  const MpiCommunicator world = MpiCommunicator::world();
  ParallelLayout layout;
  layout.ep = world.size();
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  LayerOptions options;
  options.exchange_chunks = world.rank() == 0 ? -1 : 2;
  using Layer = MoELayer<SoftmaxRouter, GLU, WeightedSumCombiner<X, S>, MpiCommunicator>;
  const auto build = [&] {
    Layer layer(make_router((SoftmaxRouter*)nullptr),
                make_experts<GLU>(int(layout.local_experts(experts, groups.ep_rank).size()), ffn),
                options, std::nullopt, groups);
  };
  if (world.rank() == 0)
    CHECK_THROWS_WITH(build(), Catch::Matchers::ContainsSubstring("options.exchange_chunks"));
  else
    CHECK_THROWS_WITH(build(), Catch::Matchers::ContainsSubstring("another rank failed"));
}
