// SPDX-License-Identifier: BSD-3-Clause
// Sharded optimizer state (ZeRO-1 and ZeRO-2) against the unsharded optimizer on the same
// layout: several steps of AdamW (with parameter groups) and SGD with momentum, with the
// global clip active, on pure data parallelism, EP x DP and TP x DP, must give the same norms and
// weights bit for bit. ZeRO-1 runs beside the layer's own all-reduce. ZeRO-2 adds the ranks'
// gradients in rank order: at 2 ranks every all-reduce does too (a + b = b + a), so it is
// compared with the layer's own sync; at 4 ranks the MPI library picks its order, so it is
// compared with an unsharded step whose gradients this file averages in rank order (plain
// loops over an all-gather), and with the layer's own sync to a tolerance. The state each
// rank holds falls by the group size; checkpoints of a sharded run have the unsharded form
// and restart on another DP size.
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/global_clip.hpp>
#include <kmoe/init.hpp>
#include <kmoe/io/checkpoint.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/optimizer.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/routers/softmax_topk.hpp>
#include <kmoe/sharded_optimizer.hpp>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

using namespace kmoe;
using Catch::Matchers::ContainsSubstring;

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = double;
using Router = SoftmaxTopKRouter<X, S>;
using GLU = SwiGLUExperts<X, S>;
using Layer = MoELayer<Router, GLU, WeightedSumCombiner<X, S>, MpiCommunicator>;

// Expert tensors of 4 x 32 x 64 = 8192 elements (two norm chunks) cut inside tensors.
constexpr int hidden = 32, ffn = 64, shared_ffn = 40, experts = 4, top_k = 2, global_tokens = 16;
constexpr double max_norm = 0.05;  // below every step's norm: the clip scales
constexpr int steps = 3;

ParallelLayout layout_of(int ep, int dp, int tp = 1) {
  ParallelLayout l;
  l.ep = ep, l.dp = dp, l.tp = tp;
  return l;
}

/// Pure data parallelism, EP x DP and TP x DP on `world` ranks.
std::vector<ParallelLayout> layouts_of(int world) {
  if (world == 2) return {layout_of(1, 2), layout_of(2, 1), layout_of(1, 1, 2)};
  return {layout_of(1, 4), layout_of(2, 2), layout_of(1, 2, 2)};
}

std::string describe(const ParallelLayout& l) {
  return "TP" + std::to_string(l.tp) + " EP" + std::to_string(l.ep) + " DP" + std::to_string(l.dp);
}

Layer make_layer(const ParallelGroups<MpiCommunicator>& groups, bool overlap, std::uint64_t seed) {
  LayerOptions options;
  options.gradient_sync.overlap = overlap;
  Layer layer(Router({hidden, experts, top_k}),
              GLU({int(groups.layout.local_experts(experts, groups.ep_rank).size()), hidden,
                   ffn / groups.layout.tp}),
              options, GLU({1, hidden, shared_ffn}, "shared_experts"), groups);
  initialize(layer.parameters(), InitConfig{0.3, 0.3, 0.2, 0.0, 0.3}, seed);
  return layer;
}

/// Forward and backward of this rank's rows of the global batch of `step`.
void forward_backward(Layer& layer, int step) {
  const auto& groups = layer.groups();
  const int tokens = global_tokens / (groups.layout.ep * groups.layout.dp);
  const int first = (groups.ep_rank + groups.layout.ep * groups.dp_rank) * tokens;
  Matrix<S, X> x_all("x_all", global_tokens, hidden), u_all("u_all", global_tokens, hidden);
  fill_normal(x_all, 1.0, 1000 + std::uint64_t(step));
  fill_normal(u_all, 1.0 / tokens, 2000 + std::uint64_t(step));
  const auto rows = std::make_pair(first, first + tokens);
  Matrix<S, X> x("x", tokens, hidden), u("u", tokens, hidden), y("y", tokens, hidden),
      gx("gx", tokens, hidden);
  Kokkos::deep_copy(x, Kokkos::subview(x_all, rows, Kokkos::ALL));
  Kokkos::deep_copy(u, Kokkos::subview(u_all, rows, Kokkos::ALL));
  RouteContext<X> training;
  training.training = true;
  layer.zero_gradients();
  layer.forward(x, y, training);
  layer.backward(u, gx);
}

/// The gradient average written here: each tensor's gradients all-gathered over the ranks
/// that hold it and added in rank order, then divided as the layer divides (routed experts
/// by the ranks with distinct tokens, the rest by the world).
void average_in_rank_order(const Layer& layer) {
  const auto& groups = layer.groups();
  for (const auto& p : layer.parameters()) {
    const MpiCommunicator comm = p.shard.expert_parallel ? groups.dp : groups.world;
    const int divisor = p.shard.expert_parallel ? groups.tokens.size() : groups.world.size();
    const std::size_t n = p.grad.size();
    Vector<S, X> mine("mine", n), all("all", n * std::size_t(comm.size()));
    Kokkos::deep_copy(mine, p.grad);
    comm.all_gather(mine, all);
    for (std::size_t i = 0; i < n; ++i) {
      S sum = all(i);
      for (int r = 1; r < comm.size(); ++r) sum += all(std::size_t(r) * n + i);
      if (divisor != 1) sum *= S(1) / S(divisor);
      p.grad(i) = sum;
    }
  }
}

std::vector<S> values_of(const ParameterList<X, S>& list) {
  std::vector<S> all;
  for (const auto& p : list)
    for (std::size_t i = 0; i < p.value.size(); ++i) all.push_back(p.value(i));
  return all;
}

double max_relative_difference(const std::vector<S>& a, const std::vector<S>& b) {
  double worst = 0, scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    worst = std::max(worst, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(a[i]));
  }
  return worst / scale;
}

enum class Reference { layer_sync, rank_order };

/// Trains `steps` steps with the unsharded optimizer (gradients averaged by `reference`)
/// and with the sharded one, checking norms and weights after each step.
template <class Optimizer>
void compare_training(const ParallelGroups<MpiCommunicator>& groups, ZeroStage stage,
                      const typename Optimizer::Config& config, Reference reference) {
  const bool overlap = stage == ZeroStage::one;  // ZeRO-1 beside the overlapped sync
  Layer plain = make_layer(groups, overlap, 5), sharded_layer = make_layer(groups, overlap, 5);
  Optimizer unsharded(plain.parameters(), config);
  ShardedOptimizer<Optimizer, MpiCommunicator> sharded(sharded_layer, config, {stage});
  for (int step = 0; step < steps; ++step) {
    CAPTURE(step);
    forward_backward(plain, step);
    if (reference == Reference::layer_sync)
      plain.synchronize_gradients();
    else
      average_in_rank_order(plain);
    const double norm = clip_grad_norm(plain, max_norm);
    unsharded.set_learning_rate(1e-2 / (step + 1));
    unsharded.step();

    forward_backward(sharded_layer, step);
    sharded.reduce_gradients(sharded_layer);
    const double sharded_norm = sharded.clip_grad_norm(max_norm);
    sharded.set_learning_rate(1e-2 / (step + 1));
    sharded.step();

    CHECK(norm > max_norm);
    CHECK(sharded_norm == norm);
    CHECK(values_of(sharded_layer.parameters()) == values_of(plain.parameters()));
  }
  CHECK(sharded.steps() == unsharded.steps());
}

const AdamW<X, S>::Config adamw_config{
    1e-2, 0.9,
    0.99, 1e-8,
    0.05, {{"router", std::nullopt, 0.5, true}, {"shared_experts", std::nullopt, 1.0, false}}};
const SGD<X, S>::Config sgd_config{1e-2, 0.9, 1e-3, {{"router", std::nullopt, 2.0, true}}};

std::string checkpoint_root() {
  return (std::filesystem::temp_directory_path() / "kmoe_test_zero").string();
}

}  // namespace

TEST_CASE("ZeRO-1 and ZeRO-2 train bitwise like the unsharded optimizer", "[mpi][zero]") {
  const MpiCommunicator world = MpiCommunicator::world();
  for (const auto& layout : layouts_of(world.size())) {
    const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
    CAPTURE(describe(layout), world.rank());
    for (auto stage : {ZeroStage::one, ZeroStage::two}) {
      CAPTURE(int(stage));
      // ZeRO-1 keeps the layer's all-reduce; ZeRO-2's rank order is every order at 2 ranks.
      const Reference reference = stage == ZeroStage::one || world.size() == 2
                                      ? Reference::layer_sync
                                      : Reference::rank_order;
      compare_training<AdamW<X, S>>(groups, stage, adamw_config, reference);
      compare_training<SGD<X, S>>(groups, stage, sgd_config, reference);
    }
  }
}

TEST_CASE("ZeRO-2 at 4 ranks agrees with the layer's own all-reduce to rounding", "[mpi][zero]") {
  const MpiCommunicator world = MpiCommunicator::world();
  if (world.size() != 4) return;
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout_of(1, 4));
  Layer plain = make_layer(groups, false, 5), sharded_layer = make_layer(groups, false, 5);
  AdamW<X, S> unsharded(plain.parameters(), adamw_config);
  ShardedOptimizer<AdamW<X, S>, MpiCommunicator> sharded(sharded_layer, adamw_config,
                                                         {ZeroStage::two});
  for (int step = 0; step < steps; ++step) {
    forward_backward(plain, step);
    plain.synchronize_gradients();
    clip_grad_norm(plain, max_norm);
    unsharded.step();
    forward_backward(sharded_layer, step);
    sharded.reduce_gradients(sharded_layer);
    sharded.clip_grad_norm(max_norm);
    sharded.step();
  }
  // Sums of 4 terms in another order differ by a few ulps; 3 AdamW steps keep that small.
  CHECK(max_relative_difference(values_of(plain.parameters()),
                                values_of(sharded_layer.parameters())) <= 1e-12);
}

TEST_CASE("sharded optimizer state per rank falls by the group size", "[mpi][zero]") {
  const MpiCommunicator world = MpiCommunicator::world();
  for (const auto& layout : layouts_of(world.size())) {
    const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
    CAPTURE(describe(layout), world.rank());
    Layer layer = make_layer(groups, false, 5);
    const auto list = layer.parameters();
    // Elements of each group, from the tensor shapes: routed experts, the replicated rest.
    std::size_t expert_elements = 0, replicated_elements = 0;
    for (const auto& p : list) {
      std::size_t n = 1;
      for (auto e : p.shape) n *= std::size_t(e);
      (p.shard.expert_parallel ? expert_elements : replicated_elements) += n;
    }
    const std::size_t moments = 2 * sizeof(S);  // AdamW: exp_avg and exp_avg_sq
    AdamW<X, S> unsharded(list, adamw_config);
    CHECK(unsharded.state_bytes() == moments * (expert_elements + replicated_elements));
    for (auto stage : {ZeroStage::one, ZeroStage::two}) {
      ShardedOptimizer<AdamW<X, S>, MpiCommunicator> sharded(layer, adamw_config, {stage});
      const auto shard = sharded.shard_elements();
      REQUIRE(shard.size() == 2);
      CHECK(sharded.state_bytes() == moments * (shard[0] + shard[1]));
      CHECK(sharded.reduced_gradient_bytes() ==
            (stage == ZeroStage::two ? sizeof(S) * (shard[0] + shard[1]) : 0));
      // The shards of a group cover its elements once ...
      std::vector<std::int64_t> sums = {std::int64_t(shard[0]), std::int64_t(shard[1])};
      std::vector<std::int64_t> expert_sum = {sums[0]}, replicated_sum = {sums[1]};
      all_reduce_sum_values<X::memory_space>(groups.dp, expert_sum);
      all_reduce_sum_values<X::memory_space>(groups.world, replicated_sum);
      CHECK(expert_sum[0] == std::int64_t(expert_elements));
      CHECK(replicated_sum[0] == std::int64_t(replicated_elements));
      // ... and each is its equal share, give or take one norm chunk.
      const auto near_share = [](std::size_t mine, std::size_t total, int ranks) {
        const double share = double(total) / ranks;
        return std::abs(double(mine) - share) <= double(detail::norm_chunk);
      };
      CHECK(near_share(shard[0], expert_elements, groups.dp.size()));
      CHECK(near_share(shard[1], replicated_elements, world.size()));
      // Pure DP: the experts' state (most of it) falls by the DP size.
      if (layout.ep == 1 && layout.tp == 1) {
        const double ratio = double(sharded.state_bytes()) / double(unsharded.state_bytes());
        CAPTURE(ratio);
        CHECK(std::abs(ratio - 1.0 / layout.dp) <= 0.1);
      }
    }
  }
}

TEST_CASE("a sharded checkpoint has the unsharded form and restarts on another DP size",
          "[mpi][zero][checkpoint]") {
  const MpiCommunicator world = MpiCommunicator::world();
  const int W = world.size();
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout_of(1, W));
  const std::string dir = checkpoint_root() + "/np" + std::to_string(W);
  constexpr int saved_at = 2, total = 4;
  const auto train = [&](auto& layer, auto& optimizer, int from, int to) {
    for (int step = from; step < to; ++step) {
      forward_backward(layer, step);
      optimizer.reduce_gradients(layer);
      optimizer.clip_grad_norm(max_norm);
      optimizer.step();
    }
  };
  Layer layer = make_layer(groups, false, 5);
  ShardedOptimizer<AdamW<X, S>, MpiCommunicator> sharded(layer, adamw_config, {ZeroStage::two});
  train(layer, sharded, 0, saved_at);
  io::save_checkpoint(dir, layer, sharded, {saved_at, {}});
  train(layer, sharded, saved_at, total);

  // The same layout, from other weights: bitwise the uninterrupted run.
  {
    Layer resumed_layer = make_layer(groups, false, 77);
    ShardedOptimizer<AdamW<X, S>, MpiCommunicator> resumed(resumed_layer, adamw_config,
                                                           {ZeroStage::two});
    CHECK(io::load_checkpoint(dir, resumed_layer, resumed).step == saved_at);
    CHECK(resumed.steps() == saved_at);
    train(resumed_layer, resumed, saved_at, total);
    CHECK(values_of(resumed_layer.parameters()) == values_of(layer.parameters()));
  }

  // The state it saved is the unsharded optimizer's: an unsharded AdamW that loads it holds
  // what the sharded one gathers.
  {
    Layer plain = make_layer(groups, false, 77);
    AdamW<X, S> unsharded(plain.parameters(), adamw_config);
    io::load_checkpoint(dir, plain, unsharded);
    Layer again = make_layer(groups, false, 78);
    ShardedOptimizer<AdamW<X, S>, MpiCommunicator> reloaded(again, adamw_config, {ZeroStage::one});
    io::load_checkpoint(dir, again, reloaded);
    reloaded.gather_state();
    const auto whole = reloaded.state(), expected = unsharded.state();
    REQUIRE(whole.size() == expected.size());
    for (std::size_t i = 0; i < whole.size(); ++i) {
      CAPTURE(whole[i].name);
      CHECK(whole[i].name == expected[i].name);
      bool same = whole[i].value.size() == expected[i].value.size();
      for (std::size_t j = 0; same && j < whole[i].value.size(); ++j)
        same = whole[i].value(j) == expected[i].value(j);
      CHECK(same);
    }
    reloaded.release_state();
    CHECK_THROWS_WITH(reloaded.state(), ContainsSubstring("call gather_state()"));
  }

  // Half the world (DP W/2), sharded and unsharded from the same checkpoint, step alike.
  const MpiCommunicator half = world.split(world.rank() / (W / 2), world.rank());
  const auto half_groups = ParallelGroups<MpiCommunicator>::create(half, layout_of(1, W / 2));
  Layer sharded_half = make_layer(half_groups, false, 88),
        plain_half = make_layer(half_groups, false, 89);
  ShardedOptimizer<AdamW<X, S>, MpiCommunicator> zero_half(sharded_half, adamw_config,
                                                           {ZeroStage::two});
  AdamW<X, S> plain_optimizer(plain_half.parameters(), adamw_config);
  io::load_checkpoint(dir, sharded_half, zero_half);
  io::load_checkpoint(dir, plain_half, plain_optimizer);
  for (int step = saved_at; step < total; ++step) {
    forward_backward(plain_half, step);
    plain_half.synchronize_gradients();  // at most 2 ranks: every order of the sum is one
    clip_grad_norm(plain_half, max_norm);
    plain_optimizer.step();
  }
  train(sharded_half, zero_half, saved_at, total);
  CHECK(values_of(sharded_half.parameters()) == values_of(plain_half.parameters()));
}

TEST_CASE("ZeRO-2 refuses a layer whose sync overlaps backward", "[mpi][zero]") {
  const MpiCommunicator world = MpiCommunicator::world();
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout_of(1, world.size()));
  Layer layer = make_layer(groups, true, 5);
  ShardedOptimizer<SGD<X, S>, MpiCommunicator> sharded(layer, sgd_config, {ZeroStage::two});
  forward_backward(layer, 0);
  CHECK_THROWS_WITH(sharded.reduce_gradients(layer),
                    ContainsSubstring("layer.options().gradient_sync.overlap"));
  layer.synchronize_gradients();  // completes the sums backward started
}
