// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file exchange/hierarchical_exchange.hpp
/// \brief kmoe::ExchangeRoute: the all-to-all-v of the expert-parallel exchange, flat (one
/// collective over the EP group) or hierarchical (two levels over the node topology), with
/// the bytes and messages it hands to the communicators counted by node class.
///
/// The hierarchical exchange pairs same-local-index ranks across nodes, as DeepEP's
/// internode kernels and Tutel's 2D all-to-all do, rather than funnelling a node's traffic
/// through one leader (which would serialise the node's bandwidth on one rank). With N
/// nodes of L ranks each, rank (n, l) sending to rank (m, j):
///  0. node-mates all-gather their receive counts (intra-node, P counts each), so that a
///     relay knows how its incoming rows split by final destination;
///  1. over the rail (the N ranks with local index l): (n, l) sends (m, l) everything it
///     has for node m, blocks ordered by destination local index j: one message per node
///     pair and local index, N - 1 inter-node messages per rank instead of (N - 1) * L;
///  2. over the node (the L ranks of node m): (m, l) forwards each block to its destination
///     (m, j), and (m, j) puts the blocks at their places in the flat exchange's receive order.
/// The rows are only moved, never combined, so every receive buffer is bitwise the flat
/// exchange's. Needs the same number of EP ranks on every node. The hierarchical start is
/// blocking (its second level depends on the first): the returned Request is complete.

#include <kmoe/communicator.hpp>
#include <kmoe/error.hpp>
#include <kmoe/exchange/exchange_traffic.hpp>
#include <kmoe/exchange/node_topology.hpp>

#include <cstdint>
#include <memory>
#include <vector>

namespace kmoe {

template <class Communicator>
class ExchangeRoute {
 public:
  using Request = typename Communicator::Request;

  ExchangeRoute() = default;
  /// The flat exchange over `ep`, without a node map (every peer counts as on this node).
  ExchangeRoute(const Communicator& ep)  // NOLINT: implicit, a communicator is a flat route
      : ep_(ep), traffic_(std::make_shared<ExchangeTraffic>()) {}
  /// `kind` over `ep` with the node topology `nodes` of that group (null for a flat route
  /// without a node map); `traffic` is the running total this route adds to (shared with
  /// its owner). The hierarchical kind needs the same
  /// number of ranks on every node (kmoe::invalid_argument otherwise, on every rank of the group).
  ExchangeRoute(const Communicator& ep, std::shared_ptr<const NodeTopology<Communicator>> nodes,
                ExchangeKind kind, std::shared_ptr<ExchangeTraffic> traffic)
      : ep_(ep), nodes_(std::move(nodes)), kind_(kind), traffic_(std::move(traffic)) {
    require(traffic_ != nullptr, "kmoe::ExchangeRoute", "traffic", "null",
            "a route adds to a running total");
    if (kind_ != ExchangeKind::hierarchical) return;
    require(nodes_ != nullptr, "kmoe::ExchangeRoute", "nodes", "null",
            "the hierarchical exchange needs the node topology");
    const NodeMap& map = nodes_->map;
    require(map.uniform_size() > 0, "kmoe::ExchangeRoute", "node map", map.describe(),
            "the hierarchical exchange needs the same number of EP ranks on every node "
            "(set LayerOptions::nodes.ranks_per_node, or use the flat exchange)");
    const int node_count = map.nodes(), per_node = map.uniform_size();
    rank_at_.resize(std::size_t(node_count) * per_node);
    for (int m = 0; m < node_count; ++m) {
      const auto members = map.ranks_of(m);
      for (int j = 0; j < per_node; ++j) rank_at_[std::size_t(m) * per_node + j] = members[j];
    }
  }

  ExchangeKind kind() const { return kind_; }
  bool hierarchical() const { return kind_ == ExchangeKind::hierarchical && ep_.size() > 1; }
  /// Running total of what this route handed to the communicators.
  const ExchangeTraffic& traffic() const {
    static const ExchangeTraffic none;
    return traffic_ ? *traffic_ : none;
  }

  /// All-to-all-v of the EP group (the Communicator role's arguments and result).
  template <class SendView, class RecvView>
  void all_to_all_v(const SendView& send, const std::vector<std::int64_t>& send_counts,
                    const RecvView& recv, const std::vector<std::int64_t>& recv_counts) {
    if (hierarchical()) {
      two_level(send, send_counts, recv, recv_counts);
      return;
    }
    count_flat<SendView>(send_counts);
    ep_.all_to_all_v(send, send_counts, recv, recv_counts);
  }

  /// Started all-to-all-v; the hierarchical one completes before it returns.
  template <class SendView, class RecvView>
  Request all_to_all_v_start(const SendView& send, const std::vector<std::int64_t>& send_counts,
                             const RecvView& recv, const std::vector<std::int64_t>& recv_counts) {
    if (hierarchical()) {
      two_level(send, send_counts, recv, recv_counts);
      return Request{};
    }
    count_flat<SendView>(send_counts);
    return ep_.all_to_all_v_start(send, send_counts, recv, recv_counts);
  }

 private:
  /// One element range moved by a rearrangement.
  struct Block {
    std::int64_t from = 0, to = 0, size = 0;
  };

  bool inter_node(int peer) const {
    return nodes_ != nullptr && !nodes_->map.same_node(peer, ep_.rank());
  }

  template <class SendView>
  void count_flat(const std::vector<std::int64_t>& send_counts) {
    if (!traffic_) traffic_ = std::make_shared<ExchangeTraffic>();
    const std::int64_t width = sizeof(typename SendView::non_const_value_type);
    for (int p = 0; p < int(send_counts.size()); ++p)
      if (p != ep_.rank()) traffic_->add(inter_node(p), send_counts[std::size_t(p)] * width);
  }

  template <class In, class Out>
  static void move_blocks(const In& in, const Out& out, const std::vector<Block>& blocks) {
    for (const Block& b : blocks)
      if (b.size > 0)
        Kokkos::deep_copy(Kokkos::subview(out, std::make_pair(b.to, b.to + b.size)),
                          Kokkos::subview(in, std::make_pair(b.from, b.from + b.size)));
  }

  template <class SendView, class RecvView>
  void two_level(const SendView& send, const std::vector<std::int64_t>& send_counts,
                 const RecvView& recv, const std::vector<std::int64_t>& recv_counts) {
    using T = typename SendView::non_const_value_type;
    using Memory = typename SendView::memory_space;
    using Buffer = Kokkos::View<T*, Memory>;
    const std::int64_t width = sizeof(T);
    const NodeMap& map = nodes_->map;
    const int ranks = ep_.size(), me = ep_.rank();
    const int nodes = map.nodes(), per_node = map.uniform_size();
    const int my_node = map.node(me), local = map.local_index(me);
    const auto rank_at = [&](int m, int j) { return rank_at_[std::size_t(m) * per_node + j]; };
    const auto prefix = [](const std::vector<std::int64_t>& counts) {
      std::vector<std::int64_t> begin(counts.size() + 1, 0);
      for (std::size_t p = 0; p < counts.size(); ++p) begin[p + 1] = begin[p] + counts[p];
      return begin;
    };
    const auto send_begin = prefix(send_counts), recv_begin = prefix(recv_counts);

    // 0. What every node-mate receives from every rank: received(j, q).
    Kokkos::View<std::int64_t*, Memory> mine("kmoe::ExchangeRoute::recv_counts", ranks);
    Kokkos::View<std::int64_t*, Memory> gathered("kmoe::ExchangeRoute::node_recv_counts",
                                                 std::size_t(ranks) * per_node);
    {
      auto host = Kokkos::create_mirror_view(mine);
      for (int q = 0; q < ranks; ++q) host(q) = recv_counts[std::size_t(q)];
      Kokkos::deep_copy(mine, host);
    }
    Communicator node = nodes_->node;
    node.all_gather(mine, gathered);
    for (int j = 0; j < per_node; ++j)
      if (j != local)
        traffic_->add(false, std::int64_t(ranks) * std::int64_t(sizeof(std::int64_t)));
    const auto gathered_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), gathered);
    const auto received = [&](int j, int q) { return gathered_host(std::size_t(j) * ranks + q); };

    // 1. Across nodes, over the rail: to (m, local) this rank's blocks for node m.
    std::vector<Block> pack;
    std::vector<std::int64_t> rail_send(nodes, 0), rail_recv(nodes, 0);
    std::int64_t at = 0;
    for (int m = 0; m < nodes; ++m)
      for (int j = 0; j < per_node; ++j) {
        const int to = rank_at(m, j);
        pack.push_back({send_begin[to], at, send_counts[std::size_t(to)]});
        at += send_counts[std::size_t(to)];
        rail_send[m] += send_counts[std::size_t(to)];
        rail_recv[m] += received(j, rank_at(m, local));
      }
    Buffer outbound("kmoe::ExchangeRoute::rail_send", std::size_t(at));
    move_blocks(send, outbound, pack);
    Buffer relayed("kmoe::ExchangeRoute::rail_recv", std::size_t(prefix(rail_recv)[nodes]));
    for (int m = 0; m < nodes; ++m)
      if (m != my_node) traffic_->add(true, rail_send[m] * width);
    Communicator rail = nodes_->rail;
    rail.all_to_all_v(outbound, rail_send, relayed, rail_recv);

    // 2. Within the node: each relayed block (source node m, destination j) on to (my node, j).
    // The relayed rows are ordered (m, j); the node exchange sends them ordered (j, m).
    std::vector<std::int64_t> relay_begin(std::size_t(nodes) * per_node + 1, 0);
    for (int m = 0; m < nodes; ++m)
      for (int j = 0; j < per_node; ++j) {
        const std::size_t b = std::size_t(m) * per_node + j;
        relay_begin[b + 1] = relay_begin[b] + received(j, rank_at(m, local));
      }
    std::vector<Block> forward;
    std::vector<std::int64_t> node_send(per_node, 0), node_recv(per_node, 0);
    at = 0;
    for (int j = 0; j < per_node; ++j)
      for (int m = 0; m < nodes; ++m) {
        const std::int64_t size = received(j, rank_at(m, local));
        forward.push_back({relay_begin[std::size_t(m) * per_node + j], at, size});
        at += size;
        node_send[j] += size;
        node_recv[j] += recv_counts[std::size_t(rank_at(m, j))];
      }
    Buffer onward("kmoe::ExchangeRoute::node_send", std::size_t(at));
    move_blocks(relayed, onward, forward);
    Buffer arrived("kmoe::ExchangeRoute::node_recv", std::size_t(prefix(node_recv)[per_node]));
    for (int j = 0; j < per_node; ++j)
      if (j != local) traffic_->add(false, node_send[j] * width);
    node.all_to_all_v(onward, node_send, arrived, node_recv);

    // The arrived rows are ordered (relay j, source node m): put them in source rank order.
    std::vector<Block> place;
    at = 0;
    for (int j = 0; j < per_node; ++j)
      for (int m = 0; m < nodes; ++m) {
        const int from = rank_at(m, j);
        place.push_back({at, recv_begin[from], recv_counts[std::size_t(from)]});
        at += recv_counts[std::size_t(from)];
      }
    move_blocks(arrived, recv, place);
  }

  Communicator ep_;
  std::shared_ptr<const NodeTopology<Communicator>> nodes_;
  ExchangeKind kind_ = ExchangeKind::flat;
  std::shared_ptr<ExchangeTraffic> traffic_;
  std::vector<int> rank_at_;  ///< [node * per_node + local index]: EP rank
};

}  // namespace kmoe
