// SPDX-License-Identifier: BSD-3-Clause
// Must NOT compile: a GEMM mixing bf16 storage (which accumulates in float) with a double
// result. The ctest compile_fail_low_precision_double_mix builds this target and passes
// only if the compiler prints kmoe's message naming the combination.
#include <kmoe/gemm.hpp>
#include <kmoe/gemm/widened.hpp>

int main(int argc, char** argv) {
  Kokkos::ScopeGuard kokkos(argc, argv);
  using X = Kokkos::DefaultHostExecutionSpace;
  kmoe::Matrix<kmoe::bfloat16, X> a("a", 2, 2), b("b", 2, 2);
  kmoe::Matrix<double, X> c("c", 2, 2);
  kmoe::gemm::multiply<kmoe::DefaultGemm>(X(), false, false, 1.0, a, b, 0.0, c);
  return 0;
}
