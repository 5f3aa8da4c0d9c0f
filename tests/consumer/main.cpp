// SPDX-License-Identifier: BSD-3-Clause
#include <kmoe/kmoe.hpp>

#include <cstdio>

int main(int argc, char** argv) {
  Kokkos::ScopeGuard kokkos(argc, argv);
  using X = Kokkos::DefaultExecutionSpace;
  using Layer = kmoe::MoELayer<kmoe::SoftmaxTopKRouter<X, float>, kmoe::SwiGLUExperts<X, float>>;
  Layer layer(kmoe::SoftmaxTopKRouter<X, float>({16, 4, 2, true}),
              kmoe::SwiGLUExperts<X, float>({4, 16, 8}));
  kmoe::fill_normal(layer.parameters(), 0.1, 1);
  kmoe::Matrix<float, X> x("x", 9, 16), y("y", 9, 16);
  kmoe::fill_normal(x, 1.0, 2);
  const auto stats = layer.forward(x, y);
  std::printf("consumer ok: %lld assignments\n", static_cast<long long>(stats.assignments));
  return stats.assignments == 18 ? 0 : 1;
}
