// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file glu.hpp
/// \brief Gated experts y = (act(x W_gate^T) * (x W_up^T)) W_down^T: SwiGLU with Silu
/// (Mixtral w1/w3/w2, DeepSeek and Qwen gate_proj/up_proj/down_proj), GeGLU with Gelu.

#include <kmoe/activation.hpp>
#include <kmoe/detail/checked.hpp>
#include <kmoe/detail/math.hpp>
#include <kmoe/error.hpp>
#include <kmoe/experts/expert_mode.hpp>
#include <kmoe/gemm.hpp>
#include <kmoe/gemm/segmented.hpp>

namespace kmoe {

struct ExpertShape {
  int experts = 0;    ///< experts held by this object (the local ones under expert parallelism)
  int hidden = 0;     ///< H
  int ffn = 0;        ///< F (this rank's share under expert tensor parallelism)
  bool bias = false;  ///< biases: FFN b1 [F], b2 [H]; ClampedSwiGLU b_gate, b_up [F], b_down [H]
  /// GLU experts, one expert only (a shared expert): scale each output row by
  /// sigmoid(x · w_output_gate), w_output_gate [1, 1, H] (Qwen2-MoE's shared_expert_gate).
  bool output_gate = false;
  /// false: no gradient buffers, half the memory of the weights (inference-only experts,
  /// e.g. the resident slots of memory/resident_experts.hpp); backward then throws.
  bool gradients = true;
};

namespace detail {
inline ExpertShape validated_expert_shape(const char* where, const ExpertShape& s) {
  require(s.experts >= 1, where, "experts", s.experts, "must be at least 1");
  require(s.hidden >= 1, where, "hidden", s.hidden, "must be at least 1");
  require(s.ffn >= 1, where, "ffn", s.ffn, "must be at least 1");
  require(!s.output_gate || s.experts == 1, where, "experts", s.experts,
          "must be 1 with output_gate (a gated shared expert)");
  // Each weight tensor holds E * F * H values; its bytes must be addressable too.
  const auto values = checked_mul(s.experts, s.ffn, s.hidden, where, "experts x ffn x hidden");
  checked_mul(values, std::int64_t(sizeof(double)), where, "weight bytes");
  return s;
}
/// Backward needs the gradient buffers an ExpertShape with gradients = false leaves out.
inline void require_gradients(const char* where, const ExpertShape& s) {
  require(s.gradients, where, "shape.gradients", "false",
          "these experts were built without gradient buffers (inference only)");
}

/// s[r] = sigmoid(x[r] · gate), and y[r] *= s[r] unless `y` is empty: the output gate's
/// forward (backward recomputes s alone when the forward released it).
template <class X, class Scalar>
void output_gate_forward(const ConstMatrix<Scalar, X>& x, const Tensor3<Scalar, X>& gate,
                         const Kokkos::View<Scalar*, typename X::memory_space>& s,
                         const Matrix<Scalar, X>& y) {
  const int hidden = int(x.extent(1));
  const bool scale = y.extent(0) != 0;
  Kokkos::parallel_for(
      "kmoe::GLUExperts::output_gate", Kokkos::RangePolicy<X>(0, int(s.extent(0))),
      KOKKOS_LAMBDA(int r) {
        using A = accumulation_t<Scalar>;
        A logit = 0;
        for (int h = 0; h < hidden; ++h) logit += A(x(r, h)) * A(gate(0, 0, h));
        const Scalar sr = Scalar(detail::sigmoid(logit));
        s(r) = sr;
        if (scale)
          for (int h = 0; h < hidden; ++h) y(r, h) = Scalar(A(y(r, h)) * A(sr));
      });
}

/// The output gate's backward for z = s · u (u the ungated rows): the gate logit's gradient
/// s(1 - s) (grad_z · u) per row into `grad_logit`, and grad_z scaled by s into `scaled`.
template <class X, class Scalar>
void output_gate_backward(const ConstMatrix<Scalar, X>& grad_z, const Matrix<Scalar, X>& u,
                          const Kokkos::View<Scalar*, typename X::memory_space>& s,
                          const Kokkos::View<Scalar*, typename X::memory_space>& grad_logit,
                          const Matrix<Scalar, X>& scaled) {
  const int hidden = int(u.extent(1));
  Kokkos::parallel_for(
      "kmoe::GLUExperts::output_gate_backward", Kokkos::RangePolicy<X>(0, int(s.extent(0))),
      KOKKOS_LAMBDA(int r) {
        using A = accumulation_t<Scalar>;
        const A sr = s(r);
        A dot = 0;
        for (int h = 0; h < hidden; ++h) {
          dot += A(grad_z(r, h)) * A(u(r, h));
          scaled(r, h) = Scalar(sr * A(grad_z(r, h)));
        }
        grad_logit(r) = Scalar(sr * (A(1) - sr) * dot);
      });
}

/// grad_gate += sum_r grad_logit[r] x[r] and grad_x[r] += grad_logit[r] gate.
template <class X, class Scalar>
void output_gate_input_gradients(const ConstMatrix<Scalar, X>& x, const Tensor3<Scalar, X>& gate,
                                 const Kokkos::View<Scalar*, typename X::memory_space>& grad_logit,
                                 const Tensor3<accumulation_t<Scalar>, X>& grad_gate,
                                 const Matrix<Scalar, X>& grad_x) {
  using A = accumulation_t<Scalar>;
  const int rows = int(grad_logit.extent(0)), hidden = int(x.extent(1));
  Kokkos::parallel_for(
      "kmoe::GLUExperts::output_gate_weight_gradient", Kokkos::RangePolicy<X>(0, hidden),
      KOKKOS_LAMBDA(int h) {
        A sum = 0;
        for (int r = 0; r < rows; ++r) sum += A(grad_logit(r)) * A(x(r, h));
        grad_gate(0, 0, h) += sum;
      });
  Kokkos::parallel_for(
      "kmoe::GLUExperts::output_gate_input_gradient", Kokkos::RangePolicy<X>(0, rows),
      KOKKOS_LAMBDA(int r) {
        for (int h = 0; h < hidden; ++h)
          grad_x(r, h) = Scalar(A(grad_x(r, h)) + A(grad_logit(r)) * A(gate(0, 0, h)));
      });
}

}  // namespace detail

/// \brief E gated experts with weights w_gate [E, F, H], w_up [E, F, H], w_down [E, H, F].
///
/// Scalar is the storage type of weights and activations; products, sums and the activation
/// are computed in accumulation_t<Scalar> (float for bf16 / fp16) and each stored value is
/// rounded once.
template <class ExecSpace, class ScalarOrPrecision, class Activation = activation::Silu,
          class Gemm = DefaultGemm>
class GLUExperts {
  using Scalar = storage_t<ScalarOrPrecision>;

 public:
  using execution_space = ExecSpace;
  using scalar_type = Scalar;
  using precision_type = precision_of_t<ScalarOrPrecision>;
  using activation_type = Activation;
  using A = accumulation_t<Scalar>;  ///< what products, sums and the activation run in

  explicit GLUExperts(const ExpertShape& shape, const std::string& name = "experts")
      : name_(name),
        shape_(validated(shape)),
        w_gate_(name + ".w_gate", shape.experts, shape.ffn, shape.hidden,
                ParameterRole::input_projection, 1, shape.gradients),
        w_up_(name + ".w_up", shape.experts, shape.ffn, shape.hidden,
              ParameterRole::input_projection, 1, shape.gradients),
        w_down_(name + ".w_down", shape.experts, shape.hidden, shape.ffn,
                ParameterRole::output_projection, 2, shape.gradients) {
    if (shape.output_gate) w_output_gate_ = {name + ".w_output_gate", 1, 1, shape.hidden};
  }

  /// The shape and name it was built with (a layer of another expert count builds its
  /// experts from them: placement/elastic.hpp).
  const ExpertShape& shape() const { return shape_; }
  const std::string& name() const { return name_; }
  int num_experts() const { return shape_.experts; }
  int hidden_size() const { return shape_.hidden; }
  int ffn_size() const { return shape_.ffn; }
  const StackedWeight<ExecSpace, Scalar>& w_gate() const { return w_gate_; }
  const StackedWeight<ExecSpace, Scalar>& w_up() const { return w_up_; }
  const StackedWeight<ExecSpace, Scalar>& w_down() const { return w_down_; }
  bool has_output_gate() const { return shape_.output_gate; }

  void forward(const ConstMatrix<Scalar, ExecSpace>& x, const Segments<ExecSpace>& segments,
               const Matrix<Scalar, ExecSpace>& y, ExpertMode mode) {
    project(x, segments);
    const auto gate = gate_, up = up_, hidden = hidden_;
    Kokkos::parallel_for(
        "kmoe::GLUExperts::activation",
        Kokkos::RangePolicy<ExecSpace>(0, std::size_t(segments.rows()) * shape_.ffn),
        KOKKOS_LAMBDA(std::size_t i) {
          hidden.data()[i] = Scalar(Activation::value(A(gate.data()[i])) * A(up.data()[i]));
        });
    gemm::segment_times_weight<Gemm>(segments, hidden_, w_down_.value, true, Scalar(1), Scalar(0),
                                     y);
    if (shape_.output_gate) {
      detail::ensure_extents(gate_value_, "kmoe::GLUExperts::output_gate_value",
                             std::size_t(segments.rows()));
      detail::output_gate_forward<ExecSpace, Scalar>(x, w_output_gate_.value, gate_value_, y);
    }
    if (mode == ExpertMode::recompute) release_saved();
  }

  void backward(const ConstMatrix<Scalar, ExecSpace>& x, const Segments<ExecSpace>& segments,
                const ConstMatrix<Scalar, ExecSpace>& grad_y,
                const Matrix<Scalar, ExecSpace>& grad_x) {
    detail::require_gradients("kmoe::GLUExperts::backward", shape_);
    if (gate_.extent(0) != std::size_t(segments.rows())) project(x, segments);
    const std::size_t elements = std::size_t(segments.rows()) * shape_.ffn;
    const auto gate = gate_, up = up_, hidden = hidden_;
    Kokkos::parallel_for(
        "kmoe::GLUExperts::recompute_hidden", Kokkos::RangePolicy<ExecSpace>(0, elements),
        KOKKOS_LAMBDA(std::size_t i) {
          hidden.data()[i] = Scalar(Activation::value(A(gate.data()[i])) * A(up.data()[i]));
        });
    // With the output gate, the rest of the backward sees dL/du = s · grad_y (u the ungated
    // output, recomputed from hidden; its saved gate values are recomputed with it).
    ConstMatrix<Scalar, ExecSpace> grad_u = grad_y;
    Kokkos::View<Scalar*, typename ExecSpace::memory_space> grad_logit;
    if (shape_.output_gate) {
      const std::size_t rows = std::size_t(segments.rows());
      Matrix<Scalar, ExecSpace> ungated("kmoe::GLUExperts::ungated", rows, shape_.hidden);
      gemm::segment_times_weight<Gemm>(segments, hidden_, w_down_.value, true, Scalar(1), Scalar(0),
                                       ungated);
      if (gate_value_.extent(0) != rows) {
        detail::ensure_extents(gate_value_, "kmoe::GLUExperts::output_gate_value", rows);
        detail::output_gate_forward<ExecSpace, Scalar>(x, w_output_gate_.value, gate_value_, {});
      }
      grad_logit = decltype(grad_logit)("kmoe::GLUExperts::output_gate_grad_logit", rows);
      Matrix<Scalar, ExecSpace> scaled("kmoe::GLUExperts::scaled_grad", rows, shape_.hidden);
      detail::output_gate_backward<ExecSpace, Scalar>(grad_y, ungated, gate_value_, grad_logit,
                                                      scaled);
      grad_u = scaled;
    }
    gemm::segment_weight_gradient<Gemm>(segments, grad_u, hidden_, w_down_.grad);
    // hidden_ now receives dL/dhidden; gate_ and up_ are overwritten by their gradients.
    gemm::segment_times_weight<Gemm>(segments, grad_u, w_down_.value, false, Scalar(1), Scalar(0),
                                     hidden_);
    Kokkos::parallel_for(
        "kmoe::GLUExperts::activation_backward", Kokkos::RangePolicy<ExecSpace>(0, elements),
        KOKKOS_LAMBDA(std::size_t i) {
          const A g = gate.data()[i], u = up.data()[i], dh = hidden.data()[i];
          gate.data()[i] = Scalar(dh * u * Activation::derivative(g));
          up.data()[i] = Scalar(dh * Activation::value(g));
        });
    gemm::segment_weight_gradient<Gemm>(segments, gate_, x, w_gate_.grad);
    gemm::segment_weight_gradient<Gemm>(segments, up_, x, w_up_.grad);
    gemm::segment_times_weight<Gemm>(segments, gate_, w_gate_.value, false, Scalar(1), Scalar(0),
                                     grad_x);
    gemm::segment_times_weight<Gemm>(segments, up_, w_up_.value, false, Scalar(1), Scalar(1),
                                     grad_x);
    if (shape_.output_gate)
      detail::output_gate_input_gradients<ExecSpace, Scalar>(x, w_output_gate_.value, grad_logit,
                                                             w_output_gate_.grad, grad_x);
  }

  /// Drops what forward kept for backward, so that the next backward recomputes it from
  /// its own x (the layer's pipelined backward runs one backward per chunk of experts).
  void release_saved() {
    gate_ = {};
    up_ = {};
    hidden_ = {};
    gate_value_ = {};
  }

  /// Bytes it holds between forward and backward (pre-activations and hidden rows; none
  /// after a forward under ExpertMode::recompute).
  std::size_t saved_bytes() const {
    return (gate_.span() + up_.span() + hidden_.span() + gate_value_.span()) * sizeof(Scalar);
  }

  void collect_parameters(ParameterList<ExecSpace, Scalar>& list) const {
    w_gate_.collect(list);
    w_up_.collect(list);
    w_down_.collect(list);
    if (shape_.output_gate) w_output_gate_.collect(list);
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

  std::string name_;
  ExpertShape shape_;
  StackedWeight<ExecSpace, Scalar> w_gate_, w_up_, w_down_;
  StackedWeight<ExecSpace, Scalar> w_output_gate_;  ///< [1, 1, H] with output_gate, else empty
  // Saved pre-activations (kept in store/inference mode) and the hidden workspace.
  Matrix<Scalar, ExecSpace> gate_, up_, hidden_;
  Kokkos::View<Scalar*, typename ExecSpace::memory_space> gate_value_;  ///< s per row (gate)
};

/// \brief SwiGLU experts (Mixtral, DeepSeek, Qwen).
template <class ExecSpace, class Scalar, class Gemm = DefaultGemm>
using SwiGLUExperts = GLUExperts<ExecSpace, Scalar, activation::Silu, Gemm>;
/// \brief GeGLU experts.
template <class ExecSpace, class Scalar, class Gemm = DefaultGemm>
using GeGLUExperts = GLUExperts<ExecSpace, Scalar, activation::GeluErf, Gemm>;

}  // namespace kmoe
