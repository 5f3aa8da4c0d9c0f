// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file forward_stats.hpp
/// \brief kmoe::ForwardStats: what one MoELayer::forward reports (balance losses, load per
/// expert, drops, capacity, rows sent per rank, time per phase, bytes resident).

#include <kmoe/exchange/exchange_traffic.hpp>
#include <kmoe/losses.hpp>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace kmoe {

/// \brief Wall time of each forward phase in milliseconds (LayerOptions::time_phases).
struct PhaseTimes {
  double route = 0;      ///< router, non-finite check
  double dispatch = 0;   ///< counting sort, capacity, counts, balance losses, gather of rows
  double imbalance = 0;  ///< wait for the slowest EP rank before each exchange (timed runs only)
  double exchange = 0;   ///< counts all-to-all, payload (links' header first) both ways
  double shared = 0;     ///< shared experts
  double experts = 0;    ///< arrangement into segments, expert GEMMs, TP reduction
  double combine = 0;    ///< weighted sum back to the tokens
};

/// \brief Peak bytes of live Kokkos allocations during each forward phase, the phases of
/// PhaseTimes; -1 when not measured (no kmoe::AllocationTracker counting,
/// monitoring/allocation_tracker.hpp). Process-wide figures: everything Kokkos allocated
/// since the tracker started and not freed yet, this layer's or not.
struct PhasePeakBytes {
  std::int64_t route = -1;
  std::int64_t dispatch = -1;
  std::int64_t exchange = -1;  ///< the higher of the dispatch's and the combine's exchange
  std::int64_t shared = -1;
  std::int64_t experts = -1;
  std::int64_t combine = -1;
};

/// \brief Bytes this rank's layer holds after a forward, by category (docs/training.md,
/// "Memory accounting"), and the peak per phase.
struct MemoryStats {
  /// Routed experts' weights resident in compute memory: the Experts type's
  /// resident_bytes() where it has one, else the bytes of its parameters.
  std::int64_t expert_weights = 0;
  /// Activations kept for backward (0 after an inference forward): the training copy of x,
  /// the routing plan, the dispatch positions, the expert outputs and what the routed and
  /// shared experts keep (their saved_bytes(); none under ExpertMode::recompute).
  std::int64_t activations = 0;
  /// The expert-parallel exchange's row buffers (which hold the experts' input rows).
  std::int64_t exchange_buffers = 0;
  /// Optimizer state: -1 until the caller sets it (stats.memory.optimizer_state =
  /// optimizer.state_bytes(), sharded or not).
  std::int64_t optimizer_state = -1;
  PhasePeakBytes peak;
};

/// \brief Per-call report of a forward pass.
struct ForwardStats {
  BalanceLosses losses;
  /// Router assignments per global expert before capacity, summed over the ranks that route
  /// distinct tokens.
  std::vector<std::int64_t> tokens_per_expert;
  std::int64_t assignments = 0;  ///< this rank's router assignments (T * k for token choice)
  std::int64_t dropped = 0;      ///< this rank's assignments dropped by capacity
  long long capacity = -1;       ///< tokens per expert per rank, -1 when dropless
  /// Hidden-state rows the dispatch sent to each EP rank (this one included): one per
  /// token and rank holding any of its kept experts (one per kept assignment under
  /// RoutingWeightPlacement::input). Empty on one EP rank (no exchange).
  std::vector<std::int64_t> dispatch_rows;
  /// Hidden-state rows the dispatch received from each EP rank (its dispatch_rows for this
  /// rank). Empty on one EP rank, as are the two below.
  std::vector<std::int64_t> dispatch_rows_received;
  /// Expert-output rows the combine returned to each EP rank: one per assignment of that
  /// rank's tokens to this rank's experts.
  std::vector<std::int64_t> combine_rows_sent;
  /// Expert-output rows the combine received from each EP rank.
  std::vector<std::int64_t> combine_rows_received;
  /// Rows of the links' header at the head of the dispatch to each EP rank (the links of
  /// the deduplicated dispatch, one value per kept assignment, in whole rows). Empty on one
  /// EP rank or without deduplication.
  std::vector<std::int64_t> dispatch_header_rows;
  /// Chunks of this forward's pipelined exchange (LayerOptions::exchange_chunks; 1:
  /// sequential).
  int exchange_chunks = 1;
  PhaseTimes phase_ms;  ///< filled when LayerOptions::time_phases
  /// Bytes and messages this rank's exchanges of this forward (counts, links, dispatch,
  /// combine) handed to the communicators for other EP ranks, by node class
  /// (LayerOptions::nodes; without a node map every peer counts as on this node).
  ExchangeTraffic traffic;
  /// Failover (LayerOptions::failover): the failed physical expert slots every rank agreed
  /// on for this forward, and this rank's assignments rerouted to another expert because
  /// theirs had no healthy replica (degraded serving).
  std::vector<int> failed_slots;
  std::int64_t rerouted = 0;
  MemoryStats memory;  ///< bytes resident by category, peak per phase
  /// max / mean of tokens_per_expert (1 = perfectly balanced).
  double imbalance() const {
    if (tokens_per_expert.empty()) return 0.0;
    double total = 0, largest = 0;
    for (auto c : tokens_per_expert) {
      total += double(c);
      largest = std::max(largest, double(c));
    }
    return total == 0 ? 0.0 : largest * double(tokens_per_expert.size()) / total;
  }
};

}  // namespace kmoe
