// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file grouped_gemm.hpp
/// \brief GEMMs over the contiguous per-expert segments of a permuted matrix, each with
/// its own expert's weight slice, through the GEMM backend policy.

#include <kmoe/segments.hpp>

#include <vector>

namespace kmoe::detail {

/// Mean rows per segment below which many segments run concurrently (see for_each_segment).
inline constexpr int concurrent_segment_rows = 1024;

template <class View>
auto rows_of(const View& m, int begin, int end) {
  return Kokkos::subview(m, Kokkos::make_pair(begin, end), Kokkos::ALL);
}

template <class View>
auto slice_of(const View& w, int e) {
  return Kokkos::subview(w, e, Kokkos::ALL, Kokkos::ALL);
}

/// Calls gemm_of(e) for every non-empty segment. Few large segments run one after another,
/// each GEMM using every thread; many small ones (DeepSeek-style fine-grained experts) run
/// concurrently on host spaces, one segment per thread, where a multithreaded BLAS call on
/// a few hundred rows would spend much of its time synchronising. A BLAS call made inside
/// the parallel region runs single-threaded (OpenBLAS' OpenMP build and Kokkos' nested
/// OpenMP dispatch both detect it), so the two forms do the same arithmetic.
template <class ExecSpace, class SegmentGemm>
void for_each_segment(const Segments<ExecSpace>& segments, const SegmentGemm& gemm_of) {
  std::vector<int> busy;
  for (int e = 0; e < segments.experts(); ++e)
    if (segments.end(e) > segments.begin(e)) busy.push_back(e);
  constexpr bool host = Kokkos::SpaceAccessibility<Kokkos::HostSpace,
                                                   typename ExecSpace::memory_space>::accessible;
  const int threads = ExecSpace().concurrency();
  const bool concurrent = host && threads > 1 && int(busy.size()) >= 4 * threads &&
                          segments.rows() / int(busy.size()) < concurrent_segment_rows;
  if constexpr (host) {
    if (concurrent) {
      Kokkos::parallel_for(
          "kmoe::grouped_gemm::concurrent",
          Kokkos::RangePolicy<ExecSpace, Kokkos::Schedule<Kokkos::Dynamic>>(0, busy.size()),
          [&](std::size_t i) { gemm_of(busy[i]); });
      return;
    }
  }
  for (int e : busy) gemm_of(e);
}

/// out[seg e] = alpha * in[seg e] * op(weight[e]) + beta * out[seg e] for every non-empty e;
/// op transposes when `transpose_weight` (weights stored [out, in] as torch.nn.Linear).
template <class Gemm, class ExecSpace, class In, class Weight, class Out>
void segment_times_weight(const Segments<ExecSpace>& segments, const In& in, const Weight& weight,
                          bool transpose_weight, typename Out::const_value_type alpha,
                          typename Out::const_value_type beta, const Out& out) {
  for_each_segment(segments, [&](int e) {
    const int b = segments.begin(e), n = segments.end(e) - b;
    Gemm::gemm(ExecSpace(), false, transpose_weight, alpha, rows_of(in, b, b + n),
               slice_of(weight, e), beta, rows_of(out, b, b + n));
  });
}

/// grad_weight[e] += left[seg e]^T * right[seg e] for every non-empty e: the weight
/// gradient of a per-expert linear map (left = output gradient, right = its input).
template <class Gemm, class ExecSpace, class Left, class Right, class GradWeight>
void segment_weight_gradient(const Segments<ExecSpace>& segments, const Left& left,
                             const Right& right, const GradWeight& grad_weight) {
  using Scalar = typename GradWeight::non_const_value_type;
  for_each_segment(segments, [&](int e) {
    const int b = segments.begin(e), n = segments.end(e) - b;
    Gemm::gemm(ExecSpace(), true, false, Scalar(1), rows_of(left, b, b + n),
               rows_of(right, b, b + n), Scalar(1), slice_of(grad_weight, e));
  });
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
