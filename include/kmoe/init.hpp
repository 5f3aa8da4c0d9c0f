// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file init.hpp
/// \brief Deterministic parameter initialisation: the same values on every backend, thread
/// count and rank, because each element's value depends only on (seed, index).

#include <kmoe/detail/math.hpp>
#include <kmoe/parameters.hpp>

namespace kmoe {

/// \brief Fills a contiguous view with N(0, stddev^2) samples keyed by (seed, element index).
template <class View>
void fill_normal(const View& view, double stddev, std::uint64_t seed) {
  using Scalar = typename View::non_const_value_type;
  using ExecSpace = typename View::execution_space;
  auto* data = view.data();
  Kokkos::parallel_for(
      "kmoe::fill_normal", Kokkos::RangePolicy<ExecSpace>(0, view.size()),
      KOKKOS_LAMBDA(std::size_t i) {
        data[i] = Scalar(stddev * detail::counter_normal<double>(seed, i, 0x6b6d6f65, 0));
      });
}

/// \brief Initialises every parameter of a list with N(0, stddev^2), one seed per tensor.
template <class ExecSpace, class Scalar>
void fill_normal(const ParameterList<ExecSpace, Scalar>& list, double stddev, std::uint64_t seed) {
  for (std::size_t i = 0; i < list.size(); ++i)
    fill_normal(list[i].value, stddev, detail::splitmix64(seed + i));
}

}  // namespace kmoe
