// SPDX-License-Identifier: BSD-3-Clause
// Elastic experts: a layer with experts removed and added (resized_layer) against a layer
// constructed with the new expert count and the same weights set by hand; the optimizer
// moments carried for the kept experts and zero for the added ones.
#include <kmoe/kmoe.hpp>
#include <kmoe/placement/elastic.hpp>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include "support/spaces.hpp"

#include <cmath>
#include <vector>

using namespace kmoe;
using Catch::Matchers::ContainsSubstring;

TEMPLATE_LIST_TEST_CASE("a resized layer equals one built with the new experts", "[elastic]",
                        kmoe::test::ExecutionSpaces) {
  using X = TestType;
  using S = double;
  using Router = SigmoidBiasRouter<X, S>;
  using Experts = SwiGLUExperts<X, S>;
  using Layer = MoELayer<Router, Experts>;
  const int hidden = 8, ffn = 6, tokens = 9;
  const auto router_config = [&](int experts) {
    return SigmoidBiasConfig{hidden, experts, 2, true, 1.0, {}};
  };
  Layer old_layer(Router(router_config(5)), Experts({5, hidden, ffn}), {},
                  Experts({1, hidden, 10}, "shared_experts"));
  fill_normal(old_layer.parameters(), 0.4, 3);
  auto old_bias = Kokkos::create_mirror_view(old_layer.router().bias());
  for (int e = 0; e < 5; ++e) old_bias(e) = 0.1 * e;
  Kokkos::deep_copy(old_layer.router().bias(), old_bias);

  // A few training steps so that the moments are not zero.
  AdamW<X, S> old_optimizer(old_layer.parameters(), {1e-2, 0.9, 0.999, 1e-8, 0.0});
  Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden), gy("gy", tokens, hidden),
      gx("gx", tokens, hidden);
  fill_normal(x, 1.0, 4);
  fill_normal(gy, 1.0, 5);
  RouteContext<X> training;
  training.training = true;
  for (int step = 0; step < 2; ++step) {
    old_layer.zero_gradients();
    old_layer.forward(x, y, training);
    old_layer.backward(gy, gx);
    old_optimizer.step();
  }

  const std::vector<int> keep = {4, 0, 2};  // experts 1 and 3 removed, the rest reordered
  const std::vector<NewExpert> added = {{1, 0.02, 0.05, 11}, {-1, 0.3, 0.05, 12}};
  const Layer resized = resized_layer(old_layer, keep, added);
  REQUIRE(resized.num_experts() == 5);

  // The same configuration constructed from scratch, its weights set by hand: kept and
  // copied experts from the old layer, the added experts' random parts from `resized`.
  Layer built(Router(router_config(5)), Experts({5, hidden, ffn}), {},
              Experts({1, hidden, 10}, "shared_experts"));
  const auto host = [](const auto& v) {
    return Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  };
  {
    const auto from = old_layer.parameters(), got = resized.parameters(), to = built.parameters();
    REQUIRE(from.size() == to.size());
    for (std::size_t p = 0; p < to.size(); ++p) {
      const auto old_values = host(from[p].value), new_values = host(got[p].value);
      auto values = Kokkos::create_mirror_view(to[p].value);
      const bool router = to[p].name.rfind("router", 0) == 0;
      const bool shared = to[p].name.rfind("shared_experts", 0) == 0;
      const std::size_t width = shared ? values.size() : values.size() / 5;
      for (int row = 0; row < (shared ? 1 : 5); ++row) {
        int source = shared ? 0 : row < 3 ? keep[row] : added[row - 3].copy_of;
        if (router && row >= 3) source = -1;  // a fresh router row for every added expert
        for (std::size_t i = 0; i < width; ++i)
          values(row * width + i) =
              source >= 0 ? old_values(source * width + i) : new_values(row * width + i);
        if (source < 0) {
          // Drawn, not copied: no old row equals it.
          for (int e = 0; e < 5 && !shared; ++e) {
            bool same = true;
            for (std::size_t i = 0; i < width; ++i)
              same = same && old_values(e * width + i) == new_values(row * width + i);
            CHECK_FALSE(same);
          }
        }
      }
      Kokkos::deep_copy(to[p].value, values);
    }
    auto bias = Kokkos::create_mirror_view(built.router().bias());
    for (int row = 0; row < 5; ++row) bias(row) = row < 3 ? old_bias(keep[row]) : 0.0;
    Kokkos::deep_copy(built.router().bias(), bias);
    const auto resized_bias = host(resized.router().bias());
    for (int row = 0; row < 5; ++row) CHECK(resized_bias(row) == bias(row));
    for (std::size_t p = 0; p < to.size(); ++p) {
      const auto a = host(got[p].value), b = host(to[p].value);
      for (std::size_t i = 0; i < a.size(); ++i) CHECK(a(i) == b(i));
    }
  }
  Layer copy = resized;  // forward needs a mutable layer
  Matrix<S, X> y_resized("y_resized", tokens, hidden), y_built("y_built", tokens, hidden);
  copy.forward(x, y_resized);
  built.forward(x, y_built);
  const auto a = host(y_resized), b = host(y_built);
  for (std::size_t i = 0; i < a.size(); ++i) CHECK(a.data()[i] == b.data()[i]);

  // Moments: kept experts' rows carried, added experts' rows zero, shared copied.
  AdamW<X, S> optimizer(copy.parameters(), {1e-2, 0.9, 0.999, 1e-8, 0.0});
  const auto old_state = old_optimizer.state(), state = optimizer.state();
  carry_optimizer_state(copy, old_state, state, keep);
  for (std::size_t k = 0; k < state.size(); ++k) {
    CAPTURE(state[k].name);
    const auto old_m = host(old_state[k].value), m = host(state[k].value);
    const bool shared = state[k].name.rfind("shared_experts", 0) == 0;
    const std::size_t width = shared ? m.size() : m.size() / 5;
    double largest = 0;
    for (std::size_t i = 0; i < old_m.size(); ++i) largest = std::max(largest, std::abs(old_m(i)));
    CHECK(largest > 0);  // the old moments are not trivially zero
    for (int row = 0; row < (shared ? 1 : 5); ++row)
      for (std::size_t i = 0; i < width; ++i)
        CHECK(m(row * width + i) == (shared    ? old_m(i)
                                     : row < 3 ? old_m(keep[row] * width + i)
                                               : 0.0));
  }

  CHECK_THROWS_WITH(resized_layer(old_layer, {0, 5}, {}), ContainsSubstring("keep = 5"));
  CHECK_THROWS_WITH(resized_layer(old_layer, {1, 1}, {}), ContainsSubstring("listed twice"));
  CHECK_THROWS_WITH(resized_layer(old_layer, {0}, {{7}}), ContainsSubstring("added.copy_of = 7"));
  CHECK_THROWS_WITH(resized_layer(old_layer, {}, {}), ContainsSubstring("at least 1"));
}
