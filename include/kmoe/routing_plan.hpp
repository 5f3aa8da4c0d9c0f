// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file routing_plan.hpp
/// \brief What a router hands to the rest of the layer: per-token expert slots and weights.

#include <kmoe/types.hpp>

namespace kmoe {

/// \brief Which distribution P the balance losses (docs/semantics.md section 4) read from a router.
enum class ProbabilityKind {
  softmax,             ///< p = softmax(logits) over all experts
  normalized_sigmoid,  ///< p = sigmoid(logits) normalised to sum 1 per token
  none                 ///< no learned distribution (hash routing): balance losses are zero
};

/// \brief Per-call inputs a router may need besides the hidden states.
template <class ExecSpace>
struct RouteContext {
  /// True during training: noisy routers add noise only then.
  bool training = false;
  /// Vocabulary ids of the tokens [T]; required by hash routing, ignored by the others.
  Kokkos::View<const std::int64_t*, typename ExecSpace::memory_space> token_ids;
  /// Index of the first local token in the global batch, so that seeded noise is the same
  /// whichever rank a token lives on.
  std::int64_t token_offset = 0;
  /// Step counter mixed into seeded noise.
  std::uint64_t step = 0;
};

/// \brief Routing decision for T tokens with S slots each.
///
/// Token-choice routers use S = k; expert choice uses S = E since a token may be taken by
/// any number of experts. An empty slot has expert -1 and weight 0.
template <class ExecSpace, class Scalar>
struct RoutingPlan {
  using route_type = routing_t<Scalar>;
  Matrix<route_type, ExecSpace> logits;  ///< [T, E] raw router logits (empty for hash routing)
  Matrix<route_type, ExecSpace> probs;   ///< [T, E] distribution read by the balance losses
  Matrix<int, ExecSpace> expert;         ///< [T, S] chosen global expert index, -1 if empty
  Matrix<route_type, ExecSpace> weight;  ///< [T, S] combine weight of each slot

  /// Sizes every table for T tokens, E experts and S slots, reusing storage when unchanged.
  void resize(std::size_t tokens, std::size_t experts, std::size_t slots, bool with_logits) {
    detail::ensure_extents(logits, "kmoe::RoutingPlan::logits", with_logits ? tokens : 0, experts);
    detail::ensure_extents(probs, "kmoe::RoutingPlan::probs", tokens, experts);
    detail::ensure_extents(expert, "kmoe::RoutingPlan::expert", tokens, slots);
    detail::ensure_extents(weight, "kmoe::RoutingPlan::weight", tokens, slots);
  }
  std::size_t tokens() const { return expert.extent(0); }
  std::size_t slots() const { return expert.extent(1); }
};

}  // namespace kmoe
