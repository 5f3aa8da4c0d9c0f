// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file expert_choice.hpp
/// \brief Expert-choice routing (Zhou et al. 2022): p = softmax(l) over experts per token,
/// then each expert takes its C = ceil(T * capacity_factor / E) tokens with the largest
/// p[:, e] (ties toward the lower token), weight p[t, e]. A token may get 0..E experts, so
/// the plan has E slots per token, slot e meaning expert e.

#include <kmoe/detail/select_top_count.hpp>
#include <kmoe/router.hpp>
#include <kmoe/routers/linear_gate.hpp>
#include <kmoe/routers/row_ops.hpp>
#include <kmoe/routers/validation.hpp>
#include <kmoe/routing_plan.hpp>

#include <cmath>

namespace kmoe {

struct ExpertChoiceConfig {
  int hidden = 0;
  int experts = 0;
  /// C = ceil(T * capacity_factor / E) tokens per expert, at most T.
  double capacity_factor = 1.0;
};

/// \brief Expert-choice router with a learned gate weight [E, H].
template <class ExecSpace, class ScalarOrPrecision, class Gemm = DefaultGemm>
class ExpertChoiceRouter {
  using Scalar = storage_t<ScalarOrPrecision>;

 public:
  using execution_space = ExecSpace;
  using scalar_type = Scalar;
  using precision_type = precision_of_t<ScalarOrPrecision>;
  using route_type = routing_t<Scalar>;
  static constexpr ProbabilityKind probability_kind = ProbabilityKind::softmax;

  explicit ExpertChoiceRouter(const ExpertChoiceConfig& config)
      : config_(validated(config)), gate_("router", config.hidden, config.experts) {}

  int num_experts() const { return config_.experts; }
  int hidden_size() const { return config_.hidden; }
  int slots_per_token() const { return config_.experts; }
  const LinearGate<ExecSpace, Scalar, Gemm>& gate() const { return gate_; }

  /// Tokens each expert takes from a batch of `tokens`.
  int tokens_per_expert(int tokens) const {
    const double c = std::ceil(double(tokens) * config_.capacity_factor / config_.experts);
    return int(std::min<double>(c, tokens));
  }

  void forward(const ConstMatrix<Scalar, ExecSpace>& x, RoutingPlan<ExecSpace, Scalar>& plan,
               const RouteContext<ExecSpace>&) {
    const int tokens = int(x.extent(0)), experts = config_.experts;
    plan.resize(tokens, experts, experts, true);
    gate_.forward(x, plan.logits);
    const auto logits = plan.logits;
    const auto probs = plan.probs;
    const auto expert = plan.expert;
    const auto weight = plan.weight;
    Kokkos::parallel_for(
        "kmoe::ExpertChoiceRouter::softmax", Kokkos::RangePolicy<ExecSpace>(0, tokens),
        KOKKOS_LAMBDA(int t) {
          detail::softmax_row(t, experts, logits, probs);
          for (int e = 0; e < experts; ++e) {
            expert(t, e) = -1;
            weight(t, e) = 0;
          }
        });
    const int capacity = tokens_per_expert(tokens);
    Kokkos::parallel_for(
        "kmoe::ExpertChoiceRouter::choose", Kokkos::RangePolicy<ExecSpace>(0, experts),
        KOKKOS_LAMBDA(int e) {
          detail::select_top_count<route_type>(
              tokens, capacity, [&](int t) { return probs(t, e); },
              [&](int t) {
                expert(t, e) = e;
                weight(t, e) = probs(t, e);
              });
        });
  }

  void backward(const ConstMatrix<Scalar, ExecSpace>& x, const RoutingPlan<ExecSpace, Scalar>& plan,
                const ConstMatrix<route_type, ExecSpace>& grad_weight,
                const Matrix<route_type, ExecSpace>& grad_logits,
                const Matrix<Scalar, ExecSpace>& grad_x) const {
    const int tokens = int(x.extent(0)), experts = config_.experts;
    const auto probs = plan.probs;
    const auto expert = plan.expert;
    Kokkos::parallel_for(
        "kmoe::ExpertChoiceRouter::backward", Kokkos::RangePolicy<ExecSpace>(0, tokens),
        KOKKOS_LAMBDA(int t) {
          const auto grad_p = [&](int j) { return grad_weight(t, j); };
          detail::softmax_backward_sparse(t, experts, experts, probs, expert, grad_p, grad_logits);
        });
    gate_.backward(x, grad_logits, grad_x);
  }

  /// The settings every rank must share (MoELayer's configuration check).
  void fingerprint(Fingerprint& f) const { f.real("capacity_factor", config_.capacity_factor); }

  void collect_parameters(ParameterList<ExecSpace, Scalar>& list) const {
    gate_.collect_parameters(list);
  }

 private:
  static ExpertChoiceConfig validated(const ExpertChoiceConfig& c) {
    constexpr const char* where = "kmoe::ExpertChoiceRouter";
    detail::validate_router_shape(where, c.hidden, c.experts);
    require(c.capacity_factor > 0 && std::isfinite(c.capacity_factor), where, "capacity_factor",
            c.capacity_factor, "must be positive and finite");
    return c;
  }

  ExpertChoiceConfig config_;
  LinearGate<ExecSpace, Scalar, Gemm> gate_;
};

// The shipped policy meets its role (kmoe/router.hpp) wherever it is included.
static_assert(check_valid_router<ExpertChoiceRouter<Kokkos::DefaultHostExecutionSpace, float>>());

}  // namespace kmoe
