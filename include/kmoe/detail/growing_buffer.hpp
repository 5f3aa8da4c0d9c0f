// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file detail/growing_buffer.hpp
/// \brief Buffers kept across steps: a view of the first rows of a buffer that only grows,
/// so that a step whose row counts differ from the last one's allocates nothing (the
/// exchange's rows change with the routing every step), and ensure_extents returning the
/// view it sized.

#include <kmoe/types.hpp>

#include <cstddef>
#include <string>

namespace kmoe::detail {

/// ensure_extents(view, ...), then the view itself (for host staging tables).
template <class View>
View& ensure_view(View& view, const char* label, std::size_t n0, std::size_t n1 = 0) {
  ensure_extents(view, label, n0, n1);
  return view;
}

/// Rows [0, rows) of `buffer` in `view`, for a buffer of at least `rows` rows of `width`
/// elements: a larger one (an eighth more, so that the next slightly larger step fits) is
/// allocated only when it has fewer rows or another width.
template <class T, class Layout, class Space>
void ensure_rows(Kokkos::View<T**, Layout, Space>& view, Kokkos::View<T**, Layout, Space>& buffer,
                 const char* label, std::int64_t rows, std::int64_t width) {
  if (buffer.extent(1) != std::size_t(width) || buffer.extent(0) < std::size_t(rows) ||
      buffer.label() != label)
    ensure_extents(buffer, label, std::size_t(rows + rows / 8), std::size_t(width));
  view = Kokkos::subview(buffer, Kokkos::make_pair(std::int64_t(0), rows), Kokkos::ALL);
}

/// Elements [0, n) of a growing rank-1 `buffer` in `view`.
template <class T, class Space>
void ensure_rows(Kokkos::View<T*, Space>& view, Kokkos::View<T*, Space>& buffer, const char* label,
                 std::int64_t n) {
  if (buffer.extent(0) < std::size_t(n) || buffer.label() != label)
    ensure_extents(buffer, label, std::size_t(n + n / 8));
  view = Kokkos::subview(buffer, Kokkos::make_pair(std::int64_t(0), n));
}

/// Room for `n` elements in a growing rank-1 `buffer` whose first `kept` elements are kept
/// (a receive buffer filling block by block): a larger one, an eighth more, only when too
/// small.
template <class T, class Space>
void grow_keeping(Kokkos::View<T*, Space>& buffer, const char* label, std::int64_t n,
                  std::int64_t kept) {
  if (buffer.extent(0) >= std::size_t(n) && buffer.label() == label) return;
  Kokkos::View<T*, Space> larger(
      Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string(label)), std::size_t(n + n / 8));
  if (kept > 0)
    Kokkos::deep_copy(Kokkos::subview(larger, Kokkos::make_pair(std::int64_t(0), kept)),
                      Kokkos::subview(buffer, Kokkos::make_pair(std::int64_t(0), kept)));
  buffer = larger;
}

}  // namespace kmoe::detail
