// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file validation.hpp
/// \brief Argument checks shared by the shipped routers.

#include <kmoe/detail/topk.hpp>
#include <kmoe/error.hpp>
#include <kmoe/routers/group_limit.hpp>

namespace kmoe {

namespace detail {

inline void validate_router_shape(const char* where, int hidden, int experts) {
  require(hidden >= 1, where, "hidden", hidden, "must be at least 1");
  require(experts >= 1, where, "experts", experts, "must be at least 1");
}

inline void validate_top_k(const char* where, int experts, int top_k, const GroupLimit& group) {
  require(top_k >= 1 && top_k <= experts, where, "top_k", top_k, "must be in [1, experts]");
  require(group.n_group >= 1 && group.n_group <= max_groups, where, "n_group", group.n_group,
          "must be in [1, 64]");
  require(experts % group.n_group == 0, where, "n_group", group.n_group,
          "must divide the number of experts");
  require(group.topk_group >= 1 && group.topk_group <= group.n_group, where, "topk_group",
          group.topk_group, "must be in [1, n_group]");
  require(group.score_terms >= 1 && group.score_terms <= max_group_score_terms, where,
          "score_terms", group.score_terms, "must be in [1, 8]");
  require(top_k <= group.topk_group * (experts / group.n_group), where, "top_k", top_k,
          "exceeds the experts left in topk_group groups");
}

}  // namespace detail
}  // namespace kmoe
