// SPDX-License-Identifier: BSD-3-Clause
// Must NOT compile: training (the layer's backward) with bf16 weight-only experts. The ctest
// compile_fail_packed_experts_training builds this target and passes only if the compiler
// prints kmoe's message naming the combination.
#include <kmoe/kmoe.hpp>
#include <kmoe/quantized_layer.hpp>

using X = Kokkos::DefaultHostExecutionSpace;

int main() {
  using R = kmoe::SoftmaxTopKRouter<X, float>;
  using E = kmoe::SwiGLUExperts<X, float>;
  kmoe::MoELayer<R, E> layer(R({8, 4, 2, true}), E({4, 8, 6}));
  auto quantized = kmoe::weight_only_layer<kmoe::bfloat16>(layer);
  kmoe::Matrix<float, X> x("x", 2, 8), grad("grad", 2, 8);
  quantized.forward(x, x);
  quantized.backward(grad, grad);
  return 0;
}
