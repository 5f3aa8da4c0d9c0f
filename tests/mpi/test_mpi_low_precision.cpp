// SPDX-License-Identifier: BSD-3-Clause
// Layers stored in 16 bits across ranks, and the loss scaler's agreement.
//
// 1. A bf16 / fp16 layer on every layout of the world (EP, TP, DP and their mixes) against
//    the single-rank fp32 layer run on the same 16-bit-rounded weights and inputs over the
//    global batch (test_mpi_layer.cpp's scheme: token group g holds rows [g T, (g+1) T), the
//    loss is the mean over the global batch, so the synchronised gradients are the
//    reference's divided by the number of token groups). The tolerances are
//    test_low_precision_layer.cpp's, from the storage's unit roundoff u: 5 sqrt(F) u forward,
//    10 sqrt(F) u for gradients (TP's partial outputs are summed in float and rounded once).
//    Across EP ranks the dispatch is deduplicated; with 300 (bf16) and 2100 (fp16) tokens
//    per rank its header values pass what the storage type holds exactly.
// 2. kmoe::DynamicLossScaler with an overflow injected on one rank only: every rank skips
//    the step (its gradients zeroed, the scale backed off), then grows the scale after the
//    configured run of good steps; finite gradients are divided by the scale exactly.
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/init.hpp>
#include <kmoe/kmoe.hpp>
#include <kmoe/mixed_precision.hpp>

#include <catch2/catch_test_macros.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "shard_index.hpp"

using namespace kmoe;

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
constexpr int hidden = 8, ffn = 12, experts = 5;

template <class Storage>
constexpr double unit_roundoff() {
  return std::is_same_v<Storage, bfloat16> ? 1.0 / 256 : 1.0 / 2048;
}

/// Every layout of TP, EP and DP sizes in {1, 2, 4} whose product is the world size.
std::vector<ParallelLayout> layouts_of_world(int world) {
  std::vector<ParallelLayout> all;
  for (int tp : {1, 2, 4})
    for (int ep : {1, 2, 4}) {
      ParallelLayout l;
      l.tp = tp;
      l.ep = ep;
      l.dp = world / (tp * ep);
      // F = 12 splits over at most 2 TP ranks here; E = 5 over up to 4 EP ranks.
      if (tp <= 2 && l.dp >= 1 && l.world_size() == world) all.push_back(l);
    }
  return all;
}

/// Copies the full float parameters into this rank's shard, rounded to Storage.
template <class Storage>
void copy_rounded_shard(const ParameterList<X, float>& full, const ParameterList<X, Storage>& shard,
                        const std::vector<int>& owned, int tp_rank) {
  REQUIRE(full.size() == shard.size());
  for (std::size_t p = 0; p < full.size(); ++p)
    for (std::size_t i = 0; i < shard[p].value.size(); ++i)
      shard[p].value(i) = Storage(
          full[p].value(kmoe::test::full_index(full[p].shape, shard[p].shape, i, owned, tp_rank)));
}

/// Rounds every value of a float view to Storage in place.
template <class Storage, class View>
void round_in_place(const View& v) {
  for (std::size_t i = 0; i < v.size(); ++i) v.data()[i] = float(Storage(v.data()[i]));
}

/// Largest |shard gradient - reference / groups| relative to the reference's scale.
template <class Storage>
double gradient_error(const ParameterList<X, float>& full, const ParameterList<X, Storage>& shard,
                      const std::vector<int>& owned, int tp_rank, int groups) {
  double error = 0;
  for (std::size_t p = 0; p < full.size(); ++p) {
    double scale = 1e-30;
    for (std::size_t i = 0; i < full[p].grad.size(); ++i)
      scale = std::max(scale, std::abs(double(full[p].grad(i))) / groups);
    for (std::size_t i = 0; i < shard[p].grad.size(); ++i) {
      const double want =
          full[p].grad(kmoe::test::full_index(full[p].shape, shard[p].shape, i, owned, tp_rank)) /
          double(groups);
      error = std::max(error, std::abs(double(shard[p].grad(i)) - want) / scale);
    }
  }
  return error;
}

/// Largest |got - reference rows| relative to the reference's scale.
template <class Got>
double rows_error(const Got& got, const Matrix<float, X>& full, int first) {
  double error = 0, scale = 1e-30;
  for (std::size_t t = 0; t < got.extent(0); ++t)
    for (std::size_t h = 0; h < got.extent(1); ++h) {
      scale = std::max(scale, std::abs(double(full(first + t, h))));
      error = std::max(error, std::abs(double(float(got(t, h))) - full(first + t, h)));
    }
  return error / scale;
}

/// One layout, `tokens_per_rank` tokens per token group.
template <class Storage>
void run_layout(ParallelLayout layout, int tokens_per_rank = 11) {
  using RW = SoftmaxTopKRouter<X, float>;
  using RN = SoftmaxTopKRouter<X, Storage>;
  using EW = SwiGLUExperts<X, float>;
  using EN = SwiGLUExperts<X, Storage>;
  const double u = unit_roundoff<Storage>();
  const double forward_bound = 5 * std::sqrt(double(ffn)) * u;
  const double backward_bound = 10 * std::sqrt(double(ffn)) * u;
  const MpiCommunicator world = MpiCommunicator::world();
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  const int token_groups = layout.ep * layout.dp;
  const int g = groups.ep_rank + layout.ep * groups.dp_rank;
  const int global_tokens = tokens_per_rank * token_groups;
  const std::vector<int> owned = layout.local_experts(experts, groups.ep_rank);
  CAPTURE(layout.tp, layout.ep, layout.dp, world.rank());

  const SoftmaxTopKConfig config{hidden, experts, 2, true, 1.0};
  MoELayer<RW, EW> ref{RW(config), EW({experts, hidden, ffn})};
  fill_normal(ref.parameters(), 0.3, 1234);
  for (const auto& p : ref.parameters()) round_in_place<Storage>(p.value);
  MoELayer<RN, EN, WeightedSumCombiner<X, Storage>, MpiCommunicator> layer{
      RN(config), EN({int(owned.size()), hidden, ffn / layout.tp}), LayerOptions{}, std::nullopt,
      groups};
  {
    ParameterList<X, float> from;
    ParameterList<X, Storage> to;
    ref.router().collect_parameters(from);
    layer.router().collect_parameters(to);
    copy_rounded_shard(from, to, {}, 0);
    from.clear(), to.clear();
    ref.experts().collect_parameters(from);
    layer.experts().collect_parameters(to);
    copy_rounded_shard(from, to, owned, groups.tp_rank);
  }

  Matrix<float, X> x("x", global_tokens, hidden), grad_y("grad_y", global_tokens, hidden);
  fill_normal(x, 1.0, 77);
  fill_normal(grad_y, 1.0 / tokens_per_rank, 78);
  round_in_place<Storage>(x);
  round_in_place<Storage>(grad_y);
  RouteContext<X> context;
  context.training = true;
  Matrix<float, X> ref_y("ref_y", global_tokens, hidden), ref_gx("ref_gx", global_tokens, hidden);
  ref.zero_gradients();
  ref.forward(x, ref_y, context);
  ref.backward(grad_y, ref_gx);

  Matrix<Storage, X> x_local("x_local", tokens_per_rank, hidden),
      g_local("g_local", tokens_per_rank, hidden), y("y", tokens_per_rank, hidden),
      gx("gx", tokens_per_rank, hidden);
  for (int t = 0; t < tokens_per_rank; ++t)
    for (int h = 0; h < hidden; ++h) {
      x_local(t, h) = Storage(x(g * tokens_per_rank + t, h));
      g_local(t, h) = Storage(grad_y(g * tokens_per_rank + t, h));
    }
  layer.zero_gradients();
  const auto stats = layer.forward(x_local, y, context);
  // Across EP ranks the dispatch is deduplicated: each peer's block starts with the header.
  CHECK(stats.dispatch_header_rows.size() == std::size_t(layout.ep > 1 ? layout.ep : 0));
  layer.backward(g_local, gx);
  layer.synchronize_gradients();

  const double output_error = rows_error(y, ref_y, g * tokens_per_rank);
  const double input_gradient_error = rows_error(gx, ref_gx, g * tokens_per_rank);
  CAPTURE(output_error, input_gradient_error, forward_bound, backward_bound);
  CHECK(output_error < forward_bound);
  CHECK(input_gradient_error < backward_bound);
  ParameterList<X, float> full;
  ParameterList<X, Storage> mine;
  ref.router().collect_parameters(full);
  layer.router().collect_parameters(mine);
  CHECK(gradient_error(full, mine, {}, 0, token_groups) < backward_bound);
  full.clear(), mine.clear();
  ref.experts().collect_parameters(full);
  layer.experts().collect_parameters(mine);
  CHECK(gradient_error(full, mine, owned, groups.tp_rank, token_groups) < backward_bound);
}

}  // namespace

TEST_CASE("bf16 and fp16 layers on every layout match the fp32 single-rank layer",
          "[mpi][precision]") {
  const auto layouts = layouts_of_world(MpiCommunicator::world().size());
  REQUIRE(!layouts.empty());
  for (const auto& layout : layouts) {
    run_layout<bfloat16>(layout);
    run_layout<float16>(layout);
  }
}

TEST_CASE("deduplicated bf16 and fp16 dispatch with more tokens than 16 bits count exactly",
          "[mpi][precision]") {
  // The dispatch's header (counts, and links: token rows within a rank's block, up to
  // tokens_per_rank - 1) must travel exactly: bf16 holds integers exactly only to 256 and
  // fp16 to 2048, so a link spelt in the storage type would gather the wrong token rows.
  ParallelLayout layout;
  layout.ep = MpiCommunicator::world().size();
  run_layout<bfloat16>(layout, 300);
  run_layout<float16>(layout, 2100);
}

TEST_CASE("every rank skips the step when one rank's gradients overflow", "[mpi][precision]") {
  const MpiCommunicator world = MpiCommunicator::world();
  constexpr int n = 10;
  Vector<float, X> value("value", n), grad("grad", n);
  ParameterList<X, float> list{make_parameter<X>("w", value, grad)};
  DynamicLossScaler scaler({1024.0, 2.0, 0.5, 3});
  const auto set_gradients = [&](bool overflow) {
    for (int i = 0; i < n; ++i) grad(i) = float(scaler.scale() * (i - 4.5) * (world.rank() + 1));
    if (overflow) grad(3) = std::numeric_limits<float>::infinity();
  };
  const auto expect_unscaled = [&] {
    // The scale is a power of two: dividing by it is exact.
    for (int i = 0; i < n; ++i) CHECK(grad(i) == float((i - 4.5) * (world.rank() + 1)));
  };

  set_gradients(false);
  CHECK(scaler.unscale(list, world));
  expect_unscaled();
  CHECK(scaler.scale() == 1024.0);

  // Rank 1 alone overflows: every rank must skip, rank 0 with finite gradients included.
  set_gradients(world.rank() == 1);
  CHECK_FALSE(scaler.unscale(list, world));
  for (int i = 0; i < n; ++i) CHECK(grad(i) == 0.0f);
  CHECK(scaler.scale() == 512.0);
  CHECK(scaler.skipped_steps() == 1);
  CHECK(scaler.good_steps() == 0);

  // A NaN anywhere backs off as well.
  set_gradients(false);
  if (world.rank() == world.size() - 1) grad(0) = std::numeric_limits<float>::quiet_NaN();
  CHECK_FALSE(scaler.unscale(list, world));
  CHECK(scaler.scale() == 256.0);

  // Three good steps in a row grow the scale, once.
  for (int step = 0; step < 3; ++step) {
    set_gradients(false);
    CHECK(scaler.unscale(list, world));
    expect_unscaled();
  }
  CHECK(scaler.scale() == 512.0);
  CHECK(scaler.good_steps() == 0);
}

TEST_CASE("loss scaler settings are checked", "[mpi][precision]") {
  CHECK_THROWS_AS(DynamicLossScaler({0.0, 2.0, 0.5, 10}), kmoe::invalid_argument);
  CHECK_THROWS_AS(DynamicLossScaler({1.0, 1.0, 0.5, 10}), kmoe::invalid_argument);
  CHECK_THROWS_AS(DynamicLossScaler({1.0, 2.0, 1.5, 10}), kmoe::invalid_argument);
  CHECK_THROWS_AS(DynamicLossScaler({1.0, 2.0, 0.5, 0}), kmoe::invalid_argument);
}
