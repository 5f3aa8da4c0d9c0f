// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file sigmoid_bias.hpp
/// \brief DeepSeek-V3 routing: s = sigmoid(l), experts chosen by top-k of s + b with a
/// per-expert bias b that gradients never touch (the aux-loss-free balance term), weights
/// s_e, optionally / (sum of chosen s + 1e-20), times routed_scaling_factor; optionally
/// group-limited (n_group / topk_group).

#include <kmoe/detail/topk.hpp>
#include <kmoe/router.hpp>
#include <kmoe/routers/gated_router.hpp>
#include <kmoe/routers/node_limit.hpp>
#include <kmoe/routers/row_ops.hpp>
#include <kmoe/routers/validation.hpp>
#include <kmoe/routing_plan.hpp>

#include <vector>

namespace kmoe {

struct SigmoidBiasConfig {
  int hidden = 0;
  int experts = 0;
  int top_k = 1;
  /// DeepSeek-V3 norm_topk_prob.
  bool normalize = true;
  /// DeepSeek-V3 routed_scaling_factor.
  double scaling_factor = 1.0;
  GroupLimit group = {};
  /// At most max_nodes nodes per token (routers/node_limit.hpp); off by default.
  NodeLimit node_limit = {};
};

/// \brief DeepSeek-V3 sigmoid router with selection bias (e_score_correction_bias).
template <class ExecSpace, class ScalarOrPrecision, class Gemm = DefaultGemm>
class SigmoidBiasRouter : public GatedRouter<ExecSpace, storage_t<ScalarOrPrecision>, Gemm> {
  using Scalar = storage_t<ScalarOrPrecision>;
  using Base = GatedRouter<ExecSpace, Scalar, Gemm>;

 public:
  using precision_type = precision_of_t<ScalarOrPrecision>;
  using route_type = routing_t<Scalar>;
  static constexpr ProbabilityKind probability_kind = ProbabilityKind::normalized_sigmoid;

  explicit SigmoidBiasRouter(const SigmoidBiasConfig& config)
      : Base("kmoe::SigmoidBiasRouter", config.hidden, config.experts, config.top_k),
        config_(validated(config)),
        nodes_{config.node_limit, 0, 1, {}},
        bias_("router.expert_bias", config.experts) {}

  const SigmoidBiasConfig& config() const { return config_; }
  /// Selection bias b [E]; set it directly or move it with update_bias().
  const Vector<route_type, ExecSpace>& bias() const { return bias_; }

  /// Aux-loss-free balance step (docs/semantics.md section 4): b_i += rate * sign(mean(c) - c_i) for
  /// the assignment counts c of the last global batch.
  void update_bias(const std::vector<std::int64_t>& counts, double rate) {
    require(counts.size() == std::size_t(config_.experts), "kmoe::SigmoidBiasRouter::update_bias",
            "counts.size()", counts.size(), "must equal the number of experts");
    auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), bias_);
    double mean = 0;
    for (auto c : counts) mean += double(c);
    mean /= double(counts.size());
    for (std::size_t e = 0; e < counts.size(); ++e) {
      const double gap = mean - double(counts[e]);
      host(e) += route_type(rate * double((gap > 0) - (gap < 0)));
    }
    Kokkos::deep_copy(bias_, host);
  }

  void forward(const ConstMatrix<Scalar, ExecSpace>& x, RoutingPlan<ExecSpace, Scalar>& plan,
               const RouteContext<ExecSpace>&) {
    const int tokens = int(x.extent(0)), experts = config_.experts, k = config_.top_k;
    this->gate_forward(x, plan);
    const auto logits = plan.logits;
    const auto probs = plan.probs;
    const auto expert = plan.expert;
    const auto weight = plan.weight;
    const auto bias = bias_;
    const GroupLimit group = config_.group;
    nodes_.require_set("kmoe::SigmoidBiasRouter::forward");
    const auto nodes = nodes_;
    const bool normalize = config_.normalize;
    const route_type scale = route_type(config_.scaling_factor);
    Kokkos::parallel_for(
        "kmoe::SigmoidBiasRouter::forward", Kokkos::RangePolicy<ExecSpace>(0, tokens),
        KOKKOS_LAMBDA(int t) {
          // probs holds s = sigmoid(l) until the weights are formed, then s / sum(s).
          route_type total = 0;
          for (int e = 0; e < experts; ++e) {
            probs(t, e) = detail::sigmoid(logits(t, e));
            total += probs(t, e);
          }
          const auto score = [&](int e) { return probs(t, e) + bias(e); };
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
          route_type z = route_type(1e-20);
          for (int j = 0; j < k; ++j) z += probs(t, expert(t, j));
          for (int j = 0; j < k; ++j)
            weight(t, j) =
                (normalize ? probs(t, expert(t, j)) / z : probs(t, expert(t, j))) * scale;
          for (int e = 0; e < experts; ++e) probs(t, e) /= total;
        });
  }

  void backward(const ConstMatrix<Scalar, ExecSpace>& x, const RoutingPlan<ExecSpace, Scalar>& plan,
                const ConstMatrix<route_type, ExecSpace>& grad_weight,
                const Matrix<route_type, ExecSpace>& grad_logits,
                const Matrix<Scalar, ExecSpace>& grad_x) const {
    const int tokens = int(x.extent(0)), k = config_.top_k;
    const auto logits = plan.logits;
    const auto expert = plan.expert;
    const bool normalize = config_.normalize;
    const route_type scale = route_type(config_.scaling_factor);
    Kokkos::parallel_for(
        "kmoe::SigmoidBiasRouter::backward", Kokkos::RangePolicy<ExecSpace>(0, tokens),
        KOKKOS_LAMBDA(int t) {
          const auto chosen = [&](int j) { return detail::sigmoid(logits(t, expert(t, j))); };
          const auto grad_w = [&](int j) { return grad_weight(t, j); };
          for (int j = 0; j < k; ++j) {
            const route_type s = chosen(j);
            grad_logits(t, expert(t, j)) +=
                detail::normalized_weight_backward(j, k, normalize, scale, route_type(1e-20),
                                                   chosen, grad_w) *
                s * (1 - s);
          }
        });
    this->gate_backward(x, grad_logits, grad_x);
  }

  /// Whether a token's experts are limited to config().node_limit.max_nodes nodes.
  bool node_limited() const { return config_.node_limit.enabled(); }
  /// The node (in [0, nodes)) of each expert, for the node limit: the MoELayer sets it from
  /// its node map and placement. kmoe::invalid_argument naming both when max_nodes > nodes.
  void set_expert_nodes(const std::vector<int>& node_of_expert, int nodes) {
    constexpr const char* where = "kmoe::SigmoidBiasRouter::set_expert_nodes";
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
  }

 private:
  static SigmoidBiasConfig validated(const SigmoidBiasConfig& c) {
    constexpr const char* where = "kmoe::SigmoidBiasRouter";
    detail::validate_router_shape(where, c.hidden, c.experts);
    detail::validate_top_k(where, c.experts, c.top_k, c.group);
    detail::ExpertNodes<ExecSpace>::validate(where, c.node_limit, c.group.enabled());
    return c;
  }

  SigmoidBiasConfig config_;
  detail::ExpertNodes<ExecSpace> nodes_;
  Vector<route_type, ExecSpace> bias_;
};

// The shipped policy meets its role (kmoe/router.hpp) wherever it is included.
static_assert(check_valid_router<SigmoidBiasRouter<Kokkos::DefaultHostExecutionSpace, float>>());

}  // namespace kmoe
