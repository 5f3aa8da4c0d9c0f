// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file exchange/input_weighting.hpp
/// \brief The rows of RoutingWeightPlacement::input (layer_options.hpp): each kept
/// assignment (t, s) sends w_{t,s} * x_t to its expert, and backward returns, from the
/// expert's input gradient g of that row, grad_x_t += w_{t,s} * g and grad_w_{t,s} = <g, x_t>.
/// Free functions, not members: nvcc rejects an extended __host__ __device__ lambda
/// (KOKKOS_LAMBDA) whose enclosing function is private.

#include <kmoe/types.hpp>

#include <cstdint>

namespace kmoe::detail {

/// send(r) = w(t, s) * x(t) for the assignment source(r) = t * slots + s of each send row.
template <class X, class In, class Source, class Weight, class Out>
void gather_weighted_rows(const In& x, const Source& source, const Weight& weight,
                          const Out& send) {
  using S = typename Out::non_const_value_type;
  const int slots = int(weight.extent(1));
  Kokkos::parallel_for(
      "kmoe::MoELayer::gather_weighted",
      Kokkos::MDRangePolicy<X, Kokkos::Rank<2>>({0, 0}, {std::int64_t(send.extent(0)),
                                                         std::int64_t(send.extent(1))}),
      KOKKOS_LAMBDA(std::int64_t r, std::int64_t h) {
        const int t = source(r) / slots, s = source(r) % slots;
        send(r, h) = S(weight(t, s)) * x(t, h);
      });
}

/// The backward of gather_weighted_rows from the input gradient of each kept assignment's
/// row (rows(position(t, s))): grad_x(t) = sum over t's kept slots, in slot order, of
/// w(t, s) * rows(position(t, s)), and grad_weight(t, s) = <rows(position(t, s)), x(t)>
/// (0 for an empty or dropped slot). Both overwrite their outputs.
template <class X, class Position, class Weight, class Rows, class In, class GradX, class GradW>
void scatter_add_weighted_rows(const Position& position, const Weight& weight, const Rows& rows,
                               const In& x, const GradX& grad_x, const GradW& grad_weight) {
  using S = typename GradX::non_const_value_type;
  using R = typename GradW::non_const_value_type;
  const int tokens = int(grad_x.extent(0)), width = int(grad_x.extent(1));
  const int slots = int(position.extent(1));
  Kokkos::parallel_for(
      "kmoe::MoELayer::scatter_add_weighted",
      Kokkos::MDRangePolicy<X, Kokkos::Rank<2>>({0, 0}, {tokens, width}),
      KOKKOS_LAMBDA(int t, int h) {
        S sum = 0;
        for (int s = 0; s < slots; ++s)
          if (position(t, s) >= 0) sum += S(weight(t, s)) * rows(position(t, s), h);
        grad_x(t, h) = sum;
      });
  Kokkos::parallel_for(
      "kmoe::MoELayer::input_weight_gradient",
      Kokkos::MDRangePolicy<X, Kokkos::Rank<2>>({0, 0}, {tokens, slots}),
      KOKKOS_LAMBDA(int t, int s) {
        const int row = position(t, s);
        R dot = 0;
        if (row >= 0)
          for (int h = 0; h < width; ++h) dot += R(rows(row, h) * x(t, h));
        grad_weight(t, s) = dot;
      });
}

}  // namespace kmoe::detail
