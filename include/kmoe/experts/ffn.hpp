// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file ffn.hpp
/// \brief Plain FFN experts y = act(x W1^T + b1) W2^T + b2 with optional biases
/// (Switch, GShard, DeepSpeed-MoE experts).

#include <kmoe/activation.hpp>
#include <kmoe/error.hpp>
#include <kmoe/experts/expert_mode.hpp>
#include <kmoe/experts/glu.hpp>
#include <kmoe/gemm.hpp>
#include <kmoe/gemm/segmented.hpp>

namespace kmoe {

namespace detail {
/// out(r, :) += bias(owner(r), :) for the first `rows` rows. A free function because nvcc
/// rejects KOKKOS_LAMBDA in a private member function.
template <class ExecSpace, class Owner, class Bias, class Out>
void add_row_bias(const Owner& owner, const Bias& bias, int rows, const Out& out) {
  Kokkos::parallel_for(
      "kmoe::FFNExperts::add_bias",
      Kokkos::MDRangePolicy<ExecSpace, Kokkos::Rank<2>>({0, 0}, {std::int64_t(rows),
                                                                 std::int64_t(out.extent(1))}),
      KOKKOS_LAMBDA(std::int64_t r, std::int64_t j) { out(r, j) += bias(owner(r), j); });
}
}  // namespace detail

/// \brief E FFN experts with w1 [E, F, H], w2 [E, H, F] and, if shape.bias, b1 [E, F], b2 [E, H].
/// As GLUExperts, Scalar is the storage type and arithmetic runs in accumulation_t<Scalar>;
/// with 16-bit storage a bias is added to the rounded GEMM output (a second rounding).
template <class ExecSpace, class ScalarOrPrecision, class Activation = activation::GeluErf,
          class Gemm = DefaultGemm>
class FFNExperts {
  using Scalar = storage_t<ScalarOrPrecision>;

 public:
  using execution_space = ExecSpace;
  using scalar_type = Scalar;
  using precision_type = precision_of_t<ScalarOrPrecision>;
  using activation_type = Activation;
  using A = accumulation_t<Scalar>;  ///< what products, sums and the activation run in

  explicit FFNExperts(const ExpertShape& shape, const std::string& name = "experts")
      : name_(name),
        shape_(detail::validated_expert_shape("kmoe::FFNExperts", shape)),
        w1_(name + ".w1", shape.experts, shape.ffn, shape.hidden, ParameterRole::input_projection,
            1, shape.gradients),
        w2_(name + ".w2", shape.experts, shape.hidden, shape.ffn, ParameterRole::output_projection,
            2, shape.gradients),
        b1_(name + ".b1", shape.experts, shape.ffn, shape.bias, 1, shape.gradients),
        b2_(name + ".b2", shape.experts, shape.hidden, shape.bias, -1, shape.gradients) {}

  /// The shape and name it was built with (a layer of another expert count builds its
  /// experts from them: placement/elastic.hpp).
  const ExpertShape& shape() const { return shape_; }
  const std::string& name() const { return name_; }
  int num_experts() const { return shape_.experts; }
  int hidden_size() const { return shape_.hidden; }
  int ffn_size() const { return shape_.ffn; }
  const StackedWeight<ExecSpace, Scalar>& w1() const { return w1_; }
  const StackedWeight<ExecSpace, Scalar>& w2() const { return w2_; }
  const StackedBias<ExecSpace, Scalar>& b1() const { return b1_; }
  const StackedBias<ExecSpace, Scalar>& b2() const { return b2_; }

  /// Tensor parallelism (the layer calls these): the expert outputs of the F shards are
  /// summed across the TP group, and b2, not split over F, is held whole by every TP rank,
  /// so only one rank may add it. Its gradient is the full one on every rank either way.
  void apply_output_bias(bool apply) { apply_output_bias_ = apply; }
  /// The parameters that are not split over F (b2): replicas across the TP group.
  void collect_unsplit_parameters(ParameterList<ExecSpace, Scalar>& list) const {
    b2_.collect(list);
  }

  void forward(const ConstMatrix<Scalar, ExecSpace>& x, const Segments<ExecSpace>& segments,
               const Matrix<Scalar, ExecSpace>& y, ExpertMode mode) {
    project(x, segments);
    const auto pre = pre_, hidden = hidden_;
    Kokkos::parallel_for(
        "kmoe::FFNExperts::activation",
        Kokkos::RangePolicy<ExecSpace>(0, std::size_t(segments.rows()) * shape_.ffn),
        KOKKOS_LAMBDA(std::size_t i) {
          hidden.data()[i] = Scalar(Activation::value(A(pre.data()[i])));
        });
    gemm::segment_times_weight<Gemm>(segments, hidden_, w2_.value, true, Scalar(1), Scalar(0), y);
    if (apply_output_bias_) add_bias(segments, b2_, y);
    if (mode == ExpertMode::recompute) release_saved();
  }

  void backward(const ConstMatrix<Scalar, ExecSpace>& x, const Segments<ExecSpace>& segments,
                const ConstMatrix<Scalar, ExecSpace>& grad_y,
                const Matrix<Scalar, ExecSpace>& grad_x) {
    detail::require_gradients("kmoe::FFNExperts::backward", shape_);
    if (pre_.extent(0) != std::size_t(segments.rows())) project(x, segments);
    const std::size_t elements = std::size_t(segments.rows()) * shape_.ffn;
    const auto pre = pre_, hidden = hidden_;
    Kokkos::parallel_for(
        "kmoe::FFNExperts::recompute_hidden", Kokkos::RangePolicy<ExecSpace>(0, elements),
        KOKKOS_LAMBDA(std::size_t i) {
          hidden.data()[i] = Scalar(Activation::value(A(pre.data()[i])));
        });
    gemm::segment_weight_gradient<Gemm>(segments, grad_y, hidden_, w2_.grad);
    if (b2_.enabled()) gemm::segment_bias_gradient(segments, grad_y, b2_.grad);
    gemm::segment_times_weight<Gemm>(segments, grad_y, w2_.value, false, Scalar(1), Scalar(0),
                                     hidden_);
    Kokkos::parallel_for(
        "kmoe::FFNExperts::activation_backward", Kokkos::RangePolicy<ExecSpace>(0, elements),
        KOKKOS_LAMBDA(std::size_t i) {
          pre.data()[i] = Scalar(A(hidden.data()[i]) * Activation::derivative(A(pre.data()[i])));
        });
    gemm::segment_weight_gradient<Gemm>(segments, pre_, x, w1_.grad);
    if (b1_.enabled()) gemm::segment_bias_gradient(segments, pre_, b1_.grad);
    gemm::segment_times_weight<Gemm>(segments, pre_, w1_.value, false, Scalar(1), Scalar(0),
                                     grad_x);
  }

  /// Drops what forward kept for backward, so that the next backward recomputes it from
  /// its own x (the layer's pipelined backward runs one backward per chunk of experts).
  void release_saved() {
    pre_ = {};
    hidden_ = {};
  }

  /// Bytes it holds between forward and backward (pre-activation and hidden rows; none
  /// after a forward under ExpertMode::recompute).
  std::size_t saved_bytes() const { return (pre_.span() + hidden_.span()) * sizeof(Scalar); }

  void collect_parameters(ParameterList<ExecSpace, Scalar>& list) const {
    w1_.collect(list);
    b1_.collect(list);
    w2_.collect(list);
    b2_.collect(list);
  }

 private:
  void project(const ConstMatrix<Scalar, ExecSpace>& x, const Segments<ExecSpace>& segments) {
    const std::size_t rows = std::size_t(segments.rows());
    detail::ensure_extents(pre_, "kmoe::FFNExperts::pre", rows, shape_.ffn);
    detail::ensure_extents(hidden_, "kmoe::FFNExperts::hidden", rows, shape_.ffn);
    gemm::segment_times_weight<Gemm>(segments, x, w1_.value, true, Scalar(1), Scalar(0), pre_);
    add_bias(segments, b1_, pre_);
  }

  static void add_bias(const Segments<ExecSpace>& segments,
                       const StackedBias<ExecSpace, Scalar>& bias,
                       const Matrix<Scalar, ExecSpace>& out) {
    if (!bias.enabled()) return;
    detail::add_row_bias<ExecSpace>(segments.expert_of_row, bias.value, segments.rows(), out);
  }

  std::string name_;
  ExpertShape shape_;
  StackedWeight<ExecSpace, Scalar> w1_, w2_;
  StackedBias<ExecSpace, Scalar> b1_, b2_;
  bool apply_output_bias_ = true;
  // Saved pre-activation (kept in store/inference mode) and the hidden workspace.
  Matrix<Scalar, ExecSpace> pre_, hidden_;
};

}  // namespace kmoe
