// SPDX-License-Identifier: BSD-3-Clause
// Checkpoint and restart across layouts. A training run (AdamW, warmup + cosine, global
// clipping) checkpoints after 3 of 6 steps; restored on the same layout it continues bitwise
// like the uninterrupted run; restored on another layout (a sub-group of the world, or one
// rank alone) it continues like the single-rank run of the same global batches, computed on
// every rank as the reference. Broken checkpoints raise on every rank and change nothing. A
// softmax router saves its selection bias only when it has one.
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/global_clip.hpp>
#include <kmoe/init.hpp>
#include <kmoe/io/checkpoint.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/lr_schedule.hpp>
#include <kmoe/optimizer.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/routers/sigmoid_bias.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include "shard_index.hpp"

using namespace kmoe;
using Catch::Matchers::ContainsSubstring;

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = double;
using Router = SigmoidBiasRouter<X, S>;  // with a selection bias, saved and restored too
using GLU = SwiGLUExperts<X, S>;
template <class Communicator>
using Layer = MoELayer<Router, GLU, WeightedSumCombiner<X, S>, Communicator>;

constexpr int hidden = 8, ffn = 12, shared_ffn = 6, experts = 4, top_k = 2, global_tokens = 12;
constexpr int total_steps = 6, checkpoint_step = 3;
const WarmupCosineSchedule schedule(2, total_steps, 0.1);

template <class Communicator>
struct Run {
  ParallelGroups<Communicator> groups;
  Layer<Communicator> layer;
  AdamW<X, S> optimizer;

  Run(const ParallelGroups<Communicator>& g, std::uint64_t seed)
      : groups(g),
        layer(Router({hidden, experts, top_k, true, 1.0, {}}),
              GLU({int(g.layout.local_experts(experts, g.ep_rank).size()), hidden,
                   ffn / g.layout.tp}),
              {}, GLU({1, hidden, shared_ffn}, "shared_experts"), g),
        optimizer(layer.parameters(), {1e-2, 0.9, 0.99, 1e-8, 0.05}) {
    initialize(layer.parameters(), InitConfig{0.3, 0.3, 0.2, 0.0, 0.3}, seed);
  }

  /// One step on the global batch of `step`: this rank's token group takes its rows.
  void train_step(int step) {
    const int groups_of_tokens = groups.layout.ep * groups.layout.dp;
    const int tokens = global_tokens / groups_of_tokens;
    const int first = (groups.ep_rank + groups.layout.ep * groups.dp_rank) * tokens;
    Matrix<S, X> x_all("x_all", global_tokens, hidden), u_all("u_all", global_tokens, hidden);
    fill_normal(x_all, 1.0, 1000 + step);
    fill_normal(u_all, 1.0 / tokens, 2000 + step);
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
    layer.synchronize_gradients();
    clip_grad_norm(layer, 0.5);
    optimizer.set_learning_rate(1e-2 * schedule(optimizer.steps()));
    optimizer.step();
    layer.apply_bias_update(1e-3);
  }
};

std::vector<ParallelLayout> layouts_of(int world) {
  std::vector<ParallelLayout> all;
  for (auto [tp, ep, dp] :
       {std::array<int, 3>{1, 2, 1}, {2, 1, 1}, {1, 1, 2}, {1, 4, 1}, {1, 2, 2}, {2, 2, 1}}) {
    ParallelLayout l;
    l.tp = tp, l.ep = ep, l.dp = dp;
    l.placement = ep == 2 ? Placement::round_robin : Placement::block;
    if (l.world_size() == world) all.push_back(l);
  }
  return all;
}

std::string describe(const ParallelLayout& l) {
  return "TP" + std::to_string(l.tp) + " EP" + std::to_string(l.ep) + " DP" + std::to_string(l.dp);
}

/// Every element of this rank's parameters, as the single-rank tensors' flat values.
template <class Communicator>
double max_error(const Run<Communicator>& run, const ParameterList<X, S>& full) {
  const auto mine = run.layer.parameters();
  const auto owned = run.groups.layout.local_experts(experts, run.groups.ep_rank);
  double worst = 0;
  for (std::size_t p = 0; p < full.size(); ++p) {
    const bool routed = test::is_routed_expert(mine[p].name);
    for (std::size_t i = 0; i < mine[p].value.size(); ++i) {
      const auto j =
          test::full_index(full[p].shape, mine[p].shape, i, routed ? owned : std::vector<int>{},
                           routed ? run.groups.tp_rank : 0);
      worst = std::max(worst, std::abs(mine[p].value(i) - full[p].value(j)));
    }
  }
  return worst;
}

std::vector<S> values_of(const ParameterList<X, S>& list) {
  std::vector<S> all;
  for (const auto& p : list)
    for (std::size_t i = 0; i < p.value.size(); ++i) all.push_back(p.value(i));
  return all;
}

std::string checkpoint_root() {
  return (std::filesystem::temp_directory_path() / "kmoe_test_checkpoint").string();
}

}  // namespace

TEST_CASE("a checkpoint restarts bitwise on its layout and equal on any other",
          "[mpi][checkpoint]") {
  MpiCommunicator world = MpiCommunicator::world();
  const int W = world.size();
  // The reference: one rank, every global batch, every step.
  Run<SingleProcessCommunicator> reference(ParallelGroups<SingleProcessCommunicator>{}, 7);
  for (int step = 0; step < total_steps; ++step) reference.train_step(step);
  const auto final_weights = reference.layer.parameters();
  const double scale = [&] {
    double m = 0;
    for (auto v : values_of(final_weights)) m = std::max(m, std::abs(v));
    return m;
  }();

  for (const auto& layout : layouts_of(W)) {
    CAPTURE(describe(layout), world.rank());
    const std::string dir = checkpoint_root() + "/" + describe(layout) + "-np" + std::to_string(W);
    Run<MpiCommunicator> run(ParallelGroups<MpiCommunicator>::create(world, layout), 7);
    for (int step = 0; step < checkpoint_step; ++step) run.train_step(step);
    io::save_checkpoint(dir, run.layer, run.optimizer, {checkpoint_step, {{"loss_scale", 1.0}}});
    for (int step = checkpoint_step; step < total_steps; ++step) run.train_step(step);
    CHECK(max_error(run, final_weights) <= 1e-10 * scale);

    // Same layout: a run started from other weights resumes bitwise.
    Run<MpiCommunicator> resumed(ParallelGroups<MpiCommunicator>::create(world, layout), 99);
    const auto progress = io::load_checkpoint(dir, resumed.layer, resumed.optimizer);
    CHECK(progress.step == checkpoint_step);
    CHECK(progress.values.at("loss_scale") == 1.0);
    CHECK(resumed.optimizer.steps() == checkpoint_step);
    for (int step = checkpoint_step; step < total_steps; ++step) resumed.train_step(step);
    CHECK(values_of(resumed.layer.parameters()) == values_of(run.layer.parameters()));

    // One rank alone (W -> 1), on every rank.
    Run<SingleProcessCommunicator> alone(ParallelGroups<SingleProcessCommunicator>{}, 99);
    io::load_checkpoint(dir, alone.layer, alone.optimizer);
    for (int step = checkpoint_step; step < total_steps; ++step) alone.train_step(step);
    CHECK(max_error(alone, final_weights) <= 1e-10 * scale);

    // Every other layout of the world, and of half of it (4 -> 2 ranks).
    std::vector<std::pair<MpiCommunicator, ParallelLayout>> targets;
    for (const auto& other : layouts_of(W))
      if (describe(other) != describe(layout)) targets.push_back({world, other});
    if (W == 4) {
      const MpiCommunicator half = world.split(world.rank() / 2, world.rank());
      for (const auto& other : layouts_of(2)) targets.push_back({half, other});
    }
    for (const auto& [group, other] : targets) {
      CAPTURE(describe(other), group.size());
      Run<MpiCommunicator> moved(ParallelGroups<MpiCommunicator>::create(group, other), 99);
      io::load_checkpoint(dir, moved.layer, moved.optimizer);
      for (int step = checkpoint_step; step < total_steps; ++step) moved.train_step(step);
      CHECK(max_error(moved, final_weights) <= 1e-10 * scale);
    }
  }
}

TEST_CASE("broken checkpoints raise on every rank and load nothing", "[mpi][checkpoint]") {
  namespace fs = std::filesystem;
  MpiCommunicator world = MpiCommunicator::world();
  ParallelLayout layout;
  layout.ep = world.size();
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  const std::string dir = checkpoint_root() + "/broken-np" + std::to_string(world.size());
  Run<MpiCommunicator> saved(groups, 7);
  saved.train_step(0);
  io::save_checkpoint(dir, saved.layer, saved.optimizer, {1, {}});

  Run<MpiCommunicator> target(groups, 99);
  const auto refused = [&](const std::string& message) {
    const auto before = values_of(target.layer.parameters());
    const auto steps = target.optimizer.steps();
    CHECK_THROWS_WITH(io::load_checkpoint(dir, target.layer, target.optimizer),
                      ContainsSubstring(message) || ContainsSubstring("another rank failed"));
    CHECK(values_of(target.layer.parameters()) == before);
    CHECK(target.optimizer.steps() == steps);
  };
  const auto on_rank0 = [&](auto&& change) {
    if (world.rank() == 0) change();
    world.any_error(false);  // a barrier: every rank sees the change
  };
  const fs::path shard = fs::path(dir) / "rank-1.safetensors", spare = fs::path(dir) / "spare";
  // A truncated shard: rank 1's file cut to half.
  on_rank0([&] {
    fs::copy_file(shard, spare, fs::copy_options::overwrite_existing);
    fs::resize_file(shard, fs::file_size(shard) / 2);
  });
  refused("rank-1.safetensors");
  // A missing shard.
  on_rank0([&] { fs::remove(shard); });
  refused("rank-1.safetensors");
  on_rank0([&] { fs::rename(spare, shard); });
  CHECK(target.optimizer.steps() == 0);  // nothing of the refused loads arrived
  CHECK_NOTHROW(io::load_checkpoint(dir, target.layer, target.optimizer));
  CHECK(target.optimizer.steps() == 1);

  // A model of another shape.
  using Wide = Layer<MpiCommunicator>;
  Wide other(Router({hidden, experts, top_k, true, 1.0, {}}),
             GLU({int(layout.local_experts(experts, groups.ep_rank).size()), hidden, ffn + 2}), {},
             GLU({1, hidden, shared_ffn}, "shared_experts"), groups);
  AdamW<X, S> other_optimizer(other.parameters(), {});
  CHECK_THROWS_WITH(io::load_checkpoint(dir, other, other_optimizer),
                    ContainsSubstring(
                        "tensor experts.w_gate has shape [4, 12, 8] in the checkpoint but "
                        "[4, 14, 8] in this model"));

  // An interrupted save (no index yet) is not a checkpoint.
  on_rank0([&] { fs::remove(fs::path(dir) / "index.json"); });
  CHECK(io::latest_checkpoint(checkpoint_root()).find("broken") == std::string::npos);
  refused("no complete checkpoint");
}

TEST_CASE("a softmax router's selection bias is saved and restored only when it has one",
          "[mpi][checkpoint]") {
  using Softmax = SoftmaxTopKRouter<X, S>;
  using SoftmaxLayer = MoELayer<Softmax, GLU, WeightedSumCombiner<X, S>, MpiCommunicator>;
  MpiCommunicator world = MpiCommunicator::world();
  ParallelLayout layout;
  layout.ep = world.size();
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  const auto make = [&](bool biased) {
    SoftmaxTopKConfig config{hidden, experts, top_k, true};
    config.selection_bias = biased;
    return SoftmaxLayer(
        Softmax(config),
        GLU({int(layout.local_experts(experts, groups.ep_rank).size()), hidden, ffn}), {},
        std::nullopt, groups);
  };
  const auto bias_of = [](const SoftmaxLayer& layer) {
    const auto host =
        Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.router().bias());
    return std::vector<S>(host.data(), host.data() + host.size());
  };
  const std::string root = checkpoint_root() + "/softmax-np" + std::to_string(world.size());
  const std::string with_bias = root + "/biased", without_bias = root + "/plain";

  auto saved = make(true);
  AdamW<X, S> saved_optimizer(saved.parameters(), {});
  auto bias = Kokkos::create_mirror_view(saved.router().bias());
  for (int e = 0; e < experts; ++e) bias(e) = 0.01 * (e - 1.5);
  Kokkos::deep_copy(saved.router().bias(), bias);
  io::save_checkpoint(with_bias, saved, saved_optimizer, {1, {}});
  auto restored = make(true);
  AdamW<X, S> restored_optimizer(restored.parameters(), {});
  CHECK(bias_of(restored) == std::vector<S>(experts, 0.0));
  io::load_checkpoint(with_bias, restored, restored_optimizer);
  CHECK(bias_of(restored) == bias_of(saved));

  // A router without a bias writes none, and neither kind takes the other's checkpoint.
  auto plain = make(false);
  AdamW<X, S> plain_optimizer(plain.parameters(), {});
  io::save_checkpoint(without_bias, plain, plain_optimizer, {1, {}});
  CHECK_NOTHROW(io::load_checkpoint(without_bias, plain, plain_optimizer));
  CHECK_THROWS_WITH(io::load_checkpoint(with_bias, plain, plain_optimizer),
                    ContainsSubstring("router.selection_bias saved, but this router has none") ||
                        ContainsSubstring("another rank failed"));
  CHECK_THROWS_WITH(io::load_checkpoint(without_bias, restored, restored_optimizer),
                    ContainsSubstring("no router.selection_bias") ||
                        ContainsSubstring("another rank failed"));
}
