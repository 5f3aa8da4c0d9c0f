// SPDX-License-Identifier: BSD-3-Clause
// Must NOT compile: a router given a GEMM policy whose gemm() takes the wrong arguments.
// The ctest compile_fail_gemm_policy_without_gemm builds this target and passes only if the
// compiler prints kmoe's message naming the member.
#include <kmoe/kmoe.hpp>

using X = Kokkos::DefaultHostExecutionSpace;

struct GemmWithoutTransposeFlags {
  template <class A, class B, class C>
  static void gemm(const X&, const A&, const B&, const C&) {}
};

int main() {
  kmoe::SoftmaxTopKRouter<X, float, GemmWithoutTransposeFlags> router({8, 4, 1});
  return router.num_experts() == 4 ? 0 : 1;
}
