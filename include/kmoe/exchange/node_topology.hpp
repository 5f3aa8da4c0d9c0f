// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file exchange/node_topology.hpp
/// \brief Which EP ranks share a node: the node map (from the communicator's shared-memory
/// split, a ranks-per-node override or an explicit map), agreed on by every rank, and the
/// two sub-groups the hierarchical exchange talks over (the ranks of this node, and the
/// ranks with this rank's local index on every node: its "rail").

#include <kmoe/agreement.hpp>
#include <kmoe/communicator.hpp>
#include <kmoe/detail/detect.hpp>
#include <kmoe/error.hpp>
#include <kmoe/exchange/node_options.hpp>
#include <kmoe/parallel.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

namespace kmoe {

/// \brief The node of each rank of a group, nodes numbered 0, 1, ... in the order of their
/// lowest rank.
struct NodeMap {
  std::vector<int> node_of_rank;

  /// Renumbers arbitrary node ids (one per rank) in the order of first appearance.
  static NodeMap from_ids(const std::vector<long long>& id_of_rank) {
    NodeMap map;
    std::vector<long long> seen;
    for (long long id : id_of_rank) {
      const auto at = std::find(seen.begin(), seen.end(), id);
      map.node_of_rank.push_back(int(at - seen.begin()));
      if (at == seen.end()) seen.push_back(id);
    }
    return map;
  }

  int ranks() const { return int(node_of_rank.size()); }
  int nodes() const {
    return node_of_rank.empty() ? 0
                                : 1 + *std::max_element(node_of_rank.begin(), node_of_rank.end());
  }
  int node(int rank) const { return node_of_rank[std::size_t(rank)]; }
  bool same_node(int a, int b) const { return node(a) == node(b); }
  /// The ranks of `node`, ascending.
  std::vector<int> ranks_of(int node) const {
    std::vector<int> out;
    for (int r = 0; r < ranks(); ++r)
      if (node_of_rank[std::size_t(r)] == node) out.push_back(r);
    return out;
  }
  /// Position of `rank` among the ranks of its node.
  int local_index(int rank) const {
    int index = 0;
    for (int r = 0; r < rank; ++r) index += node(r) == node(rank);
    return index;
  }
  /// Ranks per node when every node has the same number, else 0.
  int uniform_size() const {
    const int n = nodes();
    if (n == 0) return 0;
    const int size = int(ranks_of(0).size());
    for (int node = 1; node < n; ++node)
      if (int(ranks_of(node).size()) != size) return 0;
    return size;
  }
  /// "node 0: ranks 0, 1; node 1: ranks 2, 3", for messages.
  std::string describe() const {
    std::string text;
    for (int n = 0; n < nodes(); ++n) {
      text += (n ? "; node " : "node ") + std::to_string(n) + ": ranks ";
      const auto members = ranks_of(n);
      for (std::size_t i = 0; i < members.size(); ++i)
        text += (i ? ", " : "") + std::to_string(members[i]);
    }
    return text;
  }
};

namespace detail {
/// Communicators that can split off the ranks sharing this process's memory (MpiCommunicator:
/// MPI_Comm_split_type with MPI_COMM_TYPE_SHARED).
template <class C>
using comm_split_shared = decltype(std::declval<const C&>().split_shared());

/// KMOE_RANKS_PER_NODE as a positive integer, 0 when unset; -1 when set to anything else.
inline int ranks_per_node_from_environment(std::string& text) {
  const char* value = std::getenv("KMOE_RANKS_PER_NODE");
  if (value == nullptr || *value == '\0') return 0;
  text = value;
  char* end = nullptr;
  const long parsed = std::strtol(value, &end, 10);
  return (*end != '\0' || parsed < 1 || parsed > (1L << 30)) ? -1 : int(parsed);
}
}  // namespace detail

/// \brief The node map of an EP group and the sub-groups of the hierarchical exchange.
template <class Communicator>
struct NodeTopology {
  NodeMap map;  ///< node of each EP rank
  int ep_rank = 0;
  Communicator node;  ///< the EP ranks of this rank's node, ordered by EP rank
  Communicator rail;  ///< the EP ranks with this rank's local index, ordered by node

  bool empty() const { return map.ranks() == 0; }

  /// \brief Builds the node map of `groups.ep` from `options` (see NodeOptions). Collective
  /// over the world: every rank must call it. A setting that differs across ranks
  /// (ranks_per_node, KMOE_RANKS_PER_NODE), an explicit map that does not cover the world,
  /// or a ranks_per_node that does not divide it raise kmoe::invalid_argument on every rank.
  template <class MemorySpace>
  static NodeTopology create(const ParallelGroups<Communicator>& groups,
                             const NodeOptions& options) {
    constexpr const char* where = "kmoe::NodeTopology::create";
    Communicator world = groups.world;
    const int world_size = world.size(), world_rank = world.rank();
    // The setting this rank resolved: explicit map (-2), ranks per node (> 0), or detection (0).
    int setting = 0;
    agree_or_throw(world, where, [&] {
      if (!options.node_of_rank.empty()) {
        require(int(options.node_of_rank.size()) == world_size, where,
                "options.nodes.node_of_rank.size()", options.node_of_rank.size(),
                "must name the node of each of the " + std::to_string(world_size) + " world ranks");
        for (std::size_t w = 0; w < options.node_of_rank.size(); ++w)
          require(options.node_of_rank[w] >= 0, where,
                  ("options.nodes.node_of_rank[" + std::to_string(w) + "]").c_str(),
                  options.node_of_rank[w], "must be a node id >= 0");
        setting = -2;
        return;
      }
      require(options.ranks_per_node >= 0, where, "options.nodes.ranks_per_node",
              options.ranks_per_node, "must be >= 0 (0: from KMOE_RANKS_PER_NODE or the host)");
      setting = options.ranks_per_node;
      std::string text;
      if (setting == 0) setting = detail::ranks_per_node_from_environment(text);
      require(setting >= 0, where, "KMOE_RANKS_PER_NODE", text, "must be a positive integer");
      require(world_size % std::max(setting, 1) == 0, where, "ranks per node", setting,
              "must divide the world size " + std::to_string(world_size));
    });
    // Every rank must have resolved the same setting (an environment variable is per
    // process); the explicit map itself is compared by the layer's fingerprint.
    {
      std::vector<long long> settings = gather<MemorySpace>(world, setting);
      bool same = std::all_of(settings.begin(), settings.end(),
                              [&](long long s) { return s == settings[0]; });
      if (!same) {
        std::vector<std::string> shown;
        for (long long s : settings)
          shown.push_back(s == -2 ? "an explicit node map" : std::to_string(s));
        throw invalid_argument(where, "ranks per node (options.nodes or KMOE_RANKS_PER_NODE)",
                               detail::ranks_with_values(shown, "has", "have"),
                               "every rank must group the ranks into nodes alike");
      }
    }
    long long id = 0;
    if (setting == -2) {
      id = options.node_of_rank[std::size_t(world_rank)];
    } else if (setting > 0) {
      id = world_rank / setting;
    } else if constexpr (detail::is_detected_v<detail::comm_split_shared, Communicator>) {
      // A node is named by its lowest world rank.
      const Communicator shared = world.split_shared();
      id = -all_reduce_max_value<MemorySpace>(shared, -static_cast<long long>(world_rank));
    }
    NodeTopology topology;
    topology.map = NodeMap::from_ids(gather<MemorySpace>(groups.ep, id));
    topology.ep_rank = groups.ep_rank;
    const int node = topology.map.node(groups.ep_rank);
    topology.node = groups.ep.split(node, groups.ep_rank);
    topology.rail = groups.ep.split(topology.map.local_index(groups.ep_rank), node);
    return topology;
  }

 private:
  template <class MemorySpace>
  static std::vector<long long> gather(const Communicator& comm, long long value) {
    Kokkos::View<long long*, MemorySpace> mine("kmoe::NodeTopology::mine", 1);
    Kokkos::View<long long*, MemorySpace> all("kmoe::NodeTopology::all", std::size_t(comm.size()));
    Kokkos::deep_copy(mine, value);
    Communicator group = comm;
    group.all_gather(mine, all);
    auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), all);
    return std::vector<long long>(host.data(), host.data() + host.size());
  }
};

}  // namespace kmoe
