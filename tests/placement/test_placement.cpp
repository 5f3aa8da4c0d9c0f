// SPDX-License-Identifier: BSD-3-Clause
// The logical -> physical expert map and the rebalancing policies: every placement they
// return is checked slot by slot (each expert kept, no rank with two replicas of one
// expert, equal slots per rank), rank loads are summed by hand from the slots, and the
// skewed workload of issue #17 (one expert at 4x the mean) must go from max/mean >= 2 to
// <= 1.15.
#include <kmoe/placement/expert_placement.hpp>
#include <kmoe/placement/rebalance.hpp>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <cstdint>
#include <random>
#include <set>
#include <vector>

using namespace kmoe;
using Catch::Matchers::ContainsSubstring;

namespace {

/// Rank loads summed slot by slot, each replica carrying load / replicas of its expert.
std::vector<double> loads_by_hand(const ExpertPlacement& p, const std::vector<std::int64_t>& load) {
  std::vector<int> replicas(p.logical_experts, 0);
  for (int e : p.logical) ++replicas[e];
  std::vector<double> rank(p.ranks, 0.0);
  for (int slot = 0; slot < int(p.logical.size()); ++slot)
    rank[slot / p.slots_per_rank] += double(load[p.logical[slot]]) / replicas[p.logical[slot]];
  return rank;
}

double max_over_mean(const std::vector<double>& rank) {
  double total = 0;
  for (double r : rank) total += r;
  return *std::max_element(rank.begin(), rank.end()) * rank.size() / total;
}

void check_well_formed(const ExpertPlacement& p, int experts) {
  REQUIRE(int(p.logical.size()) == p.ranks * p.slots_per_rank);
  std::set<int> seen(p.logical.begin(), p.logical.end());
  CHECK(int(seen.size()) == experts);  // every expert kept
  for (int r = 0; r < p.ranks; ++r) {
    std::set<int> on_rank;
    for (int s = r * p.slots_per_rank; s < (r + 1) * p.slots_per_rank; ++s)
      CHECK(on_rank.insert(p.logical[s]).second);  // no expert twice on a rank
  }
}

/// Issue #17's skew: expert 0 gets 4x the mean, the others share the rest evenly.
std::vector<std::int64_t> skewed(int experts, std::int64_t mean) {
  std::vector<std::int64_t> load(experts, (mean * experts - 4 * mean) / (experts - 1));
  load[0] = 4 * mean;
  return load;
}

}  // namespace

TEST_CASE("a placement that drops an expert or doubles one on a rank is refused", "[placement]") {
  ExpertPlacement p = ExpertPlacement::block(4, 2);
  CHECK_NOTHROW(p.validate("test"));
  p.logical = {0, 1, 2, 1};
  CHECK_THROWS_WITH(p.validate("test"),
                    ContainsSubstring("logical expert = 3") && ContainsSubstring("drops it"));
  ExpertPlacement replicated{2, 2, 3, {0, 1, 0, 2}};  // expert 0 on both ranks
  CHECK_NOTHROW(replicated.validate("test"));
  replicated.logical = {0, 0, 1, 2};
  CHECK_THROWS_WITH(replicated.validate("test"), ContainsSubstring("two replicas on rank 0"));
  p.logical = {0, 1, 2, 7};
  CHECK_THROWS_WITH(p.validate("test"), ContainsSubstring("placement.logical[3] = 7"));
  p.logical = {0, 1, 2};
  CHECK_THROWS_WITH(p.validate("test"), ContainsSubstring("placement.logical.size()"));
  CHECK_THROWS_WITH(ExpertPlacement::block(5, 2), ContainsSubstring("logical_experts = 5"));
  CHECK_THROWS_WITH(balanced_placement({1, 2, 3}, 1, 2),
                    ContainsSubstring("ranks * slots_per_rank"));
  // One expert on two ranks of two slots: two slots no replica can fill.
  CHECK_THROWS_WITH(balanced_placement({5}, 2, 2), ContainsSubstring("leaves slots"));
  CHECK_THROWS_WITH(balanced_placement({5, -1}, 2, 1), ContainsSubstring("expert_load[1] = -1"));
}

TEST_CASE("EPLB placement takes the skewed workload from max/mean >= 2 to <= 1.15", "[placement]") {
  const int experts = 16, ranks = 8;
  const auto load = skewed(experts, 1000);
  const ExpertPlacement before = ExpertPlacement::block(experts, ranks);
  CHECK(max_over_mean(loads_by_hand(before, load)) >= 2.0);
  CHECK(before.max_over_mean(load) == max_over_mean(loads_by_hand(before, load)));

  // One spare slot per rank: the hot expert is replicated.
  const ExpertPlacement after = balanced_placement(load, ranks, 3);
  check_well_formed(after, experts);
  const auto by_hand = loads_by_hand(after, load);
  const auto reported = after.rank_load(load);
  for (int r = 0; r < ranks; ++r) CHECK(std::abs(reported[r] - by_hand[r]) < 1e-9);
  CHECK(max_over_mean(by_hand) <= 1.15);
  CHECK(after.replicas()[0].size() >= 4);  // the hot expert got the spare slots first

  // Without spare slots no replica helps, but packing still beats the block layout.
  const ExpertPlacement packed = balanced_placement(load, ranks, 2);
  check_well_formed(packed, experts);
  CHECK(max_over_mean(loads_by_hand(packed, load)) <= max_over_mean(loads_by_hand(before, load)));
}

TEST_CASE("EPLB placement is well formed and no worse than block on random loads", "[placement]") {
  std::mt19937 gen(7);
  for (int trial = 0; trial < 200; ++trial) {
    const int ranks = 1 + int(gen() % 6), slots = 1 + int(gen() % 4);
    // At least `slots` experts: each has at most one replica per rank.
    const int experts = std::max(slots, ranks * slots - int(gen() % (ranks + 1)));
    std::vector<std::int64_t> load(experts);
    for (auto& l : load) l = std::int64_t(gen() % 1000);
    CAPTURE(trial, ranks, slots, experts);
    const ExpertPlacement p = balanced_placement(load, ranks, slots);
    check_well_formed(p, experts);
    if (experts == ranks * slots) {
      const auto block = ExpertPlacement::block(experts, ranks);
      const auto hand = loads_by_hand(p, load);
      const auto hand_block = loads_by_hand(block, load);
      CHECK(*std::max_element(hand.begin(), hand.end()) <=
            *std::max_element(hand_block.begin(), hand_block.end()) + 1e-9);
    }
    // The same load gives the same plan on every rank.
    CHECK(balanced_placement(load, ranks, slots).logical == p.logical);
  }
}

TEST_CASE("incremental placement moves at most the given number of experts", "[placement]") {
  const int experts = 16, ranks = 8;
  // Placed for yesterday's load (expert 0 hot, so replicated); today expert 5 is the hot one.
  const ExpertPlacement before = balanced_placement(skewed(experts, 1000), ranks, 3);
  std::vector<std::int64_t> load(experts, 1000);
  load[5] = 3000;
  load[9] = 2500;
  const double start = before.max_over_mean(load);
  int moved = -1;
  CHECK(incremental_placement(before, load, 0, &moved).logical == before.logical);
  CHECK(moved == 0);
  double previous = start;
  for (int budget : {2, 4, 8, 32}) {
    const ExpertPlacement p = incremental_placement(before, load, budget, &moved);
    CAPTURE(budget);
    check_well_formed(p, experts);
    CHECK(moved <= budget);
    CHECK(p.moved_from(before) <= moved);
    const double now = max_over_mean(loads_by_hand(p, load));
    CHECK(now <= previous + 1e-12);
    previous = now;
  }
  CHECK(previous < start);
  // Two moves (a new replica of each hot expert) already beat a fresh EPLB placement's
  // max/mean by little while it moves far more experts.
  const ExpertPlacement two = incremental_placement(before, load, 2);
  const ExpertPlacement fresh = balanced_placement(load, ranks, 3);
  CHECK(max_over_mean(loads_by_hand(two, load)) <= 1.15);
  CHECK(fresh.moved_from(before) > 2);
  const ExpertPlacement broken{2, 2, 3, {0, 0, 1, 2}};
  CHECK_THROWS_WITH(incremental_placement(broken, {1, 1, 1}, 2), ContainsSubstring("two replicas"));
}
