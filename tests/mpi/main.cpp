// SPDX-License-Identifier: BSD-3-Clause
// MPI test main: MPI outlives Kokkos, which outlives the Catch2 session, so that every
// communicator and view a test leaves behind is released while both are still up.
#include <Kokkos_Core.hpp>
#include <catch2/catch_session.hpp>
#include <mpi.h>

int main(int argc, char* argv[]) {
  MPI_Init(&argc, &argv);
  int result = 0;
  {
    Kokkos::ScopeGuard kokkos(argc, argv);
    result = Catch::Session().run(argc, argv);
  }
  // mpiexec reports the worst exit status, so one failing rank fails the test.
  MPI_Finalize();
  return result;
}
