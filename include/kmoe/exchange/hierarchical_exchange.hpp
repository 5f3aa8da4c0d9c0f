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

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace kmoe {

namespace detail {
/// out's row i (of `width` elements) = in's row index(i), on flat views; a free function
/// because nvcc rejects KOKKOS_LAMBDA in a private member.
template <class Exec, class Index, class In, class Out>
void gather_flat_rows(const Index& index, const In& in, const Out& out, int width) {
  Kokkos::parallel_for(
      "kmoe::ExchangeRoute::gather_rows",
      Kokkos::RangePolicy<Exec>(0, index.extent(0) * std::size_t(width)),
      KOKKOS_LAMBDA(std::size_t i) {
        out(i) = in(std::size_t(index(i / width)) * width + i % width);
      });
}
}  // namespace detail

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
  /// This rank and the size of the EP group.
  int rank() const { return ep_.rank(); }
  int size() const { return ep_.size(); }
  /// Whether the rows go two levels. Over nodes of one rank the rail is the whole exchange,
  /// which is the flat one (the same messages): such a route is flat, and keeps the flat
  /// route's header-carrying dispatch and pipeline (expert_parallel_exchange.hpp).
  bool hierarchical() const {
    return kind_ == ExchangeKind::hierarchical && ep_.size() > 1 && per_node() > 1;
  }
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

  /// The wrapped communicator's all_to_all_v_sized_by_sender (an optional Communicator
  /// member: call it only where Communicator has it), over the flat route only: the
  /// hierarchical relays must know what they forward before it arrives.
  template <class SendView, class Receive>
  std::vector<std::int64_t> all_to_all_v_sized_by_sender(
      const SendView& send, const std::vector<std::int64_t>& send_counts, const Receive& receive) {
    require(!hierarchical(), "kmoe::ExchangeRoute::all_to_all_v_sized_by_sender", "kind",
            "hierarchical", "a receiver sized by its senders needs the flat route");
    count_flat<SendView>(send_counts);
    return ep_.all_to_all_v_sized_by_sender(send, send_counts, receive);
  }

  /// all_to_all_v_start of rows of `width` elements in which rows with equal `row_key` (a
  /// rank-1 int view, one key per send row, ascending within each destination's block) hold
  /// equal values, as the deduplicated dispatch's rows of one token do. The hierarchical
  /// route sends such a row across nodes once per destination node, with a mask of the
  /// node's ranks that take it (DeepEP's internode dispatch); the flat one sends it per rank.
  template <class SendView, class RecvView, class Keys>
  Request all_to_all_rows_start(const SendView& send, const std::vector<std::int64_t>& send_counts,
                                const RecvView& recv, const std::vector<std::int64_t>& recv_counts,
                                int width, const Keys& row_key) {
    // With one rank per node (a flat route) the rows are already once per node; the mask of
    // a row's ranks is an int: nodes of more than 31 ranks send rows per rank.
    if (!hierarchical() || per_node() > 31)
      return all_to_all_v_start(send, send_counts, recv, recv_counts);
    two_level_deduplicated(send, send_counts, recv, recv_counts, width, row_key);
    return Request{};
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

  /// Prefix sums: begin[p] of block p, begin[size] the total.
  static std::vector<std::int64_t> prefix(const std::vector<std::int64_t>& counts) {
    std::vector<std::int64_t> begin(counts.size() + 1, 0);
    for (std::size_t p = 0; p < counts.size(); ++p) begin[p + 1] = begin[p] + counts[p];
    return begin;
  }
  int nodes() const { return nodes_->map.nodes(); }
  int per_node() const { return nodes_->map.uniform_size(); }
  int local() const { return nodes_->map.local_index(ep_.rank()); }
  int rank_at(int node, int local_index) const {
    return rank_at_[std::size_t(node) * std::size_t(per_node()) + std::size_t(local_index)];
  }

  /// Step 0: what each node-mate j receives from each EP rank q, [j * P + q] (host).
  template <class Memory>
  std::vector<std::int64_t> node_receive_counts(const std::vector<std::int64_t>& recv_counts) {
    const int ranks = ep_.size();
    Kokkos::View<std::int64_t*, Memory> mine("kmoe::ExchangeRoute::recv_counts", ranks);
    Kokkos::View<std::int64_t*, Memory> gathered("kmoe::ExchangeRoute::node_recv_counts",
                                                 std::size_t(ranks) * per_node());
    auto host = Kokkos::create_mirror_view(mine);
    for (int q = 0; q < ranks; ++q) host(q) = recv_counts[std::size_t(q)];
    Kokkos::deep_copy(mine, host);
    Communicator node = nodes_->node;
    node.all_gather(mine, gathered);
    for (int j = 0; j < per_node(); ++j)
      if (j != local())
        traffic_->add(false, std::int64_t(ranks) * std::int64_t(sizeof(std::int64_t)));
    const auto all = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), gathered);
    return std::vector<std::int64_t>(all.data(), all.data() + all.size());
  }

  /// Step 1's transfer over the rail (counts per node), counted as inter-node traffic.
  template <class Send, class Recv>
  void across_nodes(const Send& send, const std::vector<std::int64_t>& send_counts,
                    const Recv& recv, const std::vector<std::int64_t>& recv_counts) {
    const std::int64_t width = sizeof(typename Send::non_const_value_type);
    for (int m = 0; m < nodes(); ++m)
      if (m != nodes_->map.node(ep_.rank()))
        traffic_->add(true, send_counts[std::size_t(m)] * width);
    Communicator rail = nodes_->rail;
    rail.all_to_all_v(send, send_counts, recv, recv_counts);
  }

  /// Step 2: `onward` holds, per node-mate j, the blocks for it from each source node m in
  /// node order (node_send[j] elements); sends them within the node and puts the arrived
  /// blocks at their places in the flat exchange's receive order.
  template <class Buffer, class RecvView>
  void within_node(const Buffer& onward, const std::vector<std::int64_t>& node_send,
                   const RecvView& recv, const std::vector<std::int64_t>& recv_counts) {
    const std::int64_t width = sizeof(typename Buffer::non_const_value_type);
    std::vector<std::int64_t> node_recv(std::size_t(per_node()), 0);
    for (int j = 0; j < per_node(); ++j)
      for (int m = 0; m < nodes(); ++m)
        node_recv[std::size_t(j)] += recv_counts[std::size_t(rank_at(m, j))];
    Buffer arrived("kmoe::ExchangeRoute::node_recv", std::size_t(prefix(node_recv)[per_node()]));
    for (int j = 0; j < per_node(); ++j)
      if (j != local()) traffic_->add(false, node_send[std::size_t(j)] * width);
    Communicator node = nodes_->node;
    node.all_to_all_v(onward, node_send, arrived, node_recv);
    // The arrived rows are ordered (relay j, source node m): put them in source rank order.
    const auto recv_begin = prefix(recv_counts);
    std::vector<Block> place;
    std::int64_t at = 0;
    for (int j = 0; j < per_node(); ++j)
      for (int m = 0; m < nodes(); ++m) {
        const int from = rank_at(m, j);
        place.push_back({at, recv_begin[std::size_t(from)], recv_counts[std::size_t(from)]});
        at += recv_counts[std::size_t(from)];
      }
    move_blocks(arrived, recv, place);
  }

  template <class SendView, class RecvView>
  void two_level(const SendView& send, const std::vector<std::int64_t>& send_counts,
                 const RecvView& recv, const std::vector<std::int64_t>& recv_counts) {
    using T = typename SendView::non_const_value_type;
    using Memory = typename SendView::memory_space;
    using Buffer = Kokkos::View<T*, Memory>;
    const int ranks = ep_.size(), node_count = nodes(), mates = per_node(), me = local();
    const auto received_all = node_receive_counts<Memory>(recv_counts);
    const auto received = [&](int j, int q) { return received_all[std::size_t(j) * ranks + q]; };
    const auto send_begin = prefix(send_counts);

    // 1. Across nodes, over the rail: to (m, me) this rank's blocks for node m.
    std::vector<Block> pack;
    std::vector<std::int64_t> rail_send(std::size_t(node_count), 0),
        rail_recv(std::size_t(node_count), 0);
    std::int64_t at = 0;
    for (int m = 0; m < node_count; ++m)
      for (int j = 0; j < mates; ++j) {
        const int to = rank_at(m, j);
        pack.push_back({send_begin[std::size_t(to)], at, send_counts[std::size_t(to)]});
        at += send_counts[std::size_t(to)];
        rail_send[std::size_t(m)] += send_counts[std::size_t(to)];
        rail_recv[std::size_t(m)] += received(j, rank_at(m, me));
      }
    Buffer outbound("kmoe::ExchangeRoute::rail_send", std::size_t(at));
    move_blocks(send, outbound, pack);
    Buffer relayed("kmoe::ExchangeRoute::rail_recv", std::size_t(prefix(rail_recv)[node_count]));
    across_nodes(outbound, rail_send, relayed, rail_recv);

    // 2. Within the node: each relayed block (source node m, destination j) on to (my node, j).
    // The relayed rows are ordered (m, j); the node exchange sends them ordered (j, m).
    std::vector<std::int64_t> relay_begin(std::size_t(node_count) * mates + 1, 0);
    for (int m = 0; m < node_count; ++m)
      for (int j = 0; j < mates; ++j) {
        const std::size_t b = std::size_t(m) * mates + j;
        relay_begin[b + 1] = relay_begin[b] + received(j, rank_at(m, me));
      }
    std::vector<Block> forward;
    std::vector<std::int64_t> node_send(std::size_t(mates), 0);
    at = 0;
    for (int j = 0; j < mates; ++j)
      for (int m = 0; m < node_count; ++m) {
        const std::int64_t size = received(j, rank_at(m, me));
        forward.push_back({relay_begin[std::size_t(m) * mates + j], at, size});
        at += size;
        node_send[std::size_t(j)] += size;
      }
    Buffer onward("kmoe::ExchangeRoute::node_send", std::size_t(at));
    move_blocks(relayed, onward, forward);
    within_node(onward, node_send, recv, recv_counts);
  }

  /// two_level for rows of `width` elements where equal keys (ascending within each block)
  /// mean equal rows: step 1 sends each key once per node, with a mask of the node's ranks
  /// that take it (first, in its own rail exchange, so that the relay learns the union's size).
  template <class SendView, class RecvView, class Keys>
  void two_level_deduplicated(const SendView& send, const std::vector<std::int64_t>& send_counts,
                              const RecvView& recv, const std::vector<std::int64_t>& recv_counts,
                              int width, const Keys& row_key) {
    using T = typename SendView::non_const_value_type;
    using Memory = typename SendView::memory_space;
    using Exec = typename Memory::execution_space;
    using Buffer = Kokkos::View<T*, Memory>;
    using Ints = Kokkos::View<int*, Memory>;
    const int ranks = ep_.size(), node_count = nodes(), mates = per_node(), me = local();
    const auto received_all = node_receive_counts<Memory>(recv_counts);
    const auto received_rows = [&](int j, int q) {
      return received_all[std::size_t(j) * ranks + q] / width;
    };
    std::vector<std::int64_t> send_rows(send_counts);
    for (auto& r : send_rows) r /= width;
    const auto row_begin = prefix(send_rows);
    const auto key = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), row_key);

    // 1a. Per node m: the union of the keys of the blocks for its ranks (ascending), the row
    //     holding each, and the mask of the ranks taking it; masks padded with 0 to the rows
    //     of the blocks, a size both sides know.
    std::vector<int> union_row;
    std::vector<std::int64_t> union_size(std::size_t(node_count), 0);
    std::vector<std::int64_t> mask_send(std::size_t(node_count), 0),
        mask_recv(std::size_t(node_count), 0);
    std::vector<int> masks;
    for (int m = 0; m < node_count; ++m) {
      std::vector<std::pair<std::int64_t, int>> rows;  // (key, local index j) per send row
      std::vector<int> row_of;
      for (int j = 0; j < mates; ++j) {
        const int to = rank_at(m, j);
        for (std::int64_t r = row_begin[std::size_t(to)]; r < row_begin[std::size_t(to) + 1]; ++r) {
          rows.push_back({std::int64_t(key(r)), j});
          row_of.push_back(int(r));
        }
        mask_recv[std::size_t(m)] += received_rows(j, rank_at(m, me));
      }
      std::vector<std::size_t> order(rows.size());
      for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
      std::stable_sort(order.begin(), order.end(),
                       [&](std::size_t a, std::size_t b) { return rows[a].first < rows[b].first; });
      const std::size_t first_mask = masks.size();
      for (std::size_t i = 0; i < order.size(); ++i) {
        const auto& [k, j] = rows[order[i]];
        if (i > 0 && rows[order[i - 1]].first == k) {
          masks.back() |= 1 << j;
          continue;
        }
        union_row.push_back(row_of[order[i]]);
        masks.push_back(1 << j);
      }
      union_size[std::size_t(m)] = std::int64_t(masks.size() - first_mask);
      masks.resize(first_mask + rows.size(), 0);
      mask_send[std::size_t(m)] = std::int64_t(rows.size());
    }
    Ints mask_out("kmoe::ExchangeRoute::masks", masks.size());
    Ints mask_in("kmoe::ExchangeRoute::relayed_masks", std::size_t(prefix(mask_recv)[node_count]));
    Kokkos::deep_copy(mask_out,
                      Kokkos::View<const int*, Kokkos::HostSpace>(masks.data(), masks.size()));
    across_nodes(mask_out, mask_send, mask_in, mask_recv);
    const auto relayed_masks = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), mask_in);

    // 1b. The union rows, once per node.
    Ints union_index("kmoe::ExchangeRoute::union_row", union_row.size());
    Kokkos::deep_copy(union_index, Kokkos::View<const int*, Kokkos::HostSpace>(union_row.data(),
                                                                               union_row.size()));
    Buffer outbound("kmoe::ExchangeRoute::rail_send", union_row.size() * std::size_t(width));
    detail::gather_flat_rows<Exec>(union_index, send, outbound, width);
    std::vector<std::int64_t> rail_send(static_cast<std::size_t>(node_count)),
        rail_recv(std::size_t(node_count), 0);
    std::vector<std::vector<int>> union_masks(static_cast<std::size_t>(node_count));
    for (int m = 0, at = 0; m < node_count; ++m) {
      rail_send[std::size_t(m)] = union_size[std::size_t(m)] * width;
      for (std::int64_t i = 0; i < mask_recv[std::size_t(m)]; ++i, ++at)
        if (relayed_masks(at) != 0) union_masks[std::size_t(m)].push_back(relayed_masks(at));
      rail_recv[std::size_t(m)] = std::int64_t(union_masks[std::size_t(m)].size()) * width;
    }
    const auto relay_begin = prefix(rail_recv);
    Buffer relayed("kmoe::ExchangeRoute::rail_recv", std::size_t(relay_begin[node_count]));
    across_nodes(outbound, rail_send, relayed, rail_recv);

    // 2. Each node-mate j takes, per source node m, the relayed rows whose mask names it.
    std::vector<int> onward_row;
    std::vector<std::int64_t> node_send(std::size_t(mates), 0);
    for (int j = 0; j < mates; ++j)
      for (int m = 0; m < node_count; ++m) {
        const auto& mask = union_masks[std::size_t(m)];
        std::int64_t taken = 0;
        for (std::size_t u = 0; u < mask.size(); ++u)
          if ((mask[u] >> j) & 1) {
            onward_row.push_back(int(relay_begin[std::size_t(m)] / width + std::int64_t(u)));
            ++taken;
          }
        if (taken != received_rows(j, rank_at(m, me)))
          throw runtime_error("kmoe::ExchangeRoute: internal error: node " + std::to_string(m) +
                              " relayed " + std::to_string(taken) + " rows for local rank " +
                              std::to_string(j) + ", which expects " +
                              std::to_string(received_rows(j, rank_at(m, me))));
        node_send[std::size_t(j)] += taken * width;
      }
    Ints onward_index("kmoe::ExchangeRoute::onward_row", onward_row.size());
    Kokkos::deep_copy(onward_index, Kokkos::View<const int*, Kokkos::HostSpace>(onward_row.data(),
                                                                                onward_row.size()));
    Buffer onward("kmoe::ExchangeRoute::node_send", onward_row.size() * std::size_t(width));
    detail::gather_flat_rows<Exec>(onward_index, relayed, onward, width);
    within_node(onward, node_send, recv, recv_counts);
  }

  Communicator ep_;
  std::shared_ptr<const NodeTopology<Communicator>> nodes_;
  ExchangeKind kind_ = ExchangeKind::flat;
  std::shared_ptr<ExchangeTraffic> traffic_;
  std::vector<int> rank_at_;  ///< [node * per_node + local index]: EP rank
};

}  // namespace kmoe
