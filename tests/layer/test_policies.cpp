// SPDX-License-Identifier: BSD-3-Clause
// Policy checks of the shipped types (compile time), argument validation, tie-breaking,
// experts without tokens, the empty batch, the bias update and the optimizers.
#include <catch2/catch_approx.hpp>
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <cmath>

#include "support/layer_check.hpp"
#include "support/spaces.hpp"

using namespace kmoe;
using namespace kmoe::test;
using Catch::Matchers::ContainsSubstring;

namespace {
using H = Kokkos::DefaultHostExecutionSpace;
static_assert(check_valid_router<SoftmaxTopKRouter<H, float>>());
static_assert(check_valid_router<TopKSoftmaxRouter<H, double>>());
static_assert(check_valid_router<SigmoidBiasRouter<H, float>>());
static_assert(check_valid_router<NoisyTopKRouter<H, double>>());
static_assert(check_valid_router<ExpertChoiceRouter<H, float>>());
static_assert(check_valid_router<HashRouter<H, double>>());
static_assert(check_valid_expert<SwiGLUExperts<H, float>>());
static_assert(check_valid_expert<GeGLUExperts<H, double>>());
static_assert(check_valid_expert<FFNExperts<H, float, activation::Relu>>());
static_assert(check_valid_expert<FFNExperts<H, double, activation::GeluTanh>>());
static_assert(check_valid_combiner<WeightedSumCombiner<H, float>>());
static_assert(check_valid_communicator<SingleProcessCommunicator>());
}  // namespace

TEST_CASE("bad arguments raise an exception naming the parameter and value", "[validation]") {
  using R = SoftmaxTopKRouter<H, float>;
  using E = SwiGLUExperts<H, float>;
  CHECK_THROWS_WITH(R({8, 4, 0}), ContainsSubstring("top_k = 0"));
  CHECK_THROWS_WITH(R({8, 4, 5}), ContainsSubstring("top_k = 5"));
  CHECK_THROWS_WITH(R({8, 6, 2, false, 1.0, {4, 2, 2}}), ContainsSubstring("n_group = 4"));
  CHECK_THROWS_WITH(R({8, 8, 2, false, 1.0, {4, 5, 2}}), ContainsSubstring("topk_group = 5"));
  CHECK_THROWS_WITH(R({0, 4, 1}), ContainsSubstring("hidden = 0"));
  CHECK_THROWS_AS((SigmoidBiasRouter<H, float>(SigmoidBiasConfig{8, 6, 7})),
                  kmoe::invalid_argument);
  CHECK_THROWS_WITH((ExpertChoiceRouter<H, float>(ExpertChoiceConfig{8, 4, -1.0})),
                    ContainsSubstring("capacity_factor = -1"));
  CHECK_THROWS_WITH(E({4, 8, 0}), ContainsSubstring("ffn = 0"));
  LayerOptions bad;
  bad.capacity.factor = -0.5;
  CHECK_THROWS_WITH((MoELayer<R, E>(R({8, 4, 2}), E({4, 8, 6}), bad)),
                    ContainsSubstring("capacity.factor = -0.5"));
  CHECK_THROWS_WITH((MoELayer<R, E>(R({8, 4, 2}), E({3, 8, 6}))),
                    ContainsSubstring("experts.num_experts() = 3"));
  CHECK_THROWS_WITH((MoELayer<R, E>(R({8, 4, 2}), E({4, 6, 6}))),
                    ContainsSubstring("experts.hidden_size() = 6"));

  MoELayer<R, E> layer(R({8, 4, 2}), E({4, 8, 6}));
  fill_normal(layer.parameters(), 0.1, 1);
  Matrix<float, H> x("x", 5, 8), y("y", 5, 8), wrong("wrong", 5, 7);
  CHECK_THROWS_WITH(layer.forward(x, wrong), ContainsSubstring("y extents = 5x7"));
  CHECK_THROWS_WITH(layer.forward(wrong, y), ContainsSubstring("x.extent(1) = 7"));
  CHECK_THROWS_WITH(layer.backward(y, x), ContainsSubstring("backward needs a preceding forward"));
  x(3, 2) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(layer.forward(x, y), ContainsSubstring("non-finite router logit") &&
                                             ContainsSubstring("at token 3"));
  LayerOptions propagate;
  propagate.non_finite = NonFinitePolicy::propagate;
  MoELayer<R, E> lenient(R({8, 4, 2}), E({4, 8, 6}), propagate);
  CHECK_NOTHROW(lenient.forward(x, y));

  using Hash = HashRouter<H, float>;
  MoELayer<Hash, E> hashed(Hash({8, 4}), E({4, 8, 6}));
  Matrix<float, H> clean("clean", 5, 8);
  CHECK_THROWS_WITH(hashed.forward(clean, y), ContainsSubstring("token_ids.extent(0) = 0"));
}

TEMPLATE_LIST_TEST_CASE("ties go to the lower expert index and empty batches are no-ops",
                        "[routing]", ExecutionSpaces) {
  using X = TestType;
  using R = SoftmaxTopKRouter<X, double>;
  using E = SwiGLUExperts<X, double>;
  MoELayer<R, E> layer(R({4, 6, 3}), E({6, 4, 5}));
  // A zero gate makes every logit equal: the choice must be experts 0, 1, 2.
  Matrix<double, X> x("x", 9, 4), y("y", 9, 4);
  fill_normal(x, 1.0, 3);
  layer.forward(x, y);
  const auto expert =
      Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.routing().expert);
  for (int t = 0; t < 9; ++t)
    for (int j = 0; j < 3; ++j) CHECK(expert(t, j) == j);

  // Capacity by probability among equal weights keeps the earlier tokens: experts 0-2 get
  // all 9 tokens, C = ceil(3 * 9 * 0.5 / 6) = 3, so tokens 0-2 keep every expert and
  // tokens 3-8 lose all of theirs (their output is zero: no shared expert).
  LayerOptions capped;
  capped.capacity = {0.5, 0, DropPolicy::by_probability, 1};
  MoELayer<R, E> dropping(R({4, 6, 3}), E({6, 4, 5}), capped);
  fill_normal(dropping.experts().w_gate().value, 0.5, 4);
  fill_normal(dropping.experts().w_up().value, 0.5, 5);
  fill_normal(dropping.experts().w_down().value, 0.5, 6);
  const auto capped_stats = dropping.forward(x, y);
  CHECK(capped_stats.capacity == 3);
  CHECK(capped_stats.dropped == 18);
  const auto position =
      Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), dropping.positions());
  const auto out = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), y);
  for (int t = 0; t < 9; ++t) {
    double magnitude = 0;
    for (int h = 0; h < 4; ++h) magnitude += std::abs(out(t, h));
    for (int j = 0; j < 3; ++j) CHECK((position(t, j) >= 0) == (t < 3));
    CHECK((magnitude > 0) == (t < 3));
  }

  // Expert choice among equal scores: each expert takes the lowest token indices
  // (C = ceil(9 * 1 / 6) = 2: tokens 0 and 1 get every expert, the rest none).
  using Choice = ExpertChoiceRouter<X, double>;
  MoELayer<Choice, E> choosing(Choice({4, 6, 1.0}), E({6, 4, 5}));
  choosing.forward(x, y);
  const auto chosen =
      Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), choosing.routing().expert);
  for (int t = 0; t < 9; ++t) {
    int experts_of_token = 0;
    for (std::size_t s = 0; s < chosen.extent(1); ++s) experts_of_token += chosen(t, s) >= 0;
    CHECK(experts_of_token == (t < 2 ? 6 : 0));
  }

  Matrix<double, X> x0("x0", 0, 4), y0("y0", 0, 4), g0("g0", 0, 4);
  RouteContext<X> context;
  context.training = true;
  const auto stats = layer.forward(x0, y0, context);
  CHECK(stats.assignments == 0);
  CHECK_NOTHROW(layer.backward(y0, g0));
}

TEMPLATE_LIST_TEST_CASE("an expert without tokens, capacity that drops, and the bias update",
                        "[routing]", ExecutionSpaces) {
  using X = TestType;
  using R = SigmoidBiasRouter<X, double>;
  using E = SwiGLUExperts<X, double>;
  LayerOptions options;
  options.capacity = {0.5, 0, DropPolicy::by_probability, 1};
  MoELayer<R, E> layer(R({6, 4, 2, true, 1.0, {}}), E({4, 6, 5}), options);
  fill_normal(layer.parameters(), 0.3, 8);
  auto bias = Kokkos::create_mirror_view(layer.router().bias());
  const double skew[4] = {0.5, 0.2, -10.0, 0.0};  // expert 2 never chosen, expert 0 favoured
  for (int e = 0; e < 4; ++e) bias(e) = skew[e];
  Kokkos::deep_copy(layer.router().bias(), bias);
  const int tokens = 40;
  Matrix<double, X> x("x", tokens, 6), y("y", tokens, 6);
  fill_normal(x, 1.0, 9);
  const auto stats = layer.forward(x, y);
  CHECK(stats.tokens_per_expert[2] == 0);
  CHECK(stats.capacity == 10);  // ceil(2 * 40 * 0.5 / 4)
  std::int64_t over = 0;
  for (auto c : stats.tokens_per_expert) over += std::max<std::int64_t>(0, c - 10);
  CHECK(over > 0);
  CHECK(stats.dropped == over);
  RefRouterConfig rc;
  rc.kind = RouterKind::sigmoid_bias;
  rc.experts = 4;
  rc.top_k = 2;
  rc.normalize = true;
  rc.bias.assign(skew, skew + 4);
  RefMatrix gate = to_ref(layer.router().gate().weight());
  CHECK(compare_forward(layer, rc, x, y, stats, &gate).output_error < 1e-6);

  // The aux-loss-free update moves load toward balance on a skewed router.
  const double mild[4] = {0.4, 0.1, -0.4, 0.0};
  for (int e = 0; e < 4; ++e) bias(e) = mild[e];
  Kokkos::deep_copy(layer.router().bias(), bias);
  RouteContext<X> training;
  training.training = true;
  // An evaluation pass does not count toward the update.
  layer.forward(x, y);
  CHECK(std::all_of(layer.pending_bias_counts().begin(), layer.pending_bias_counts().end(),
                    [](std::int64_t c) { return c == 0; }));
  const double before = layer.forward(x, y, training).imbalance();
  double after = before;
  for (int step = 0; step < 200; ++step) {
    layer.apply_bias_update(0.01);
    after = layer.forward(x, y, training).imbalance();
  }
  CAPTURE(before, after);
  CHECK(after < before);
  CHECK(after < 1.3);
}

TEST_CASE("SGD with momentum and AdamW match hand-computed steps", "[optimizer]") {
  Vector<double, H> w("w", 2), g("g", 2);
  ParameterList<H, double> list{make_parameter<H>("w", w, g)};
  w(0) = 1.0, w(1) = -2.0;
  g(0) = 0.5, g(1) = 0.25;
  SGD<H, double> sgd(list, {0.1, 0.9, 0.0});
  sgd.step();  // v = g, w -= 0.1 v
  CHECK(w(0) == Catch::Approx(0.95).epsilon(1e-14));
  g(0) = 1.0;
  sgd.step();  // v = 0.9 * 0.5 + 1.0 = 1.45, w = 0.95 - 0.145
  CHECK(w(0) == Catch::Approx(0.805).epsilon(1e-14));

  w(0) = 1.0, w(1) = -2.0;
  g(0) = 0.5, g(1) = 0.25;
  AdamW<H, double> adam(list, {0.01, 0.9, 0.999, 1e-8, 0.1});
  adam.step();
  // Step 1: w *= (1 - lr wd); m_hat = g, v_hat = g^2, so w -= lr * g / (|g| + eps).
  CHECK(w(0) == Catch::Approx(1.0 * (1 - 0.001) - 0.01 * 0.5 / (0.5 + 1e-8)).epsilon(1e-14));
  CHECK(w(1) == Catch::Approx(-2.0 * (1 - 0.001) - 0.01 * 0.25 / (0.25 + 1e-8)).epsilon(1e-14));
  g(0) = 3.0, g(1) = 4.0;
  CHECK(clip_grad_norm(list, 1.0) == Catch::Approx(5.0));
  CHECK(g(0) == Catch::Approx(0.6).epsilon(1e-6));
  CHECK(g(1) == Catch::Approx(0.8).epsilon(1e-6));
}

TEMPLATE_LIST_TEST_CASE("AdamW and SGD with weight decay over several steps match plain loops",
                        "[optimizer]", ExecutionSpaces) {
  using X = TestType;
  constexpr int n = 5, steps = 4;
  Vector<double, X> w("w", n), g("g", n);
  ParameterList<X, double> list{make_parameter<X>("w", w, g)};
  auto w_host = Kokkos::create_mirror_view(w);
  auto g_host = Kokkos::create_mirror_view(g);
  const auto gradient = [](int step, int j) { return std::sin(1.3 * step + 0.7 * j) * (j + 1); };
  const auto start = [](int j) { return 0.5 - 0.3 * j; };

  // AdamW (torch.optim.AdamW): w *= 1 - lr wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
  // w -= lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).
  const double lr = 0.05, b1 = 0.8, b2 = 0.95, eps = 1e-6, wd = 0.2;
  std::vector<double> ref(n), m(n, 0.0), v(n, 0.0);
  for (int j = 0; j < n; ++j) ref[j] = w_host(j) = start(j);
  Kokkos::deep_copy(w, w_host);
  AdamW<X, double> adam(list, {lr, b1, b2, eps, wd});
  for (int t = 1; t <= steps; ++t) {
    for (int j = 0; j < n; ++j) {
      const double grad = gradient(t, j);
      g_host(j) = grad;
      ref[j] *= 1 - lr * wd;
      m[j] = b1 * m[j] + (1 - b1) * grad;
      v[j] = b2 * v[j] + (1 - b2) * grad * grad;
      ref[j] -=
          lr * (m[j] / (1 - std::pow(b1, t))) / (std::sqrt(v[j] / (1 - std::pow(b2, t))) + eps);
    }
    Kokkos::deep_copy(g, g_host);
    adam.step();
  }
  Kokkos::deep_copy(w_host, w);
  for (int j = 0; j < n; ++j) CHECK(w_host(j) == Catch::Approx(ref[j]).epsilon(1e-13));

  // SGD (torch.optim.SGD): d = g + wd w; buf = d at step 1, mu buf + d after; w -= lr buf.
  const double mu = 0.7, sgd_wd = 0.1;
  std::vector<double> buffer(n, 0.0);
  for (int j = 0; j < n; ++j) ref[j] = w_host(j) = start(j);
  Kokkos::deep_copy(w, w_host);
  SGD<X, double> sgd(list, {lr, mu, sgd_wd});
  for (int t = 1; t <= steps; ++t) {
    for (int j = 0; j < n; ++j) {
      const double d = gradient(t, j) + sgd_wd * ref[j];
      g_host(j) = gradient(t, j);
      buffer[j] = t == 1 ? d : mu * buffer[j] + d;
      ref[j] -= lr * buffer[j];
    }
    Kokkos::deep_copy(g, g_host);
    sgd.step();
  }
  Kokkos::deep_copy(w_host, w);
  for (int j = 0; j < n; ++j) CHECK(w_host(j) == Catch::Approx(ref[j]).epsilon(1e-13));
}
