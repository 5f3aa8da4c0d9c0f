// SPDX-License-Identifier: BSD-3-Clause
// Nodes (docs/parallel.md, "Nodes"), at 2 and 4 ranks with the world split into 2 emulated
// nodes (LayerOptions::nodes.ranks_per_node = world / 2):
//  - the hierarchical exchange gives bitwise the flat exchange's output, input gradient
//    and parameter gradients, for every layout with EP > 1 and the dispatch variants
//    (deduplicated or one row per slot, block or round-robin, capacity or dropless), while
//    handing the communicators fewer inter-node messages, and, for the deduplicated
//    dispatch over nodes of several ranks, fewer inter-node bytes;
//  - node maps that differ across ranks or do not cover the world raise on every rank;
//  - node-limited routing never lets a token reach more than M nodes, and M above the node
//    count raises naming both;
//  - the topology-aware placement, from a synthetic co-occurrence, lowers the inter-node
//    bytes the layer measures below the identity placement's.
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/placement/topology.hpp>
#include <kmoe/routers/sigmoid_bias.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cstdlib>
#include <set>
#include <string>
#include <vector>

using namespace kmoe;

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = double;
using Router = SoftmaxTopKRouter<X, S>;
using Experts = SwiGLUExperts<X, S>;
using Layer = MoELayer<Router, Experts, WeightedSumCombiner<X, S>, MpiCommunicator>;

constexpr int hidden = 8, ffn = 12, tokens = 23;

std::vector<ParallelLayout> layouts_with_expert_parallelism(int world) {
  std::vector<ParallelLayout> all;
  const auto add = [&](int tp, int ep, int dp, RankOrder order, Placement placement) {
    ParallelLayout l;
    l.tp = tp, l.ep = ep, l.dp = dp, l.order = order, l.placement = placement;
    if (l.world_size() == world) all.push_back(l);
  };
  for (const auto placement : {Placement::block, Placement::round_robin}) {
    add(1, 2, 1, RankOrder::tp_ep_dp, placement);
    add(1, 4, 1, RankOrder::tp_ep_dp, placement);
    add(1, 2, 2, RankOrder::tp_ep_dp, placement);
    add(1, 2, 2, RankOrder::dp_tp_ep, placement);
    add(2, 2, 1, RankOrder::tp_ep_dp, placement);
    add(2, 2, 1, RankOrder::ep_tp_dp, placement);
  }
  return all;
}

/// What one training step of a layer gives on this rank, as exact host copies.
struct Step {
  std::vector<S> y, grad_x, grads;
  ExchangeTraffic forward, total;
  NodeMap nodes;
};

std::vector<S> host_copy(const Matrix<S, X>& m) {
  const auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), m);
  return std::vector<S>(h.data(), h.data() + h.size());
}

struct Variant {
  int experts = 8, top_k = 3;
  double capacity_factor = 0.0;
  bool shared = false;
  RoutingWeightPlacement routing_weight = RoutingWeightPlacement::output;
};

Step train_step(const MpiCommunicator& world, const ParallelLayout& layout, const Variant& v,
                ExchangeKind exchange) {
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  LayerOptions options;
  options.capacity.factor = v.capacity_factor;
  options.routing_weight = v.routing_weight;
  options.nodes.exchange = exchange;
  options.nodes.ranks_per_node = world.size() / 2;
  const int owned = int(layout.local_experts(v.experts, groups.ep_rank).size());
  std::optional<Experts> shared;
  if (v.shared) shared = Experts({1, hidden, ffn}, "shared_experts");
  Layer layer(Router({hidden, v.experts, v.top_k, true}), Experts({owned, hidden, ffn / layout.tp}),
              options, shared, groups);
  fill_normal(layer.parameters(), 0.5, 11);
  Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden);
  Matrix<S, X> grad_y("grad_y", tokens, hidden), grad_x("grad_x", tokens, hidden);
  // Distinct tokens per token group; TP ranks of one group share them.
  const int group = groups.ep_rank + layout.ep * groups.dp_rank;
  fill_normal(x, 1.0, 100 + group);
  fill_normal(grad_y, 1.0, 200 + group);
  RouteContext<X> context;
  context.training = true;
  layer.zero_gradients();
  Step step;
  step.forward = layer.forward(x, y, context).traffic;
  layer.backward(grad_y, grad_x);
  step.total = layer.exchange_traffic();
  step.y = host_copy(y);
  step.grad_x = host_copy(grad_x);
  for (const auto& p : layer.parameters()) {
    const auto g = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), p.grad);
    step.grads.insert(step.grads.end(), g.data(), g.data() + g.size());
  }
  step.nodes = layer.node_map();
  return step;
}

std::string describe(const ParallelLayout& l) {
  return "TP" + std::to_string(l.tp) + " EP" + std::to_string(l.ep) + " DP" + std::to_string(l.dp) +
         " order " + std::to_string(int(l.order)) + " placement " +
         std::to_string(int(l.placement));
}

}  // namespace

TEST_CASE("the hierarchical exchange equals the flat one bitwise, in fewer inter-node messages",
          "[mpi][nodes]") {
  const auto world = MpiCommunicator::world();
  std::vector<Variant> variants(4);
  variants[1].capacity_factor = 0.75;
  variants[2].shared = true;
  variants[2].top_k = 2;
  variants[3].routing_weight = RoutingWeightPlacement::input;
  for (const auto& layout : layouts_with_expert_parallelism(world.size()))
    for (std::size_t v = 0; v < variants.size(); ++v) {
      DYNAMIC_SECTION(describe(layout) << ", variant " << v) {
        const Step flat = train_step(world, layout, variants[v], ExchangeKind::flat);
        const Step two_level = train_step(world, layout, variants[v], ExchangeKind::hierarchical);
        CHECK(flat.y == two_level.y);
        CHECK(flat.grad_x == two_level.grad_x);
        CHECK(flat.grads == two_level.grads);
        // The EP group's node map, from ranks_per_node = world / 2 over world ranks.
        REQUIRE(flat.nodes.ranks() == layout.ep);
        const int nodes = flat.nodes.nodes(), per_node = flat.nodes.uniform_size();
        REQUIRE(per_node * nodes == layout.ep);
        // Backward (and the combine) move one row per assignment either way, each crossing
        // nodes once; the deduplicated dispatch of the hierarchical exchange sends a token
        // once per remote node however many of that node's ranks hold its experts (k = 3 of 8
        // experts: some token has two on one remote node's two ranks), plus a mask per row.
        const auto backward = [](const Step& s) { return s.total - s.forward; };
        CHECK(backward(two_level).inter_node_bytes == backward(flat).inter_node_bytes);
        const bool deduplicated = variants[v].routing_weight == RoutingWeightPlacement::output;
        // The rows saved must outweigh the hierarchical route's metadata (a count message and
        // a mask per row; the flat dispatch folds its counts into its header): at top-2 of 8
        // experts and rows of 8 elements they need not.
        if (nodes > 1 && per_node > 1 && deduplicated && variants[v].top_k >= 3)
          CHECK(two_level.forward.inter_node_bytes < flat.forward.inter_node_bytes);
        else if (nodes > 1 && per_node > 1 && deduplicated)
          CHECK(two_level.forward.inter_node_bytes <= flat.forward.inter_node_bytes + 64);
        else if (deduplicated)
          CHECK(two_level.forward.inter_node_bytes >= flat.forward.inter_node_bytes);
        else
          CHECK(two_level.forward.inter_node_bytes == flat.forward.inter_node_bytes);
        if (nodes > 1) CHECK(flat.total.inter_node_bytes > 0);
        if (nodes == 1) CHECK(flat.total.inter_node_bytes == 0);
        if (nodes > 1 && per_node > 1) {
          // Forward, per rank: flat, the dispatch (its counts in its header) and the return
          // to each of the (N - 1) L remote ranks; hierarchical, the counts, the masks, the
          // rows and the return once per remote node: 4 (N - 1), as many at L = 2.
          if (per_node > 2)
            CHECK(two_level.forward.inter_node_messages < flat.forward.inter_node_messages);
          else
            CHECK(two_level.forward.inter_node_messages <= flat.forward.inter_node_messages);
          CHECK(two_level.total.inter_node_messages < flat.total.inter_node_messages);
        } else {
          CHECK(two_level.total.inter_node_messages <= flat.total.inter_node_messages);
        }
      }
    }
}

TEST_CASE("a node map that differs across ranks or misses ranks raises on every rank",
          "[mpi][nodes]") {
  const auto world = MpiCommunicator::world();
  const int ranks = world.size();
  ParallelLayout layout;
  layout.ep = ranks;
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  const auto build = [&](const LayerOptions& options) {
    const int owned = int(layout.local_experts(8, groups.ep_rank).size());
    Layer layer(Router({hidden, 8, 2, true}), Experts({owned, hidden, ffn}), options, std::nullopt,
                groups);
  };
  SECTION("without a setting, the shared-memory split: one node on this host") {
    unsetenv("KMOE_RANKS_PER_NODE");
    LayerOptions options;
    options.nodes.exchange = ExchangeKind::hierarchical;
    const int owned = int(layout.local_experts(8, groups.ep_rank).size());
    Layer layer(Router({hidden, 8, 2, true}), Experts({owned, hidden, ffn}), options, std::nullopt,
                groups);
    CHECK(layer.node_map().ranks() == ranks);
    CHECK(layer.node_map().nodes() == 1);
    fill_normal(layer.parameters(), 0.5, 3);
    Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden);
    fill_normal(x, 1.0, 30 + world.rank());
    const auto stats = layer.forward(x, y);
    CHECK(stats.traffic.inter_node_bytes == 0);
    CHECK(stats.traffic.intra_node_bytes > 0);
  }
  SECTION("ranks_per_node differing across ranks") {
    LayerOptions options;
    options.nodes.exchange = ExchangeKind::hierarchical;
    options.nodes.ranks_per_node = world.rank() == 0 ? ranks : ranks / 2;
    CHECK_THROWS_WITH(build(options), Catch::Matchers::ContainsSubstring("ranks_per_node"));
  }
  SECTION("KMOE_RANKS_PER_NODE differing across ranks") {
    setenv("KMOE_RANKS_PER_NODE", world.rank() == 0 ? "1" : std::to_string(ranks).c_str(), 1);
    LayerOptions options;
    options.nodes.exchange = ExchangeKind::hierarchical;
    CHECK_THROWS_WITH(build(options), Catch::Matchers::ContainsSubstring("KMOE_RANKS_PER_NODE") &&
                                          Catch::Matchers::ContainsSubstring("rank 0 has 1"));
    unsetenv("KMOE_RANKS_PER_NODE");
  }
  SECTION("an explicit map that does not cover the world") {
    LayerOptions options;
    options.nodes.node_of_rank = std::vector<int>(std::size_t(ranks - 1), 0);
    CHECK_THROWS_WITH(build(options), Catch::Matchers::ContainsSubstring("node_of_rank.size()"));
  }
  SECTION("ranks_per_node that does not divide the world") {
    LayerOptions options;
    options.nodes.ranks_per_node = ranks + 1;
    CHECK_THROWS_WITH(build(options),
                      Catch::Matchers::ContainsSubstring("must divide the world size"));
  }
  if (ranks == 4) {
    SECTION("nodes of unequal size under the hierarchical exchange") {
      LayerOptions options;
      options.nodes.exchange = ExchangeKind::hierarchical;
      options.nodes.node_of_rank = {0, 0, 0, 1};
      CHECK_THROWS_WITH(build(options), Catch::Matchers::ContainsSubstring(
                                            "same number of EP ranks on every node"));
      // The flat exchange counts traffic over any map.
      options.nodes.exchange = ExchangeKind::flat;
      CHECK_NOTHROW(build(options));
    }
  }
  // The group is still usable after the agreed errors.
  CHECK_FALSE(world.any_error(false));
}

TEST_CASE("node-limited routing: no token reaches more than M nodes; M above the nodes raises",
          "[mpi][nodes]") {
  const auto world = MpiCommunicator::world();
  const int ranks = world.size();
  constexpr int experts = 8, top_k = 4;
  for (const auto placement : {Placement::block, Placement::round_robin}) {
    DYNAMIC_SECTION("placement " << int(placement)) {
      ParallelLayout layout;
      layout.ep = ranks;
      layout.placement = placement;
      const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
      const int owned = int(layout.local_experts(experts, groups.ep_rank).size());
      LayerOptions options;
      options.nodes.ranks_per_node = ranks / 2;
      SoftmaxTopKConfig config{hidden, experts, top_k, true};
      config.node_limit.max_nodes = 1;
      Layer limited(Router(config), Experts({owned, hidden, ffn}), options, std::nullopt, groups);
      config.node_limit.max_nodes = 0;
      Layer free(Router(config), Experts({owned, hidden, ffn}), options, std::nullopt, groups);
      fill_normal(limited.parameters(), 0.5, 5);
      fill_normal(free.parameters(), 0.5, 5);
      Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden);
      fill_normal(x, 1.0, 300 + world.rank());
      const auto nodes_reached = [&](const Layer& layer) {
        const auto expert =
            Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.routing().expert);
        std::vector<int> node_of(experts);
        for (int r = 0; r < ranks; ++r)
          for (int e : layout.local_experts(experts, r)) node_of[e] = r / (ranks / 2);
        int most = 0;
        for (int t = 0; t < tokens; ++t) {
          std::set<int> reached;
          for (int s = 0; s < top_k; ++s) reached.insert(node_of[expert(t, s)]);
          most = std::max(most, int(reached.size()));
        }
        return most;
      };
      const auto limited_stats = limited.forward(x, y);
      const auto free_stats = free.forward(x, y);
      CHECK(nodes_reached(limited) == 1);
      CHECK(nodes_reached(free) == 2);  // k = 4 of 8 experts on 2 nodes: some token spans both
      // A token on one node crosses to at most one other.
      CHECK(limited_stats.traffic.inter_node_bytes < free_stats.traffic.inter_node_bytes);

      config.node_limit.max_nodes = 3;
      CHECK_THROWS_WITH(Layer(Router(config), Experts({owned, hidden, ffn}), options, std::nullopt,
                              groups),
                        Catch::Matchers::ContainsSubstring("max_nodes") &&
                            Catch::Matchers::ContainsSubstring("3") &&
                            Catch::Matchers::ContainsSubstring("exceeds the 2 nodes"));
    }
  }
}

TEST_CASE("node-limited routing refuses a placement whose replicas span nodes, on every rank",
          "[mpi][nodes]") {
  const auto world = MpiCommunicator::world();
  if (world.size() != 4) return;
  ParallelLayout layout;
  layout.ep = 4;
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  LayerOptions options;
  options.nodes.ranks_per_node = 2;
  // Node 0 (ranks 0, 1) holds experts 0-3, node 1 (ranks 2, 3) experts 4-7, with replicas
  // of 0, 1 and 4, 5 within their nodes.
  options.expert_placement = {4, 3, 8, {0, 1, 2, 3, 0, 1, 4, 5, 6, 7, 4, 5}};
  SoftmaxTopKConfig config{hidden, 8, 2, true};
  config.node_limit.max_nodes = 1;
  Layer layer(Router(config), Experts({3, hidden, ffn}), options, std::nullopt, groups);
  ExpertPlacement next = options.expert_placement;
  next.logical[4] = 6;  // expert 6 on rank 1 (node 0) and rank 2 (node 1)
  CHECK_THROWS_WITH(layer.apply_placement(next),
                    Catch::Matchers::ContainsSubstring("expert 6 on nodes") &&
                        Catch::Matchers::ContainsSubstring("replicas on one node"));
  // Nothing moved: the layer still routes.
  fill_normal(layer.parameters(), 0.5, 8);
  Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden);
  fill_normal(x, 1.0, 40 + world.rank());
  CHECK_NOTHROW(layer.forward(x, y));
}

TEST_CASE("topology-aware placement lowers the inter-node bytes below the identity placement's",
          "[mpi][nodes]") {
  const auto world = MpiCommunicator::world();
  const int ranks = world.size();
  constexpr int experts = 8, pairs = experts / 2;
  ParallelLayout layout;
  layout.ep = ranks;
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  LayerOptions options;
  options.nodes.ranks_per_node = ranks / 2;
  options.expert_placement = ExpertPlacement::block(experts, ranks);
  const int slots = experts / ranks;
  Layer layer(Router({hidden, experts, 2, true}), Experts({slots, hidden, ffn}), options,
              std::nullopt, groups);
  fill_normal(layer.parameters(), 0.5, 9);
  // Synthetic co-occurrence: experts p and p + 4 have the same gate row, so a token whose
  // input points at p chooses exactly {p, p + 4}; the identity placement puts every such
  // pair on two nodes.
  {
    auto gate = Kokkos::create_mirror_view(layer.router().gate().weight());
    Kokkos::deep_copy(gate, 0.0);
    for (int e = 0; e < experts; ++e) gate(e, e % pairs) = 4.0;
    Kokkos::deep_copy(layer.router().gate().weight(), gate);
  }
  Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden);
  {
    auto host = Kokkos::create_mirror_view(x);
    for (int t = 0; t < tokens; ++t)
      for (int h = 0; h < hidden; ++h) host(t, h) = h == (t + world.rank()) % pairs ? 1.0 : 0.0;
    Kokkos::deep_copy(x, host);
  }
  const auto identity = layer.forward(x, y);
  CoOccurrence co(experts);
  co.record(layer.routing().expert);
  co.all_reduce<X::memory_space>(groups.tokens);
  for (int p = 0; p < pairs; ++p) REQUIRE(co(p, p + pairs) > 0);
  REQUIRE(co(0, 1) == 0);

  const auto placement = topology_aware_placement(co, layer.node_map(), slots);
  for (int p = 0; p < pairs; ++p) {
    int slot_p = -1, slot_q = -1;
    for (int s = 0; s < experts; ++s) {
      if (placement.logical[s] == p) slot_p = s;
      if (placement.logical[s] == p + pairs) slot_q = s;
    }
    CAPTURE(p, slot_p, slot_q);
    CHECK(layer.node_map().node(placement.rank_of_slot(slot_p)) ==
          layer.node_map().node(placement.rank_of_slot(slot_q)));
  }
  layer.apply_placement(placement);
  const auto topology = layer.forward(x, y);
  long long before = identity.traffic.inter_node_bytes, after = topology.traffic.inter_node_bytes;
  CAPTURE(before, after);
  CHECK(after < before);
}
