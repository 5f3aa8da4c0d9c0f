// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file exchange/node_options.hpp
/// \brief kmoe::NodeOptions: which exchange the layer uses (flat or hierarchical) and how
/// its ranks are grouped into nodes (exchange/node_topology.hpp builds the map from them).

#include <kmoe/fingerprint.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace kmoe {

/// \brief Which all-to-all moves the expert-parallel rows (docs/parallel.md, "Nodes").
enum class ExchangeKind {
  flat,         ///< one all-to-all-v over the EP group: every pair of ranks exchanges directly
  hierarchical  ///< two levels: across nodes between same-local-index ranks, then within nodes
};

/// \brief How ranks are grouped into nodes (LayerOptions::nodes). The node map is built
/// when the exchange is hierarchical, when ranks_per_node or node_of_rank is set, or when the
/// router limits the nodes a token reaches; it then comes from, in order of precedence:
/// node_of_rank, ranks_per_node, the environment variable KMOE_RANKS_PER_NODE, the
/// communicator's shared-memory split (MpiCommunicator: MPI_COMM_TYPE_SHARED), or, for a
/// communicator without one, a single node.
struct NodeOptions {
  ExchangeKind exchange = ExchangeKind::flat;
  /// World ranks w and w' share a node when w / ranks_per_node == w' / ranks_per_node;
  /// 0: not set. Must divide the world size.
  int ranks_per_node = 0;
  /// Node id of each world rank (any non-negative ids; empty: not set). For tests that
  /// emulate hosts, and for placements that no contiguous rule describes.
  std::vector<int> node_of_rank;

  /// Whether any setting asks for a node map (the router's node limit is the other reason).
  bool requested() const {
    return exchange == ExchangeKind::hierarchical || ranks_per_node > 0 || !node_of_rank.empty();
  }

  void fingerprint(Fingerprint& print) const {
    print.choice("nodes.exchange", int(exchange), {"flat", "hierarchical"});
    print.integer("nodes.ranks_per_node", ranks_per_node);
    print.integer("nodes.node_of_rank.size()", std::int64_t(node_of_rank.size()));
    for (std::size_t w = 0; w < node_of_rank.size(); ++w)
      print.integer("nodes.node_of_rank[" + std::to_string(w) + "]", node_of_rank[w]);
  }
};

}  // namespace kmoe
