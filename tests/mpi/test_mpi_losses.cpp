// SPDX-License-Identifier: BSD-3-Clause
// The KL-to-uniform and global-batch aux losses (with a router temperature) under every
// layout of the mpiexec world, over two micro-batches of gradient accumulation, against a
// single-rank layer on the global batch computed on every rank.
//
// Conventions as in test_mpi_layer.cpp: token group g = ep_rank + EP * dp_rank holds rows
// [g*T, (g+1)*T) of each micro-batch's global x; the global loss is the mean of the groups'
// losses, so the reference carries G times the coefficients and its parameter gradients,
// divided by G, are the distributed ones after synchronize_gradients().
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "shard_index.hpp"

using namespace kmoe;

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = double;
using Router = SoftmaxTopKRouter<X, S>;
using GLU = SwiGLUExperts<X, S>;
using DistLayer = MoELayer<Router, GLU, WeightedSumCombiner<X, S>, MpiCommunicator>;
using RefLayer = MoELayer<Router, GLU>;

constexpr int hidden = 8, ffn = 12, experts = 6, top_k = 2, tokens_per_rank = 9;
constexpr int micro_batches = 2;
constexpr double tolerance = 1e-10;

std::vector<ParallelLayout> layouts_of_world(int world) {
  std::vector<ParallelLayout> all;
  const auto add = [&](int tp, int ep, int dp) {
    ParallelLayout l;
    l.tp = tp;
    l.ep = ep;
    l.dp = dp;
    if (l.world_size() == world) all.push_back(l);
  };
  add(1, 1, 2);
  add(1, 2, 1);
  add(2, 1, 1);
  add(1, 1, 4);
  add(1, 2, 2);
  add(2, 1, 2);
  return all;
}

Router make_router() {
  SoftmaxTopKConfig config{hidden, experts, top_k, true};
  config.temperature = 0.7;
  return Router(config);
}

Matrix<S, X> rows_of(const Matrix<S, X>& full, int first, int count) {
  Matrix<S, X> part("part", count, full.extent(1));
  Kokkos::deep_copy(part, Kokkos::subview(full, std::make_pair(first, first + count), Kokkos::ALL));
  return part;
}

void copy_shard(const ParameterList<X, S>& full, const ParameterList<X, S>& shard,
                const std::vector<int>& owned, int tp_rank) {
  REQUIRE(full.size() == shard.size());
  for (std::size_t p = 0; p < full.size(); ++p)
    for (std::size_t i = 0; i < shard[p].value.size(); ++i)
      shard[p].value(i) =
          full[p].value(kmoe::test::full_index(full[p].shape, shard[p].shape, i, owned, tp_rank));
}

/// Largest |distributed - reference / groups| over a list, relative to the reference scale.
double gradient_error(const ParameterList<X, S>& full, const ParameterList<X, S>& shard,
                      const std::vector<int>& owned, int tp_rank, int groups) {
  double error = 0;
  for (std::size_t p = 0; p < full.size(); ++p) {
    double scale = 1e-30;
    for (std::size_t i = 0; i < full[p].grad.size(); ++i)
      scale = std::max(scale, std::abs(full[p].grad(i)) / groups);
    for (std::size_t i = 0; i < shard[p].grad.size(); ++i) {
      const double want =
          full[p].grad(kmoe::test::full_index(full[p].shape, shard[p].shape, i, owned, tp_rank)) /
          groups;
      error = std::max(error, std::abs(shard[p].grad(i) - want) / scale);
    }
  }
  return error;
}

double rows_error(const Matrix<S, X>& got, const Matrix<S, X>& full, int first) {
  double error = 0, scale = 1e-30;
  for (std::size_t t = 0; t < got.extent(0); ++t)
    for (std::size_t h = 0; h < got.extent(1); ++h) {
      scale = std::max(scale, std::abs(full(first + t, h)));
      error = std::max(error, std::abs(got(t, h) - full(first + t, h)));
    }
  return error / scale;
}

void run_layout(const ParallelLayout& layout, bool zero_upstream) {
  const MpiCommunicator world = MpiCommunicator::world();
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  const int token_groups = layout.ep * layout.dp;
  const int g = groups.ep_rank + layout.ep * groups.dp_rank;
  const int global_tokens = tokens_per_rank * token_groups;
  const auto owned = layout.local_experts(experts, groups.ep_rank);
  CAPTURE(layout.tp, layout.ep, layout.dp, world.rank(), zero_upstream);

  const double kl = 0.2, global_aux = 0.05, switch_aux = 0.05;
  LayerOptions options, ref_options;
  options.losses.kl_uniform = kl;
  options.losses.global_batch_aux = global_aux;
  options.losses.global_batch_micro_batches = micro_batches;
  options.losses.switch_aux = switch_aux;
  ref_options.losses = options.losses;
  ref_options.losses.kl_uniform = kl * token_groups;
  ref_options.losses.global_batch_aux = global_aux * token_groups;
  ref_options.losses.switch_aux = switch_aux * token_groups;

  RefLayer ref(make_router(), GLU({experts, hidden, ffn}), ref_options);
  fill_normal(ref.parameters(), 0.5, 4321);
  DistLayer layer(make_router(), GLU({int(owned.size()), hidden, ffn / layout.tp}), options,
                  std::nullopt, groups);
  {
    ParameterList<X, S> from, to;
    ref.router().collect_parameters(from);
    layer.router().collect_parameters(to);
    copy_shard(from, to, {}, 0);
    from.clear(), to.clear();
    ref.experts().collect_parameters(from);
    layer.experts().collect_parameters(to);
    copy_shard(from, to, owned, groups.tp_rank);
  }

  RouteContext<X> context;
  context.training = true;
  ref.zero_gradients();
  layer.zero_gradients();
  for (int m = 0; m < micro_batches; ++m) {
    CAPTURE(m);
    Matrix<S, X> x("x", global_tokens, hidden), grad_y("grad_y", global_tokens, hidden);
    fill_normal(x, 1.0, 90 + m);
    // Upstream 0 leaves the balance terms alone in the gradients.
    if (!zero_upstream) {
      fill_normal(grad_y, 1.0, 95 + m);
      Kokkos::parallel_for(
          Kokkos::RangePolicy<X>(0, grad_y.size()),
          KOKKOS_LAMBDA(std::size_t i) { grad_y.data()[i] /= tokens_per_rank; });
    }
    Matrix<S, X> ref_y("ref_y", global_tokens, hidden), ref_gx("ref_gx", global_tokens, hidden);
    const auto ref_stats = ref.forward(x, ref_y, context);
    ref.backward(grad_y, ref_gx);

    Matrix<S, X> y("y", tokens_per_rank, hidden), gx("gx", tokens_per_rank, hidden);
    const auto stats = layer.forward(rows_of(x, g * tokens_per_rank, tokens_per_rank), y, context);
    layer.backward(rows_of(grad_y, g * tokens_per_rank, tokens_per_rank), gx);
    CHECK(rows_error(y, ref_y, g * tokens_per_rank) < tolerance);
    if (!zero_upstream) CHECK(rows_error(gx, ref_gx, g * tokens_per_rank) < tolerance);

    // KL: the global batch's value on every rank (the reference's has G times gamma).
    CHECK(stats.losses.kl_uniform * token_groups ==
          Catch::Approx(ref_stats.losses.kl_uniform).epsilon(1e-12));
    CHECK(ref_stats.losses.kl_uniform > 1e-4);
    // Global-batch aux: the token groups' values (one TP rank each) sum to the reference's.
    Kokkos::View<double*, Kokkos::HostSpace> terms("terms", 2);
    if (groups.tp_rank == 0) {
      terms(0) = stats.losses.global_batch_aux;
      terms(1) = stats.losses.switch_aux;
    }
    world.all_reduce_sum(terms);
    CHECK(terms(0) == Catch::Approx(ref_stats.losses.global_batch_aux).epsilon(1e-12));
    CHECK(terms(1) == Catch::Approx(ref_stats.losses.switch_aux).epsilon(1e-12));
    // The window's first micro-batch is the Switch term; the second also counts the first's
    // assignments, so the two differ there.
    if (m == 0)
      CHECK(ref_stats.losses.global_batch_aux ==
            Catch::Approx(ref_stats.losses.switch_aux).epsilon(1e-12));
    else
      CHECK(std::abs(ref_stats.losses.global_batch_aux - ref_stats.losses.switch_aux) > 1e-6);
  }
  layer.synchronize_gradients();
  ParameterList<X, S> full, mine;
  ref.router().collect_parameters(full);
  layer.router().collect_parameters(mine);
  CHECK(gradient_error(full, mine, {}, 0, token_groups) < tolerance);
  double router_scale = 0;
  for (std::size_t i = 0; i < full[0].grad.size(); ++i)
    router_scale = std::max(router_scale, std::abs(full[0].grad(i)));
  CHECK(router_scale > 1e-6);
  full.clear(), mine.clear();
  ref.experts().collect_parameters(full);
  layer.experts().collect_parameters(mine);
  CHECK(gradient_error(full, mine, owned, groups.tp_rank, token_groups) < tolerance);
}

}  // namespace

TEST_CASE("KL-to-uniform and global-batch aux over micro-batches equal the single-rank layer",
          "[mpi][losses]") {
  for (const auto& layout : layouts_of_world(MpiCommunicator::world().size())) {
    run_layout(layout, true);
    run_layout(layout, false);
  }
}
