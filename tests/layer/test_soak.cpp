// SPDX-License-Identifier: BSD-3-Clause
// Soak test (ctest label "soak", not in the default run): thousands of training steps of a
// small layer (forward, backward, SGD, aux-loss-free bias update) with a batch size that
// cycles, so every internal buffer is resized again and again. Resident memory must stop
// growing after warm-up, and the forward must keep matching the plain-loop reference.
#include <catch2/catch_test_macros.hpp>

#include <fstream>
#include <unistd.h>

#include "support/layer_check.hpp"

using namespace kmoe;
using namespace kmoe::test;

namespace {

/// Resident set size in bytes, from /proc/self/statm (second field, in pages).
std::int64_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::int64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * std::int64_t(sysconf(_SC_PAGESIZE));
}

}  // namespace

TEST_CASE("thousands of training steps keep memory flat and outputs equal to the reference",
          "[soak]") {
  using X = Kokkos::DefaultHostExecutionSpace;
  using S = double;
  using R = SigmoidBiasRouter<X, S>;
  using Ex = SwiGLUExperts<X, S>;
  constexpr int hidden = 8, experts = 6, top_k = 2, ffn = 12;
  // Enough steps that a leak of one small allocation per step (a few hundred bytes)
  // outgrows the allocator's noise; warm-up covers every batch size of the cycle.
  constexpr int steps = 6000, warm_up = 500, check_every = 250;
  constexpr std::int64_t allowed_growth = 1 << 20;

  LayerOptions options;
  options.capacity = {1.25, 1, DropPolicy::by_probability, 4};
  MoELayer<R, Ex> layer(R({hidden, experts, top_k, true, 1.0, {3, 2, 2}}),
                        Ex({experts, hidden, ffn}), options, Ex({1, hidden, ffn}, "shared"));
  fill_normal(layer.parameters(), 0.3, 17);
  auto parameters = layer.parameters();
  SGD<X, S> sgd(parameters, {1e-3, 0.9, 0.0});

  std::int64_t baseline = 0, largest = 0;
  int compared = 0;
  for (int step = 0; step < steps; ++step) {
    // 1 .. 61 tokens, in an order that visits growing and shrinking sizes.
    const int tokens = 1 + (step * 37) % 61;
    Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden), grad_x("grad_x", tokens, hidden);
    fill_normal(x, 1.0, 1000 + step);
    RouteContext<X> context;
    context.training = true;
    const auto stats = layer.forward(x, y, context);
    if (step % check_every == 0) {
      RefRouterConfig rc;
      rc.kind = RouterKind::sigmoid_bias;
      rc.experts = experts;
      rc.top_k = top_k;
      rc.normalize = true;
      rc.n_group = 3;
      rc.topk_group = 2;
      rc.group_terms = 2;
      const auto bias =
          Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.router().bias());
      for (int e = 0; e < experts; ++e) rc.bias.push_back(bias(e));
      const RefMatrix gate = to_ref(layer.router().gate().weight());
      const auto cmp = compare_forward(layer, rc, x, y, stats, &gate);
      CAPTURE(step, tokens);
      CHECK(cmp.logit_error < tolerance<S>());
      CHECK(cmp.output_error < tolerance<S>());
      ++compared;
    }
    // Loss 0.5 |y|^2 (grad_y = y) keeps the weights bounded over thousands of steps.
    layer.zero_gradients();
    layer.backward(y, grad_x);
    sgd.step();
    layer.apply_bias_update(1e-3);
    if (step == warm_up) baseline = resident_bytes();
    if (step > warm_up) largest = std::max(largest, resident_bytes());
  }
  CAPTURE(baseline, largest);
  CHECK(compared == steps / check_every);
  CHECK(largest - baseline <= allowed_growth);
}
