// SPDX-License-Identifier: BSD-3-Clause
// A Mixtral-shaped MoE layer (softmax top-2 of 8 SwiGLU experts, renormalised) with random
// weights, run on one batch: prints routing statistics, an output checksum and the time.
//
//   mixtral_layer [--tokens T] [--hidden H] [--ffn F] [--experts E] [--top-k K] [--repeats N]
// Defaults are Mixtral 8x7B's routing with a quarter of its width (H=1024, F=3584) so that
// the layer's weights (8 x 3 x H x F floats, 352 MB) fit any laptop.
#include <kmoe/kmoe.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

int parse_int(int argc, char** argv, const char* flag, int fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], flag) == 0) {
      const int value = std::atoi(argv[i + 1]);
      if (value <= 0) {
        std::fprintf(stderr, "mixtral_layer: invalid %s = %s (must be a positive integer)\n", flag,
                     argv[i + 1]);
        std::exit(2);
      }
      return value;
    }
  return fallback;
}

}  // namespace

int main(int argc, char** argv) {
  Kokkos::ScopeGuard kokkos(argc, argv);
  using X = Kokkos::DefaultExecutionSpace;
  using S = float;
  using Router = kmoe::SoftmaxTopKRouter<X, S>;
  using Experts = kmoe::SwiGLUExperts<X, S>;

  const int tokens = parse_int(argc, argv, "--tokens", 1024);
  const int hidden = parse_int(argc, argv, "--hidden", 1024);
  const int ffn = parse_int(argc, argv, "--ffn", 3584);
  const int experts = parse_int(argc, argv, "--experts", 8);
  const int top_k = parse_int(argc, argv, "--top-k", 2);
  const int repeats = parse_int(argc, argv, "--repeats", 3);

  kmoe::LayerOptions options;
  options.losses.switch_aux = 1e-2;
  options.losses.z_loss = 1e-3;
  kmoe::MoELayer<Router, Experts> layer(Router({hidden, experts, top_k, /*normalize=*/true}),
                                        Experts({experts, hidden, ffn}), options);
  kmoe::fill_normal(layer.parameters(), 0.02, 2024);
  kmoe::Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden);
  kmoe::fill_normal(x, 1.0, 7);

  std::printf("kmoe mixtral_layer: backend %s, %d threads\n", X::name(), X().concurrency());
  std::printf("shape: T=%d H=%d F=%d E=%d k=%d (SwiGLU, softmax top-k renormalised), float32\n",
              tokens, hidden, ffn, experts, top_k);
  kmoe::ForwardStats stats;
  std::vector<double> ms;
  for (int r = 0; r < repeats + 1; ++r) {  // the first call allocates workspace: not timed
    Kokkos::fence();
    const auto start = std::chrono::steady_clock::now();
    stats = layer.forward(x, y);
    Kokkos::fence();
    if (r > 0)
      ms.push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count());
  }
  std::sort(ms.begin(), ms.end());

  std::printf("tokens per expert:");
  for (auto c : stats.tokens_per_expert) std::printf(" %lld", static_cast<long long>(c));
  std::printf(
      "\nimbalance (max/mean): %.4f   dropped: %lld   switch aux (unscaled): %.6f   z-loss: %.6g\n",
      stats.imbalance(), static_cast<long long>(stats.dropped), stats.losses.switch_aux_unscaled,
      stats.losses.z_loss);
  auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), y);
  double sum = 0, abs_sum = 0;
  for (std::size_t i = 0; i < host.size(); ++i) {
    sum += host.data()[i];
    abs_sum += std::abs(host.data()[i]);
  }
  const double flops = 2.0 * 3.0 * double(tokens) * top_k * hidden * ffn;
  std::printf("output checksum: sum %.9g  sum|y| %.9g\n", sum, abs_sum);
  std::printf("forward time: median %.3f ms over %d runs (%.1f GFLOP/s in expert GEMMs)\n",
              ms[ms.size() / 2], repeats, flops / (ms[ms.size() / 2] * 1e6));
  return 0;
}
