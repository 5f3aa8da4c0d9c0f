// SPDX-License-Identifier: BSD-3-Clause
// SparseMixerRouter (Phi-MoE's sparsemixer, inference path) against plain loops of its
// definition and hand-computed cases (a neighbour exactly at, just inside and just outside
// the 2 eps threshold; negative maxima, where clamp(|l|, min = m) decides), and its
// backward against central finite differences of the slot weights.
#include <kmoe/kmoe.hpp>

#include <catch2/catch_approx.hpp>
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_exception.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include "support/spaces.hpp"

#include <cmath>
#include <limits>
#include <random>
#include <vector>

using namespace kmoe;
using namespace kmoe::test;

namespace {

/// One slot of the reference: winner, weight, and which experts its softmax keeps.
struct RefSlot {
  int winner = -1;
  double weight = 0;
  std::vector<bool> kept;
};

/// sparsemixer's inference path for one token's logits, written from its definition: the
/// masks in the logits' own type R (so that ties to the threshold round as the router's),
/// the softmax in long double.
template <class R>
std::vector<RefSlot> ref_sparse_mixer(const std::vector<R>& logits, double eps) {
  const int experts = int(logits.size());
  const R threshold = R(2 * eps);
  std::vector<RefSlot> slots(2);
  for (int j = 0; j < 2; ++j) {
    RefSlot& s = slots[j];
    for (int e = 0; e < experts; ++e)
      if ((j == 0 || e != slots[0].winner) && (s.winner < 0 || logits[e] > logits[s.winner]))
        s.winner = e;
    const R best = logits[s.winner];
    s.kept.assign(experts, false);
    long double sum = 0;
    for (int e = 0; e < experts; ++e) {
      if (j == 1 && e == slots[0].winner) continue;
      const R factor = std::max(R(std::abs(logits[e])), best);
      s.kept[e] = !((best - logits[e]) / factor > threshold);
      if (s.kept[e]) sum += std::exp((long double)logits[e]);
    }
    s.weight = double(std::exp((long double)best) / sum);
  }
  return slots;
}

/// A router whose gate is the identity (hidden = experts), so that its logits are the
/// input exactly and a test can place them on the threshold.
template <class X, class S>
SparseMixerRouter<X, S> identity_router(int experts, double eps) {
  SparseMixerRouter<X, S> router({experts, experts, eps});
  auto w = Kokkos::create_mirror_view(router.gate().weight());
  for (int e = 0; e < experts; ++e)
    for (int h = 0; h < experts; ++h) w(e, h) = e == h ? S(1) : S(0);
  Kokkos::deep_copy(router.gate().weight(), w);
  return router;
}

template <class X, class S>
Matrix<S, X> matrix_of(const std::vector<std::vector<S>>& rows) {
  Matrix<S, X> m("m", rows.size(), rows.at(0).size());
  auto h = Kokkos::create_mirror_view(m);
  for (std::size_t t = 0; t < rows.size(); ++t)
    for (std::size_t e = 0; e < rows[t].size(); ++e) h(t, e) = rows[t][e];
  Kokkos::deep_copy(m, h);
  return m;
}

template <class X, class S>
RoutingPlan<X, S> route(SparseMixerRouter<X, S>& router, const Matrix<S, X>& x) {
  RoutingPlan<X, S> plan;
  router.forward(x, plan, RouteContext<X>{});
  return plan;
}

/// Checks every token of `plan` against ref_sparse_mixer of its own logits; returns, per
/// slot, how many tokens kept more than the winner.
template <class X, class S>
std::vector<int> check_against_reference(const RoutingPlan<X, S>& plan, double eps) {
  const auto logits = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plan.logits);
  const auto probs = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plan.probs);
  const auto expert = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plan.expert);
  const auto weight = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plan.weight);
  const int experts = int(logits.extent(1));
  REQUIRE(expert.extent(1) == 2);
  std::vector<int> runners_up(2, 0);
  for (std::size_t t = 0; t < logits.extent(0); ++t) {
    std::vector<S> row(experts);
    for (int e = 0; e < experts; ++e) row[e] = logits(t, e);
    const auto ref = ref_sparse_mixer(row, eps);
    long double z = 0;
    for (int e = 0; e < experts; ++e) z += std::exp((long double)row[e]);
    for (int e = 0; e < experts; ++e)
      CHECK(double(probs(t, e)) ==
            Catch::Approx(double(std::exp((long double)row[e]) / z)).epsilon(1e-5));
    for (int j = 0; j < 2; ++j) {
      CAPTURE(t, j);
      CHECK(expert(t, j) == ref[j].winner);
      CHECK(double(weight(t, j)) == Catch::Approx(ref[j].weight).epsilon(1e-5));
      int kept = 0;
      for (int e = 0; e < experts; ++e) kept += ref[j].kept[e];
      runners_up[j] += kept > 1;
    }
  }
  return runners_up;
}

template <class X, class S>
void fill_uniform(const Matrix<S, X>& m, double scale, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-scale, scale);
  auto h = Kokkos::create_mirror_view(m);
  for (std::size_t i = 0; i < h.extent(0); ++i)
    for (std::size_t j = 0; j < h.extent(1); ++j) h(i, j) = S(u(rng));
  Kokkos::deep_copy(m, h);
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("sparsemixer keeps a neighbour exactly at 2 eps and masks one just past",
                        "[router][sparse_mixer]", ExecutionSpaces) {
  using X = TestType;
  using S = float;
  // eps = 1/8: threshold 1/4, and every ratio below is exact in float.
  const double eps = 0.125;
  const S below = std::nextafter(S(0.75), S(0));  // ratio just above 1/4: masked
  const S above = std::nextafter(S(0.75), S(1));  // ratio just below 1/4: kept
  auto router = identity_router<X, S>(5, eps);
  const auto x = matrix_of<X, S>({
      {1.0f, 0.75f, -2.0f, 0.5f, -3.0f},     // slot 1 keeps 0.75 (ratio exactly 1/4)
      {1.0f, below, -2.0f, 0.5f, -3.0f},     // ... and masks it one ulp lower
      {1.0f, above, 0.75f, 0.5f, -3.0f},     // keeps both; slot 2 keeps 0.75 from `above`
      {-1.0f, -1.3f, -1.25f, -4.0f, -2.0f},  // negative maxima: factor |l|, not |m|
  });
  const auto plan = route(router, x);
  check_against_reference(plan, eps);
  const auto w = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plan.weight);
  const auto ex = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plan.expert);
  const auto softmax_at_first = [](std::vector<double> kept) {
    double z = 0;
    for (double l : kept) z += std::exp(l);
    return std::exp(kept[0]) / z;
  };
  // Token 0: slot 1 keeps {1, 0.75}; slot 2, won by 0.75, masks 0.5 ((0.75 - 0.5) / 0.75 = 1/3).
  CHECK(ex(0, 0) == 0);
  CHECK(ex(0, 1) == 1);
  CHECK(w(0, 0) == Catch::Approx(softmax_at_first({1.0, 0.75})).epsilon(1e-6));
  CHECK(w(0, 1) == Catch::Approx(1.0).epsilon(1e-6));
  // Token 1: the neighbour one ulp further is masked, so slot 1's weight is 1.
  CHECK(w(1, 0) == Catch::Approx(1.0).epsilon(1e-6));
  // Token 2: slot 1 keeps `above` and 0.75; slot 2 (won by `above`) keeps 0.75 (ratio < 1/4)
  // and masks 0.5 ((above - 0.5) / above > 1/4), never slot 1's expert.
  CHECK(ex(2, 0) == 0);
  CHECK(ex(2, 1) == 1);
  CHECK(w(2, 0) == Catch::Approx(softmax_at_first({1.0, double(above), 0.75})).epsilon(1e-6));
  CHECK(w(2, 1) == Catch::Approx(softmax_at_first({double(above), 0.75})).epsilon(1e-6));
  // Token 3: all logits negative. Slot 1 (m = -1): -1.25 has ratio 0.25 / 1.25 = 0.2, kept;
  // -1.3 has 0.3 / 1.3 < 1/4, kept (dividing by |m| = 1 would give 0.3 and mask it);
  // -2 has 1 / 2, masked. Slot 2 (won by -1.25, m = -1.25): -1.3 has 0.05 / 1.3, kept.
  CHECK(ex(3, 0) == 0);
  CHECK(ex(3, 1) == 2);
  CHECK(w(3, 0) == Catch::Approx(softmax_at_first({-1.0, -1.25, -1.3})).epsilon(1e-6));
  CHECK(w(3, 1) == Catch::Approx(softmax_at_first({-1.25, -1.3})).epsilon(1e-6));
}

TEMPLATE_LIST_TEST_CASE("sparsemixer's factor clamps |l| from below by a positive winner",
                        "[router][sparse_mixer]", ExecutionSpaces) {
  using X = TestType;
  using S = double;
  auto router = identity_router<X, S>(4, 0.125);
  // Slot 1 (m = 1): 0.78 has ratio 0.22 / max(0.78, 1) = 0.22, kept (dividing by |l| would
  // give 0.282 and mask it); 0.6 has 0.4, -0.1 has 1.1 / max(0.1, 1): masked. Slot 2
  // (m = 0.78): 0.6 has 0.18 / 0.78 = 0.23, kept; -0.1 masked.
  const auto plan = route(router, matrix_of<X, S>({{1.0, 0.78, -0.1, 0.6}}));
  check_against_reference(plan, 0.125);
  const auto w = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plan.weight);
  CHECK(w(0, 0) == Catch::Approx(1 / (1 + std::exp(-0.22))).epsilon(1e-12));
  CHECK(w(0, 1) == Catch::Approx(1 / (1 + std::exp(-0.18))).epsilon(1e-12));
}

TEMPLATE_LIST_TEST_CASE("sparsemixer matches plain loops on random tokens",
                        "[router][sparse_mixer]", ExecutionSpaces) {
  using X = TestType;
  using S = float;
  const double eps = 0.1;
  const int tokens = 53, hidden = 12, experts = 7;
  SparseMixerRouter<X, S> router({hidden, experts, eps});
  fill_uniform<X, S>(router.gate().weight(), 0.6, 1);
  Matrix<S, X> x("x", tokens, hidden);
  fill_uniform<X, S>(x, 1.0, 2);
  const auto runners_up = check_against_reference(route(router, x), eps);
  // The masks matter here: each slot keeps a runner-up for some tokens, not for all.
  for (int j = 0; j < 2; ++j) {
    CHECK(runners_up[j] > 0);
    CHECK(runners_up[j] < tokens);
  }
}

TEMPLATE_LIST_TEST_CASE("sparsemixer's backward is the derivative of its weights",
                        "[router][sparse_mixer]", ExecutionSpaces) {
  using X = TestType;
  using S = double;
  const double eps = 0.15;
  const int tokens = 9, hidden = 6, experts = 5;
  SparseMixerRouter<X, S> router({hidden, experts, eps});
  fill_uniform<X, S>(router.gate().weight(), 0.8, 3);
  Matrix<S, X> x("x", tokens, hidden);
  fill_uniform<X, S>(x, 1.0, 4);
  Matrix<S, X> upstream("upstream", tokens, 2);  // dLoss/dw: loss = sum upstream * w
  fill_uniform<X, S>(upstream, 1.0, 5);
  const auto up = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), upstream);

  const auto loss = [&]() {
    const auto plan = route(router, x);
    const auto w = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plan.weight);
    double sum = 0;
    for (int t = 0; t < tokens; ++t)
      for (int j = 0; j < 2; ++j) sum += up(t, j) * w(t, j);
    return sum;
  };
  const auto plan = route(router, x);
  const auto runners_up = check_against_reference(plan, eps);
  REQUIRE(runners_up[0] > 0);  // gradient reaches a non-winner in each slot
  REQUIRE(runners_up[1] > 0);
  Matrix<S, X> grad_logits("grad_logits", tokens, experts), grad_x("grad_x", tokens, hidden);
  Kokkos::deep_copy(router.gate().grad(), S(0));
  router.backward(x, plan, upstream, grad_logits, grad_x);
  const auto gx = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), grad_x);
  const auto gw = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), router.gate().grad());

  // Central differences; h is far below every mask's distance to the threshold here, so the
  // masks (constants of the derivative) do not flip.
  const double h = 1e-6;
  const auto central = [&](const Matrix<S, X>& m, int i, int k) {
    auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), m);
    const S keep = host(i, k);
    host(i, k) = keep + h;
    Kokkos::deep_copy(m, host);
    const double plus = loss();
    host(i, k) = keep - h;
    Kokkos::deep_copy(m, host);
    const double minus = loss();
    host(i, k) = keep;
    Kokkos::deep_copy(m, host);
    return (plus - minus) / (2 * h);
  };
  for (int t = 0; t < tokens; ++t)
    for (int k = 0; k < hidden; ++k) {
      CAPTURE(t, k);
      CHECK(gx(t, k) == Catch::Approx(central(x, t, k)).margin(1e-7));
    }
  for (int e = 0; e < experts; ++e)
    for (int k = 0; k < hidden; ++k) {
      CAPTURE(e, k);
      CHECK(gw(e, k) == Catch::Approx(central(router.gate().weight(), e, k)).margin(1e-7));
    }
}

TEMPLATE_LIST_TEST_CASE("sparsemixer refuses one expert and a negative or non-finite eps",
                        "[router][sparse_mixer]", ExecutionSpaces) {
  using X = TestType;
  using R = SparseMixerRouter<X, float>;
  using Catch::Matchers::ContainsSubstring;
  using Catch::Matchers::MessageMatches;
  CHECK_THROWS_MATCHES(R({4, 1, 0.01}), invalid_argument,
                       MessageMatches(ContainsSubstring("experts") && ContainsSubstring("two")));
  CHECK_THROWS_MATCHES(R({4, 4, -0.01}), invalid_argument,
                       MessageMatches(ContainsSubstring("jitter_eps")));
  CHECK_THROWS_MATCHES(R({4, 4, std::numeric_limits<double>::quiet_NaN()}), invalid_argument,
                       MessageMatches(ContainsSubstring("jitter_eps")));
  CHECK(R({4, 2, 0.0}).slots_per_token() == 2);
}
