// SPDX-License-Identifier: BSD-3-Clause
// Expert parallelism over MPI: `mpiexec -n N expert_parallel` spreads 8 experts over N ranks
// (EP = N), routes each rank's tokens to the experts' owners and back, and prints each
// rank's expert load and the checksum of the global output next to the checksum of one
// rank running the same layer on the whole batch. Exits non-zero if they differ.
// `--stats-jsonl PREFIX` writes each rank's monitoring line (kmoe::StatsLog, with the bytes
// it exchanged with every peer) to PREFIX.rank<r>.jsonl.
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/monitoring/stats_log.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = double;
using Router = kmoe::SoftmaxTopKRouter<X, S>;
using Experts = kmoe::SwiGLUExperts<X, S>;

constexpr int experts = 8, top_k = 2, hidden = 32, ffn = 64, tokens_per_rank = 64;

double sum(const kmoe::Matrix<S, X>& y) {
  double total = 0;
  Kokkos::parallel_reduce(
      Kokkos::RangePolicy<X>(0, y.size()),
      KOKKOS_LAMBDA(std::size_t i, double& acc) { acc += y.data()[i]; }, total);
  return total;
}

int run(const char* stats_prefix) {
  const auto world = kmoe::MpiCommunicator::world();
  const int ranks = world.size(), rank = world.rank();
  kmoe::ParallelLayout layout;
  layout.ep = ranks;
  const auto groups = kmoe::ParallelGroups<kmoe::MpiCommunicator>::create(world, layout);
  const auto owned = layout.local_experts(experts, groups.ep_rank);

  // The single-rank layer holds the full weights; each rank copies its experts' block
  // (block placement: contiguous experts, so one contiguous range of every expert tensor).
  kmoe::MoELayer<Router, Experts> single(Router({hidden, experts, top_k, true}),
                                         Experts({experts, hidden, ffn}));
  kmoe::fill_normal(single.parameters(), 0.2, 2024);
  kmoe::MoELayer<Router, Experts, kmoe::WeightedSumCombiner<X, S>, kmoe::MpiCommunicator> layer(
      Router({hidden, experts, top_k, true}), Experts({int(owned.size()), hidden, ffn}), {},
      std::nullopt, groups);
  std::optional<kmoe::StatsLog> stats_log;
  if (stats_prefix) {
    stats_log.emplace(std::string(stats_prefix) + ".rank" + std::to_string(rank) + ".jsonl",
                      kmoe::StatsLogContext{rank, hidden, sizeof(S)});
    layer.set_phase_timing(true);
  }
  const auto full = single.parameters();
  const auto mine = layer.parameters();
  const std::size_t router_tensors = 1;  // router.weight comes first in both lists
  for (std::size_t p = 0; p < full.size(); ++p) {
    const std::size_t per_expert = p < router_tensors ? 0 : full[p].value.size() / experts;
    const std::size_t first = per_expert * std::size_t(owned.front());
    Kokkos::deep_copy(mine[p].value,
                      Kokkos::subview(full[p].value,
                                      std::make_pair(first, first + mine[p].value.size())));
  }

  const int global_tokens = tokens_per_rank * ranks;
  kmoe::Matrix<S, X> x("x", global_tokens, hidden), y_single("y_single", global_tokens, hidden);
  kmoe::fill_normal(x, 1.0, 7);
  const auto rows = std::make_pair(rank * tokens_per_rank, (rank + 1) * tokens_per_rank);
  kmoe::Matrix<S, X> x_local("x_local", tokens_per_rank, hidden), y("y", tokens_per_rank, hidden);
  Kokkos::deep_copy(x_local, Kokkos::subview(x, rows, Kokkos::ALL));

  const auto stats = layer.forward(x_local, y);
  if (stats_log) stats_log->write(0, "moe", stats);
  std::int64_t load = 0;  // assignments this rank's experts process, from every rank
  for (int e : owned) load += stats.tokens_per_expert[e];

  std::vector<long long> loads(ranks);
  long long mine_load = load;
  MPI_Gather(&mine_load, 1, MPI_LONG_LONG, loads.data(), 1, MPI_LONG_LONG, 0, world.native());
  double local_sum = sum(y), distributed = 0;
  MPI_Allreduce(&local_sum, &distributed, 1, MPI_DOUBLE, MPI_SUM, world.native());

  int ok = 1;
  if (rank == 0) {
    single.forward(x, y_single);
    const double reference = sum(y_single);
    for (int r = 0; r < ranks; ++r) {
      const auto theirs = layout.local_experts(experts, r);
      std::printf("rank %d: experts %d-%d, %lld assignments of %d\n", r, theirs.front(),
                  theirs.back(), loads[r], global_tokens * top_k);
    }
    std::printf("imbalance (max/mean expert load): %.3f\n", stats.imbalance());
    std::printf("checksum distributed: %.12f\n", distributed);
    std::printf("checksum single-rank: %.12f\n", reference);
    ok = std::abs(distributed - reference) <= 1e-9 * std::max(1.0, std::abs(reference));
    std::printf("%s\n", ok ? "match" : "MISMATCH");
  }
  MPI_Bcast(&ok, 1, MPI_INT, 0, world.native());
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char* argv[]) {
  MPI_Init(&argc, &argv);
  int status = 0;
  {
    Kokkos::ScopeGuard kokkos(argc, argv);
    const char* stats_prefix = nullptr;
    for (int i = 1; i + 1 < argc; ++i)
      if (std::strcmp(argv[i], "--stats-jsonl") == 0) stats_prefix = argv[i + 1];
    status = run(stats_prefix);
  }
  MPI_Finalize();
  return status;
}
