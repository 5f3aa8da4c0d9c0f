// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file optimizer.hpp
/// \brief Optimizers over a ParameterList: SGD with momentum, AdamW (decoupled weight
/// decay, Loshchilov & Hutter) and clipping by global gradient norm. They only read
/// `value`/`grad` of each Parameter, so a user's optimizer can drive the same list.

#include <kmoe/detail/math.hpp>
#include <kmoe/error.hpp>
#include <kmoe/parameter_groups.hpp>
#include <kmoe/parameters.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace kmoe {

namespace detail {
/// Elements per partial sum of the gradient norm: the norm adds g(i)^2 chunk by chunk, and a
/// sharded optimizer (sharded_optimizer.hpp) cuts its shards at these chunk boundaries so
/// that it adds the same partial sums in the same order.
inline constexpr std::size_t norm_chunk = 4096;

/// Sum of g(i)^2 of each chunk of norm_chunk elements (the last one shorter), on the host.
template <class ExecSpace, class Flat>
std::vector<double> chunk_sums_of_squares(const Flat& g) {
  const std::size_t chunk = norm_chunk;  // a plain local: captured by value in the kernel
  const std::size_t n = g.size(), chunks = (n + chunk - 1) / chunk;
  Kokkos::View<double*, typename ExecSpace::memory_space> partial(
      Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::clip_grad_norm::partial"), chunks);
  Kokkos::parallel_for(
      "kmoe::clip_grad_norm::norm", Kokkos::RangePolicy<ExecSpace>(0, chunks),
      KOKKOS_LAMBDA(std::size_t c) {
        const std::size_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
        double sum = 0;
        for (std::size_t i = c * chunk; i < end; ++i) sum += double(g(i)) * double(g(i));
        partial(c) = sum;
      });
  const auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), partial);
  return std::vector<double>(host.data(), host.data() + chunks);
}

/// The chunk sums added in chunk order.
inline double add_in_order(const std::vector<double>& partials) {
  double total = 0;
  for (double p : partials) total += p;
  return total;
}

/// Sum of g(i)^2 in an order fixed by the size alone: chunks summed in parallel, then the
/// chunk sums in turn, so the norm (and the clipping scale) has the same bits for any
/// thread count, unlike a parallel_reduce, whose order follows the threads.
template <class ExecSpace, class Flat>
double sum_of_squares(const Flat& g) {
  return add_in_order(chunk_sums_of_squares<ExecSpace>(g));
}
/// The clipping step shared by the local and the global clip: when norm > max_norm, every
/// gradient times max_norm / (norm + 1e-6), as torch.nn.utils.clip_grad_norm_.
template <class ExecSpace, class List>
void scale_gradients(const List& list, double norm, double max_norm) {
  if (!(norm > max_norm)) return;
  using Scalar = typename List::value_type::flat_view::non_const_value_type;
  const Scalar scale = Scalar(max_norm / (norm + 1e-6));
  for (const auto& p : list) {
    const auto g = p.grad;
    Kokkos::parallel_for(
        "kmoe::clip_grad_norm::scale", Kokkos::RangePolicy<ExecSpace>(0, g.size()),
        KOKKOS_LAMBDA(std::size_t i) { g(i) *= scale; });
  }
}

/// A hyper-parameter that must be > 0 and stay finite and non-zero in the update's Scalar
/// (lr = Inf, or 1e300 cast to float, would turn every weight into NaN in one step).
template <class Scalar>
void require_positive_hyper(const char* where, const char* name, double value) {
  // Compared with Scalar's range before the cast: converting an out-of-range double to
  // float is undefined behaviour, not Inf.
  require(value > 0 && std::isfinite(value) &&
              value <= double(std::numeric_limits<Scalar>::max()) && Scalar(value) > 0,
          where, name, value, "must be > 0 and finite in the parameters' scalar type");
}

/// A hyper-parameter that must be >= 0 and finite in the update's Scalar (weight decay).
template <class Scalar>
void require_non_negative_hyper(const char* where, const char* name, double value) {
  require(value >= 0 && std::isfinite(value) && value <= double(std::numeric_limits<Scalar>::max()),
          where, name, value, "must be >= 0 and finite in the parameters' scalar type");
}

}  // namespace detail

/// \brief Scales every gradient so that the global L2 norm is at most `max_norm`; returns
/// the norm before clipping (as torch.nn.utils.clip_grad_norm_).
template <class ExecSpace, class Scalar>
double clip_grad_norm(const ParameterList<ExecSpace, Scalar>& list, double max_norm) {
  require(max_norm > 0 && std::isfinite(max_norm), "kmoe::clip_grad_norm", "max_norm", max_norm,
          "must be positive and finite");
  double total = 0;
  for (const auto& p : list) {
    total += detail::sum_of_squares<ExecSpace>(p.grad);
  }
  const double norm = std::sqrt(total);
  detail::scale_gradients<ExecSpace>(list, norm, max_norm);
  return norm;
}

/// \brief One tensor of optimizer state, named after its parameter with PyTorch's suffix
/// ("experts.w_up.exp_avg"); the view aliases the optimizer's own storage, so writing it
/// restores the state (checkpoints).
template <class ExecSpace, class Scalar>
struct OptimizerState {
  std::string name;
  std::string parameter;
  Vector<Scalar, ExecSpace> value;
};

namespace detail {
/// Bytes of the tensors in an optimizer's state() list.
template <class State>
std::size_t state_bytes_of(const std::vector<State>& state) {
  std::size_t bytes = 0;
  for (const auto& s : state)
    bytes += s.value.size() * sizeof(typename decltype(s.value)::value_type);
  return bytes;
}
}  // namespace detail

/// \brief SGD with momentum (torch.optim.SGD): v = mu v + g (+ wd w); w -= lr v.
template <class ExecSpace, class Scalar>
class SGD {
 public:
  struct Config {
    double learning_rate = 1e-2;
    double momentum = 0.0;
    double weight_decay = 0.0;
    std::vector<ParameterGroup> groups = {};  ///< per-parameter lr scale / no decay
  };

  SGD(ParameterList<ExecSpace, Scalar> list, const Config& config)
      : list_(std::move(list)), config_(config) {
    detail::require_positive_hyper<Scalar>("kmoe::SGD", "learning_rate", config.learning_rate);
    require(config.momentum >= 0 && config.momentum < 1, "kmoe::SGD", "momentum", config.momentum,
            "must be in [0, 1)");
    detail::require_non_negative_hyper<Scalar>("kmoe::SGD", "weight_decay", config.weight_decay);
    groups_ = resolve_groups(list_, config.groups, "kmoe::SGD");
    for (const auto& p : list_)
      velocity_.emplace_back("kmoe::SGD::velocity(" + p.name + ")", p.value.size());
  }

  /// The base learning rate from now on (a schedule sets it each step; >= 0).
  void set_learning_rate(double lr) {
    // 0 is valid here: warmup schedules start from it.
    detail::require_non_negative_hyper<Scalar>("kmoe::SGD::set_learning_rate", "learning_rate", lr);
    config_.learning_rate = lr;
  }
  double learning_rate() const { return config_.learning_rate; }
  /// Steps taken; with state(), what a checkpoint needs to resume bitwise.
  long long steps() const { return steps_; }
  void set_steps(long long steps) {
    require(steps >= 0, "kmoe::SGD::set_steps", "steps", steps, "must be >= 0");
    steps_ = steps;
  }
  /// What state() appends to a parameter's name, in the order it lists them per parameter.
  static std::vector<std::string> state_suffixes() { return {".momentum_buffer"}; }
  /// The momentum buffers, one per parameter ("<name>.momentum_buffer").
  std::vector<OptimizerState<ExecSpace, Scalar>> state() const {
    std::vector<OptimizerState<ExecSpace, Scalar>> all;
    for (std::size_t i = 0; i < list_.size(); ++i)
      all.push_back({list_[i].name + state_suffixes()[0], list_[i].name, velocity_[i]});
    return all;
  }
  /// Bytes of optimizer state this optimizer holds (the momentum buffers).
  std::size_t state_bytes() const { return detail::state_bytes_of(state()); }

  void step() {
    const Scalar mu = Scalar(config_.momentum);
    for (std::size_t i = 0; i < list_.size(); ++i) {
      const Scalar lr = Scalar(config_.learning_rate * groups_[i].learning_rate_scale);
      const Scalar wd = groups_[i].weight_decay ? Scalar(config_.weight_decay) : Scalar(0);
      const auto w = list_[i].value, g = list_[i].grad;
      const auto v = velocity_[i];
      const bool first = steps_ == 0;
      Kokkos::parallel_for(
          "kmoe::SGD::step", Kokkos::RangePolicy<ExecSpace>(0, w.size()),
          KOKKOS_LAMBDA(std::size_t j) {
            const Scalar d = g(j) + wd * w(j);
            v(j) = first ? d : mu * v(j) + d;
            w(j) -= lr * v(j);
          });
    }
    ++steps_;
  }

 private:
  ParameterList<ExecSpace, Scalar> list_;
  Config config_;
  std::vector<ResolvedGroup> groups_;
  std::vector<Vector<Scalar, ExecSpace>> velocity_;
  long long steps_ = 0;
};

/// \brief AdamW (torch.optim.AdamW): w -= lr wd w; m, v moments with bias correction;
/// w -= lr m_hat / (sqrt(v_hat) + eps).
template <class ExecSpace, class Scalar>
class AdamW {
 public:
  struct Config {
    double learning_rate = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double epsilon = 1e-8;
    double weight_decay = 1e-2;
    std::vector<ParameterGroup> groups = {};  ///< per-parameter lr scale / no decay
  };

  AdamW(ParameterList<ExecSpace, Scalar> list, const Config& config)
      : list_(std::move(list)), config_(config) {
    detail::require_positive_hyper<Scalar>("kmoe::AdamW", "learning_rate", config.learning_rate);
    require(config.beta1 >= 0 && config.beta1 < 1, "kmoe::AdamW", "beta1", config.beta1,
            "must be in [0, 1)");
    require(config.beta2 >= 0 && config.beta2 < 1, "kmoe::AdamW", "beta2", config.beta2,
            "must be in [0, 1)");
    detail::require_positive_hyper<Scalar>("kmoe::AdamW", "epsilon", config.epsilon);
    detail::require_non_negative_hyper<Scalar>("kmoe::AdamW", "weight_decay", config.weight_decay);
    groups_ = resolve_groups(list_, config.groups, "kmoe::AdamW");
    for (const auto& p : list_) {
      first_.emplace_back("kmoe::AdamW::m(" + p.name + ")", p.value.size());
      second_.emplace_back("kmoe::AdamW::v(" + p.name + ")", p.value.size());
    }
  }

  /// The base learning rate from now on (a schedule sets it each step; >= 0).
  void set_learning_rate(double lr) {
    // 0 is valid here: warmup schedules start from it.
    detail::require_non_negative_hyper<Scalar>("kmoe::AdamW::set_learning_rate", "learning_rate",
                                               lr);
    config_.learning_rate = lr;
  }
  double learning_rate() const { return config_.learning_rate; }
  /// Steps taken (the bias corrections depend on it); with state(), what a checkpoint
  /// needs to resume bitwise.
  long long steps() const { return steps_; }
  void set_steps(long long steps) {
    require(steps >= 0, "kmoe::AdamW::set_steps", "steps", steps, "must be >= 0");
    steps_ = steps;
  }
  /// What state() appends to a parameter's name, in the order it lists them per parameter.
  static std::vector<std::string> state_suffixes() { return {".exp_avg", ".exp_avg_sq"}; }
  /// The moments, two per parameter ("<name>.exp_avg", "<name>.exp_avg_sq", PyTorch's names).
  std::vector<OptimizerState<ExecSpace, Scalar>> state() const {
    std::vector<OptimizerState<ExecSpace, Scalar>> all;
    const auto suffixes = state_suffixes();
    for (std::size_t i = 0; i < list_.size(); ++i) {
      all.push_back({list_[i].name + suffixes[0], list_[i].name, first_[i]});
      all.push_back({list_[i].name + suffixes[1], list_[i].name, second_[i]});
    }
    return all;
  }
  /// Bytes of optimizer state this optimizer holds (both moments).
  std::size_t state_bytes() const { return detail::state_bytes_of(state()); }

  void step() {
    ++steps_;
    const double b1 = config_.beta1, b2 = config_.beta2;
    const Scalar eps = Scalar(config_.epsilon);
    const Scalar c1 = Scalar(1 - std::pow(b1, double(steps_)));
    const Scalar c2 = Scalar(1 - std::pow(b2, double(steps_)));
    const Scalar beta1 = Scalar(b1), beta2 = Scalar(b2);
    for (std::size_t i = 0; i < list_.size(); ++i) {
      const Scalar lr = Scalar(config_.learning_rate * groups_[i].learning_rate_scale);
      const Scalar wd = groups_[i].weight_decay ? Scalar(config_.weight_decay) : Scalar(0);
      const auto w = list_[i].value, g = list_[i].grad;
      const auto m = first_[i], v = second_[i];
      Kokkos::parallel_for(
          "kmoe::AdamW::step", Kokkos::RangePolicy<ExecSpace>(0, w.size()),
          KOKKOS_LAMBDA(std::size_t j) {
            w(j) -= lr * wd * w(j);
            m(j) = beta1 * m(j) + (1 - beta1) * g(j);
            v(j) = beta2 * v(j) + (1 - beta2) * g(j) * g(j);
            w(j) -= lr * (m(j) / c1) / (detail::sqrt(v(j) / c2) + eps);
          });
    }
  }

 private:
  ParameterList<ExecSpace, Scalar> list_;
  Config config_;
  std::vector<ResolvedGroup> groups_;
  std::vector<Vector<Scalar, ExecSpace>> first_, second_;
  long long steps_ = 0;
};

}  // namespace kmoe
