// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file expert_placement.hpp
/// \brief kmoe::ExpertPlacement: the logical -> physical expert map. Each EP rank holds the
/// same number of physical expert slots; each slot holds a replica of one logical expert
/// (the expert the router chooses). A logical expert may have replicas on several ranks,
/// never two on one rank. Physical slot i lives on rank i / slots_per_rank.
///
/// A replicated expert's tokens are split over its replicas by token order (the j-th token
/// routed to it goes to replica j mod replicas), so each replica carries an equal share,
/// within one token, and the split does not depend on timing; the load model below assumes
/// exactly that.

#include <kmoe/error.hpp>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace kmoe {

struct ExpertPlacement {
  int ranks = 0;
  int slots_per_rank = 0;
  int logical_experts = 0;
  std::vector<int> logical;  ///< [ranks * slots_per_rank]: logical expert of each physical slot

  int physical_experts() const { return ranks * slots_per_rank; }
  int rank_of_slot(int slot) const { return slot / slots_per_rank; }

  /// Slots of each logical expert, in slot order.
  std::vector<std::vector<int>> replicas() const {
    std::vector<std::vector<int>> out(std::size_t(std::max(logical_experts, 0)));
    for (int slot = 0; slot < int(logical.size()); ++slot)
      if (logical[slot] >= 0 && logical[slot] < logical_experts) out[logical[slot]].push_back(slot);
    return out;
  }

  /// kmoe::invalid_argument, naming `where` and the offending entry, unless every slot
  /// holds a logical expert in range, every logical expert has a replica and no rank holds
  /// two replicas of one expert.
  void validate(const char* where) const {
    require(ranks >= 1, where, "placement.ranks", ranks, "must be at least 1");
    require(slots_per_rank >= 1, where, "placement.slots_per_rank", slots_per_rank,
            "must be at least 1");
    require(logical_experts >= 1, where, "placement.logical_experts", logical_experts,
            "must be at least 1");
    require(int(logical.size()) == physical_experts(), where, "placement.logical.size()",
            logical.size(),
            "must equal ranks * slots_per_rank = " + std::to_string(physical_experts()));
    for (int slot = 0; slot < physical_experts(); ++slot)
      require(logical[slot] >= 0 && logical[slot] < logical_experts, where,
              ("placement.logical[" + std::to_string(slot) + "]").c_str(), logical[slot],
              "must name a logical expert in [0, " + std::to_string(logical_experts) + ")");
    const auto held = replicas();
    for (int e = 0; e < logical_experts; ++e) {
      require(!held[e].empty(), where, "logical expert", e,
              "has no replica: the placement drops it");
      for (std::size_t i = 1; i < held[e].size(); ++i)
        require(
            rank_of_slot(held[e][i]) != rank_of_slot(held[e][i - 1]), where, "logical expert", e,
            "has two replicas on rank " + std::to_string(rank_of_slot(held[e][i])) + " (slots " +
                std::to_string(held[e][i - 1]) + " and " + std::to_string(held[e][i]) + ")");
    }
  }

  /// Load of each rank when each logical expert's load is split evenly over its replicas.
  std::vector<double> rank_load(const std::vector<std::int64_t>& expert_load) const {
    require(int(expert_load.size()) == logical_experts, "kmoe::ExpertPlacement::rank_load",
            "expert_load.size()", expert_load.size(),
            "must equal the logical expert count " + std::to_string(logical_experts));
    const auto held = replicas();
    std::vector<double> load(std::size_t(ranks), 0.0);
    for (int slot = 0; slot < physical_experts(); ++slot) {
      const int e = logical[slot];
      load[rank_of_slot(slot)] += double(expert_load[e]) / double(held[e].size());
    }
    return load;
  }

  /// max / mean of rank_load (1 = perfectly balanced; 0 without load).
  double max_over_mean(const std::vector<std::int64_t>& expert_load) const {
    const auto load = rank_load(expert_load);
    const double total = std::accumulate(load.begin(), load.end(), 0.0);
    if (total <= 0) return 0.0;
    return *std::max_element(load.begin(), load.end()) * double(ranks) / total;
  }

  /// Physical slots whose logical expert differs from `before`'s: the expert weights (and
  /// optimizer state) applying this placement after `before` has to move.
  int moved_from(const ExpertPlacement& before) const {
    require(before.physical_experts() == physical_experts(), "kmoe::ExpertPlacement::moved_from",
            "before.physical_experts()", before.physical_experts(),
            "must equal this placement's " + std::to_string(physical_experts()));
    int moved = 0;
    for (int slot = 0; slot < physical_experts(); ++slot)
      moved += logical[slot] != before.logical[slot];
    return moved;
  }

  /// One replica per logical expert, contiguous blocks (Placement::block with E a multiple
  /// of the ranks): the placement a layer starts from.
  static ExpertPlacement block(int logical_experts, int ranks) {
    require(ranks >= 1, "kmoe::ExpertPlacement::block", "ranks", ranks, "must be at least 1");
    require(logical_experts >= 1 && logical_experts % ranks == 0, "kmoe::ExpertPlacement::block",
            "logical_experts", logical_experts,
            "must be a positive multiple of the ranks " + std::to_string(ranks));
    ExpertPlacement p{ranks, logical_experts / ranks, logical_experts, {}};
    p.logical.resize(std::size_t(logical_experts));
    std::iota(p.logical.begin(), p.logical.end(), 0);
    return p;
  }
};

}  // namespace kmoe
