// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file noisy_topk.hpp
/// \brief Noisy top-k gating (Shazeer et al. 2017): during training the experts are chosen
/// by top-k of H = l + eps * softplus(x W_noise^T), eps ~ N(0, 1), and weighted by the
/// softmax over the chosen H; at inference H = l. The noise is a fixed function of
/// (seed, step, global token index, expert), so it is the same on every backend and rank.

#include <kmoe/router.hpp>
#include <kmoe/routers/linear_gate.hpp>
#include <kmoe/routers/row_ops.hpp>
#include <kmoe/routers/validation.hpp>
#include <kmoe/routing_plan.hpp>

namespace kmoe {

struct NoisyTopKConfig {
  int hidden = 0;
  int experts = 0;
  int top_k = 1;
  std::uint64_t seed = 0;
  /// Router temperature tau: the clean logits are l / tau (the noise is added after);
  /// 1 leaves them untouched.
  double temperature = 1.0;
};

/// \brief Noisy top-k router with learned gate [E, H] and noise gate [E, H].
template <class ExecSpace, class ScalarOrPrecision, class Gemm = DefaultGemm>
class NoisyTopKRouter {
  using Scalar = storage_t<ScalarOrPrecision>;

 public:
  using execution_space = ExecSpace;
  using scalar_type = Scalar;
  using precision_type = precision_of_t<ScalarOrPrecision>;
  using route_type = routing_t<Scalar>;
  static constexpr ProbabilityKind probability_kind = ProbabilityKind::softmax;

  explicit NoisyTopKRouter(const NoisyTopKConfig& config)
      : config_(validated(config)),
        gate_("router", config.hidden, config.experts),
        noise_gate_("router.noise", config.hidden, config.experts) {}

  int num_experts() const { return config_.experts; }
  int hidden_size() const { return config_.hidden; }
  int slots_per_token() const { return config_.top_k; }
  const LinearGate<ExecSpace, Scalar, Gemm>& gate() const { return gate_; }
  const LinearGate<ExecSpace, Scalar, Gemm>& noise_gate() const { return noise_gate_; }

  /// The standard normal sample added (times the learned scale) to logit (token, expert).
  KOKKOS_INLINE_FUNCTION static route_type noise(std::uint64_t seed, std::uint64_t step,
                                                 std::int64_t token, int expert) {
    return detail::counter_normal<route_type>(seed, step, std::uint64_t(token),
                                              std::uint64_t(expert));
  }

  void forward(const ConstMatrix<Scalar, ExecSpace>& x, RoutingPlan<ExecSpace, Scalar>& plan,
               const RouteContext<ExecSpace>& context) {
    const int tokens = int(x.extent(0)), experts = config_.experts, k = config_.top_k;
    plan.resize(tokens, experts, k, true);
    gate_.forward(x, plan.logits);
    if (config_.temperature != 1.0)
      detail::scale_logits<ExecSpace>("kmoe::NoisyTopKRouter::temperature", plan.logits,
                                      1.0 / config_.temperature);
    training_ = context.training;
    step_ = context.step;
    token_offset_ = context.token_offset;
    detail::ensure_extents(noise_logits_, "kmoe::NoisyTopKRouter::noise_logits",
                           training_ ? tokens : 0, experts);
    if (training_) noise_gate_.forward(x, noise_logits_);
    const auto logits = plan.logits;
    const auto probs = plan.probs;
    const auto expert = plan.expert;
    const auto weight = plan.weight;
    const auto noise_logits = noise_logits_;
    const bool training = training_;
    const std::uint64_t seed = config_.seed, step = step_;
    const std::int64_t offset = token_offset_;
    Kokkos::parallel_for(
        "kmoe::NoisyTopKRouter::forward", Kokkos::RangePolicy<ExecSpace>(0, tokens),
        KOKKOS_LAMBDA(int t) {
          detail::softmax_row(t, experts, logits, probs);
          const auto noisy = [&](int e) {
            return training ? logits(t, e) + noise(seed, step, offset + t, e) *
                                                 detail::softplus(noise_logits(t, e))
                            : logits(t, e);
          };
          auto row = [&](int j) -> int& { return expert(t, j); };
          detail::select_top_k(
              0, experts, k, noisy, [](int) { return true; }, row);
          detail::softmax_over_chosen(
              t, k, [&](int j) { return noisy(expert(t, j)); }, weight);
        });
  }

  void backward(const ConstMatrix<Scalar, ExecSpace>& x, const RoutingPlan<ExecSpace, Scalar>& plan,
                const ConstMatrix<route_type, ExecSpace>& grad_weight,
                const Matrix<route_type, ExecSpace>& grad_logits,
                const Matrix<Scalar, ExecSpace>& grad_x) {
    const int tokens = int(x.extent(0)), experts = config_.experts, k = config_.top_k;
    detail::ensure_extents(grad_noise_logits_, "kmoe::NoisyTopKRouter::grad_noise_logits",
                           training_ ? tokens : 0, experts);
    const auto expert = plan.expert;
    const auto weight = plan.weight;
    const auto noise_logits = noise_logits_;
    const auto grad_noise_logits = grad_noise_logits_;
    const bool training = training_;
    const std::uint64_t seed = config_.seed, step = step_;
    const std::int64_t offset = token_offset_;
    Kokkos::parallel_for(
        "kmoe::NoisyTopKRouter::backward", Kokkos::RangePolicy<ExecSpace>(0, tokens),
        KOKKOS_LAMBDA(int t) {
          if (training)
            for (int e = 0; e < experts; ++e) grad_noise_logits(t, e) = 0;
          for (int j = 0; j < k; ++j) {
            const int e = expert(t, j);
            const route_type grad_noisy =
                detail::softmax_over_chosen_backward(t, j, k, weight, grad_weight);
            grad_logits(t, e) += grad_noisy;
            if (training)
              grad_noise_logits(t, e) = grad_noisy * noise(seed, step, offset + t, e) *
                                        detail::sigmoid(noise_logits(t, e));
          }
        });
    if (config_.temperature != 1.0)
      detail::scale_logits<ExecSpace>("kmoe::NoisyTopKRouter::temperature_backward", grad_logits,
                                      1.0 / config_.temperature);
    gate_.backward(x, grad_logits, grad_x);
    if (training_) noise_gate_.backward(x, grad_noise_logits_, grad_x);
  }

  /// The settings every rank must share (MoELayer's configuration check).
  void fingerprint(Fingerprint& f) const {
    f.integer("seed", std::int64_t(config_.seed));
    f.real("temperature", config_.temperature);
  }

  void collect_parameters(ParameterList<ExecSpace, Scalar>& list) const {
    gate_.collect_parameters(list);
    noise_gate_.collect_parameters(list);
  }

 private:
  static NoisyTopKConfig validated(const NoisyTopKConfig& c) {
    constexpr const char* where = "kmoe::NoisyTopKRouter";
    detail::validate_router_shape(where, c.hidden, c.experts);
    detail::validate_top_k(where, c.experts, c.top_k, GroupLimit{});
    detail::validate_temperature(where, c.temperature);
    return c;
  }

  NoisyTopKConfig config_;
  LinearGate<ExecSpace, Scalar, Gemm> gate_;
  LinearGate<ExecSpace, Scalar, Gemm> noise_gate_;
  // Saved by forward for backward: the noise is recomputed from (seed, step, token).
  Matrix<route_type, ExecSpace> noise_logits_;
  Matrix<route_type, ExecSpace> grad_noise_logits_;
  bool training_ = false;
  std::uint64_t step_ = 0;
  std::int64_t token_offset_ = 0;
};

// The shipped policy meets its role (kmoe/router.hpp) wherever it is included.
static_assert(check_valid_router<NoisyTopKRouter<Kokkos::DefaultHostExecutionSpace, float>>());

}  // namespace kmoe
