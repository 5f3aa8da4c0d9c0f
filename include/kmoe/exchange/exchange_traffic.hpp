// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file exchange/exchange_traffic.hpp
/// \brief kmoe::ExchangeTraffic: the bytes and messages a rank hands to its communicators
/// for the expert-parallel exchanges, split by whether the peer is on this rank's node.

#include <cstdint>

namespace kmoe {

/// \brief Bytes and messages sent to other ranks, by node class. A message is one non-empty
/// block of one collective for one peer; what a rank sends itself is a local copy and is not
/// counted. Without a node map (LayerOptions::nodes) every peer counts as on this node.
struct ExchangeTraffic {
  std::int64_t intra_node_bytes = 0;
  std::int64_t inter_node_bytes = 0;
  std::int64_t intra_node_messages = 0;
  std::int64_t inter_node_messages = 0;

  /// Adds one message of `bytes` (nothing when empty).
  void add(bool inter_node, std::int64_t bytes) {
    if (bytes <= 0) return;
    (inter_node ? inter_node_bytes : intra_node_bytes) += bytes;
    ++(inter_node ? inter_node_messages : intra_node_messages);
  }
  ExchangeTraffic& operator+=(const ExchangeTraffic& other) {
    intra_node_bytes += other.intra_node_bytes;
    inter_node_bytes += other.inter_node_bytes;
    intra_node_messages += other.intra_node_messages;
    inter_node_messages += other.inter_node_messages;
    return *this;
  }
  /// What was sent between two readings of a running total.
  friend ExchangeTraffic operator-(ExchangeTraffic later, const ExchangeTraffic& earlier) {
    later.intra_node_bytes -= earlier.intra_node_bytes;
    later.inter_node_bytes -= earlier.inter_node_bytes;
    later.intra_node_messages -= earlier.intra_node_messages;
    later.inter_node_messages -= earlier.inter_node_messages;
    return later;
  }
};

}  // namespace kmoe
