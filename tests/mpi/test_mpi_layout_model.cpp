// SPDX-License-Identifier: BSD-3-Clause
// kmoe-plan's cost model (kmoe/planning/layout_model.hpp) against the layer itself: one
// training step (forward, backward, gradient sync, AdamW) of a SwiGLU layer with a shared
// expert at every TP x EP x DP layout of the world (2 and 4 ranks; at 4 ranks, two ranks per
// "node"), run over a CountingCommunicator wrapped around MPI. The bytes the step hands each
// group (exchange payload and metadata per peer, TP all-reduce, gradient all-reduce), split
// into links within and between nodes, must equal the model's prediction exactly, given
// the routing the layer measured (each token group's routing table, gathered from the
// ranks), and so must the forward's rows in ForwardStats; the memory the layer and the optimizer hold at the step's peak (Kokkos
// allocation bytes, from the Kokkos Tools allocation callbacks) must be within 10% of the
// model's.
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/optimizer.hpp>
#include <kmoe/planning/counting_communicator.hpp>
#include <kmoe/planning/layout_model.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

using namespace kmoe;

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = double;
using Counting = CountingCommunicator<MpiCommunicator, X::memory_space>;
using Router = SoftmaxTopKRouter<X, S>;
using Experts = SwiGLUExperts<X, S>;
using Layer = MoELayer<Router, Experts, WeightedSumCombiner<X, S>, Counting>;
static_assert(check_valid_communicator<Counting>());

constexpr int hidden = 24, ffn = 32, shared_ffn = 16, experts = 6, top_k = 2, tokens = 40;

// Bytes of the Kokkos allocations alive, and their peak since the last reset (every memory
// space: the host spaces here).
struct AllocationTracker {
  static inline std::int64_t live = 0, peak = 0;
  static void allocate(Kokkos::Tools::SpaceHandle, const char*, const void*, std::uint64_t size) {
    live += std::int64_t(size);
    peak = std::max(peak, live);
  }
  static void deallocate(Kokkos::Tools::SpaceHandle, const char*, const void*, std::uint64_t size) {
    live -= std::int64_t(size);
  }
};

struct Measured {
  planning::LinkBytes payload, metadata, tp, gradients;
};

void add(planning::LinkBytes& into, bool inter, double bytes) {
  (inter ? into.inter : into.intra) += bytes;
}

// The ledger's bytes of one step, by the link each peer (all-to-all-v) or the group
// (all-reduce: between nodes when its members span several) sits on.
Measured classify(const CommunicationLedger& step, const CommunicationLedger& sync,
                  const planning::Machine& machine, int world_rank) {
  Measured m;
  const auto spans_nodes = [&](const std::vector<int>& members) {
    for (int r : members)
      if (machine.node_of(r) != machine.node_of(members.front())) return true;
    return false;
  };
  for (const auto& [key, entry] : step.entries()) {
    if (key.group == "ep" && key.kind == CollectiveKind::all_to_all_v)
      for (const auto& [peer, bytes] : entry.bytes_to_world_rank)
        add(key.floating ? m.payload : m.metadata,
            machine.node_of(peer) != machine.node_of(world_rank), double(bytes));
    if (key.group == "tp" && key.kind == CollectiveKind::all_reduce_sum && key.floating)
      add(m.tp, spans_nodes(entry.group_world_ranks), double(entry.bytes));
  }
  for (const auto& [key, entry] : sync.entries())
    if (key.kind == CollectiveKind::all_reduce_sum && key.floating)
      add(m.gradients, spans_nodes(entry.group_world_ranks), double(entry.bytes));
  return m;
}

// Each token group's routing table (kept global expert per slot, -1 when empty), from the
// layer of the group's first TP rank, gathered on every rank.
std::vector<std::vector<int>> gather_routing(const Layer& layer, const ParallelLayout& layout) {
  const auto expert =
      Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.routing().expert);
  const auto position = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.positions());
  std::vector<int> mine(std::size_t(tokens) * top_k);
  for (int t = 0; t < tokens; ++t)
    for (int s = 0; s < top_k; ++s) mine[t * top_k + s] = position(t, s) >= 0 ? expert(t, s) : -1;
  const int world = layout.world_size();
  std::vector<int> all(mine.size() * world);
  MPI_Allgather(mine.data(), int(mine.size()), MPI_INT, all.data(), int(mine.size()), MPI_INT,
                MPI_COMM_WORLD);
  std::vector<std::vector<int>> routing(std::size_t(layout.ep) * layout.dp);
  for (int r = 0; r < world; ++r) {
    const planning::LayoutRanks at(layout, r);
    if (at.tp_rank == 0)
      routing[at.token_group()].assign(all.begin() + std::ptrdiff_t(r * mine.size()),
                                       all.begin() + std::ptrdiff_t((r + 1) * mine.size()));
  }
  return routing;
}

void check_bytes(const Measured& measured, const planning::RankTraffic& predicted) {
  using planning::Traffic;
  const auto dispatch = predicted[Traffic::dispatch], combine = predicted[Traffic::combine];
  CHECK(measured.payload.intra == dispatch.intra + combine.intra);
  CHECK(measured.payload.inter == dispatch.inter + combine.inter);
  CHECK(measured.metadata.intra == predicted[Traffic::exchange_metadata].intra);
  CHECK(measured.metadata.inter == predicted[Traffic::exchange_metadata].inter);
  CHECK(measured.tp.intra == predicted[Traffic::tp_all_reduce].intra);
  CHECK(measured.tp.inter == predicted[Traffic::tp_all_reduce].inter);
  CHECK(measured.gradients.intra == predicted[Traffic::gradient_all_reduce].intra);
  CHECK(measured.gradients.inter == predicted[Traffic::gradient_all_reduce].inter);
}

std::vector<ParallelLayout> layouts_of(int ranks) {
  const auto make = [](int tp, int ep, int dp, RankOrder order, Placement placement) {
    ParallelLayout l;
    l.tp = tp;
    l.ep = ep;
    l.dp = dp;
    l.order = order;
    l.placement = placement;
    return l;
  };
  if (ranks == 2)
    return {make(1, 2, 1, RankOrder::tp_ep_dp, Placement::block),
            make(2, 1, 1, RankOrder::tp_ep_dp, Placement::block),
            make(1, 1, 2, RankOrder::tp_ep_dp, Placement::block)};
  if (ranks == 4)
    return {make(1, 4, 1, RankOrder::tp_ep_dp, Placement::block),
            make(1, 4, 1, RankOrder::tp_ep_dp, Placement::round_robin),
            make(2, 2, 1, RankOrder::tp_ep_dp, Placement::block),
            make(2, 2, 1, RankOrder::ep_tp_dp, Placement::round_robin),
            make(1, 2, 2, RankOrder::tp_ep_dp, Placement::block),
            make(1, 2, 2, RankOrder::dp_tp_ep, Placement::block),
            make(2, 1, 2, RankOrder::tp_dp_ep, Placement::block),
            make(4, 1, 1, RankOrder::tp_ep_dp, Placement::block),
            make(1, 1, 4, RankOrder::tp_ep_dp, Placement::block)};
  return {};
}

std::string describe(const ParallelLayout& l) {
  const char* orders[] = {"tp_ep_dp", "ep_tp_dp", "tp_dp_ep", "dp_tp_ep"};
  return "tp=" + std::to_string(l.tp) + " ep=" + std::to_string(l.ep) +
         " dp=" + std::to_string(l.dp) + " " + orders[int(l.order)] +
         (l.placement == Placement::block ? " block" : " round_robin");
}

void check_layout(const ParallelLayout& layout) {
  const auto mpi_world = MpiCommunicator::world();
  const int rank = mpi_world.rank();
  auto ledger = std::make_shared<CommunicationLedger>();
  const auto groups = ParallelGroups<Counting>::create(Counting(mpi_world, ledger), layout);

  planning::ModelShape shape;
  shape.hidden = hidden;
  shape.ffn = ffn;
  shape.experts = experts;
  shape.top_k = top_k;
  shape.shared_experts = 1;
  shape.shared_ffn = shared_ffn;
  shape.dtype_bytes = sizeof(S);
  planning::Machine machine;
  machine.ranks = layout.world_size();
  machine.ranks_per_node = machine.ranks == 4 ? 2 : 1;
  machine.memory_per_rank = 1e12;
  machine.intra_node_bandwidth = machine.inter_node_bandwidth = machine.flop_rate = 1;
  const planning::LayoutModel model(shape, machine);

  Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden);
  Matrix<S, X> grad_y("grad_y", tokens, hidden), grad_x("grad_x", tokens, hidden);
  fill_normal(x, 1.0, 40 + groups.ep_rank + layout.ep * groups.dp_rank);
  fill_normal(grad_y, 1.0, 80 + groups.ep_rank + layout.ep * groups.dp_rank);

  // What the layer and its optimizer hold: every allocation from here on.
  AllocationTracker::live = AllocationTracker::peak = 0;
  Kokkos::Tools::Experimental::set_allocate_data_callback(AllocationTracker::allocate);
  Kokkos::Tools::Experimental::set_deallocate_data_callback(AllocationTracker::deallocate);
  double peak = 0;
  Measured measured, measured_forward;
  double stats_payload = 0;
  std::vector<double> header_bytes;  // the dispatch's header to each EP peer
  std::vector<bool> header_inter;
  planning::ExchangePath path;  // the exchange the layer chose (chunks of its forward)
  std::vector<std::vector<int>> routing;
  {
    const auto owned = layout.local_experts(experts, groups.ep_rank);
    Layer layer(Router({hidden, experts, top_k, true}),
                Experts({int(owned.size()), hidden, ffn / layout.tp}), LayerOptions{},
                Experts({1, hidden, shared_ffn}, "shared_experts"), groups);
    fill_normal(layer.parameters(), 0.3, 7);
    AdamW<X, S> optimizer(layer.parameters(), {});
    RouteContext<X> context;
    context.training = true;
    CommunicationLedger forward, step, sync;
    for (int s = 0; s < 2; ++s) {  // the second step is measured: the first allocates
      AllocationTracker::peak = AllocationTracker::live;
      ledger->reset();
      const ForwardStats stats = layer.forward(x, y, context);
      forward = *ledger;
      // ForwardStats' rows to the other EP ranks (dispatch and return), as bytes.
      path.chunks = stats.exchange_chunks;
      stats_payload = 0;
      header_bytes.assign(stats.dispatch_header_rows.size(), 0);
      header_inter.assign(stats.dispatch_header_rows.size(), false);
      for (std::size_t q = 0; q < stats.dispatch_header_rows.size(); ++q)
        if (int(q) != groups.ep_rank) {
          header_bytes[q] = double(stats.dispatch_header_rows[q]) * hidden * sizeof(S);
          header_inter[q] = machine.node_of(planning::LayoutRanks(layout, rank).ep_group()[q]) !=
                            machine.node_of(rank);
        }
      for (std::size_t q = 0; q < stats.dispatch_rows.size(); ++q)
        if (int(q) != groups.ep_rank)
          stats_payload +=
              double(stats.dispatch_rows[q] + stats.combine_rows_sent[q]) * hidden * sizeof(S);
      layer.zero_gradients();
      layer.backward(grad_y, grad_x);
      step = *ledger;
      ledger->reset();
      layer.synchronize_gradients();
      sync = *ledger;
      optimizer.step();
    }
    peak = double(AllocationTracker::peak);
    measured = classify(step, sync, machine, rank);
    measured_forward = classify(forward, CommunicationLedger(), machine, rank);
    // The dispatch's header rows travel inside its payload message (element type): the
    // ledger counts them with the payload, the model with the metadata.
    for (auto* m : {&measured, &measured_forward})
      for (std::size_t q = 0; q < header_bytes.size(); ++q) {
        add(m->payload, header_inter[q], -header_bytes[q]);
        add(m->metadata, header_inter[q], header_bytes[q]);
      }
    routing = gather_routing(layer, layout);
  }
  Kokkos::Tools::Experimental::set_allocate_data_callback(nullptr);
  Kokkos::Tools::Experimental::set_deallocate_data_callback(nullptr);

  const auto counts = planning::ExchangeCounts::from_routing(shape, layout, routing);
  const auto predicted = model.traffic(layout, counts, rank, true, path);
  INFO(describe(layout) << ", rank " << rank);
  check_bytes(measured, predicted);
  INFO("the forward alone");
  const auto forward_only = model.traffic(layout, counts, rank, false, path);
  check_bytes(measured_forward, forward_only);
  CHECK(stats_payload == forward_only[planning::Traffic::dispatch].total() +
                             forward_only[planning::Traffic::combine].total());
  // Every layout but one rank exchanges something: the comparison is never 0 == 0 alone.
  CHECK(measured.payload.total() + measured.tp.total() + measured.gradients.total() > 0);

  const double memory = model.memory(layout, counts, rank).total();
  INFO("measured peak " << peak << " bytes, predicted " << memory);
  CHECK(memory == Catch::Approx(peak).epsilon(0.10));
}

}  // namespace

TEST_CASE("kmoe-plan's bytes equal the layer's and its memory is within 10%", "[mpi][plan]") {
  const int ranks = MpiCommunicator::world().size();
  const auto layouts = layouts_of(ranks);
  REQUIRE(!layouts.empty());
  for (const auto& layout : layouts) {
    DYNAMIC_SECTION(describe(layout)) { check_layout(layout); }
  }
}
