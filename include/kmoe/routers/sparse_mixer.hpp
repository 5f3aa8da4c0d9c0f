// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file sparse_mixer.hpp
/// \brief SparseMixer routing (Phi-3.5-MoE; transformers' `sparsemixer`) on its
/// deterministic inference path: two slots per token, slot 1 won by the largest logit's
/// expert, slot 2 by the largest of the others; each slot's weight is the softmax, at its
/// winner, over the experts whose logits lie within a relative distance 2 eps of the
/// winner's: a slot won with logit m keeps expert e unless (m - l_e) / max(|l_e|, m) > 2 eps
/// (slot 2 never keeps slot 1's expert).
///
/// SparseMixer's training path (each slot's expert sampled with Gumbel noise, and the
/// paper's Heun third-order gradient estimator) is not reproduced: it is random by design
/// and its backward is an estimator, not the derivative of the forward. This router routes
/// the same way in training as in inference, and its backward is the exact derivative of
/// that forward, the gradient transformers computes for a model in eval mode: a slot's
/// weight passes gradient to the logits its softmax kept, and the masks are constants (as
/// transformers computes them under no_grad).

#include <kmoe/detail/topk.hpp>
#include <kmoe/error.hpp>
#include <kmoe/router.hpp>
#include <kmoe/routers/gated_router.hpp>
#include <kmoe/routers/row_ops.hpp>
#include <kmoe/routers/validation.hpp>
#include <kmoe/routing_plan.hpp>

#include <cmath>

namespace kmoe {

namespace detail {

/// Whether a sparsemixer slot won with logit `best` keeps an expert with logit `logit`:
/// not (best - logit) / max(|logit|, best) > threshold (= 2 eps), evaluated as transformers
/// does, so that the same float rounding decides; 0 / 0 (best = logit = 0) keeps it, since
/// NaN > threshold is false there as here.
template <class Real>
KOKKOS_INLINE_FUNCTION bool sparse_mixer_keeps(Real best, Real logit, Real threshold) {
  const Real magnitude = logit < 0 ? -logit : logit;
  const Real factor = magnitude < best ? best : magnitude;
  return !((best - logit) / factor > threshold);
}

/// The softmax normaliser of a sparsemixer slot won by `winner`: the sum of
/// exp(l_e - l_winner) over the experts it keeps, `excluded` (slot 1's expert when this is
/// slot 2, else -1) left out. The winner always counts (its ratio is 0 <= threshold), so
/// the slot's weight is the reciprocal and expert e's probability exp(l_e - l_winner)
/// times that weight.
template <class Logits, class Real>
KOKKOS_INLINE_FUNCTION Real sparse_mixer_normaliser(int t, int experts, const Logits& logits,
                                                    int winner, int excluded, Real threshold) {
  const Real best = logits(t, winner);
  Real sum = 0;
  for (int e = 0; e < experts; ++e)
    if (e != excluded && sparse_mixer_keeps(best, Real(logits(t, e)), threshold))
      sum += exp(Real(logits(t, e) - best));
  return sum;
}

/// Adds to grad_logits(t, :) the derivative of a slot's weight w = p_winner (the softmax over
/// the kept experts) times dLoss/dw: w (delta(e, winner) - p_e) on every kept expert e.
template <class Logits, class Real, class GradLogits>
KOKKOS_INLINE_FUNCTION void sparse_mixer_slot_backward(int t, int experts, const Logits& logits,
                                                       int winner, int excluded, Real threshold,
                                                       Real weight, Real grad_weight,
                                                       const GradLogits& grad_logits) {
  const Real best = logits(t, winner);
  const Real scaled = grad_weight * weight;
  for (int e = 0; e < experts; ++e)
    if (e != excluded && sparse_mixer_keeps(best, Real(logits(t, e)), threshold))
      grad_logits(t, e) -= scaled * exp(Real(logits(t, e) - best)) * weight;
  grad_logits(t, winner) += scaled;
}

}  // namespace detail

struct SparseMixerConfig {
  int hidden = 0;
  int experts = 0;
  /// eps (transformers' router_jitter_noise, 0.01 in Phi-3.5-MoE): a slot keeps the experts
  /// whose logits lie within a relative distance 2 eps of its winner's; 0 keeps only ties.
  double jitter_eps = 0.01;
};

/// \brief SparseMixer router (always two slots) with a learned gate weight [E, H].
template <class ExecSpace, class ScalarOrPrecision, class Gemm = DefaultGemm>
class SparseMixerRouter : public GatedRouter<ExecSpace, storage_t<ScalarOrPrecision>, Gemm> {
  using Scalar = storage_t<ScalarOrPrecision>;
  using Base = GatedRouter<ExecSpace, Scalar, Gemm>;

 public:
  using precision_type = precision_of_t<ScalarOrPrecision>;
  using route_type = routing_t<Scalar>;
  /// plan.probs is the softmax over all experts, which the balance losses read (as
  /// transformers' load_balancing_loss_func does from Phi-MoE's router logits).
  static constexpr ProbabilityKind probability_kind = ProbabilityKind::softmax;
  /// SparseMixer routes every token to two experts.
  static constexpr int slots = 2;

  explicit SparseMixerRouter(const SparseMixerConfig& config)
      : Base("kmoe::SparseMixerRouter", config.hidden, config.experts, slots),
        config_(validated(config)) {}

  const SparseMixerConfig& config() const { return config_; }

  /// The same in training as in inference (see the file comment).
  void forward(const ConstMatrix<Scalar, ExecSpace>& x, RoutingPlan<ExecSpace, Scalar>& plan,
               const RouteContext<ExecSpace>&) {
    const int tokens = int(x.extent(0)), experts = config_.experts;
    this->gate_forward(x, plan);
    const auto logits = plan.logits;
    const auto probs = plan.probs;
    const auto expert = plan.expert;
    const auto weight = plan.weight;
    const route_type threshold = threshold_value();
    Kokkos::parallel_for(
        "kmoe::SparseMixerRouter::forward", Kokkos::RangePolicy<ExecSpace>(0, tokens),
        KOKKOS_LAMBDA(int t) {
          detail::softmax_row(t, experts, logits, probs);
          // Slot 1's winner, then slot 2's among the others: the top-2 of the logits.
          auto row = [&](int j) -> int& { return expert(t, j); };
          detail::select_top_k(
              0, experts, slots, [&](int e) { return logits(t, e); }, [](int) { return true; },
              row);
          for (int j = 0; j < slots; ++j)
            weight(t, j) = route_type(1) /
                           detail::sparse_mixer_normaliser(t, experts, logits, expert(t, j),
                                                           j == 0 ? -1 : expert(t, 0), threshold);
        });
  }

  void backward(const ConstMatrix<Scalar, ExecSpace>& x, const RoutingPlan<ExecSpace, Scalar>& plan,
                const ConstMatrix<route_type, ExecSpace>& grad_weight,
                const Matrix<route_type, ExecSpace>& grad_logits,
                const Matrix<Scalar, ExecSpace>& grad_x) const {
    const int tokens = int(x.extent(0)), experts = config_.experts;
    const auto logits = plan.logits;
    const auto expert = plan.expert;
    const auto weight = plan.weight;
    const route_type threshold = threshold_value();
    Kokkos::parallel_for(
        "kmoe::SparseMixerRouter::backward", Kokkos::RangePolicy<ExecSpace>(0, tokens),
        KOKKOS_LAMBDA(int t) {
          for (int j = 0; j < slots; ++j)
            detail::sparse_mixer_slot_backward(t, experts, logits, expert(t, j),
                                               j == 0 ? -1 : expert(t, 0), threshold, weight(t, j),
                                               grad_weight(t, j), grad_logits);
        });
    this->gate_backward(x, grad_logits, grad_x);
  }

  /// The settings every rank must share (MoELayer's configuration check).
  void fingerprint(Fingerprint& f) const { f.real("jitter_eps", config_.jitter_eps); }

  /// 2 eps in the routing type, rounded from double once, as transformers compares a float32
  /// ratio with the Python float 2 * eps.
  route_type threshold_value() const { return route_type(2 * config_.jitter_eps); }

 private:
  static SparseMixerConfig validated(const SparseMixerConfig& c) {
    constexpr const char* where = "kmoe::SparseMixerRouter";
    detail::validate_router_shape(where, c.hidden, c.experts);
    require(c.experts >= slots, where, "experts", c.experts,
            "must be at least 2: sparsemixer routes every token to two experts");
    require(std::isfinite(c.jitter_eps) && c.jitter_eps >= 0, where, "jitter_eps", c.jitter_eps,
            "must be finite and >= 0 (a negative one masks the winner itself)");
    return c;
  }

  SparseMixerConfig config_;
};

// The shipped policy meets its role (kmoe/router.hpp) wherever it is included.
static_assert(check_valid_router<SparseMixerRouter<Kokkos::DefaultHostExecutionSpace, float>>());

}  // namespace kmoe
