// SPDX-License-Identifier: BSD-3-Clause
// The Kokkos Tools regions of MoELayer: a training step with shared experts pushes the
// phase regions in the documented order and nesting, and every push is popped, also when
// forward or backward throws. The test registers its own region callbacks, as a tool
// library (space-time-stack, the NVTX connector) would.
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>

#include <kmoe/kmoe.hpp>

#include <limits>
#include <string>
#include <vector>

#include "support/spaces.hpp"

using namespace kmoe;

namespace {

/// What the region callbacks saw: the kmoe regions, each as its path of enclosing kmoe
/// regions joined by " / " (the regions of other libraries, such as Kokkos Kernels' GEMM,
/// are left out of the paths but must balance too), and the open regions.
struct RegionLog {
  std::vector<std::string> kmoe_paths;
  std::vector<std::string> open;
  bool popped_with_none_open = false;

  static bool is_kmoe(const std::string& name) { return name.rfind("kmoe::", 0) == 0; }

  void push(const std::string& name) {
    open.push_back(name);
    if (!is_kmoe(name)) return;
    std::string path;
    for (const auto& region : open)
      if (is_kmoe(region)) path += (path.empty() ? "" : " / ") + region;
    kmoe_paths.push_back(path);
  }
  void pop() {
    if (open.empty())
      popped_with_none_open = true;
    else
      open.pop_back();
  }
  bool balanced() const { return open.empty() && !popped_with_none_open; }
};

RegionLog* region_log = nullptr;

void record_push(const char* name) { region_log->push(name); }
void record_pop() { region_log->pop(); }

/// Installs the region callbacks for its lifetime, so that a failed REQUIRE leaves no
/// callback pointing at a destroyed log.
class RecordedRegions {
 public:
  RecordedRegions() {
    region_log = &log_;
    Kokkos::Tools::Experimental::set_push_region_callback(record_push);
    Kokkos::Tools::Experimental::set_pop_region_callback(record_pop);
  }
  ~RecordedRegions() {
    Kokkos::Tools::Experimental::set_push_region_callback(nullptr);
    Kokkos::Tools::Experimental::set_pop_region_callback(nullptr);
    region_log = nullptr;
  }
  RecordedRegions(const RecordedRegions&) = delete;
  RecordedRegions& operator=(const RecordedRegions&) = delete;

  RegionLog& log() { return log_; }

 private:
  RegionLog log_;
};

template <class X>
auto make_layer(bool overlap_shared_experts) {
  using Router = SoftmaxTopKRouter<X, double>;
  using Experts = SwiGLUExperts<X, double>;
  LayerOptions options;
  options.overlap_shared_experts = overlap_shared_experts;
  MoELayer<Router, Experts> layer(Router({6, 4, 2, true}), Experts({4, 6, 5}), options,
                                  Experts({1, 6, 7}, "shared_experts"));
  fill_normal(layer.parameters(), 0.4, 11);
  return layer;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("a training step pushes the layer's phase regions in order", "[profiling]",
                        kmoe::test::ExecutionSpaces) {
  using X = TestType;
  const bool overlap = GENERATE(true, false);
  CAPTURE(overlap);
  auto layer = make_layer<X>(overlap);
  const int tokens = 9, hidden = layer.hidden_size();
  Matrix<double, X> x("x", tokens, hidden), y("y", tokens, hidden), g("g", tokens, hidden),
      grad_x("grad_x", tokens, hidden);
  fill_normal(x, 1.0, 12);
  fill_normal(g, 1.0, 13);
  RouteContext<X> context;
  context.training = true;
  layer.zero_gradients();

  RecordedRegions recorded;
  layer.forward(x, y, context);
  layer.backward(g, grad_x);
  layer.synchronize_gradients();

  const std::string forward = "kmoe::MoELayer::forward / kmoe::MoELayer::";
  const std::string backward = "kmoe::MoELayer::backward / kmoe::MoELayer::backward::";
  std::vector<std::string> expected = {"kmoe::MoELayer::forward", forward + "route",
                                       forward + "dispatch", forward + "exchange"};
  // Overlapped, the shared experts run while the dispatch exchange is in flight.
  if (overlap)
    expected.push_back(forward + "exchange / kmoe::MoELayer::shared_experts");
  else
    expected.push_back(forward + "shared_experts");
  for (const char* phase : {"experts", "exchange", "combine"}) expected.push_back(forward + phase);
  expected.push_back("kmoe::MoELayer::backward");
  // Overlapped, the shared experts' backward runs while the gradients travel to the experts.
  expected.push_back(backward + "combine");
  expected.push_back(backward + "exchange");
  if (overlap) expected.push_back(backward + "exchange / kmoe::MoELayer::backward::shared_experts");
  expected.push_back(backward + "experts");
  expected.push_back(backward + "exchange");
  if (!overlap) expected.push_back(backward + "shared_experts");
  expected.push_back(backward + "router");
  expected.push_back("kmoe::MoELayer::synchronize_gradients");
  CHECK(recorded.log().kmoe_paths == expected);
  CHECK(recorded.log().balanced());
}

TEMPLATE_LIST_TEST_CASE("a forward or backward that throws leaves the regions balanced",
                        "[profiling]", kmoe::test::ExecutionSpaces) {
  using X = TestType;
  auto layer = make_layer<X>(true);
  const int tokens = 5, hidden = layer.hidden_size();
  RouteContext<X> context;
  context.training = true;
  RecordedRegions recorded;
  auto& log = recorded.log();

  SECTION("wrong-shaped input: thrown by the checks before routing") {
    Matrix<double, X> x("x", tokens, hidden + 1), y("y", tokens, hidden + 1);
    CHECK_THROWS_AS(layer.forward(x, y, context), kmoe::invalid_argument);
    CHECK(log.kmoe_paths == std::vector<std::string>{"kmoe::MoELayer::forward"});
  }
  SECTION("non-finite input: thrown inside the route region") {
    Matrix<double, X> x("x", tokens, hidden), y("y", tokens, hidden);
    Kokkos::deep_copy(Kokkos::subview(x, 2, 3), std::numeric_limits<double>::quiet_NaN());
    CHECK_THROWS_AS(layer.forward(x, y, context), kmoe::runtime_error);
    CHECK(log.kmoe_paths ==
          std::vector<std::string>{"kmoe::MoELayer::forward",
                                   "kmoe::MoELayer::forward / kmoe::MoELayer::route"});
  }
  SECTION("backward without a training forward") {
    Matrix<double, X> g("g", tokens, hidden), grad_x("grad_x", tokens, hidden);
    CHECK_THROWS_AS(layer.backward(g, grad_x), kmoe::invalid_argument);
    CHECK(log.kmoe_paths == std::vector<std::string>{"kmoe::MoELayer::backward"});
  }
  CHECK(log.balanced());
}
