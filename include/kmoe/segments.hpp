// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file segments.hpp
/// \brief Rows of a permuted activation matrix grouped into contiguous per-expert segments.

#include <kmoe/types.hpp>

namespace kmoe {

/// \brief Expert e owns rows [offsets[e], offsets[e+1]) of the permuted matrices.
///
/// The host copy drives the per-segment GEMM launches (sizes must be known on the host);
/// the device copies serve kernels.
template <class ExecSpace>
struct Segments {
  Kokkos::View<int*, Kokkos::HostSpace> offsets_host;  ///< [E + 1]
  Vector<int, ExecSpace> offsets;                      ///< [E + 1]
  Vector<int, ExecSpace> expert_of_row;                ///< [rows] local expert of each row

  int experts() const { return offsets_host.extent(0) == 0 ? 0 : int(offsets_host.extent(0)) - 1; }
  int rows() const { return experts() == 0 ? 0 : offsets_host(experts()); }
  int begin(int e) const { return offsets_host(e); }
  int end(int e) const { return offsets_host(e + 1); }

  /// Rebuilds the device copies and the row -> expert map from offsets_host.
  void sync_from_host() {
    const int n = experts();
    detail::ensure_extents(offsets, "kmoe::Segments::offsets", std::size_t(n + 1));
    Kokkos::deep_copy(offsets, offsets_host);
    detail::ensure_extents(expert_of_row, "kmoe::Segments::expert_of_row", std::size_t(rows()));
    const auto off = offsets;
    const auto owner = expert_of_row;
    Kokkos::parallel_for(
        "kmoe::Segments::expert_of_row", Kokkos::RangePolicy<ExecSpace>(0, n),
        KOKKOS_LAMBDA(int e) {
          for (int r = off(e); r < off(e + 1); ++r) owner(r) = e;
        });
  }

  /// One segment holding all `rows` rows (a dense expert applied to every token).
  static Segments single(int rows) {
    Segments s;
    s.offsets_host = Kokkos::View<int*, Kokkos::HostSpace>("kmoe::Segments::offsets_host", 2);
    s.offsets_host(1) = rows;
    s.sync_from_host();
    return s;
  }
};

}  // namespace kmoe
