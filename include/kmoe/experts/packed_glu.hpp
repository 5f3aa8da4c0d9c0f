// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file packed_glu.hpp
/// \brief PackedGLUExperts: GLU experts (SwiGLU, GeGLU) with weight-only INT8, bf16 or fp16
/// weights for inference, packed from a float GLUExperts (gemm/packed_weight.hpp), their
/// products in gemm/packed_product.hpp (the gate and up projections and the activation in
/// one streaming pass at decode).
///
/// Activations, the activation function and the accumulation stay in Scalar; only the three
/// projection weights are packed (a quarter (INT8) or half (16-bit) of fp32's bytes, which is
/// what decode streams).
/// A shared expert's output gate (Qwen2-MoE), a vector, stays in Scalar. The experts hold no
/// trainable parameters and refuse training at compile time: calling the layer's backward
/// on them does not compile.

#include <kmoe/experts/glu.hpp>
#include <kmoe/gemm/packed_product.hpp>

#include <type_traits>

namespace kmoe {

template <class ExecSpace, class ScalarOrPrecision, class Element,
          class Activation = activation::Silu, class Gemm = DefaultGemm>
class PackedGLUExperts {
  using Scalar = storage_t<ScalarOrPrecision>;

 public:
  using execution_space = ExecSpace;
  using scalar_type = Scalar;
  using precision_type = precision_of_t<ScalarOrPrecision>;
  using activation_type = Activation;
  using element_type = Element;

  /// Packs `experts`' three projections (the float experts are not kept).
  explicit PackedGLUExperts(const GLUExperts<ExecSpace, Scalar, Activation, Gemm>& experts)
      : name_(experts.name()),
        shape_(experts.shape()),
        w_gate_(pack_weight<Element, ExecSpace, Scalar>(experts.w_gate().value, name_ + ".w_gate")),
        w_up_(pack_weight<Element, ExecSpace, Scalar>(experts.w_up().value, name_ + ".w_up")),
        w_down_(
            pack_weight<Element, ExecSpace, Scalar>(experts.w_down().value, name_ + ".w_down")) {
    if (shape_.output_gate) keep_output_gate(experts);
  }

  /// Packs `experts` experts one at a time: `fill(e, one)` writes expert e's weights into
  /// `one`, float experts of a single expert, which is packed into slot e before the next is
  /// filled; only one expert is ever held in float (models/hf_weight_only.hpp fills it from
  /// a checkpoint). `one`'s output gate, if any, is kept (a shared expert: experts == 1).
  template <class FillExpert>
  PackedGLUExperts(GLUExperts<ExecSpace, Scalar, Activation, Gemm> one, int experts,
                   FillExpert&& fill)
      : name_(one.name()), shape_(one.shape()) {
    require(one.num_experts() == 1, "kmoe::PackedGLUExperts", "one.num_experts()",
            one.num_experts(), "must be 1 (the experts are packed one at a time)");
    require(experts >= 1, "kmoe::PackedGLUExperts", "experts", experts, "must be >= 1");
    require(!one.shape().output_gate || experts == 1, "kmoe::PackedGLUExperts", "experts", experts,
            "an output gate belongs to a single (shared) expert");
    shape_.experts = experts;
    for (int e = 0; e < experts; ++e) {
      fill(e, one);
      place_expert(w_gate_, e,
                   pack_weight<Element, ExecSpace, Scalar>(one.w_gate().value, name_ + ".w_gate"));
      place_expert(w_up_, e,
                   pack_weight<Element, ExecSpace, Scalar>(one.w_up().value, name_ + ".w_up"));
      place_expert(w_down_, e,
                   pack_weight<Element, ExecSpace, Scalar>(one.w_down().value, name_ + ".w_down"));
    }
    if (shape_.output_gate) keep_output_gate(one);
  }

  const ExpertShape& shape() const { return shape_; }
  const std::string& name() const { return name_; }
  int num_experts() const { return shape_.experts; }
  int hidden_size() const { return shape_.hidden; }
  int ffn_size() const { return shape_.ffn; }
  const PackedWeight<ExecSpace, Element>& w_gate() const { return w_gate_; }
  const PackedWeight<ExecSpace, Element>& w_up() const { return w_up_; }
  const PackedWeight<ExecSpace, Element>& w_down() const { return w_down_; }
  /// Bytes of the packed weights (and INT8's scales) and of the output gate: what
  /// ForwardStats::memory reports as expert weights (memory_accounting.hpp).
  std::size_t resident_bytes() const {
    return w_gate_.bytes() + w_up_.bytes() + w_down_.bytes() +
           w_output_gate_.size() * sizeof(Scalar);
  }

  void forward(const ConstMatrix<Scalar, ExecSpace>& x, const Segments<ExecSpace>& segments,
               const Matrix<Scalar, ExecSpace>& y, ExpertMode) {
    const std::size_t rows = std::size_t(segments.rows());
    detail::ensure_extents(gate_, "kmoe::PackedGLUExperts::gate", rows, shape_.ffn);
    detail::ensure_extents(up_, "kmoe::PackedGLUExperts::up", rows, shape_.ffn);
    segment_glu_packed<Activation, Gemm>(segments, x, w_gate_, w_up_, gate_, up_, workspace_);
    segment_times_packed_weight<Gemm>(segments, gate_, w_down_, y, workspace_);
    if (shape_.output_gate) {
      detail::ensure_extents(gate_value_, "kmoe::PackedGLUExperts::output_gate_value", rows);
      detail::output_gate_forward<ExecSpace, Scalar>(x, w_output_gate_, gate_value_, y);
    }
  }

  /// Present for the Expert role's check; instantiating it (training) fails to compile.
  template <class Training = void>
  void backward(const ConstMatrix<Scalar, ExecSpace>&, const Segments<ExecSpace>&,
                const ConstMatrix<Scalar, ExecSpace>&, const Matrix<Scalar, ExecSpace>&) {
    static_assert(!std::is_void_v<Training> && std::is_void_v<Training>,
                  "kmoe::PackedGLUExperts: weight-only experts are inference only; training with "
                  "INT8, bf16 or fp16 expert weights is not supported (train the float experts, "
                  "pack them for inference)");
  }

  /// No trainable parameters: the packed weights are a copy.
  void collect_parameters(ParameterList<ExecSpace, Scalar>&) const {}

 private:
  /// Copies the output gate [1, 1, H] (the last parameter `experts` collects).
  void keep_output_gate(const GLUExperts<ExecSpace, Scalar, Activation, Gemm>& experts) {
    ParameterList<ExecSpace, Scalar> list;
    experts.collect_parameters(list);
    w_output_gate_ = Tensor3<Scalar, ExecSpace>(name_ + ".w_output_gate", 1, 1, shape_.hidden);
    Kokkos::deep_copy(Kokkos::subview(w_output_gate_, 0, 0, Kokkos::ALL), list.back().value);
  }

  /// Copies the single expert `one` into slot e of `all`, allocating `all` for
  /// shape_.experts experts of one's shape on slot 0.
  void place_expert(PackedWeight<ExecSpace, Element>& all, int e,
                    const PackedWeight<ExecSpace, Element>& one) const {
    const std::size_t outputs = one.values.extent(1), inputs = one.values.extent(2);
    if (e == 0) {
      all.values =
          decltype(all.values)(Kokkos::view_alloc(Kokkos::WithoutInitializing, one.values.label()),
                               shape_.experts, outputs, inputs);
      if constexpr (PackedWeight<ExecSpace, Element>::scaled)
        all.scales = decltype(all.scales)(one.scales.label(), shape_.experts, outputs);
    }
    Kokkos::deep_copy(Kokkos::subview(all.values, e, Kokkos::ALL, Kokkos::ALL),
                      Kokkos::subview(one.values, 0, Kokkos::ALL, Kokkos::ALL));
    if constexpr (PackedWeight<ExecSpace, Element>::scaled)
      Kokkos::deep_copy(Kokkos::subview(all.scales, e, Kokkos::ALL),
                        Kokkos::subview(one.scales, 0, Kokkos::ALL));
  }

  std::string name_;
  ExpertShape shape_;
  PackedWeight<ExecSpace, Element> w_gate_, w_up_, w_down_;
  Tensor3<Scalar, ExecSpace> w_output_gate_;  ///< [1, 1, H] with output_gate, else empty
  Matrix<Scalar, ExecSpace> gate_, up_;       ///< the hidden (gate_), up's projection (panel path)
  PackedProductWorkspace<ExecSpace, Scalar> workspace_;
  Kokkos::View<Scalar*, typename ExecSpace::memory_space> gate_value_;
};

/// \brief INT8 GLU experts (per-output-channel scales).
template <class ExecSpace, class Scalar, class Activation = activation::Silu,
          class Gemm = DefaultGemm>
using Int8GLUExperts = PackedGLUExperts<ExecSpace, Scalar, std::int8_t, Activation, Gemm>;

}  // namespace kmoe
