// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file softmax_topk.hpp
/// \brief Softmax-then-top-k routing (Mixtral, Qwen-MoE, Switch, DeepSpeed, Tutel,
/// MegaBlocks): p = softmax(l), choose the k largest p, weight p_e (optionally
/// renormalised over the chosen), optionally group-limited and scaled; optionally chosen by
/// p + b with a per-expert selection bias b and renormalised by a clamped sum (ERNIE-4.5).

#include <kmoe/detail/topk.hpp>
#include <kmoe/router.hpp>
#include <kmoe/routers/gated_router.hpp>
#include <kmoe/routers/node_limit.hpp>
#include <kmoe/routers/row_ops.hpp>
#include <kmoe/routers/validation.hpp>
#include <kmoe/routing_plan.hpp>

#include <cmath>

namespace kmoe {

struct SoftmaxTopKConfig {
  int hidden = 0;
  int experts = 0;
  int top_k = 1;
  /// Divide the chosen weights by their sum (Mixtral, Qwen3 norm_topk_prob).
  bool normalize = false;
  /// Multiplies every weight (DeepSeek-V2 routed_scaling_factor); 1 leaves them as is.
  double scaling_factor = 1.0;
  GroupLimit group = {};
  /// At most max_nodes nodes per token (routers/node_limit.hpp); off by default.
  NodeLimit node_limit = {};
  /// Router temperature tau: p = softmax(l / tau); 1 leaves the logits untouched.
  double temperature = 1.0;
  /// Choose the top-k of p + b, with a per-expert bias b [E] that gradients never touch
  /// (ERNIE-4.5's moe_statics.e_score_correction_bias); the weights stay p. b starts at 0
  /// and is set through bias(); false: no bias, bias() is empty.
  bool selection_bias = false;
  /// With normalize, divide by max(sum of the chosen p, norm_min) (ERNIE-4.5's
  /// moe_norm_min), so that a tiny sum does not blow the weights up; 0 divides by the sum.
  double norm_min = 0.0;
};

/// \brief Softmax-then-top-k router with a learned gate weight [E, H].
template <class ExecSpace, class ScalarOrPrecision, class Gemm = DefaultGemm>
class SoftmaxTopKRouter : public GatedRouter<ExecSpace, storage_t<ScalarOrPrecision>, Gemm> {
  using Scalar = storage_t<ScalarOrPrecision>;
  using Base = GatedRouter<ExecSpace, Scalar, Gemm>;

 public:
  using precision_type = precision_of_t<ScalarOrPrecision>;
  using route_type = routing_t<Scalar>;
  static constexpr ProbabilityKind probability_kind = ProbabilityKind::softmax;

  explicit SoftmaxTopKRouter(const SoftmaxTopKConfig& config)
      : Base("kmoe::SoftmaxTopKRouter", config.hidden, config.experts, config.top_k),
        config_(validated(config)),
        nodes_{config.node_limit, 0, 1, {}},
        bias_("router.selection_bias", config.selection_bias ? config.experts : 0) {}

  const SoftmaxTopKConfig& config() const { return config_; }
  /// Selection bias b [E] (empty without config().selection_bias); set it directly.
  const Vector<route_type, ExecSpace>& bias() const { return bias_; }

  void forward(const ConstMatrix<Scalar, ExecSpace>& x, RoutingPlan<ExecSpace, Scalar>& plan,
               const RouteContext<ExecSpace>&) {
    const int tokens = int(x.extent(0)), experts = config_.experts, k = config_.top_k;
    this->gate_forward(x, plan);
    if (config_.temperature != 1.0)
      detail::scale_logits<ExecSpace>("kmoe::SoftmaxTopKRouter::temperature", plan.logits,
                                      1.0 / config_.temperature);
    const auto logits = plan.logits;
    const auto probs = plan.probs;
    const auto expert = plan.expert;
    const auto weight = plan.weight;
    const auto bias = bias_;
    const bool biased = config_.selection_bias;
    const GroupLimit group = config_.group;
    nodes_.require_set("kmoe::SoftmaxTopKRouter::forward");
    const auto nodes = nodes_;
    const bool normalize = config_.normalize;
    const route_type scale = route_type(config_.scaling_factor);
    const route_type norm_min = route_type(config_.norm_min);
    Kokkos::parallel_for(
        "kmoe::SoftmaxTopKRouter::forward", Kokkos::RangePolicy<ExecSpace>(0, tokens),
        KOKKOS_LAMBDA(int t) {
          detail::softmax_row(t, experts, logits, probs);
          const auto score = [&](int e) { return biased ? probs(t, e) + bias(e) : probs(t, e); };
          const std::uint64_t groups =
              group.enabled() ? detail::select_groups(experts, group.n_group, group.topk_group,
                                                      group.score_terms, score)
                              : ~std::uint64_t(0);
          const std::uint64_t node_mask = nodes.eligible(experts, score);
          const int group_size = experts / group.n_group;
          const auto eligible = [&](int e) {
            return ((groups >> (e / group_size)) & 1) != 0 && nodes.allows(node_mask, e);
          };
          auto row = [&](int j) -> int& { return expert(t, j); };
          detail::select_top_k(0, experts, k, score, eligible, row);
          route_type z = 0;
          for (int j = 0; j < k; ++j) z += probs(t, expert(t, j));
          if (z < norm_min) z = norm_min;
          for (int j = 0; j < k; ++j)
            weight(t, j) =
                scale * (normalize ? probs(t, expert(t, j)) / z : probs(t, expert(t, j)));
        });
  }

  void backward(const ConstMatrix<Scalar, ExecSpace>& x, const RoutingPlan<ExecSpace, Scalar>& plan,
                const ConstMatrix<route_type, ExecSpace>& grad_weight,
                const Matrix<route_type, ExecSpace>& grad_logits,
                const Matrix<Scalar, ExecSpace>& grad_x) const {
    const int tokens = int(x.extent(0)), experts = config_.experts, k = config_.top_k;
    const auto probs = plan.probs;
    const auto expert = plan.expert;
    const bool normalize = config_.normalize;
    const route_type scale = route_type(config_.scaling_factor);
    const route_type norm_min = route_type(config_.norm_min);
    Kokkos::parallel_for(
        "kmoe::SoftmaxTopKRouter::backward", Kokkos::RangePolicy<ExecSpace>(0, tokens),
        KOKKOS_LAMBDA(int t) {
          const auto chosen = [&](int j) { return probs(t, expert(t, j)); };
          const auto grad_w = [&](int j) { return grad_weight(t, j); };
          // Below norm_min the divisor is the constant norm_min: no gradient through the sum.
          route_type z = 0;
          for (int j = 0; j < k; ++j) z += chosen(j);
          const bool clamped = normalize && z < norm_min;
          const auto grad_p = [&](int j) {
            return clamped ? scale * grad_w(j) / norm_min
                           : detail::normalized_weight_backward(j, k, normalize, scale,
                                                                route_type(0), chosen, grad_w);
          };
          detail::softmax_backward_sparse(t, experts, k, probs, expert, grad_p, grad_logits);
        });
    if (config_.temperature != 1.0)
      detail::scale_logits<ExecSpace>("kmoe::SoftmaxTopKRouter::temperature_backward", grad_logits,
                                      1.0 / config_.temperature);
    this->gate_backward(x, grad_logits, grad_x);
  }

  /// Whether a token's experts are limited to config().node_limit.max_nodes nodes.
  bool node_limited() const { return config_.node_limit.enabled(); }
  /// The node (in [0, nodes)) of each expert, for the node limit: the MoELayer sets it from
  /// its node map and placement. kmoe::invalid_argument naming both when max_nodes > nodes.
  void set_expert_nodes(const std::vector<int>& node_of_expert, int nodes) {
    constexpr const char* where = "kmoe::SoftmaxTopKRouter::set_expert_nodes";
    require(int(node_of_expert.size()) == config_.experts, where, "node_of_expert.size()",
            node_of_expert.size(), "must equal the experts " + std::to_string(config_.experts));
    nodes_.set(where, node_of_expert, nodes, config_.top_k);
  }

  /// The settings every rank must share (MoELayer's configuration check).
  void fingerprint(Fingerprint& f) const {
    config_.group.fingerprint(f);
    config_.node_limit.fingerprint(f);
    f.flag("normalize", config_.normalize);
    f.real("scaling_factor", config_.scaling_factor);
    f.real("temperature", config_.temperature);
    // Only when set, so that the fingerprints of routers without them stay as they were.
    if (config_.selection_bias) f.flag("selection_bias", true);
    if (config_.norm_min != 0) f.real("norm_min", config_.norm_min);
  }

 private:
  static SoftmaxTopKConfig validated(const SoftmaxTopKConfig& c) {
    constexpr const char* where = "kmoe::SoftmaxTopKRouter";
    detail::validate_router_shape(where, c.hidden, c.experts);
    detail::validate_top_k(where, c.experts, c.top_k, c.group);
    detail::ExpertNodes<ExecSpace>::validate(where, c.node_limit, c.group.enabled());
    detail::validate_temperature(where, c.temperature);
    require(std::isfinite(c.norm_min) && c.norm_min >= 0, where, "norm_min", c.norm_min,
            "must be finite and >= 0");
    return c;
  }

  SoftmaxTopKConfig config_;
  detail::ExpertNodes<ExecSpace> nodes_;
  Vector<route_type, ExecSpace> bias_;
};

// The shipped policy meets its role (kmoe/router.hpp) wherever it is included.
static_assert(check_valid_router<SoftmaxTopKRouter<Kokkos::DefaultHostExecutionSpace, float>>());

}  // namespace kmoe
