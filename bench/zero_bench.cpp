// SPDX-License-Identifier: BSD-3-Clause
// Sharded optimizer state (`mpiexec -n P zero_bench`): AdamW's state bytes per rank and the
// time of the step after backward, unsharded against ZeRO-1 and ZeRO-2, in one run.
//  - unsharded: layer.synchronize_gradients() (all-reduce), the global clip, AdamW.step();
//  - ZeRO-1:    the same all-reduce, the clip over this rank's shard, the shard's update,
//               the all-gather of the updated parameters;
//  - ZeRO-2:    a reduce-scatter instead of the all-reduce, then as ZeRO-1.
// The three layers hold the same weights and see the same tokens; they alternate every
// repeat, so a change in the machine's load falls on all three. Each time is the slowest
// rank's; forward and backward before it are not timed. After the run the weights of each
// sharded run are compared with the unsharded run's (bitwise for ZeRO-1; ZeRO-2 adds in
// rank order, bitwise at 2 ranks).
//
//   mpiexec -n P zero_bench [--ep E] [--tokens T] [--hidden H] [--ffn F] [--experts N]
//                           [--repeats R]
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/global_clip.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/optimizer.hpp>
#include <kmoe/routers/softmax_topk.hpp>
#include <kmoe/sharded_optimizer.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "support/largest_over_ranks.hpp"
#include "support/layer_shape.hpp"
#include "support/timing.hpp"

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = float;
using Router = kmoe::SoftmaxTopKRouter<X, S>;
using Experts = kmoe::SwiGLUExperts<X, S>;
using Layer =
    kmoe::MoELayer<Router, Experts, kmoe::WeightedSumCombiner<X, S>, kmoe::MpiCommunicator>;
using AdamW = kmoe::AdamW<X, S>;
using Sharded = kmoe::ShardedOptimizer<AdamW, kmoe::MpiCommunicator>;
using kmoe::bench::clock_type;
constexpr double max_norm = 1.0;

using Shape = kmoe::bench::LayerShape;

/// One optimizer side: its layer, and the step after backward for it.
struct Side {
  const char* name;
  Layer layer;
  std::vector<double> seconds;
};

void run(const kmoe::MpiCommunicator& world, const Shape& shape) {
  kmoe::ParallelLayout layout;
  layout.ep = shape.ep;
  layout.dp = world.size() / shape.ep;
  const auto groups = kmoe::ParallelGroups<kmoe::MpiCommunicator>::create(world, layout);
  const int local = int(layout.local_experts(shape.experts, groups.ep_rank).size());
  const auto make_layer = [&] {
    Layer layer(Router({shape.hidden, shape.experts, 2}), Experts({local, shape.hidden, shape.ffn}),
                {}, Experts({1, shape.hidden, shape.ffn}, "shared_experts"), groups);
    kmoe::initialize(layer.parameters(), kmoe::InitConfig{}, 11);
    return layer;
  };
  std::vector<Side> sides;
  for (const char* name : {"unsharded", "ZeRO-1", "ZeRO-2"})
    sides.push_back({name, make_layer(), {}});
  const AdamW::Config config{1e-3, 0.9, 0.999, 1e-8, 0.01};
  AdamW plain(sides[0].layer.parameters(), config);
  Sharded zero1(sides[1].layer, config, {kmoe::ZeroStage::one});
  Sharded zero2(sides[2].layer, config, {kmoe::ZeroStage::two});

  kmoe::Matrix<S, X> x("x", shape.tokens, shape.hidden), y("y", shape.tokens, shape.hidden),
      grad_y("grad_y", shape.tokens, shape.hidden), grad_x("grad_x", shape.tokens, shape.hidden);
  kmoe::fill_normal(x, 1.0, 100 + std::uint64_t(world.rank()));
  kmoe::fill_normal(grad_y, 1.0 / shape.tokens, 200 + std::uint64_t(world.rank()));
  kmoe::RouteContext<X> training;
  training.training = true;
  for (int r = -1; r < shape.repeats; ++r) {  // r = -1: warm-up, not recorded
    for (std::size_t s = 0; s < sides.size(); ++s) {
      Layer& layer = sides[s].layer;
      layer.zero_gradients();
      layer.forward(x, y, training);
      layer.backward(grad_y, grad_x);
      world.any_error(false);  // every rank starts the step together
      const auto start = clock_type::now();
      if (s == 0) {
        layer.synchronize_gradients();
        kmoe::clip_grad_norm(layer, max_norm);
        plain.step();
      } else {
        Sharded& zero = s == 1 ? zero1 : zero2;
        zero.reduce_gradients(layer);
        zero.clip_grad_norm(max_norm);
        zero.step();
      }
      const double mine = kmoe::bench::seconds_since(start);
      const double slowest = kmoe::bench::largest_over_ranks(world, mine);
      if (r >= 0) sides[s].seconds.push_back(slowest);
    }
  }
  const double state[3] = {kmoe::bench::largest_over_ranks(world, double(plain.state_bytes())),
                           kmoe::bench::largest_over_ranks(world, double(zero1.state_bytes())),
                           kmoe::bench::largest_over_ranks(world, double(zero2.state_bytes()))};
  // Weights against the unsharded run's: the elements that differ (on the rank with the
  // most) and the largest difference relative to the largest weight.
  double differing[3] = {0, 0, 0}, relative[3] = {0, 0, 0};
  const auto reference = sides[0].layer.parameters();
  for (std::size_t s = 1; s < sides.size(); ++s) {
    const auto mine = sides[s].layer.parameters();
    double count = 0, worst = 0, largest = 0;
    for (std::size_t p = 0; p < mine.size(); ++p)
      for (std::size_t i = 0; i < mine[p].value.size(); ++i) {
        count += mine[p].value(i) != reference[p].value(i);
        worst = std::max(worst, double(std::abs(mine[p].value(i) - reference[p].value(i))));
        largest = std::max(largest, double(std::abs(reference[p].value(i))));
      }
    differing[s] = kmoe::bench::largest_over_ranks(world, count);
    relative[s] = kmoe::bench::largest_over_ranks(world, worst / largest);
  }
  if (world.rank() != 0) return;
  std::size_t parameter_bytes = 0;
  for (const auto& p : reference) parameter_bytes += p.value.size() * sizeof(S);
  std::printf("zero_bench: %d ranks EP%d x DP%d, T=%d per rank, H=%d, F=%d, E=%d + 1 shared, "
              "float32, %.2f MiB of parameters per rank, %d repeats (median step after backward)\n",
              world.size(), layout.ep, layout.dp, shape.tokens, shape.hidden, shape.ffn,
              shape.experts, double(parameter_bytes) / (1 << 20), shape.repeats);
  std::printf("| optimizer | state per rank (largest) | state / unsharded | step after backward "
              "| step / unsharded | weights differing from unsharded (max relative) |\n"
              "|---|---|---|---|---|---|\n");
  std::vector<double> medians;
  for (auto& side : sides) {
    std::sort(side.seconds.begin(), side.seconds.end());
    medians.push_back(side.seconds[side.seconds.size() / 2]);
  }
  for (std::size_t s = 0; s < sides.size(); ++s)
    std::printf("| %s | %.3f MiB | %.3f | %.2f ms | %.3f | %.0f (%.1e) |\n", sides[s].name,
                state[s] / (1 << 20), state[s] / state[0], 1e3 * medians[s],
                medians[s] / medians[0], differing[s], relative[s]);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 0;
  {
    Kokkos::ScopeGuard kokkos(argc, argv);
    const auto world = kmoe::MpiCommunicator::world();
    Shape shape;
    shape.tokens = 128, shape.repeats = 10;  // this benchmark's defaults
    if (!kmoe::bench::read_layer_shape(argc, argv, world, shape)) {
      status = 1;
    } else {
      run(world, shape);
    }
  }
  MPI_Finalize();
  return status;
}
