// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file router.hpp
/// \brief The Router role and its compile-time check.
///
/// A Router R (for execution space X and scalar S) provides:
///  - `using execution_space = X; using scalar_type = S;` (S float or double)
///  - `static constexpr kmoe::ProbabilityKind probability_kind` (what the balance losses read)
///  - `int num_experts() const; int hidden_size() const; int slots_per_token() const;`
///  - `void forward(ConstMatrix<S,X> x, RoutingPlan<X,S>& plan, const RouteContext<X>& ctx)`:
///    fills plan.expert / plan.weight [T, slots], plan.probs [T, E] and plan.logits [T, E]
///    (logits may be empty when the router has none); may save state for backward.
///  - `void backward(ConstMatrix<S,X> x, const RoutingPlan<X,S>& plan,
///    ConstMatrix<R,X> grad_weight, Matrix<R,X> grad_logits, Matrix<S,X> grad_x)`:
///    grad_logits arrives holding the balance losses' gradient; the router adds the
///    gradient of its weights, then accumulates into its parameters' gradients and grad_x.
///  - `void collect_parameters(ParameterList<X,S>& list) const` (may add nothing).
/// Optional (detected): `void fingerprint(kmoe::Fingerprint& f) const`, the router's own
/// settings that every rank must share (kmoe/fingerprint.hpp), reported as "router.<name>"
/// when they differ.
/// `kmoe::check_valid_router<R>()` asserts each rule with its own message.

#include <kmoe/detail/detect.hpp>
#include <kmoe/parameters.hpp>
#include <kmoe/routing_plan.hpp>

#include <cstdint>
#include <vector>

namespace kmoe {
namespace detail {

template <class R>
using router_num_experts = decltype(int(std::declval<const R&>().num_experts()));
template <class R>
using router_hidden_size = decltype(int(std::declval<const R&>().hidden_size()));
template <class R>
using router_slots = decltype(int(std::declval<const R&>().slots_per_token()));
template <class R>
using router_probability_kind =
    std::enable_if_t<std::is_same_v<std::decay_t<decltype(R::probability_kind)>, ProbabilityKind>>;
template <class R, class X, class S>
using router_forward = decltype(std::declval<R&>().forward(std::declval<const ConstMatrix<S, X>&>(),
                                                           std::declval<RoutingPlan<X, S>&>(),
                                                           std::declval<const RouteContext<X>&>()));
template <class R, class X, class S>
using router_backward = decltype(std::declval<R&>().backward(
    std::declval<const ConstMatrix<S, X>&>(), std::declval<const RoutingPlan<X, S>&>(),
    std::declval<const ConstMatrix<routing_t<S>, X>&>(),
    std::declval<const Matrix<routing_t<S>, X>&>(), std::declval<const Matrix<S, X>&>()));
template <class R, class X, class S>
using router_parameters =
    decltype(std::declval<const R&>().collect_parameters(std::declval<ParameterList<X, S>&>()));
/// Routers with a selection bias (aux-loss-free balancing, MoELayer::apply_bias_update).
template <class R>
using has_update_bias =
    decltype(std::declval<R&>().update_bias(std::declval<const std::vector<std::int64_t>&>(), 0.0));

}  // namespace detail

/// \brief Compile-time check that R is a Router; each missing piece gets its own message.
template <class R>
constexpr bool check_valid_router() {
  using X = typename detail::space_or_fallback<R>::type;
  using S = typename detail::scalar_or_fallback<R>::type;
  static_assert(detail::is_detected_v<detail::execution_space_of, R>,
                "kmoe Router: missing member type 'execution_space'");
  static_assert(Kokkos::is_execution_space<typename detail::space_or_fallback<R>::type>::value,
                "kmoe Router: 'execution_space' must be a Kokkos execution space");
  static_assert(detail::is_detected_v<detail::scalar_type_of, R>,
                "kmoe Router: missing member type 'scalar_type'");
  static_assert(
      !detail::is_detected_v<detail::scalar_type_of, R> ||
          is_supported_scalar_v<detail::detected_or_t<float, detail::scalar_type_of, R>>,
      "kmoe Router: 'scalar_type' must be float, double, kmoe::bfloat16 or kmoe::float16");
  static_assert(detail::is_detected_v<detail::router_probability_kind, R>,
                "kmoe Router: missing 'static constexpr kmoe::ProbabilityKind probability_kind'");
  static_assert(detail::is_detected_v<detail::router_num_experts, R>,
                "kmoe Router: missing 'int num_experts() const'");
  static_assert(detail::is_detected_v<detail::router_hidden_size, R>,
                "kmoe Router: missing 'int hidden_size() const'");
  static_assert(detail::is_detected_v<detail::router_slots, R>,
                "kmoe Router: missing 'int slots_per_token() const'");
  static_assert(detail::is_detected_v<detail::router_forward, R, X, S>,
                "kmoe Router: missing 'void forward(ConstMatrix<S,X> x, RoutingPlan<X,S>& plan, "
                "const RouteContext<X>& context)'");
  static_assert(detail::is_detected_v<detail::router_backward, R, X, S>,
                "kmoe Router: missing 'void backward(ConstMatrix<S,X> x, const RoutingPlan<X,S>& "
                "plan, ConstMatrix<routing_t<S>,X> grad_weight, Matrix<routing_t<S>,X> "
                "grad_logits, Matrix<S,X> grad_x)'");
  static_assert(detail::is_detected_v<detail::router_parameters, R, X, S>,
                "kmoe Router: missing 'void collect_parameters(ParameterList<X,S>& list) const'");
  return true;
}

}  // namespace kmoe
