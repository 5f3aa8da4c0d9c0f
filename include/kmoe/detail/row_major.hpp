// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file row_major.hpp
/// \brief Accepting any rank-2 view at the layer's boundary: kmoe computes on row-major
/// contiguous matrices, so a strided or column-major argument is used in place when its
/// strides are row-major anyway and copied otherwise. Assigning such a view to a
/// LayoutRight view directly would end in Kokkos::abort, which takes the host program down.

#include <kmoe/types.hpp>

#include <type_traits>

namespace kmoe::detail {

/// True when `a` and `b` share memory (empty views share none).
template <class A, class B>
bool overlaps(const A& a, const B& b) {
  if (a.span() == 0 || b.span() == 0) return false;
  const auto* a_begin = reinterpret_cast<const char*>(a.data());
  const auto* b_begin = reinterpret_cast<const char*>(b.data());
  const auto* a_end = a_begin + a.span() * sizeof(typename A::value_type);
  const auto* b_end = b_begin + b.span() * sizeof(typename B::value_type);
  return a_begin < b_end && b_begin < a_end;
}

/// True when element (i, j) of `v` sits at data() + i * extent(1) + j.
template <class View>
bool is_row_major_contiguous(const View& v) {
  return (v.extent(1) <= 1 || v.stride(1) == 1) && (v.extent(0) <= 1 || v.stride(0) == v.extent(1));
}

/// Compile-time rules for a view passed to the layer: rank 2, scalar S, memory of X.
template <class View, class S, class X>
constexpr bool check_layer_view() {
  static_assert(Kokkos::is_view<View>::value, "kmoe::MoELayer: arguments must be Kokkos views");
  static_assert(unsigned(View::rank) == 2u,
                "kmoe::MoELayer: arguments must be rank-2 views [T, H]");
  static_assert(std::is_same_v<std::remove_const_t<typename View::value_type>, S>,
                "kmoe::MoELayer: a view's value type must be the layer's scalar_type");
  static_assert(std::is_same_v<typename View::memory_space, typename X::memory_space>,
                "kmoe::MoELayer: a view must live in the layer's execution-space memory");
  return true;
}

/// `v` as a row-major matrix: itself when its strides are row-major (whatever its layout
/// type says: a LayoutRight subview of some columns is strided), otherwise a copy in
/// `buffer` (allocated on first use, labelled `label`).
template <class S, class X, class View>
ConstMatrix<S, X> row_major_input(const View& v, Matrix<S, X>& buffer, const char* label) {
  if (is_row_major_contiguous(v))
    return Kokkos::View<const S**, Kokkos::LayoutRight, typename X::memory_space,
                        Kokkos::MemoryTraits<Kokkos::Unmanaged>>(v.data(), v.extent(0),
                                                                 v.extent(1));
  ensure_extents(buffer, label, v.extent(0), v.extent(1));
  Kokkos::deep_copy(buffer, v);
  return buffer;
}

/// Where the layer writes an output that belongs in `v`: `v` itself when it is row-major,
/// otherwise `buffer`; `copy_back` says whether the result must then be copied into `v`.
template <class S, class X, class View>
Matrix<S, X> row_major_output(const View& v, Matrix<S, X>& buffer, const char* label,
                              bool& copy_back) {
  copy_back = !is_row_major_contiguous(v);
  if (!copy_back)
    return Kokkos::View<S**, Kokkos::LayoutRight, typename X::memory_space,
                        Kokkos::MemoryTraits<Kokkos::Unmanaged>>(v.data(), v.extent(0),
                                                                 v.extent(1));
  ensure_extents(buffer, label, v.extent(0), v.extent(1));
  return buffer;
}

}  // namespace kmoe::detail
