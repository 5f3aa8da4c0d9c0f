// SPDX-License-Identifier: BSD-3-Clause
// RoutingWeightPlacement::input (Llama 4: y_t = shared(x_t) + sum over kept slots of
// expert_e(w_{t,s} x_t), w = sigmoid of the chosen logit): forward against a plain-loop
// reference, backward against central finite differences of every parameter and input, in
// double precision, dropless and with capacity (dropping by weight and by position, padded
// segments, recompute).
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>

#include "support/layer_check.hpp"
#include "support/spaces.hpp"

using namespace kmoe;
using namespace kmoe::test;

namespace {

constexpr int tokens = 11, hidden = 6, experts = 5, width = 4, top_k = 2;

LayerOptions input_weighted(int capacity_case) {
  LayerOptions o;
  o.routing_weight = RoutingWeightPlacement::input;
  if (capacity_case == 1) o.capacity = {0.6, 0, DropPolicy::by_probability, 1};
  if (capacity_case == 2) o.capacity = {0.6, 1, DropPolicy::by_position, 4};
  o.training_mode = capacity_case == 2 ? ExpertMode::recompute : ExpertMode::store;
  return o;
}

template <class X>
using Layer = MoELayer<SigmoidBiasRouter<X, double>, SwiGLUExperts<X, double>>;

template <class X>
Layer<X> make_layer(const LayerOptions& options) {
  using G = SwiGLUExperts<X, double>;
  Layer<X> layer(SigmoidBiasRouter<X, double>({hidden, experts, top_k, /*normalize=*/false}),
                 G({experts, hidden, width}), options, G({1, hidden, 3}, "shared_experts"));
  fill_normal(layer.parameters(), 0.5, 11);
  return layer;
}

/// The Llama 4 block in plain loops: experts chosen by the top-k logits (ties to the lower
/// index), each kept one run on sigmoid(logit) * x_t, added with weight 1 to the shared
/// expert's output. `kept(t, s)` says which slots survived the capacity rule.
template <class L, class Kept>
RefMatrix reference_output(const L& layer, const RefMatrix& x, const Kept& kept,
                           std::vector<std::vector<int>>& chosen) {
  const RefMatrix gate = to_ref(layer.router().gate().weight());
  const auto shared = expert_weights(*layer.shared_experts(), 0);
  RefMatrix y(tokens, hidden);
  chosen.assign(tokens, {});
  for (int t = 0; t < tokens; ++t) {
    std::vector<double> logit(experts, 0.0);
    for (int e = 0; e < experts; ++e)
      for (int h = 0; h < hidden; ++h) logit[e] += gate(e, h) * x(t, h);
    chosen[t] = ref_top(logit, top_k, std::vector<bool>(experts, true));
    const auto base = ref_expert(ExpertKind::glu, ActKind::silu, shared, &x.v[t * hidden]);
    for (int h = 0; h < hidden; ++h) y(t, h) = base[h];
    for (int s = 0; s < top_k; ++s) {
      if (!kept(t, s)) continue;
      const int e = chosen[t][s];
      const double w = 1 / (1 + std::exp(-logit[e]));
      std::vector<double> scaled(hidden);
      for (int h = 0; h < hidden; ++h) scaled[h] = w * x(t, h);
      const auto out = ref_expert(ExpertKind::glu, ActKind::silu,
                                  expert_weights(layer.experts(), e), &scaled[0]);
      for (int h = 0; h < hidden; ++h) y(t, h) += out[h];
    }
  }
  return y;
}

template <class L, class M>
double loss(L& layer, const M& x, const M& y, const M& g) {
  RouteContext<typename L::execution_space> context;
  context.training = true;
  layer.forward(x, y, context);
  const auto yr = to_ref(y), gr = to_ref(g);
  double sum = 0;
  for (std::size_t i = 0; i < yr.v.size(); ++i) sum += yr.v[i] * gr.v[i];
  return sum;
}

/// Every element of v (flat, host-accessible through deep_copy of one element) against
/// the central difference of loss(), relative to the analytic gradient's largest entry.
template <class L, class M, class Flat>
void check_all(L& layer, const M& x, const M& y, const M& g, const std::string& name, const Flat& v,
               const Flat& analytic) {
  auto analytic_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), analytic);
  double scale = 1e-12;
  for (std::size_t i = 0; i < analytic_host.size(); ++i)
    scale = std::max(scale, std::abs(analytic_host(i)));
  const double step = 1e-6;
  for (std::size_t i = 0; i < v.size(); ++i) {
    auto element = Kokkos::subview(v, i);
    double original;
    Kokkos::deep_copy(original, element);
    Kokkos::deep_copy(element, original + step);
    const double plus = loss(layer, x, y, g);
    Kokkos::deep_copy(element, original - step);
    const double minus = loss(layer, x, y, g);
    Kokkos::deep_copy(element, original);
    const double fd = (plus - minus) / (2 * step);
    CAPTURE(name, i, fd, analytic_host(i), scale);
    CHECK(std::abs(fd - analytic_host(i)) / scale < 1e-6);
  }
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("input-weighted routing matches the plain-loop Llama 4 block",
                        "[layer][input_weighting]", ExecutionSpaces) {
  using X = TestType;
  const int capacity_case = GENERATE(0, 1, 2);
  CAPTURE(capacity_case);
  auto layer = make_layer<X>(input_weighted(capacity_case));
  Matrix<double, X> x("x", tokens, hidden), y("y", tokens, hidden);
  fill_normal(x, 1.0, 12);
  RouteContext<X> context;
  context.training = true;
  const auto stats = layer.forward(x, y, context);
  // The capacity cases must drop something, or they test nothing the dropless one does not.
  if (capacity_case > 0) CHECK(stats.dropped > 0);
  if (capacity_case == 0) CHECK(stats.dropped == 0);
  const auto position = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.positions());
  const auto expert =
      Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.routing().expert);
  std::vector<std::vector<int>> chosen;
  const auto expected = reference_output(
      layer, to_ref(x), [&](int t, int s) { return position(t, s) >= 0; }, chosen);
  for (int t = 0; t < tokens; ++t)
    for (int s = 0; s < top_k; ++s) CHECK(expert(t, s) == chosen[t][s]);
  CHECK(relative_error(to_ref(y), expected) < 1e-13);

  // The default placement (weights on the outputs) gives another result on the same
  // parameters: the option is not ignored.
  LayerOptions output_weighted = input_weighted(capacity_case);
  output_weighted.routing_weight = RoutingWeightPlacement::output;
  auto other = make_layer<X>(output_weighted);
  Matrix<double, X> y_other("y_other", tokens, hidden);
  other.forward(x, y_other, context);
  CHECK(relative_error(to_ref(y_other), expected) > 1e-3);
}

TEMPLATE_LIST_TEST_CASE("input-weighted routing: gradients match finite differences",
                        "[layer][input_weighting][backward]", ExecutionSpaces) {
  using X = TestType;
  const int capacity_case = GENERATE(0, 1, 2);
  CAPTURE(capacity_case);
  auto layer = make_layer<X>(input_weighted(capacity_case));
  Matrix<double, X> x("x", tokens, hidden), y("y", tokens, hidden), g("g", tokens, hidden),
      grad_x("grad_x", tokens, hidden);
  fill_normal(x, 1.0, 13);
  fill_normal(g, 1.0, 14);
  layer.zero_gradients();
  loss(layer, x, y, g);
  layer.backward(g, grad_x);
  for (const auto& p : layer.parameters()) check_all(layer, x, y, g, p.name, p.value, p.grad);
  using Flat =
      Kokkos::View<double*, typename X::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  check_all(layer, x, y, g, "x", Flat(x.data(), x.size()), Flat(grad_x.data(), grad_x.size()));
}
