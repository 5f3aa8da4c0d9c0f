// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file grouped_gemm.hpp
/// \brief GEMMs over the contiguous per-expert segments of a permuted matrix, each with
/// its own expert's weight slice, through the GEMM backend policy.

#include <kmoe/segments.hpp>

namespace kmoe::detail {

template <class View>
auto rows_of(const View& m, int begin, int end) {
  return Kokkos::subview(m, Kokkos::make_pair(begin, end), Kokkos::ALL);
}

template <class View>
auto slice_of(const View& w, int e) {
  return Kokkos::subview(w, e, Kokkos::ALL, Kokkos::ALL);
}

/// out[seg e] = alpha * in[seg e] * op(weight[e]) + beta * out[seg e] for every non-empty e;
/// op transposes when `transpose_weight` (weights stored [out, in] as torch.nn.Linear).
template <class Gemm, class ExecSpace, class In, class Weight, class Out>
void segment_times_weight(const Segments<ExecSpace>& segments, const In& in, const Weight& weight,
                          bool transpose_weight, typename Out::const_value_type alpha,
                          typename Out::const_value_type beta, const Out& out) {
  for (int e = 0; e < segments.experts(); ++e) {
    const int b = segments.begin(e), n = segments.end(e) - b;
    if (n == 0) continue;
    Gemm::gemm(ExecSpace(), false, transpose_weight, alpha, rows_of(in, b, b + n),
               slice_of(weight, e), beta, rows_of(out, b, b + n));
  }
}

/// grad_weight[e] += left[seg e]^T * right[seg e] for every non-empty e: the weight
/// gradient of a per-expert linear map (left = output gradient, right = its input).
template <class Gemm, class ExecSpace, class Left, class Right, class GradWeight>
void segment_weight_gradient(const Segments<ExecSpace>& segments, const Left& left,
                             const Right& right, const GradWeight& grad_weight) {
  using Scalar = typename GradWeight::non_const_value_type;
  for (int e = 0; e < segments.experts(); ++e) {
    const int b = segments.begin(e), n = segments.end(e) - b;
    if (n == 0) continue;
    Gemm::gemm(ExecSpace(), true, false, Scalar(1), rows_of(left, b, b + n),
               rows_of(right, b, b + n), Scalar(1), slice_of(grad_weight, e));
  }
}

/// grad_bias(e, j) += sum over rows r of segment e of grad(r, j), in row order.
template <class ExecSpace, class Grad, class GradBias>
void segment_bias_gradient(const Segments<ExecSpace>& segments, const Grad& grad,
                           const GradBias& grad_bias) {
  const int experts = segments.experts(), width = int(grad.extent(1));
  const auto offsets = segments.offsets;
  Kokkos::parallel_for(
      "kmoe::segment_bias_gradient",
      Kokkos::MDRangePolicy<ExecSpace, Kokkos::Rank<2>>({0, 0}, {experts, width}),
      KOKKOS_LAMBDA(int e, int j) {
        typename GradBias::non_const_value_type sum = 0;
        for (int r = offsets(e); r < offsets(e + 1); ++r) sum += grad(r, j);
        grad_bias(e, j) += sum;
      });
}

}  // namespace kmoe::detail
