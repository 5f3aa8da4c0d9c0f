// SPDX-License-Identifier: BSD-3-Clause
// SoftmaxTopKRouter's ERNIE-4.5 options, against plain loops written from the definition:
// selection by top-k of p + b (b the selection bias, p = softmax(x W^T)), weights p over
// max(sum of the chosen p, norm_min); the backward against central finite differences of
// those loops, on both sides of the clamp.
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/matchers/catch_matchers_exception.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include "support/spaces.hpp"

#include <kmoe/routers/softmax_topk.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

using namespace kmoe;
using namespace kmoe::test;

namespace {

constexpr int hidden = 6, experts = 8, top_k = 2, tokens = 29;

struct Reference {
  std::vector<std::vector<int>> chosen;  ///< per token, descending p + b (ties: lower index)
  std::vector<std::vector<double>> weight;
};

std::vector<double> softmax(const std::vector<double>& l) {
  const double m = *std::max_element(l.begin(), l.end());
  std::vector<double> p(l.size());
  double sum = 0;
  for (std::size_t e = 0; e < l.size(); ++e) sum += p[e] = std::exp(l[e] - m);
  for (auto& v : p) v /= sum;
  return p;
}

/// Top-k of p + b for every token of `logits` [T][E]; weights p_e / max(sum, norm_min).
Reference reference(const std::vector<std::vector<double>>& logits, const std::vector<double>& b,
                    double norm_min) {
  Reference r;
  for (const auto& row : logits) {
    const auto p = softmax(row);
    std::vector<int> order(experts);
    for (int e = 0; e < experts; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(),
                     [&](int i, int j) { return p[i] + b[i] > p[j] + b[j]; });
    order.resize(top_k);
    double sum = 0;
    for (int e : order) sum += p[e];
    std::vector<double> w;
    for (int e : order) w.push_back(p[e] / std::max(sum, norm_min));
    r.chosen.push_back(order);
    r.weight.push_back(w);
  }
  return r;
}

/// L = sum_j c_j w_j of the reference, the selection held at `chosen`.
double loss(const std::vector<double>& logits_row, const std::vector<int>& chosen,
            const std::vector<double>& c, double norm_min) {
  const auto p = softmax(logits_row);
  double sum = 0;
  for (int e : chosen) sum += p[e];
  double l = 0;
  for (std::size_t j = 0; j < chosen.size(); ++j)
    l += c[j] * p[chosen[j]] / std::max(sum, norm_min);
  return l;
}

template <class X>
void check(double norm_min, bool expect_clamped, bool expect_unclamped) {
  using R = SoftmaxTopKRouter<X, double>;
  SoftmaxTopKConfig config{hidden, experts, top_k, true};
  config.selection_bias = true;
  config.norm_min = norm_min;
  R router(config);
  REQUIRE(router.bias().extent(0) == std::size_t(experts));

  std::mt19937_64 rng(17 + std::uint64_t(norm_min * 100));
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> uniform(-0.2, 0.2);
  Matrix<double, X> x("x", tokens, hidden);
  auto x_host = Kokkos::create_mirror_view(x);
  auto w_host = Kokkos::create_mirror_view(router.gate().weight());
  auto b_host = Kokkos::create_mirror_view(router.bias());
  for (int t = 0; t < tokens; ++t)
    for (int h = 0; h < hidden; ++h) x_host(t, h) = normal(rng);
  for (int e = 0; e < experts; ++e)
    for (int h = 0; h < hidden; ++h) w_host(e, h) = 0.5 * normal(rng);
  std::vector<double> b(experts);
  for (int e = 0; e < experts; ++e) b_host(e) = b[e] = uniform(rng);
  Kokkos::deep_copy(x, x_host);
  Kokkos::deep_copy(router.gate().weight(), w_host);
  Kokkos::deep_copy(router.bias(), b_host);

  std::vector<std::vector<double>> logits(tokens, std::vector<double>(experts));
  for (int t = 0; t < tokens; ++t)
    for (int e = 0; e < experts; ++e)
      for (int h = 0; h < hidden; ++h) logits[t][e] += x_host(t, h) * w_host(e, h);
  const Reference ref = reference(logits, b, norm_min);
  const Reference unbiased = reference(logits, std::vector<double>(experts, 0.0), norm_min);

  RoutingPlan<X, double> plan;
  router.forward(x, plan, RouteContext<X>{});
  const auto expert = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plan.expert);
  const auto weight = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plan.weight);
  int biased_tokens = 0, clamped = 0, unclamped = 0;
  for (int t = 0; t < tokens; ++t) {
    CAPTURE(t);
    for (int j = 0; j < top_k; ++j) {
      CHECK(expert(t, j) == ref.chosen[t][j]);
      CHECK(std::abs(weight(t, j) - ref.weight[t][j]) < 1e-12);
    }
    biased_tokens += ref.chosen[t] != unbiased.chosen[t];
    const auto p = softmax(logits[t]);
    const double sum = p[ref.chosen[t][0]] + p[ref.chosen[t][1]];
    (sum < norm_min ? clamped : unclamped) += 1;
  }
  CHECK(biased_tokens > 0);  // the bias changes some selection, or the test proves nothing
  CHECK((clamped > 0) == expect_clamped);
  CHECK((unclamped > 0) == expect_unclamped);

  // Backward of L = sum_j c_j w_j against central differences in the logits.
  std::vector<std::vector<double>> c(tokens, std::vector<double>(top_k));
  Matrix<double, X> grad_weight("grad_weight", tokens, top_k);
  auto gw_host = Kokkos::create_mirror_view(grad_weight);
  for (int t = 0; t < tokens; ++t)
    for (int j = 0; j < top_k; ++j) gw_host(t, j) = c[t][j] = normal(rng);
  Kokkos::deep_copy(grad_weight, gw_host);
  Matrix<double, X> grad_logits("grad_logits", tokens, experts), grad_x("grad_x", tokens, hidden);
  router.backward(x, plan, grad_weight, grad_logits, grad_x);
  const auto gl = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), grad_logits);
  const double h = 1e-6;
  for (int t = 0; t < tokens; ++t) {
    const auto p = softmax(logits[t]);
    const double sum = p[ref.chosen[t][0]] + p[ref.chosen[t][1]];
    if (std::abs(sum - norm_min) < 1e-4) continue;  // the clamp's kink: no derivative
    for (int e = 0; e < experts; ++e) {
      auto up = logits[t], down = logits[t];
      up[e] += h, down[e] -= h;
      const double fd =
          (loss(up, ref.chosen[t], c[t], norm_min) - loss(down, ref.chosen[t], c[t], norm_min)) /
          (2 * h);
      CAPTURE(t, e, fd, gl(t, e));
      CHECK(std::abs(gl(t, e) - fd) < 1e-7 * (1 + std::abs(fd)));
    }
  }
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("selection bias and clamped normalisation match plain loops",
                        "[router][ernie]", ExecutionSpaces) {
  // The sum of two of 8 probabilities lies in (0, 1): norm_min 0 never clamps; here 0.99
  // clamps every token and 0.6 some of them.
  SECTION("norm_min 0") { check<TestType>(0.0, false, true); }
  SECTION("norm_min below every sum") { check<TestType>(1e-12, false, true); }
  SECTION("norm_min above every sum") { check<TestType>(0.99, true, false); }
  SECTION("norm_min between") { check<TestType>(0.6, true, true); }
}

TEST_CASE("selection bias and norm_min settings are checked", "[router][ernie]") {
  using H = Kokkos::DefaultHostExecutionSpace;
  SoftmaxTopKConfig config{4, 8, 2, true};
  using R = SoftmaxTopKRouter<H, float>;
  CHECK(R(config).bias().extent(0) == 0);  // no bias unless asked
  config.norm_min = -1e-3;
  CHECK_THROWS_MATCHES(
      R(config), invalid_argument,
      Catch::Matchers::MessageMatches(Catch::Matchers::ContainsSubstring("norm_min")));
  config.norm_min = std::nan("");
  CHECK_THROWS_AS(R(config), invalid_argument);
}
