// SPDX-License-Identifier: BSD-3-Clause
// The layout planner on one process: the uniform-routing expectation against every top-k
// subset of experts counted by hand; the enumeration against the layer's rules (F split by
// TP, an expert per EP rank, equal token groups, memory) counted by plain loops; ranking;
// the prior; bad input naming its field. (The model's bytes and memory against the layer:
// tests/mpi/test_mpi_layout_model.cpp.)
#include <kmoe/planning/layout_planner.hpp>

#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <set>
#include <vector>

using namespace kmoe;
using namespace kmoe::planning;

namespace {

ModelShape shape_of(int hidden, int ffn, int experts, int top_k) {
  ModelShape s;
  s.hidden = hidden;
  s.ffn = ffn;
  s.experts = experts;
  s.top_k = top_k;
  return s;
}

Machine machine_of(int ranks, int per_node, double memory) {
  Machine m;
  m.ranks = ranks;
  m.ranks_per_node = per_node;
  m.memory_per_rank = memory;
  m.intra_node_bandwidth = 100e9;
  m.inter_node_bandwidth = 10e9;
  m.flop_rate = 100e12;
  return m;
}

}  // namespace

TEST_CASE("uniform routing: rows and assignments per rank over every top-k subset", "[plan]") {
  // E = 7 experts over EP = 3 ranks (block: 3, 2, 2 experts), top-3: each of the C(7, 3)
  // subsets equally likely; a rank receives a token when the subset meets its experts.
  const auto shape = shape_of(8, 8, 7, 3);
  for (const auto placement : {Placement::block, Placement::round_robin}) {
    ParallelLayout layout;
    layout.ep = 3;
    layout.placement = placement;
    std::vector<int> owner(7);
    for (int r = 0; r < 3; ++r)
      for (int e : layout.local_experts(7, r)) owner[e] = r;
    std::vector<double> hits(3, 0), assigned(3, 0);
    int subsets = 0;
    for (int a = 0; a < 7; ++a)
      for (int b = a + 1; b < 7; ++b)
        for (int c = b + 1; c < 7; ++c) {
          ++subsets;
          std::set<int> ranks = {owner[a], owner[b], owner[c]};
          for (int r : ranks) hits[r] += 1;
          for (int e : {a, b, c}) assigned[owner[e]] += 1;
        }
    const double tokens = 60;
    const auto counts = ExchangeCounts::uniform(shape, layout, tokens);
    for (int r = 0; r < 3; ++r) {
      CHECK(counts.row(1, r) == Catch::Approx(tokens * hits[r] / subsets).epsilon(1e-12));
      CHECK(counts.assigned(2, r) == Catch::Approx(tokens * assigned[r] / subsets).epsilon(1e-12));
    }
  }
}

TEST_CASE("routing tables: rows and assignments counted per token group", "[plan]") {
  ParallelLayout layout;
  layout.ep = 2;
  layout.dp = 2;
  const auto shape = shape_of(4, 4, 4, 2);  // experts 0, 1 on EP rank 0; 2, 3 on rank 1
  // Group 0: token 0 -> {0, 1}, token 1 -> {1, 2}; group 3: token 0 -> {3, dropped}.
  const std::vector<std::vector<int>> tables = {{0, 1, 1, 2}, {}, {}, {3, -1}};
  const auto counts = ExchangeCounts::from_routing(shape, layout, tables);
  CHECK(counts.row(0, 0) == 2);
  CHECK(counts.row(0, 1) == 1);
  CHECK(counts.assigned(0, 0) == 3);
  CHECK(counts.assigned(0, 1) == 1);
  CHECK(counts.row(3, 0) == 0);
  CHECK(counts.row(3, 1) == 1);
  CHECK(counts.tokens[3] == 1);
  CHECK_THROWS_WITH(ExchangeCounts::from_routing(shape, layout, {{0, 1}}),
                    Catch::Matchers::ContainsSubstring("expert.size()"));
}

TEST_CASE("the plan holds exactly the valid layouts, fastest first", "[plan]") {
  // 8 ranks, F = 12 (TP 8 cannot split it), E = 4 (EP 8 has a rank without experts),
  // tokens 96 (every EP x DP divides it).
  const auto shape = shape_of(64, 12, 4, 2);
  const auto machine = machine_of(8, 4, 1e12);
  const Plan plan = plan_layouts(shape, machine, 96);
  // By hand: (tp, ep, dp) with tp | F, ep <= E; each with its distinct rank maps (orders
  // that differ only in dimensions of size 1 are one layout).
  std::set<std::vector<int>> expected;
  int invalid_ffn = 0, invalid_experts = 0;
  for (int tp : {1, 2, 4, 8})
    for (int ep : {1, 2, 4, 8}) {
      if (8 % (tp * ep)) continue;
      const int dp = 8 / tp / ep;
      if (12 % tp) {
        ++invalid_ffn;
        continue;
      }
      if (ep > 4) {
        ++invalid_experts;
        continue;
      }
      const int sizes[3] = {tp, ep, dp};
      // Orders: {tp, ep, dp} fastest first, as RankOrder lists them.
      const int orders[4][3] = {{0, 1, 2}, {1, 0, 2}, {0, 2, 1}, {2, 0, 1}};
      std::set<std::vector<int>> distinct;
      for (const auto& o : orders) {
        std::vector<int> nontrivial;  // the order of the dimensions larger than 1
        for (int d : o)
          if (sizes[d] > 1) nontrivial.push_back(d);
        distinct.insert(nontrivial);
      }
      for (const auto& d : distinct) {
        std::vector<int> key = {tp, ep, dp};
        key.insert(key.end(), d.begin(), d.end());
        expected.insert(key);
      }
    }
  std::set<std::vector<int>> planned;
  for (const auto& c : plan.feasible) {
    const int sizes[3] = {c.layout.tp, c.layout.ep, c.layout.dp};
    std::vector<int> key = {c.layout.tp, c.layout.ep, c.layout.dp};
    for (int i = 0; i < 3; ++i) {
      const int d = c.layout.dimension_order()[i];
      if (sizes[d] > 1) key.push_back(d);
    }
    CHECK(planned.insert(key).second);  // no layout twice
    CHECK(c.any_placement);             // uniform routing: both placements predict alike
  }
  CHECK(planned == expected);
  CHECK(plan.excluded.at("ffn % TP != 0") == invalid_ffn);
  CHECK(plan.excluded.at("experts < EP") == invalid_experts);
  for (std::size_t i = 1; i < plan.feasible.size(); ++i)
    CHECK(plan.feasible[i - 1].step_seconds() <= plan.feasible[i].step_seconds());

  // A memory limit between the layouts' needs keeps exactly those under it.
  std::vector<double> needs;
  for (const auto& c : plan.feasible) needs.push_back(c.memory.total());
  std::sort(needs.begin(), needs.end());
  const double limit = (needs[needs.size() / 2] + needs[needs.size() / 2 - 1]) / 2;
  REQUIRE(needs[needs.size() / 2] > needs[needs.size() / 2 - 1]);
  const Plan tight = plan_layouts(shape, machine_of(8, 4, limit), 96);
  std::size_t under = 0;
  for (double n : needs) under += n <= limit;
  CHECK(tight.feasible.size() == under);
  CHECK(tight.excluded.at("memory-per-rank") == int(needs.size() - under));
  for (const auto& c : tight.feasible) CHECK(c.memory.total() <= limit);
  CHECK(tight.smallest_memory == needs.front());
}

TEST_CASE("memory and bytes of a layout by hand", "[plan]") {
  // EP = 2 on two nodes, uniform routing with E = 2, top-1: each token group sends half its
  // tokens to the other rank and gets as many back; no TP, no DP.
  auto shape = shape_of(16, 32, 2, 1);
  shape.dtype_bytes = 4;
  const LayoutModel model(shape, machine_of(2, 1, 1e12));
  ParallelLayout layout;
  layout.ep = 2;
  const auto counts = ExchangeCounts::uniform(shape, layout, 100);
  const auto traffic = model.traffic(layout, counts, 0);
  const double row = 16 * 4;
  CHECK(traffic[Traffic::dispatch].inter == 2 * 50 * row);  // forward rows, backward dL/dy
  CHECK(traffic[Traffic::combine].inter == 2 * 50 * row);   // forward outputs, backward dL/dx
  // The dispatch's header: 1 count and 50 links in whole rows of 16 (MPI sizes the
  // messages by their sender: no count all-to-all); with one it adds 2 int64 per peer.
  CHECK(traffic[Traffic::exchange_metadata].inter == 4 * row);
  ExchangePath counted;
  counted.sender_sized = false;
  CHECK(model.traffic(layout, counts, 0, true, counted)[Traffic::exchange_metadata].inter ==
        4 * row + 2 * 8);
  CHECK(traffic[Traffic::tp_all_reduce].total() == 0);
  CHECK(traffic[Traffic::gradient_all_reduce].inter == 2 * 16 * 4);  // the router [E, H]
  CHECK(traffic.total().intra == 0);
  const auto memory = model.memory(layout, counts, 0);
  const double parameters = 1 * 3 * 16 * 32 + 2 * 16;  // one expert, the router
  CHECK(memory.weights == parameters * 4);
  CHECK(memory.gradients == parameters * 4);
  CHECK(memory.optimizer == 2 * parameters * 4);
  // Two layers: everything doubles.
  shape.layers = 2;
  const LayoutModel two(shape, machine_of(2, 1, 1e12));
  CHECK(two.memory(layout, counts, 0).total() == 2 * memory.total());
  CHECK(two.traffic(layout, counts, 0).total().inter == 2 * traffic.total().inter);
}

TEST_CASE("the prior: EP when experts are many, TP when few", "[plan]") {
  const auto many = plan_layouts(shape_of(256, 512, 16, 2), machine_of(8, 8, 1e12), 4096);
  REQUIRE(!many.explanation.empty());
  CHECK_THAT(many.explanation[0], Catch::Matchers::ContainsSubstring("many") &&
                                      Catch::Matchers::ContainsSubstring("tp=1 ep=8"));
  const auto few = plan_layouts(shape_of(256, 512, 2, 1), machine_of(8, 8, 1e12), 4096);
  CHECK_THAT(few.explanation[0], Catch::Matchers::ContainsSubstring("few") &&
                                     Catch::Matchers::ContainsSubstring("tp=4 ep=2"));
  // On one node with the same bandwidth everywhere, every layout computes the same FLOPs,
  // and the explanation compares the winner with the prior's layout.
  CHECK(many.explanation.size() == 3);
}

TEST_CASE("bad shapes and machines name their field", "[plan]") {
  auto shape = shape_of(64, 64, 4, 5);
  CHECK_THROWS_WITH(LayoutModel(shape, machine_of(4, 4, 1e9)),
                    Catch::Matchers::ContainsSubstring("top_k"));
  shape.top_k = 2;
  CHECK_THROWS_WITH(LayoutModel(shape, machine_of(6, 4, 1e9)),
                    Catch::Matchers::ContainsSubstring("ranks_per_node = 4"));
  CHECK_THROWS_WITH(LayoutModel(shape, machine_of(0, 1, 1e9)),
                    Catch::Matchers::ContainsSubstring("ranks"));
  CHECK_THROWS_WITH(LayoutModel(shape, machine_of(4, 4, 0)),
                    Catch::Matchers::ContainsSubstring("memory_per_rank"));
  CHECK_THROWS_WITH(plan_layouts(shape, machine_of(4, 4, 1e9), 0),
                    Catch::Matchers::ContainsSubstring("tokens"));
}
