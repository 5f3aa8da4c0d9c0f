// SPDX-License-Identifier: BSD-3-Clause
// Rebalancing a replicated expert placement from recorded load (`mpiexec -n P
// placement_bench`, EP = P): a DeepSeek-style sigmoid router whose selection bias sends
// every token to expert 0 (4x the mean load with 8 experts, top-2), on a placement made for
// yesterday's load (the last two experts hot, so expert 0 has a single replica). The run records
// the load (ExpertLoadWindow), computes the EPLB placement (balanced_placement) and moves to
// it with MoELayer::apply_placement (weights and AdamW moments), then alternates between the
// two placements round after round. Both sides time the same training step (forward,
// backward, gradient sync, AdamW step) on the same batch; a step's time is the slowest
// rank's. Reported per placement: median step time, measured max/mean rank load (rows each
// rank's experts processed), and the bytes and time of each move.
//
//   mpiexec -n 4 placement_bench [--tokens T] [--hidden H] [--ffn F] [--steps N] [--rounds R]
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/monitoring/load_window.hpp>
#include <kmoe/optimizer.hpp>
#include <kmoe/placement/rebalance.hpp>
#include <kmoe/routers/sigmoid_bias.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "support/flags.hpp"
#include "support/timing.hpp"

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = float;
using Router = kmoe::SigmoidBiasRouter<X, S>;
using Experts = kmoe::SwiGLUExperts<X, S>;
using Layer =
    kmoe::MoELayer<Router, Experts, kmoe::WeightedSumCombiner<X, S>, kmoe::MpiCommunicator>;

constexpr int experts = 8, top_k = 2;

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  {
    Kokkos::ScopeGuard kokkos(argc, argv);
    const int tokens = kmoe::bench::integer_flag(argc, argv, "--tokens", 512),
              hidden = kmoe::bench::integer_flag(argc, argv, "--hidden", 256);
    const int ffn = kmoe::bench::integer_flag(argc, argv, "--ffn", 512),
              steps = kmoe::bench::integer_flag(argc, argv, "--steps", 5);
    const int rounds = kmoe::bench::integer_flag(argc, argv, "--rounds", 3);
    const auto world = kmoe::MpiCommunicator::world();
    const int ranks = world.size(), rank = world.rank();
    kmoe::ParallelLayout layout;
    layout.ep = ranks;
    const auto groups = kmoe::ParallelGroups<kmoe::MpiCommunicator>::create(world, layout);
    const int slots = (experts + ranks - 1) / ranks + 1;  // one spare slot per rank

    // Yesterday: the last two experts were the hot ones, so the spare slots replicate them.
    std::vector<std::int64_t> yesterday(experts, 100);
    yesterday[experts - 1] = 400;
    yesterday[experts - 2] = 300;
    kmoe::LayerOptions options;
    options.expert_placement = kmoe::balanced_placement(yesterday, ranks, slots);
    const kmoe::ExpertPlacement old_placement = options.expert_placement;

    Layer layer(Router(kmoe::SigmoidBiasConfig{hidden, experts, top_k, true, 1.0, {}}),
                Experts({slots, hidden, ffn}), options, std::nullopt, groups);
    // Weights by logical expert, so that replicas are identical: expert e's slices drawn
    // from seed 100 + e.
    for (const auto& p : layer.parameters()) {
      if (!p.shard.expert_parallel) {
        kmoe::fill_normal(p.value, 0.05, 7);
        continue;
      }
      const std::size_t width = p.value.size() / slots;
      for (int j = 0; j < slots; ++j)
        kmoe::fill_normal(Kokkos::subview(p.value, std::make_pair(j * width, (j + 1) * width)),
                          0.05, 100 + old_placement.logical[std::size_t(rank * slots + j)]);
    }
    auto bias = Kokkos::create_mirror_view(layer.router().bias());
    for (int e = 0; e < experts; ++e) bias(e) = e == 0 ? 10.0f : 0.0f;  // every token: expert 0
    Kokkos::deep_copy(layer.router().bias(), bias);
    kmoe::AdamW<X, S> optimizer(layer.parameters(), {1e-4, 0.9, 0.999, 1e-8, 0.0});

    kmoe::Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden), gy("gy", tokens, hidden),
        gx("gx", tokens, hidden);
    kmoe::fill_normal(x, 1.0, 11 + rank);
    kmoe::fill_normal(gy, 1e-3, 21 + rank);
    kmoe::RouteContext<X> training;
    training.training = true;
    kmoe::ExpertLoadWindow window(experts, steps);

    // One training step; returns the slowest rank's time and the max/mean rank load.
    const auto step = [&](double& load_ratio) {
      MPI_Barrier(world.native());
      const auto start = std::chrono::steady_clock::now();
      layer.zero_gradients();
      const auto stats = layer.forward(x, y, training);
      layer.backward(gy, gx);
      layer.synchronize_gradients();
      optimizer.step();
      double seconds = kmoe::bench::seconds_since(start), slowest = 0;
      MPI_Allreduce(&seconds, &slowest, 1, MPI_DOUBLE, MPI_MAX, world.native());
      window.record(stats.tokens_per_expert);
      double mine = 0, largest = 0, total = 0;
      for (auto rows : stats.combine_rows_sent) mine += double(rows);
      MPI_Allreduce(&mine, &largest, 1, MPI_DOUBLE, MPI_MAX, world.native());
      MPI_Allreduce(&mine, &total, 1, MPI_DOUBLE, MPI_SUM, world.native());
      load_ratio = total > 0 ? largest * ranks / total : 0;
      return slowest;
    };

    double ratio = 0;
    step(ratio);  // warm-up, and the first record of the load
    for (int i = 1; i < steps; ++i) step(ratio);
    const kmoe::ExpertPlacement new_placement =
        kmoe::balanced_placement(window.totals(), ranks, slots);
    const kmoe::ExpertPlacement* placements[2] = {&old_placement, &new_placement};
    if (rank == 0)
      std::printf("placement_bench: %d EP ranks, %d experts top-%d, %d slots per rank, T=%d H=%d "
                  "F=%d per rank, expert 0 chosen by every token\n",
                  ranks, experts, top_k, slots, tokens, hidden, ffn);
    std::vector<double> times[2], ratios[2], move_seconds;
    std::vector<long long> move_bytes;
    int current = 0, moved_slots = 0;
    for (int round = 0; round < rounds; ++round)
      for (int side = 0; side < 2; ++side) {
        if (side != current) {
          MPI_Barrier(world.native());
          const auto start = std::chrono::steady_clock::now();
          const auto change = layer.apply_placement(*placements[side], optimizer.state());
          MPI_Barrier(world.native());
          move_seconds.push_back(kmoe::bench::seconds_since(start));
          long long bytes = change.bytes_sent, all = 0;
          MPI_Allreduce(&bytes, &all, 1, MPI_LONG_LONG, MPI_SUM, world.native());
          move_bytes.push_back(all);
          moved_slots = change.moved_slots;
          current = side;
        }
        for (int i = 0; i < steps; ++i) {
          times[side].push_back(step(ratio));
          ratios[side].push_back(ratio);
        }
      }
    if (rank == 0) {
      const char* names[2] = {"yesterday's placement", "rebalanced (EPLB)  "};
      for (int side = 0; side < 2; ++side)
        std::printf("%s: step median %.2f ms, max/mean rank load %.3f (policy model %.3f)\n",
                    names[side], 1e3 * kmoe::bench::median(times[side]),
                    kmoe::bench::median(ratios[side]),
                    placements[side]->max_over_mean(window.totals()));
      std::printf("step time rebalanced / yesterday's: %.3f\n",
                  kmoe::bench::median(times[1]) / kmoe::bench::median(times[0]));
      std::printf("each move: %d slots, %.2f MB over all ranks (weights + AdamW moments), median "
                  "%.1f ms over %zu moves\n",
                  moved_slots, move_bytes.empty() ? 0.0 : move_bytes.front() / 1e6,
                  move_seconds.empty() ? 0.0 : 1e3 * kmoe::bench::median(move_seconds),
                  move_seconds.size());
    }
  }
  MPI_Finalize();
  return 0;
}
