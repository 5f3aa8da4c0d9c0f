// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file expert_mode.hpp
/// \brief What an expert keeps between forward and backward.

#include <kmoe/parameters.hpp>
#include <kmoe/types.hpp>

#include <string>

namespace kmoe {

/// \brief Memory/time trade-off of an expert's forward pass.
enum class ExpertMode {
  inference,  ///< no backward follows; workspace is kept for reuse across calls
  store,      ///< keep the pre-activations [rows, F] for backward (fastest backward)
  recompute   ///< free them after forward and recompute them in backward (one more
              ///< GEMM per projection, no [rows, F] buffers held between the passes)
};

/// \brief A stacked per-expert weight [E, out, in] (torch.nn.Linear layout) with its gradient
/// (in the accumulation type: float for 16-bit storage).
template <class ExecSpace, class Scalar>
struct StackedWeight {
  Tensor3<Scalar, ExecSpace> value;
  Tensor3<accumulation_t<Scalar>, ExecSpace> grad;
  std::string name;
  ParameterRole role = ParameterRole::other;
  int ffn_axis = -1;  ///< 1 when `out` is F (H -> F projections), 2 when `in` is F

  StackedWeight() = default;
  /// `gradient` false: no gradient buffer (inference-only experts; `grad` stays empty).
  StackedWeight(const std::string& n, int experts, int out, int in,
                ParameterRole r = ParameterRole::other, int f_axis = -1, bool gradient = true)
      : value(Kokkos::view_alloc(n), experts, out, in),
        grad(Kokkos::view_alloc(n + ".grad"), gradient ? experts : 0, out, in),
        name(n),
        role(r),
        ffn_axis(f_axis) {
    const std::int64_t elements = std::int64_t(experts) * out * in;
    detail::require_allocated(value, "kmoe::StackedWeight", elements);
    detail::require_allocated(grad, "kmoe::StackedWeight", gradient ? elements : 0);
  }
  void collect(ParameterList<ExecSpace, Scalar>& list) const {
    list.push_back(make_parameter<ExecSpace>(name, value, grad, role, 0, ffn_axis));
  }
};

/// \brief A stacked per-expert bias [E, n] with its gradient; empty when disabled.
template <class ExecSpace, class Scalar>
struct StackedBias {
  Matrix<Scalar, ExecSpace> value;
  Matrix<accumulation_t<Scalar>, ExecSpace> grad;
  std::string name;
  int ffn_axis = -1;  ///< 1 when the width is F (b1); -1 when it is H (b2, whole on every TP rank)

  StackedBias() = default;
  StackedBias(const std::string& n, int experts, int width, bool enabled, int f_axis = -1,
              bool gradient = true)
      : value(Kokkos::view_alloc(n), enabled ? experts : 0, width),
        grad(Kokkos::view_alloc(n + ".grad"), enabled && gradient ? experts : 0, width),
        name(n),
        ffn_axis(f_axis) {}
  bool enabled() const { return value.extent(0) > 0; }
  void collect(ParameterList<ExecSpace, Scalar>& list) const {
    if (enabled())
      list.push_back(
          make_parameter<ExecSpace>(name, value, grad, ParameterRole::bias, 0, ffn_axis));
  }
};

}  // namespace kmoe
