// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file rebalance.hpp
/// \brief Placement policies computed from recorded load (ExpertLoadWindow::totals()):
///  - balanced_placement: DeepSeek EPLB's greedy scheme. Replicas first (each spare slot
///    goes to the logical expert with the largest load per replica), then packing
///    heaviest replica first onto the least loaded rank with a free slot that holds no
///    replica of the same expert.
///  - incremental_placement: from the current placement, the best single move at a time
///    (a swap of two slots, or a new replica of a hot expert in the slot of an expert that
///    keeps another replica) while it lowers the most loaded rank, moving at most
///    `max_moves` experts.
/// Both are deterministic (ties go to the lower index), so every rank computes the same
/// plan from the same (all-reduced) load.

#include <kmoe/error.hpp>
#include <kmoe/placement/expert_placement.hpp>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace kmoe {

/// \brief The EPLB placement of `expert_load.size()` logical experts on `ranks` ranks of
/// `slots_per_rank` slots each (ranks * slots_per_rank >= experts; the spare slots become
/// replicas, at most one per rank and expert).
inline ExpertPlacement balanced_placement(const std::vector<std::int64_t>& expert_load, int ranks,
                                          int slots_per_rank) {
  constexpr const char* where = "kmoe::balanced_placement";
  const int experts = int(expert_load.size());
  require(experts >= 1, where, "expert_load.size()", experts, "must be at least 1");
  require(ranks >= 1, where, "ranks", ranks, "must be at least 1");
  require(slots_per_rank >= 1, where, "slots_per_rank", slots_per_rank, "must be at least 1");
  require(std::int64_t(ranks) * slots_per_rank >= experts, where, "ranks * slots_per_rank",
          std::int64_t(ranks) * slots_per_rank,
          "must hold every logical expert (" + std::to_string(experts) + ")");
  for (int e = 0; e < experts; ++e)
    require(expert_load[e] >= 0, where, ("expert_load[" + std::to_string(e) + "]").c_str(),
            expert_load[e], "must not be negative");

  // Replicas: each spare slot to the expert with the most load per replica (a replica per
  // rank at most).
  std::vector<int> count(std::size_t(experts), 1);
  const auto per_replica = [&](int e) { return double(expert_load[e]) / double(count[e]); };
  for (int spare = ranks * slots_per_rank - experts; spare > 0; --spare) {
    int best = -1;
    for (int e = 0; e < experts; ++e)
      if (count[e] < ranks && (best < 0 || per_replica(e) > per_replica(best))) best = e;
    if (best < 0) break;  // every expert already has a replica on every rank
    ++count[best];
  }
  // With every expert on every rank the leftover slots repeat nothing new; the packing
  // below needs exactly one replica per slot, so they are refused rather than left empty.
  require(std::accumulate(count.begin(), count.end(), 0) == ranks * slots_per_rank, where,
          "slots_per_rank", slots_per_rank,
          "leaves slots no replica can fill (at most one replica per rank and expert)");

  // Packing: replicas by decreasing load (ties: lower expert), each onto the least loaded
  // rank with a free slot and no replica of that expert (ties: lower rank).
  std::vector<int> order;
  for (int e = 0; e < experts; ++e)
    for (int r = 0; r < count[e]; ++r) order.push_back(e);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return per_replica(a) > per_replica(b); });
  std::vector<double> load(std::size_t(ranks), 0.0);
  std::vector<std::vector<int>> held(static_cast<std::size_t>(ranks));
  for (const int e : order) {
    int best = -1;
    for (int r = 0; r < ranks; ++r) {
      if (int(held[r].size()) == slots_per_rank) continue;
      if (std::find(held[r].begin(), held[r].end(), e) != held[r].end()) continue;
      if (best < 0 || load[r] < load[best]) best = r;
    }
    // A rank with a free slot that lacks e always exists: e has at most `ranks` replicas.
    require(best >= 0, where, "logical expert", e, "found no rank with a free slot");
    held[best].push_back(e);
    load[best] += per_replica(e);
  }
  ExpertPlacement p{ranks, slots_per_rank, experts, {}};
  for (auto& slots : held) {
    std::sort(slots.begin(), slots.end());
    p.logical.insert(p.logical.end(), slots.begin(), slots.end());
  }
  p.validate(where);
  return p;
}

/// \brief `current` improved one step at a time, each step the move that lowers the most
/// loaded rank's load the most, until no move helps or the next would move more than
/// `max_moves` experts. A move is either a swap of two slots' experts between the most
/// loaded rank and another (two experts move) or a new replica of an expert of the most
/// loaded rank in the slot of an expert that keeps another replica (one expert moves).
/// `moved` (optional) receives the number of moved experts (= result.moved_from(current)
/// unless a later move undid an earlier one).
inline ExpertPlacement incremental_placement(const ExpertPlacement& current,
                                             const std::vector<std::int64_t>& expert_load,
                                             int max_moves, int* moved = nullptr) {
  constexpr const char* where = "kmoe::incremental_placement";
  current.validate(where);
  require(max_moves >= 0, where, "max_moves", max_moves, "must not be negative");
  require(int(expert_load.size()) == current.logical_experts, where, "expert_load.size()",
          expert_load.size(),
          "must equal the logical expert count " + std::to_string(current.logical_experts));
  ExpertPlacement p = current;
  const int S = p.slots_per_rank;
  const auto holds = [&](const ExpertPlacement& q, int rank, int e) {
    for (int s = rank * S; s < (rank + 1) * S; ++s)
      if (q.logical[s] == e) return true;
    return false;
  };
  const auto peak = [&](const ExpertPlacement& q) {
    const auto load = q.rank_load(expert_load);
    return *std::max_element(load.begin(), load.end());
  };
  int moves = 0;
  for (;;) {
    const auto load = p.rank_load(expert_load);
    const int heavy = int(std::max_element(load.begin(), load.end()) - load.begin());
    const auto count = p.replicas();
    double best_peak = load[heavy];
    int best_cost = 0;
    ExpertPlacement best;
    const auto consider = [&](const ExpertPlacement& q, int cost) {
      if (moves + cost > max_moves) return;
      const double q_peak = peak(q);
      if (q_peak < best_peak || (q_peak == best_peak && best_cost > 0 && cost < best_cost))
        best_peak = q_peak, best_cost = cost, best = q;
    };
    for (int a = heavy * S; a < (heavy + 1) * S; ++a) {
      const int hot = p.logical[a];
      for (int b = 0; b < p.physical_experts(); ++b) {
        const int other = p.rank_of_slot(b), eb = p.logical[b];
        if (other == heavy || eb == hot || holds(p, other, hot)) continue;
        if (!holds(p, heavy, eb)) {  // swap
          ExpertPlacement q = p;
          std::swap(q.logical[a], q.logical[b]);
          consider(q, 2);
        }
        if (count[eb].size() >= 2) {  // new replica of `hot` instead of one of eb's
          ExpertPlacement q = p;
          q.logical[b] = hot;
          consider(q, 1);
        }
      }
    }
    if (best_cost == 0) break;
    p = best;
    moves += best_cost;
  }
  if (moved) *moved = moves;
  p.validate(where);
  return p;
}

}  // namespace kmoe
