// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file exchange/dispatch.hpp
/// \brief Turns a routing plan into contiguous per-expert segments: a stable counting sort
/// of the (token, slot) assignments by destination key, the capacity rule, and the row of
/// every kept assignment in the permuted buffer. One pass over the assignments for the
/// histogram and one for the scatter; no per-expert mask loop.

#include <kmoe/capacity.hpp>
#include <kmoe/detail/select_top_count.hpp>
#include <kmoe/error.hpp>
#include <kmoe/routing_plan.hpp>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace kmoe {

namespace detail {
/// Assignments of a routing table [T, slots] that name an expert (not -1); a free function
/// because nvcc rejects KOKKOS_LAMBDA in a private or protected member.
template <class X, class Expert>
std::int64_t count_routed(const Expert& expert) {
  const int slots = int(expert.extent(1));
  std::int64_t routed = 0;
  Kokkos::parallel_reduce(
      "kmoe::MoELayer::check_accounting", Kokkos::RangePolicy<X>(0, expert.size()),
      KOKKOS_LAMBDA(std::size_t i, std::int64_t & count) {
        if (expert(i / slots, i % slots) >= 0) ++count;
      },
      routed);
  return routed;
}
}  // namespace detail

/// \brief Where every assignment of a routing plan goes.
///
/// Keys order the permuted buffer: key(e) puts expert e's rows after those of all experts
/// with a smaller key (under expert parallelism keys sort by owner rank, then local index).
template <class ExecSpace>
class Dispatch {
 public:
  using memory_space = typename ExecSpace::memory_space;

  /// Row of each (token, slot) in the permuted buffer; -1 when empty or dropped.
  Matrix<int, ExecSpace> position;
  /// Flat (token * slots + slot) index of each permuted row.
  Vector<int, ExecSpace> source;
  /// Assignments per key chosen by the router, before capacity.
  std::vector<std::int64_t> routed_per_key;
  /// Assignments per key kept after capacity; the permuted buffer holds these in key order.
  std::vector<std::int64_t> kept_per_key;
  std::int64_t kept_total = 0;

  /// Builds the dispatch of `plan` for keys expert_key[e] in [0, keys), keeping at most
  /// `capacity` assignments per key (capacity < 0: keep all) by `drop`.
  template <class Scalar>
  void build(const RoutingPlan<ExecSpace, Scalar>& plan, const Vector<int, ExecSpace>& expert_key,
             int keys, long long capacity, DropPolicy drop) {
    const int tokens = int(plan.tokens()), slots = int(plan.slots());
    const int assignments = tokens * slots;
    const int chunks = std::max(1, std::min(assignments, chunk_count()));
    const int chunk = (assignments + chunks - 1) / std::max(chunks, 1);
    detail::ensure_extents(position, "kmoe::Dispatch::position", tokens, slots);
    detail::ensure_extents(start_, "kmoe::Dispatch::start", chunks, keys);
    detail::ensure_extents(order_, "kmoe::Dispatch::order", assignments);
    detail::ensure_extents(segment_, "kmoe::Dispatch::segment", keys + 1);
    detail::ensure_extents(kept_, "kmoe::Dispatch::kept", keys + 1);

    const auto expert = plan.expert;
    const auto key_of = expert_key;
    const auto start = start_;
    const auto order = order_;
    const auto segment = segment_;
    const auto kept = kept_;
    const auto pos = position;
    const auto key_at = KOKKOS_LAMBDA(int i) {
      const int e = expert(i / slots, i % slots);
      return e < 0 ? -1 : key_of(e);
    };

    // 1. Per-chunk histogram of keys.
    Kokkos::deep_copy(start_, 0);
    Kokkos::parallel_for(
        "kmoe::Dispatch::histogram", Kokkos::RangePolicy<ExecSpace>(0, chunks),
        KOKKOS_LAMBDA(int b) {
          const int end = (b + 1) * chunk < assignments ? (b + 1) * chunk : assignments;
          for (int i = b * chunk; i < end; ++i) {
            const int key = key_at(i);
            if (key >= 0) ++start(b, key);
          }
        });
    // 2. Exclusive scan in (key, chunk) order: the start of chunk b's run of each key.
    Kokkos::parallel_scan(
        "kmoe::Dispatch::scan", Kokkos::RangePolicy<ExecSpace>(0, keys * chunks),
        KOKKOS_LAMBDA(int idx, int& running, bool final) {
          const int key = idx / chunks, b = idx % chunks;
          const int count = start(b, key);
          if (final) {
            start(b, key) = running;
            if (b == 0) segment(key) = running;
          }
          running += count;
          if (final && idx == keys * chunks - 1) segment(keys) = running;
        });
    // 3. Stable scatter of flat indices into key order.
    Kokkos::parallel_for(
        "kmoe::Dispatch::scatter", Kokkos::RangePolicy<ExecSpace>(0, chunks), KOKKOS_LAMBDA(int b) {
          const int end = (b + 1) * chunk < assignments ? (b + 1) * chunk : assignments;
          for (int i = b * chunk; i < end; ++i) {
            const int key = key_at(i);
            pos(i / slots, i % slots) = -1;
            if (key >= 0) order(start(b, key)++) = i;
          }
        });
    // 4. Capacity: each key keeps its first C (by position) or its C heaviest (by weight),
    //    then numbers its kept assignments in token order.
    const auto weight = plan.weight;
    const bool by_probability = drop == DropPolicy::by_probability;
    Kokkos::parallel_for(
        "kmoe::Dispatch::capacity", Kokkos::RangePolicy<ExecSpace>(0, keys),
        KOKKOS_LAMBDA(int key) {
          const int begin = segment(key), n = segment(key + 1) - begin;
          const int limit = capacity < 0 || capacity >= n ? n : int(capacity);
          const auto mark = [&](int j) {
            const int i = order(begin + j);
            pos(i / slots, i % slots) = 0;
          };
          if (limit == n || !by_probability) {
            for (int j = 0; j < limit; ++j) mark(j);
          } else {
            detail::select_top_count<typename decltype(weight)::non_const_value_type>(
                n, limit,
                [&](int j) {
                  const int i = order(begin + j);
                  return weight(i / slots, i % slots);
                },
                mark);
          }
          int rank = 0;
          for (int j = 0; j < n; ++j) {
            const int i = order(begin + j);
            if (pos(i / slots, i % slots) == 0) pos(i / slots, i % slots) = 1 + rank++;
          }
          kept(key) = rank;
        });
    // 5. Counts to the host (the sizes of GEMM launches and exchanges), offsets back.
    auto segment_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), segment_);
    auto kept_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), kept_);
    routed_per_key.assign(keys, 0);
    kept_per_key.assign(keys, 0);
    kept_total = 0;
    for (int key = 0; key < keys; ++key) {
      routed_per_key[key] = segment_host(key + 1) - segment_host(key);
      kept_per_key[key] = kept_host(key);
      const std::int64_t count = kept_host(key);
      kept_host(key) = int(kept_total);
      kept_total += count;
    }
    Kokkos::deep_copy(kept_, kept_host);
    detail::ensure_extents(source, "kmoe::Dispatch::source", std::size_t(kept_total));
    const auto src = source;
    Kokkos::parallel_for(
        "kmoe::Dispatch::rows", Kokkos::RangePolicy<ExecSpace>(0, assignments),
        KOKKOS_LAMBDA(int i) {
          const int t = i / slots, s = i % slots;
          if (pos(t, s) > 0) {
            const int row = kept(key_at(i)) + pos(t, s) - 1;
            pos(t, s) = row;
            src(row) = i;
          } else {
            pos(t, s) = -1;
          }
        });
  }

  /// Debug builds' self-check: the dispatch must account for every routed assignment of
  /// `plan_expert` exactly once (kept + dropped == assignments, counted from the plan
  /// itself, not from this dispatch's own totals) and keep no more than `capacity` per key.
  /// A violation is a kmoe bug: throws kmoe::runtime_error with the counts.
  void check_accounting(const Matrix<int, ExecSpace>& plan_expert, std::int64_t assignments,
                        long long capacity) const {
    const std::int64_t routed = detail::count_routed<ExecSpace>(plan_expert);
    std::int64_t kept = 0, dropped = 0;
    for (std::size_t key = 0; key < kept_per_key.size(); ++key) {
      const auto keep = kept_per_key[key], all = routed_per_key[key];
      if (keep > all || (capacity >= 0 && keep > capacity))
        throw runtime_error("kmoe::MoELayer::forward: internal accounting error: key " +
                            std::to_string(key) + " keeps " + std::to_string(keep) + " of " +
                            std::to_string(all) + " assignments (capacity " +
                            std::to_string(capacity) + ")");
      kept += keep;
      dropped += all - keep;
    }
    if (kept != kept_total || kept + dropped != assignments || assignments != routed)
      throw runtime_error("kmoe::MoELayer::forward: internal accounting error: kept " +
                          std::to_string(kept) + " + dropped " + std::to_string(dropped) +
                          " != assignments " + std::to_string(assignments) + " (plan has " +
                          std::to_string(routed) + ", dispatch kept_total " +
                          std::to_string(kept_total) + ")");
  }

 private:
  static int chunk_count() { return std::min(4096, 8 * ExecSpace().concurrency()); }

  Kokkos::View<int**, Kokkos::LayoutRight, memory_space> start_;
  Vector<int, ExecSpace> order_;
  Vector<int, ExecSpace> segment_;
  Vector<int, ExecSpace> kept_;
};

}  // namespace kmoe
