// SPDX-License-Identifier: BSD-3-Clause
// Cross-rank checks that turn a would-be hang or a silently divergent run into an error on
// every rank: mismatched call sequences (a skipped forward, a one-sided backward or
// gradient synchronisation), replicated parameters that differ across ranks, and
// configuration mismatches reported with each rank's value. Without these checks the
// sequence cases enter mismatched collectives and hang (ctest's TIMEOUT fails them).
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <string>

using namespace kmoe;
using Catch::Matchers::ContainsSubstring;

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = double;
using Router = SoftmaxTopKRouter<X, S>;
using GLU = SwiGLUExperts<X, S>;
using FFN = FFNExperts<X, S>;
template <class E = GLU>
using Layer = MoELayer<Router, E, WeightedSumCombiner<X, S>, MpiCommunicator>;

constexpr int hidden = 8, ffn = 12, tokens = 9;

ParallelGroups<MpiCommunicator> groups_of(const MpiCommunicator& world, int ep, int dp) {
  ParallelLayout layout;
  layout.ep = ep;
  layout.dp = dp;
  return ParallelGroups<MpiCommunicator>::create(world, layout);
}

/// An expert-parallel layer over the whole world with identical parameters everywhere.
Layer<> expert_parallel_layer(const MpiCommunicator& world) {
  Layer<> layer(Router({hidden, 2 * world.size(), 2}), GLU({2, hidden, ffn}), {}, std::nullopt,
                groups_of(world, world.size(), 1));
  fill_normal(layer.parameters(), 0.3, 11);
  return layer;
}

struct Batch {
  Matrix<S, X> x{"x", tokens, hidden}, y{"y", tokens, hidden};
  Matrix<S, X> grad_y{"grad_y", tokens, hidden}, grad_x{"grad_x", tokens, hidden};
  explicit Batch(int rank) {
    fill_normal(x, 1.0, 20 + rank);
    fill_normal(grad_y, 1.0, 30 + rank);
  }
};

RouteContext<X> training() {
  RouteContext<X> context;
  context.training = true;
  return context;
}

/// What every rank other than `odd` must read in the sequence error: where the others are.
std::string others_are_in(const MpiCommunicator& world, int odd, const std::string& call) {
  std::string ranks;
  for (int r = 0; r < world.size(); ++r)
    if (r != odd) ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
  return (world.size() == 2 ? "rank " + ranks + " is in " : "ranks " + ranks + " are in ") + call;
}

}  // namespace

TEST_CASE("a rank that skips a training step's forward makes every rank raise at its backward",
          "[mpi][sequence]") {
  const auto world = MpiCommunicator::world();
  auto layer = expert_parallel_layer(world);
  Batch batch(world.rank());
  layer.forward(batch.x, batch.y, training());
  layer.backward(batch.grad_y, batch.grad_x);
  // Step 2: rank 1 skips its forward and goes straight to backward (an empty batch that
  // was `continue`d past the forward only); the others run the forward.
  const auto step = [&] {
    if (world.rank() != 1) layer.forward(batch.x, batch.y, training());
    layer.backward(batch.grad_y, batch.grad_x);
  };
  try {
    step();
    FAIL("the mismatched step completed");
  } catch (const kmoe::runtime_error& e) {
    const std::string what = e.what();
    CHECK_THAT(what, ContainsSubstring("the ranks are at different calls of the layer"));
    CHECK_THAT(what,
               ContainsSubstring("rank 1 is in backward #2 (calls so far: 1 forward, 2 backward"));
    CHECK_THAT(what, ContainsSubstring(others_are_in(
                         world, 1, "forward #2 (calls so far: 2 forward, 1 backward")));
  }
}

TEST_CASE("only one rank calling backward makes every rank raise at the next call",
          "[mpi][sequence]") {
  const auto world = MpiCommunicator::world();
  auto layer = expert_parallel_layer(world);
  Batch batch(world.rank());
  layer.forward(batch.x, batch.y, training());
  const auto next = [&] {
    if (world.rank() == 0)
      layer.backward(batch.grad_y, batch.grad_x);
    else
      layer.forward(batch.x, batch.y, training());
  };
  try {
    next();
    FAIL("the mismatched calls completed");
  } catch (const kmoe::runtime_error& e) {
    const std::string what = e.what();
    CHECK_THAT(what,
               ContainsSubstring("rank 0 is in backward #1 (calls so far: 1 forward, 1 backward"));
    CHECK_THAT(what, ContainsSubstring(others_are_in(
                         world, 0, "forward #2 (calls so far: 2 forward, 0 backward")));
  }
}

TEST_CASE("a gradient synchronisation on one rank alone raises on every rank", "[mpi][sequence]") {
  const auto world = MpiCommunicator::world();
  auto layer = expert_parallel_layer(world);
  Batch batch(world.rank());
  layer.forward(batch.x, batch.y, training());
  layer.backward(batch.grad_y, batch.grad_x);
  const auto next = [&] {
    if (world.rank() == world.size() - 1)
      layer.synchronize_gradients();
    else
      layer.forward(batch.x, batch.y, training());
  };
  CHECK_THROWS_WITH(next(), ContainsSubstring("rank " + std::to_string(world.size() - 1) +
                                              " is in synchronize_gradients #1"));
}

TEST_CASE("matched calls pass the sequence check and leave results unchanged", "[mpi][sequence]") {
  const auto world = MpiCommunicator::world();
  auto layer = expert_parallel_layer(world);
  Batch batch(world.rank());
  for (int step = 0; step < 3; ++step) {
    CHECK_NOTHROW(layer.forward(batch.x, batch.y, training()));
    CHECK_NOTHROW(layer.backward(batch.grad_y, batch.grad_x));
    CHECK_NOTHROW(layer.synchronize_gradients());
    layer.zero_gradients();
  }
  CHECK_NOTHROW(layer.check_replicas());
}

TEST_CASE("the watchdog's non-blocking collectives give the blocking ones' results bitwise",
          "[mpi][watchdog]") {
  MpiOptions off;
  off.collective_timeout = std::chrono::milliseconds(0);
  const auto watched = MpiCommunicator::world();
  const auto blocking = MpiCommunicator::world(off);
  REQUIRE(watched.options().collective_timeout.count() > 0);
  Batch batch(watched.rank());
  Matrix<S, X> y_blocking("y_blocking", tokens, hidden), grad_x_blocking("gx", tokens, hidden);
  auto layer = expert_parallel_layer(watched);
  auto reference = expert_parallel_layer(blocking);
  layer.forward(batch.x, batch.y, training());
  layer.backward(batch.grad_y, batch.grad_x);
  reference.forward(batch.x, y_blocking, training());
  reference.backward(batch.grad_y, grad_x_blocking);
  for (std::size_t i = 0; i < batch.y.size(); ++i) {
    CHECK(batch.y.data()[i] == y_blocking.data()[i]);
    CHECK(batch.grad_x.data()[i] == grad_x_blocking.data()[i]);
  }
}

TEST_CASE("a collective timeout that differs across ranks raises on every rank",
          "[mpi][watchdog]") {
  MpiOptions options;
  options.collective_timeout =
      std::chrono::milliseconds(MpiCommunicator::world().rank() == 1 ? 0 : 2000);
  CHECK_THROWS_WITH(
      MpiCommunicator::world(options),
      ContainsSubstring("options.collective_timeout = rank 0 has 2000 ms, rank 1 has 0 ms"));
}

/// The parameter called `name` of `layer` (REQUIREs that there is one).
template <class L>
Parameter<X, S> parameter_named(const L& layer, const std::string& name) {
  for (const auto& p : layer.parameters())
    if (p.name == name) return p;
  FAIL("no parameter " << name);
  return {};
}

TEST_CASE("a router that differs across ranks is named when the replicas are checked",
          "[mpi][replicas]") {
  const auto world = MpiCommunicator::world();
  auto layer = expert_parallel_layer(world);
  CHECK_NOTHROW(layer.check_replicas());
  // One rank's router drifts (a rank-dependent seed, a missed gradient synchronisation).
  const auto router = parameter_named(layer, "router.weight");
  if (world.rank() == 1) router.value(3) += 1e-12;
  CHECK_THROWS_WITH(layer.check_replicas(),
                    ContainsSubstring("replicated parameters differ across the " +
                                      std::to_string(world.size()) + " ranks of the world group") &&
                        ContainsSubstring("'router.weight'") &&
                        ContainsSubstring("rank 1 sums to"));
}

TEST_CASE("a router initialised per rank is caught before the first forward routes with it",
          "[mpi][replicas]") {
  const auto world = MpiCommunicator::world();
  Layer<> layer(Router({hidden, 2 * world.size(), 2}), GLU({2, hidden, ffn}), {}, std::nullopt,
                groups_of(world, world.size(), 1));
  fill_normal(layer.parameters(), 0.3, 11 + world.rank());  // the seed should not vary
  Batch batch(world.rank());
  CHECK_THROWS_WITH(layer.forward(batch.x, batch.y), ContainsSubstring("'router.weight'"));
}

TEST_CASE("a router passed in already different is caught at construction", "[mpi][replicas]") {
  const auto world = MpiCommunicator::world();
  Router router({hidden, 2 * world.size(), 2});
  ParameterList<X, S> list;
  router.collect_parameters(list);
  fill_normal(list, 0.3, 7 + world.rank());
  CHECK_THROWS_WITH(Layer<>(router, GLU({2, hidden, ffn}), {}, std::nullopt,
                            groups_of(world, world.size(), 1)),
                    ContainsSubstring("'router.weight'"));
}

TEST_CASE("shared experts that differ across ranks are named", "[mpi][replicas]") {
  const auto world = MpiCommunicator::world();
  Layer<> layer(Router({hidden, 2 * world.size(), 2}), GLU({2, hidden, ffn}), {},
                GLU({1, hidden, ffn}, "shared_experts"), groups_of(world, world.size(), 1));
  fill_normal(layer.parameters(), 0.3, 11);
  if (world.rank() == 0) parameter_named(layer, "shared_experts.w_down").value(0) *= 2;
  const std::string message = [&] {
    try {
      layer.check_replicas();
    } catch (const kmoe::runtime_error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  }();
  CHECK_THAT(message, ContainsSubstring("'shared_experts.w_down'"));
  CHECK_THAT(message, !ContainsSubstring("'router.weight'"));
}

TEST_CASE("expert replicas that differ across the data-parallel group are named",
          "[mpi][replicas]") {
  const auto world = MpiCommunicator::world();
  // Every rank a data-parallel replica holding all experts.
  Layer<> layer(Router({hidden, 4, 2}), GLU({4, hidden, ffn}), {}, std::nullopt,
                groups_of(world, 1, world.size()));
  fill_normal(layer.parameters(), 0.3, 11);
  CHECK_NOTHROW(layer.check_replicas());
  if (world.rank() == world.size() - 1) parameter_named(layer, "experts.w_up").value(5) = 0;
  CHECK_THROWS_WITH(layer.check_replicas(), ContainsSubstring("ranks of the dp group") &&
                                                ContainsSubstring("'experts.w_up'"));
}

TEST_CASE("expert replicas of different EP ranks are not compared", "[mpi][replicas]") {
  const auto world = MpiCommunicator::world();
  // Under expert parallelism each rank holds different experts: they may differ freely.
  auto layer = expert_parallel_layer(world);
  fill_normal(parameter_named(layer, "experts.w_gate").value, 0.3, 50 + world.rank());
  CHECK_NOTHROW(layer.check_replicas());
}

TEST_CASE("an FFN output bias that differs across TP ranks is named", "[mpi][replicas]") {
  const auto world = MpiCommunicator::world();
  ParallelLayout layout;
  layout.tp = 2;
  layout.ep = world.size() / 2;
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  const int experts = 2 * layout.ep;
  Layer<FFN> layer(Router({hidden, experts, 2}), FFN({2, hidden, ffn / 2, true}), {}, std::nullopt,
                   groups);
  fill_normal(layer.parameters(), 0.3, 11);
  CHECK_NOTHROW(layer.check_replicas());
  if (groups.tp_rank == 1) parameter_named(layer, "experts.b2").value(0) += 1;
  CHECK_THROWS_WITH(layer.check_replicas(), ContainsSubstring("ranks of the tp group") &&
                                                ContainsSubstring("'experts.b2'"));
}

TEST_CASE("a configuration mismatch shows each rank's value", "[mpi][configuration]") {
  const auto world = MpiCommunicator::world();
  LayerOptions options;
  options.capacity.factor = world.rank() == 1 ? 2.0 : 1.25;
  options.losses.z_loss = world.rank() == 1 ? 1e-3 : 0.0;
  options.capacity.drop = world.rank() == 1 ? DropPolicy::by_position : DropPolicy::by_probability;
  const std::string rest = world.size() == 2 ? "rank 0 has " : "ranks 0, 2, 3 have ";
  CHECK_THROWS_WITH(
      Layer<>(Router({hidden, 2 * world.size(), 2}), GLU({2, hidden, ffn}), options, std::nullopt,
              groups_of(world, world.size(), 1)),
      ContainsSubstring("capacity.factor: " + rest + "1.25, rank 1 has 2;") &&
          ContainsSubstring("losses.z_loss: " + rest + "0, rank 1 has 0.001") &&
          ContainsSubstring("capacity.drop: " + rest + "by_probability, rank 1 has by_position") &&
          ContainsSubstring("every rank must build the same layer"));
}

TEST_CASE("a router setting that differs across ranks is named with each rank's value",
          "[mpi][configuration]") {
  // The router contributes its own settings (Router::fingerprint): the temperature and the
  // group limit here, which no other field of the layer reveals.
  const auto world = MpiCommunicator::world();
  SoftmaxTopKConfig config;
  config.hidden = hidden, config.experts = 2 * world.size(), config.top_k = 2;
  config.temperature = world.rank() == 1 ? 0.5 : 1.0;
  config.group = world.rank() == 1 ? GroupLimit{2, 1, 2} : GroupLimit{};
  const std::string rest = world.size() == 2 ? "rank 0 has " : "ranks 0, 2, 3 have ";
  CHECK_THROWS_WITH(Layer<>(Router(config), GLU({2, hidden, ffn}), {}, std::nullopt,
                            groups_of(world, world.size(), 1)),
                    ContainsSubstring("router.temperature: " + rest + "1, rank 1 has 0.5") &&
                        ContainsSubstring("router.group.n_group: " + rest + "1, rank 1 has 2") &&
                        ContainsSubstring("every rank must build the same layer"));
}

TEST_CASE("an expert type mismatch shows each rank's type name", "[mpi][configuration]") {
  const auto world = MpiCommunicator::world();
  const auto groups = groups_of(world, world.size(), 1);
  const auto build = [&] {
    if (world.rank() == 1)
      Layer<FFN>(Router({hidden, 2 * world.size(), 2}), FFN({2, hidden, ffn}), {}, std::nullopt,
                 groups);
    else
      Layer<GLU>(Router({hidden, 2 * world.size(), 2}), GLU({2, hidden, ffn}), {}, std::nullopt,
                 groups);
  };
  CHECK_THROWS_WITH(build(), ContainsSubstring("Expert type: ") &&
                                 ContainsSubstring("rank 1 has kmoe::FFNExperts<") &&
                                 ContainsSubstring(world.size() == 2
                                                       ? "rank 0 has kmoe::GLUExperts<"
                                                       : "ranks 0, 2, 3 have kmoe::GLUExperts<"));
}
