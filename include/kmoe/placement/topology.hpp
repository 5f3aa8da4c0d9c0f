// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file placement/topology.hpp
/// \brief Topology-aware placement: how often experts are chosen together (co-occurrence,
/// recorded from routing tables) and a placement that keeps experts chosen together on the
/// same node, and within it on the same rank, so that a token's rows cross fewer nodes
/// (and, with the deduplicated dispatch, are sent once for the experts one rank holds).
///
/// The partition is greedy (docs/parallel.md, "Nodes"): first at the level of nodes, then of
/// the ranks within each node, with the same two steps:
///  1. agglomeration: expert pairs in decreasing co-occurrence join their clusters while the
///     joined cluster fits the largest bin (a node's or a rank's slots);
///  2. first-fit decreasing of the clusters into the bins (a cluster that fits no bin's free
///     slots is spread over them expert by expert), then Kernighan-Lin style swaps of two
///     experts in different bins while a swap lowers the co-occurrence cut between bins.
/// Deterministic (ties toward lower indices), so every rank given the same counts computes
/// the same placement, as MoELayer::apply_placement requires.

#include <kmoe/communicator.hpp>
#include <kmoe/error.hpp>
#include <kmoe/exchange/node_topology.hpp>
#include <kmoe/placement/expert_placement.hpp>
#include <kmoe/types.hpp>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace kmoe {

/// \brief Symmetric counts of tokens that chose both expert i and expert j (i != j).
class CoOccurrence {
 public:
  CoOccurrence() = default;
  explicit CoOccurrence(int experts)
      : experts_(experts), counts_(std::size_t(experts) * std::size_t(experts), 0) {
    require(experts >= 1, "kmoe::CoOccurrence", "experts", experts, "must be at least 1");
  }

  int experts() const { return experts_; }
  std::int64_t operator()(int i, int j) const {
    return counts_[std::size_t(i) * std::size_t(experts_) + std::size_t(j)];
  }

  /// Adds the pairs of every token of a routing table expert [T, slots] (-1: empty slot),
  /// e.g. MoELayer::routing().expert; a pair chosen twice by one token counts once.
  template <class View>
  void record(const View& expert) {
    const auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), expert);
    const int slots = int(host.extent(1));
    for (std::size_t t = 0; t < host.extent(0); ++t)
      for (int a = 0; a < slots; ++a)
        for (int b = a + 1; b < slots; ++b) {
          const int i = host(t, a), j = host(t, b);
          if (i < 0 || j < 0 || i == j) continue;
          require(i < experts_ && j < experts_, "kmoe::CoOccurrence::record", "expert",
                  std::max(i, j), "must be below the experts " + std::to_string(experts_));
          ++at(i, j);
          ++at(j, i);
        }
  }

  /// Sums the counts over the ranks of `comm` (e.g. the layer's `tokens` group, whose ranks
  /// route distinct tokens), in place.
  template <class MemorySpace, class Communicator>
  void all_reduce(const Communicator& comm) {
    all_reduce_sum_values<MemorySpace>(comm, counts_);
  }

 private:
  std::int64_t& at(int i, int j) {
    return counts_[std::size_t(i) * std::size_t(experts_) + std::size_t(j)];
  }

  int experts_ = 0;
  std::vector<std::int64_t> counts_;
};

namespace detail {

/// Splits `items` into bins of the given capacities (their sum: items.size()) so that the
/// co-occurrence between bins is small; returns the bin of each item (by position).
inline std::vector<int> partition_by_co_occurrence(const std::vector<int>& items,
                                                   const std::vector<int>& capacity,
                                                   const CoOccurrence& co) {
  const int n = int(items.size()), bins = int(capacity.size());
  const int largest = *std::max_element(capacity.begin(), capacity.end());
  const auto weight = [&](int a, int b) {
    return co(items[std::size_t(a)], items[std::size_t(b)]);
  };
  // 1. Agglomeration: union of clusters along the heaviest pairs while they fit a bin.
  std::vector<int> cluster(static_cast<std::size_t>(n));
  std::iota(cluster.begin(), cluster.end(), 0);
  std::vector<int> size(static_cast<std::size_t>(n), 1);
  const auto root = [&](int a) {
    while (cluster[std::size_t(a)] != a) a = cluster[std::size_t(a)];
    return a;
  };
  std::vector<std::pair<int, int>> pairs;
  for (int a = 0; a < n; ++a)
    for (int b = a + 1; b < n; ++b)
      if (weight(a, b) > 0) pairs.push_back({a, b});
  std::stable_sort(pairs.begin(), pairs.end(), [&](const auto& p, const auto& q) {
    return weight(p.first, p.second) > weight(q.first, q.second);
  });
  for (const auto& [a, b] : pairs) {
    const int ra = root(a), rb = root(b);
    if (ra == rb || size[std::size_t(ra)] + size[std::size_t(rb)] > largest) continue;
    const int keep = std::min(ra, rb), gone = std::max(ra, rb);
    cluster[std::size_t(gone)] = keep;
    size[std::size_t(keep)] += size[std::size_t(gone)];
  }
  // 2. First-fit decreasing of the clusters; what fits no bin is spread item by item.
  std::vector<std::vector<int>> members(static_cast<std::size_t>(n));
  for (int a = 0; a < n; ++a) members[std::size_t(root(a))].push_back(a);
  std::vector<int> order;
  for (int r = 0; r < n; ++r)
    if (!members[std::size_t(r)].empty()) order.push_back(r);
  std::stable_sort(order.begin(), order.end(), [&](int p, int q) {
    return members[std::size_t(p)].size() > members[std::size_t(q)].size();
  });
  std::vector<int> bin(static_cast<std::size_t>(n), -1), free(capacity);
  std::vector<int> spill;
  for (int r : order) {
    const int need = int(members[std::size_t(r)].size());
    int target = -1;
    for (int b = 0; b < bins && target < 0; ++b)
      if (free[std::size_t(b)] >= need) target = b;
    if (target < 0) {
      spill.insert(spill.end(), members[std::size_t(r)].begin(), members[std::size_t(r)].end());
      continue;
    }
    for (int a : members[std::size_t(r)]) bin[std::size_t(a)] = target;
    free[std::size_t(target)] -= need;
  }
  for (int a : spill)
    for (int b = 0; b < bins; ++b)
      if (free[std::size_t(b)] > 0) {
        bin[std::size_t(a)] = b;
        --free[std::size_t(b)];
        break;
      }
  // 3. Swaps that lower the cut: gain = what each item gains in the other's bin, less the
  //    pair's own weight counted twice (it stays cut).
  const auto affinity = [&](int a, int b_of) {
    std::int64_t sum = 0;
    for (int c = 0; c < n; ++c)
      if (c != a && bin[std::size_t(c)] == b_of) sum += weight(a, c);
    return sum;
  };
  for (bool improved = true; improved;) {
    improved = false;
    for (int a = 0; a < n; ++a)
      for (int b = a + 1; b < n; ++b) {
        const int A = bin[std::size_t(a)], B = bin[std::size_t(b)];
        if (A == B) continue;
        const std::int64_t gain =
            affinity(a, B) - affinity(a, A) + affinity(b, A) - affinity(b, B) - 2 * weight(a, b);
        if (gain <= 0) continue;
        std::swap(bin[std::size_t(a)], bin[std::size_t(b)]);
        improved = true;
      }
  }
  return bin;
}

}  // namespace detail

/// \brief A placement of `co.experts()` experts, one replica each, `slots_per_rank` per EP
/// rank, that puts experts often chosen together on the same node (by `nodes`, the node of
/// each EP rank: MoELayer::node_map()) and then on the same rank. Usable with
/// MoELayer::apply_placement (a layer built with LayerOptions::expert_placement).
inline ExpertPlacement topology_aware_placement(const CoOccurrence& co, const NodeMap& nodes,
                                                int slots_per_rank) {
  constexpr const char* where = "kmoe::topology_aware_placement";
  const int ranks = nodes.ranks(), experts = co.experts();
  require(ranks >= 1, where, "nodes.ranks()", ranks, "must be at least 1 (build a node map)");
  require(slots_per_rank >= 1, where, "slots_per_rank", slots_per_rank, "must be at least 1");
  require(experts == ranks * slots_per_rank, where, "co.experts()", experts,
          "must equal ranks * slots_per_rank = " + std::to_string(ranks * slots_per_rank) +
              " (one replica per expert fills every slot)");
  ExpertPlacement placement{ranks, slots_per_rank, experts, std::vector<int>(std::size_t(experts))};
  std::vector<int> all(static_cast<std::size_t>(experts));
  std::iota(all.begin(), all.end(), 0);
  std::vector<int> node_capacity;
  for (int n = 0; n < nodes.nodes(); ++n)
    node_capacity.push_back(int(nodes.ranks_of(n).size()) * slots_per_rank);
  const auto node_of = detail::partition_by_co_occurrence(all, node_capacity, co);
  for (int n = 0; n < nodes.nodes(); ++n) {
    std::vector<int> here;
    for (int e = 0; e < experts; ++e)
      if (node_of[std::size_t(e)] == n) here.push_back(e);
    const auto ranks_here = nodes.ranks_of(n);
    const auto rank_of = detail::partition_by_co_occurrence(
        here, std::vector<int>(ranks_here.size(), slots_per_rank), co);
    for (std::size_t r = 0; r < ranks_here.size(); ++r) {
      int slot = ranks_here[r] * slots_per_rank;
      for (std::size_t i = 0; i < here.size(); ++i)
        if (rank_of[i] == int(r)) placement.logical[std::size_t(slot++)] = here[i];
    }
  }
  placement.validate(where);
  return placement;
}

}  // namespace kmoe
