// SPDX-License-Identifier: BSD-3-Clause
// Monitoring against independent references: weight and output similarity of experts
// against plain loops over their weights, the stats log's fields against counts taken
// from the routing table, the load window against sums by hand.
#include <kmoe/kmoe.hpp>
#include <kmoe/monitoring/load_window.hpp>
#include <kmoe/monitoring/redundancy.hpp>
#include <kmoe/monitoring/stats_log.hpp>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include "support/spaces.hpp"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

using namespace kmoe;

namespace {

double silu(double v) { return v / (1.0 + std::exp(-v)); }

double cosine(const std::vector<double>& a, const std::vector<double>& b) {
  double ab = 0, aa = 0, bb = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    ab += a[i] * b[i], aa += a[i] * a[i], bb += b[i] * b[i];
  return ab / std::sqrt(aa * bb);
}

std::string temporary_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("kmoe_test_monitoring_" + name)).string();
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("expert similarity equals plain loops over weights and outputs",
                        "[monitoring]", kmoe::test::ExecutionSpaces) {
  using X = TestType;
  using S = double;
  const int experts = 4, hidden = 8, ffn = 6, tokens = 5;
  SwiGLUExperts<X, S> glu({experts, hidden, ffn});
  ParameterList<X, S> params;
  glu.collect_parameters(params);
  for (std::size_t i = 0; i < params.size(); ++i) fill_normal(params[i].value, 0.5, 11 + i);
  // Expert 3 is a copy of expert 1: similarity 1 by weights and by outputs.
  for (const auto& w : {glu.w_gate().value, glu.w_up().value, glu.w_down().value})
    Kokkos::deep_copy(Kokkos::subview(w, 3, Kokkos::ALL, Kokkos::ALL),
                      Kokkos::subview(w, 1, Kokkos::ALL, Kokkos::ALL));
  Matrix<S, X> x("x", tokens, hidden);
  fill_normal(x, 1.0, 99);

  const auto gate = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), glu.w_gate().value);
  const auto up = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), glu.w_up().value);
  const auto down = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), glu.w_down().value);
  const auto xh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), x);
  std::vector<std::vector<double>> weights(experts), outputs(experts);
  for (int e = 0; e < experts; ++e) {
    for (const auto* w : {&gate, &up, &down})
      for (std::size_t i = 0; i < w->extent(1); ++i)
        for (std::size_t j = 0; j < w->extent(2); ++j) weights[e].push_back((*w)(e, i, j));
    for (int t = 0; t < tokens; ++t) {
      std::vector<double> inner(ffn);
      for (int f = 0; f < ffn; ++f) {
        double g = 0, u = 0;
        for (int h = 0; h < hidden; ++h) g += gate(e, f, h) * xh(t, h), u += up(e, f, h) * xh(t, h);
        inner[f] = silu(g) * u;
      }
      for (int h = 0; h < hidden; ++h) {
        double y = 0;
        for (int f = 0; f < ffn; ++f) y += down(e, h, f) * inner[f];
        outputs[e].push_back(y);
      }
    }
  }
  const auto by_weight = expert_weight_similarity(glu);
  const auto by_output = expert_output_similarity(glu, x);
  for (int i = 0; i < experts; ++i)
    for (int j = 0; j < experts; ++j) {
      CAPTURE(i, j);
      CHECK(std::abs(by_weight[i * experts + j] - cosine(weights[i], weights[j])) < 1e-12);
      CHECK(std::abs(by_output[i * experts + j] - cosine(outputs[i], outputs[j])) < 1e-12);
    }

  ExpertLoadWindow window(experts, 2);
  window.record({5, 0, 3, 0});
  window.record({2, 0, 1, 0});
  const RedundancyReport report = redundancy_report(glu, x, window);
  REQUIRE(!report.similar_weights.empty());
  CHECK(report.similar_weights.front().first == 1);
  CHECK(report.similar_weights.front().second == 3);
  CHECK(std::abs(report.similar_weights.front().similarity - 1.0) < 1e-12);
  REQUIRE(!report.similar_outputs.empty());
  CHECK(report.similar_outputs.front().first == 1);
  CHECK(report.similar_outputs.front().second == 3);
  // Every listed pair reaches the threshold; every other pair stays below it.
  int above = 0;
  for (int i = 0; i < experts; ++i)
    for (int j = i + 1; j < experts; ++j) above += cosine(weights[i], weights[j]) >= 0.8;
  CHECK(int(report.similar_weights.size()) == above);
  CHECK(report.dead_experts == std::vector<int>{1, 3});

  CHECK_THROWS_WITH(redundancy_report(glu, x, window, 1.5),
                    Catch::Matchers::ContainsSubstring("threshold"));
  Matrix<S, X> narrow("narrow", tokens, hidden - 1);
  CHECK_THROWS_WITH(expert_output_similarity(glu, narrow),
                    Catch::Matchers::ContainsSubstring("x.extent(1)"));
}

TEST_CASE("the load window keeps the last steps' tokens per expert", "[monitoring]") {
  ExpertLoadWindow window(3, 2);
  CHECK(window.dead_experts().empty());  // nothing recorded yet: nothing known dead
  window.record({1, 0, 0});
  window.record({0, 0, 4});
  CHECK(window.totals() == std::vector<std::int64_t>{1, 0, 4});
  CHECK(window.dead_experts() == std::vector<int>{1});
  window.record({0, 2, 1});  // the first step leaves the window
  CHECK(window.totals() == std::vector<std::int64_t>{0, 2, 5});
  CHECK(window.dead_experts() == std::vector<int>{0});
  CHECK(window.recorded_steps() == 2);
  CHECK_THROWS_WITH(window.record({1, 2}),
                    Catch::Matchers::ContainsSubstring("tokens_per_expert.size()"));
  CHECK_THROWS_WITH(ExpertLoadWindow(0, 2), Catch::Matchers::ContainsSubstring("experts"));
}

TEMPLATE_LIST_TEST_CASE("the stats log's fields equal counts taken from the routing table",
                        "[monitoring]", kmoe::test::ExecutionSpaces) {
  using X = TestType;
  using S = float;
  using Router = SoftmaxTopKRouter<X, S>;
  using Experts = SwiGLUExperts<X, S>;
  const int experts = 6, hidden = 8, ffn = 4, k = 2, tokens = 20;
  LayerOptions options;
  options.capacity.factor = 0.75;  // some experts overflow: drops and padding both occur
  options.time_phases = true;
  MoELayer<Router, Experts> layer(Router({hidden, experts, k, true}),
                                  Experts({experts, hidden, ffn}), options);
  for (const auto& p : layer.parameters()) fill_normal(p.value, 0.8, 5);
  Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden);
  fill_normal(x, 1.0, 6);

  const std::string path = temporary_path("stats.jsonl");
  StatsLog log(path, {0, hidden, sizeof(S)});
  ExpertLoadWindow window(experts, 4);
  for (int step = 0; step < 2; ++step) {
    const ForwardStats stats = layer.forward(x, y);
    window.record(stats.tokens_per_expert);
    log.write(step, "layers.1.mlp", stats, &window);
  }

  // Reference counts from the routing table and the dispatch positions.
  const auto chosen =
      Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.routing().expert);
  const auto position = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.positions());
  std::vector<std::int64_t> per_expert(experts, 0);
  std::int64_t assignments = 0, kept = 0;
  for (int t = 0; t < tokens; ++t)
    for (int s = 0; s < k; ++s) {
      if (chosen(t, s) < 0) continue;
      ++per_expert[chosen(t, s)];
      ++assignments;
      kept += position(t, s) >= 0;
    }
  const long long capacity =
      (k * tokens * 3 + 4 * experts - 1) / (4 * experts);  // ceil(k T cf / E)
  double largest = 0, smallest = 1e300, total = 0;
  std::vector<int> dead;
  for (int e = 0; e < experts; ++e) {
    largest = std::max(largest, double(per_expert[e]));
    smallest = std::min(smallest, double(per_expert[e]));
    total += double(per_expert[e]);
    if (per_expert[e] == 0) dead.push_back(e);
  }
  const double mean = total / experts;

  std::ifstream in(path);
  std::string line;
  int lines = 0;
  while (std::getline(in, line)) {
    const auto record = nlohmann::json::parse(line);
    CAPTURE(line);
    CHECK(record.at("step") == lines);
    CHECK(record.at("layer") == "layers.1.mlp");
    CHECK(record.at("rank") == 0);
    CHECK(record.at("tokens_per_expert").get<std::vector<std::int64_t>>() == per_expert);
    CHECK(std::abs(record.at("load_max_over_mean").get<double>() - largest / mean) < 1e-6);
    CHECK(std::abs(record.at("load_min_over_mean").get<double>() - smallest / mean) < 1e-6);
    CHECK(record.at("assignments") == assignments);
    CHECK(record.at("dropped") == assignments - kept);
    CHECK(record.at("capacity") == capacity);
    CHECK(std::abs(record.at("padding_fraction").get<double>() -
                   (1.0 - double(kept) / double(experts * capacity))) < 1e-9);
    CHECK(record.at("dead_experts").get<std::vector<int>>() == dead);
    CHECK(record.at("dead_experts_window").get<std::vector<int>>() == dead);
    CHECK(record.at("failed_slots").empty());  // failover is off
    CHECK(record.at("rerouted") == 0);
    for (const char* phase : {"route", "dispatch", "exchange", "experts", "combine"})
      CHECK(record.at("phase_ms").at(phase).get<double>() >= 0.0);
    // One EP rank: nothing crosses a wire.
    for (const char* field :
         {"dispatch_sent", "dispatch_received", "combine_sent", "combine_received"})
      CHECK(record.at("bytes_per_peer").at(field).empty());
    CHECK(record.at("peak_resident_bytes").get<std::int64_t>() > 0);
    ++lines;
  }
  CHECK(lines == 2);
  CHECK(assignments - kept > 0);  // the capacity did bite, so the checks above saw drops
  std::remove(path.c_str());

  CHECK_THROWS_WITH(StatsLog("/nonexistent-kmoe-dir/stats.jsonl", {0, hidden, sizeof(S)}),
                    Catch::Matchers::ContainsSubstring("/nonexistent-kmoe-dir/stats.jsonl"));
}
