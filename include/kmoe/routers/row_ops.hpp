// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file row_ops.hpp
/// \brief Per-token softmax (over all experts or over the chosen slots) and its backward,
/// and the router temperature, shared by the softmax-based routers.

#include <kmoe/detail/math.hpp>
#include <kmoe/detail/topk.hpp>
#include <kmoe/error.hpp>

#include <cmath>

namespace kmoe::detail {

/// Router temperature tau (logits l / tau before the softmax and the top-k): tau < 1
/// sharpens the routing distribution, tau > 1 flattens it.
inline void validate_temperature(const char* where, double temperature) {
  require(std::isfinite(temperature) && temperature > 0, where, "temperature", temperature,
          "must be finite and > 0");
}

/// logits(t, e) *= factor for every element. The routers call it with 1 / tau in forward
/// (the plan's logits are the tempered ones) and in backward (the chain rule through the
/// division); never with tau = 1, so that the untempered logits stay bit-identical.
template <class ExecSpace, class Logits>
void scale_logits(const char* label, const Logits& logits, double factor) {
  using Real = typename Logits::non_const_value_type;
  const Real scale = Real(factor);
  Kokkos::parallel_for(
      label,
      Kokkos::MDRangePolicy<ExecSpace, Kokkos::Rank<2>>({0, 0}, {int(logits.extent(0)),
                                                                 int(logits.extent(1))}),
      KOKKOS_LAMBDA(int t, int e) { logits(t, e) *= scale; });
}

/// probs(t, :) = softmax(logits(t, :)) over E experts, max-shifted.
template <class Logits, class Probs>
KOKKOS_INLINE_FUNCTION void softmax_row(int t, int experts, const Logits& logits,
                                        const Probs& probs) {
  using Real = typename Probs::non_const_value_type;
  Real max_logit = logits(t, 0);
  for (int e = 1; e < experts; ++e) max_logit = logits(t, e) > max_logit ? logits(t, e) : max_logit;
  Real sum = 0;
  for (int e = 0; e < experts; ++e) {
    probs(t, e) = exp(Real(logits(t, e) - max_logit));
    sum += probs(t, e);
  }
  for (int e = 0; e < experts; ++e) probs(t, e) /= sum;
}

/// The expert with the largest value(t, :) over E experts: the shipped routers' top-k
/// (select_top_k) with k = 1, so ties go to the lower index as there (docs/semantics.md
/// section 1).
template <class Values>
KOKKOS_INLINE_FUNCTION int argmax_row(int t, int experts, const Values& value) {
  IndexBuffer<1> best;
  select_top_k(
      0, experts, 1, [&](int e) { return value(t, e); }, [](int) { return true; }, best);
  return best(0);
}

/// Adds to grad_logits(t, :) the softmax backward of a gradient that is non-zero only on
/// the chosen slots: grad_probs(j) on expert(t, j) for j < slots (expert -1 is empty).
template <class Probs, class Experts, class GradProb, class GradLogits>
KOKKOS_INLINE_FUNCTION void softmax_backward_sparse(int t, int experts, int slots,
                                                    const Probs& probs, const Experts& expert,
                                                    const GradProb& grad_probs,
                                                    const GradLogits& grad_logits) {
  using Real = typename Probs::non_const_value_type;
  Real dot = 0;
  for (int j = 0; j < slots; ++j)
    if (expert(t, j) >= 0) dot += grad_probs(j) * probs(t, expert(t, j));
  for (int e = 0; e < experts; ++e) grad_logits(t, e) -= probs(t, e) * dot;
  for (int j = 0; j < slots; ++j)
    if (expert(t, j) >= 0) grad_logits(t, expert(t, j)) += probs(t, expert(t, j)) * grad_probs(j);
}

/// softmax_backward_sparse for a plan whose slot weights are the chosen experts'
/// probabilities (w_j = probs(t, expert(t, j)): a top-k softmax without renormalisation),
/// given dLoss/dw as grad_weight [T, S].
template <class Plan, class GradWeight, class GradLogits>
KOKKOS_INLINE_FUNCTION void softmax_backward_chosen(int t, const Plan& plan,
                                                    const GradWeight& grad_weight,
                                                    const GradLogits& grad_logits) {
  softmax_backward_sparse(t, int(plan.probs.extent(1)), int(plan.expert.extent(1)), plan.probs,
                          plan.expert, Kokkos::subview(grad_weight, t, Kokkos::ALL), grad_logits);
}

/// Gradient of w_j = scale * v_j / (sum_r v_r + eps) (or scale * v_j when not normalised)
/// with respect to the chosen values v_j, given dLoss/dw_j.
template <class Real, class Value, class GradWeight>
KOKKOS_INLINE_FUNCTION Real normalized_weight_backward(int j, int slots, bool normalize, Real scale,
                                                       Real eps, const Value& value,
                                                       const GradWeight& grad_weight) {
  if (!normalize) return scale * grad_weight(j);
  Real z = eps, dot = 0;
  for (int r = 0; r < slots; ++r) {
    z += value(r);
    dot += grad_weight(r) * value(r);
  }
  return scale * (grad_weight(j) / z - dot / (z * z));
}

/// weight(t, j) = softmax over the chosen slots of value(j).
template <class Value, class Weight>
KOKKOS_INLINE_FUNCTION void softmax_over_chosen(int t, int slots, const Value& value,
                                                const Weight& weight) {
  using Real = typename Weight::non_const_value_type;
  Real max_value = value(0);
  for (int j = 1; j < slots; ++j) max_value = value(j) > max_value ? value(j) : max_value;
  Real sum = 0;
  for (int j = 0; j < slots; ++j) {
    weight(t, j) = exp(Real(value(j) - max_value));
    sum += weight(t, j);
  }
  for (int j = 0; j < slots; ++j) weight(t, j) /= sum;
}

/// dLoss/dvalue_j for weight = softmax over the chosen values: w_j (g_j - sum_r g_r w_r).
template <class Weight, class GradWeight>
KOKKOS_INLINE_FUNCTION typename Weight::non_const_value_type softmax_over_chosen_backward(
    int t, int j, int slots, const Weight& weight, const GradWeight& grad_weight) {
  typename Weight::non_const_value_type dot = 0;
  for (int r = 0; r < slots; ++r) dot += grad_weight(t, r) * weight(t, r);
  return weight(t, j) * (grad_weight(t, j) - dot);
}

}  // namespace kmoe::detail

namespace kmoe {

/// The per-token helpers for a router's own kernels (examples/custom_router.cpp): softmax of
/// one token's logits, its top-1, the softmax backward of a gradient on the chosen experts
/// (softmax_backward_chosen when w = p), and the temperature scaling; the shipped softmax
/// routers use softmax_row, softmax_backward_sparse and scale_logits.
using detail::argmax_row;
using detail::scale_logits;
using detail::softmax_backward_chosen;
using detail::softmax_backward_sparse;
using detail::softmax_row;

}  // namespace kmoe
