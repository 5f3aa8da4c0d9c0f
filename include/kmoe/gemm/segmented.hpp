// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file segmented.hpp
/// \brief GEMMs over the contiguous per-expert segments of a permuted matrix, each with
/// its own expert's weight slice, through a GEMM policy (gemm/policy.hpp): the interface an
/// expert policy, shipped or user-written, computes its projections with.
///
/// A policy that supplies a grouped form (`G::segment_times_weight`,
/// `G::segment_weight_gradient`, detected) gets every segment in one call; otherwise the
/// segments run as a loop over `G::gemm`, concurrently on host spaces when they are many
/// and small and G can compute on the calling thread (for_each_segment below).
///
/// Operands stored in 16 bits (kmoe::bfloat16, kmoe::float16) take the widened path of
/// gemm/widened.hpp: the activations are widened once, each busy expert's weight slice is
/// widened into a float panel, the policy multiplies float panels, and a 16-bit output is
/// rounded once per value; weight gradients are kept in the accumulation type (float). A
/// policy that multiplies 16-bit operands itself (multiplies_sixteen_bit: gemm::CublasMixed
/// on CUDA) gets each segment unwidened instead.

#include <kmoe/gemm/policy.hpp>
#include <kmoe/gemm/widened.hpp>
#include <kmoe/segments.hpp>

#include <type_traits>
#include <utility>
#include <vector>

namespace kmoe::gemm {
namespace detail {

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

/// Whether the GEMM policy offers gemm_on_calling_thread (same arguments as gemm): the
/// product computed on the calling host thread without launching a Kokkos kernel, the only
/// form that may run inside the kernel that spreads segments over threads.
template <class Gemm, class ExecSpace, class A, class B, class C, class = void>
struct has_calling_thread_gemm : std::false_type {};
template <class Gemm, class ExecSpace, class A, class B, class C>
struct has_calling_thread_gemm<
    Gemm, ExecSpace, A, B, C,
    std::void_t<decltype(Gemm::gemm_on_calling_thread(
        ExecSpace(), false, false, std::declval<typename C::const_value_type>(),
        std::declval<const A&>(), std::declval<const B&>(),
        std::declval<typename C::const_value_type>(), std::declval<const C&>()))>>
    : std::true_type {};

/// Calls gemm_of(e, on_calling_thread) for every non-empty segment. Few large segments run
/// one after another (on_calling_thread = false), each GEMM using every thread; many small
/// ones (DeepSeek-style fine-grained experts) run concurrently on host spaces, one segment
/// per thread, where a multithreaded BLAS call on a few hundred rows would spend much of
/// its time synchronising. Inside that kernel each GEMM must launch no kernel of its own
/// (on_calling_thread = true), which `CallingThreadForm` says the GEMM policy can do; it
/// does the same arithmetic as the dispatched form, so both give the same bits.
template <class ExecSpace, bool CallingThreadForm, class SegmentGemm>
void for_each_segment(const Segments<ExecSpace>& segments, const SegmentGemm& gemm_of) {
  std::vector<int> busy;
  for (int e = 0; e < segments.experts(); ++e)
    if (segments.end(e) > segments.begin(e)) busy.push_back(e);
  constexpr bool host =
      Kokkos::SpaceAccessibility<Kokkos::HostSpace, typename ExecSpace::memory_space>::accessible;
  if constexpr (host && CallingThreadForm) {
    const int threads = ExecSpace().concurrency();
    const bool concurrent = threads > 1 && int(busy.size()) >= 4 * threads &&
                            segments.rows() / int(busy.size()) < concurrent_segment_rows;
    if (concurrent) {
      Kokkos::parallel_for(
          "kmoe::gemm::segments_concurrent",
          Kokkos::RangePolicy<ExecSpace, Kokkos::Schedule<Kokkos::Dynamic>>(0, busy.size()),
          [&](std::size_t i) { gemm_of(busy[i], std::true_type{}); });
      return;
    }
  }
  for (int e : busy) gemm_of(e, std::false_type{});
}

/// One segment's GEMM in the form for_each_segment asks for.
template <class Gemm, class ExecSpace, bool OnCallingThread, class A, class B, class C>
void segment_gemm(std::integral_constant<bool, OnCallingThread>, bool transpose_a, bool transpose_b,
                  typename C::const_value_type alpha, const A& a, const B& b,
                  typename C::const_value_type beta, const C& c) {
  if constexpr (OnCallingThread)
    Gemm::gemm_on_calling_thread(ExecSpace(), transpose_a, transpose_b, alpha, a, b, beta, c);
  else
    Gemm::gemm(ExecSpace(), transpose_a, transpose_b, alpha, a, b, beta, c);
}

template <class G, class X, class In, class Weight, class Out>
using grouped_times_weight = decltype(G::segment_times_weight(
    std::declval<const X&>(), std::declval<const Segments<X>&>(), std::declval<const In&>(),
    std::declval<const Weight&>(), false, std::declval<typename Out::const_value_type>(),
    std::declval<typename Out::const_value_type>(), std::declval<const Out&>()));
template <class G, class X, class Left, class Right, class GradWeight>
using grouped_weight_gradient = decltype(G::segment_weight_gradient(
    std::declval<const X&>(), std::declval<const Segments<X>&>(), std::declval<const Left&>(),
    std::declval<const Right&>(), std::declval<const GradWeight&>()));

/// segment_times_weight with some operand in 16 bits: the input is widened once, each busy
/// expert's weight slice into one reused float panel, and a 16-bit output is written back
/// once, rounded, after every segment's product.
template <class Gemm, class ExecSpace, class In, class Weight, class Out>
void widened_segment_times_weight(const Segments<ExecSpace>& segments, const In& in,
                                  const Weight& weight, bool transpose_weight,
                                  typename Out::const_value_type alpha,
                                  typename Out::const_value_type beta, const Out& out) {
  using Accumulation = accumulation_t<value_of<Out>>;
  static_assert(check_valid_gemm<Gemm, ExecSpace, Accumulation>());
  Matrix<Accumulation, ExecSpace> in_panel, weight_panel, out_panel;
  const auto in_wide = as_accumulation<ExecSpace>(in, in_panel, "kmoe::gemm::widened_in");
  Matrix<Accumulation, ExecSpace> out_wide;
  if constexpr (std::is_same_v<value_of<Out>, Accumulation>) {
    out_wide = Matrix<Accumulation, ExecSpace>(out.data(), out.extent(0), out.extent(1));
  } else {
    kmoe::detail::ensure_extents(out_panel, "kmoe::gemm::widened_out", out.extent(0),
                                 out.extent(1));
    // The old values are read where beta != 0, and rows outside every segment keep theirs.
    if (float(beta) != 0 || std::size_t(segments.rows()) < out.extent(0))
      convert_matrix<ExecSpace>(out, out_panel);
    out_wide = out_panel;
  }
  const Accumulation alpha_wide = Accumulation(float(alpha)), beta_wide = Accumulation(float(beta));
  for_each_segment<ExecSpace, false>(segments, [&](int e, auto) {
    const int b = segments.begin(e), n = segments.end(e) - b;
    const auto slice =
        as_accumulation<ExecSpace>(slice_of(weight, e), weight_panel, "kmoe::gemm::widened_weight");
    Gemm::gemm(ExecSpace(), false, transpose_weight, alpha_wide, rows_of(in_wide, b, b + n), slice,
               beta_wide, rows_of(out_wide, b, b + n));
  });
  if constexpr (!std::is_same_v<value_of<Out>, Accumulation>)
    convert_matrix<ExecSpace>(out_panel, out);
}

/// segment_times_weight with every operand of one type.
template <class Gemm, class ExecSpace, class In, class Weight, class Out>
void uniform_segment_times_weight(const Segments<ExecSpace>& segments, const In& in,
                                  const Weight& weight, bool transpose_weight,
                                  typename Out::const_value_type alpha,
                                  typename Out::const_value_type beta, const Out& out) {
  static_assert(check_valid_gemm<Gemm, ExecSpace, typename Out::non_const_value_type>());
  if constexpr (kmoe::detail::is_detected_v<grouped_times_weight, Gemm, ExecSpace, In, Weight,
                                            Out>) {
    Gemm::segment_times_weight(ExecSpace(), segments, in, weight, transpose_weight, alpha, beta,
                               out);
    return;
  }
  using Rows = decltype(rows_of(in, 0, 0));
  using Slice = decltype(slice_of(weight, 0));
  using OutRows = decltype(rows_of(out, 0, 0));
  constexpr bool calling_thread_form =
      has_calling_thread_gemm<Gemm, ExecSpace, Rows, Slice, OutRows>::value;
  for_each_segment<ExecSpace, calling_thread_form>(segments, [&](int e, auto on_calling_thread) {
    const int b = segments.begin(e), n = segments.end(e) - b;
    segment_gemm<Gemm, ExecSpace>(on_calling_thread, false, transpose_weight, alpha,
                                  rows_of(in, b, b + n), slice_of(weight, e), beta,
                                  rows_of(out, b, b + n));
  });
}

}  // namespace detail

/// out[seg e] = alpha * in[seg e] * op(weight[e]) + beta * out[seg e] for every non-empty e;
/// op transposes when `transpose_weight` (weights stored [out, in] as torch.nn.Linear).
template <class Gemm, class ExecSpace, class In, class Weight, class Out>
void segment_times_weight(const Segments<ExecSpace>& segments, const In& in, const Weight& weight,
                          bool transpose_weight, typename Out::const_value_type alpha,
                          typename Out::const_value_type beta, const Out& out) {
  using namespace detail;
  if constexpr (gemm_multiplies_sixteen_bit<Gemm, ExecSpace, value_of<In>, value_of<Weight>,
                                            value_of<Out>>::value) {
    // The policy multiplies 16-bit operands itself (cuBLAS bf16 GEMMs on CUDA): no panels.
    for_each_segment<ExecSpace, false>(segments, [&](int e, auto) {
      const int b = segments.begin(e), n = segments.end(e) - b;
      Gemm::gemm_sixteen_bit(ExecSpace(), false, transpose_weight, float(alpha),
                             rows_of(in, b, b + n), slice_of(weight, e), float(beta),
                             rows_of(out, b, b + n));
    });
  } else if constexpr (widened_operands_v<In, Weight, Out>) {
    widened_segment_times_weight<Gemm>(segments, in, weight, transpose_weight, alpha, beta, out);
  } else {
    uniform_segment_times_weight<Gemm>(segments, in, weight, transpose_weight, alpha, beta, out);
  }
}

namespace detail {
/// segment_weight_gradient with every operand of one type.
template <class Gemm, class ExecSpace, class Left, class Right, class GradWeight>
void uniform_segment_weight_gradient(const Segments<ExecSpace>& segments, const Left& left,
                                     const Right& right, const GradWeight& grad_weight) {
  using Scalar = typename GradWeight::non_const_value_type;
  if constexpr (kmoe::detail::is_detected_v<grouped_weight_gradient, Gemm, ExecSpace, Left, Right,
                                            GradWeight>) {
    Gemm::segment_weight_gradient(ExecSpace(), segments, left, right, grad_weight);
    return;
  }
  using LeftRows = decltype(rows_of(left, 0, 0));
  using RightRows = decltype(rows_of(right, 0, 0));
  using Slice = decltype(slice_of(grad_weight, 0));
  constexpr bool calling_thread_form =
      has_calling_thread_gemm<Gemm, ExecSpace, LeftRows, RightRows, Slice>::value;
  for_each_segment<ExecSpace, calling_thread_form>(segments, [&](int e, auto on_calling_thread) {
    const int b = segments.begin(e), n = segments.end(e) - b;
    segment_gemm<Gemm, ExecSpace>(on_calling_thread, true, false, Scalar(1),
                                  rows_of(left, b, b + n), rows_of(right, b, b + n), Scalar(1),
                                  slice_of(grad_weight, e));
  });
}
}  // namespace detail

/// grad_weight[e] += left[seg e]^T * right[seg e] for every non-empty e: the weight
/// gradient of a per-expert linear map (left = output gradient, right = its input).
template <class Gemm, class ExecSpace, class Left, class Right, class GradWeight>
void segment_weight_gradient(const Segments<ExecSpace>& segments, const Left& left,
                             const Right& right, const GradWeight& grad_weight) {
  using Scalar = typename GradWeight::non_const_value_type;
  static_assert(check_valid_gemm<Gemm, ExecSpace, Scalar>());
  using namespace detail;
  if constexpr (widened_operands_v<Left, Right, GradWeight>) {
    // 16-bit activations; the gradient is kept in the accumulation type.
    static_assert(std::is_same_v<Scalar, accumulation_t<value_of<Left>>>,
                  "kmoe::gemm::segment_weight_gradient: gradients of 16-bit weights are kept in "
                  "their accumulation type (float)");
    if constexpr (gemm_multiplies_sixteen_bit<Gemm, ExecSpace, value_of<Left>, value_of<Right>,
                                              Scalar>::value) {
      // The policy multiplies them itself (cuBLAS bf16 GEMMs on CUDA).
      for_each_segment<ExecSpace, false>(segments, [&](int e, auto) {
        const int b = segments.begin(e), n = segments.end(e) - b;
        Gemm::gemm_sixteen_bit(ExecSpace(), true, false, 1.0f, rows_of(left, b, b + n),
                               rows_of(right, b, b + n), 1.0f, slice_of(grad_weight, e));
      });
      return;
    }
    // Else widened once each.
    Matrix<Scalar, ExecSpace> left_panel, right_panel;
    const auto left_wide = as_accumulation<ExecSpace>(left, left_panel, "kmoe::gemm::widened_left");
    const auto right_wide =
        as_accumulation<ExecSpace>(right, right_panel, "kmoe::gemm::widened_right");
    segment_weight_gradient<Gemm>(segments, left_wide, right_wide, grad_weight);
  } else {
    uniform_segment_weight_gradient<Gemm>(segments, left, right, grad_weight);
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

}  // namespace kmoe::gemm
