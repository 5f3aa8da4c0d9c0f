// SPDX-License-Identifier: BSD-3-Clause
// Optimizer state for checkpoints, parameter groups and learning-rate schedules, against
// plain-loop updates written here from the torch.optim formulas and against schedule
// values known in closed form.
#include <kmoe/init.hpp>
#include <kmoe/lr_schedule.hpp>
#include <kmoe/optimizer.hpp>

#include <catch2/catch_approx.hpp>
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cmath>
#include <vector>

#include "support/spaces.hpp"

using namespace kmoe;
using namespace kmoe::test;
using Catch::Matchers::ContainsSubstring;

namespace {
/// Two tensors: a "router.weight" and an "experts.b1" bias, with gradients g(step, i).
template <class X>
struct Model {
  Vector<double, X> w_router{"w_router", 5}, g_router{"g_router", 5};
  Vector<double, X> w_bias{"w_bias", 3}, g_bias{"g_bias", 3};

  ParameterList<X, double> list() const {
    auto router = make_parameter<X>("router.weight", w_router, g_router);
    router.role = ParameterRole::router;
    auto bias = make_parameter<X>("experts.b1", w_bias, g_bias);
    bias.role = ParameterRole::bias;
    return {router, bias};
  }
  void set_gradients(int step) const {
    fill_normal(g_router, 1.0, 100 + step);
    fill_normal(g_bias, 1.0, 200 + step);
  }
};

template <class View>
std::vector<double> host_values(const View& v) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  return std::vector<double>(h.data(), h.data() + h.size());
}
}  // namespace

TEMPLATE_LIST_TEST_CASE("AdamW resumed from its saved state continues bitwise", "[optimizer]",
                        ExecutionSpaces) {
  using X = TestType;
  Model<X> run, resumed;
  fill_normal(run.w_router, 0.5, 1);
  fill_normal(run.w_bias, 0.5, 2);
  const typename AdamW<X, double>::Config config{1e-2, 0.9, 0.99, 1e-8, 0.1};
  AdamW<X, double> original(run.list(), config);
  for (int step = 0; step < 3; ++step) {
    run.set_gradients(step);
    original.step();
  }
  // Checkpoint: weights, moments and step count copied into a fresh optimizer.
  Kokkos::deep_copy(resumed.w_router, run.w_router);
  Kokkos::deep_copy(resumed.w_bias, run.w_bias);
  AdamW<X, double> restarted(resumed.list(), config);
  const auto saved = original.state(), target = restarted.state();
  REQUIRE(saved.size() == 4);
  CHECK(saved[0].name == "router.weight.exp_avg");
  CHECK(saved[3].name == "experts.b1.exp_avg_sq");
  for (std::size_t i = 0; i < saved.size(); ++i) Kokkos::deep_copy(target[i].value, saved[i].value);
  restarted.set_steps(original.steps());
  for (int step = 3; step < 6; ++step) {
    run.set_gradients(step);
    resumed.set_gradients(step);
    original.step();
    restarted.step();
  }
  CHECK(host_values(run.w_router) == host_values(resumed.w_router));
  CHECK(host_values(run.w_bias) == host_values(resumed.w_bias));
  // Without the moments the continuation differs (the test can tell).
  Model<X> cold;
  Kokkos::deep_copy(cold.w_router, resumed.w_router);
  AdamW<X, double> fresh(cold.list(), config);
  fresh.set_steps(6);
  cold.set_gradients(6);
  run.set_gradients(6);
  fresh.step();
  original.step();
  CHECK(host_values(cold.w_router) != host_values(run.w_router));
}

TEMPLATE_LIST_TEST_CASE("parameter groups scale the learning rate and turn weight decay off",
                        "[optimizer]", ExecutionSpaces) {
  using X = TestType;
  Model<X> model;
  fill_normal(model.w_router, 0.5, 3);
  fill_normal(model.w_bias, 0.5, 4);
  const double lr = 0.05, wd = 0.2, b1 = 0.9, b2 = 0.999, eps = 1e-8;
  typename AdamW<X, double>::Config config{lr, b1, b2, eps, wd};
  config.groups = {{"router.", std::nullopt, 0.1, true}, {"", ParameterRole::bias, 1.0, false}};
  AdamW<X, double> opt(model.list(), config);
  auto w_router = host_values(model.w_router), w_bias = host_values(model.w_bias);
  std::vector<double> m_r(5, 0), v_r(5, 0), m_b(3, 0), v_b(3, 0);
  // torch.optim.AdamW per element: decay, moments, bias-corrected step.
  const auto reference = [&](std::vector<double>& w, std::vector<double>& m, std::vector<double>& v,
                             const std::vector<double>& g, double rate, double decay, int t) {
    for (std::size_t i = 0; i < w.size(); ++i) {
      w[i] -= rate * decay * w[i];
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
      w[i] -=
          rate * (m[i] / (1 - std::pow(b1, t))) / (std::sqrt(v[i] / (1 - std::pow(b2, t))) + eps);
    }
  };
  for (int t = 1; t <= 4; ++t) {
    model.set_gradients(t);
    opt.step();
    reference(w_router, m_r, v_r, host_values(model.g_router), lr * 0.1, wd, t);
    reference(w_bias, m_b, v_b, host_values(model.g_bias), lr, 0.0, t);
  }
  const auto got_router = host_values(model.w_router), got_bias = host_values(model.w_bias);
  for (std::size_t i = 0; i < 5; ++i)
    CHECK(got_router[i] == Catch::Approx(w_router[i]).epsilon(1e-12));
  for (std::size_t i = 0; i < 3; ++i) CHECK(got_bias[i] == Catch::Approx(w_bias[i]).epsilon(1e-12));

  config.groups = {{"router.", std::nullopt, -1.0, true}};
  CHECK_THROWS_WITH((AdamW<X, double>(model.list(), config)),
                    ContainsSubstring("learning_rate_scale = -1"));
}

TEMPLATE_LIST_TEST_CASE("SGD state and a scheduled learning rate", "[optimizer]", ExecutionSpaces) {
  using X = TestType;
  Model<X> model;
  fill_normal(model.w_router, 0.5, 5);
  const double base = 0.1, mu = 0.9;
  SGD<X, double> opt(model.list(), {base, mu, 0.0});
  const StepSchedule schedule(2, 0.5);
  auto w = host_values(model.w_router);
  std::vector<double> velocity(5, 0);
  for (int t = 0; t < 5; ++t) {
    opt.set_learning_rate(base * schedule(opt.steps()));
    model.set_gradients(t);
    opt.step();
    const auto g = host_values(model.g_router);
    const double rate = base * std::pow(0.5, t / 2);
    for (std::size_t i = 0; i < 5; ++i) {
      velocity[i] = t == 0 ? g[i] : mu * velocity[i] + g[i];
      w[i] -= rate * velocity[i];
    }
  }
  const auto got = host_values(model.w_router);
  for (std::size_t i = 0; i < 5; ++i) CHECK(got[i] == Catch::Approx(w[i]).epsilon(1e-12));
  const auto state = opt.state();
  REQUIRE(state.size() == 2);
  CHECK(state[0].name == "router.weight.momentum_buffer");
  const auto buffer = host_values(state[0].value);
  for (std::size_t i = 0; i < 5; ++i) CHECK(buffer[i] == Catch::Approx(velocity[i]).epsilon(1e-12));
  CHECK_THROWS_WITH(opt.set_learning_rate(std::nan("")), ContainsSubstring("learning_rate = nan"));
  CHECK_THROWS_WITH(opt.set_steps(-1), ContainsSubstring("steps = -1"));
}

TEST_CASE("learning-rate schedules take their closed-form values", "[optimizer][schedule]") {
  const WarmupCosineSchedule cosine(10, 110, 0.1);
  CHECK(cosine(0) == 0.0);
  CHECK(cosine(5) == Catch::Approx(0.5));
  CHECK(cosine(10) == Catch::Approx(1.0));
  CHECK(cosine(60) == Catch::Approx(0.55));  // half way: min + (1 - min) / 2
  CHECK(cosine(110) == Catch::Approx(0.1));
  CHECK(cosine(1000) == Catch::Approx(0.1));
  const StepSchedule steps(3, 0.5);
  CHECK(steps(2) == 1.0);
  CHECK(steps(3) == 0.5);
  CHECK(steps(7) == 0.25);
  CHECK(ConstantSchedule{}(12345) == 1.0);
  CHECK_THROWS_WITH(WarmupCosineSchedule(10, 10), ContainsSubstring("total_steps = 10"));
  CHECK_THROWS_WITH(WarmupCosineSchedule(0, 10, 1.5), ContainsSubstring("min_ratio = 1.5"));
  CHECK_THROWS_WITH(StepSchedule(0, 0.5), ContainsSubstring("step_size = 0"));
  CHECK_THROWS_WITH(StepSchedule(2, 0.0), ContainsSubstring("gamma = 0"));
}
