// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file topk_softmax.hpp
/// \brief Top-k-then-softmax routing (Megatron-Core default, FastMoE NaiveGate): the k
/// largest logits are chosen and their weights are the softmax over those k logits only;
/// optionally with a learned logit bias (GPT-OSS).

#include <kmoe/detail/topk.hpp>
#include <kmoe/router.hpp>
#include <kmoe/routers/gated_router.hpp>
#include <kmoe/routers/row_ops.hpp>
#include <kmoe/routers/validation.hpp>
#include <kmoe/routing_plan.hpp>

namespace kmoe {

struct TopKSoftmaxConfig {
  int hidden = 0;
  int experts = 0;
  int top_k = 1;
  /// Router temperature tau: the logits are l / tau; 1 leaves them untouched.
  double temperature = 1.0;
  /// A learned logit bias b [E], l = x W^T + b (GPT-OSS's router.bias), read and trained
  /// as `router.bias`.
  bool bias = false;
};

/// \brief Top-k-then-softmax router with a learned gate weight [E, H].
template <class ExecSpace, class ScalarOrPrecision, class Gemm = DefaultGemm>
class TopKSoftmaxRouter : public GatedRouter<ExecSpace, storage_t<ScalarOrPrecision>, Gemm> {
  using Scalar = storage_t<ScalarOrPrecision>;
  using Base = GatedRouter<ExecSpace, Scalar, Gemm>;

 public:
  using precision_type = precision_of_t<ScalarOrPrecision>;
  using route_type = routing_t<Scalar>;
  static constexpr ProbabilityKind probability_kind = ProbabilityKind::softmax;

  explicit TopKSoftmaxRouter(const TopKSoftmaxConfig& config)
      : Base("kmoe::TopKSoftmaxRouter", config.hidden, config.experts, config.top_k, config.bias),
        config_(validated(config)) {}

  const TopKSoftmaxConfig& config() const { return config_; }

  void forward(const ConstMatrix<Scalar, ExecSpace>& x, RoutingPlan<ExecSpace, Scalar>& plan,
               const RouteContext<ExecSpace>&) {
    const int tokens = int(x.extent(0)), experts = config_.experts, k = config_.top_k;
    this->gate_forward(x, plan);
    if (config_.temperature != 1.0)
      detail::scale_logits<ExecSpace>("kmoe::TopKSoftmaxRouter::temperature", plan.logits,
                                      1.0 / config_.temperature);
    const auto logits = plan.logits;
    const auto probs = plan.probs;
    const auto expert = plan.expert;
    const auto weight = plan.weight;
    Kokkos::parallel_for(
        "kmoe::TopKSoftmaxRouter::forward", Kokkos::RangePolicy<ExecSpace>(0, tokens),
        KOKKOS_LAMBDA(int t) {
          detail::softmax_row(t, experts, logits, probs);
          auto row = [&](int j) -> int& { return expert(t, j); };
          detail::select_top_k(
              0, experts, k, [&](int e) { return logits(t, e); }, [](int) { return true; }, row);
          detail::softmax_over_chosen(
              t, k, [&](int j) { return logits(t, expert(t, j)); }, weight);
        });
  }

  void backward(const ConstMatrix<Scalar, ExecSpace>& x, const RoutingPlan<ExecSpace, Scalar>& plan,
                const ConstMatrix<route_type, ExecSpace>& grad_weight,
                const Matrix<route_type, ExecSpace>& grad_logits,
                const Matrix<Scalar, ExecSpace>& grad_x) const {
    const int tokens = int(x.extent(0)), k = config_.top_k;
    const auto expert = plan.expert;
    const auto weight = plan.weight;
    Kokkos::parallel_for(
        "kmoe::TopKSoftmaxRouter::backward", Kokkos::RangePolicy<ExecSpace>(0, tokens),
        KOKKOS_LAMBDA(int t) {
          for (int j = 0; j < k; ++j)
            grad_logits(t, expert(t, j)) +=
                detail::softmax_over_chosen_backward(t, j, k, weight, grad_weight);
        });
    if (config_.temperature != 1.0)
      detail::scale_logits<ExecSpace>("kmoe::TopKSoftmaxRouter::temperature_backward", grad_logits,
                                      1.0 / config_.temperature);
    this->gate_backward(x, grad_logits, grad_x);
  }

  /// The settings every rank must share (MoELayer's configuration check).
  void fingerprint(Fingerprint& f) const {
    f.real("temperature", config_.temperature);
    f.flag("bias", config_.bias);
  }

 private:
  static TopKSoftmaxConfig validated(const TopKSoftmaxConfig& c) {
    constexpr const char* where = "kmoe::TopKSoftmaxRouter";
    detail::validate_router_shape(where, c.hidden, c.experts);
    detail::validate_top_k(where, c.experts, c.top_k, GroupLimit{});
    detail::validate_temperature(where, c.temperature);
    return c;
  }

  TopKSoftmaxConfig config_;
};

// The shipped policy meets its role (kmoe/router.hpp) wherever it is included.
static_assert(check_valid_router<TopKSoftmaxRouter<Kokkos::DefaultHostExecutionSpace, float>>());

}  // namespace kmoe
