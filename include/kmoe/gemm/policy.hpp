// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file policy.hpp
/// \brief The GEMM policy role and its compile-time check.
///
/// A GEMM policy G computes the row-major C = alpha op(A) op(B) + beta C on rank-2
/// LayoutRight views of an execution space's memory:
///  - `static void gemm(const ExecSpace& space, bool transpose_a, bool transpose_b,
///    alpha, const A& a, const B& b, beta, const C& c)` (required; on `space`'s instance);
/// Optional members, used where present (detected):
///  - `static void gemm_on_calling_thread(...)`, same arguments: the same product with the
///    same bits on the calling host thread, launching no Kokkos kernel, so that many small
///    expert GEMMs may run at once inside one kernel (gemm/segmented.hpp);
///  - `static void segment_times_weight(space, segments, in, weight, transpose_weight,
///    alpha, beta, out)` and `static void segment_weight_gradient(space, segments, left,
///    right, grad_weight)`: a grouped form of the per-expert GEMMs of gemm/segmented.hpp
///    (one call for every expert, e.g. cuBLAS grouped batched or CUTLASS grouped, with the
///    segment offsets on the device in `segments.offsets` and on the host in
///    `segments.offsets_host`); without them the segments run as a loop over `gemm`.
/// `kmoe::check_valid_gemm<G, ExecSpace, Scalar>()` asserts each rule with its own message.
/// The shipped policy is kmoe::gemm::KokkosKernels (backends/kokkos_kernels).

#include <kmoe/detail/detect.hpp>
#include <kmoe/types.hpp>

#include <type_traits>

namespace kmoe {
namespace detail {

template <class G, class X, class S>
using gemm_call = decltype(G::gemm(
    std::declval<const X&>(), false, false, S(1), std::declval<const ConstMatrix<S, X>&>(),
    std::declval<const ConstMatrix<S, X>&>(), S(0), std::declval<const Matrix<S, X>&>()));

}  // namespace detail

/// \brief Compile-time check that G is a GEMM policy for (ExecSpace, Scalar).
template <class G, class ExecSpace, class Scalar>
constexpr bool check_valid_gemm() {
  static_assert(std::is_class_v<G>, "kmoe GEMM policy: must be a class type with static members");
  static_assert(detail::is_detected_v<detail::gemm_call, G, ExecSpace, Scalar>,
                "kmoe GEMM policy: missing 'static void gemm(const ExecSpace& space, bool "
                "transpose_a, bool transpose_b, Scalar alpha, A a, B b, Scalar beta, C c)' for "
                "row-major rank-2 views of the execution space");
  return true;
}

}  // namespace kmoe
