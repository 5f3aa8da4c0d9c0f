// SPDX-License-Identifier: BSD-3-Clause
#pragma once
// A step across ranks ends when its slowest rank ends: the MPI benchmarks report that rank's
// time (and, for sizes, the largest rank's).
#include <kmoe/communicators/mpi.hpp>

#include <Kokkos_Core.hpp>

namespace kmoe::bench {

/// The largest of the ranks' `mine`, on every rank.
inline double largest_over_ranks(const MpiCommunicator& world, double mine) {
  Kokkos::View<double*, Kokkos::HostSpace> value("value", 1);
  value(0) = mine;
  world.all_reduce_max(value);
  return value(0);
}

}  // namespace kmoe::bench
