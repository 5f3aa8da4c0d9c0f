// SPDX-License-Identifier: BSD-3-Clause
// Gradient sync, blocking against overlapped (`mpiexec -n P gradient_sync_bench`): the time
// from the start of backward to gradients ready for the optimizer step.
//  - blocking:   backward(), then synchronize_gradients() starts and waits for every bucket;
//  - overlapped: backward() starts each group's buckets as soon as it has produced them
//                (routed experts, shared experts, router; LayerOptions::gradient_sync.overlap)
//                and synchronize_gradients() waits.
// Both layers hold the same weights and see the same tokens; the two modes alternate every
// repeat, so that a change in the machine's load falls on both. Each time is the slowest
// rank's (the step waits for it). Reported: the median and range of each, the blocking
// run's sync alone (its all-reduce time, synchronize_gradients() after backward), and the
// fraction of that all-reduce time the overlap hides, (blocking - overlapped) / sync.
// The forward before each backward is not timed. The layout is EP x DP (default DP = P:
// every expert replicated, so the routed experts' gradients are all-reduced too).
//
//   mpiexec -n P gradient_sync_bench [--ep E] [--tokens T] [--hidden H] [--ffn F]
//                                    [--experts N] [--bucket-mib M] [--repeats R]
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "support/flags.hpp"
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
using kmoe::bench::clock_type;

struct Shape : kmoe::bench::LayerShape {
  double bucket_mib = 25;
};

Layer make_layer(const kmoe::ParallelGroups<kmoe::MpiCommunicator>& groups, const Shape& shape,
                 bool overlap) {
  kmoe::LayerOptions options;
  options.gradient_sync.overlap = overlap;
  options.gradient_sync.bucket_bytes = std::size_t(shape.bucket_mib * (1 << 20));
  const int local = int(groups.layout.local_experts(shape.experts, groups.ep_rank).size());
  Layer layer(Router({shape.hidden, shape.experts, 2}), Experts({local, shape.hidden, shape.ffn}),
              options, Experts({1, shape.hidden, shape.ffn}, "shared_experts"), groups);
  kmoe::InitConfig init;
  kmoe::initialize(layer.parameters(), init, 11);
  return layer;
}

/// Times both modes on `shape` and prints the report on rank 0.
void run(const kmoe::MpiCommunicator& world, const Shape& shape) {
  kmoe::ParallelLayout layout;
  layout.ep = shape.ep;
  layout.dp = world.size() / shape.ep;
  const auto groups = kmoe::ParallelGroups<kmoe::MpiCommunicator>::create(world, layout);
  Layer blocking = make_layer(groups, shape, false), overlapped = make_layer(groups, shape, true);

  kmoe::Matrix<S, X> x("x", shape.tokens, shape.hidden),
      grad_y("grad_y", shape.tokens, shape.hidden);
  kmoe::Matrix<S, X> y("y", shape.tokens, shape.hidden),
      grad_x("grad_x", shape.tokens, shape.hidden);
  kmoe::fill_normal(x, 1.0, 100 + world.rank());
  kmoe::fill_normal(grad_y, 1.0 / shape.tokens, 200 + world.rank());
  kmoe::RouteContext<X> training;
  training.training = true;

  std::vector<double> blocked, overlaps, syncs;
  for (int r = -1; r < shape.repeats; ++r) {  // r = -1: warm-up, not recorded
    for (Layer* layer : {&blocking, &overlapped}) {
      layer->zero_gradients();
      layer->forward(x, y, training);
      world.any_error(false);  // every rank starts backward together
      const auto start = clock_type::now();
      layer->backward(grad_y, grad_x);
      const auto synced = clock_type::now();
      layer->synchronize_gradients();
      const double total =
          kmoe::bench::largest_over_ranks(world, kmoe::bench::seconds_since(start));
      const double sync =
          kmoe::bench::largest_over_ranks(world, kmoe::bench::seconds_since(synced));
      if (r < 0) continue;
      if (layer == &blocking) {
        blocked.push_back(total);
        syncs.push_back(sync);
      } else {
        overlaps.push_back(total);
      }
    }
  }
  std::size_t gradient_bytes = 0;
  for (const auto& p : blocking.parameters()) gradient_bytes += p.grad.size() * sizeof(S);
  if (world.rank() == 0) {
    const auto range = [](const std::vector<double>& v) {
      return std::to_string(1e3 * *std::min_element(v.begin(), v.end())).substr(0, 6) + " - " +
             std::to_string(1e3 * *std::max_element(v.begin(), v.end())).substr(0, 6);
    };
    const double b = kmoe::bench::median(blocked), o = kmoe::bench::median(overlaps),
                 s = kmoe::bench::median(syncs);
    std::printf(
        "gradient_sync_bench: %d ranks EP%d x DP%d, T=%d per rank, H=%d, F=%d, E=%d + 1 shared, "
        "%.1f MiB of gradients per rank, buckets %.0f MiB, %d repeats (median, range in ms)\n",
        world.size(), layout.ep, layout.dp, shape.tokens, shape.hidden, shape.ffn, shape.experts,
        double(gradient_bytes) / (1 << 20), shape.bucket_mib, shape.repeats);
    std::printf("blocking   backward + sync  %8.3f ms  (%s)\n", 1e3 * b, range(blocked).c_str());
    std::printf("  of which sync alone       %8.3f ms  (%s)\n", 1e3 * s, range(syncs).c_str());
    std::printf("overlapped backward + wait  %8.3f ms  (%s)\n", 1e3 * o, range(overlaps).c_str());
    std::printf("overlapped / blocking %.3f; all-reduce time hidden %.1f%%\n", o / b,
                100.0 * (b - o) / s);
  }
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 0;
  {
    Kokkos::ScopeGuard kokkos(argc, argv);
    const auto world = kmoe::MpiCommunicator::world();
    Shape shape;
    shape.bucket_mib = kmoe::bench::integer_flag(argc, argv, "--bucket-mib", 25);
    if (!kmoe::bench::read_layer_shape(argc, argv, world, shape)) {
      status = 1;
    } else {
      run(world, shape);
    }
  }
  MPI_Finalize();
  return status;
}
