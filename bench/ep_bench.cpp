// SPDX-License-Identifier: BSD-3-Clause
// Expert-parallel layer over MPI (`mpiexec -n P ep_bench`): EP = P ranks, a Mixtral-like
// layer with a shared expert. Reports, in the same run:
//  1. the exchange against raw MPI_Alltoallv of the same bytes. Exchange side: an
//     ExpertParallelExchange on the layer's own routing (identity experts), timed from
//     exchange_counts() to the dispatch's wait (the payload, its counts and links in the
//     header of each block, and the receive layout they give), plus the combine's
//     transfer (from its before_exchange callback to its return): what crosses the wire.
//     Raw side: one MPI_Alltoallv of the dispatch's exact per-peer element counts (header
//     included) and one of the return's, on buffers of the same sizes. Each of the four
//     transfers starts right after an MPI_Barrier, so that neither side holds the wait for
//     the slowest rank's kernels before it (reported apart as the arrival skew); the sides
//     alternate which goes first, repetition by repetition, each repetition after a random
//     pause of 0 to 4 ms per rank. Figures: the median per rank, the maximum over ranks,
//     and the fastest repetition likewise. The arrangement kernels around the transfers
//     (the send rows' gather, the expansion into expert order, the combine's arrangement)
//     are reported apart: they are memory permutations a raw MPI_Alltoallv does not do;
//  2. forward, and forward + backward (training_mode recompute), pipelined (LayerOptions::
//     exchange_chunks, --chunks; 0 lets the layer choose) with the shared experts
//     overlapped, against sequential (exchange_chunks = 1, shared experts after the
//     dispatch), alternating step by step, each step after an MPI_Barrier;
//  3. the rows of the deduplicated dispatch against one row per (token, expert) and the
//     minimum;
//  4. with --json, one line per rank: the bytes this rank sends each peer per step on each
//     link (dispatch payload, dispatch header, counts, combine, backward exchanges) and the
//     gradient all-reduce's bytes per group; the bytes the forward's exchange handed the
//     communicators (traffic_bytes, ForwardStats::traffic) and kmoe-plan's layout model's
//     prediction of the forward's rows and metadata from the gathered routing tables
//     (model_rows_bytes, model_metadata_bytes; tests/planning/ep_bench_model.cmake
//     checks them equal).
//
//  5. with --compression bf16|fp16 (LayerOptions::exchange_compression), the exchange with
//     16-bit rows against the same exchange in float, alternating repetition by repetition
//     after an MPI_Barrier, on the layer's routing (identity experts): each side timed from
//     plan() (the send rows' gather, and the narrowing where compressed) to the combine's
//     return (the widening included), so the conversions are part of the figure; and a
//     training step (forward + backward, training_mode recompute) of the layer with and
//     without the option, alternating likewise. Median per rank, maximum over ranks.
//
// --exchange-only skips 2 (one forward gives the routing), for large T.
// --exchange chooses the layers' exchange in 2 and 4 (flat by default; the hierarchical one
// exchanges unchunked, so its "pipelined" layer is C = 1 with the shared experts
// overlapped); the exchange alone in 1 is always the flat ExpertParallelExchange. With
// --ranks-per-node N (ranks grouped into nodes of N consecutive ranks, docs/parallel.md
// "Nodes"), also the flat against the hierarchical exchange in the same run: the forward
// time and the bytes and messages each rank hands the communicators for peers on other
// nodes and on its own (ForwardStats::traffic).
//
//   mpiexec -n 2 ep_bench [--tokens T] [--repeats N] [--chunks C] [--hidden H] [--ffn F]
//                         [--shared-ffn F] [--experts E] [--exchange-only] [--json]
//                         [--watchdog-ms MS] [--exchange flat|hierarchical]
//                         [--ranks-per-node N] [--compression bf16|fp16]
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/exchange/expert_parallel_exchange.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/planning/layout_model.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include "support/flags.hpp"
#include "support/timing.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = float;
using Router = kmoe::SoftmaxTopKRouter<X, S>;
using Experts = kmoe::SwiGLUExperts<X, S>;
using Layer =
    kmoe::MoELayer<Router, Experts, kmoe::WeightedSumCombiner<X, S>, kmoe::MpiCommunicator>;
using clock_type = std::chrono::steady_clock;

constexpr int top_k = 2;
using kmoe::bench::integer_flag;

using kmoe::bench::median;

/// The smallest value.
double fastest(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

double ms_since(clock_type::time_point start) {
  return std::chrono::duration<double, std::milli>(clock_type::now() - start).count();
}

/// The value after `flag`, or `fallback` when absent.
const char* text_arg(int argc, char** argv, const char* flag, const char* fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], flag) == 0) return argv[i + 1];
  return fallback;
}

bool has_flag(int argc, char** argv, const char* flag) {
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], flag) == 0) return true;
  return false;
}

/// The maximum over ranks of each value (every rank's median, the slowest one reported).
std::vector<double> slowest(const kmoe::MpiCommunicator& world, std::vector<double> values) {
  std::vector<double> out(values.size());
  MPI_Allreduce(values.data(), out.data(), int(values.size()), MPI_DOUBLE, MPI_MAX, world.native());
  return out;
}

/// The layer shape of a run (the command line's).
struct Shape {
  int hidden, ffn, shared_ffn, experts;
};

/// Flat against hierarchical exchange over nodes of `ranks_per_node` ranks: the layer's
/// forward (shared experts overlapped), median of `repeats`, and the traffic of one forward
/// by node class, summed over the ranks.
void compare_exchanges(const kmoe::ParallelGroups<kmoe::MpiCommunicator>& groups,
                       const kmoe::Matrix<S, X>& x, const kmoe::Matrix<S, X>& y, const Shape& shape,
                       int ranks_per_node, int repeats) {
  const auto& world = groups.world;
  const int local = int(groups.layout.local_experts(shape.experts, groups.ep_rank).size());
  double forward_ms[2] = {0, 0};
  std::vector<long long> traffic(8, 0);  // [kind * 4 + (inter bytes, inter msgs, intra ...)]
  for (int kind = 0; kind < 2; ++kind) {
    kmoe::LayerOptions options;
    options.nodes.exchange =
        kind == 0 ? kmoe::ExchangeKind::flat : kmoe::ExchangeKind::hierarchical;
    options.nodes.ranks_per_node = ranks_per_node;
    std::optional<Experts> shared;
    if (shape.shared_ffn > 0)
      shared = Experts({1, shape.hidden, shape.shared_ffn}, "shared_experts");
    Layer layer(Router({shape.hidden, shape.experts, top_k, true}),
                Experts({local, shape.hidden, shape.ffn}), options, shared, groups);
    kmoe::fill_normal(layer.parameters(), 0.02, 5);
    const auto stats = layer.forward(x, y);  // warm-up, and the traffic (the same every forward)
    traffic[std::size_t(kind) * 4 + 0] = stats.traffic.inter_node_bytes;
    traffic[std::size_t(kind) * 4 + 1] = stats.traffic.inter_node_messages;
    traffic[std::size_t(kind) * 4 + 2] = stats.traffic.intra_node_bytes;
    traffic[std::size_t(kind) * 4 + 3] = stats.traffic.intra_node_messages;
    std::vector<double> times;
    for (int r = 0; r < repeats; ++r) {
      MPI_Barrier(world.native());
      const auto start = clock_type::now();
      layer.forward(x, y);
      Kokkos::fence();
      times.push_back(ms_since(start));
    }
    forward_ms[kind] = median(times);
  }
  std::vector<long long> total(traffic.size());
  MPI_Allreduce(traffic.data(), total.data(), int(traffic.size()), MPI_LONG_LONG, MPI_SUM,
                world.native());
  const auto slowest_ms = slowest(world, {forward_ms[0], forward_ms[1]});
  if (world.rank() != 0) return;
  for (int kind = 0; kind < 2; ++kind)
    std::printf(
        "%s exchange, %d ranks per node: forward %.3f ms; per forward, all ranks: inter-node "
        "%.3f MB in %lld messages, intra-node %.3f MB in %lld messages\n",
        kind == 0 ? "flat" : "hierarchical", ranks_per_node, slowest_ms[std::size_t(kind)],
        double(total[std::size_t(kind) * 4]) / 1e6, total[std::size_t(kind) * 4 + 1],
        double(total[std::size_t(kind) * 4 + 2]) / 1e6, total[std::size_t(kind) * 4 + 3]);
  std::printf(
      "hierarchical / flat: forward %.3f, inter-node bytes %.3f, inter-node messages %.3f\n",
      slowest_ms[1] / slowest_ms[0], double(total[4]) / std::max(1.0, double(total[0])),
      double(total[5]) / std::max(1.0, double(total[1])));
}

/// 5. The exchange and a training step with 16-bit rows against float ones, alternating.
void compare_compression(const kmoe::ParallelGroups<kmoe::MpiCommunicator>& groups,
                         const kmoe::RoutingPlan<X, S>& routing, const kmoe::Matrix<S, X>& x,
                         const kmoe::Matrix<S, X>& gy, const Shape& shape,
                         kmoe::WireCompression format, int repeats) {
  const auto& world = groups.world;
  using Exchange = kmoe::ExpertParallelExchange<X, S, kmoe::MpiCommunicator>;
  Exchange exchanges[2] = {Exchange(groups, shape.experts, shape.hidden, 1),
                           Exchange(groups, shape.experts, shape.hidden, 1)};
  exchanges[1].set_compression(format);
  kmoe::Dispatch<X> dispatch;  // the two exchanges' keys are the same
  dispatch.build(routing, exchanges[0].expert_key(), shape.experts, -1,
                 kmoe::DropPolicy::by_position);
  const int local = int(groups.layout.local_experts(shape.experts, groups.ep_rank).size());
  std::unique_ptr<Layer> layers[2];
  for (int which = 0; which < 2; ++which) {
    kmoe::LayerOptions options;
    options.training_mode = kmoe::ExpertMode::recompute;
    options.exchange_compression = which == 0 ? kmoe::WireCompression::none : format;
    std::optional<Experts> shared;
    if (shape.shared_ffn > 0)
      shared = Experts({1, shape.hidden, shape.shared_ffn}, "shared_experts");
    layers[which] =
        std::make_unique<Layer>(Router({shape.hidden, shape.experts, top_k, true}),
                                Experts({local, shape.hidden, shape.ffn}), options, shared, groups);
    kmoe::fill_normal(layers[which]->parameters(), 0.02, 5);
  }
  kmoe::Matrix<S, X> y("y", x.extent(0), x.extent(1)), gx("gx", x.extent(0), x.extent(1));
  kmoe::RouteContext<X> training;
  training.training = true;
  std::vector<double> exchange_ms[2], step_ms[2];
  long long traffic[2] = {0, 0};      // bytes one forward's exchange hands the communicators
  for (int r = 0; r <= repeats; ++r)  // the first allocates
    for (int which = 0; which < 2; ++which) {
      Exchange& exchange = exchanges[which];
      MPI_Barrier(world.native());
      auto start = clock_type::now();
      exchange.plan(dispatch, routing.expert, x);
      exchange.exchange_counts();
      exchange.dispatch_start().wait();
      exchange.combine(exchange.arrive());
      Kokkos::fence();
      const double exchanged = ms_since(start);
      MPI_Barrier(world.native());
      start = clock_type::now();
      const auto stats = layers[which]->forward(x, y, training);
      traffic[which] = stats.traffic.intra_node_bytes + stats.traffic.inter_node_bytes;
      layers[which]->backward(gy, gx);
      layers[which]->zero_gradients();
      Kokkos::fence();
      const double stepped = ms_since(start);
      if (r == 0) continue;
      exchange_ms[which].push_back(exchanged);
      step_ms[which].push_back(stepped);
    }
  const auto agreed = slowest(world, {median(exchange_ms[0]), median(exchange_ms[1]),
                                      median(step_ms[0]), median(step_ms[1])});
  long long total[2];
  MPI_Allreduce(traffic, total, 2, MPI_LONG_LONG, MPI_SUM, world.native());
  if (world.rank() != 0) return;
  const std::string name = kmoe::wire_compression_name(format);
  std::printf("forward exchange bytes handed to the communicators, all ranks: float %.3f MB, %s "
              "%.3f MB, ratio %.3f\n",
              double(total[0]) / 1e6, name.c_str(), double(total[1]) / 1e6,
              double(total[1]) / double(std::max(1LL, total[0])));
  std::printf("exchange (plan to combine, conversions included): float %.3f ms, %s %.3f ms, ratio "
              "%.3f\n",
              agreed[0], name.c_str(), agreed[1], agreed[1] / agreed[0]);
  std::printf("training step (forward + backward): float %.3f ms, %s %.3f ms, ratio %.3f\n",
              agreed[2], name.c_str(), agreed[3], agreed[3] / agreed[2]);
}

/// kmoe-plan's layout model's bytes this rank sends its EP peers in the forward of
/// `layer` (the last one; its routing gathered from every rank), over the exchange path
/// the layer took: dispatch + combine rows, and the metadata (header rows, counts).
std::pair<double, double> predicted_forward_bytes(const Layer& layer, const Shape& shape,
                                                  const kmoe::ParallelLayout& layout, int chunks,
                                                  bool sender_sized) {
  const auto expert =
      Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.routing().expert);
  const auto position = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.positions());
  const int tokens = int(expert.extent(0));
  std::vector<int> mine(std::size_t(tokens) * top_k);
  for (int t = 0; t < tokens; ++t)
    for (int s = 0; s < top_k; ++s)
      mine[std::size_t(t) * top_k + s] = position(t, s) >= 0 ? expert(t, s) : -1;
  const int ranks = layout.world_size();
  std::vector<int> all(mine.size() * ranks);
  MPI_Allgather(mine.data(), int(mine.size()), MPI_INT, all.data(), int(mine.size()), MPI_INT,
                layer.groups().world.native());
  std::vector<std::vector<int>> routing(static_cast<std::size_t>(ranks));
  for (int r = 0; r < ranks; ++r)
    routing[std::size_t(r)].assign(all.begin() + std::ptrdiff_t(r * mine.size()),
                                   all.begin() + std::ptrdiff_t((r + 1) * mine.size()));
  kmoe::planning::ModelShape model_shape;
  model_shape.hidden = shape.hidden;
  model_shape.ffn = shape.ffn;
  model_shape.experts = shape.experts;
  model_shape.top_k = top_k;
  model_shape.shared_experts = shape.shared_ffn > 0 ? 1 : 0;
  model_shape.shared_ffn = shape.shared_ffn;
  model_shape.dtype_bytes = sizeof(S);
  kmoe::planning::Machine machine;  // one node: the totals do not depend on the links
  machine.ranks = machine.ranks_per_node = ranks;
  machine.memory_per_rank = machine.intra_node_bandwidth = machine.inter_node_bandwidth =
      machine.flop_rate = 1;
  const kmoe::planning::LayoutModel model(model_shape, machine);
  kmoe::planning::ExchangePath path;
  path.chunks = chunks;
  path.sender_sized = sender_sized;
  const auto counts = kmoe::planning::ExchangeCounts::from_routing(model_shape, layout, routing);
  const auto traffic = model.traffic(layout, counts, layer.groups().world.rank(), false, path);
  using kmoe::planning::Traffic;
  return {traffic[Traffic::dispatch].total() + traffic[Traffic::combine].total(),
          traffic[Traffic::exchange_metadata].total()};
}

/// The 1-minute load average (/proc/loadavg; "n/a" where there is none): the machine is
/// shared, and the figures mean little without it.
std::string load_average() {
  std::FILE* file = std::fopen("/proc/loadavg", "r");
  double load = 0;
  const bool read = file && std::fscanf(file, "%lf", &load) == 1;
  if (file) std::fclose(file);
  if (!read) return "n/a";
  char text[32];
  std::snprintf(text, sizeof(text), "%.2f", load);
  return text;
}

std::string json_list(const std::vector<long long>& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s + "]";
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  {
    Kokkos::ScopeGuard kokkos(argc, argv);
    const int tokens = integer_flag(argc, argv, "--tokens", 2048),
              repeats = integer_flag(argc, argv, "--repeats", 5);
    const int chunks = integer_flag(argc, argv, "--chunks", 0, 0),
              hidden = integer_flag(argc, argv, "--hidden", 1024);
    const int ffn = integer_flag(argc, argv, "--ffn", 1024),
              shared_ffn = integer_flag(argc, argv, "--shared-ffn", 2048, 0);
    const int experts = integer_flag(argc, argv, "--experts", 8);
    const bool json = has_flag(argc, argv, "--json");
    const bool exchange_only = has_flag(argc, argv, "--exchange-only");
    const int ranks_per_node = integer_flag(argc, argv, "--ranks-per-node", 0, 0);
    const std::string exchange_name = text_arg(argc, argv, "--exchange", "flat");
    const std::string compression_name = text_arg(argc, argv, "--compression", "none");
    if (compression_name != "none" && compression_name != "bf16" && compression_name != "fp16") {
      std::fprintf(stderr, "ep_bench: --compression must be none, bf16 or fp16, not '%s'\n",
                   compression_name.c_str());
      MPI_Finalize();
      return 1;
    }
    const auto compression = compression_name == "bf16"   ? kmoe::WireCompression::bf16
                             : compression_name == "fp16" ? kmoe::WireCompression::fp16
                                                          : kmoe::WireCompression::none;
    if (exchange_name != "flat" && exchange_name != "hierarchical") {
      std::fprintf(stderr, "ep_bench: --exchange must be flat or hierarchical, not '%s'\n",
                   exchange_name.c_str());
      MPI_Finalize();
      return 1;
    }
    const auto exchange_kind =
        exchange_name == "flat" ? kmoe::ExchangeKind::flat : kmoe::ExchangeKind::hierarchical;
    kmoe::MpiOptions mpi_options;  // --watchdog-ms 0: MPI's blocking calls, no polling
    mpi_options.collective_timeout = std::chrono::milliseconds(
        integer_flag(argc, argv, "--watchdog-ms", int(mpi_options.collective_timeout.count())));
    const std::string load_at_start = load_average();
    const auto world = kmoe::MpiCommunicator::world(mpi_options);
    const int ranks = world.size(), me = world.rank();
    kmoe::ParallelLayout layout;
    layout.ep = ranks;
    const auto groups = kmoe::ParallelGroups<kmoe::MpiCommunicator>::create(world, layout);
    const int local = int(layout.local_experts(experts, groups.ep_rank).size());
    kmoe::Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden), gy("gy", tokens, hidden),
        gx("gx", tokens, hidden);
    kmoe::fill_normal(x, 1.0, 100 + me);
    kmoe::fill_normal(gy, 1.0, 200 + me);

    const auto make_layer = [&](int layer_chunks, bool overlap) {
      kmoe::LayerOptions options;
      options.exchange_chunks = layer_chunks;
      options.overlap_shared_experts = overlap;
      options.training_mode = kmoe::ExpertMode::recompute;
      options.nodes.exchange = exchange_kind;
      options.nodes.ranks_per_node = ranks_per_node;
      std::optional<Experts> shared;
      if (shared_ffn > 0) shared = Experts({1, hidden, shared_ffn}, "shared_experts");
      auto layer = std::make_unique<Layer>(Router({hidden, experts, top_k, true}),
                                           Experts({local, hidden, ffn}), options, shared, groups);
      kmoe::fill_normal(layer->parameters(), 0.02, 5);
      return layer;
    };
    const auto sequential_layer = make_layer(1, false), pipelined_layer = make_layer(chunks, true);
    Layer &sequential = *sequential_layer, &pipelined = *pipelined_layer;
    kmoe::RouteContext<X> training;
    training.training = true;

    // 2. Forward and forward + backward, the two layers alternating step by step.
    const auto step = [&](Layer& layer, bool backward) {
      MPI_Barrier(world.native());
      const auto start = clock_type::now();
      layer.forward(x, y, backward ? training : kmoe::RouteContext<X>{});
      if (backward) {
        layer.backward(gy, gx);
        layer.zero_gradients();
      }
      Kokkos::fence();
      return ms_since(start);
    };
    std::vector<double> forward_times[2], step_times[2];
    for (int r = 0; r <= (exchange_only ? -1 : repeats); ++r)  // the first allocates
      for (int which = 0; which < 2; ++which) {
        Layer& layer = which == 0 ? sequential : pipelined;
        const double f = step(layer, false), fb = step(layer, true);
        if (r > 0) {
          forward_times[which].push_back(f);
          step_times[which].push_back(fb);
        }
      }
    const auto stats = pipelined.forward(x, y);
    const int used_chunks = stats.exchange_chunks;
    // The exchange's share of a sequential forward: its phases timed alone.
    sequential.set_phase_timing(true);
    std::vector<double> exchange_phase, forward_phase;
    for (int r = 0; r < (exchange_only ? 0 : repeats); ++r) {
      MPI_Barrier(world.native());
      const auto s = sequential.forward(x, y);
      exchange_phase.push_back(s.phase_ms.exchange);
      forward_phase.push_back(s.phase_ms.route + s.phase_ms.dispatch + s.phase_ms.imbalance +
                              s.phase_ms.exchange + s.phase_ms.shared + s.phase_ms.experts +
                              s.phase_ms.combine);
    }
    sequential.set_phase_timing(false);
    const kmoe::RoutingPlan<X, S> routing = pipelined.routing();

    // 1. The exchange alone against raw MPI_Alltoallv of the same bytes. Every transfer of
    // either side starts right after an MPI_Barrier, so that neither side's figure holds
    // the wait for the slowest rank's kernels before it (timed apart as skew, as the
    // layer's phase timing books it as imbalance); the sides alternate which goes first.
    kmoe::ExpertParallelExchange<X, S, kmoe::MpiCommunicator> exchange(groups, experts, hidden, 1);
    kmoe::Dispatch<X> dispatch;
    std::vector<double> wire, raw, arrangement, skew;
    std::vector<int> dispatch_send(ranks), dispatch_recv(ranks), return_send(ranks),
        return_recv(ranks), dispatch_send_at(ranks), dispatch_recv_at(ranks), return_send_at(ranks),
        return_recv_at(ranks);
    std::vector<float> raw_dispatch_send, raw_dispatch_recv, raw_return_send, raw_return_recv;
    const auto barrier_ms = [&] {
      const auto start = clock_type::now();
      MPI_Barrier(world.native());
      return ms_since(start);
    };
    const auto raw_alltoallv = [&](const std::vector<float>& send, const std::vector<int>& counts,
                                   const std::vector<int>& at, std::vector<float>& recv,
                                   const std::vector<int>& recv_counts,
                                   const std::vector<int>& recv_at) {
      MPI_Barrier(world.native());
      const auto start = clock_type::now();
      MPI_Alltoallv(send.data(), counts.data(), at.data(), MPI_FLOAT, recv.data(),
                    recv_counts.data(), recv_at.data(), MPI_FLOAT, world.native());
      return ms_since(start);
    };
    const auto raw_dispatch = [&] {
      return raw_alltoallv(raw_dispatch_send, dispatch_send, dispatch_send_at, raw_dispatch_recv,
                           dispatch_recv, dispatch_recv_at);
    };
    const auto raw_return = [&] {
      return raw_alltoallv(raw_return_send, return_send, return_send_at, raw_return_recv,
                           return_recv, return_recv_at);
    };
    // A random pause (0 to 4 ms, per rank) before each repetition: on a loaded machine a
    // loop of steady period can lock onto the scheduler's time slices, so that one side
    // is descheduled in most repetitions of a run and the other in none.
    std::mt19937 jitter_source(unsigned(1000 + me));
    std::uniform_int_distribution<int> jitter_us(0, 4000);
    for (int r = 0; r <= repeats; ++r) {
      const bool timed = r > 0;  // the first sizes the raw side's buffers
      const bool raw_first = timed && r % 2 == 0;
      double raw_ms = 0;
      dispatch.build(routing, exchange.expert_key(), experts, -1, kmoe::DropPolicy::by_position);
      std::this_thread::sleep_for(std::chrono::microseconds(jitter_us(jitter_source)));
      MPI_Barrier(world.native());
      auto start = clock_type::now();
      exchange.plan(dispatch, routing.expert, x);
      Kokkos::fence();
      double arranged = ms_since(start);
      double skewed = barrier_ms();
      if (raw_first) {
        raw_ms += raw_dispatch();
        MPI_Barrier(world.native());
      }
      start = clock_type::now();
      exchange.exchange_counts();
      exchange.dispatch_start().wait();
      double wired = ms_since(start);
      if (timed && !raw_first) raw_ms += raw_dispatch();
      start = clock_type::now();
      const auto& expert_x = exchange.arrive();
      clock_type::time_point before_return;
      exchange.combine(expert_x, [&] {
        Kokkos::fence();
        arranged += ms_since(start);
        skewed += barrier_ms();
        if (raw_first) {
          raw_ms += raw_return();
          MPI_Barrier(world.native());
        }
        before_return = clock_type::now();
      });
      Kokkos::fence();
      wired += ms_since(before_return);
      if (timed && !raw_first) raw_ms += raw_return();
      if (!timed) {
        // The raw side's per-peer element counts: exactly what the exchange sent.
        for (int p = 0; p < ranks; ++p) {
          dispatch_send[p] =
              int((exchange.dispatch_rows()[p] + exchange.header_rows()[p]) * hidden);
          return_send[p] = int(exchange.combine_rows_sent()[p] * hidden);
        }
        MPI_Alltoall(dispatch_send.data(), 1, MPI_INT, dispatch_recv.data(), 1, MPI_INT,
                     world.native());
        MPI_Alltoall(return_send.data(), 1, MPI_INT, return_recv.data(), 1, MPI_INT,
                     world.native());
        const auto offsets = [&](const std::vector<int>& counts, std::vector<int>& at) {
          int total = 0;
          for (int p = 0; p < ranks; ++p) at[p] = total, total += counts[p];
          return std::size_t(total);
        };
        raw_dispatch_send.assign(offsets(dispatch_send, dispatch_send_at), 1.0f);
        raw_dispatch_recv.assign(offsets(dispatch_recv, dispatch_recv_at), 0.0f);
        raw_return_send.assign(offsets(return_send, return_send_at), 1.0f);
        raw_return_recv.assign(offsets(return_recv, return_recv_at), 0.0f);
        continue;
      }
      wire.push_back(wired);
      raw.push_back(raw_ms);
      arrangement.push_back(arranged);
      skew.push_back(skewed);
    }

    // 3. Rows sent against one per (token, expert) and the minimum, by a plain loop.
    long long remote_rows_sent = 0, remote_assignments = 0, remote_rows_minimum = 0;
    {
      auto expert = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), routing.expert);
      for (int p = 0; p < ranks; ++p) {
        if (p == me) continue;
        const auto owned = layout.local_experts(experts, p);
        for (std::size_t t = 0; t < expert.extent(0); ++t) {
          int here = 0;
          for (std::size_t s = 0; s < expert.extent(1); ++s)
            here += std::find(owned.begin(), owned.end(), expert(t, s)) != owned.end();
          remote_assignments += here;
          remote_rows_minimum += here > 0;
        }
        remote_rows_sent += stats.dispatch_rows[p];
      }
    }

    const auto agreed =
        slowest(world, {median(wire), median(raw), median(arrangement), median(forward_times[0]),
                        median(forward_times[1]), median(step_times[0]), median(step_times[1]),
                        median(exchange_phase), median(forward_phase), median(skew), fastest(wire),
                        fastest(raw)});
    if (me == 0) {
      std::printf(
          "ep_bench: %d ranks x %d threads, T=%d per rank, H=%d F=%d E=%d k=%d, shared F=%d, "
          "float32, %d repeats, %s exchange, ranks per node %d; load average %s at the start, "
          "%s at the end\n",
          ranks, X().concurrency(), tokens, hidden, ffn, experts, top_k, shared_ffn, repeats,
          exchange_name.c_str(), ranks_per_node, load_at_start.c_str(), load_average().c_str());
      std::printf("rows rank 0 sends to other ranks: %lld; one per (token, expert) would be %lld; "
                  "minimum %lld (sent / minimum %.3f)\n",
                  remote_rows_sent, remote_assignments, remote_rows_minimum,
                  remote_rows_minimum ? double(remote_rows_sent) / remote_rows_minimum : 1.0);
      std::printf(
          "exchange on the wire (payload with counts and links' header + return), median: %.3f "
          "ms; raw MPI_Alltoallv of the same bytes: %.3f ms; ratio %.3f\n",
          agreed[0], agreed[1], agreed[0] / agreed[1]);
      std::printf("fastest repetition: exchange %.3f ms, raw %.3f ms, ratio %.3f\n", agreed[10],
                  agreed[11], agreed[10] / agreed[11]);
      std::printf(
          "arrangement kernels around it (send gather, expansion into expert order, combine "
          "arrangement): %.3f ms; ranks' arrival skew before the two transfers: %.3f ms\n",
          agreed[2], agreed[9]);
      if (!exchange_only) {
        std::printf("sequential forward: exchange phase %.3f ms of %.3f ms phases (%.0f%%)\n",
                    agreed[7], agreed[8], 100.0 * agreed[7] / agreed[8]);
        std::printf(
            "forward: sequential %.3f ms, pipelined (C=%d, shared experts overlapped) %.3f ms, "
            "ratio %.3f\n",
            agreed[3], used_chunks, agreed[4], agreed[4] / agreed[3]);
        std::printf("forward + backward: sequential %.3f ms, pipelined %.3f ms, ratio %.3f\n",
                    agreed[5], agreed[6], agreed[6] / agreed[5]);
      }
    }
    if (compression != kmoe::WireCompression::none)
      compare_compression(groups, routing, x, gy, {hidden, ffn, shared_ffn, experts}, compression,
                          repeats);
    if (ranks_per_node > 0)
      compare_exchanges(groups, x, y, {hidden, ffn, shared_ffn, experts}, ranks_per_node, repeats);
    if (json) {
      // Bytes this rank sends each peer in one training step (p == rank: a local copy).
      const long long row = hidden * (long long)sizeof(S);
      // Over nodes of several ranks the hierarchical route sends the counts in their own
      // all-to-all (over nodes of one rank it is the flat route).
      const bool relayed = exchange_kind == kmoe::ExchangeKind::hierarchical &&
                           pipelined.node_map().uniform_size() > 1;
      std::vector<long long> payload(ranks), header(ranks), counts(ranks), combine(ranks),
          to_experts(ranks), from_experts(ranks);
      for (int p = 0; p < ranks; ++p) {
        payload[p] = stats.dispatch_rows[p] * row;
        header[p] = stats.dispatch_header_rows[p] * row;
        // The count all-to-all runs only in the pipelined forward and over the hierarchical
        // route: unchunked and flat, MPI carries the counts in the dispatch's header
        // (dispatch_header_bytes).
        counts[p] = used_chunks > 1 || relayed
                        ? (long long)(layout.local_experts(experts, p).size() + used_chunks) *
                              (long long)sizeof(std::int64_t)
                        : 0;
        combine[p] = stats.combine_rows_sent[p] * row;
        to_experts[p] = stats.combine_rows_received[p] * row;
        from_experts[p] = stats.combine_rows_sent[p] * row;
      }
      const auto [predicted_rows, predicted_metadata] = predicted_forward_bytes(
          pipelined, {hidden, ffn, shared_ffn, experts}, layout, used_chunks, !relayed);
      long long world_bytes = 0, dp_bytes = 0;
      for (const auto& p : pipelined.parameters())
        (p.shard.expert_parallel ? dp_bytes : world_bytes) +=
            (long long)(p.grad.size() * sizeof(S));
      const std::string line =
          "{\"bench\":\"ep_bench\",\"rank\":" + std::to_string(me) +
          ",\"ranks\":" + std::to_string(ranks) + ",\"tokens\":" + std::to_string(tokens) +
          ",\"hidden\":" + std::to_string(hidden) + ",\"ffn\":" + std::to_string(ffn) +
          ",\"experts\":" + std::to_string(experts) + ",\"top_k\":" + std::to_string(top_k) +
          ",\"shared_ffn\":" + std::to_string(shared_ffn) +
          ",\"scalar_bytes\":" + std::to_string(sizeof(S)) +
          ",\"chunks\":" + std::to_string(used_chunks) + ",\"exchange\":\"" + exchange_name +
          "\",\"ranks_per_node\":" + std::to_string(ranks_per_node) +
          ",\"dispatch_payload_bytes\":" + json_list(payload) +
          ",\"dispatch_header_bytes\":" + json_list(header) +
          ",\"counts_bytes\":" + json_list(counts) + ",\"combine_bytes\":" + json_list(combine) +
          ",\"backward_to_experts_bytes\":" + json_list(to_experts) +
          ",\"backward_from_experts_bytes\":" + json_list(from_experts) +
          ",\"allreduce_world_bytes\":" + std::to_string(world_bytes) +
          ",\"allreduce_world_ranks\":" + std::to_string(ranks) +
          ",\"allreduce_dp_bytes\":" + std::to_string(dp_bytes) +
          ",\"allreduce_dp_ranks\":" + std::to_string(layout.dp) + ",\"traffic_bytes\":" +
          std::to_string(stats.traffic.intra_node_bytes + stats.traffic.inter_node_bytes) +
          ",\"model_rows_bytes\":" + std::to_string((long long)predicted_rows) +
          ",\"model_metadata_bytes\":" + std::to_string((long long)predicted_metadata) + "}";
      // Rank order on rank 0's stdout.
      if (me == 0) {
        std::printf("%s\n", line.c_str());
        for (int p = 1; p < ranks; ++p) {
          MPI_Status status;
          MPI_Probe(p, 0, world.native(), &status);
          int length = 0;
          MPI_Get_count(&status, MPI_CHAR, &length);
          std::string other(std::size_t(length), '\0');
          MPI_Recv(other.data(), length, MPI_CHAR, p, 0, world.native(), MPI_STATUS_IGNORE);
          std::printf("%s\n", other.c_str());
        }
        std::fflush(stdout);
      } else {
        MPI_Send(line.data(), int(line.size()), MPI_CHAR, 0, 0, world.native());
      }
    }
  }
  MPI_Finalize();
  return 0;
}
