// SPDX-License-Identifier: BSD-3-Clause
// The rows of docs/validation.md that no other test covers: every public entry point given
// an invalid argument raises kmoe::invalid_argument naming the parameter and value, bad data
// raises kmoe::runtime_error naming where it is, and the documented gaps of the non-finite
// check (data it does not inspect) behave as the table says.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <limits>

#include "support/layer_check.hpp"

using namespace kmoe;
using namespace kmoe::test;
using Catch::Matchers::ContainsSubstring;

namespace {
using H = Kokkos::DefaultHostExecutionSpace;
constexpr double not_a_number = std::numeric_limits<double>::quiet_NaN();
constexpr double infinity = std::numeric_limits<double>::infinity();

template <class View>
bool row_finite(const View& y, int t) {
  for (std::size_t h = 0; h < y.extent(1); ++h)
    if (!std::isfinite(double(y(t, h)))) return false;
  return true;
}
}  // namespace

TEST_CASE("router constructors reject bad shapes, k, groups and factors", "[validation]") {
  using TS = TopKSoftmaxRouter<H, float>;
  CHECK_THROWS_AS(TS({8, 4, 0}), kmoe::invalid_argument);
  CHECK_THROWS_WITH(TS({8, 4, 5}),
                    ContainsSubstring("kmoe::TopKSoftmaxRouter") && ContainsSubstring("top_k = 5"));
  CHECK_THROWS_WITH(TS({8, 0, 1}), ContainsSubstring("experts = 0"));
  using SB = SigmoidBiasRouter<H, double>;
  CHECK_THROWS_WITH(SB({8, 8, 2, true, 1.0, {2, 1, 9}}), ContainsSubstring("score_terms = 9"));
  CHECK_THROWS_WITH(SB({8, 128, 2, true, 1.0, {128, 2, 2}}), ContainsSubstring("n_group = 128"));
  CHECK_THROWS_WITH(SB({8, 8, 5, true, 1.0, {4, 2, 2}}),
                    ContainsSubstring("top_k = 5") && ContainsSubstring("topk_group groups"));
  using EC = ExpertChoiceRouter<H, float>;
  CHECK_THROWS_WITH(EC({8, 4, not_a_number}), ContainsSubstring("capacity_factor = nan"));
  CHECK_THROWS_WITH(EC({8, 4, infinity}), ContainsSubstring("capacity_factor = inf"));
  CHECK_THROWS_WITH(EC({0, 4, 1.0}), ContainsSubstring("hidden = 0"));
  using HR = HashRouter<H, float>;
  CHECK_THROWS_WITH(HR({8, 0, 1}),
                    ContainsSubstring("kmoe::HashRouter") && ContainsSubstring("experts = 0"));
  CHECK_THROWS_WITH(HR({-1, 4, 1}), ContainsSubstring("hidden = -1"));
  using NT = NoisyTopKRouter<H, double>;
  CHECK_THROWS_AS(NT({8, 4, 0, 1}), kmoe::invalid_argument);
}

TEST_CASE("expert constructors reject empty shapes", "[validation]") {
  CHECK_THROWS_WITH((FFNExperts<H, float, activation::Relu>({0, 8, 4})),
                    ContainsSubstring("kmoe::FFNExperts") && ContainsSubstring("experts = 0"));
  CHECK_THROWS_WITH((FFNExperts<H, float, activation::Relu>({2, 0, 4})),
                    ContainsSubstring("hidden = 0"));
  CHECK_THROWS_WITH((SwiGLUExperts<H, double>({2, 8, -3})), ContainsSubstring("ffn = -3"));
}

TEST_CASE("layer constructor rejects capacity, mode and shared-expert mistakes", "[validation]") {
  using R = SoftmaxTopKRouter<H, double>;
  using E = SwiGLUExperts<H, double>;
  const auto make = [](const LayerOptions& options, std::optional<E> shared = std::nullopt) {
    return MoELayer<R, E>(R({8, 4, 2}), E({4, 8, 6}), options, shared);
  };
  LayerOptions o;
  o.capacity.factor = not_a_number;
  CHECK_THROWS_WITH(make(o), ContainsSubstring("capacity.factor = nan"));
  o = {};
  o.capacity.factor = infinity;
  CHECK_THROWS_WITH(make(o), ContainsSubstring("capacity.factor = inf"));
  o = {};
  o.capacity.minimum = -1;
  CHECK_THROWS_WITH(make(o), ContainsSubstring("capacity.minimum = -1"));
  o = {};
  o.capacity.alignment = 0;
  CHECK_THROWS_WITH(make(o), ContainsSubstring("capacity.alignment = 0"));
  o = {};
  o.training_mode = ExpertMode::inference;
  CHECK_THROWS_WITH(make(o), ContainsSubstring("options.training_mode = inference"));
  o = {};
  o.losses.switch_aux = -1;
  CHECK_THROWS_WITH(make(o), ContainsSubstring("switch_aux = -1"));
  o = {};
  o.losses.z_loss = -0.5;
  CHECK_THROWS_WITH(make(o), ContainsSubstring("z_loss = -0.5"));
  CHECK_THROWS_WITH(make({}, E({2, 8, 6})), ContainsSubstring("shared.num_experts() = 2"));
  CHECK_THROWS_WITH(make({}, E({1, 6, 6})), ContainsSubstring("shared.hidden_size() = 6"));
  CHECK_THROWS_AS(make({}, E({2, 8, 6})), kmoe::invalid_argument);
  CHECK_THROWS_WITH(make({}, E({1, 8, 6})), ContainsSubstring("parameter name = experts.w_gate") &&
                                                ContainsSubstring("used twice"));
}

TEST_CASE("forward, backward and the bias update reject bad calls", "[validation]") {
  using R = SigmoidBiasRouter<H, double>;
  using E = SwiGLUExperts<H, double>;
  LayerOptions o;
  o.losses.sequence_aux = 1e-3;
  o.losses.sequence_length = 4;
  MoELayer<R, E> layer(R({8, 4, 2, true, 1.0, {}}), E({4, 8, 6}), o);
  fill_normal(layer.parameters(), 0.3, 2);
  Matrix<double, H> x("x", 6, 8), y("y", 6, 8), g("g", 6, 8), short_g("short_g", 5, 8);
  fill_normal(x, 1.0, 3);
  // 6 tokens are not whole sequences of 4.
  CHECK_THROWS_WITH(layer.forward(x, y), ContainsSubstring("sequence_length = 4"));
  Matrix<double, H> x8("x8", 8, 8), y8("y8", 8, 8), g8("g8", 8, 8);
  fill_normal(x8, 1.0, 4);
  layer.forward(x8, y8);  // inference
  CHECK_THROWS_WITH(layer.backward(y8, g8), ContainsSubstring("state = inference"));
  RouteContext<H> training;
  training.training = true;
  layer.forward(x8, y8, training);
  CHECK_THROWS_WITH(layer.backward(g, g8), ContainsSubstring("grad_y extents = 6x8"));
  CHECK_THROWS_WITH(layer.backward(y8, short_g), ContainsSubstring("grad_x extents = 5x8"));
  CHECK_NOTHROW(layer.backward(y8, g8));
  CHECK_THROWS_WITH(layer.apply_bias_update(-1.0), ContainsSubstring("rate = -1"));
  CHECK_THROWS_WITH(layer.apply_bias_update(not_a_number), ContainsSubstring("rate = nan"));
  CHECK_THROWS_WITH(layer.router().update_bias({1, 2, 3}, 0.1),
                    ContainsSubstring("counts.size() = 3"));
}

TEST_CASE("optimizers and clip_grad_norm reject bad hyper-parameters", "[validation][optimizer]") {
  Vector<double, H> w("w", 2), g("g", 2);
  ParameterList<H, double> list{make_parameter<H>("w", w, g)};
  CHECK_THROWS_WITH((SGD<H, double>(list, {0.0, 0.0, 0.0})),
                    ContainsSubstring("learning_rate = 0"));
  CHECK_THROWS_WITH((SGD<H, double>(list, {0.1, 1.0, 0.0})), ContainsSubstring("momentum = 1"));
  CHECK_THROWS_WITH((AdamW<H, double>(list, {-1.0, 0.9, 0.999, 1e-8, 0.0})),
                    ContainsSubstring("learning_rate = -1"));
  CHECK_THROWS_WITH((AdamW<H, double>(list, {1e-3, 1.0, 0.999, 1e-8, 0.0})),
                    ContainsSubstring("beta1 = 1"));
  CHECK_THROWS_WITH((AdamW<H, double>(list, {1e-3, 0.9, -0.1, 1e-8, 0.0})),
                    ContainsSubstring("beta2 = -0.1"));
  CHECK_THROWS_WITH((AdamW<H, double>(list, {1e-3, 0.9, 0.999, 0.0, 0.0})),
                    ContainsSubstring("epsilon = 0"));
  CHECK_THROWS_WITH(clip_grad_norm(list, 0.0), ContainsSubstring("max_norm = 0"));
  CHECK_THROWS_WITH(clip_grad_norm(list, not_a_number), ContainsSubstring("max_norm = nan"));
}

TEST_CASE("non-finite inputs and router weights raise naming the token and the expert",
          "[validation][non_finite]") {
  using R = SoftmaxTopKRouter<H, double>;
  using E = SwiGLUExperts<H, double>;
  MoELayer<R, E> layer(R({8, 4, 2}), E({4, 8, 6}));
  fill_normal(layer.parameters(), 0.3, 5);
  Matrix<double, H> x("x", 5, 8), y("y", 5, 8);
  fill_normal(x, 1.0, 6);
  x(4, 0) = infinity;
  CHECK_THROWS_AS(layer.forward(x, y), kmoe::runtime_error);
  CHECK_THROWS_WITH(layer.forward(x, y), ContainsSubstring("non-finite router logit") &&
                                             ContainsSubstring("at token 4, expert 0"));
  x(4, 0) = 0.5;
  // A NaN gate weight for expert 2 makes that expert's logit NaN for every token.
  const auto gate = layer.router().gate().weight();
  gate(2, 3) = not_a_number;
  CHECK_THROWS_WITH(layer.forward(x, y), ContainsSubstring("at token 0, expert 2"));
  gate(2, 3) = 0.1;
  CHECK_NOTHROW(layer.forward(x, y));

  // Finite logits but an infinite scaling factor: the routing weight check names the slot
  // and the expert.
  MoELayer<R, E> scaled(R({8, 4, 2, false, infinity}), E({4, 8, 6}));
  fill_normal(scaled.parameters(), 0.3, 5);
  CHECK_THROWS_WITH(scaled.forward(x, y),
                    ContainsSubstring("non-finite routing weight inf at token 0, slot 0 (expert"));

  // propagate: no exception, the bad token's output is non-finite, the others are not.
  LayerOptions lenient;
  lenient.non_finite = NonFinitePolicy::propagate;
  MoELayer<R, E> open(R({8, 4, 2}), E({4, 8, 6}), lenient);
  fill_normal(open.parameters(), 0.3, 5);
  x(1, 5) = not_a_number;
  CHECK_NOTHROW(open.forward(x, y));
  CHECK_FALSE(row_finite(y, 1));
  CHECK(row_finite(y, 0));
}

TEST_CASE("non-finite results that routing cannot see are caught in the output under raise",
          "[validation][non_finite]") {
  Matrix<double, H> x("x", 4, 8), y("y", 4, 8);
  fill_normal(x, 1.0, 7);
  LayerOptions lenient;
  lenient.non_finite = NonFinitePolicy::propagate;
  // Hash routing has no logits: a NaN token is routed by its id; under raise the output
  // check names it, under propagate it reaches y and only y's row.
  {
    using R = HashRouter<H, double>;
    using E = SwiGLUExperts<H, double>;
    MoELayer<R, E> strict(R({8, 4, 3}), E({4, 8, 6}));
    MoELayer<R, E> open(R({8, 4, 3}), E({4, 8, 6}), lenient);
    fill_normal(strict.parameters(), 0.3, 8);
    fill_normal(open.parameters(), 0.3, 8);
    Vector<std::int64_t, H> ids("ids", 4);
    for (int t = 0; t < 4; ++t) ids(t) = 10 + t;
    RouteContext<H> context;
    context.token_ids = ids;
    x(2, 1) = not_a_number;
    CHECK_THROWS_WITH(strict.forward(x, y, context),
                      ContainsSubstring("non-finite output y nan at token 2"));
    CHECK_NOTHROW(open.forward(x, y, context));
    CHECK_FALSE(row_finite(y, 2));
    CHECK(row_finite(y, 0));
    x(2, 1) = 0.0;
  }
  // Expert weights are not scanned before use (a pass over every parameter per step): a
  // NaN in one expert's weights reaches exactly the tokens routed to that expert, and the
  // output check reports the first of them.
  {
    using R = SoftmaxTopKRouter<H, double>;
    using E = FFNExperts<H, double, activation::Relu>;
    MoELayer<R, E> open(R({8, 4, 1}), E({4, 8, 6, true}), lenient);
    MoELayer<R, E> strict(R({8, 4, 1}), E({4, 8, 6, true}));
    fill_normal(open.parameters(), 0.3, 9);
    fill_normal(strict.parameters(), 0.3, 9);
    open.forward(x, y);
    const auto expert = open.routing().expert;
    const int poisoned = expert(0, 0);  // the expert token 0 goes to
    open.experts().b2().value(poisoned, 0) = not_a_number;
    strict.experts().b2().value(poisoned, 0) = not_a_number;
    CHECK_NOTHROW(open.forward(x, y));
    int first_bad = -1;
    for (int t = 0; t < 4; ++t) {
      CHECK(row_finite(y, t) == (expert(t, 0) != poisoned));
      if (expert(t, 0) == poisoned && first_bad < 0) first_bad = t;
    }
    REQUIRE(first_bad >= 0);
    CHECK_THROWS_WITH(strict.forward(x, y),
                      ContainsSubstring("at token " + std::to_string(first_bad) + ", column 0"));
  }
  // A NaN selection bias (sigmoid router) leaves logits and weights finite: every
  // comparison with NaN is false, so selection falls back to the lowest eligible indices.
  {
    using R = SigmoidBiasRouter<H, double>;
    using E = SwiGLUExperts<H, double>;
    MoELayer<R, E> layer(R({8, 4, 2, true, 1.0, {}}), E({4, 8, 6}));
    fill_normal(layer.parameters(), 0.3, 10);
    Kokkos::deep_copy(layer.router().bias(), not_a_number);
    CHECK_NOTHROW(layer.forward(x, y));
    const auto expert = layer.routing().expert;
    for (int t = 0; t < 4; ++t) {
      CHECK(expert(t, 0) == 0);
      CHECK(expert(t, 1) == 1);
      CHECK(row_finite(y, t));
    }
  }
}

TEST_CASE("an empty batch is valid everywhere", "[validation]") {
  using R = ExpertChoiceRouter<H, float>;
  using E = FFNExperts<H, float, activation::Silu>;
  LayerOptions o;
  o.capacity = {1.0, 2, DropPolicy::by_position, 4};
  MoELayer<R, E> layer(R({8, 4, 1.0}), E({4, 8, 6}), o, E({1, 8, 6}, "shared"));
  Matrix<float, H> x("x", 0, 8), y("y", 0, 8), g("g", 0, 8);
  RouteContext<H> training;
  training.training = true;
  const auto stats = layer.forward(x, y, training);
  CHECK(stats.assignments == 0);
  CHECK(stats.dropped == 0);
  CHECK_NOTHROW(layer.backward(y, g));
}
