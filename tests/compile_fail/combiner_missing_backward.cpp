// SPDX-License-Identifier: BSD-3-Clause
// Must NOT compile: a user combiner without backward(). The ctest
// compile_fail_combiner_missing_backward builds this target and passes only if the compiler
// prints kmoe's message naming the member.
#include <kmoe/kmoe.hpp>

using X = Kokkos::DefaultHostExecutionSpace;
using S = float;

struct CombinerWithoutBackward {
  using execution_space = X;
  using scalar_type = S;
  void combine(const kmoe::ConstMatrix<S, X>&, const kmoe::ConstMatrix<int, X>&,
               const kmoe::ConstMatrix<kmoe::routing_t<S>, X>&, const kmoe::ConstMatrix<S, X>&,
               const kmoe::Matrix<S, X>&) const {}
};

int main() {
  kmoe::MoELayer<kmoe::SoftmaxTopKRouter<X, S>, kmoe::SwiGLUExperts<X, S>, CombinerWithoutBackward>
      layer(kmoe::SoftmaxTopKRouter<X, S>({8, 4, 1}), kmoe::SwiGLUExperts<X, S>({4, 8, 8}));
  return 0;
}
