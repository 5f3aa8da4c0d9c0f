// SPDX-License-Identifier: BSD-3-Clause
// GPT-OSS's pieces: the clamped SwiGLU (its value against the formula, its derivatives against
// finite differences, zero where a clamp is active), and a layer of the top-k-softmax router
// with a logit bias and ClampedSwiGLUExperts with biases against plain loops (forward) and
// central finite differences (every gradient, the biases included), with the clamps active.
#include <catch2/catch_approx.hpp>
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>

#include <kmoe/experts/clamped_swiglu.hpp>
#include <kmoe/kmoe.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "support/layer_check.hpp"
#include "support/spaces.hpp"

using namespace kmoe;
using namespace kmoe::test;

namespace {

constexpr double alpha = 1.702;
constexpr double limit = 0.6;  // small, so that the random pre-activations cross it

// The formula as transformers writes it (GptOssExperts._apply_gate).
double reference_h(double g, double u) {
  const double z = std::min(g, limit), v = std::max(-limit, std::min(u, limit));
  return (v + 1) * z / (1 + std::exp(-alpha * z));
}

template <class V>
std::vector<double> host_values(const V& v) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  return std::vector<double>(h.data(), h.data() + h.size());
}

template <class V>
void set_element(const V& v, std::size_t i, double value) {
  Kokkos::deep_copy(Kokkos::subview(v, i), value);
}

}  // namespace

TEST_CASE("clamped SwiGLU: value, derivatives, and no gradient through an active clamp",
          "[experts][clamped_swiglu]") {
  const double a = alpha, L = limit, h = 1e-6;
  int clamped_gate = 0, clamped_up = 0;
  for (double g = -2.05; g < 2.1; g += 0.1) {
    for (double u = -2.05; u < 2.1; u += 0.1) {
      CAPTURE(g, u);
      CHECK(ClampedSwiGLU::value(g, u, a, L) == Catch::Approx(reference_h(g, u)).epsilon(1e-14));
      double dg = 0, du = 0;
      ClampedSwiGLU::backward(g, u, a, L, 1.0, dg, du);
      const double fd_g = (reference_h(g + h, u) - reference_h(g - h, u)) / (2 * h);
      const double fd_u = (reference_h(g, u + h) - reference_h(g, u - h)) / (2 * h);
      CHECK(std::abs(dg - fd_g) < 1e-8);
      CHECK(std::abs(du - fd_u) < 1e-8);
      if (g > L) {
        CHECK(dg == 0.0);
        ++clamped_gate;
      }
      if (std::abs(u) > L) {
        CHECK(du == 0.0);
        ++clamped_up;
      }
      // The incoming gradient scales both.
      double dg3 = 0, du3 = 0;
      ClampedSwiGLU::backward(g, u, a, L, 3.0, dg3, du3);
      CHECK(dg3 == Catch::Approx(3 * dg));
      CHECK(du3 == Catch::Approx(3 * du));
    }
  }
  CHECK(clamped_gate > 0);
  CHECK(clamped_up > 0);
  // At a bound itself torch's clamp passes no gradient either.
  for (const double bound : {L, -L}) {
    double dg = 1, du = 1;
    ClampedSwiGLU::backward(L, bound, a, L, 1.0, dg, du);
    CHECK(dg == 0.0);
    CHECK(du == 0.0);
  }
  // The (up + 1) term: at u = 0 the gate's GLU passes unchanged.
  CHECK(ClampedSwiGLU::value(0.3, 0.0, a, L) == Catch::Approx(0.3 / (1 + std::exp(-a * 0.3))));
}

TEST_CASE("clamped SwiGLU experts reject bad settings", "[experts][clamped_swiglu]") {
  using X = Kokkos::DefaultHostExecutionSpace;
  using E = ClampedSwiGLUExperts<X, double>;
  CHECK_THROWS_AS(E({2, 4, 3, true}, ClampedSwiGLU{1.702, 0.0}), kmoe::invalid_argument);
  CHECK_THROWS_AS(E({2, 4, 3, true}, ClampedSwiGLU{1.702, -1.0}), kmoe::invalid_argument);
  CHECK_THROWS_AS(E({2, 4, 3, true}, ClampedSwiGLU{std::nan(""), 7.0}), kmoe::invalid_argument);
  CHECK_THROWS_AS(E({1, 4, 3, true, true}, ClampedSwiGLU{}), kmoe::invalid_argument);
}

TEMPLATE_LIST_TEST_CASE("GPT-OSS block (biased top-k-softmax router, clamped SwiGLU experts)",
                        "[experts][clamped_swiglu][router_bias]", ExecutionSpaces) {
  using X = TestType;
  using S = double;
  using Router = TopKSoftmaxRouter<X, S>;
  using Experts = ClampedSwiGLUExperts<X, S>;
  const int T = 9, H = 6, E = 5, K = 2, F = 4;
  const ExpertMode mode = GENERATE(ExpertMode::store, ExpertMode::recompute);
  TopKSoftmaxConfig rc{H, E, K};
  rc.bias = true;
  LayerOptions options;
  options.training_mode = mode;
  MoELayer<Router, Experts> layer(Router(rc), Experts({E, H, F, true}, ClampedSwiGLU{alpha, limit}),
                                  options);
  fill_normal(layer.parameters(), 0.5, 11);
  Matrix<S, X> x("x", T, H), y("y", T, H), g("g", T, H), grad_x("grad_x", T, H);
  fill_normal(x, 1.0, 12);
  fill_normal(g, 1.0, 13);

  std::vector<std::string> names;
  for (const auto& p : layer.parameters()) names.push_back(p.name);
  const std::vector<std::string> expected = {"router.weight",  "router.bias",   "experts.w_gate",
                                             "experts.b_gate", "experts.w_up",  "experts.b_up",
                                             "experts.w_down", "experts.b_down"};
  CHECK(names == expected);

  // Forward against plain loops.
  const auto param = [&](const std::string& name) {
    for (const auto& p : layer.parameters())
      if (p.name == name) return host_values(p.value);
    FAIL("no parameter " << name);
    return std::vector<double>();
  };
  const auto Wr = param("router.weight"), br = param("router.bias");
  const auto Wg = param("experts.w_gate"), bg = param("experts.b_gate");
  const auto Wu = param("experts.w_up"), bu = param("experts.b_up");
  const auto Wd = param("experts.w_down"), bd = param("experts.b_down");
  const auto xs = host_values(x);
  RouteContext<X> context;
  context.training = true;
  layer.forward(x, y, context);
  const auto ys = host_values(y);
  int gate_clamped = 0, up_clamped_above = 0, up_clamped_below = 0;
  for (int t = 0; t < T; ++t) {
    std::vector<double> logit(E);
    for (int e = 0; e < E; ++e) {
      logit[e] = br[e];
      for (int k = 0; k < H; ++k) logit[e] += xs[t * H + k] * Wr[e * H + k];
    }
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logit[a] > logit[b]; });
    double denominator = 0;
    for (int j = 0; j < K; ++j) denominator += std::exp(logit[order[j]] - logit[order[0]]);
    for (int i = 0; i < H; ++i) {
      double out = 0;
      for (int j = 0; j < K; ++j) {
        const int e = order[j];
        const double w = std::exp(logit[e] - logit[order[0]]) / denominator;
        double expert_out = bd[e * H + i];
        for (int f = 0; f < F; ++f) {
          double gate = bg[e * F + f], up = bu[e * F + f];
          for (int k = 0; k < H; ++k) {
            gate += Wg[(e * F + f) * H + k] * xs[t * H + k];
            up += Wu[(e * F + f) * H + k] * xs[t * H + k];
          }
          if (i == 0) {
            gate_clamped += gate > limit;
            up_clamped_above += up > limit;
            up_clamped_below += up < -limit;
          }
          expert_out += Wd[(e * H + i) * F + f] * reference_h(gate, up);
        }
        out += w * expert_out;
      }
      CAPTURE(t, i);
      CHECK(std::abs(ys[t * H + i] - out) < 1e-12);
    }
  }
  // The fixture's point: every clamp is active somewhere.
  CHECK(gate_clamped > 0);
  CHECK(up_clamped_above > 0);
  CHECK(up_clamped_below > 0);

  // Every gradient (each element of each parameter, and of x) against central differences
  // of L = sum(y * g); routing decisions stay fixed for the step h.
  layer.zero_gradients();
  layer.forward(x, y, context);
  layer.backward(g, grad_x);
  const auto gs = host_values(g);
  const auto loss = [&] {
    layer.forward(x, y, context);
    const auto yv = host_values(y);
    double sum = 0;
    for (std::size_t i = 0; i < yv.size(); ++i) sum += yv[i] * gs[i];
    return sum;
  };
  const double h = 1e-6;
  const auto check_all = [&](const std::string& name, const auto& value, const auto& grad) {
    const auto analytic = host_values(grad);
    double scale = 1e-12;
    for (const double v : analytic) scale = std::max(scale, std::abs(v));
    const auto original = host_values(value);
    for (std::size_t i = 0; i < original.size(); ++i) {
      set_element(value, i, original[i] + h);
      const double plus = loss();
      set_element(value, i, original[i] - h);
      const double minus = loss();
      set_element(value, i, original[i]);
      const double fd = (plus - minus) / (2 * h);
      CAPTURE(name, i, fd, analytic[i], scale);
      CHECK(std::abs(fd - analytic[i]) / scale < 1e-6);
    }
  };
  for (const auto& p : layer.parameters()) check_all(p.name, p.value, p.grad);
  using Flat = Kokkos::View<S*, typename X::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  check_all("x", Flat(x.data(), x.size()), Flat(grad_x.data(), grad_x.size()));
}

TEMPLATE_LIST_TEST_CASE("top-k-softmax router without a bias has only its weight",
                        "[routers][router_bias]", ExecutionSpaces) {
  using X = TestType;
  TopKSoftmaxRouter<X, double> router({6, 4, 2});
  ParameterList<X, double> list;
  router.collect_parameters(list);
  REQUIRE(list.size() == 1);
  CHECK(list[0].name == "router.weight");
  CHECK_FALSE(router.gate().has_bias());
}
