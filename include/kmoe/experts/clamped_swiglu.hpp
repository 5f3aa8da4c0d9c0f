// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file clamped_swiglu.hpp
/// \brief GPT-OSS's experts: gated experts with biases whose SwiGLU is clamped and scaled,
/// y = ((clamp(u, -L, L) + 1) * glu(min(g, L))) W_down^T + b_down, glu(z) = z sigmoid(alpha z),
/// for g = x W_gate^T + b_gate and u = x W_up^T + b_up (transformers' GptOssExperts).

#include <kmoe/detail/checked.hpp>
#include <kmoe/detail/math.hpp>
#include <kmoe/error.hpp>
#include <kmoe/experts/expert_mode.hpp>
#include <kmoe/experts/ffn.hpp>
#include <kmoe/experts/glu.hpp>
#include <kmoe/fingerprint.hpp>
#include <kmoe/gemm.hpp>
#include <kmoe/gemm/segmented.hpp>

#include <cmath>
#include <string>

namespace kmoe {

/// \brief The clamped SwiGLU h(g, u) = (clamp(u, -limit, limit) + 1) * z sigmoid(alpha z)
/// with z = min(g, limit). Where a clamp is active (or at its bound) its input gets no
/// gradient, as in torch.
struct ClampedSwiGLU {
  double alpha = 1.702;  ///< sigmoid gain (GPT-OSS's swiglu_alpha)
  double limit = 7.0;    ///< clamp of the gate (above) and the up projection (both sides)

  /// h(g, u).
  template <class T>
  KOKKOS_INLINE_FUNCTION static T value(T g, T u, T alpha, T limit) {
    const T z = g > limit ? limit : g;
    const T v = u > limit ? limit : (u < -limit ? -limit : u);
    return (v + T(1)) * (z * detail::sigmoid(alpha * z));
  }
  /// dg = dh * dh/dg and du = dh * dh/du at (g, u).
  template <class T>
  KOKKOS_INLINE_FUNCTION static void backward(T g, T u, T alpha, T limit, T dh, T& dg, T& du) {
    const T z = g > limit ? limit : g;
    const T v = u > limit ? limit : (u < -limit ? -limit : u);
    const T s = detail::sigmoid(alpha * z);
    const T glu = z * s;
    // torch's clamp passes the gradient strictly inside its bounds only (none at g = limit).
    dg = g >= limit ? T(0) : dh * (v + T(1)) * (s + alpha * z * s * (T(1) - s));
    du = (u >= limit || u <= -limit) ? T(0) : dh * glu;
  }
};

namespace detail {
inline ClampedSwiGLU validated_clamped_swiglu(const char* where, const ClampedSwiGLU& a) {
  require(std::isfinite(a.alpha), where, "alpha", a.alpha, "must be finite");
  require(a.limit > 0 && std::isfinite(a.limit), where, "limit", a.limit, "must be finite and > 0");
  return a;
}

/// hidden[i] = h(gate[i], up[i]) over `count` elements (ClampedSwiGLU::value).
/// Computed in accumulation_t<Scalar> (alpha and limit too), h rounded once to Scalar.
template <class X, class Scalar>
void clamped_swiglu_forward(const Matrix<Scalar, X>& gate, const Matrix<Scalar, X>& up,
                            const Matrix<Scalar, X>& hidden, std::size_t count,
                            const ClampedSwiGLU& a) {
  using A = accumulation_t<Scalar>;
  const A alpha = A(a.alpha), limit = A(a.limit);
  Kokkos::parallel_for(
      "kmoe::ClampedSwiGLUExperts::activation", Kokkos::RangePolicy<X>(0, count),
      KOKKOS_LAMBDA(std::size_t i) {
        hidden.data()[i] =
            Scalar(ClampedSwiGLU::value(A(gate.data()[i]), A(up.data()[i]), alpha, limit));
      });
}

/// gate[i], up[i] <- dL/dg, dL/du from dL/dh = hidden[i] (ClampedSwiGLU::backward).
/// Computed in accumulation_t<Scalar>, each gradient rounded once to Scalar.
template <class X, class Scalar>
void clamped_swiglu_backward(const Matrix<Scalar, X>& gate, const Matrix<Scalar, X>& up,
                             const Matrix<Scalar, X>& hidden, std::size_t count,
                             const ClampedSwiGLU& a) {
  using A = accumulation_t<Scalar>;
  const A alpha = A(a.alpha), limit = A(a.limit);
  Kokkos::parallel_for(
      "kmoe::ClampedSwiGLUExperts::activation_backward", Kokkos::RangePolicy<X>(0, count),
      KOKKOS_LAMBDA(std::size_t i) {
        A dg = 0, du = 0;
        ClampedSwiGLU::backward(A(gate.data()[i]), A(up.data()[i]), alpha, limit,
                                A(hidden.data()[i]), dg, du);
        gate.data()[i] = Scalar(dg);
        up.data()[i] = Scalar(du);
      });
}
}  // namespace detail

/// \brief E experts with w_gate [E, F, H], w_up [E, F, H], w_down [E, H, F], the clamped
/// SwiGLU, and, if shape.bias, b_gate [E, F], b_up [E, F], b_down [E, H].
template <class ExecSpace, class ScalarOrPrecision, class Gemm = DefaultGemm>
class ClampedSwiGLUExperts {
  using Scalar = storage_t<ScalarOrPrecision>;

 public:
  using execution_space = ExecSpace;
  using scalar_type = Scalar;
  using precision_type = precision_of_t<ScalarOrPrecision>;

  ClampedSwiGLUExperts(const ExpertShape& shape, const ClampedSwiGLU& activation,
                       const std::string& name = "experts")
      : shape_(validated(shape)),
        activation_(detail::validated_clamped_swiglu(where, activation)),
        w_gate_(name + ".w_gate", shape.experts, shape.ffn, shape.hidden,
                ParameterRole::input_projection, 1, shape.gradients),
        w_up_(name + ".w_up", shape.experts, shape.ffn, shape.hidden,
              ParameterRole::input_projection, 1, shape.gradients),
        w_down_(name + ".w_down", shape.experts, shape.hidden, shape.ffn,
                ParameterRole::output_projection, 2, shape.gradients),
        b_gate_(name + ".b_gate", shape.experts, shape.ffn, shape.bias, 1, shape.gradients),
        b_up_(name + ".b_up", shape.experts, shape.ffn, shape.bias, 1, shape.gradients),
        b_down_(name + ".b_down", shape.experts, shape.hidden, shape.bias, -1, shape.gradients) {}

  int num_experts() const { return shape_.experts; }
  int hidden_size() const { return shape_.hidden; }
  int ffn_size() const { return shape_.ffn; }
  const ClampedSwiGLU& activation() const { return activation_; }
  const StackedWeight<ExecSpace, Scalar>& w_gate() const { return w_gate_; }
  const StackedWeight<ExecSpace, Scalar>& w_up() const { return w_up_; }
  const StackedWeight<ExecSpace, Scalar>& w_down() const { return w_down_; }
  const StackedBias<ExecSpace, Scalar>& b_gate() const { return b_gate_; }
  const StackedBias<ExecSpace, Scalar>& b_up() const { return b_up_; }
  const StackedBias<ExecSpace, Scalar>& b_down() const { return b_down_; }

  /// Tensor parallelism, as FFNExperts: b_down is not split over F, so only one rank of the
  /// TP group adds it; the parameters not split over F (b_down) are replicas.
  void apply_output_bias(bool apply) { apply_output_bias_ = apply; }
  void collect_unsplit_parameters(ParameterList<ExecSpace, Scalar>& list) const {
    b_down_.collect(list);
  }

  /// The settings every rank must share.
  void fingerprint(Fingerprint& f) const {
    f.real("alpha", activation_.alpha);
    f.real("limit", activation_.limit);
  }

  void forward(const ConstMatrix<Scalar, ExecSpace>& x, const Segments<ExecSpace>& segments,
               const Matrix<Scalar, ExecSpace>& y, ExpertMode mode) {
    project(x, segments);
    detail::clamped_swiglu_forward<ExecSpace, Scalar>(gate_, up_, hidden_, elements(segments),
                                                      activation_);
    gemm::segment_times_weight<Gemm>(segments, hidden_, w_down_.value, true, Scalar(1), Scalar(0),
                                     y);
    if (apply_output_bias_) add_bias(segments, b_down_, y);
    if (mode == ExpertMode::recompute) release_saved();
  }

  void backward(const ConstMatrix<Scalar, ExecSpace>& x, const Segments<ExecSpace>& segments,
                const ConstMatrix<Scalar, ExecSpace>& grad_y,
                const Matrix<Scalar, ExecSpace>& grad_x) {
    detail::require_gradients("kmoe::ClampedSwiGLUExperts::backward", shape_);
    if (gate_.extent(0) != std::size_t(segments.rows())) project(x, segments);
    const std::size_t count = elements(segments);
    detail::clamped_swiglu_forward<ExecSpace, Scalar>(gate_, up_, hidden_, count, activation_);
    gemm::segment_weight_gradient<Gemm>(segments, grad_y, hidden_, w_down_.grad);
    if (b_down_.enabled()) gemm::segment_bias_gradient(segments, grad_y, b_down_.grad);
    // hidden_ now receives dL/dhidden; gate_ and up_ are overwritten by their gradients.
    gemm::segment_times_weight<Gemm>(segments, grad_y, w_down_.value, false, Scalar(1), Scalar(0),
                                     hidden_);
    detail::clamped_swiglu_backward<ExecSpace, Scalar>(gate_, up_, hidden_, count, activation_);
    gemm::segment_weight_gradient<Gemm>(segments, gate_, x, w_gate_.grad);
    gemm::segment_weight_gradient<Gemm>(segments, up_, x, w_up_.grad);
    if (b_gate_.enabled()) {
      gemm::segment_bias_gradient(segments, gate_, b_gate_.grad);
      gemm::segment_bias_gradient(segments, up_, b_up_.grad);
    }
    gemm::segment_times_weight<Gemm>(segments, gate_, w_gate_.value, false, Scalar(1), Scalar(0),
                                     grad_x);
    gemm::segment_times_weight<Gemm>(segments, up_, w_up_.value, false, Scalar(1), Scalar(1),
                                     grad_x);
  }

  /// Drops what forward kept for backward, so that the next backward recomputes it from
  /// its own x (the layer's pipelined backward runs one backward per chunk of experts).
  void release_saved() {
    gate_ = {};
    up_ = {};
    hidden_ = {};
  }

  /// Bytes it holds between forward and backward (pre-activations and hidden rows; none
  /// after a forward under ExpertMode::recompute).
  std::size_t saved_bytes() const {
    return (gate_.span() + up_.span() + hidden_.span()) * sizeof(Scalar);
  }

  void collect_parameters(ParameterList<ExecSpace, Scalar>& list) const {
    w_gate_.collect(list);
    b_gate_.collect(list);
    w_up_.collect(list);
    b_up_.collect(list);
    w_down_.collect(list);
    b_down_.collect(list);
  }

 private:
  static constexpr const char* where = "kmoe::ClampedSwiGLUExperts";

  static ExpertShape validated(const ExpertShape& s) {
    require(!s.output_gate, where, "output_gate", s.output_gate, "is not supported");
    return detail::validated_expert_shape(where, s);
  }

  std::size_t elements(const Segments<ExecSpace>& segments) const {
    return std::size_t(segments.rows()) * std::size_t(shape_.ffn);
  }

  void project(const ConstMatrix<Scalar, ExecSpace>& x, const Segments<ExecSpace>& segments) {
    const std::size_t rows = std::size_t(segments.rows());
    detail::ensure_extents(gate_, "kmoe::ClampedSwiGLUExperts::gate", rows, shape_.ffn);
    detail::ensure_extents(up_, "kmoe::ClampedSwiGLUExperts::up", rows, shape_.ffn);
    detail::ensure_extents(hidden_, "kmoe::ClampedSwiGLUExperts::hidden", rows, shape_.ffn);
    gemm::segment_times_weight<Gemm>(segments, x, w_gate_.value, true, Scalar(1), Scalar(0), gate_);
    gemm::segment_times_weight<Gemm>(segments, x, w_up_.value, true, Scalar(1), Scalar(0), up_);
    add_bias(segments, b_gate_, gate_);
    add_bias(segments, b_up_, up_);
  }

  /// As GLUExperts, Scalar is the storage type (float, double, bfloat16, float16): products,
  /// sums and the activation run in accumulation_t<Scalar>, each stored value rounded once;
  /// with 16-bit storage a bias is added to the rounded GEMM output (a second rounding, as
  /// FFNExperts').
  static void add_bias(const Segments<ExecSpace>& segments,
                       const StackedBias<ExecSpace, Scalar>& bias,
                       const Matrix<Scalar, ExecSpace>& out) {
    if (!bias.enabled()) return;
    detail::add_row_bias<ExecSpace>(segments.expert_of_row, bias.value, segments.rows(), out);
  }

  ExpertShape shape_;
  ClampedSwiGLU activation_;
  StackedWeight<ExecSpace, Scalar> w_gate_, w_up_, w_down_;
  StackedBias<ExecSpace, Scalar> b_gate_, b_up_, b_down_;
  bool apply_output_bias_ = true;
  // Saved pre-activations (kept in store/inference mode) and the hidden workspace.
  Matrix<Scalar, ExecSpace> gate_, up_, hidden_;
};

}  // namespace kmoe
