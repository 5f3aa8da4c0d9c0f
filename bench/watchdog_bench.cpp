// SPDX-License-Identifier: BSD-3-Clause
// Cost of the MPI watchdog (`mpiexec -n P watchdog_bench`): the expert-parallel forward at
// the mixtral-prefill shape (bench/kmoe_bench.cpp: 4096 tokens in all, H 1024, F 3584,
// 8 experts, top-2 renormalised; EP = P ranks, 4096 / P tokens each) with the watchdog on
// (MpiOptions default: non-blocking collectives polled against a deadline, plus the
// call-sequence agreement, which runs either way) and off (collective_timeout 0: MPI's
// blocking calls). The two layers are timed in alternation in the same run, so that drift
// of a shared machine falls on both; each timed forward starts after a barrier and its
// time is the slowest rank's. Prints the median of each and the relative difference.
//
//   mpiexec -n 2 watchdog_bench [--pairs N] [--tokens T] [--ffn F]
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
#include <vector>

#include "support/flags.hpp"
#include "support/timing.hpp"

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = float;
using Router = kmoe::SoftmaxTopKRouter<X, S>;
using Experts = kmoe::SwiGLUExperts<X, S>;
using Layer =
    kmoe::MoELayer<Router, Experts, kmoe::WeightedSumCombiner<X, S>, kmoe::MpiCommunicator>;

constexpr int hidden = 1024, experts = 8, top_k = 2;

Layer make_layer(const kmoe::MpiCommunicator& world, int ffn) {
  kmoe::ParallelLayout layout;
  layout.ep = world.size();
  const auto groups = kmoe::ParallelGroups<kmoe::MpiCommunicator>::create(world, layout);
  const int local = int(layout.local_experts(experts, groups.ep_rank).size());
  Layer layer(Router({hidden, experts, top_k, true}), Experts({local, hidden, ffn}), {},
              std::nullopt, groups);
  kmoe::fill_normal(layer.parameters(), 0.02, 5);
  return layer;
}

/// The slowest rank's wall time of one forward, started together after a barrier.
double timed_forward(Layer& layer, const kmoe::Matrix<S, X>& x, const kmoe::Matrix<S, X>& y) {
  MPI_Barrier(MPI_COMM_WORLD);
  const auto start = std::chrono::steady_clock::now();
  layer.forward(x, y);
  Kokkos::fence();
  double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  MPI_Allreduce(MPI_IN_PLACE, &ms, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return ms;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  {
    Kokkos::ScopeGuard kokkos(argc, argv);
    int size = 1, rank = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    const int pairs = kmoe::bench::integer_flag(argc, argv, "--pairs", 7);
    const int tokens = kmoe::bench::integer_flag(argc, argv, "--tokens", 4096) / size;
    const int ffn = kmoe::bench::integer_flag(argc, argv, "--ffn", 3584);
    kmoe::MpiOptions off;
    off.collective_timeout = std::chrono::milliseconds(0);
    Layer watched = make_layer(kmoe::MpiCommunicator::world(), ffn);
    Layer blocking = make_layer(kmoe::MpiCommunicator::world(off), ffn);
    kmoe::Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden);
    kmoe::fill_normal(x, 1.0, 100 + rank);
    // Warm-up: workspaces, first touch, BLAS threads.
    timed_forward(watched, x, y);
    timed_forward(blocking, x, y);
    std::vector<double> on, off_ms;
    for (int p = 0; p < pairs; ++p) {
      // Alternate which goes first, so neither always follows the other.
      if (p % 2 == 0) {
        on.push_back(timed_forward(watched, x, y));
        off_ms.push_back(timed_forward(blocking, x, y));
      } else {
        off_ms.push_back(timed_forward(blocking, x, y));
        on.push_back(timed_forward(watched, x, y));
      }
    }
    if (rank == 0) {
      const double m_on = kmoe::bench::median(on), m_off = kmoe::bench::median(off_ms);
      std::printf("watchdog_bench: EP=%d, %d tokens per rank, H=%d F=%d E=%d k=%d, %d pairs\n",
                  size, tokens, hidden, ffn, experts, top_k, pairs);
      std::printf("forward median: watchdog on %.2f ms, off %.2f ms, difference %+.2f%%\n", m_on,
                  m_off, 100.0 * (m_on - m_off) / m_off);
      std::vector<double> ratios;
      for (int p = 0; p < pairs; ++p) ratios.push_back(on[p] / off_ms[p]);
      std::printf("median of per-pair on/off ratios: %.4f\n", kmoe::bench::median(ratios));
      std::printf("per pair (on/off ms):");
      for (int p = 0; p < pairs; ++p) std::printf(" %.1f/%.1f", on[p], off_ms[p]);
      std::printf("\n");
    }
  }
  MPI_Finalize();
  return 0;
}
