// SPDX-License-Identifier: BSD-3-Clause
// Failover on one rank: a failed expert's tokens rerouted to their best healthy expert
// (inference), against a plain-loop reference of the softmax top-k router restricted to
// the healthy experts; the health check's non-finite detection redoing the step; the
// refusals (training, reroute off, marks without failover, slots out of range).
#include <kmoe/kmoe.hpp>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include "support/spaces.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

using namespace kmoe;
using Catch::Matchers::ContainsSubstring;

namespace {

constexpr int hidden = 8, ffn = 6, experts = 6, top_k = 2, tokens = 17;

double silu(double v) { return v / (1.0 + std::exp(-v)); }

/// y = sum over the token's top-k healthy experts (by softmax probability) of p_e / sum p
/// times expert e's SwiGLU output, all in plain loops from the layer's weights.
template <class Layer, class XView>
std::vector<double> reference(const Layer& layer, const XView& x, const std::vector<int>& dead) {
  const auto w =
      Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.router().gate().weight());
  const auto& e = layer.experts();
  const auto gate = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), e.w_gate().value);
  const auto up = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), e.w_up().value);
  const auto down = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), e.w_down().value);
  const auto xh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), x);
  std::vector<double> y(std::size_t(tokens) * hidden, 0.0);
  for (int t = 0; t < tokens; ++t) {
    std::vector<double> p(experts);
    double largest = -1e300, sum = 0;
    for (int j = 0; j < experts; ++j) {
      p[j] = 0;
      for (int h = 0; h < hidden; ++h) p[j] += w(j, h) * xh(t, h);
      largest = std::max(largest, p[j]);
    }
    for (int j = 0; j < experts; ++j) sum += p[j] = std::exp(p[j] - largest);
    for (int j = 0; j < experts; ++j) p[j] /= sum;
    std::vector<int> order;
    for (int j = 0; j < experts; ++j)
      if (std::find(dead.begin(), dead.end(), j) == dead.end()) order.push_back(j);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    double chosen = 0;
    for (int s = 0; s < top_k; ++s) chosen += p[order[s]];
    for (int s = 0; s < top_k; ++s) {
      const int j = order[s];
      std::vector<double> inner(ffn);
      for (int f = 0; f < ffn; ++f) {
        double g = 0, u = 0;
        for (int h = 0; h < hidden; ++h) g += gate(j, f, h) * xh(t, h), u += up(j, f, h) * xh(t, h);
        inner[f] = silu(g) * u;
      }
      for (int h = 0; h < hidden; ++h) {
        double out = 0;
        for (int f = 0; f < ffn; ++f) out += down(j, h, f) * inner[f];
        y[std::size_t(t) * hidden + h] += p[j] / chosen * out;
      }
    }
  }
  return y;
}

/// The softmax top-k (renormalised) SwiGLU layer of these tests, weights drawn from `seed`.
template <class X>
MoELayer<SoftmaxTopKRouter<X, double>, SwiGLUExperts<X, double>> failover_layer(
    const LayerOptions& options, std::uint64_t seed) {
  MoELayer<SoftmaxTopKRouter<X, double>, SwiGLUExperts<X, double>> layer(
      SoftmaxTopKRouter<X, double>({hidden, experts, top_k, true}),
      SwiGLUExperts<X, double>({experts, hidden, ffn}), options);
  fill_normal(layer.parameters(), 0.5, seed);
  return layer;
}

template <class YView>
double max_error(const YView& y, const std::vector<double>& want) {
  const auto yh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), y);
  double error = 0;
  for (std::size_t i = 0; i < want.size(); ++i)
    error = std::max(error, std::abs(yh.data()[i] - want[i]));
  return error;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("failover reroutes a failed expert's tokens to their best healthy one",
                        "[failover]", kmoe::test::ExecutionSpaces) {
  using X = TestType;
  using S = double;
  using Router = SoftmaxTopKRouter<X, S>;
  using Experts = SwiGLUExperts<X, S>;
  LayerOptions options;
  options.failover.enabled = true;
  auto layer = failover_layer<X>(options, 21);
  Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden);
  fill_normal(x, 1.0, 22);

  const auto healthy = layer.forward(x, y);
  CHECK(healthy.failed_slots.empty());
  CHECK(healthy.rerouted == 0);
  CHECK(max_error(y, reference(layer, x, {})) < 1e-12);
  const std::int64_t on_two = healthy.tokens_per_expert[2];
  REQUIRE(on_two > 0);

  layer.mark_failed_expert(2);
  const auto degraded = layer.forward(x, y);
  CHECK(degraded.failed_slots == std::vector<int>{2});
  CHECK(degraded.rerouted == on_two);
  CHECK(degraded.tokens_per_expert[2] == 0);
  CHECK(max_error(y, reference(layer, x, {2})) < 1e-12);
  CHECK(layer.failed_slots() == std::vector<int>{2});

  // Training cannot differentiate a rerouted selection: refused, naming the expert.
  RouteContext<X> training;
  training.training = true;
  CHECK_THROWS_WITH(layer.forward(x, y, training),
                    ContainsSubstring("failed expert = 2") && ContainsSubstring("inference only"));

  CHECK_THROWS_WITH(layer.mark_failed_slot(experts), ContainsSubstring("slot = 6"));
  CHECK_THROWS_WITH(layer.mark_failed_rank(1), ContainsSubstring("ep_rank = 1"));
  MoELayer<Router, Experts> plain(Router({hidden, experts, top_k, true}),
                                  Experts({experts, hidden, ffn}));
  CHECK_THROWS_WITH(plain.mark_failed_expert(0), ContainsSubstring("options.failover.enabled"));

  LayerOptions strict = options;
  strict.failover.reroute = false;
  MoELayer<Router, Experts> no_fallback(Router({hidden, experts, top_k, true}),
                                        Experts({experts, hidden, ffn}), strict);
  no_fallback.mark_failed_slot(4);
  CHECK_THROWS_WITH(no_fallback.forward(x, y), ContainsSubstring("failed expert = 4") &&
                                                   ContainsSubstring("reroute is false"));
}

TEMPLATE_LIST_TEST_CASE("a non-finite expert output fails its slot and the step is redone",
                        "[failover]", kmoe::test::ExecutionSpaces) {
  using X = TestType;
  using S = double;
  LayerOptions options;
  options.failover.enabled = true;
  auto layer = failover_layer<X>(options, 31);
  Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden);
  fill_normal(x, 1.0, 32);
  // Expert 4 breaks: one NaN in its down projection poisons every row it computes.
  const auto reference_y = reference(layer, x, {4});
  auto down =
      Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.experts().w_down().value);
  down(4, 0, 0) = std::numeric_limits<S>::quiet_NaN();
  Kokkos::deep_copy(layer.experts().w_down().value, down);

  const auto stats = layer.forward(x, y);  // NonFinitePolicy::raise would throw on a NaN y
  CHECK(stats.failed_slots == std::vector<int>{4});
  CHECK(stats.rerouted > 0);
  CHECK(max_error(y, reference_y) < 1e-12);
  // The failure stays: the next forward routes around it from the start.
  const auto again = layer.forward(x, y);
  CHECK(again.failed_slots == std::vector<int>{4});
  CHECK(max_error(y, reference_y) < 1e-12);
}
