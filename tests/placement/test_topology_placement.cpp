// SPDX-License-Identifier: BSD-3-Clause
// Topology-aware placement from a synthetic co-occurrence: the routing tables of tokens that
// each choose one hidden cluster of experts (members scattered over the expert indices, so
// that the identity placement cuts every cluster), recorded by CoOccurrence. The cut between
// nodes and between ranks, summed by hand over the pairs, must drop to zero where clusters
// fit a rank, and between nodes where they fit a node (below the identity placement's
// cut between ranks).
#include <kmoe/placement/topology.hpp>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cstdint>
#include <random>
#include <vector>

using namespace kmoe;

namespace {

using X = Kokkos::DefaultHostExecutionSpace;

/// Co-occurrence of `tokens` tokens, each choosing `k` distinct members of a random cluster
/// c = {c, c + clusters, c + 2 * clusters, ...} of `experts`.
CoOccurrence clustered(int experts, int clusters, int k, int tokens, std::uint64_t seed) {
  Matrix<int, X> expert("expert", tokens, k);
  auto host = Kokkos::create_mirror_view(expert);
  std::mt19937_64 rng(seed);
  const int members = experts / clusters;
  for (int t = 0; t < tokens; ++t) {
    const int c = int(rng() % std::uint64_t(clusters));
    const int first = int(rng() % std::uint64_t(members));
    for (int s = 0; s < k; ++s) host(t, s) = c + clusters * ((first + s) % members);
  }
  Kokkos::deep_copy(expert, host);
  CoOccurrence co(experts);
  co.record(expert);
  return co;
}

/// Co-occurrence between experts in different groups, `group_of(slot's rank)` grouping ranks.
template <class GroupOf>
std::int64_t cut(const ExpertPlacement& p, const CoOccurrence& co, const GroupOf& group_of) {
  std::vector<int> group(std::size_t(p.logical_experts));
  for (int slot = 0; slot < p.physical_experts(); ++slot)
    group[std::size_t(p.logical[std::size_t(slot)])] = group_of(p.rank_of_slot(slot));
  std::int64_t sum = 0;
  for (int i = 0; i < p.logical_experts; ++i)
    for (int j = i + 1; j < p.logical_experts; ++j)
      if (group[std::size_t(i)] != group[std::size_t(j)]) sum += co(i, j);
  return sum;
}

}  // namespace

TEST_CASE("topology-aware placement keeps experts chosen together on one node and rank",
          "[placement][nodes]") {
  // 4 ranks on 2 nodes, 4 slots per rank, 16 experts.
  const NodeMap nodes{{0, 0, 1, 1}};
  const auto node = [&](int rank) { return nodes.node(rank); };
  const auto rank = [](int r) { return r; };
  const ExpertPlacement identity = ExpertPlacement::block(16, 4);
  SECTION("clusters of a rank's size: every cluster on one rank") {
    const auto co = clustered(16, 4, 2, 400, 1);
    const auto p = topology_aware_placement(co, nodes, 4);
    CHECK(cut(identity, co, rank) > 0);
    CHECK(cut(identity, co, node) > 0);
    CHECK(cut(p, co, rank) == 0);
    CHECK(cut(p, co, node) == 0);
  }
  SECTION("clusters of a node's size: every cluster on one node") {
    const auto co = clustered(16, 2, 3, 400, 2);
    const auto p = topology_aware_placement(co, nodes, 4);
    CHECK(cut(identity, co, node) > 0);
    CHECK(cut(p, co, node) == 0);
    CHECK(cut(p, co, rank) < cut(identity, co, rank));
  }
}

TEST_CASE("topology-aware placement rejects a shape that does not fill the slots",
          "[placement][nodes]") {
  const NodeMap nodes{{0, 0, 1, 1}};
  CHECK_THROWS_WITH(topology_aware_placement(CoOccurrence(15), nodes, 4),
                    Catch::Matchers::ContainsSubstring("co.experts() = 15") &&
                        Catch::Matchers::ContainsSubstring("ranks * slots_per_rank = 16"));
  CHECK_THROWS_WITH(topology_aware_placement(CoOccurrence(16), NodeMap{}, 4),
                    Catch::Matchers::ContainsSubstring("nodes.ranks()"));
  CoOccurrence co(4);
  Matrix<int, X> bad("bad", 1, 2);
  Kokkos::deep_copy(bad, 5);
  auto host = Kokkos::create_mirror_view(bad);
  host(0, 0) = 1;
  Kokkos::deep_copy(bad, host);
  CHECK_THROWS_WITH(co.record(bad), Catch::Matchers::ContainsSubstring("expert = 5"));
}
