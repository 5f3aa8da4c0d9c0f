// SPDX-License-Identifier: BSD-3-Clause
// Must NOT compile: a router given float storage with double accumulation, which no policy
// computes in. The ctest compile_fail_precision_float_double_policy builds this target and
// passes only if the compiler prints kmoe's message naming the combination.
#include <kmoe/routers/softmax_topk.hpp>

int main() {
  using X = Kokkos::DefaultHostExecutionSpace;
  using FloatWithDoubleSums = kmoe::Precision<float, double>;
  return sizeof(kmoe::SoftmaxTopKRouter<X, FloatWithDoubleSums>::scalar_type) == 4 ? 0 : 1;
}
