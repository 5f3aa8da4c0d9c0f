// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file group_limit.hpp
/// \brief The group limit of group-limited routing, a setting of several shipped routers
/// (its checks: routers/validation.hpp; the group selection: detail/topk.hpp).

#include <kmoe/fingerprint.hpp>
#include <kmoe/types.hpp>

namespace kmoe {

/// \brief Group-limited routing (DeepSeek-V3 n_group / topk_group, Megatron group_topk):
/// experts are split into n_group equal groups, each group is scored by the sum of its
/// `score_terms` best selection scores (2 in DeepSeek-V3; Megatron uses k / topk_group),
/// only the best topk_group groups stay eligible. n_group = topk_group = 1 disables it.
struct GroupLimit {
  int n_group = 1;
  int topk_group = 1;
  int score_terms = 2;
  // Called inside the routers' kernels, so it must be a device function too.
  KOKKOS_INLINE_FUNCTION bool enabled() const { return n_group > 1 && topk_group < n_group; }

  /// Adds the three settings as "group.n_group", "group.topk_group", "group.score_terms".
  void fingerprint(Fingerprint& f) const {
    f.integer("group.n_group", n_group);
    f.integer("group.topk_group", topk_group);
    f.integer("group.score_terms", score_terms);
  }
};

}  // namespace kmoe
