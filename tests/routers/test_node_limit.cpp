// SPDX-License-Identifier: BSD-3-Clause
// Node-limited routing (DeepSeek-V3) of SoftmaxTopKRouter and SigmoidBiasRouter against
// plain loops written from the definition: with the node of each expert (not contiguous,
// nodes of unequal size), a node's score is the sum of its `terms` best selection scores,
// the best M nodes stay eligible and the top-k is taken among their experts; no token
// reaches more than M nodes, the limit changes some selections, and bad settings (M above
// the nodes, with a group limit, no node map) raise naming the values.
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include "support/spaces.hpp"

#include <kmoe/routers/sigmoid_bias.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <vector>

using namespace kmoe;
using namespace kmoe::test;

namespace {

constexpr int hidden = 6, experts = 14, top_k = 4, tokens = 31, nodes = 3;
// Node of each expert: interleaved and unequal (5, 5, 4 experts).
const std::vector<int> node_of = {0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1};

/// Indices of the k largest score(i) with eligible(i), descending, ties toward the lower index.
template <class Score, class Eligible>
std::vector<int> top(int n, int k, const Score& score, const Eligible& eligible) {
  std::vector<int> order;
  for (int i = 0; i < n; ++i)
    if (eligible(i)) order.push_back(i);
  std::stable_sort(order.begin(), order.end(), [&](int i, int j) { return score(i) > score(j); });
  if (int(order.size()) > k) order.resize(std::size_t(k));
  return order;
}

/// The experts of a token with selection scores `s` under the node limit (M, terms).
std::vector<int> node_limited_choice(const std::vector<double>& s, int max_nodes, int terms) {
  std::vector<double> node_score(nodes, 0.0);
  for (int g = 0; g < nodes; ++g)
    for (int e : top(
             experts, terms, [&](int i) { return s[i]; },
             [&](int i) { return node_of[std::size_t(i)] == g; }))
      node_score[std::size_t(g)] += s[std::size_t(e)];
  const auto kept = top(
      nodes, max_nodes, [&](int g) { return node_score[std::size_t(g)]; },
      [](int) { return true; });
  return top(
      experts, top_k, [&](int i) { return s[std::size_t(i)]; },
      [&](int i) {
        return std::find(kept.begin(), kept.end(), node_of[std::size_t(i)]) != kept.end();
      });
}

template <class X, class Router, class Config>
void check_router(Config config, int max_nodes, bool sigmoid) {
  config.node_limit.max_nodes = max_nodes;
  config.node_limit.score_terms = 0;  // DeepSeek-V3's default: top_k / M
  const int terms = std::max(1, top_k / max_nodes);
  Router router(config);
  router.set_expert_nodes(node_of, nodes);

  std::mt19937_64 rng(42 + std::uint64_t(max_nodes));
  std::normal_distribution<double> normal(0.0, 1.0);
  Matrix<double, X> x("x", tokens, hidden);
  auto x_host = Kokkos::create_mirror_view(x);
  auto w_host = Kokkos::create_mirror_view(router.gate().weight());
  for (int t = 0; t < tokens; ++t)
    for (int h = 0; h < hidden; ++h) x_host(t, h) = normal(rng);
  for (int e = 0; e < experts; ++e)
    for (int h = 0; h < hidden; ++h) w_host(e, h) = normal(rng);
  Kokkos::deep_copy(x, x_host);
  Kokkos::deep_copy(router.gate().weight(), w_host);

  RoutingPlan<X, double> plan;
  router.forward(x, plan, RouteContext<X>{});
  const auto expert = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plan.expert);
  int changed = 0;
  for (int t = 0; t < tokens; ++t) {
    std::vector<double> s(experts), logits(experts, 0.0);
    for (int e = 0; e < experts; ++e)
      for (int h = 0; h < hidden; ++h) logits[std::size_t(e)] += x_host(t, h) * w_host(e, h);
    if (sigmoid) {
      for (int e = 0; e < experts; ++e) s[std::size_t(e)] = 1 / (1 + std::exp(-logits[e]));
    } else {
      const double m = *std::max_element(logits.begin(), logits.end());
      double sum = 0;
      for (int e = 0; e < experts; ++e) sum += s[std::size_t(e)] = std::exp(logits[e] - m);
      for (auto& v : s) v /= sum;
    }
    const auto want = node_limited_choice(s, max_nodes, terms);
    const auto unlimited = node_limited_choice(s, nodes, terms);
    changed += want != unlimited;
    std::set<int> reached;
    CAPTURE(t);
    for (int j = 0; j < top_k; ++j) {
      CHECK(expert(t, j) == want[std::size_t(j)]);
      reached.insert(node_of[std::size_t(expert(t, j))]);
    }
    CHECK(int(reached.size()) <= max_nodes);
  }
  if (max_nodes < nodes) CHECK(changed > 0);  // else the limit was never exercised
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("node-limited routers match the plain-loop reference", "[router][nodes]",
                        ExecutionSpaces) {
  using X = TestType;
  for (int max_nodes : {1, 2, 3}) {
    CAPTURE(max_nodes);
    check_router<X, SoftmaxTopKRouter<X, double>>(SoftmaxTopKConfig{hidden, experts, top_k, true},
                                                  max_nodes, false);
    check_router<X, SigmoidBiasRouter<X, double>>(
        SigmoidBiasConfig{hidden, experts, top_k, true, 1.0, {}}, max_nodes, true);
  }
}

TEMPLATE_LIST_TEST_CASE("node limit settings that cannot work raise naming the values",
                        "[router][nodes]", ExecutionSpaces) {
  using X = TestType;
  using R = SoftmaxTopKRouter<X, double>;
  using Catch::Matchers::ContainsSubstring;
  SoftmaxTopKConfig config{hidden, experts, top_k, true};
  config.node_limit.max_nodes = 4;
  R too_many(config);
  CHECK_THROWS_WITH(too_many.set_expert_nodes(node_of, nodes),
                    ContainsSubstring("max_nodes = 4") && ContainsSubstring("exceeds the 3 nodes"));
  // Forward before the router knows the nodes.
  config.node_limit.max_nodes = 1;
  R unset(config);
  Matrix<double, X> x("x", 3, hidden);
  RoutingPlan<X, double> plan;
  CHECK_THROWS_WITH(unset.forward(x, plan, RouteContext<X>{}),
                    ContainsSubstring("needs the node of each expert"));
  // One node of 3 experts cannot hold top_k = 4.
  CHECK_THROWS_WITH(unset.set_expert_nodes({0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2}, nodes),
                    ContainsSubstring("top_k = 4") && ContainsSubstring("exceeds the 3 experts"));
  config.group = {7, 2, 2};
  CHECK_THROWS_WITH(R(config), ContainsSubstring("group limit"));
}
