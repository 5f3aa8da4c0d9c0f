// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file kokkos_kernels.hpp
/// \brief GEMM backend that sends every expert and router GEMM to KokkosBlas::gemm, which
/// reaches the vendor BLAS (OpenBLAS on host, cuBLAS on CUDA) through Kokkos Kernels' TPLs.

#include <kmoe/error.hpp>
#include <kmoe/types.hpp>

#include <KokkosBlas3_gemm.hpp>

#include <string>

namespace kmoe::gemm {

/// \brief GEMM policy: row-major C = alpha * op(A) * op(B) + beta * C via Kokkos Kernels.
///
/// kmoe stores everything row-major (a token is a contiguous row), while the BLAS TPLs of
/// Kokkos Kernels are specialised for column-major views. A row-major matrix is the
/// column-major view of its transpose, so C = op(A) op(B) is computed as
/// C^T = op(B)^T op(A)^T on column-major aliases of the same memory: no copy, and the
/// vendor fast path is chosen at compile time by Kokkos Kernels.
struct KokkosKernels {
  static constexpr const char* name = "kokkos-kernels";

  template <class ExecSpace, class AView, class BView, class CView>
  static void gemm(const ExecSpace& /*space*/, bool transpose_a, bool transpose_b,
                   typename CView::const_value_type alpha, const AView& a, const BView& b,
                   typename CView::const_value_type beta, const CView& c) {
    using Scalar = typename CView::non_const_value_type;
    using Memory = typename ExecSpace::memory_space;
    using Device = Kokkos::Device<ExecSpace, Memory>;
    using ColMajor = Kokkos::View<Scalar**, Kokkos::LayoutLeft, Device,
                                  Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
    using ConstColMajor = Kokkos::View<const Scalar**, Kokkos::LayoutLeft, Device,
                                       Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
    const std::size_t m = c.extent(0), n = c.extent(1);
    const std::size_t k = transpose_a ? a.extent(0) : a.extent(1);
    require((transpose_a ? a.extent(1) : a.extent(0)) == m, "kmoe::gemm::KokkosKernels::gemm",
            "A rows", (transpose_a ? a.extent(1) : a.extent(0)), "must equal rows of C");
    require((transpose_b ? b.extent(1) : b.extent(0)) == k, "kmoe::gemm::KokkosKernels::gemm",
            "B rows", (transpose_b ? b.extent(1) : b.extent(0)),
            "must equal the inner dimension of op(A)");
    require((transpose_b ? b.extent(0) : b.extent(1)) == n, "kmoe::gemm::KokkosKernels::gemm",
            "B columns", (transpose_b ? b.extent(0) : b.extent(1)), "must equal columns of C");
    if (m == 0 || n == 0) return;
    require(a.span_is_contiguous() && b.span_is_contiguous() && c.span_is_contiguous(),
            "kmoe::gemm::KokkosKernels::gemm", "operand layout", "strided",
            "operands must be contiguous row-major blocks");
    const ConstColMajor a_t(a.data(), a.extent(1), a.extent(0));
    const ConstColMajor b_t(b.data(), b.extent(1), b.extent(0));
    const ColMajor c_t(c.data(), n, m);
    if (k == 0) {
      // An empty inner dimension leaves C = beta * C; beta = 0 overwrites, as BLAS does.
      Scalar* c_data = c.data();
      Kokkos::parallel_for(
          "kmoe::gemm::scale", Kokkos::RangePolicy<ExecSpace>(0, m * n),
          KOKKOS_LAMBDA(std::size_t i) { c_data[i] = beta == Scalar(0) ? Scalar(0) : c_data[i] * beta; });
      return;
    }
    KokkosBlas::gemm(transpose_b ? "T" : "N", transpose_a ? "T" : "N", alpha, b_t, a_t, beta,
                     c_t);
  }
};

}  // namespace kmoe::gemm
