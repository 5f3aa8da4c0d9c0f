// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file glu.hpp
/// \brief Gated experts y = (act(x W_gate^T) * (x W_up^T)) W_down^T: SwiGLU with Silu
/// (Mixtral w1/w3/w2, DeepSeek and Qwen gate_proj/up_proj/down_proj), GeGLU with Gelu.

#include <kmoe/activation.hpp>
#include <kmoe/detail/checked.hpp>
#include <kmoe/error.hpp>
#include <kmoe/experts/expert_mode.hpp>
#include <kmoe/gemm.hpp>
#include <kmoe/gemm/segmented.hpp>

namespace kmoe {

struct ExpertShape {
  int experts = 0;    ///< experts held by this object (the local ones under expert parallelism)
  int hidden = 0;     ///< H
  int ffn = 0;        ///< F (this rank's share under expert tensor parallelism)
  bool bias = false;  ///< FFN experts only: add b1 [F] and b2 [H]
};

namespace detail {
inline ExpertShape validated_expert_shape(const char* where, const ExpertShape& s) {
  require(s.experts >= 1, where, "experts", s.experts, "must be at least 1");
  require(s.hidden >= 1, where, "hidden", s.hidden, "must be at least 1");
  require(s.ffn >= 1, where, "ffn", s.ffn, "must be at least 1");
  // Each weight tensor holds E * F * H values; its bytes must be addressable too.
  const auto values = checked_mul(s.experts, s.ffn, s.hidden, where, "experts x ffn x hidden");
  checked_mul(values, std::int64_t(sizeof(double)), where, "weight bytes");
  return s;
}
}  // namespace detail

/// \brief E gated experts with weights w_gate [E, F, H], w_up [E, F, H], w_down [E, H, F].
template <class ExecSpace, class Scalar, class Activation = activation::Silu,
          class Gemm = DefaultGemm>
class GLUExperts {
 public:
  using execution_space = ExecSpace;
  using scalar_type = Scalar;
  using activation_type = Activation;

  explicit GLUExperts(const ExpertShape& shape, const std::string& name = "experts")
      : shape_(validated(shape)),
        w_gate_(name + ".w_gate", shape.experts, shape.ffn, shape.hidden,
                ParameterRole::input_projection, 1),
        w_up_(name + ".w_up", shape.experts, shape.ffn, shape.hidden,
              ParameterRole::input_projection, 1),
        w_down_(name + ".w_down", shape.experts, shape.hidden, shape.ffn,
                ParameterRole::output_projection, 2) {}

  int num_experts() const { return shape_.experts; }
  int hidden_size() const { return shape_.hidden; }
  int ffn_size() const { return shape_.ffn; }
  const StackedWeight<ExecSpace, Scalar>& w_gate() const { return w_gate_; }
  const StackedWeight<ExecSpace, Scalar>& w_up() const { return w_up_; }
  const StackedWeight<ExecSpace, Scalar>& w_down() const { return w_down_; }

  void forward(const ConstMatrix<Scalar, ExecSpace>& x, const Segments<ExecSpace>& segments,
               const Matrix<Scalar, ExecSpace>& y, ExpertMode mode) {
    project(x, segments);
    const auto gate = gate_, up = up_, hidden = hidden_;
    Kokkos::parallel_for(
        "kmoe::GLUExperts::activation",
        Kokkos::RangePolicy<ExecSpace>(0, std::size_t(segments.rows()) * shape_.ffn),
        KOKKOS_LAMBDA(std::size_t i) {
          hidden.data()[i] = Activation::value(gate.data()[i]) * up.data()[i];
        });
    gemm::segment_times_weight<Gemm>(segments, hidden_, w_down_.value, true, Scalar(1), Scalar(0),
                                     y);
    if (mode == ExpertMode::recompute) release_saved();
  }

  void backward(const ConstMatrix<Scalar, ExecSpace>& x, const Segments<ExecSpace>& segments,
                const ConstMatrix<Scalar, ExecSpace>& grad_y,
                const Matrix<Scalar, ExecSpace>& grad_x) {
    if (gate_.extent(0) != std::size_t(segments.rows())) project(x, segments);
    const std::size_t elements = std::size_t(segments.rows()) * shape_.ffn;
    const auto gate = gate_, up = up_, hidden = hidden_;
    Kokkos::parallel_for(
        "kmoe::GLUExperts::recompute_hidden", Kokkos::RangePolicy<ExecSpace>(0, elements),
        KOKKOS_LAMBDA(std::size_t i) {
          hidden.data()[i] = Activation::value(gate.data()[i]) * up.data()[i];
        });
    gemm::segment_weight_gradient<Gemm>(segments, grad_y, hidden_, w_down_.grad);
    // hidden_ now receives dL/dhidden; gate_ and up_ are overwritten by their gradients.
    gemm::segment_times_weight<Gemm>(segments, grad_y, w_down_.value, false, Scalar(1), Scalar(0),
                                     hidden_);
    Kokkos::parallel_for(
        "kmoe::GLUExperts::activation_backward", Kokkos::RangePolicy<ExecSpace>(0, elements),
        KOKKOS_LAMBDA(std::size_t i) {
          const Scalar g = gate.data()[i], u = up.data()[i], dh = hidden.data()[i];
          gate.data()[i] = dh * u * Activation::derivative(g);
          up.data()[i] = dh * Activation::value(g);
        });
    gemm::segment_weight_gradient<Gemm>(segments, gate_, x, w_gate_.grad);
    gemm::segment_weight_gradient<Gemm>(segments, up_, x, w_up_.grad);
    gemm::segment_times_weight<Gemm>(segments, gate_, w_gate_.value, false, Scalar(1), Scalar(0),
                                     grad_x);
    gemm::segment_times_weight<Gemm>(segments, up_, w_up_.value, false, Scalar(1), Scalar(1),
                                     grad_x);
  }

  void collect_parameters(ParameterList<ExecSpace, Scalar>& list) const {
    w_gate_.collect(list);
    w_up_.collect(list);
    w_down_.collect(list);
  }

 private:
  static ExpertShape validated(const ExpertShape& s) {
    return detail::validated_expert_shape("kmoe::GLUExperts", s);
  }

  void project(const ConstMatrix<Scalar, ExecSpace>& x, const Segments<ExecSpace>& segments) {
    const std::size_t rows = std::size_t(segments.rows());
    detail::ensure_extents(gate_, "kmoe::GLUExperts::gate", rows, shape_.ffn);
    detail::ensure_extents(up_, "kmoe::GLUExperts::up", rows, shape_.ffn);
    detail::ensure_extents(hidden_, "kmoe::GLUExperts::hidden", rows, shape_.ffn);
    gemm::segment_times_weight<Gemm>(segments, x, w_gate_.value, true, Scalar(1), Scalar(0), gate_);
    gemm::segment_times_weight<Gemm>(segments, x, w_up_.value, true, Scalar(1), Scalar(0), up_);
  }

  void release_saved() {
    gate_ = {};
    up_ = {};
    hidden_ = {};
  }

  ExpertShape shape_;
  StackedWeight<ExecSpace, Scalar> w_gate_, w_up_, w_down_;
  // Saved pre-activations (kept in store/inference mode) and the hidden workspace.
  Matrix<Scalar, ExecSpace> gate_, up_, hidden_;
};

/// \brief SwiGLU experts (Mixtral, DeepSeek, Qwen).
template <class ExecSpace, class Scalar, class Gemm = DefaultGemm>
using SwiGLUExperts = GLUExperts<ExecSpace, Scalar, activation::Silu, Gemm>;
/// \brief GeGLU experts.
template <class ExecSpace, class Scalar, class Gemm = DefaultGemm>
using GeGLUExperts = GLUExperts<ExecSpace, Scalar, activation::GeluErf, Gemm>;

}  // namespace kmoe
