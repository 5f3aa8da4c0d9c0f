// SPDX-License-Identifier: BSD-3-Clause
// The parameter server (kmoe/parameter_server.hpp) against independent references computed on
// the same worker ranks: synchronous mode against synchronize_gradients() + AdamW on every
// rank; bounded staleness s against the same all-reduce training whose replicated tensors are
// kept in a master copy and read back s updates late; convergence of the toy task with
// staleness; bad configurations raising on every rank without a hang.
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/optimizer.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/parameter_server.hpp>
#include <kmoe/routers/sigmoid_bias.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <catch2/catch_test_macros.hpp>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

using namespace kmoe;

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = double;
using GLU = SwiGLUExperts<X, S>;
using Router = SoftmaxTopKRouter<X, S>;
using Layer = MoELayer<Router, GLU, WeightedSumCombiner<X, S>, MpiCommunicator>;
using Server = ParameterServer<X, S>;

constexpr int hidden = 8, ffn = 12, shared_ffn = 10, experts = 6, top_k = 2, tokens_per_rank = 9;
const AdamW<X, S>::Config adam{1e-2, 0.9, 0.999, 1e-8, 0.01};

/// Servers and the worker layout: at 2 ranks one worker; at 4 ranks three workers (EP3) and
/// two workers (EP2, DP2), so that shards cut through tensors at 2 servers.
struct Setup {
  int servers;
  ParallelLayout layout;
};

std::vector<Setup> setups_of_world(int world) {
  const auto layout = [](int ep, int dp) {
    ParallelLayout l;
    l.ep = ep, l.dp = dp;
    return l;
  };
  if (world == 2) return {{1, layout(1, 1)}};
  if (world == 4) return {{1, layout(3, 1)}, {2, layout(2, 1)}, {2, layout(1, 2)}};
  return {};
}

std::string describe(const Setup& s) {
  return std::to_string(s.servers) + " servers, workers EP" + std::to_string(s.layout.ep) + " DP" +
         std::to_string(s.layout.dp);
}

std::unique_ptr<Layer> make_layer(const ParallelGroups<MpiCommunicator>& groups) {
  const auto owned = groups.layout.local_experts(experts, groups.ep_rank);
  auto layer = std::make_unique<Layer>(Router({hidden, experts, top_k}),
                                       GLU({int(owned.size()), hidden, ffn}), LayerOptions{},
                                       GLU({1, hidden, shared_ffn}, "shared_experts"), groups);
  InitConfig init;
  init.router_std = 0.4, init.input_std = 0.3, init.output_std = 0.2;
  initialize(layer->parameters(), init, 2026);
  return layer;
}

/// One step's forward and backward of a linear loss <U, y> with this token group's own x, U.
void forward_backward(Layer& layer, int step) {
  const auto& g = layer.groups();
  const int group = g.ep_rank + g.layout.ep * g.dp_rank;
  Matrix<S, X> x("x", tokens_per_rank, hidden), grad_y("grad_y", tokens_per_rank, hidden),
      y("y", tokens_per_rank, hidden), grad_x("grad_x", tokens_per_rank, hidden);
  fill_normal(x, 1.0, 1000 * std::uint64_t(step) + 2 * std::uint64_t(group));
  fill_normal(grad_y, 1.0 / tokens_per_rank,
              1000 * std::uint64_t(step) + 2 * std::uint64_t(group) + 1);
  RouteContext<X> training;
  training.training = true;
  layer.zero_gradients();
  layer.forward(x, y, training);
  layer.backward(grad_y, grad_x);
}

/// Largest |a - b| over every parameter, and the largest |b|.
std::pair<double, double> difference(const ParameterList<X, S>& a, const ParameterList<X, S>& b) {
  double worst = 0, scale = 0;
  for (std::size_t p = 0; p < a.size(); ++p)
    for (std::size_t i = 0; i < a[p].value.size(); ++i) {
      worst = std::max(worst, std::abs(a[p].value(i) - b[p].value(i)));
      scale = std::max(scale, std::abs(b[p].value(i)));
    }
  return {worst, scale};
}

/// Bitwise with one or two workers (the server adds g0 + g1, which the all-reduce's single
/// addition equals); with three the all-reduce's association is MPI's choice, so equal to
/// rounding.
void check_equal(const ParameterList<X, S>& trained, const ParameterList<X, S>& reference,
                 int workers) {
  const auto [worst, scale] = difference(trained, reference);
  CAPTURE(worst, scale);
  if (workers <= 2)
    CHECK(worst == 0);
  else
    CHECK(worst <= 1e-12 * scale);
}

/// The server side of every test: AdamW over its shard, one update per worker step.
long long serve(Server& server) {
  return server.serve([](const ParameterList<X, S>& shard) { return AdamW<X, S>(shard, adam); });
}

/// Reference for staleness s: all-reduce training (synchronize_gradients) whose replicated
/// tensors are stepped in a master copy; step t computes with the copy as it was after
/// update t - s (the initial values before that), and the run ends on the newest copy.
void train_stale_reference(Layer& layer, int steps, int staleness) {
  ParameterList<X, S> master;  // values in master_storage, gradients the layer's
  std::vector<Kokkos::View<S*, Kokkos::HostSpace>> master_storage;
  std::vector<std::vector<std::vector<S>>> versions(1);
  for (const auto& p : replicated_parameters(layer.parameters())) {
    auto q = p;
    Kokkos::View<S*, Kokkos::HostSpace> storage("master(" + p.name + ")", p.value.size());
    Kokkos::deep_copy(storage, p.value);
    q.value = typename Parameter<X, S>::flat_view(storage.data(), storage.size());
    master.push_back(q);
    versions[0].emplace_back(p.value.data(), p.value.data() + p.value.size());
    master_storage.push_back(storage);
  }
  const auto install = [&](const std::vector<std::vector<S>>& version) {
    const auto replicated = replicated_parameters(layer.parameters());
    for (std::size_t p = 0; p < replicated.size(); ++p)
      std::copy(version[p].begin(), version[p].end(), replicated[p].value.data());
  };
  AdamW<X, S> master_optimizer(master, adam);
  AdamW<X, S> expert_optimizer(expert_parallel_parameters(layer.parameters()), adam);
  for (int step = 0; step < steps; ++step) {
    install(versions[std::size_t(std::max(0, step - staleness))]);
    forward_backward(layer, step);
    layer.synchronize_gradients();
    master_optimizer.step();
    expert_optimizer.step();
    versions.emplace_back();
    for (const auto& q : master)
      versions.back().emplace_back(q.value.data(), q.value.data() + q.value.size());
  }
  install(versions.back());
}

}  // namespace

TEST_CASE("synchronous parameter server equals synchronize_gradients and AdamW on every rank",
          "[mpi][parameter_server]") {
  const MpiCommunicator world = MpiCommunicator::world();
  const int steps = 4;
  for (const auto& setup : setups_of_world(world.size())) {
    CAPTURE(describe(setup), world.rank());
    Server server(world, {setup.servers, 0});
    if (server.is_server()) {
      CHECK(serve(server) == steps);
      continue;
    }
    const auto groups = ParallelGroups<MpiCommunicator>::create(server.workers(), setup.layout);
    auto reference = make_layer(groups), trained = make_layer(groups);
    const auto initial = make_layer(groups);
    AdamW<X, S> reference_optimizer(reference->parameters(), adam);
    AdamW<X, S> expert_optimizer(expert_parallel_parameters(trained->parameters()), adam);
    server.attach(*trained);
    for (int step = 0; step < steps; ++step) {
      forward_backward(*reference, step);
      reference->synchronize_gradients();
      reference_optimizer.step();
      forward_backward(*trained, step);
      server.synchronize();
      expert_optimizer.step();
    }
    server.finish();
    check_equal(trained->parameters(), reference->parameters(), server.worker_count());
    // The comparison means something only if training moved the replicated tensors.
    CHECK(difference(replicated_parameters(reference->parameters()),
                     replicated_parameters(initial->parameters()))
              .first > 1e-3);
    trained->check_replicas();
  }
}

TEST_CASE("bounded staleness s computes with the replicated values of s updates ago",
          "[mpi][parameter_server]") {
  const MpiCommunicator world = MpiCommunicator::world();
  const int steps = 6;
  for (const auto& setup : setups_of_world(world.size()))
    for (int staleness : {1, 2}) {
      CAPTURE(describe(setup), staleness, world.rank());
      Server server(world, {setup.servers, staleness});
      if (server.is_server()) {
        CHECK(serve(server) == steps);
        continue;
      }
      const auto groups = ParallelGroups<MpiCommunicator>::create(server.workers(), setup.layout);
      auto reference = make_layer(groups), trained = make_layer(groups),
           synchronous = make_layer(groups);
      train_stale_reference(*reference, steps, staleness);
      train_stale_reference(*synchronous, steps, 0);
      AdamW<X, S> expert_optimizer(expert_parallel_parameters(trained->parameters()), adam);
      server.attach(*trained);
      for (int step = 0; step < steps; ++step) {
        forward_backward(*trained, step);
        server.synchronize();
        expert_optimizer.step();
      }
      server.finish();
      check_equal(trained->parameters(), reference->parameters(), server.worker_count());
      // Staleness changes the trajectory: the reference is not the synchronous run.
      CHECK(difference(reference->parameters(), synchronous->parameters()).first > 1e-6);
    }
}

TEST_CASE("the toy task converges with stale replicated parameters", "[mpi][parameter_server]") {
  using BiasRouter = SigmoidBiasRouter<X, S>;
  using ToyLayer = MoELayer<BiasRouter, GLU, WeightedSumCombiner<X, S>, MpiCommunicator>;
  const MpiCommunicator world = MpiCommunicator::world();
  const int toy_hidden = 16, toy_ffn = 32, toy_experts = 8, clusters = 8, batch = 128, steps = 250;
  // The task of examples/train_toy.cpp: x = c_i + 0.1 noise, target = A_i x.
  Matrix<S, X> centres("centres", clusters, toy_hidden);
  Tensor3<S, X> maps("maps", clusters, toy_hidden, toy_hidden);
  fill_normal(centres, 1.0, 2);
  fill_normal(maps, 0.4, 3);
  for (int staleness : {1, 3}) {
    CAPTURE(staleness, world.rank());
    Server server(world, {1, staleness});
    if (server.is_server()) {
      CHECK(server.serve([](const ParameterList<X, S>& shard) {
        return AdamW<X, S>(shard, {3e-3, 0.9, 0.999, 1e-8, 0.0});
      }) == steps);
      continue;
    }
    ParallelLayout layout;
    layout.ep = server.worker_count();
    const auto groups = ParallelGroups<MpiCommunicator>::create(server.workers(), layout);
    const auto owned = layout.local_experts(toy_experts, groups.ep_rank);
    LayerOptions options;
    options.losses.switch_aux = 1e-2;
    ToyLayer layer(BiasRouter({toy_hidden, toy_experts, 2, true, 1.0, {}}),
                   GLU({int(owned.size()), toy_hidden, toy_ffn}), options, std::nullopt, groups);
    fill_normal(layer.parameters(), 0.2, 1);
    AdamW<X, S> expert_optimizer(expert_parallel_parameters(layer.parameters()),
                                 {3e-3, 0.9, 0.999, 1e-8, 0.0});
    server.attach(layer);
    Matrix<S, X> x("x", batch, toy_hidden), target("target", batch, toy_hidden),
        y("y", batch, toy_hidden), grad_y("grad_y", batch, toy_hidden),
        grad_x("grad_x", batch, toy_hidden), noise("noise", batch, toy_hidden);
    std::vector<double> losses;
    for (int step = 0; step < steps; ++step) {
      fill_normal(noise, 0.1, 100 + std::uint64_t(step) * 64 + std::uint64_t(groups.ep_rank));
      for (int t = 0; t < batch; ++t) {
        const int c = (t * 7 + step + groups.ep_rank) % clusters;
        for (int h = 0; h < toy_hidden; ++h) x(t, h) = centres(c, h) + noise(t, h);
        for (int o = 0; o < toy_hidden; ++o) {
          S sum = 0;
          for (int h = 0; h < toy_hidden; ++h) sum += maps(c, o, h) * x(t, h);
          target(t, o) = sum;
        }
      }
      RouteContext<X> training;
      training.training = true;
      layer.forward(x, y, training);
      Kokkos::View<double*, Kokkos::HostSpace> loss("loss", 1);
      for (int t = 0; t < batch; ++t)
        for (int h = 0; h < toy_hidden; ++h) {
          const double d = y(t, h) - target(t, h);
          loss(0) += d * d / (batch * toy_hidden);
          grad_y(t, h) = 2 * d / (batch * toy_hidden);
        }
      groups.world.all_reduce_sum(loss);
      losses.push_back(loss(0) / groups.world.size());
      layer.zero_gradients();
      layer.backward(grad_y, grad_x);
      server.synchronize();
      expert_optimizer.step();
      layer.apply_bias_update(1e-3);
    }
    server.finish();
    double last = 0;
    for (int i = steps - 10; i < steps; ++i) last += losses[std::size_t(i)] / 10;
    CAPTURE(losses.front(), last);
    CHECK(losses.front() / last >= 10);
    layer.check_replicas();  // finish() leaves every worker on the servers' final values
  }
}

TEST_CASE("a bad parameter-server configuration raises on every rank, naming it",
          "[mpi][parameter_server]") {
  const MpiCommunicator world = MpiCommunicator::world();
  const auto raised = [&](const ParameterServerConfig& config) -> std::string {
    try {
      Server server(world, config);
    } catch (const kmoe::invalid_argument& e) {
      return e.parameter();
    } catch (const kmoe::runtime_error&) {
      return "runtime_error";
    }
    return "nothing";
  };
  const int n = world.size();
  CHECK(raised({n, 0}) == "config.servers");
  CHECK(raised({n + 1, 0}) == "config.servers");
  CHECK(raised({0, 0}) == "config.servers");
  CHECK(raised({1, -1}) == "config.staleness");
  // Bad on rank 0 alone: rank 0 names it, the others learn that a peer failed; none waits.
  CHECK(raised({1, world.rank() == 0 ? -1 : 1}) ==
        (world.rank() == 0 ? "config.staleness" : "runtime_error"));
  // Valid everywhere but not the same: every rank names it.
  CHECK(raised({1, world.rank() == 0 ? 2 : 1}) == "config.staleness");
  CHECK(raised({world.rank() == 0 ? 1 : n - 1, 0}) == (n > 2 ? "config.servers" : "nothing"));

  // A layer built on the whole world rather than on the workers.
  Server server(world, {1, 0});
  ParallelLayout everyone;
  everyone.dp = n;
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, everyone);
  std::string what;
  try {
    if (server.is_server())
      serve(server);
    else
      server.attach(ParameterList<X, S>{}, groups);
  } catch (const kmoe::invalid_argument& e) {
    what = e.parameter();
  } catch (const kmoe::runtime_error&) {
    what = "runtime_error";
  }
  CHECK(what == (server.is_server() ? "runtime_error" : "groups.world"));
}
