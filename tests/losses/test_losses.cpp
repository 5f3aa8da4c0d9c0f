// SPDX-License-Identifier: BSD-3-Clause
// The router temperature, the KL-to-uniform expert-usage loss and the global-batch aux loss
// (docs/training.md, "Balance losses") against plain loops over x W^T and against central
// finite differences in double precision.
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cmath>
#include <limits>

#include "support/layer_check.hpp"
#include "support/spaces.hpp"

using namespace kmoe;
using namespace kmoe::test;

namespace {

constexpr int hidden = 6, ffn = 5;

/// l(t, e) = sum_h x(t, h) W(e, h) / tau, by plain loops.
RefMatrix reference_logits(const RefMatrix& x, const RefMatrix& gate, double temperature) {
  RefMatrix l(x.rows, gate.rows);
  for (int t = 0; t < x.rows; ++t)
    for (int e = 0; e < gate.rows; ++e) {
      double sum = 0;
      for (int h = 0; h < x.cols; ++h) sum += x(t, h) * gate(e, h);
      l(t, e) = sum / temperature;
    }
  return l;
}

std::vector<double> row(const RefMatrix& m, int r) {
  return std::vector<double>(m.v.begin() + std::size_t(r) * m.cols,
                             m.v.begin() + std::size_t(r + 1) * m.cols);
}

RefRouterConfig reference_router(RouterKind kind, int experts, int top_k, bool normalize) {
  RefRouterConfig c;
  c.kind = kind;
  c.experts = experts;
  c.top_k = top_k;
  c.normalize = normalize;
  return c;
}

/// Per-expert assignment counts of a plain-loop routing.
std::vector<double> reference_counts(const RefRouting& routing, int experts) {
  std::vector<double> counts(experts, 0.0);
  for (const auto& chosen : routing.expert)
    for (int e : chosen) counts[e] += 1;
  return counts;
}

/// Mean over tokens of softmax(l_t).
std::vector<double> reference_mean_prob(const RefMatrix& logits) {
  std::vector<double> mean(logits.cols, 0.0);
  for (int t = 0; t < logits.rows; ++t) {
    const auto p = ref_softmax(row(logits, t));
    for (int e = 0; e < logits.cols; ++e) mean[e] += p[e] / logits.rows;
  }
  return mean;
}

/// L = sum(y * G) + the enabled balance terms, for one forward of `layer` on x.
template <class Layer, class M>
double layer_loss(Layer& layer, const M& x, const M& g, bool training) {
  M y("y", x.extent(0), x.extent(1));
  RouteContext<typename Layer::execution_space> context;
  context.training = training;
  context.step = 3;
  const auto stats = layer.forward(x, y, context);
  const auto yh = to_ref(y), gh = to_ref(g);
  double sum = 0;
  for (std::size_t i = 0; i < yh.v.size(); ++i) sum += yh.v[i] * gh.v[i];
  return sum + stats.losses.total();
}

/// Compares every element of `analytic` with central differences of `loss` in `value`
/// (flat device views of the same size), relative to the largest analytic element.
template <class Value, class Grad, class Loss>
void check_finite_differences(const std::string& name, const Value& value, const Grad& analytic,
                              const Loss& loss) {
  auto analytic_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), analytic);
  double scale = 0;
  for (std::size_t i = 0; i < analytic_host.size(); ++i)
    scale = std::max(scale, std::abs(double(analytic_host.data()[i])));
  CAPTURE(name, scale);
  // A zero gradient would make the comparison vacuous.
  REQUIRE(scale > 1e-6);
  const double h = 1e-5;
  for (std::size_t i = 0; i < analytic_host.size(); ++i) {
    auto element = Kokkos::subview(value, i);
    double original;
    Kokkos::deep_copy(original, element);
    Kokkos::deep_copy(element, original + h);
    const double plus = loss();
    Kokkos::deep_copy(element, original - h);
    const double minus = loss();
    Kokkos::deep_copy(element, original);
    const double fd = (plus - minus) / (2 * h);
    CAPTURE(i, fd, analytic_host.data()[i]);
    CHECK(std::abs(fd - double(analytic_host.data()[i])) / scale < 1e-6);
  }
}

/// Finite differences of the router gate and of x against one training backward. With
/// `evaluation_differences` the perturbed losses come from evaluation forwards (which leave
/// the global-batch window as it is), taken before the training forward.
template <class Layer>
void check_layer_gradients(Layer& layer, int tokens, std::uint64_t seed, bool zero_upstream,
                           bool evaluation_differences = false) {
  using X = typename Layer::execution_space;
  using M = Matrix<double, X>;
  M x("x", tokens, hidden), g("g", tokens, hidden), grad_x("grad_x", tokens, hidden);
  fill_normal(x, 1.0, seed + 1);
  if (!zero_upstream) fill_normal(g, 1.0, seed + 2);
  const auto& gate = layer.router().gate();
  using Flat =
      Kokkos::View<double*, typename X::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  const Flat gate_value(gate.weight().data(), gate.weight().size());
  const Flat x_value(x.data(), x.size());
  const auto loss = [&] { return layer_loss(layer, x, g, !evaluation_differences); };
  // Central differences first when they must see the window before this micro-batch.
  std::vector<double> fd_gate, fd_x;
  const auto differences = [&](const Flat& v) {
    std::vector<double> out(v.size());
    const double h = 1e-5;
    for (std::size_t i = 0; i < v.size(); ++i) {
      auto element = Kokkos::subview(v, i);
      double original;
      Kokkos::deep_copy(original, element);
      Kokkos::deep_copy(element, original + h);
      const double plus = loss();
      Kokkos::deep_copy(element, original - h);
      const double minus = loss();
      Kokkos::deep_copy(element, original);
      out[i] = (plus - minus) / (2 * h);
    }
    return out;
  };
  if (evaluation_differences) {
    fd_gate = differences(gate_value);
    fd_x = differences(x_value);
  }
  layer.zero_gradients();
  layer_loss(layer, x, g, true);
  layer.backward(g, grad_x);
  if (!evaluation_differences) {
    check_finite_differences("router.weight", gate_value,
                             Flat(gate.grad().data(), gate.grad().size()), loss);
    check_finite_differences("x", x_value, Flat(grad_x.data(), grad_x.size()), loss);
    return;
  }
  const auto compare = [](const std::string& name, const std::vector<double>& fd,
                          const RefMatrix& analytic) {
    double scale = 0;
    for (double v : analytic.v) scale = std::max(scale, std::abs(v));
    CAPTURE(name, scale);
    REQUIRE(scale > 1e-6);
    for (std::size_t i = 0; i < fd.size(); ++i) {
      CAPTURE(i, fd[i], analytic.v[i]);
      CHECK(std::abs(fd[i] - analytic.v[i]) / scale < 1e-6);
    }
  };
  compare("router.weight", fd_gate, to_ref(gate.grad()));
  compare("x", fd_x, to_ref(grad_x));
}

template <class X>
using GLU = SwiGLUExperts<X, double>;

}  // namespace

TEMPLATE_LIST_TEST_CASE("router temperature divides the logits before the softmax and the top-k",
                        "[losses][temperature]", ExecutionSpaces) {
  using X = TestType;
  const int tokens = 9, experts = 5, k = 2;
  Matrix<double, X> x("x", tokens, hidden);
  fill_normal(x, 1.0, 11);
  const RefMatrix xr = to_ref(x);
  RouteContext<X> context;  // evaluation: the noisy router adds no noise
  const auto check = [&](auto router, double temperature, const RefRouterConfig& reference) {
    CAPTURE(reference.kind == RouterKind::softmax_topk   ? "softmax_topk"
            : reference.kind == RouterKind::topk_softmax ? "topk_softmax"
                                                         : "noisy_topk",
            temperature);
    ParameterList<X, double> list;
    router.collect_parameters(list);
    fill_normal(list, 0.8, 12);
    RoutingPlan<X, double> plan;
    router.forward(x, plan, context);
    const RefMatrix logits = reference_logits(xr, to_ref(router.gate().weight()), temperature);
    CHECK(relative_error(to_ref(plan.logits), logits) < 1e-14);
    RefMatrix probs(tokens, experts);
    for (int t = 0; t < tokens; ++t) {
      const auto p = ref_softmax(row(logits, t));
      for (int e = 0; e < experts; ++e) probs(t, e) = p[e];
    }
    CHECK(relative_error(to_ref(plan.probs), probs) < 1e-14);
    const RefRouting want = ref_route(reference, logits);
    const auto expert = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plan.expert);
    const auto weight = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plan.weight);
    for (int t = 0; t < tokens; ++t)
      for (int j = 0; j < k; ++j) {
        CAPTURE(t, j);
        CHECK(expert(t, j) == want.expert[t][j]);
        CHECK(std::abs(weight(t, j) - want.weight[t][j]) < 1e-14);
      }
  };
  const RefRouterConfig softmax_ref = reference_router(RouterKind::softmax_topk, experts, k, true);
  const RefRouterConfig topk_ref = reference_router(RouterKind::topk_softmax, experts, k, false);
  const RefRouterConfig noisy_ref = reference_router(RouterKind::noisy_topk, experts, k, false);
  for (double temperature : {0.3, 1.0, 2.5}) {
    SoftmaxTopKConfig softmax{hidden, experts, k, true};
    softmax.temperature = temperature;
    check(SoftmaxTopKRouter<X, double>(softmax), temperature, softmax_ref);
    TopKSoftmaxConfig topk{hidden, experts, k};
    topk.temperature = temperature;
    check(TopKSoftmaxRouter<X, double>(topk), temperature, topk_ref);
    NoisyTopKConfig noisy{hidden, experts, k, 7};
    noisy.temperature = temperature;
    check(NoisyTopKRouter<X, double>(noisy), temperature, noisy_ref);
  }
}

TEMPLATE_LIST_TEST_CASE("gradients through a router temperature match finite differences",
                        "[losses][temperature]", ExecutionSpaces) {
  using X = TestType;
  using G = GLU<X>;
  LayerOptions options;
  options.losses.switch_aux = 1e-2;
  options.losses.z_loss = 1e-2;  // on the tempered logits
  SoftmaxTopKConfig softmax{hidden, 4, 2, true};
  softmax.temperature = 0.6;
  MoELayer<SoftmaxTopKRouter<X, double>, G> a(SoftmaxTopKRouter<X, double>(softmax),
                                              G({4, hidden, ffn}), options);
  fill_normal(a.parameters(), 0.4, 21);
  check_layer_gradients(a, 10, 21, false);
  TopKSoftmaxConfig topk{hidden, 4, 2};
  topk.temperature = 1.7;
  MoELayer<TopKSoftmaxRouter<X, double>, G> b(TopKSoftmaxRouter<X, double>(topk),
                                              G({4, hidden, ffn}), options);
  fill_normal(b.parameters(), 0.4, 22);
  check_layer_gradients(b, 10, 22, false);
  NoisyTopKConfig noisy{hidden, 4, 2, 5};
  noisy.temperature = 0.8;
  MoELayer<NoisyTopKRouter<X, double>, G> c(NoisyTopKRouter<X, double>(noisy), G({4, hidden, ffn}),
                                            options);
  fill_normal(c.parameters(), 0.4, 23);
  check_layer_gradients(c, 10, 23, false);
}

TEST_CASE("a temperature that is not finite and > 0 raises invalid_argument naming it",
          "[losses][temperature][validation]") {
  using X = Kokkos::DefaultHostExecutionSpace;
  using Catch::Matchers::ContainsSubstring;
  for (double bad : {0.0, -1.0, std::numeric_limits<double>::quiet_NaN(),
                     std::numeric_limits<double>::infinity()}) {
    CAPTURE(bad);
    SoftmaxTopKConfig softmax{hidden, 4, 2};
    softmax.temperature = bad;
    CHECK_THROWS_AS((SoftmaxTopKRouter<X, double>(softmax)), kmoe::invalid_argument);
    CHECK_THROWS_WITH((SoftmaxTopKRouter<X, double>(softmax)), ContainsSubstring("temperature"));
    TopKSoftmaxConfig topk{hidden, 4, 2};
    topk.temperature = bad;
    CHECK_THROWS_WITH((TopKSoftmaxRouter<X, double>(topk)),
                      ContainsSubstring("TopKSoftmaxRouter") && ContainsSubstring("temperature"));
    NoisyTopKConfig noisy{hidden, 4, 2, 1};
    noisy.temperature = bad;
    CHECK_THROWS_WITH((NoisyTopKRouter<X, double>(noisy)),
                      ContainsSubstring("NoisyTopKRouter") && ContainsSubstring("temperature"));
  }
}

TEST_CASE("bad KL and global-batch coefficients raise invalid_argument naming them",
          "[losses][validation]") {
  using X = Kokkos::DefaultHostExecutionSpace;
  using Catch::Matchers::ContainsSubstring;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const auto raises = [](BalanceLossConfig c, const std::string& parameter) {
    CAPTURE(parameter);
    CHECK_THROWS_AS((BalanceLoss<X, double>(c)), kmoe::invalid_argument);
    CHECK_THROWS_WITH((BalanceLoss<X, double>(c)), ContainsSubstring(parameter));
  };
  for (double bad : {-1e-3, nan, std::numeric_limits<double>::infinity()}) {
    BalanceLossConfig kl;
    kl.kl_uniform = bad;
    raises(kl, "kl_uniform");
    BalanceLossConfig global;
    global.global_batch_aux = bad;
    raises(global, "global_batch_aux");
  }
  for (int bad : {0, -2}) {
    BalanceLossConfig window;
    window.global_batch_aux = 1e-2;
    window.global_batch_micro_batches = bad;
    raises(window, "global_batch_micro_batches");
  }
}

TEMPLATE_LIST_TEST_CASE("KL-to-uniform expert usage equals a plain loop over softmax(x W^T)",
                        "[losses][kl]", ExecutionSpaces) {
  using X = TestType;
  using G = GLU<X>;
  const int tokens = 13, experts = 5;
  LayerOptions options;
  options.losses.kl_uniform = 0.3;
  MoELayer<SoftmaxTopKRouter<X, double>, G> layer(
      SoftmaxTopKRouter<X, double>({hidden, experts, 2, true}), G({experts, hidden, ffn}), options);
  fill_normal(layer.parameters(), 0.7, 31);
  Matrix<double, X> x("x", tokens, hidden), y("y", tokens, hidden);
  fill_normal(x, 1.0, 32);
  const auto stats = layer.forward(x, y, RouteContext<X>{});
  const auto mean =
      reference_mean_prob(reference_logits(to_ref(x), to_ref(layer.router().gate().weight()), 1.0));
  double kl = 0;
  for (double p : mean) kl += p * std::log(p * experts);
  CHECK(kl > 1e-3);  // the routing is far enough from uniform for the check to mean something
  CHECK(std::abs(stats.losses.kl_uniform - 0.3 * kl) < 1e-14);
  CHECK(stats.losses.total() == stats.losses.kl_uniform);

  // Uniform usage (a zero gate: every p = 1/E) is the minimum, KL = 0.
  Kokkos::deep_copy(layer.router().gate().weight(), 0.0);
  CHECK(std::abs(layer.forward(x, y, RouteContext<X>{}).losses.kl_uniform) < 1e-15);
}

TEMPLATE_LIST_TEST_CASE("KL-to-uniform gradients match finite differences", "[losses][kl]",
                        ExecutionSpaces) {
  using X = TestType;
  using G = GLU<X>;
  LayerOptions kl_only;
  kl_only.losses.kl_uniform = 0.5;
  // The term alone (upstream gradient 0), then with the output and the other terms.
  MoELayer<SoftmaxTopKRouter<X, double>, G> a(SoftmaxTopKRouter<X, double>({hidden, 4, 2, true}),
                                              G({4, hidden, ffn}), kl_only);
  fill_normal(a.parameters(), 0.6, 41);
  check_layer_gradients(a, 11, 41, true);
  LayerOptions all = kl_only;
  all.losses.switch_aux = 1e-2;
  all.losses.z_loss = 1e-3;
  MoELayer<SigmoidBiasRouter<X, double>, G> b(
      SigmoidBiasRouter<X, double>({hidden, 8, 2, true, 2.5, {4, 2, 2}}), G({8, hidden, ffn}), all);
  fill_normal(b.parameters(), 0.6, 42);
  check_layer_gradients(b, 12, 42, true);
  check_layer_gradients(b, 12, 43, false);
}

TEMPLATE_LIST_TEST_CASE("global-batch aux counts every micro-batch of the window so far",
                        "[losses][global_batch]", ExecutionSpaces) {
  using X = TestType;
  using G = GLU<X>;
  const int tokens = 10, experts = 6, k = 2, window = 3;
  const double alpha = 0.02;
  LayerOptions options;
  options.losses.global_batch_aux = alpha;
  options.losses.global_batch_micro_batches = window;
  MoELayer<SoftmaxTopKRouter<X, double>, G> layer(
      SoftmaxTopKRouter<X, double>({hidden, experts, k, true}), G({experts, hidden, ffn}), options);
  fill_normal(layer.parameters(), 0.7, 51);
  const RefMatrix gate = to_ref(layer.router().gate().weight());
  const RefRouterConfig reference = reference_router(RouterKind::softmax_topk, experts, k, true);
  RouteContext<X> training, evaluation;
  training.training = true;
  std::vector<double> window_counts(experts, 0.0);
  int window_tokens = 0;
  // Micro-batches 0..2 form one window, 3..4 start the next; sizes differ.
  for (int m = 0; m < 5; ++m) {
    CAPTURE(m);
    const int rows = tokens + m;
    Matrix<double, X> x("x", rows, hidden), y("y", rows, hidden);
    fill_normal(x, 1.0, 60 + m);
    const RefMatrix logits = reference_logits(to_ref(x), gate, 1.0);
    const auto counts = reference_counts(ref_route(reference, logits), experts);
    const auto mean = reference_mean_prob(logits);
    if (m % window == 0) {
      window_counts.assign(experts, 0.0);
      window_tokens = 0;
    }
    for (int e = 0; e < experts; ++e) window_counts[e] += counts[e];
    window_tokens += rows;
    double want = 0, local = 0;
    for (int e = 0; e < experts; ++e) {
      want += window_counts[e] / (double(window_tokens) * k) * mean[e];
      local += counts[e] / (double(rows) * k) * mean[e];
    }
    want *= alpha * experts;
    local *= alpha * experts;
    // An evaluation forward reports the same value and leaves the window as it is.
    CHECK(std::abs(layer.forward(x, y, evaluation).losses.global_batch_aux - want) < 1e-14);
    CHECK(std::abs(layer.forward(x, y, evaluation).losses.global_batch_aux - want) < 1e-14);
    const auto stats = layer.forward(x, y, training);
    CHECK(std::abs(stats.losses.global_batch_aux - want) < 1e-14);
    // Past the first micro-batch of a window the counts differ from this batch's alone.
    if (m % window != 0) CHECK(std::abs(want - local) > 1e-6);
  }
}

TEMPLATE_LIST_TEST_CASE("global-batch aux gradients match finite differences inside a window",
                        "[losses][global_batch]", ExecutionSpaces) {
  using X = TestType;
  using G = GLU<X>;
  const int tokens = 10;
  LayerOptions options;
  options.losses.global_batch_aux = 0.5;
  options.losses.global_batch_micro_batches = 2;
  MoELayer<SoftmaxTopKRouter<X, double>, G> layer(
      SoftmaxTopKRouter<X, double>({hidden, 4, 2, true}), G({4, hidden, ffn}), options);
  fill_normal(layer.parameters(), 0.6, 71);
  Matrix<double, X> first("first", tokens, hidden), y("y", tokens, hidden);
  fill_normal(first, 1.0, 72);
  RouteContext<X> training;
  training.training = true;
  layer.forward(first, y, training);  // micro-batch 0 of the window
  // Micro-batch 1: its f_i holds micro-batch 0's counts, constant in its own parameters.
  check_layer_gradients(layer, tokens, 73, true, true);
  // A window of one micro-batch on one rank is the Switch term: same gradient check.
  LayerOptions single = options;
  single.losses.global_batch_micro_batches = 1;
  MoELayer<TopKSoftmaxRouter<X, double>, G> b(TopKSoftmaxRouter<X, double>({hidden, 4, 2}),
                                              G({4, hidden, ffn}), single);
  fill_normal(b.parameters(), 0.6, 74);
  check_layer_gradients(b, tokens, 75, true);
}
