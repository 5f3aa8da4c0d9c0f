// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file topk.hpp
/// \brief Per-token top-k and group-limited selection, with ties broken toward the lower
/// index on every backend (docs/semantics.md section 1).

#include <Kokkos_Core.hpp>

#include <cstdint>

namespace kmoe::detail {

/// Largest group count a group-limited router accepts: selected groups live in one 64-bit mask.
inline constexpr int max_groups = 64;
/// Largest number of per-group scores summed into a group score.
inline constexpr int max_group_score_terms = 8;

/// Writes into out[0..k) the indices in [begin, end) with the k largest score(i) among those
/// where eligible(i), in decreasing score order; equal scores keep the lower index first.
/// Returns how many were written (fewer than k only if fewer are eligible).
template <class Score, class Eligible, class Out>
KOKKOS_INLINE_FUNCTION int select_top_k(int begin, int end, int k, const Score& score,
                                        const Eligible& eligible, Out& out) {
  int written = 0;
  for (; written < k; ++written) {
    int best = -1;
    for (int i = begin; i < end; ++i) {
      if (!eligible(i)) continue;
      bool taken = false;
      for (int j = 0; j < written; ++j) taken = taken || out(j) == i;
      if (taken) continue;
      if (best < 0 || score(i) > score(best)) best = i;
    }
    if (best < 0) break;
    out(written) = best;
  }
  return written;
}

/// Small fixed-capacity index buffer usable inside kernels.
template <int Capacity>
struct IndexBuffer {
  int data[Capacity];
  KOKKOS_INLINE_FUNCTION int& operator()(int i) { return data[i]; }
  KOKKOS_INLINE_FUNCTION int operator()(int i) const { return data[i]; }
};

/// Group-limited eligibility (DeepSeek-V3 n_group / topk_group): experts are split into
/// `groups` equal groups, a group's score is the sum of its `terms` best scores, and the
/// `kept_groups` best groups are returned as a bit mask (ties toward the lower group).
template <class Score>
KOKKOS_INLINE_FUNCTION std::uint64_t select_groups(int experts, int groups, int kept_groups,
                                                   int terms, const Score& score) {
  using Real = decltype(score(0));
  const int group_size = experts / groups;
  Real group_score[max_groups];
  for (int g = 0; g < groups; ++g) {
    IndexBuffer<max_group_score_terms> best;
    const int n = select_top_k(
        g * group_size, (g + 1) * group_size, terms, score, [](int) { return true; }, best);
    group_score[g] = 0;
    for (int j = 0; j < n; ++j) group_score[g] += score(best(j));
  }
  IndexBuffer<max_groups> chosen;
  const int n = select_top_k(
      0, groups, kept_groups, [&](int g) { return group_score[g]; }, [](int) { return true; },
      chosen);
  std::uint64_t mask = 0;
  for (int j = 0; j < n; ++j) mask |= std::uint64_t(1) << chosen(j);
  return mask;
}

}  // namespace kmoe::detail
