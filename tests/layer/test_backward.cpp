// SPDX-License-Identifier: BSD-3-Clause
// Backward against central finite differences in double precision, for every router and
// expert kind (GPT-OSS's clamped SwiGLU with biases, behind a router with a logit bias,
// included), with and without capacity, with shared experts (one with an output gate) and
// every balance term on.
// Loss L = sum(y * G) + the enabled balance terms; routing decisions are constants.
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>

#include <random>

#include "support/layer_check.hpp"
#include "support/spaces.hpp"

using namespace kmoe;
using namespace kmoe::test;

namespace {

template <class Layer>
struct FiniteDifferenceCheck {
  using X = typename Layer::execution_space;
  using S = double;
  Layer& layer;
  Matrix<S, X> x, y, g, grad_x;
  RouteContext<X> context;
  Vector<std::int64_t, X> ids;

  FiniteDifferenceCheck(Layer& l, int tokens, std::uint64_t seed)
      : layer(l),
        x("x", tokens, l.hidden_size()),
        y("y", tokens, l.hidden_size()),
        g("g", tokens, l.hidden_size()),
        grad_x("grad_x", tokens, l.hidden_size()),
        ids("ids", tokens) {
    fill_normal(layer.parameters(), 0.4, seed);
    fill_normal(x, 1.0, seed + 1);
    fill_normal(g, 1.0, seed + 2);
    auto ids_host = Kokkos::create_mirror_view(ids);
    for (int t = 0; t < tokens; ++t) ids_host(t) = 17 * t + 3;
    Kokkos::deep_copy(ids, ids_host);
    context.training = true;
    context.token_ids = ids;
    context.step = 5;
  }

  double loss() {
    const auto stats = layer.forward(x, y, context);
    auto yh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), y);
    auto gh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), g);
    double sum = 0;
    for (std::size_t i = 0; i < yh.size(); ++i) sum += yh.data()[i] * gh.data()[i];
    return sum + stats.losses.total();
  }

  /// Checks dL/dv at a few random elements of a flat host-accessible view alias `v`
  /// against the analytic gradient `analytic` (same layout).
  template <class Flat, class Grad>
  void check(const std::string& name, const Flat& v, const Grad& analytic, std::mt19937& rng) {
    auto analytic_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), analytic);
    double scale = 1e-12;
    for (std::size_t i = 0; i < analytic_host.size(); ++i)
      scale = std::max(scale, std::abs(double(analytic_host.data()[i])));
    const double h = 1e-5;
    for (int sample = 0; sample < 5; ++sample) {
      const std::size_t i = std::uniform_int_distribution<std::size_t>(0, v.size() - 1)(rng);
      auto element = Kokkos::subview(v, i);
      double original;
      Kokkos::deep_copy(original, element);
      Kokkos::deep_copy(element, original + h);
      const double plus = loss();
      Kokkos::deep_copy(element, original - h);
      const double minus = loss();
      Kokkos::deep_copy(element, original);
      const double fd = (plus - minus) / (2 * h);
      CAPTURE(name, i, fd, analytic_host.data()[i], scale);
      CHECK(std::abs(fd - double(analytic_host.data()[i])) / scale < 1e-6);
    }
  }

  void run(std::uint64_t seed) {
    layer.zero_gradients();
    loss();
    layer.backward(g, grad_x);
    std::mt19937 rng{static_cast<unsigned>(seed)};
    for (const auto& p : layer.parameters()) check(p.name, p.value, p.grad, rng);
    using Flat =
        Kokkos::View<S*, typename X::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
    check("x", Flat(x.data(), x.size()), Flat(grad_x.data(), grad_x.size()), rng);
  }
};

LayerOptions options_for(int capacity_case) {
  LayerOptions o;
  o.losses = {1e-2, 1e-4, 0, 1e-3};
  if (capacity_case == 1) o.capacity = {1.0, 0, DropPolicy::by_probability, 1};
  if (capacity_case == 2) o.capacity = {0.75, 2, DropPolicy::by_position, 4};
  o.training_mode = capacity_case == 2 ? ExpertMode::recompute : ExpertMode::store;
  return o;
}

template <class Router, class Experts>
void check_router(const Router& router, const Experts& experts,
                  const std::optional<Experts>& shared, int capacity_case, std::uint64_t seed) {
  CAPTURE(capacity_case);
  MoELayer<Router, Experts> layer(router, experts, options_for(capacity_case), shared);
  FiniteDifferenceCheck<decltype(layer)> fd(layer, 12, seed);
  fd.run(seed);
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("gradients of the token-choice routers match finite differences",
                        "[backward]", ExecutionSpaces) {
  using X = TestType;
  using G = SwiGLUExperts<X, double>;
  const int capacity_case = GENERATE(0, 1, 2);
  check_router(SoftmaxTopKRouter<X, double>({6, 4, 2, true}), G({4, 6, 5}), std::optional<G>(),
               capacity_case, 1);
  check_router(SoftmaxTopKRouter<X, double>({6, 8, 3, false, 2.0, {4, 2, 2}}), G({8, 6, 5}),
               std::optional<G>(G({1, 6, 7}, "shared_experts")), capacity_case, 2);
  check_router(TopKSoftmaxRouter<X, double>({6, 4, 2}), G({4, 6, 5}), std::optional<G>(),
               capacity_case, 3);
  check_router(SigmoidBiasRouter<X, double>({6, 8, 2, true, 2.5, {4, 2, 2}}), G({8, 6, 5}),
               std::optional<G>(G({1, 6, 4}, "shared_experts")), capacity_case, 4);
  check_router(NoisyTopKRouter<X, double>({6, 4, 2, 77}), G({4, 6, 5}), std::optional<G>(),
               capacity_case, 5);
  // Qwen2-MoE's shared expert, its output scaled per token by sigmoid(x · w_output_gate).
  check_router(SoftmaxTopKRouter<X, double>({6, 4, 2, true}), G({4, 6, 5}),
               std::optional<G>(G({1, 6, 7, false, true}, "shared_experts")), capacity_case, 10);
  // GPT-OSS: the router's logit bias, clamped SwiGLU experts with biases (limit 0.5: the
  // clamps are active at this scale).
  using C = ClampedSwiGLUExperts<X, double>;
  TopKSoftmaxConfig biased{6, 4, 2};
  biased.bias = true;
  check_router(TopKSoftmaxRouter<X, double>(biased), C({4, 6, 5, true}, ClampedSwiGLU{1.702, 0.5}),
               std::optional<C>(), capacity_case, 11);
}

TEMPLATE_LIST_TEST_CASE("gradients of expert choice, hash routing and FFN experts", "[backward]",
                        ExecutionSpaces) {
  using X = TestType;
  const int capacity_case = GENERATE(0, 1);
  using Gelu = FFNExperts<X, double, activation::GeluTanh>;
  using Silu = FFNExperts<X, double, activation::Silu>;
  using GeGlu = GeGLUExperts<X, double>;
  check_router(ExpertChoiceRouter<X, double>({6, 4, 1.5}), Gelu({4, 6, 5, true}),
               std::optional<Gelu>(), capacity_case, 6);
  check_router(HashRouter<X, double>({6, 4, 9}), Silu({4, 6, 5, true}),
               std::optional<Silu>(Silu({1, 6, 3, true}, "shared_experts")), capacity_case, 7);
  check_router(SoftmaxTopKRouter<X, double>({6, 4, 2, true}), GeGlu({4, 6, 5}),
               std::optional<GeGlu>(), capacity_case, 8);
  check_router(SoftmaxTopKRouter<X, double>({6, 4, 2, false}),
               FFNExperts<X, double, activation::GeluErf>({4, 6, 5, true}),
               std::optional<FFNExperts<X, double, activation::GeluErf>>(), capacity_case, 9);
}

TEMPLATE_LIST_TEST_CASE("a layer of identical experts is the dense FFN", "[backward]",
                        ExecutionSpaces) {
  using X = TestType;
  using R = SoftmaxTopKRouter<X, double>;
  using G = SwiGLUExperts<X, double>;
  const int tokens = 7, hidden = 6, ffn = 5, experts = 4;
  MoELayer<R, G> layer(R({hidden, experts, 2, true}), G({experts, hidden, ffn}));
  fill_normal(layer.parameters(), 0.4, 31);
  // Copy expert 0 into every expert.
  for (auto* w : {&layer.experts().w_gate(), &layer.experts().w_up(), &layer.experts().w_down()}) {
    auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), w->value);
    for (int e = 1; e < experts; ++e)
      for (std::size_t i = 0; i < host.extent(1); ++i)
        for (std::size_t j = 0; j < host.extent(2); ++j) host(e, i, j) = host(0, i, j);
    Kokkos::deep_copy(w->value, host);
  }
  Matrix<double, X> x("x", tokens, hidden), y("y", tokens, hidden), g("g", tokens, hidden),
      grad_x("grad_x", tokens, hidden);
  fill_normal(x, 1.0, 32);
  fill_normal(g, 1.0, 33);
  RouteContext<X> context;
  context.training = true;
  layer.zero_gradients();
  layer.forward(x, y, context);
  layer.backward(g, grad_x);

  const RefExpertWeights w = expert_weights(layer.experts(), 0);
  RefMatrix xr = to_ref(x);
  const RefMatrix gr = to_ref(g);
  const auto dense_loss = [&](const RefMatrix& input, const RefExpertWeights& weights) {
    double sum = 0;
    for (int t = 0; t < tokens; ++t) {
      const auto yt =
          ref_expert(ExpertKind::glu, ActKind::silu, weights, &input.v[std::size_t(t) * hidden]);
      for (int h = 0; h < hidden; ++h) sum += yt[h] * gr(t, h);
    }
    return sum;
  };
  RefMatrix dense_y(tokens, hidden);
  for (int t = 0; t < tokens; ++t) {
    const auto yt = ref_expert(ExpertKind::glu, ActKind::silu, w, &xr.v[std::size_t(t) * hidden]);
    for (int h = 0; h < hidden; ++h) dense_y(t, h) = yt[h];
  }
  CHECK(relative_error(to_ref(y), dense_y) < 1e-12);
  // dL/dx of the dense FFN by central differences of the reference.
  RefMatrix dense_grad_x(tokens, hidden);
  for (std::size_t i = 0; i < xr.v.size(); ++i) {
    const double keep = xr.v[i];
    xr.v[i] = keep + 1e-6;
    const double plus = dense_loss(xr, w);
    xr.v[i] = keep - 1e-6;
    const double minus = dense_loss(xr, w);
    xr.v[i] = keep;
    dense_grad_x.v[i] = (plus - minus) / 2e-6;
  }
  CHECK(relative_error(to_ref(grad_x), dense_grad_x) < 1e-7);
  // The experts' gradients add up to the dense FFN's; the router gets none (weights sum to 1).
  auto grad_down =
      to_ref(Kokkos::subview(layer.experts().w_down().grad, 0, Kokkos::ALL, Kokkos::ALL));
  RefMatrix summed(grad_down.rows, grad_down.cols);
  for (int e = 0; e < experts; ++e) {
    const auto ge = slice_to_ref(layer.experts().w_down().grad, e);
    for (std::size_t i = 0; i < summed.v.size(); ++i) summed.v[i] += ge.v[i];
  }
  RefExpertWeights wp = w;
  RefMatrix dense_grad_down(grad_down.rows, grad_down.cols);
  for (std::size_t i = 0; i < wp.w_out.v.size(); ++i) {
    const double keep = wp.w_out.v[i];
    wp.w_out.v[i] = keep + 1e-6;
    const double plus = dense_loss(xr, wp);
    wp.w_out.v[i] = keep - 1e-6;
    const double minus = dense_loss(xr, wp);
    wp.w_out.v[i] = keep;
    dense_grad_down.v[i] = (plus - minus) / 2e-6;
  }
  CHECK(relative_error(summed, dense_grad_down) < 1e-7);
  const RefMatrix router_grad = to_ref(layer.router().gate().grad());
  for (double v : router_grad.v) CHECK(std::abs(v) < 1e-10);
}
