// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file failover.hpp
/// \brief Expert failover: which physical expert slots have failed, how every rank comes to
/// agree on it, and how tokens whose expert has no healthy replica left are rerouted.
///
/// A slot fails when the user marks it (an expert, a slot or a whole EP rank), or, with
/// health checks on, when its outputs hold a non-finite value, when its rank's expert
/// forward throws, or when its rank's experts phase is a latency outlier (more than
/// latency_factor times the EP ranks' (lower) median for latency_window forwards in a row). Marks
/// are local until the next agreement point, an all-reduce of every rank's marks (and
/// experts-phase times) over the world at each forward; every rank then holds the same
/// failed set and takes the same decisions. The layer (MoELayer::forward) sends a failed
/// slot's tokens to the healthy replicas of its expert, and, where none is left, reroutes
/// them (inference only) to their best healthy expert by routing probability, reported in
/// ForwardStats as degraded.

#include <kmoe/error.hpp>
#include <kmoe/fingerprint.hpp>
#include <kmoe/routing_plan.hpp>
#include <kmoe/types.hpp>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace kmoe {

/// \brief Failover settings (LayerOptions::failover).
struct FailoverOptions {
  /// Agree on failed slots at every forward (one all-reduce over the world) and route
  /// around them; required for the mark_* calls.
  bool enabled = false;
  /// Health checks after the experts' forward (an extra agreement per forward, and the
  /// step redone with the new failed set when one appears, so its output stays correct).
  bool check_non_finite = true;  ///< a slot whose outputs hold NaN or Inf fails
  bool catch_exceptions = true;  ///< a rank whose experts' forward throws: all its slots fail
  double latency_factor = 0.0;   ///< > 1: a rank this many times slower than the median fails
  int latency_window = 3;        ///< ... for this many forwards in a row
  /// Tokens whose expert has no healthy replica go to their best healthy expert (inference
  /// only); false raises instead, on every rank.
  bool reroute = true;

  bool health_checks() const {
    return enabled && (check_non_finite || catch_exceptions || latency_factor > 0);
  }
  void validate(const char* where) const {
    require(latency_factor == 0 || latency_factor > 1, where, "options.failover.latency_factor",
            latency_factor, "must be 0 (off) or greater than 1");
    require(latency_window >= 1, where, "options.failover.latency_window", latency_window,
            "must be at least 1");
  }
  void fingerprint(Fingerprint& print) const {
    print.flag("failover.enabled", enabled);
    print.flag("failover.check_non_finite", check_non_finite);
    print.flag("failover.catch_exceptions", catch_exceptions);
    print.real("failover.latency_factor", latency_factor);
    print.integer("failover.latency_window", latency_window);
    print.flag("failover.reroute", reroute);
  }
};

/// \brief The failed set of the physical expert slots (slot = global expert without
/// replicas), this rank's marks not yet agreed on, and the latency record.
class ExpertHealth {
 public:
  ExpertHealth() = default;
  /// `rank_of_slot[s]`: the EP rank holding slot s.
  ExpertHealth(std::vector<int> rank_of_slot, int ep_ranks)
      : rank_of_slot_(std::move(rank_of_slot)),
        failed_(rank_of_slot_.size(), 0),
        pending_(rank_of_slot_.size(), 0),
        slow_streak_(std::size_t(ep_ranks), 0) {}

  int slots() const { return int(failed_.size()); }
  /// Agreed failed flags, one per slot.
  const std::vector<char>& failed() const { return failed_; }
  std::vector<int> failed_slots() const {
    std::vector<int> out;
    for (int s = 0; s < slots(); ++s)
      if (failed_[s]) out.push_back(s);
    return out;
  }
  void mark_slot(int slot) { pending_.at(std::size_t(slot)) = 1; }
  void mark_rank(int ep_rank) {
    for (int s = 0; s < slots(); ++s)
      if (rank_of_slot_[s] == ep_rank) pending_[s] = 1;
  }

  /// The agreement: every rank's marks OR'd, and each world rank's experts-phase time (in
  /// microseconds; its EP rank is ep_rank_of[world rank]) compared with the median over the
  /// EP ranks; `share` does the all-reduce (sum) of the buffer over the world. Returns
  /// whether the failed set grew.
  template <class Share>
  bool agree(const Share& share, int world_rank, const std::vector<int>& ep_rank_of,
             std::int64_t experts_us, double latency_factor, int latency_window) {
    const std::size_t n = failed_.size(), world = ep_rank_of.size();
    std::vector<std::int64_t> buffer(n + world, 0);
    for (std::size_t s = 0; s < n; ++s) buffer[s] = pending_[s] || failed_[s];
    buffer[n + std::size_t(world_rank)] = experts_us;
    share(buffer);
    std::fill(pending_.begin(), pending_.end(), 0);
    bool grew = false;
    for (std::size_t s = 0; s < n; ++s)
      if (buffer[s] > 0 && !failed_[s]) failed_[s] = 1, grew = true;
    if (latency_factor > 0 && experts_us >= 0) {
      // Each EP rank's slowest member (TP / DP peers) against the median EP rank.
      std::vector<std::int64_t> per_ep(slow_streak_.size(), 0);
      for (std::size_t r = 0; r < world; ++r)
        per_ep[std::size_t(ep_rank_of[r])] =
            std::max(per_ep[std::size_t(ep_rank_of[r])], buffer[n + r]);
      std::vector<std::int64_t> sorted = per_ep;
      std::sort(sorted.begin(), sorted.end());
      // The lower median: with two EP ranks, the faster one.
      const double median = double(sorted[(sorted.size() - 1) / 2]);
      for (std::size_t r = 0; r < per_ep.size(); ++r) {
        const bool slow = median > 0 && double(per_ep[r]) > latency_factor * median;
        slow_streak_[r] = slow ? slow_streak_[r] + 1 : 0;
        if (slow_streak_[r] < latency_window) continue;
        for (std::size_t s = 0; s < n; ++s)
          if (rank_of_slot_[s] == int(r) && !failed_[s]) failed_[s] = 1, grew = true;
      }
    }
    return grew;
  }

 private:
  std::vector<int> rank_of_slot_;
  std::vector<char> failed_, pending_;
  std::vector<int> slow_streak_;
};

/// \brief Reroutes every (token, slot) of `plan` whose expert is dead (`dead[e]` = 1) to
/// the healthy expert of highest routing probability (plan.probs) that the token does not
/// already use (ties: lower index), its weight scaled by the ratio of the two
/// probabilities; then rescales the token's weights so that their sum is what it was.
/// For a renormalised softmax top-k router this is the same router restricted to the
/// healthy experts. A token left with no healthy expert keeps the slot empty (-1, weight 0).
/// Returns the rerouted assignments.
template <class X, class S>
std::int64_t reroute_dead_experts(const RoutingPlan<X, S>& plan, const Vector<int, X>& dead) {
  using R = routing_t<S>;
  const auto expert = plan.expert;
  const auto weight = plan.weight;
  const auto probs = plan.probs;
  const int slots = int(plan.slots()), experts = int(dead.extent(0));
  std::int64_t rerouted = 0;
  Kokkos::parallel_reduce(
      "kmoe::reroute_dead_experts", Kokkos::RangePolicy<X>(0, int(plan.tokens())),
      KOKKOS_LAMBDA(int t, std::int64_t& count) {
        R before = 0, after = 0;
        for (int s = 0; s < slots; ++s) before += weight(t, s);
        bool changed = false;
        for (int s = 0; s < slots; ++s) {
          const int e = expert(t, s);
          if (e < 0 || !dead(e)) continue;
          int best = -1;
          for (int c = 0; c < experts; ++c) {
            if (dead(c)) continue;
            bool used = false;
            for (int o = 0; o < slots; ++o) used = used || expert(t, o) == c;
            if (!used && (best < 0 || probs(t, c) > probs(t, best))) best = c;
          }
          changed = true;
          if (best < 0) {
            expert(t, s) = -1;
            weight(t, s) = 0;
            continue;
          }
          weight(t, s) = probs(t, e) > 0 ? weight(t, s) * probs(t, best) / probs(t, e) : 0;
          expert(t, s) = best;
          ++count;
        }
        if (!changed) return;
        for (int s = 0; s < slots; ++s) after += weight(t, s);
        if (after > 0)
          for (int s = 0; s < slots; ++s) weight(t, s) *= before / after;
      },
      rerouted);
  return rerouted;
}

}  // namespace kmoe
