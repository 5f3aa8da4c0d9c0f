// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file slot_cache.hpp
/// \brief Which expert occupies which of a fixed number of resident slots, and which
/// resident expert a batch that needs a free slot evicts (least recently or least frequently
/// used).

#include <kmoe/error.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace kmoe {

/// \brief The expert a full cache evicts when a batch needs a slot.
enum class Eviction {
  lru,  ///< the one whose last use lies furthest back
  lfu   ///< the one used by the fewest batches so far (ties: least recently used)
};

/// \brief The slot map of `slots` resident slots over `experts` experts. Host-only
/// bookkeeping: it holds no weights (memory/resident_experts.hpp moves them).
class SlotCache {
 public:
  /// Where a batch's expert sits, and whether its weights must be brought into the slot.
  struct Placement {
    int expert = -1;
    int slot = -1;
    bool load = false;  ///< a miss: the slot held another expert or none
  };

  SlotCache() = default;
  SlotCache(int slots, int experts, Eviction eviction)
      : eviction_(eviction),
        expert_in_(std::size_t(slots), -1),
        last_use_(std::size_t(slots), 0),
        slot_of_(std::size_t(experts), -1),
        uses_(std::size_t(experts), 0) {
    require(slots >= 1, "kmoe::SlotCache", "slots", slots, "must be at least 1");
    require(experts >= 1, "kmoe::SlotCache", "experts", experts, "must be at least 1");
  }

  int slots() const { return int(expert_in_.size()); }
  int experts() const { return int(slot_of_.size()); }
  /// Slot holding `expert`, -1 if it is not resident.
  int slot_of(int expert) const { return slot_of_[std::size_t(expert)]; }
  /// Expert held by `slot`, -1 if the slot is empty.
  int expert_in(int slot) const { return expert_in_[std::size_t(slot)]; }
  /// Slots holding an expert.
  int resident() const {
    int n = 0;
    for (int e : expert_in_) n += e >= 0;
    return n;
  }

  /// Places every expert of `chosen` (distinct, at most slots()) in a slot: resident ones
  /// stay where they are, the others take empty slots first, then the slots of the
  /// experts the policy evicts; an expert of `chosen` is never evicted for another one.
  std::vector<Placement> place(const std::vector<int>& chosen) {
    require(int(chosen.size()) <= slots(), "kmoe::SlotCache::place", "chosen experts",
            chosen.size(), "exceed the " + std::to_string(slots()) + " slots");
    ++clock_;
    std::vector<bool> pinned(expert_in_.size(), false);
    for (int e : chosen) {
      require(e >= 0 && e < experts(), "kmoe::SlotCache::place", "expert", e,
              "must lie in [0, " + std::to_string(experts()) + ")");
      if (slot_of(e) >= 0) pinned[std::size_t(slot_of(e))] = true;
    }
    std::vector<Placement> placed;
    placed.reserve(chosen.size());
    for (int e : chosen) {
      ++uses_[std::size_t(e)];
      Placement p{e, slot_of(e), false};
      if (p.slot < 0) {
        p.slot = victim(pinned);
        const int evicted = expert_in_[std::size_t(p.slot)];
        if (evicted >= 0) slot_of_[std::size_t(evicted)] = -1;
        expert_in_[std::size_t(p.slot)] = e;
        slot_of_[std::size_t(e)] = p.slot;
        pinned[std::size_t(p.slot)] = true;
        p.load = true;
      }
      last_use_[std::size_t(p.slot)] = clock_;
      placed.push_back(p);
    }
    return placed;
  }

  /// Empties every slot (their contents are stale: the weights changed in the store).
  void clear() {
    for (int& e : expert_in_) e = -1;
    for (int& s : slot_of_) s = -1;
  }

 private:
  /// The first empty slot, else the unpinned slot the policy evicts.
  int victim(const std::vector<bool>& pinned) const {
    int best = -1;
    for (int s = 0; s < slots(); ++s) {
      if (pinned[std::size_t(s)]) continue;
      if (expert_in_[std::size_t(s)] < 0) return s;
      if (best < 0 || evicts_before(s, best)) best = s;
    }
    return best;  // place() bounds chosen by slots(), so one slot is always unpinned
  }

  bool evicts_before(int a, int b) const {
    if (eviction_ == Eviction::lfu) {
      const std::int64_t ua = uses_[std::size_t(expert_in_[std::size_t(a)])];
      const std::int64_t ub = uses_[std::size_t(expert_in_[std::size_t(b)])];
      if (ua != ub) return ua < ub;
    }
    return last_use_[std::size_t(a)] < last_use_[std::size_t(b)];
  }

  Eviction eviction_ = Eviction::lru;
  std::vector<int> expert_in_;          ///< per slot
  std::vector<std::int64_t> last_use_;  ///< per slot: the batch that last used it
  std::vector<int> slot_of_;            ///< per expert
  std::vector<std::int64_t> uses_;      ///< per expert: batches that chose it
  std::int64_t clock_ = 0;
};

}  // namespace kmoe
