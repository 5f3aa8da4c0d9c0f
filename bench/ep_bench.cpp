// SPDX-License-Identifier: BSD-3-Clause
// Expert-parallel forward over MPI (`mpiexec -n P ep_bench`): EP = P ranks, a Mixtral-like
// layer with a shared expert. Reports, in the same run, the rows the deduplicated dispatch
// sends against one row per (token, expert) and against the minimum; the layer's exchange
// time (counts, links and payload, both directions, from LayerOptions::time_phases, which
// reports the wait for the slower rank apart) against a raw MPI_Alltoallv of the same
// payload bytes both ways; the exchange object alone (ExpertParallelExchange: plan, counts,
// payload out, arrival, combine back, on the layer's own routing with identity experts)
// against the same raw MPI_Alltoallv; and the forward time with the shared experts
// overlapped with the dispatch against run after it. With --ranks-per-node N (ranks grouped
// into nodes of N consecutive ranks, docs/parallel.md "Nodes"), also the flat against the
// hierarchical exchange in the same run: the forward time and the bytes and messages each
// rank hands the communicators for peers on other nodes and on its own (ForwardStats::traffic).
// --exchange chooses the exchange of the layer's figures above (flat by default; the
// exchange-alone figure is always the flat ExpertParallelExchange).
//
//   mpiexec -n 2 ep_bench [--tokens T] [--repeats N] [--exchange flat|hierarchical]
//                         [--ranks-per-node N]
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/exchange/expert_parallel_exchange.hpp>
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

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = float;
using Router = kmoe::SoftmaxTopKRouter<X, S>;
using Experts = kmoe::SwiGLUExperts<X, S>;
using Layer =
    kmoe::MoELayer<Router, Experts, kmoe::WeightedSumCombiner<X, S>, kmoe::MpiCommunicator>;

constexpr int hidden = 1024, ffn = 1024, shared_ffn = 2048, experts = 8, top_k = 2;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int arg(int argc, char** argv, const char* flag, int fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], flag) == 0) return std::atoi(argv[i + 1]);
  return fallback;
}

/// The value after `flag`, or `fallback` when absent.
const char* text_arg(int argc, char** argv, const char* flag, const char* fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], flag) == 0) return argv[i + 1];
  return fallback;
}

/// Flat against hierarchical exchange over nodes of `ranks_per_node` ranks: the layer's
/// forward (shared experts overlapped), median of `repeats`, and the traffic of one forward
/// by node class, summed over the ranks.
void compare_exchanges(const kmoe::ParallelGroups<kmoe::MpiCommunicator>& groups,
                       const kmoe::Matrix<S, X>& x, const kmoe::Matrix<S, X>& y, int ranks_per_node,
                       int repeats) {
  const auto& world = groups.world;
  const int local = int(groups.layout.local_experts(experts, groups.ep_rank).size());
  double forward_ms[2] = {0, 0};
  std::vector<long long> traffic(8, 0);  // [kind * 4 + (inter bytes, inter msgs, intra ...)]
  for (int kind = 0; kind < 2; ++kind) {
    kmoe::LayerOptions options;
    options.nodes.exchange =
        kind == 0 ? kmoe::ExchangeKind::flat : kmoe::ExchangeKind::hierarchical;
    options.nodes.ranks_per_node = ranks_per_node;
    Layer layer(Router({hidden, experts, top_k, true}), Experts({local, hidden, ffn}), options,
                Experts({1, hidden, shared_ffn}, "shared_experts"), groups);
    kmoe::fill_normal(layer.parameters(), 0.02, 5);
    const auto stats = layer.forward(x, y);  // warm-up, and the traffic (the same every forward)
    traffic[std::size_t(kind) * 4 + 0] = stats.traffic.inter_node_bytes;
    traffic[std::size_t(kind) * 4 + 1] = stats.traffic.inter_node_messages;
    traffic[std::size_t(kind) * 4 + 2] = stats.traffic.intra_node_bytes;
    traffic[std::size_t(kind) * 4 + 3] = stats.traffic.intra_node_messages;
    std::vector<double> times;
    for (int r = 0; r < repeats; ++r) {
      MPI_Barrier(world.native());
      const auto start = std::chrono::steady_clock::now();
      layer.forward(x, y);
      Kokkos::fence();
      times.push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count());
    }
    forward_ms[kind] = median(times);
  }
  std::vector<long long> total(traffic.size());
  MPI_Allreduce(traffic.data(), total.data(), int(traffic.size()), MPI_LONG_LONG, MPI_SUM,
                world.native());
  double slowest[2];
  MPI_Allreduce(forward_ms, slowest, 2, MPI_DOUBLE, MPI_MAX, world.native());
  if (world.rank() != 0) return;
  for (int kind = 0; kind < 2; ++kind)
    std::printf(
        "%s exchange, %d ranks per node: forward %.3f ms; per forward, all ranks: inter-node %.3f MB in %lld messages, intra-node %.3f MB in %lld messages\n",
        kind == 0 ? "flat" : "hierarchical", ranks_per_node, slowest[kind],
        double(total[std::size_t(kind) * 4]) / 1e6, total[std::size_t(kind) * 4 + 1],
        double(total[std::size_t(kind) * 4 + 2]) / 1e6, total[std::size_t(kind) * 4 + 3]);
  std::printf(
      "hierarchical / flat: forward %.3f, inter-node bytes %.3f, inter-node messages %.3f\n",
      slowest[1] / slowest[0], double(total[4]) / std::max(1.0, double(total[0])),
      double(total[5]) / std::max(1.0, double(total[1])));
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  {
    Kokkos::ScopeGuard kokkos(argc, argv);
    const int tokens = arg(argc, argv, "--tokens", 2048), repeats = arg(argc, argv, "--repeats", 5);
    const int ranks_per_node = arg(argc, argv, "--ranks-per-node", 0);
    const std::string exchange_name = text_arg(argc, argv, "--exchange", "flat");
    if (exchange_name != "flat" && exchange_name != "hierarchical") {
      std::fprintf(stderr, "ep_bench: --exchange must be flat or hierarchical, not '%s'\n",
                   exchange_name.c_str());
      MPI_Finalize();
      return 1;
    }
    const auto exchange_kind =
        exchange_name == "flat" ? kmoe::ExchangeKind::flat : kmoe::ExchangeKind::hierarchical;
    const auto world = kmoe::MpiCommunicator::world();
    kmoe::ParallelLayout layout;
    layout.ep = world.size();
    const auto groups = kmoe::ParallelGroups<kmoe::MpiCommunicator>::create(world, layout);
    const int local = int(layout.local_experts(experts, groups.ep_rank).size());
    kmoe::Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden);
    kmoe::fill_normal(x, 1.0, 100 + world.rank());

    // [1]: shared experts overlapped with the dispatch, [0]: run after it.
    double overlap_ms[2] = {0, 0}, exchange_ms[2] = {0, 0}, imbalance_ms[2] = {0, 0}, shared_ms = 0;
    // Elements this rank sends to each peer: dispatch (deduplicated rows) and per (token,
    // expert) row, the size of the return.
    std::vector<int> dispatch_counts(world.size(), 0), assignment_counts(world.size(), 0);
    long long remote_rows_sent = 0, remote_assignments = 0, remote_rows_minimum = 0;
    kmoe::RoutingPlan<X, S> routing;  // of the last forward, replayed by the exchange alone
    for (int overlap = 1; overlap >= 0; --overlap) {
      kmoe::LayerOptions options;
      options.overlap_shared_experts = overlap == 1;
      options.nodes.exchange = exchange_kind;
      options.nodes.ranks_per_node = ranks_per_node;
      Layer layer(Router({hidden, experts, top_k, true}), Experts({local, hidden, ffn}), options,
                  Experts({1, hidden, shared_ffn}, "shared_experts"), groups);
      kmoe::fill_normal(layer.parameters(), 0.02, 5);
      layer.forward(x, y);  // warm-up: allocates the workspace
      std::vector<double> times;
      for (int r = 0; r < repeats; ++r) {
        MPI_Barrier(world.native());
        const auto start = std::chrono::steady_clock::now();
        layer.forward(x, y);
        Kokkos::fence();
        times.push_back(
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                .count());
      }
      overlap_ms[overlap] = median(times);
      layer.set_phase_timing(true);
      std::vector<double> exchange, imbalance, shared;
      kmoe::ForwardStats stats;
      for (int r = 0; r < repeats; ++r) {
        MPI_Barrier(world.native());
        stats = layer.forward(x, y);
        exchange.push_back(stats.phase_ms.exchange);
        imbalance.push_back(stats.phase_ms.imbalance);
        shared.push_back(stats.phase_ms.shared);
      }
      exchange_ms[overlap] = median(exchange);
      imbalance_ms[overlap] = median(imbalance);
      if (overlap == 1) {
        shared_ms = median(shared);
        routing = layer.routing();
        // The minimum (DeepEP) sends a token once per rank however many of its experts live
        // there; counted here by a plain loop over the routing (dropless: every slot kept).
        auto expert =
            Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.routing().expert);
        for (int p = 0; p < world.size(); ++p) {
          const auto owned = layout.local_experts(experts, p);
          for (std::size_t t = 0; t < expert.extent(0); ++t) {
            int here = 0;
            for (std::size_t s = 0; s < expert.extent(1); ++s)
              here += std::find(owned.begin(), owned.end(), expert(t, s)) != owned.end();
            assignment_counts[p] += here * hidden;
            if (p != world.rank()) {
              remote_assignments += here;
              remote_rows_minimum += here > 0;
            }
          }
          dispatch_counts[p] = int(stats.dispatch_rows[p]) * hidden;
          if (p != world.rank()) remote_rows_sent += stats.dispatch_rows[p];
        }
      }
    }
    // The exchange alone, timed from plan() to combine()'s return: what the layer's
    // dispatch and combine phases cost without the router, the experts and the shared
    // experts around them.
    std::vector<double> alone;
    {
      kmoe::ExpertParallelExchange<X, S, kmoe::MpiCommunicator> exchange(groups, experts, hidden,
                                                                         1);
      kmoe::Dispatch<X> dispatch;
      for (int r = 0; r <= repeats; ++r) {
        MPI_Barrier(world.native());
        const auto start = std::chrono::steady_clock::now();
        dispatch.build(routing, exchange.expert_key(), experts, -1, kmoe::DropPolicy::by_position);
        exchange.plan(dispatch, routing.expert, x);
        exchange.exchange_counts();
        exchange.dispatch_start().wait();
        exchange.combine(exchange.arrive());
        Kokkos::fence();
        if (r > 0)  // the first allocates the buffers
          alone.push_back(
              std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                  .count());
      }
    }
    // Raw MPI_Alltoallv of the same payload: the dispatch's rows out, one row per
    // (token, expert) back.
    const auto layout_of = [&](const std::vector<int>& send_counts, std::vector<int>& recv_counts,
                               std::vector<int>& send_offsets, std::vector<int>& recv_offsets) {
      recv_counts.resize(world.size());
      send_offsets.resize(world.size());
      recv_offsets.resize(world.size());
      MPI_Alltoall(send_counts.data(), 1, MPI_INT, recv_counts.data(), 1, MPI_INT, world.native());
      int send_total = 0, recv_total = 0;
      for (int p = 0; p < world.size(); ++p) {
        send_offsets[p] = send_total;
        recv_offsets[p] = recv_total;
        send_total += send_counts[p];
        recv_total += recv_counts[p];
      }
      return std::make_pair(send_total, recv_total);
    };
    std::vector<int> dispatch_recv, dispatch_send_at, dispatch_recv_at;
    std::vector<int> return_recv, return_send_at, return_recv_at;
    const auto dispatch_totals =
        layout_of(dispatch_counts, dispatch_recv, dispatch_send_at, dispatch_recv_at);
    const auto return_totals =
        layout_of(assignment_counts, return_recv, return_send_at, return_recv_at);
    std::vector<float> dispatch_send(dispatch_totals.first, 1.0f),
        dispatch_received(dispatch_totals.second);
    std::vector<float> returned(return_totals.first), return_send(return_totals.second, 1.0f);
    // Blocking dispatch, and the layer's own mix: non-blocking dispatch (MPI_Ialltoallv, then
    // MPI_Wait), blocking return.
    std::vector<double> raw, raw_mixed;
    for (int r = 0; r <= 2 * repeats + 1; ++r) {
      const bool mixed = r % 2 == 1;
      MPI_Barrier(world.native());
      const auto start = std::chrono::steady_clock::now();
      if (mixed) {
        MPI_Request request;
        MPI_Ialltoallv(dispatch_send.data(), dispatch_counts.data(), dispatch_send_at.data(),
                       MPI_FLOAT, dispatch_received.data(), dispatch_recv.data(),
                       dispatch_recv_at.data(), MPI_FLOAT, world.native(), &request);
        MPI_Wait(&request, MPI_STATUS_IGNORE);
      } else {
        MPI_Alltoallv(dispatch_send.data(), dispatch_counts.data(), dispatch_send_at.data(),
                      MPI_FLOAT, dispatch_received.data(), dispatch_recv.data(),
                      dispatch_recv_at.data(), MPI_FLOAT, world.native());
      }
      MPI_Alltoallv(return_send.data(), return_recv.data(), return_recv_at.data(), MPI_FLOAT,
                    returned.data(), assignment_counts.data(), return_send_at.data(), MPI_FLOAT,
                    world.native());
      if (r > 1)
        (mixed ? raw_mixed : raw)
            .push_back(
                std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                    .count());
    }
    const double raw_ms = median(raw), raw_mixed_ms = median(raw_mixed);
    double worst[9] = {exchange_ms[0],  raw_ms,          overlap_ms[1],
                       overlap_ms[0],   imbalance_ms[0], exchange_ms[1],
                       imbalance_ms[1], raw_mixed_ms,    median(alone)};
    double agreed[9];
    MPI_Allreduce(worst, agreed, 9, MPI_DOUBLE, MPI_MAX, world.native());
    if (world.rank() == 0) {
      std::printf(
          "ep_bench: %d ranks x %d threads, T=%d per rank, H=%d F=%d E=%d k=%d, shared F=%d, float32, %s exchange, ranks per node %d\n",
          world.size(), X().concurrency(), tokens, hidden, ffn, experts, top_k, shared_ffn,
          exchange_name.c_str(), ranks_per_node);
      std::printf("dispatch bytes sent by rank 0 (one way): %.1f MB\n",
                  4.0 * dispatch_totals.first / 1e6);
      std::printf(
          "rows rank 0 sends to other ranks: %lld; one per (token, expert) would be %lld; minimum %lld (sent / minimum %.3f)\n",
          remote_rows_sent, remote_assignments, remote_rows_minimum,
          remote_rows_minimum ? double(remote_rows_sent) / remote_rows_minimum : 1.0);
      std::printf(
          "layer exchange (counts + links + payload, both ways; shared experts after the dispatch): %.3f ms; raw MPI_Alltoallv same payload: %.3f ms; ratio %.3f; wait for the slower rank (reported apart): %.3f ms\n",
          agreed[0], agreed[1], agreed[0] / agreed[1], agreed[4]);
      std::printf(
          "raw with the layer's calls (MPI_Ialltoallv + MPI_Wait out, MPI_Alltoallv back): %.3f ms; layer / that %.3f\n",
          agreed[7], agreed[0] / agreed[7]);
      std::printf(
          "exchange alone (ExpertParallelExchange: dispatch build, plan, counts, payload out, combine back; identity experts): %.3f ms; raw MPI_Alltoallv same payload %.3f ms; ratio %.3f\n",
          agreed[8], agreed[1], agreed[8] / agreed[1]);
      std::printf(
          "with the shared experts overlapped: exchange %.3f ms (ratio %.3f; part of the dispatch completes during the wait for the slower rank, %.3f ms)\n",
          agreed[5], agreed[5] / agreed[1], agreed[6]);
      std::printf(
          "forward with shared experts overlapped: %.3f ms; after the dispatch: %.3f ms; saved %.3f ms (shared experts %.3f ms)\n",
          agreed[2], agreed[3], agreed[3] - agreed[2], shared_ms);
    }
    if (ranks_per_node > 0) compare_exchanges(groups, x, y, ranks_per_node, repeats);
  }
  MPI_Finalize();
  return 0;
}
