// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file memory_accounting.hpp
/// \brief The pieces of ForwardStats::memory (MemoryStats) that do not need the layer's
/// internals: bytes of a view, of a policy's weights and of what it keeps for backward
/// (each an optional member of the policy, detected), and the phase peaks of an active
/// AllocationTracker.

#include <kmoe/detail/detect.hpp>
#include <kmoe/forward_stats.hpp>
#include <kmoe/monitoring/allocation_tracker.hpp>
#include <kmoe/parameters.hpp>

#include <cstddef>
#include <cstdint>

namespace kmoe::detail {

template <class E>
using expert_resident_bytes_of = decltype(std::size_t(std::declval<const E&>().resident_bytes()));
template <class E>
using expert_saved_bytes_of = decltype(std::size_t(std::declval<const E&>().saved_bytes()));

/// Bytes of the allocation a view spans.
template <class View>
std::int64_t view_bytes(const View& view) {
  return std::int64_t(view.span() * sizeof(typename View::value_type));
}

/// Weights resident in compute memory: `resident_bytes()` where the policy has it (an expert
/// residency wrapper holds only some experts), else the bytes of its parameters.
template <class Experts>
std::int64_t expert_weight_bytes(const Experts& experts) {
  if constexpr (is_detected_v<expert_resident_bytes_of, Experts>) {
    return std::int64_t(experts.resident_bytes());
  } else {
    ParameterList<typename Experts::execution_space, typename Experts::scalar_type> list;
    experts.collect_parameters(list);
    std::int64_t bytes = 0;
    for (const auto& p : list) bytes += view_bytes(p.value);
    return bytes;
  }
}

/// What a policy keeps between forward and backward: its `saved_bytes()`, 0 without one.
template <class Experts>
std::int64_t expert_saved_bytes(const Experts& experts) {
  if constexpr (is_detected_v<expert_saved_bytes_of, Experts>)
    return std::int64_t(experts.saved_bytes());
  else
    return 0;
}

/// The layer's phases' peaks as the active tracker measured them in their latest run.
inline PhasePeakBytes phase_peak_bytes() {
  PhasePeakBytes peak;
  const AllocationTracker* tracker = AllocationTracker::active();
  if (!tracker) return peak;
  peak.route = tracker->region_peak_bytes("kmoe::MoELayer::route");
  peak.dispatch = tracker->region_peak_bytes("kmoe::MoELayer::dispatch");
  peak.exchange = tracker->region_peak_bytes("kmoe::MoELayer::exchange");
  peak.shared = tracker->region_peak_bytes("kmoe::MoELayer::shared_experts");
  peak.experts = tracker->region_peak_bytes("kmoe::MoELayer::experts");
  peak.combine = tracker->region_peak_bytes("kmoe::MoELayer::combine");
  return peak;
}

}  // namespace kmoe::detail
