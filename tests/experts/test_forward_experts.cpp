// SPDX-License-Identifier: BSD-3-Clause
// Every expert kind and activation, optional biases, shared experts and every capacity rule
// (dropless, by probability, by position, minimum, alignment padding) against the reference.
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>

#include "support/layer_check.hpp"
#include "support/spaces.hpp"

#include <algorithm>
#include <array>
#include <cmath>

using namespace kmoe;
using namespace kmoe::test;

namespace {

template <class S, class Experts, class X>
void run_case(const LayerOptions& options, bool with_shared, bool bias, int tokens, int experts,
              int k, std::uint64_t seed) {
  using R = SoftmaxTopKRouter<X, S>;
  const int hidden = 12, ffn = 10;
  std::optional<Experts> shared;
  if (with_shared) shared = Experts({1, hidden, 14, bias}, "shared_experts");
  MoELayer<R, Experts> layer(R({hidden, experts, k, true}), Experts({experts, hidden, ffn, bias}),
                             options, shared);
  fill_normal(layer.parameters(), 0.3, seed);
  Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden);
  fill_normal(x, 1.0, seed + 1);
  const auto stats = layer.forward(x, y);
  RefRouterConfig rc;
  rc.experts = experts;
  rc.top_k = k;
  rc.normalize = true;
  const RefMatrix gate = to_ref(layer.router().gate().weight());
  const auto cmp = compare_forward(layer, rc, x, y, stats, &gate);
  CAPTURE(tokens, experts, k, with_shared, bias, options.capacity.factor,
          options.capacity.alignment);
  CHECK(cmp.output_error < tolerance<S>());
  // Accounting: kept + dropped = all assignments, every kept assignment has one row.
  const auto position = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.positions());
  std::int64_t kept = 0;
  std::vector<int> rows;
  for (std::size_t t = 0; t < position.extent(0); ++t)
    for (std::size_t s = 0; s < position.extent(1); ++s)
      if (position(t, s) >= 0) {
        ++kept;
        rows.push_back(position(t, s));
      }
  CHECK(kept + stats.dropped == std::int64_t(tokens) * k);
  std::sort(rows.begin(), rows.end());
  CHECK(std::adjacent_find(rows.begin(), rows.end()) == rows.end());
}

template <class X, class S>
void all_expert_kinds(const LayerOptions& options, bool with_shared, int tokens, int experts,
                      int k) {
  run_case<S, FFNExperts<X, S, activation::Relu>, X>(options, with_shared, true, tokens, experts, k,
                                                     1);
  run_case<S, FFNExperts<X, S, activation::GeluErf>, X>(options, with_shared, false, tokens,
                                                        experts, k, 2);
  run_case<S, FFNExperts<X, S, activation::GeluTanh>, X>(options, with_shared, true, tokens,
                                                         experts, k, 3);
  run_case<S, FFNExperts<X, S, activation::Silu>, X>(options, with_shared, false, tokens, experts,
                                                     k, 4);
  run_case<S, SwiGLUExperts<X, S>, X>(options, with_shared, false, tokens, experts, k, 5);
  run_case<S, GeGLUExperts<X, S>, X>(options, with_shared, false, tokens, experts, k, 6);
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("expert kinds, shared experts and capacity rules match the reference",
                        "[experts][capacity]", ExecutionSpaces) {
  using X = TestType;
  const int rule = GENERATE(0, 1, 2, 3);
  const bool with_shared = GENERATE(false, true);
  const int tokens = GENERATE(1, 23);
  LayerOptions options;
  if (rule == 1) options.capacity = {1.0, 0, DropPolicy::by_probability, 1};
  if (rule == 2) options.capacity = {0.5, 0, DropPolicy::by_position, 8};
  if (rule == 3) options.capacity = {0.25, 3, DropPolicy::by_probability, 4};
  all_expert_kinds<X, double>(options, with_shared, tokens, 4, 2);
  all_expert_kinds<X, float>(options, with_shared, tokens, 5, 3);
  all_expert_kinds<X, double>(options, with_shared, tokens, 1, 1);  // E = 1
}

TEMPLATE_LIST_TEST_CASE("the GEMM backend matches a plain loop across tile boundaries", "[gemm]",
                        ExecutionSpaces) {
  using X = TestType;
  // Shapes that cross the host tiles (256 rows; 1024 columns, 256 for a single row tile),
  // the skinny path (<= 8 rows) and odd remainders, for every transpose combination.
  const auto shape = GENERATE(std::array<int, 3>{300, 1100, 37}, std::array<int, 3>{200, 600, 19},
                              std::array<int, 3>{5, 700, 64}, std::array<int, 3>{513, 9, 3});
  const bool ta = GENERATE(false, true), tb = GENERATE(false, true);
  const int m = shape[0], n = shape[1], k = shape[2];
  CAPTURE(m, n, k, ta, tb);
  Matrix<double, X> a("a", ta ? k : m, ta ? m : k), b("b", tb ? n : k, tb ? k : n), c("c", m, n);
  fill_normal(a, 1.0, 3);
  fill_normal(b, 1.0, 4);
  fill_normal(c, 1.0, 5);
  const RefMatrix ra = to_ref(a), rb = to_ref(b), rc = to_ref(c);
  DefaultGemm::gemm(X(), ta, tb, 0.5, a, b, 2.0, c);
  const RefMatrix got = to_ref(c);
  double worst = 0;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double sum = 0;
      for (int p = 0; p < k; ++p) sum += (ta ? ra(p, i) : ra(i, p)) * (tb ? rb(j, p) : rb(p, j));
      worst = std::max(worst, std::abs(got(i, j) - (0.5 * sum + 2.0 * rc(i, j))));
    }
  CHECK(worst < 1e-12 * k);
}
