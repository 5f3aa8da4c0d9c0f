// SPDX-License-Identifier: BSD-3-Clause
// The pipelined exchange (LayerOptions::exchange_chunks, docs/parallel.md "Pipelined
// exchange") against the sequential one (C = 1), `mpiexec -n P pipeline_bench`: EP = P
// ranks, a Mixtral-like layer (top-2 of E SwiGLU experts, training_mode recompute, no
// shared expert unless --shared-ffn). In the same run, repetition by repetition, each after
// an MPI_Barrier and in an order that rotates with the repetition:
//  - for each C of --chunks (1 first: the baseline; 0: the layer's choice), one layer with
//    the same parameters: a forward (inference), and a training step (forward, backward,
//    synchronize_gradients, with the gradients zeroed outside the timing);
//  - the raw wire time of the same step: MPI_Alltoallv of the step's exact per-peer byte
//    counts (the dispatch payload with its links' header, and the return; for the
//    training step also the backward's two exchanges, the return's counts both ways) on
//    buffers of those sizes, nothing computed.
// Each figure is the median over repetitions per rank, the maximum over ranks. The
// communication share is the raw wire time over the sequential layer's time of the same
// step. Load average (/proc/loadavg) at the start and the end, since the machine may be
// shared. Run with one OpenMP thread per rank (OMP_NUM_THREADS=1) so that computation and
// communication compete honestly; over a shaped link, see tests/multihost/multihost.sh
// --pipeline-bench.
//
//   mpiexec -n 2 pipeline_bench [--tokens T] [--hidden H] [--ffn F] [--experts E]
//                               [--shared-ffn F] [--repeats N] [--chunks 1,2,4,0]
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
#include <fstream>
#include <memory>
#include <optional>
#include <string>
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
using kmoe::bench::clock_type;

constexpr int top_k = 2;

/// --chunks: comma-separated counts, each >= 0 (0: the layer's choice); 1 is put first
/// (the baseline) if absent.
std::vector<int> chunk_list(int argc, char** argv) {
  std::string text = "1,2,4,0";
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--chunks") == 0) text = argv[i + 1];
  std::vector<int> list = {1};
  std::size_t at = 0;
  while (at <= text.size()) {
    const std::size_t comma = std::min(text.find(',', at), text.size());
    const std::string item = text.substr(at, comma - at);
    char* end = nullptr;
    const long value = std::strtol(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || value < 0 || value > 64) {
      std::fprintf(stderr, "pipeline_bench: --chunks must list counts in [0, 64], not '%s'\n",
                   text.c_str());
      std::exit(1);
    }
    if (value != 1) list.push_back(int(value));
    at = comma + 1;
  }
  return list;
}

std::string load_average() {
  std::ifstream in("/proc/loadavg");
  std::string one, five, fifteen;
  in >> one >> five >> fifteen;
  return one.empty() ? "unknown" : one + " " + five + " " + fifteen;
}

/// Element counts of `rows` per peer.
std::vector<int> elements(const std::vector<std::int64_t>& rows, int hidden) {
  std::vector<int> out;
  for (auto r : rows) out.push_back(int(r * hidden));
  return out;
}

/// One MPI_Alltoallv of `send` / `recv` elements per peer (displacements packed).
struct RawExchange {
  std::vector<int> send, recv, send_displs, recv_displs;
  std::vector<S> send_buffer, recv_buffer;

  RawExchange(std::vector<int> send_counts, std::vector<int> recv_counts)
      : send(std::move(send_counts)), recv(std::move(recv_counts)) {
    send_displs.assign(send.size(), 0);
    recv_displs.assign(recv.size(), 0);
    for (std::size_t p = 1; p < send.size(); ++p) {
      send_displs[p] = send_displs[p - 1] + send[p - 1];
      recv_displs[p] = recv_displs[p - 1] + recv[p - 1];
    }
    send_buffer.assign(std::size_t(send_displs.back() + send.back()), S(1));
    recv_buffer.assign(std::size_t(recv_displs.back() + recv.back()), S(0));
  }
  void run(MPI_Comm comm) {
    MPI_Alltoallv(send_buffer.data(), send.data(), send_displs.data(), MPI_FLOAT,
                  recv_buffer.data(), recv.data(), recv_displs.data(), MPI_FLOAT, comm);
  }
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  {
    Kokkos::ScopeGuard kokkos(argc, argv);
    const int tokens = kmoe::bench::integer_flag(argc, argv, "--tokens", 2048);
    const int hidden = kmoe::bench::integer_flag(argc, argv, "--hidden", 1024);
    const int ffn = kmoe::bench::integer_flag(argc, argv, "--ffn", 1024);
    const int experts = kmoe::bench::integer_flag(argc, argv, "--experts", 8);
    const int repeats = kmoe::bench::integer_flag(argc, argv, "--repeats", 7);
    int shared_ffn = 0;
    for (int i = 1; i + 1 < argc; ++i)
      if (std::strcmp(argv[i], "--shared-ffn") == 0) shared_ffn = std::atoi(argv[i + 1]);
    const std::vector<int> chunks = chunk_list(argc, argv);
    const std::string load_before = load_average();

    const auto world = kmoe::MpiCommunicator::world();
    const int ranks = world.size(), me = world.rank();
    MPI_Comm comm = world.native();
    if (ranks < 2) {
      std::fprintf(stderr,
                   "pipeline_bench: needs at least 2 MPI ranks (expert parallelism), "
                   "not %d\n",
                   ranks);
      MPI_Abort(comm, 1);
    }
    kmoe::ParallelLayout layout;
    layout.ep = ranks;
    const auto groups = kmoe::ParallelGroups<kmoe::MpiCommunicator>::create(world, layout);
    const int local = int(layout.local_experts(experts, groups.ep_rank).size());
    kmoe::Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden), gy("gy", tokens, hidden),
        gx("gx", tokens, hidden);
    kmoe::fill_normal(x, 1.0, 100 + me);
    kmoe::fill_normal(gy, 1.0, 200 + me);

    std::vector<std::unique_ptr<Layer>> layers;
    for (int c : chunks) {
      kmoe::LayerOptions options;
      options.exchange_chunks = c;
      options.training_mode = kmoe::ExpertMode::recompute;  // the pipeline stores nothing
      std::optional<Experts> shared;
      if (shared_ffn > 0) shared = Experts({1, hidden, shared_ffn}, "shared_experts");
      layers.push_back(std::make_unique<Layer>(Router({hidden, experts, top_k, true}),
                                               Experts({local, hidden, ffn}), options, shared,
                                               groups));
      kmoe::fill_normal(layers.back()->parameters(), 0.02, 5);
    }
    kmoe::RouteContext<X> training;
    training.training = true;

    // The step's per-peer bytes, from the sequential layer's forward (every layer routes
    // the same: same parameters, same x).
    const kmoe::ForwardStats stats = layers[0]->forward(x, y);
    std::vector<int> used_chunks;
    for (auto& layer : layers) used_chunks.push_back(layer->forward(x, y).exchange_chunks);
    std::vector<std::int64_t> dispatch_send(std::size_t(ranks), 0);
    for (int p = 0; p < ranks; ++p)
      dispatch_send[p] = stats.dispatch_rows[p] + stats.dispatch_header_rows[p];
    std::vector<std::int64_t> dispatch_recv(std::size_t(ranks), 0);
    MPI_Alltoall(dispatch_send.data(), 1, MPI_INT64_T, dispatch_recv.data(), 1, MPI_INT64_T, comm);
    // Dispatch out; return (expert rank -> token rank): each rank sends combine_rows_sent.
    RawExchange dispatch(elements(dispatch_send, hidden), elements(dispatch_recv, hidden));
    RawExchange give_back(elements(stats.combine_rows_sent, hidden),
                          elements(stats.combine_rows_received, hidden));
    RawExchange take_back(elements(stats.combine_rows_received, hidden),
                          elements(stats.combine_rows_sent, hidden));

    const auto timed = [&](auto&& work) {
      MPI_Barrier(comm);
      const auto start = clock_type::now();
      work();
      Kokkos::fence();
      return 1e3 * kmoe::bench::seconds_since(start);
    };
    const int n = int(layers.size());
    std::vector<std::vector<double>> forward_ms(n), step_ms(n);
    std::vector<double> raw_forward_ms, raw_step_ms;
    for (int r = 0; r <= repeats; ++r) {  // repetition 0 warms up (allocations)
      for (int k = 0; k < n; ++k) {
        const int i = (k + r) % n;
        Layer& layer = *layers[std::size_t(i)];
        const double f = timed([&] { layer.forward(x, y); });
        const double s = timed([&] {
          layer.forward(x, y, training);
          layer.backward(gy, gx);
          layer.synchronize_gradients();
        });
        layer.zero_gradients();
        if (r > 0) {
          forward_ms[i].push_back(f);
          step_ms[i].push_back(s);
        }
      }
      const double raw_f = timed([&] {
        dispatch.run(comm);
        give_back.run(comm);
      });
      const double raw_s = timed([&] {
        dispatch.run(comm);
        give_back.run(comm);
        take_back.run(comm);  // the output gradients to the experts
        give_back.run(comm);  // the input gradients home
      });
      if (r > 0) {
        raw_forward_ms.push_back(raw_f);
        raw_step_ms.push_back(raw_s);
      }
    }
    std::vector<double> medians;
    for (int i = 0; i < n; ++i) {
      medians.push_back(kmoe::bench::median(forward_ms[i]));
      medians.push_back(kmoe::bench::median(step_ms[i]));
    }
    medians.push_back(kmoe::bench::median(raw_forward_ms));
    medians.push_back(kmoe::bench::median(raw_step_ms));
    std::vector<double> slowest(medians.size());
    MPI_Allreduce(medians.data(), slowest.data(), int(medians.size()), MPI_DOUBLE, MPI_MAX, comm);
    const std::string load_after = load_average();
    if (me == 0) {
      const double raw_f = slowest[2 * n], raw_s = slowest[2 * n + 1];
      const double seq_f = slowest[0], seq_s = slowest[1];
      std::printf("pipeline_bench: %d ranks, T=%d per rank, H=%d, F=%d, E=%d, top-%d, shared F=%d, "
                  "%d repeats, %d OpenMP thread(s) per rank\n",
                  ranks, tokens, hidden, ffn, experts, top_k, shared_ffn, repeats,
                  X().concurrency());
      std::printf("load average: before %s, after %s\n", load_before.c_str(), load_after.c_str());
      std::printf("raw wire time of the step's exchanges: forward %.2f ms, forward+backward "
                  "%.2f ms\n",
                  raw_f, raw_s);
      std::printf("communication share of the sequential step: forward %.0f%%, "
                  "forward+backward %.0f%%\n",
                  100 * raw_f / seq_f, 100 * raw_s / seq_s);
      for (int i = 0; i < n; ++i)
        std::printf(
            "C=%d%s: forward %.2f ms (%.3f of C=1, %+.1f%%), forward+backward %.2f ms (%.3f of "
            "C=1, %+.1f%%)\n",
            used_chunks[std::size_t(i)], chunks[std::size_t(i)] == 0 ? " (layer's choice)" : "",
            slowest[2 * i], slowest[2 * i] / seq_f, 100 * (slowest[2 * i] / seq_f - 1),
            slowest[2 * i + 1], slowest[2 * i + 1] / seq_s, 100 * (slowest[2 * i + 1] / seq_s - 1));
    }
  }
  MPI_Finalize();
  return 0;
}
