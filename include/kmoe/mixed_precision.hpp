// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file mixed_precision.hpp
/// \brief Mixed-precision training: fp32 master copies of a 16-bit layer's parameters
/// (kmoe::MasterWeights) and dynamic loss scaling for fp16 (kmoe::DynamicLossScaler).
///
/// A layer stored in bf16 / fp16 already keeps its gradients in float (Parameter::grad is
/// accumulation_t). MasterWeights adds one float copy of each 16-bit value and hands out a
/// float ParameterList whose values are the masters and whose gradients are the layer's own
/// float gradients (the same memory), so SGD, AdamW, the sharded optimizer, clipping and the
/// checkpoint code run unchanged on fp32 (the masters are what a checkpoint saves). After
/// each optimizer step, publish() rounds every master once into the layer's 16-bit values.
///
///     MasterWeights<X, bfloat16> masters(layer.parameters());
///     AdamW<X, float> optimizer(masters.parameters(), config);
///     ... forward, backward ...; optimizer.step(); masters.publish();

#include <kmoe/communicator.hpp>
#include <kmoe/detail/non_finite.hpp>
#include <kmoe/error.hpp>
#include <kmoe/parameters.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace kmoe {

namespace detail {
/// to(i) = from(i) converted (a 16-bit value widens exactly; a float rounds to nearest even).
template <class ExecSpace, class From, class To>
void convert_flat(const From& from, const To& to) {
  using Target = typename To::non_const_value_type;
  Kokkos::parallel_for(
      "kmoe::MasterWeights::convert", Kokkos::RangePolicy<ExecSpace>(0, to.size()),
      KOKKOS_LAMBDA(std::size_t i) { to(i) = Target(float(from(i))); });
  ExecSpace().fence();
}
}  // namespace detail

/// \brief fp32 masters of a 16-bit layer's parameters (see the file comment).
template <class ExecSpace, class Storage>
class MasterWeights {
  static_assert(is_packed_float_v<Storage>,
                "kmoe::MasterWeights: the storage must be kmoe::bfloat16 or kmoe::float16 (a "
                "float or double layer is its own master)");
  static_assert(std::is_same_v<accumulation_t<Storage>, float>,
                "kmoe::MasterWeights: masters are kept in the accumulation type, float");

 public:
  /// Copies (widens, exactly) the current 16-bit values into new float masters.
  explicit MasterWeights(ParameterList<ExecSpace, Storage> storage) : storage_(std::move(storage)) {
    for (const auto& p : storage_) {
      Vector<float, ExecSpace> master(
          Kokkos::view_alloc(Kokkos::WithoutInitializing, p.name + ".master"), p.value.size());
      Parameter<ExecSpace, float> m;
      m.name = p.name;
      m.shape = p.shape;
      m.role = p.role;
      m.shard = p.shard;
      m.value = typename Parameter<ExecSpace, float>::flat_view(master.data(), master.size());
      m.grad = p.grad;
      masters_.push_back(std::move(master));
      list_.push_back(std::move(m));
    }
    pull();
  }

  /// The float parameters the optimizer updates: master values, the layer's float gradients.
  const ParameterList<ExecSpace, float>& parameters() const { return list_; }

  /// Rounds every master once (to nearest even) into the layer's 16-bit values.
  void publish() const {
    for (std::size_t i = 0; i < list_.size(); ++i)
      detail::convert_flat<ExecSpace>(list_[i].value, storage_[i].value);
  }

  /// Sets the masters from the layer's 16-bit values (after the layer's values were set
  /// directly, e.g. by an initializer); widening is exact.
  void pull() const {
    for (std::size_t i = 0; i < list_.size(); ++i)
      detail::convert_flat<ExecSpace>(storage_[i].value, list_[i].value);
  }

 private:
  ParameterList<ExecSpace, Storage> storage_;
  std::vector<Vector<float, ExecSpace>> masters_;  ///< owns what list_'s values alias
  ParameterList<ExecSpace, float> list_;
};

/// \brief A 16-bit layer seen through its fp32 masters, for the checkpoint code
/// (io/checkpoint.hpp): parameters() are the masters (scalar_type float), everything else
/// is the layer's. `save_checkpoint(dir, with_masters, optimizer)` stores the masters and the
/// optimizer's fp32 state; `load_checkpoint` restores the masters, after which the caller
/// publishes them into the layer (MasterWeights::publish).
template <class Layer>
class LayerWithMasters {
 public:
  using execution_space = typename Layer::execution_space;
  using scalar_type = float;
  using Masters = MasterWeights<execution_space, typename Layer::scalar_type>;

  LayerWithMasters(Layer& layer, const Masters& masters) : layer_(layer), masters_(masters) {}

  ParameterList<execution_space, float> parameters() const { return masters_.parameters(); }
  const auto& groups() const { return layer_.groups(); }
  auto& router() { return layer_.router(); }
  const auto& router() const { return layer_.router(); }
  int num_experts() const { return layer_.num_experts(); }
  void check_replicas() { layer_.check_replicas(); }
  const std::vector<std::int64_t>& pending_bias_counts() const {
    return layer_.pending_bias_counts();
  }
  void set_pending_bias_counts(const std::vector<std::int64_t>& counts) {
    layer_.set_pending_bias_counts(counts);
  }

 private:
  Layer& layer_;
  const Masters& masters_;
};

/// \brief Settings of dynamic loss scaling (torch.cuda.amp.GradScaler's defaults).
struct LossScaleConfig {
  double initial_scale = 65536.0;  ///< 2^16
  double growth_factor = 2.0;      ///< scale *= growth after growth_interval good steps
  double backoff_factor = 0.5;     ///< scale *= backoff on an overflow
  int growth_interval = 2000;      ///< consecutive steps without overflow before growing
};

/// \brief Dynamic loss scaling for fp16 training: the caller multiplies its loss gradient
/// (grad_y) by scale() before backward; unscale() then checks every gradient on every rank
/// of `comm` for Inf/NaN, agreeing through an all-reduce of the overflow flag, and either
/// divides the gradients by the scale (the step goes ahead; after growth_interval such steps
/// in a row the scale grows) or zeroes them and backs the scale off (the step is skipped on
/// every rank).
class DynamicLossScaler {
 public:
  explicit DynamicLossScaler(const LossScaleConfig& config = {}) : config_(config) {
    constexpr const char* where = "kmoe::DynamicLossScaler";
    require(std::isfinite(config.initial_scale) && config.initial_scale > 0, where, "initial_scale",
            config.initial_scale, "must be positive and finite");
    require(std::isfinite(config.growth_factor) && config.growth_factor > 1, where, "growth_factor",
            config.growth_factor, "must be finite and > 1");
    require(config.backoff_factor > 0 && config.backoff_factor < 1, where, "backoff_factor",
            config.backoff_factor, "must be in (0, 1)");
    require(config.growth_interval >= 1, where, "growth_interval", config.growth_interval,
            "must be >= 1");
    scale_ = config.initial_scale;
  }

  double scale() const { return scale_; }
  /// Steps in a row without overflow since the last change of scale.
  int good_steps() const { return good_steps_; }
  /// Steps skipped for overflow so far.
  long long skipped_steps() const { return skipped_; }

  /// \brief After backward: true when every rank's gradients are finite (now divided by
  /// the scale: take the optimizer step), false when some rank overflowed (gradients
  /// zeroed on every rank, scale backed off: skip the step). Collective over `comm`.
  template <class ExecSpace, class Scalar, class Communicator>
  bool unscale(const ParameterList<ExecSpace, Scalar>& list, const Communicator& comm) {
    long long overflow = 0;
    for (const auto& p : list)
      if (detail::first_non_finite_element<ExecSpace>(p.grad) < std::int64_t(p.grad.size()))
        overflow = 1;
    overflow = all_reduce_max_value<typename ExecSpace::memory_space>(comm, overflow);
    using Grad = typename Parameter<ExecSpace, Scalar>::grad_type;
    if (overflow != 0) {
      zero_gradients(list);
      scale_ *= config_.backoff_factor;
      good_steps_ = 0;
      ++skipped_;
      return false;
    }
    const Grad inverse = Grad(1.0 / scale_);
    for (const auto& p : list) {
      const auto g = p.grad;
      Kokkos::parallel_for(
          "kmoe::DynamicLossScaler::unscale", Kokkos::RangePolicy<ExecSpace>(0, g.size()),
          KOKKOS_LAMBDA(std::size_t i) { g(i) *= inverse; });
    }
    ExecSpace().fence();
    if (++good_steps_ == config_.growth_interval) {
      scale_ *= config_.growth_factor;
      good_steps_ = 0;
    }
    return true;
  }

 private:
  LossScaleConfig config_;
  double scale_ = 1;
  int good_steps_ = 0;
  long long skipped_ = 0;
};

}  // namespace kmoe
