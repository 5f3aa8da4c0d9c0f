// SPDX-License-Identifier: BSD-3-Clause
// Prints a bit-exact fingerprint of a forward and backward pass for several routers; the
// ctest `determinism_threads` runs it with 1 and 2 OpenMP threads and compares the lines.
#include <kmoe/kmoe.hpp>

#include <cinttypes>
#include <cstdio>
#include <cstring>

namespace {

template <class View>
std::uint64_t fingerprint(const View& v, std::uint64_t h) {
  auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  for (std::size_t i = 0; i < host.size(); ++i) {
    std::uint64_t bits = 0;
    std::memcpy(&bits, host.data() + i, sizeof(*host.data()));
    h = kmoe::detail::splitmix64(h ^ bits);
  }
  return h;
}

template <class Layer>
void probe(const char* name, Layer& layer, int tokens) {
  using X = typename Layer::execution_space;
  using S = typename Layer::scalar_type;
  kmoe::fill_normal(layer.parameters(), 0.05, 11);
  kmoe::Matrix<S, X> x("x", tokens, layer.hidden_size()), y("y", tokens, layer.hidden_size()),
      grad_x("grad_x", tokens, layer.hidden_size());
  kmoe::fill_normal(x, 1.0, 12);
  kmoe::RouteContext<X> context;
  context.training = true;
  const auto stats = layer.forward(x, y, context);
  layer.backward(y, grad_x);
  // Clipping reads the global norm, a reduction over every gradient, and rescales them.
  const double norm = kmoe::clip_grad_norm(layer.parameters(), 1e-3);
  std::uint64_t h = fingerprint(y, 0);
  h = fingerprint(grad_x, h);
  for (const auto& p : layer.parameters()) h = fingerprint(p.grad, h);
  std::printf("%s %016" PRIx64 " aux %.17g norm %.17g\n", name, h, stats.losses.total(), norm);
}

}  // namespace

int main(int argc, char** argv) {
  Kokkos::ScopeGuard kokkos(argc, argv);
  using X = Kokkos::DefaultExecutionSpace;
  kmoe::LayerOptions options;
  options.losses = {1e-2, 1e-4, 0, 1e-3};
  {
    using R = kmoe::SoftmaxTopKRouter<X, float>;
    using E = kmoe::SwiGLUExperts<X, float>;
    kmoe::MoELayer<R, E> layer(R({64, 8, 2, true}), E({8, 64, 96}), options);
    probe("softmax-swiglu-float", layer, 1031);
  }
  {
    using R = kmoe::SigmoidBiasRouter<X, double>;
    using E = kmoe::SwiGLUExperts<X, double>;
    options.capacity = {1.0, 0, kmoe::DropPolicy::by_probability, 4};
    kmoe::MoELayer<R, E> layer(R({32, 16, 4, true, 2.5, {4, 2, 2}}), E({16, 32, 24}), options,
                               E({1, 32, 48}, "shared_experts"));
    probe("deepseek-capacity-double", layer, 517);
  }
  {
    using R = kmoe::ExpertChoiceRouter<X, float>;
    using E = kmoe::FFNExperts<X, float, kmoe::activation::GeluErf>;
    kmoe::MoELayer<R, E> layer(R({32, 8, 2.0}), E({8, 32, 40, true}));
    probe("expert-choice-float", layer, 300);
  }
  return 0;
}
