// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file gemm.hpp
/// \brief The GEMM backend role: who multiplies the router and expert matrices.
///
/// A GEMM policy is a type with a static member function
/// `gemm(space, transpose_a, transpose_b, alpha, A, B, beta, C)` computing the row-major
/// C = alpha op(A) op(B) + beta C on rank-2 LayoutRight views of the execution space.
/// It may also offer `gemm_on_calling_thread(...)` (same arguments): the same product on
/// the calling host thread, launching no Kokkos kernel, which lets many small expert GEMMs
/// run at once inside one kernel (experts/grouped_gemm.hpp). The shipped one is kmoe::gemm::KokkosKernels (backends/kokkos_kernels).

#include <kmoe/gemm/kokkos_kernels.hpp>

namespace kmoe {

/// \brief GEMM backend used when a router or expert is not given one.
using DefaultGemm = gemm::KokkosKernels;

}  // namespace kmoe
