// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file losses.hpp
/// \brief Load-balance terms (docs/semantics.md section 4, docs/training.md): Switch/GShard
/// aux loss, DeepSeek-V3 sequence-wise aux loss, the ST-MoE router z-loss, the KL divergence
/// of the expert usage from uniform and the global-batch aux loss (Megatron-Core
/// global_aux_loss, Qwen's global-batch balance), with their gradients into the router
/// logits. f (the assignment fractions) is a constant for the gradient.

#include <kmoe/detail/math.hpp>
#include <kmoe/error.hpp>
#include <kmoe/routing_plan.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace kmoe {

namespace detail {
/// Per sequence q and expert e: the fraction of q's assignments routed to e and the mean of
/// e's probability over q. A free function because nvcc rejects KOKKOS_LAMBDA in a private
/// member function.
template <class ExecSpace, class Expert, class Probs, class Out>
void sequence_fraction_and_prob(const Expert& expert, const Probs& probs, int seq_len,
                                const Out& frac, const Out& prob) {
  using route_type = typename Out::non_const_value_type;
  const int slots = int(expert.extent(1));
  Kokkos::parallel_for(
      "kmoe::BalanceLoss::sequence",
      Kokkos::MDRangePolicy<ExecSpace, Kokkos::Rank<2>>({0, 0},
                                                        {int(frac.extent(0)), int(frac.extent(1))}),
      KOKKOS_LAMBDA(int q, int e) {
        int count = 0;
        route_type p = 0;
        for (int t = q * seq_len; t < (q + 1) * seq_len; ++t) {
          for (int s = 0; s < slots; ++s) count += expert(t, s) == e;
          p += probs(t, e);
        }
        frac(q, e) = route_type(count) / route_type(seq_len * slots);
        prob(q, e) = p / route_type(seq_len);
      });
}

/// sum(e) = sum over the first `tokens` rows of probs(t, e), in double.
template <class ExecSpace, class Probs, class Sum>
void sum_over_tokens(const Probs& probs, int tokens, const Sum& sum) {
  Kokkos::parallel_for(
      "kmoe::BalanceLoss::prob_sum", Kokkos::RangePolicy<ExecSpace>(0, int(sum.extent(0))),
      KOKKOS_LAMBDA(int e) {
        double total = 0;
        for (int t = 0; t < tokens; ++t) total += double(probs(t, e));
        sum(e) = total;
      });
}
}  // namespace detail

/// \brief Coefficients of the balance terms; a zero coefficient switches a term off.
struct BalanceLossConfig {
  double switch_aux = 0.0;    ///< alpha of L_aux = alpha * E * sum_i f_i P_i (typ. 1e-2)
  double sequence_aux = 0.0;  ///< alpha of the sequence-wise L_aux (typ. 1e-4)
  int sequence_length = 0;    ///< tokens per sequence for the sequence-wise term (0: all)
  double z_loss = 0.0;        ///< beta of L_z = beta * mean_t logsumexp(l_t)^2 (typ. 1e-3)
  /// gamma of L_KL = gamma * KL(P || U) = gamma * sum_i P_i log(E P_i), P_i the mean
  /// probability of expert i over the global batch (every token group's tokens).
  double kl_uniform = 0.0;
  /// alpha of the global-batch aux loss: the Switch term with f_i counted over every
  /// token group and every micro-batch of the current global batch so far.
  double global_batch_aux = 0.0;
  /// Training forwards (micro-batches of gradient accumulation) per global batch: the
  /// global-batch counts start again after this many.
  int global_batch_micro_batches = 1;
};

/// \brief Values of the balance terms for one forward pass, coefficients applied.
struct BalanceLosses {
  double switch_aux = 0.0;
  double sequence_aux = 0.0;
  double z_loss = 0.0;
  double kl_uniform = 0.0;
  double global_batch_aux = 0.0;
  /// E * sum_i f_i P_i without the coefficient: 1 under perfectly uniform routing.
  double switch_aux_unscaled = 0.0;
  double total() const {
    return switch_aux + sequence_aux + z_loss + kl_uniform + global_batch_aux;
  }
};

/// \brief Computes the balance terms of a routing plan and their logit gradients.
///
/// f_i counts the router's assignments before capacity dropping, divided by T * k (the
/// Switch/Megatron convention, equal to 1 under uniform routing; HF Mixtral's
/// load_balancing_loss_func omits the 1/k). Under data or expert parallelism f_i uses the
/// counts summed over every rank that routes distinct tokens (`global_counts`,
/// `global_tokens`), while P_i is this rank's mean, so the mean of the ranks' losses equals
/// the loss of the whole global batch. The KL term is the global batch's on every rank
/// (its P is summed over `token_groups`), and each rank's gradient is scaled so that the
/// mean of the ranks' gradients is the global one.
template <class ExecSpace, class Scalar>
class BalanceLoss {
 public:
  using route_type = routing_t<Scalar>;

  explicit BalanceLoss(const BalanceLossConfig& config = {}) : config_(validated(config)) {}
  const BalanceLossConfig& config() const { return config_; }
  /// Multiplies the gradients backward adds (fp16 loss scaling: the caller scales the
  /// gradient of its own loss by the same factor, and kmoe::DynamicLossScaler divides all).
  void set_gradient_scale(double scale) {
    require(std::isfinite(scale) && scale > 0, "kmoe::BalanceLoss::set_gradient_scale", "scale",
            scale, "must be positive and finite");
    gradient_scale_ = scale;
  }

  /// Checks what forward would reject for `tokens` local tokens, so that the layer can
  /// agree on it across ranks before the step's first collective.
  void validate_tokens(const char* where, int tokens) const {
    if (config_.sequence_aux == 0 || tokens == 0) return;
    const int seq_len = sequence_length(tokens);
    require(tokens % seq_len == 0, where, "sequence_length", seq_len,
            "must divide the number of local tokens (" + std::to_string(tokens) + ")");
  }

  /// Values for `plan` given the assignment counts per expert summed over the token group.
  /// A training forward adds this micro-batch's counts to the global-batch window; an
  /// evaluation forward reports the global-batch term as if it did, and leaves the window.
  /// `token_groups` is the communicator over the ranks that route distinct tokens; every
  /// one of them must call forward (the KL term all-reduces over it).
  template <class Communicator>
  BalanceLosses forward(const RoutingPlan<ExecSpace, Scalar>& plan, ProbabilityKind kind,
                        const std::vector<std::int64_t>& global_counts, std::int64_t global_tokens,
                        bool training, const Communicator& token_groups) {
    const int tokens = int(plan.tokens()), experts = int(global_counts.size());
    const int slots = int(plan.slots());
    BalanceLosses out;
    prepare(tokens, experts, global_counts, global_tokens, slots);
    if (config_.global_batch_aux != 0)
      prepare_global_batch(global_counts, global_tokens, slots, training);
    // Before the early return: a rank without tokens still takes part in the all-reduce.
    if (config_.kl_uniform != 0 && kind != ProbabilityKind::none)
      out.kl_uniform = config_.kl_uniform * kl_term(plan, experts, global_tokens, token_groups);
    if (tokens == 0) return out;
    if (kind != ProbabilityKind::none) {
      const auto probs = plan.probs;
      const auto mean_prob = mean_prob_;
      Kokkos::parallel_for(
          "kmoe::BalanceLoss::mean_prob", Kokkos::RangePolicy<ExecSpace>(0, experts),
          KOKKOS_LAMBDA(int e) {
            route_type sum = 0;
            for (int t = 0; t < tokens; ++t) sum += probs(t, e);
            mean_prob(e) = sum / route_type(tokens);
          });
      auto mean_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), mean_prob_);
      double sum = 0;
      for (int e = 0; e < experts; ++e) sum += fraction_host_(e) * double(mean_host(e));
      out.switch_aux_unscaled = experts * sum;
      out.switch_aux = config_.switch_aux * out.switch_aux_unscaled;
      if (config_.global_batch_aux != 0) {
        double global_sum = 0;
        for (int e = 0; e < experts; ++e)
          global_sum += global_batch_fraction_host_(e) * double(mean_host(e));
        out.global_batch_aux = config_.global_batch_aux * experts * global_sum;
      }
      if (config_.sequence_aux != 0) out.sequence_aux = config_.sequence_aux * sequence_term(plan);
    }
    if (config_.z_loss != 0 && plan.logits.extent(0) > 0) {
      const auto logits = plan.logits;
      const auto lse = lse_;
      Kokkos::parallel_for(
          "kmoe::BalanceLoss::logsumexp", Kokkos::RangePolicy<ExecSpace>(0, tokens),
          KOKKOS_LAMBDA(int t) {
            route_type m = logits(t, 0);
            for (int e = 1; e < experts; ++e) m = logits(t, e) > m ? logits(t, e) : m;
            route_type s = 0;
            for (int e = 0; e < experts; ++e) s += detail::exp(logits(t, e) - m);
            lse(t) = m + detail::log(s);
          });
      auto lse_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), lse_);
      double sum = 0;
      for (int t = 0; t < tokens; ++t) sum += double(lse_host(t)) * double(lse_host(t));
      out.z_loss = config_.z_loss * sum / tokens;
    }
    return out;
  }

  /// Overwrites grad_logits [T, E] with the gradient of the enabled terms (of the last
  /// forward) with respect to the router logits.
  void backward(const RoutingPlan<ExecSpace, Scalar>& plan, ProbabilityKind kind,
                const Matrix<route_type, ExecSpace>& grad_logits) const {
    const int tokens = int(plan.tokens()), experts = int(grad_logits.extent(1));
    Kokkos::deep_copy(grad_logits, route_type(0));
    if (tokens == 0 || kind == ProbabilityKind::none) return;
    const bool aux = config_.switch_aux != 0 || config_.sequence_aux != 0 ||
                     config_.global_batch_aux != 0 || config_.kl_uniform != 0;
    const bool z = config_.z_loss != 0 && plan.logits.extent(0) > 0;
    if (!aux && !z) return;
    const auto probs = plan.probs;
    const auto logits = plan.logits;
    const auto fraction = fraction_;
    const auto seq_fraction = sequence_fraction_;
    const route_type switch_scale =
        route_type(gradient_scale_ * config_.switch_aux * experts / tokens);
    const int seq_len = sequence_length(tokens);
    const bool use_seq = config_.sequence_aux != 0;
    const route_type seq_scale = use_seq
                                     ? route_type(gradient_scale_ * config_.sequence_aux * experts /
                                                  (double(seq_len) * (tokens / seq_len)))
                                     : route_type(0);
    const route_type z_scale = route_type(gradient_scale_ * 2 * config_.z_loss / tokens);
    const bool use_global_batch = config_.global_batch_aux != 0;
    const auto global_batch_fraction = global_batch_fraction_;
    const route_type global_batch_scale =
        route_type(gradient_scale_ * config_.global_batch_aux * experts / tokens);
    const bool use_kl = config_.kl_uniform != 0;
    const auto kl_grad = kl_grad_;
    const route_type kl_scale = route_type(gradient_scale_ * config_.kl_uniform / tokens);
    const auto lse = lse_;
    const bool sigmoid = kind == ProbabilityKind::normalized_sigmoid;
    Kokkos::parallel_for(
        "kmoe::BalanceLoss::backward", Kokkos::RangePolicy<ExecSpace>(0, tokens),
        KOKKOS_LAMBDA(int t) {
          if (aux) {
            // dL/dp(t, e), then through p = softmax(l) or p = s / sum(s), s = sigmoid(l).
            const auto grad_p = [&](int e) {
              route_type g = switch_scale * fraction(e);
              if (use_seq) g += seq_scale * seq_fraction(t / seq_len, e);
              if (use_global_batch) g += global_batch_scale * global_batch_fraction(e);
              if (use_kl) g += kl_scale * kl_grad(e);
              return g;
            };
            route_type dot = 0;
            for (int e = 0; e < experts; ++e) dot += grad_p(e) * probs(t, e);
            if (!sigmoid) {
              for (int e = 0; e < experts; ++e) grad_logits(t, e) = probs(t, e) * (grad_p(e) - dot);
            } else {
              route_type total = 0;
              for (int e = 0; e < experts; ++e) total += detail::sigmoid(logits(t, e));
              for (int e = 0; e < experts; ++e) {
                const route_type s = detail::sigmoid(logits(t, e));
                grad_logits(t, e) = (grad_p(e) - dot) / total * s * (1 - s);
              }
            }
          }
          if (z) {
            for (int e = 0; e < experts; ++e)
              grad_logits(t, e) += z_scale * lse(t) * detail::exp(logits(t, e) - lse(t));
          }
        });
  }

 private:
  static BalanceLossConfig validated(const BalanceLossConfig& c) {
    constexpr const char* where = "kmoe::BalanceLoss";
    require(c.switch_aux >= 0, where, "switch_aux", c.switch_aux, "must be >= 0");
    require(c.sequence_aux >= 0, where, "sequence_aux", c.sequence_aux, "must be >= 0");
    require(c.sequence_length >= 0, where, "sequence_length", c.sequence_length, "must be >= 0");
    require(c.z_loss >= 0, where, "z_loss", c.z_loss, "must be >= 0");
    require(std::isfinite(c.kl_uniform) && c.kl_uniform >= 0, where, "kl_uniform", c.kl_uniform,
            "must be finite and >= 0");
    require(std::isfinite(c.global_batch_aux) && c.global_batch_aux >= 0, where, "global_batch_aux",
            c.global_batch_aux, "must be finite and >= 0");
    require(c.global_batch_micro_batches >= 1, where, "global_batch_micro_batches",
            c.global_batch_micro_batches, "must be at least 1");
    return c;
  }

  int sequence_length(int tokens) const {
    return config_.sequence_length == 0 ? tokens : config_.sequence_length;
  }

  void prepare(int tokens, int experts, const std::vector<std::int64_t>& counts,
               std::int64_t global_tokens, int slots) {
    detail::ensure_extents(fraction_, "kmoe::BalanceLoss::fraction", experts);
    detail::ensure_extents(mean_prob_, "kmoe::BalanceLoss::mean_prob", experts);
    detail::ensure_extents(lse_, "kmoe::BalanceLoss::lse", tokens);
    fraction_host_ = Kokkos::create_mirror_view(fraction_);
    const double denominator = double(global_tokens) * slots;
    for (int e = 0; e < experts; ++e)
      fraction_host_(e) = route_type(denominator > 0 ? double(counts[e]) / denominator : 0.0);
    Kokkos::deep_copy(fraction_, fraction_host_);
  }

  /// f_i of the global-batch term: (C_i + c_i) / (k (N + T)), C and N the counts and tokens
  /// of the window's earlier micro-batches, c and T this micro-batch's (all global). A
  /// training forward keeps c and T in the window, which restarts after
  /// global_batch_micro_batches of them.
  void prepare_global_batch(const std::vector<std::int64_t>& counts, std::int64_t global_tokens,
                            int slots, bool training) {
    const int experts = int(counts.size());
    detail::ensure_extents(global_batch_fraction_, "kmoe::BalanceLoss::global_batch_fraction",
                           experts);
    global_batch_fraction_host_ = Kokkos::create_mirror_view(global_batch_fraction_);
    window_counts_.resize(experts, 0);
    const double denominator = double(window_tokens_ + global_tokens) * slots;
    for (int e = 0; e < experts; ++e)
      global_batch_fraction_host_(e) =
          route_type(denominator > 0 ? double(window_counts_[e] + counts[e]) / denominator : 0.0);
    Kokkos::deep_copy(global_batch_fraction_, global_batch_fraction_host_);
    if (!training) return;
    if (++window_micro_batches_ == config_.global_batch_micro_batches) {
      window_micro_batches_ = 0;
      window_tokens_ = 0;
      window_counts_.assign(experts, 0);
    } else {
      window_tokens_ += global_tokens;
      for (int e = 0; e < experts; ++e) window_counts_[e] += counts[e];
    }
  }

  /// KL(P || U) = sum_i P_i log(E P_i) with P_i = (sum over every token group's tokens of
  /// p(t, i)) / global_tokens (an all-reduce of the per-expert sums). Fills kl_grad_ with
  /// log(E P_i) + 1, the derivative of the sum in P_i: a term with P_i = 0 is 0 (the
  /// limit) and its derivative is taken at the smallest normal double instead of -inf.
  template <class Communicator>
  double kl_term(const RoutingPlan<ExecSpace, Scalar>& plan, int experts,
                 std::int64_t global_tokens, const Communicator& token_groups) {
    const int tokens = int(plan.tokens());
    detail::ensure_extents(prob_sum_, "kmoe::BalanceLoss::prob_sum", experts);
    detail::ensure_extents(kl_grad_, "kmoe::BalanceLoss::kl_grad", experts);
    detail::sum_over_tokens<ExecSpace>(plan.probs, tokens, prob_sum_);
    if (token_groups.size() > 1) token_groups.all_reduce_sum(prob_sum_);
    auto sum_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), prob_sum_);
    auto grad_host = Kokkos::create_mirror_view(kl_grad_);
    double kl = 0;
    for (int e = 0; e < experts; ++e) {
      const double mean = global_tokens > 0 ? sum_host(e) / double(global_tokens) : 0.0;
      if (mean > 0) kl += mean * std::log(experts * mean);
      grad_host(e) =
          route_type(std::log(experts * std::max(mean, std::numeric_limits<double>::min())) + 1);
    }
    Kokkos::deep_copy(kl_grad_, grad_host);
    return kl;
  }

  /// (1/n_seq) sum over sequences of E * sum_i f_i^seq P_i^seq; fills sequence_fraction_.
  double sequence_term(const RoutingPlan<ExecSpace, Scalar>& plan) {
    const int tokens = int(plan.tokens()), experts = int(fraction_.extent(0));
    validate_tokens("kmoe::BalanceLoss::forward", tokens);
    const int seq_len = sequence_length(tokens);
    const int sequences = tokens / seq_len;
    detail::ensure_extents(sequence_fraction_, "kmoe::BalanceLoss::sequence_fraction", sequences,
                           experts);
    detail::ensure_extents(sequence_prob_, "kmoe::BalanceLoss::sequence_prob", sequences, experts);
    const auto frac = sequence_fraction_;
    const auto prob = sequence_prob_;
    detail::sequence_fraction_and_prob<ExecSpace>(plan.expert, plan.probs, seq_len, frac, prob);
    auto frac_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), frac);
    auto prob_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), prob);
    double sum = 0;
    for (int q = 0; q < sequences; ++q)
      for (int e = 0; e < experts; ++e) sum += double(frac_host(q, e)) * double(prob_host(q, e));
    return experts * sum / sequences;
  }

  BalanceLossConfig config_;
  double gradient_scale_ = 1.0;  ///< the loss scale of mixed-precision training
  Vector<route_type, ExecSpace> fraction_, mean_prob_, lse_, global_batch_fraction_, kl_grad_;
  typename Vector<route_type, ExecSpace>::host_mirror_type fraction_host_,
      global_batch_fraction_host_;
  Vector<double, ExecSpace> prob_sum_;
  // The global-batch window: counts and tokens of its earlier training micro-batches.
  std::vector<std::int64_t> window_counts_;
  std::int64_t window_tokens_ = 0;
  int window_micro_batches_ = 0;
  Matrix<route_type, ExecSpace> sequence_fraction_, sequence_prob_;
};

}  // namespace kmoe
