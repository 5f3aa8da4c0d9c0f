// SPDX-License-Identifier: BSD-3-Clause
// Parameter server, synchronous against bounded staleness (`mpiexec -n P parameter_server_bench`):
// the last rank serves the replicated parameters (router, shared experts), the other P-1 train
// the toy task of examples/train_toy.cpp (8 SwiGLU experts, sigmoid top-2 router with bias
// updates, Switch aux loss, AdamW) with expert parallelism over them, each on its own batch.
// Every mode starts from the same weights and data; the modes run in turn, --rounds times, so
// that a change in the machine's load falls on all of them. Reported in the same run: steps
// per second of the training loop (median over the rounds, and the range), its ratio to
// synchronous (s = 0), the first loss, the final loss (mean of the last 50 steps) and its
// ratio to synchronous. For context, the same workers also train
// with synchronize_gradients() (the all-reduce path; the server rank idles). Exits 1 unless
// every mode's loss fell by --min-drop.
//
//   mpiexec -n P parameter_server_bench [--steps N] [--staleness 0,1,2,4] [--shared-ffn F]
//                                       [--rounds R] [--min-drop R]
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/optimizer.hpp>
#include <kmoe/parameter_server.hpp>
#include <kmoe/routers/sigmoid_bias.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "support/timing.hpp"

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = float;
using Router = kmoe::SigmoidBiasRouter<X, S>;
using Experts = kmoe::SwiGLUExperts<X, S>;
using Layer =
    kmoe::MoELayer<Router, Experts, kmoe::WeightedSumCombiner<X, S>, kmoe::MpiCommunicator>;
using Server = kmoe::ParameterServer<X, S>;

constexpr int hidden = 16, ffn = 32, experts = 8, clusters = 8, batch = 256, final_window = 50;
const kmoe::AdamW<X, S>::Config adam{3e-3, 0.9, 0.999, 1e-8, 0.0};

const char* flag_value(int argc, char** argv, const char* flag) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], flag) == 0) return argv[i + 1];
  return nullptr;
}

struct Result {
  double seconds = 0, first_loss = 0, final_loss = 0;
};

/// Trains on `workers` (every rank of it); with `server`, through it, else by all-reduce.
Result train(const kmoe::MpiCommunicator& workers, Server* server, int steps, int shared_ffn) {
  kmoe::ParallelLayout layout;
  layout.ep = workers.size();
  const auto groups = kmoe::ParallelGroups<kmoe::MpiCommunicator>::create(workers, layout);
  const int local = int(layout.local_experts(experts, groups.ep_rank).size());
  kmoe::LayerOptions options;
  options.losses.switch_aux = 1e-2;
  std::optional<Experts> shared;
  if (shared_ffn > 0) shared.emplace(Experts({1, hidden, shared_ffn}, "shared_experts"));
  Layer layer(Router({hidden, experts, 2, true, 1.0, {}}), Experts({local, hidden, ffn}), options,
              shared, groups);
  kmoe::fill_normal(layer.parameters(), 0.2, 1);
  const auto trained_here =
      server ? kmoe::expert_parallel_parameters(layer.parameters()) : layer.parameters();
  kmoe::AdamW<X, S> optimizer(trained_here, adam);
  if (server) server->attach(layer);

  // The task: cluster centres c_i and maps A_i; x = c_i + 0.1 noise, target = A_i x.
  kmoe::Matrix<S, X> centres("centres", clusters, hidden);
  kmoe::Tensor3<S, X> maps("maps", clusters, hidden, hidden);
  kmoe::fill_normal(centres, 1.0, 2);
  kmoe::fill_normal(maps, 0.4, 3);
  kmoe::Matrix<S, X> x("x", batch, hidden), target("target", batch, hidden), y("y", batch, hidden),
      grad_y("grad_y", batch, hidden), grad_x("grad_x", batch, hidden),
      noise("noise", batch, hidden);
  Kokkos::View<double*, Kokkos::HostSpace> losses("losses", steps);

  MPI_Barrier(workers.native());
  const double start = MPI_Wtime();
  for (int step = 0; step < steps; ++step) {
    kmoe::fill_normal(noise, 0.1, 100 + std::uint64_t(step) * 64 + std::uint64_t(groups.ep_rank));
    for (int t = 0; t < batch; ++t) {
      const int c = (t * 7 + step + groups.ep_rank) % clusters;
      for (int h = 0; h < hidden; ++h) x(t, h) = centres(c, h) + noise(t, h);
      for (int o = 0; o < hidden; ++o) {
        S sum = 0;
        for (int h = 0; h < hidden; ++h) sum += maps(c, o, h) * x(t, h);
        target(t, o) = sum;
      }
    }
    kmoe::RouteContext<X> training;
    training.training = true;
    layer.forward(x, y, training);
    for (int t = 0; t < batch; ++t)
      for (int h = 0; h < hidden; ++h) {
        const double d = double(y(t, h)) - target(t, h);
        losses(step) += d * d / (batch * hidden);
        grad_y(t, h) = S(2 * d / (batch * hidden));
      }
    layer.zero_gradients();
    layer.backward(grad_y, grad_x);
    if (server)
      server->synchronize();
    else
      layer.synchronize_gradients();
    optimizer.step();
    layer.apply_bias_update(1e-3);
  }
  if (server) server->finish();
  Kokkos::View<double*, Kokkos::HostSpace> elapsed("elapsed", 1);
  elapsed(0) = MPI_Wtime() - start;
  workers.all_reduce_max(elapsed);
  workers.all_reduce_sum(losses);
  Result r;
  r.seconds = elapsed(0);
  r.first_loss = losses(0) / workers.size();
  for (int step = steps - final_window; step < steps; ++step)
    r.final_loss += losses(step) / workers.size() / final_window;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 0;
  {
    Kokkos::ScopeGuard kokkos(argc, argv);
    const char* steps_flag = flag_value(argc, argv, "--steps");
    const char* staleness_flag = flag_value(argc, argv, "--staleness");
    const char* shared_flag = flag_value(argc, argv, "--shared-ffn");
    const char* drop_flag = flag_value(argc, argv, "--min-drop");
    const char* rounds_flag = flag_value(argc, argv, "--rounds");
    const int rounds = rounds_flag ? std::atoi(rounds_flag) : 3;
    const int steps = steps_flag ? std::atoi(steps_flag) : 600;
    const int shared_ffn = shared_flag ? std::atoi(shared_flag) : 0;
    const double min_drop = drop_flag ? std::atof(drop_flag) : 10.0;
    std::vector<int> stalenesses;
    for (std::string list = staleness_flag ? staleness_flag : "0,1,2,4"; !list.empty();) {
      const auto comma = list.find(',');
      stalenesses.push_back(std::atoi(list.substr(0, comma).c_str()));
      list = comma == std::string::npos ? "" : list.substr(comma + 1);
    }
    const auto world = kmoe::MpiCommunicator::world();
    if (world.size() < 2 || steps < final_window || stalenesses.empty() || stalenesses[0] != 0 ||
        rounds < 1) {
      if (world.rank() == 0)
        std::fprintf(stderr,
                     "parameter_server_bench: needs >= 2 ranks, --steps >= %d, --rounds >= 1 "
                     "and a --staleness list starting with 0 (the synchronous baseline)\n",
                     final_window);
      status = 2;
    } else {
      const int worker_count = world.size() - 1;
      const bool worker = world.rank() < worker_count;
      const auto workers = world.split(worker ? 0 : 1, world.rank());
      std::vector<std::string> names = {"all-reduce"};
      for (int s : stalenesses) names.push_back("server s=" + std::to_string(s));
      // The losses are the same every round (same weights, data and reduction order); the
      // times are kept per round.
      std::vector<Result> results(names.size());
      std::vector<std::vector<double>> seconds(names.size());
      for (int round = 0; round < rounds; ++round) {
        if (worker) results[0] = train(workers, nullptr, steps, shared_ffn);
        for (std::size_t m = 1; m < names.size(); ++m) {
          Server server(world, {1, stalenesses[m - 1]});
          if (server.is_server())
            server.serve([](const kmoe::ParameterList<X, S>& shard) {
              return kmoe::AdamW<X, S>(shard, adam);
            });
          else
            results[m] = train(server.workers(), &server, steps, shared_ffn);
        }
        for (std::size_t m = 0; m < names.size(); ++m) seconds[m].push_back(results[m].seconds);
      }
      if (world.rank() == 0) {
        const Result& sync = results[1];
        const double sync_seconds = kmoe::bench::median(seconds[1]);
        std::printf(
            "parameter_server_bench: %d workers (EP%d, %d tokens each) + 1 server, %d steps, "
            "H %d F %d E %d, shared F %d, %d rounds\n",
            worker_count, worker_count, batch, steps, hidden, ffn, experts, shared_ffn, rounds);
        std::printf("%-12s %10s %15s %10s %11s %11s %8s %14s\n", "mode", "steps/s", "(range)",
                    "vs sync", "first loss", "final loss", "drop", "final vs sync");
        for (std::size_t m = 0; m < results.size(); ++m) {
          const Result& r = results[m];
          const double drop = r.first_loss / r.final_loss,
                       typical = kmoe::bench::median(seconds[m]);
          const auto [fastest, slowest] = std::minmax_element(seconds[m].begin(), seconds[m].end());
          std::printf("%-12s %10.1f   (%5.1f - %5.1f) %9.3fx %11.5f %11.5f %7.1fx %13.3fx\n",
                      names[m].c_str(), steps / typical, steps / *slowest, steps / *fastest,
                      sync_seconds / typical, r.first_loss, r.final_loss, drop,
                      r.final_loss / sync.final_loss);
          if (!(drop >= min_drop)) status = 1;
        }
      }
    }
    MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD);
  }
  MPI_Finalize();
  return status;
}
