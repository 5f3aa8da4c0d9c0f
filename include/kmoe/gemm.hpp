// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file gemm.hpp
/// \brief Who multiplies the router and expert matrices: the GEMM policy role
/// (gemm/policy.hpp, with its check), the per-expert segmented GEMMs every expert policy
/// uses (gemm/segmented.hpp), and the default policy, kmoe::gemm::KokkosKernels
/// (backends/kokkos_kernels: Kokkos Kernels is a dependency of the core for it).

#include <kmoe/gemm/kokkos_kernels.hpp>
#include <kmoe/gemm/policy.hpp>
#include <kmoe/gemm/segmented.hpp>

namespace kmoe {

/// \brief GEMM backend used when a router or expert is not given one.
using DefaultGemm = gemm::KokkosKernels;
static_assert(check_valid_gemm<DefaultGemm, Kokkos::DefaultExecutionSpace, float>());

}  // namespace kmoe
