// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file node_limit.hpp
/// \brief Node-limited routing (DeepSeek-V3, section 2.1.2): each token's experts come from
/// at most M nodes, the M nodes whose experts score highest for it. The same selection as
/// group-limited routing (group_limit.hpp) with the groups being the experts each node hosts
/// under the layer's placement, which need not be contiguous or equal in size; the MoELayer
/// hands the router that node of each expert (set_expert_nodes) from its node map
/// (LayerOptions::nodes) and placement, and again after every apply_placement.

#include <kmoe/detail/topk.hpp>
#include <kmoe/error.hpp>
#include <kmoe/fingerprint.hpp>
#include <kmoe/types.hpp>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace kmoe {

/// \brief The node limit of a router: a token's experts span at most max_nodes nodes; a
/// node's score is the sum of its `score_terms` best selection scores (0: top_k / max_nodes,
/// at least 1, DeepSeek-V3's K_r / M). max_nodes = 0 disables it.
struct NodeLimit {
  int max_nodes = 0;
  int score_terms = 0;
  KOKKOS_INLINE_FUNCTION bool enabled() const { return max_nodes > 0; }

  /// Adds "node_limit.max_nodes" and "node_limit.score_terms" when enabled (routers without
  /// it keep their fingerprints).
  void fingerprint(Fingerprint& f) const {
    if (!enabled()) return;
    f.integer("node_limit.max_nodes", max_nodes);
    f.integer("node_limit.score_terms", score_terms);
  }
};

namespace detail {

/// Routers with a node limit (SoftmaxTopKRouter, SigmoidBiasRouter), detected by the layer.
template <class R>
using router_node_limited = decltype(bool(std::declval<const R&>().node_limited()));

/// The best `kept` nodes as a bit mask: a node's score is the sum of the `terms` best
/// scores among its experts (node_of(e) == node); ties toward the lower node.
template <class Score, class NodeOf>
KOKKOS_INLINE_FUNCTION std::uint64_t select_nodes(int experts, int nodes, int kept, int terms,
                                                  const Score& score, const NodeOf& node_of) {
  using Real = decltype(score(0));
  Real node_score[max_groups];
  for (int g = 0; g < nodes; ++g) {
    IndexBuffer<max_group_score_terms> best;
    const int n = select_top_k(
        0, experts, terms, score, [&](int e) { return node_of(e) == g; }, best);
    node_score[g] = 0;
    for (int j = 0; j < n; ++j) node_score[g] += score(best(j));
  }
  IndexBuffer<max_groups> chosen;
  const int n = select_top_k(
      0, nodes, kept, [&](int g) { return node_score[g]; }, [](int) { return true; }, chosen);
  std::uint64_t mask = 0;
  for (int j = 0; j < n; ++j) mask |= std::uint64_t(1) << chosen(j);
  return mask;
}

/// \brief A router's node limit with the node of each expert (on the device), as the
/// router's kernel reads it.
template <class ExecSpace>
struct ExpertNodes {
  NodeLimit limit;
  int nodes = 0;
  int terms = 1;
  Vector<int, ExecSpace> node_of;  ///< [E], empty until set()

  KOKKOS_INLINE_FUNCTION bool enabled() const { return limit.enabled(); }
  /// Nodes a token may use given its selection scores: all when the limit is off.
  template <class Score>
  KOKKOS_INLINE_FUNCTION std::uint64_t eligible(int experts, const Score& score) const {
    if (!limit.enabled()) return ~std::uint64_t(0);
    const auto node = node_of;
    return select_nodes(experts, nodes, limit.max_nodes, terms, score,
                        [&](int e) { return node(e); });
  }
  /// Whether expert e is on a node in `mask` (always when the limit is off).
  KOKKOS_INLINE_FUNCTION bool allows(std::uint64_t mask, int e) const {
    return !limit.enabled() || ((mask >> node_of(e)) & 1) != 0;
  }

  /// Checks the limit's own settings (the router's constructor).
  static void validate(const char* where, const NodeLimit& limit, bool group_limited) {
    require(limit.max_nodes >= 0, where, "node_limit.max_nodes", limit.max_nodes,
            "must be >= 0 (0: no node limit)");
    require(limit.score_terms >= 0 && limit.score_terms <= max_group_score_terms, where,
            "node_limit.score_terms", limit.score_terms,
            "must be in [0, 8] (0: top_k / max_nodes)");
    require(!(limit.enabled() && group_limited), where, "node_limit.max_nodes", limit.max_nodes,
            "cannot be combined with a group limit (n_group > 1): choose one");
  }

  /// Sets the node of each of the `top_k`-routing router's experts (`nodes` nodes in all).
  /// kmoe::invalid_argument naming both numbers when max_nodes exceeds the nodes, or when
  /// the experts of max_nodes nodes may be fewer than top_k.
  void set(const char* where, const std::vector<int>& node_of_expert, int node_count, int top_k) {
    require(node_count >= 1 && node_count <= max_groups, where, "nodes", node_count,
            "must be in [1, 64]");
    require(limit.max_nodes <= node_count, where, "node_limit.max_nodes", limit.max_nodes,
            "exceeds the " + std::to_string(node_count) + " nodes of the EP group");
    std::vector<int> experts_on(std::size_t(node_count), 0);
    for (std::size_t e = 0; e < node_of_expert.size(); ++e) {
      require(node_of_expert[e] >= 0 && node_of_expert[e] < node_count, where,
              ("node of expert " + std::to_string(e)).c_str(), node_of_expert[e],
              "must be in [0, " + std::to_string(node_count) + ")");
      ++experts_on[std::size_t(node_of_expert[e])];
    }
    std::sort(experts_on.begin(), experts_on.end());
    int fewest = 0;
    for (int g = 0; g < limit.max_nodes; ++g) fewest += experts_on[std::size_t(g)];
    require(top_k <= fewest, where, "top_k", top_k,
            "exceeds the " + std::to_string(fewest) + " experts of the " +
                std::to_string(limit.max_nodes) + " smallest nodes (node_limit.max_nodes)");
    nodes = node_count;
    terms =
        limit.score_terms > 0
            ? limit.score_terms
            : std::max(1, std::min(max_group_score_terms, top_k / std::max(1, limit.max_nodes)));
    node_of = Vector<int, ExecSpace>("kmoe::router::node_of_expert", node_of_expert.size());
    auto host = Kokkos::create_mirror_view(node_of);
    for (std::size_t e = 0; e < node_of_expert.size(); ++e) host(e) = node_of_expert[e];
    Kokkos::deep_copy(node_of, host);
  }

  /// kmoe::invalid_argument unless the limit is off or the nodes are set (forward).
  void require_set(const char* where) const {
    require(!limit.enabled() || node_of.extent(0) > 0, where, "node_limit.max_nodes",
            limit.max_nodes,
            "needs the node of each expert: build the MoELayer with a node map "
            "(LayerOptions::nodes) or call set_expert_nodes");
  }
};

}  // namespace detail
}  // namespace kmoe
