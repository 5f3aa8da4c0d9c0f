// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file types.hpp
/// \brief View aliases shared by every policy, and the routing precision rule.

#include <kmoe/detail/checked.hpp>
#include <kmoe/precision.hpp>

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <string>
#include <type_traits>

namespace kmoe {

/// \brief Row-major [rows, cols] matrix in the memory space of `ExecSpace`. Every activation,
/// weight slice and routing table in kmoe is row-major, so a row (token) is contiguous.
template <class T, class ExecSpace>
using Matrix = Kokkos::View<T**, Kokkos::LayoutRight, typename ExecSpace::memory_space>;

/// \brief Read-only row-major matrix.
template <class T, class ExecSpace>
using ConstMatrix = Kokkos::View<const T**, Kokkos::LayoutRight, typename ExecSpace::memory_space>;

/// \brief Row-major [n0, n1, n2] tensor (stacked per-expert weights).
template <class T, class ExecSpace>
using Tensor3 = Kokkos::View<T***, Kokkos::LayoutRight, typename ExecSpace::memory_space>;

/// \brief Contiguous vector in the memory space of `ExecSpace`.
template <class T, class ExecSpace>
using Vector = Kokkos::View<T*, typename ExecSpace::memory_space>;

/// \brief Precision in which routing decisions (softmax, sigmoid, top-k, losses) are made:
/// docs/semantics.md asks for fp32 or wider whatever the storage type, so float and double route in
/// their own type and anything narrower routes in float.
template <class Scalar>
using routing_t = std::conditional_t<(sizeof(Scalar) < sizeof(float)), float, Scalar>;

/// \brief Scalars the shipped policies are instantiated for: float and double, and the 16-bit
/// storage types kmoe::bfloat16 and kmoe::float16, which accumulate in accumulation_t (float).
template <class Scalar>
inline constexpr bool is_supported_scalar_v =
    std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double> || is_packed_float_v<Scalar>;

namespace detail {

/// Kokkos 3.4 computes some allocation sizes in 32 bits: a view of 2 x 65536 x 32768 (or
/// any element count that is a multiple of 2^32) gets a 0-byte buffer without complaint.
/// Every buffer kmoe sizes from input is checked to hold what was asked for.
template <class View>
void require_allocated(const View& view, const char* label, std::int64_t elements) {
  if (std::int64_t(view.span()) != elements)
    throw invalid_argument(label, "extents", std::to_string(elements) + " elements",
                           "the installed Kokkos allocated " + std::to_string(view.span()) +
                               " (Kokkos 3.4 wraps element counts that are multiples of 2^32)");
}

/// Reallocates `view` only when its extents differ, so that a layer called repeatedly with
/// the same batch shape allocates nothing after the first call.
template <class View>
void ensure_extents(View& view, const char* label, std::size_t n0, std::size_t n1 = 0,
                    std::size_t n2 = 0) {
  constexpr unsigned rank = View::rank;
  // A default-constructed view has an empty label, so the first call always allocates.
  bool same = view.label() == label && view.extent(0) == n0;
  if constexpr (rank >= 2) same = same && view.extent(1) == n1;
  if constexpr (rank >= 3) same = same && view.extent(2) == n2;
  if (same) return;
  // The element count and its bytes must fit: a wrapped product would allocate a small
  // buffer that later writes run past.
  const std::int64_t elements = checked_mul(std::int64_t(n0), std::int64_t(rank >= 2 ? n1 : 1),
                                            std::int64_t(rank >= 3 ? n2 : 1), label, "extents");
  checked_mul(elements, std::int64_t(sizeof(typename View::value_type)), label, "bytes");
  if constexpr (rank == 1)
    view = View(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string(label)), n0);
  if constexpr (rank == 2)
    view = View(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string(label)), n0, n1);
  if constexpr (rank == 3)
    view = View(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string(label)), n0, n1, n2);
  require_allocated(view, label, elements);
}

}  // namespace detail
}  // namespace kmoe
