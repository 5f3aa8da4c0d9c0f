// SPDX-License-Identifier: BSD-3-Clause
// Distributed MoELayer against a single-rank reference computed on every rank (docs/semantics.md
// section 5): output, input gradient and every parameter gradient after
// synchronize_gradients(), for each layout whose world size equals the mpiexec rank count.
//
// Global batch: token group g = ep_rank + EP * dp_rank (the `tokens` communicator's order)
// holds rows [g*T, (g+1)*T) of the global x. Each rank's loss is L_g = sum_t <U_t, y_t> / T
// over its T tokens (U a fixed upstream matrix), and the global loss is the mean of the
// L_g, i.e. the mean over all tokens. The reference is fed the same per-token dL_g/dy
// (U/T), so its grad_x equals each rank's rows exactly and its parameter gradients are the
// sum over g of dL_g/dθ: the distributed result after synchronize_gradients() is that
// divided by the number of token groups.
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/optimizer.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/placement/placement_change.hpp>
#include <kmoe/placement/rebalance.hpp>
#include <kmoe/routers/sigmoid_bias.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "shard_index.hpp"

using namespace kmoe;

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = double;
using SoftmaxRouter = SoftmaxTopKRouter<X, S>;
using SigmoidRouter = SigmoidBiasRouter<X, S>;
using GLU = SwiGLUExperts<X, S>;
using FFN = FFNExperts<X, S>;
template <class R, class E>
using DistLayer = MoELayer<R, E, WeightedSumCombiner<X, S>, MpiCommunicator>;
template <class R, class E>
using RefLayer = MoELayer<R, E>;

constexpr int hidden = 8, ffn = 12, tokens_per_rank = 11;
constexpr double tolerance = 1e-10;

struct Case {
  std::string name;
  int experts = 6, top_k = 2;
  double capacity_factor = 0.0;  // 0: dropless
  bool shared = false;
  bool bias = false;    // FFN experts with b1, b2
  bool starve = false;  // sigmoid router: no token goes to the last EP rank's experts
  Placement placement = Placement::block;
  bool losses = false;     // balance losses on (dropless only: one reference pass)
  bool replicate = false;  // LayerOptions::expert_placement with replicas of the hot experts
  // input: the weights scale the expert inputs (the EP dispatch then sends a row per slot)
  RoutingWeightPlacement routing_weight = RoutingWeightPlacement::output;
};

/// The placement of the replicated cases: one spare slot per EP rank (none on one rank),
/// filled by EPLB from a load where experts 0 and 1 are hot.
ExpertPlacement replicated_placement(int experts, int ep) {
  std::vector<std::int64_t> load(experts, 100);
  load[0] = 400;
  load[1] = 250;
  const int per_rank = (experts + ep - 1) / ep + (ep > 1 ? 1 : 0);
  return balanced_placement(load, ep, per_rank);
}

/// Every rank of `world` in one expert-parallel group.
ParallelGroups<MpiCommunicator> expert_parallel_groups(const MpiCommunicator& world) {
  ParallelLayout layout;
  layout.ep = world.size();
  return ParallelGroups<MpiCommunicator>::create(world, layout);
}

std::vector<ParallelLayout> layouts_of_world(int world) {
  std::vector<ParallelLayout> all;
  auto add = [&](int tp, int ep, int dp, RankOrder order) {
    ParallelLayout l;
    l.tp = tp;
    l.ep = ep;
    l.dp = dp;
    l.order = order;
    if (l.world_size() == world) all.push_back(l);
  };
  add(1, 2, 1, RankOrder::tp_ep_dp);
  add(2, 1, 1, RankOrder::tp_ep_dp);
  add(1, 1, 2, RankOrder::tp_ep_dp);
  add(1, 4, 1, RankOrder::tp_ep_dp);
  add(1, 2, 2, RankOrder::tp_ep_dp);
  add(2, 2, 1, RankOrder::tp_ep_dp);
  add(2, 2, 1, RankOrder::ep_tp_dp);
  add(1, 1, 4, RankOrder::tp_ep_dp);
  return all;
}

std::string describe(const ParallelLayout& l) {
  return "TP" + std::to_string(l.tp) + " EP" + std::to_string(l.ep) + " DP" + std::to_string(l.dp) +
         " order " + std::to_string(int(l.order)) + " placement " +
         std::to_string(int(l.placement));
}

Matrix<S, X> rows_of(const Matrix<S, X>& full, int first, int count) {
  Matrix<S, X> part("part", count, full.extent(1));
  Kokkos::deep_copy(part, Kokkos::subview(full, std::make_pair(first, first + count), Kokkos::ALL));
  return part;
}

double max_abs(const Parameter<X, S>::flat_view& v) {
  double m = 0;
  for (std::size_t i = 0; i < v.size(); ++i) m = std::max(m, std::abs(double(v(i))));
  return m;
}

void copy_shard(const ParameterList<X, S>& full, const ParameterList<X, S>& shard,
                const std::vector<int>& owned, int tp_rank) {
  REQUIRE(full.size() == shard.size());
  for (std::size_t p = 0; p < full.size(); ++p)
    for (std::size_t i = 0; i < shard[p].value.size(); ++i)
      shard[p].value(i) =
          full[p].value(kmoe::test::full_index(full[p].shape, shard[p].shape, i, owned, tp_rank));
}

/// The reference's router and, for this rank's experts `owned` (whole F), its expert
/// weights, into `layer`.
template <class Ref, class Layer>
void copy_router_and_experts(const Ref& ref, const Layer& layer, const std::vector<int>& owned) {
  ParameterList<X, S> from, to;
  ref.router().collect_parameters(from);
  layer.router().collect_parameters(to);
  copy_shard(from, to, {}, 0);
  from.clear(), to.clear();
  ref.experts().collect_parameters(from);
  layer.experts().collect_parameters(to);
  copy_shard(from, to, owned, 0);
}

/// Largest |distributed - reference / groups| over a list, relative to the reference scale.
double gradient_error(const ParameterList<X, S>& full, const ParameterList<X, S>& shard,
                      const std::vector<int>& owned, int tp_rank, int groups) {
  double error = 0;
  for (std::size_t p = 0; p < full.size(); ++p) {
    const double scale = std::max(1e-30, max_abs(full[p].grad) / groups);
    for (std::size_t i = 0; i < shard[p].grad.size(); ++i) {
      const double want =
          full[p].grad(kmoe::test::full_index(full[p].shape, shard[p].shape, i, owned, tp_rank)) /
          groups;
      error = std::max(error, std::abs(shard[p].grad(i) - want) / scale);
    }
  }
  return error;
}

double matrix_error(const Matrix<S, X>& got, const Matrix<S, X>& full, int first) {
  double error = 0, scale = 1e-30;
  for (std::size_t t = 0; t < got.extent(0); ++t)
    for (std::size_t h = 0; h < got.extent(1); ++h) {
      scale = std::max(scale, std::abs(full(first + t, h)));
      error = std::max(error, std::abs(got(t, h) - full(first + t, h)));
    }
  return error / scale;
}

SoftmaxRouter make_router(const Case& c, SoftmaxRouter*) {
  return SoftmaxRouter({hidden, c.experts, c.top_k, true, 1.0});
}
SigmoidRouter make_router(const Case& c, SigmoidRouter*) {
  return SigmoidRouter(SigmoidBiasConfig{hidden, c.experts, c.top_k, true, 2.5, {4, 2, 2}});
}
template <class E>
E make_experts(int experts, int f, const Case& c, const std::string& name = "experts") {
  if constexpr (std::is_same_v<E, FFN>)
    return E({experts, hidden, f, c.bias}, name);
  else
    return E({experts, hidden, f}, name);
}

/// Sets the sigmoid router's selection bias: a spread of small values, or a large negative
/// one on the experts that must receive nothing.
template <class R>
void set_selection_bias(R& router, const Case& c, const ParallelLayout& layout) {
  if constexpr (std::is_same_v<R, SigmoidRouter>) {
    std::vector<int> starved;
    // With one EP rank it owns every expert, so there is no other rank to starve.
    if (c.starve && layout.ep > 1) starved = layout.local_experts(c.experts, layout.ep - 1);
    auto bias = Kokkos::create_mirror_view(router.bias());
    for (int e = 0; e < c.experts; ++e)
      bias(e) = std::count(starved.begin(), starved.end(), e) ? -1e3 : 0.01 * (e % 3);
    Kokkos::deep_copy(router.bias(), bias);
  }
}

template <class R, class E>
void run_case(const Case& c, ParallelLayout layout) {
  const MpiCommunicator world = MpiCommunicator::world();
  layout.placement = c.placement;
  const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
  const int token_groups = layout.ep * layout.dp;
  const int g = groups.ep_rank + layout.ep * groups.dp_rank;
  const int global_tokens = tokens_per_rank * token_groups;
  LayerOptions options;
  options.capacity.factor = c.capacity_factor;
  options.routing_weight = c.routing_weight;
  std::vector<int> owned = layout.local_experts(c.experts, groups.ep_rank);
  if (c.replicate) {
    options.expert_placement = replicated_placement(c.experts, layout.ep);
    const auto& p = options.expert_placement;
    owned.assign(p.logical.begin() + groups.ep_rank * p.slots_per_rank,
                 p.logical.begin() + (groups.ep_rank + 1) * p.slots_per_rank);
  }
  CAPTURE(c.name, describe(layout), world.rank(), owned);
  // Each token group's balance terms use the global f_i and its own P_i (one sequence per
  // group), and gradients are averaged over the groups: their mean is the reference's
  // terms over the global batch, so the reference carries the coefficients times G.
  LayerOptions ref_options = options;
  ref_options.expert_placement = {};  // the reference holds every expert once
  if (c.losses) {
    options.losses = {0.1, 0.05, tokens_per_rank, 0.01};
    ref_options.losses = {0.1 * token_groups, 0.05 * token_groups, tokens_per_rank,
                          0.01 * token_groups};
  }

  // Reference: every expert, the whole F, all tokens; deterministic weights.
  std::optional<E> ref_shared, shared;
  if (c.shared) {
    ref_shared = make_experts<E>(1, ffn, c, "shared_experts");
    shared = make_experts<E>(1, ffn, c, "shared_experts");
  }
  RefLayer<R, E> ref(make_router(c, (R*)nullptr), make_experts<E>(c.experts, ffn, c), ref_options,
                     ref_shared);
  fill_normal(ref.parameters(), 0.3, 1234);
  set_selection_bias(ref.router(), c, layout);

  DistLayer<R, E> layer(make_router(c, (R*)nullptr),
                        make_experts<E>(int(owned.size()), ffn / layout.tp, c), options, shared,
                        groups);
  set_selection_bias(layer.router(), c, layout);
  {
    ParameterList<X, S> from, to;
    ref.router().collect_parameters(from);
    layer.router().collect_parameters(to);
    copy_shard(from, to, {}, 0);
    from.clear(), to.clear();
    ref.experts().collect_parameters(from);
    layer.experts().collect_parameters(to);
    copy_shard(from, to, owned, groups.tp_rank);
    if (c.shared) {
      from.clear(), to.clear();
      ref.shared_experts()->collect_parameters(from);
      layer.shared_experts()->collect_parameters(to);
      copy_shard(from, to, {}, 0);
    }
  }

  Matrix<S, X> x("x", global_tokens, hidden), upstream("upstream", global_tokens, hidden);
  fill_normal(x, 1.0, 77);
  fill_normal(upstream, 1.0, 78);
  Matrix<S, X> grad_y("grad_y", global_tokens, hidden);
  Kokkos::deep_copy(grad_y, upstream);
  Kokkos::parallel_for(
      Kokkos::RangePolicy<X>(0, grad_y.size()),
      KOKKOS_LAMBDA(std::size_t i) { grad_y.data()[i] /= tokens_per_rank; });
  RouteContext<X> context;
  context.training = true;

  // Reference: one pass over the global batch when dropless; with a capacity, one pass per
  // token group so that each group's capacity applies to its own tokens
  // (docs/semantics.md section 5).
  Matrix<S, X> ref_y("ref_y", global_tokens, hidden), ref_gx("ref_gx", global_tokens, hidden);
  ref.zero_gradients();
  const int passes = c.capacity_factor > 0 ? token_groups : 1;
  const int pass_tokens = global_tokens / passes;
  std::int64_t ref_dropped = 0;
  ForwardStats ref_stats;
  for (int p = 0; p < passes; ++p) {
    const auto xp = rows_of(x, p * pass_tokens, pass_tokens);
    const auto gp = rows_of(grad_y, p * pass_tokens, pass_tokens);
    Matrix<S, X> yp("yp", pass_tokens, hidden), gxp("gxp", pass_tokens, hidden);
    ref_stats = ref.forward(xp, yp, context);
    ref_dropped += ref_stats.dropped;
    ref.backward(gp, gxp);
    const auto rows = std::make_pair(p * pass_tokens, (p + 1) * pass_tokens);
    Kokkos::deep_copy(Kokkos::subview(ref_y, rows, Kokkos::ALL), yp);
    Kokkos::deep_copy(Kokkos::subview(ref_gx, rows, Kokkos::ALL), gxp);
  }

  // Distributed.
  const auto x_local = rows_of(x, g * tokens_per_rank, tokens_per_rank);
  const auto grad_local = rows_of(grad_y, g * tokens_per_rank, tokens_per_rank);
  Matrix<S, X> y("y", tokens_per_rank, hidden), gx("gx", tokens_per_rank, hidden);
  layer.zero_gradients();
  const auto stats = layer.forward(x_local, y, context);
  layer.backward(grad_local, gx);
  layer.synchronize_gradients();

  CHECK(matrix_error(y, ref_y, g * tokens_per_rank) < tolerance);
  if (c.routing_weight == RoutingWeightPlacement::input && layout.ep > 1) {
    // One scaled row per kept assignment, none shared by a token's slots.
    std::int64_t sent = 0;
    for (auto rows : stats.dispatch_rows) sent += rows;
    CHECK(sent == stats.assignments - stats.dropped);
  }
  CHECK(matrix_error(gx, ref_gx, g * tokens_per_rank) < tolerance);
  {
    ParameterList<X, S> full, mine;
    ref.router().collect_parameters(full);
    layer.router().collect_parameters(mine);
    CHECK(gradient_error(full, mine, {}, 0, token_groups) < tolerance);
    full.clear(), mine.clear();
    ref.experts().collect_parameters(full);
    layer.experts().collect_parameters(mine);
    CHECK(gradient_error(full, mine, owned, groups.tp_rank, token_groups) < tolerance);
    if (c.shared) {
      full.clear(), mine.clear();
      ref.shared_experts()->collect_parameters(full);
      layer.shared_experts()->collect_parameters(mine);
      CHECK(gradient_error(full, mine, {}, 0, token_groups) < tolerance);
    }
  }

  // Drops summed over token groups (one TP rank each) equal the reference's.
  Kokkos::View<std::int64_t*, Kokkos::HostSpace> dropped("dropped", 1);
  dropped(0) = groups.tp_rank == 0 ? stats.dropped : 0;
  world.all_reduce_sum(dropped);
  CHECK(dropped(0) == ref_dropped);
  if (c.capacity_factor > 0) CHECK(ref_dropped > 0);
  if (c.losses) {
    // The token groups' terms sum to the reference's (its coefficients are G times theirs),
    // and every rank holds the global assignment counts for the bias update.
    Kokkos::View<double*, Kokkos::HostSpace> terms("terms", 3);
    if (groups.tp_rank == 0) {
      terms(0) = stats.losses.switch_aux;
      terms(1) = stats.losses.sequence_aux;
      terms(2) = stats.losses.z_loss;
    }
    world.all_reduce_sum(terms);
    CHECK(terms(0) == Catch::Approx(ref_stats.losses.switch_aux).epsilon(1e-12));
    CHECK(terms(1) == Catch::Approx(ref_stats.losses.sequence_aux).epsilon(1e-12));
    CHECK(terms(2) == Catch::Approx(ref_stats.losses.z_loss).epsilon(1e-12));
    CHECK(ref_stats.losses.switch_aux > 0);
    CHECK(layer.pending_bias_counts() == ref.pending_bias_counts());
  }
  // Replicas split tokens, but the counts stay per logical expert.
  if (c.replicate) CHECK(stats.tokens_per_expert == ref_stats.tokens_per_expert);
  if (c.starve && layout.ep > 1) {
    const auto last = layout.local_experts(c.experts, layout.ep - 1);
    for (int e : last) CHECK(stats.tokens_per_expert[e] == 0);
  }
}

template <class R, class E>
void run_all_layouts(const Case& c) {
  for (const auto& layout : layouts_of_world(MpiCommunicator::world().size()))
    run_case<R, E>(c, layout);
}

}  // namespace

TEST_CASE("softmax top-k, SwiGLU, shared expert, dropless, block placement", "[mpi]") {
  Case c;
  c.name = "softmax dropless block";
  c.experts = 5;  // E % EP != 0 for EP = 2 and 4
  c.shared = true;
  run_all_layouts<SoftmaxRouter, GLU>(c);
}

TEST_CASE("replicated experts equal the unreplicated single-rank layer", "[mpi][replicas]") {
  // Replicas split their experts' tokens; outputs, input gradients and the summed replica
  // gradients must equal the reference, and every replica of an expert its gradient.
  Case c;
  c.name = "softmax dropless, replicas of the hot experts";
  c.experts = 5;
  c.shared = true;
  c.replicate = true;
  run_all_layouts<SoftmaxRouter, GLU>(c);
  Case d;
  d.name = "sigmoid, FFN with biases, replicas";
  d.experts = 8;
  d.bias = true;
  d.replicate = true;
  run_all_layouts<SigmoidRouter, FFN>(d);
}

TEST_CASE("a replicated placement the layer cannot run raises on every rank", "[mpi][replicas]") {
  const MpiCommunicator world = MpiCommunicator::world();
  const auto groups = expert_parallel_groups(world);
  LayerOptions options;
  options.expert_placement = replicated_placement(5, world.size());
  const auto build = [&](const LayerOptions& o, int router_experts) {
    DistLayer<SoftmaxRouter, GLU> layer(SoftmaxRouter({hidden, router_experts, 2, true, 1.0}),
                                        GLU({o.expert_placement.slots_per_rank, hidden, ffn}), o,
                                        std::nullopt, groups);
  };
  CHECK_NOTHROW(build(options, 5));
  LayerOptions capped = options;
  capped.capacity.factor = 1.0;
  CHECK_THROWS_WITH(build(capped, 5),
                    Catch::Matchers::ContainsSubstring("options.capacity.factor"));
  LayerOptions doubled = options;
  doubled.expert_placement.logical[1] = doubled.expert_placement.logical[0];
  CHECK_THROWS_WITH(build(doubled, 5),
                    Catch::Matchers::ContainsSubstring("two replicas on rank 0") ||
                        Catch::Matchers::ContainsSubstring("drops it"));
  CHECK_THROWS_WITH(build(options, 6),
                    Catch::Matchers::ContainsSubstring("options.expert_placement.logical_experts"));
}

TEST_CASE("apply_placement moves weights and optimizer state to the new slots", "[mpi][replicas]") {
  // Yesterday's placement (experts 0 and 1 hot) moved to today's (3 and 4 hot): every slot
  // must then hold its new expert's weights and AdamW moments, and the layer must compute
  // what a layer built with today's placement computes.
  const MpiCommunicator world = MpiCommunicator::world();
  const auto groups = expert_parallel_groups(world);
  const int ep = world.size(), experts = 5;
  LayerOptions before, after;
  before.expert_placement = replicated_placement(experts, ep);
  std::vector<std::int64_t> today(experts, 100);
  today[3] = 500;
  today[4] = 300;
  after.expert_placement = balanced_placement(today, ep, before.expert_placement.slots_per_rank);
  const auto slots_of = [&](const ExpertPlacement& p) {
    return std::vector<int>(p.logical.begin() + groups.ep_rank * p.slots_per_rank,
                            p.logical.begin() + (groups.ep_rank + 1) * p.slots_per_rank);
  };
  const auto owned_before = slots_of(before.expert_placement);
  const auto owned_after = slots_of(after.expert_placement);
  CAPTURE(world.rank(), owned_before, owned_after);
  REQUIRE(placement_moves(before.expert_placement, after.expert_placement).size() > 0);

  RefLayer<SoftmaxRouter, GLU> ref(SoftmaxRouter({hidden, experts, 2, true, 1.0}),
                                   GLU({experts, hidden, ffn}));
  fill_normal(ref.parameters(), 0.3, 99);
  const int slots = before.expert_placement.slots_per_rank;
  auto make = [&](const LayerOptions& o, const std::vector<int>& owned) {
    DistLayer<SoftmaxRouter, GLU> layer(SoftmaxRouter({hidden, experts, 2, true, 1.0}),
                                        GLU({slots, hidden, ffn}), o, std::nullopt, groups);
    copy_router_and_experts(ref, layer, owned);
    return layer;
  };
  auto moved = make(before, owned_before);
  auto built = make(after, owned_after);
  // Moments with a value per (logical expert, element): they must follow their expert.
  ParameterList<X, S> experts_list;
  moved.experts().collect_parameters(experts_list);
  AdamW<X, S> optimizer(experts_list, {});
  const auto state = optimizer.state();
  for (const auto& st : state) {
    const std::size_t width = st.value.size() / slots;
    for (std::size_t i = 0; i < st.value.size(); ++i)
      st.value(i) = 1000.0 * owned_before[i / width] + double(i % width) +
                    (st.name.find("exp_avg_sq") != std::string::npos ? 0.5 : 0.0);
  }
  const auto change = moved.apply_placement(after.expert_placement, state);
  CHECK(change.moved_slots ==
        int(placement_moves(before.expert_placement, after.expert_placement).size()));
  for (const auto& st : state) {
    const std::size_t width = st.value.size() / slots;
    for (std::size_t i = 0; i < st.value.size(); ++i)
      CHECK(st.value(i) == 1000.0 * owned_after[i / width] + double(i % width) +
                               (st.name.find("exp_avg_sq") != std::string::npos ? 0.5 : 0.0));
  }
  ParameterList<X, S> got, want;
  moved.experts().collect_parameters(got);
  built.experts().collect_parameters(want);
  for (std::size_t p = 0; p < got.size(); ++p)
    for (std::size_t i = 0; i < got[p].value.size(); ++i)
      CHECK(got[p].value(i) == want[p].value(i));

  Matrix<S, X> x("x", tokens_per_rank, hidden), y_moved("y_moved", tokens_per_rank, hidden),
      y_built("y_built", tokens_per_rank, hidden);
  fill_normal(x, 1.0, 5 + world.rank());
  moved.forward(x, y_moved);
  built.forward(x, y_built);
  for (int t = 0; t < tokens_per_rank; ++t)
    for (int h = 0; h < hidden; ++h) CHECK(y_moved(t, h) == y_built(t, h));

  // A placement of another shape, or one that differs across ranks, raises everywhere.
  ExpertPlacement wider = replicated_placement(experts, ep);
  wider.slots_per_rank += 1;
  CHECK_THROWS_WITH(moved.apply_placement(wider), Catch::Matchers::ContainsSubstring("placement"));
  ExpertPlacement odd = after.expert_placement;
  if (world.rank() == 1) odd = before.expert_placement;
  CHECK_THROWS_WITH(moved.apply_placement(odd),
                    Catch::Matchers::ContainsSubstring("every rank must apply the same placement"));
}

/// SwiGLU experts that throw (a broken device, a bad allocation) or stall when told to:
/// the failures failover's health checks must catch.
struct FlakyGLU : GLU {
  using GLU::GLU;
  bool fail = false;
  int stall_ms = 0;
  void forward(const ConstMatrix<S, X>& x, const Segments<X>& segments, const Matrix<S, X>& y,
               ExpertMode mode) {
    if (fail) throw std::runtime_error("FlakyGLU: device lost");
    if (stall_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(stall_ms));
    GLU::forward(x, segments, y, mode);
  }
};

TEST_CASE("failover: a slot marked on one rank fails everywhere; its replicas take its tokens",
          "[mpi][failover]") {
  const MpiCommunicator world = MpiCommunicator::world();
  const auto groups = expert_parallel_groups(world);
  const int ep = world.size(), experts = 5, tokens = tokens_per_rank;
  LayerOptions options;
  options.expert_placement = replicated_placement(experts, ep);
  options.failover.enabled = true;
  const ExpertPlacement& p = options.expert_placement;
  const int slots = p.slots_per_rank;
  const std::vector<int> owned(p.logical.begin() + groups.ep_rank * slots,
                               p.logical.begin() + (groups.ep_rank + 1) * slots);
  // The first slot whose expert has another replica.
  int victim = -1;
  for (const auto& held : p.replicas())
    if (held.size() > 1 && victim < 0) victim = held.front();
  REQUIRE(victim >= 0);

  RefLayer<SoftmaxRouter, GLU> ref(SoftmaxRouter({hidden, experts, 2, true, 1.0}),
                                   GLU({experts, hidden, ffn}));
  fill_normal(ref.parameters(), 0.3, 404);
  DistLayer<SoftmaxRouter, GLU> layer(SoftmaxRouter({hidden, experts, 2, true, 1.0}),
                                      GLU({slots, hidden, ffn}), options, std::nullopt, groups);
  copy_router_and_experts(ref, layer, owned);
  const int global = tokens * ep;
  Matrix<S, X> x("x", global, hidden), ref_y("ref_y", global, hidden);
  fill_normal(x, 1.0, 405);
  ref.forward(x, ref_y);
  const auto x_local = rows_of(x, groups.ep_rank * tokens, tokens);
  Matrix<S, X> y("y", tokens, hidden);

  if (world.rank() == 0) layer.mark_failed_slot(victim);  // one rank's word is enough
  RouteContext<X> training;
  training.training = true;  // replicas cover the failure, so training may go on
  const auto stats = layer.forward(x_local, y, training);
  CHECK(stats.failed_slots == std::vector<int>{victim});
  CHECK(stats.rerouted == 0);
  CHECK(matrix_error(y, ref_y, groups.ep_rank * tokens) < tolerance);
  // The failed slot's expert still served its tokens, through its other replicas.
  CHECK(stats.tokens_per_expert[std::size_t(p.logical[std::size_t(victim)])] > 0);
}

TEST_CASE("failover: experts that throw on one rank fail its slots; serving goes on",
          "[mpi][failover]") {
  const MpiCommunicator world = MpiCommunicator::world();
  const auto groups = expert_parallel_groups(world);
  const int ep = world.size(), experts = 2 * ep, tokens = tokens_per_rank;
  LayerOptions options;
  options.failover.enabled = true;
  const auto owned = groups.layout.local_experts(experts, groups.ep_rank);
  const auto lost = groups.layout.local_experts(experts, 1);

  // The reference: one rank holding every expert, with rank 1's experts marked failed.
  MoELayer<SoftmaxRouter, GLU> ref(SoftmaxRouter({hidden, experts, 2, true, 1.0}),
                                   GLU({experts, hidden, ffn}), options);
  fill_normal(ref.parameters(), 0.3, 505);
  for (int e : lost) ref.mark_failed_expert(e);
  MoELayer<SoftmaxRouter, FlakyGLU, WeightedSumCombiner<X, S>, MpiCommunicator> layer(
      SoftmaxRouter({hidden, experts, 2, true, 1.0}), FlakyGLU({int(owned.size()), hidden, ffn}),
      options, std::nullopt, groups);
  copy_router_and_experts(ref, layer, owned);
  const int global = tokens * ep;
  Matrix<S, X> x("x", global, hidden), ref_y("ref_y", global, hidden);
  fill_normal(x, 1.0, 506);
  ref.forward(x, ref_y);
  const auto x_local = rows_of(x, groups.ep_rank * tokens, tokens);
  Matrix<S, X> y("y", tokens, hidden);

  layer.experts().fail = groups.ep_rank == 1;
  const auto stats = layer.forward(x_local, y);  // inference: rerouting allowed
  CHECK(stats.failed_slots == lost);
  CHECK(matrix_error(y, ref_y, groups.ep_rank * tokens) < tolerance);
  Kokkos::View<std::int64_t*, Kokkos::HostSpace> rerouted("rerouted", 1);
  rerouted(0) = stats.rerouted;
  world.all_reduce_sum(rerouted);
  CHECK(rerouted(0) > 0);
  // Training cannot reroute: every rank raises the same error, none hangs.
  RouteContext<X> training;
  training.training = true;
  CHECK_THROWS_WITH(layer.forward(x_local, y, training),
                    Catch::Matchers::ContainsSubstring("has no healthy replica"));
}

TEST_CASE("failover: a rank whose experts stall for a window of forwards is failed",
          "[mpi][failover]") {
  const MpiCommunicator world = MpiCommunicator::world();
  const auto groups = expert_parallel_groups(world);
  const int ep = world.size(), experts = 2 * ep, tokens = tokens_per_rank;
  LayerOptions options;
  options.failover.enabled = true;
  options.failover.latency_factor = 5;
  options.failover.latency_window = 2;
  const auto owned = groups.layout.local_experts(experts, groups.ep_rank);
  MoELayer<SoftmaxRouter, FlakyGLU, WeightedSumCombiner<X, S>, MpiCommunicator> layer(
      SoftmaxRouter({hidden, experts, 2, true, 1.0}), FlakyGLU({int(owned.size()), hidden, ffn}),
      options, std::nullopt, groups);
  fill_normal(layer.parameters(), 0.3, 606);
  Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden);
  fill_normal(x, 1.0, 607 + world.rank());
  layer.experts().stall_ms = groups.ep_rank == 1 ? 1000 : 0;
  const auto first = layer.forward(x, y);
  CHECK(first.failed_slots.empty());  // one slow forward is not yet a window
  const auto second = layer.forward(x, y);
  // Rank 1's slots fail on every rank (other ranks may be slow too on a loaded machine:
  // only rank 1's are required).
  for (int e : groups.layout.local_experts(experts, 1))
    CHECK(std::count(second.failed_slots.begin(), second.failed_slots.end(), e) == 1);
  const auto yh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), y);
  for (std::size_t i = 0; i < yh.size(); ++i) CHECK(std::isfinite(yh.data()[i]));
}

TEST_CASE("softmax top-k, SwiGLU, round-robin placement", "[mpi]") {
  Case c;
  c.name = "softmax dropless round robin";
  c.experts = 6;
  c.placement = Placement::round_robin;
  run_all_layouts<SoftmaxRouter, GLU>(c);
}

TEST_CASE("softmax top-k with a capacity drops per token group", "[mpi]") {
  Case c;
  c.name = "softmax capacity";
  c.experts = 6;
  c.capacity_factor = 0.75;
  run_all_layouts<SoftmaxRouter, GLU>(c);
}

TEST_CASE("DeepSeek-V3 sigmoid router with groups, FFN experts with biases", "[mpi]") {
  Case c;
  c.name = "sigmoid ffn bias";
  c.experts = 8;
  c.bias = true;
  c.shared = true;
  SECTION("dropless") { run_all_layouts<SigmoidRouter, FFN>(c); }
  SECTION("capacity, round robin") {
    c.capacity_factor = 1.0;
    c.placement = Placement::round_robin;
    run_all_layouts<SigmoidRouter, FFN>(c);
  }
}

TEST_CASE("balance losses, their gradients and the bias counts equal the single-rank layer",
          "[mpi]") {
  Case c;
  c.losses = true;
  SECTION("softmax router") {
    c.name = "softmax, losses";
    run_all_layouts<SoftmaxRouter, GLU>(c);
  }
  SECTION("DeepSeek-V3 router") {
    c.name = "sigmoid, losses";
    c.experts = 8;
    c.shared = true;
    run_all_layouts<SigmoidRouter, GLU>(c);
  }
}

TEST_CASE("uneven load: no token reaches the last EP rank's experts", "[mpi]") {
  Case c;
  c.name = "starved rank";
  c.experts = 8;
  c.starve = true;
  run_all_layouts<SigmoidRouter, GLU>(c);
}

TEST_CASE("a configuration that differs across ranks raises on every rank", "[mpi]") {
  const auto world = MpiCommunicator::world();
  const auto groups = expert_parallel_groups(world);
  const int experts = 2 * world.size();
  const int top_k = world.rank() == 1 ? 2 : 1;
  using Layer = DistLayer<SoftmaxRouter, GLU>;
  CHECK_THROWS_AS(Layer(SoftmaxRouter({hidden, experts, top_k}), GLU({2, hidden, ffn}), {},
                        std::nullopt, groups),
                  kmoe::invalid_argument);
}

TEST_CASE("a layout invalid on one rank raises on every rank before any split", "[mpi]") {
  const auto world = MpiCommunicator::world();
  ParallelLayout layout;
  layout.ep = world.rank() == 1 ? world.size() + 1 : world.size();
  if (world.rank() == 1)
    CHECK_THROWS_WITH(ParallelGroups<MpiCommunicator>::create(world, layout),
                      Catch::Matchers::ContainsSubstring("layout.tp*ep*dp = " +
                                                         std::to_string(world.size() + 1)));
  else
    CHECK_THROWS_WITH(ParallelGroups<MpiCommunicator>::create(world, layout),
                      Catch::Matchers::ContainsSubstring("another rank failed"));
}

TEST_CASE("a bad constructor argument on one rank raises on every rank", "[mpi]") {
  const auto world = MpiCommunicator::world();
  const auto groups = expert_parallel_groups(world);
  const int experts = 2 * world.size();
  const int expert_hidden = world.rank() == 1 ? hidden + 1 : hidden;
  using Layer = DistLayer<SoftmaxRouter, GLU>;
  const auto build = [&] {
    Layer(SoftmaxRouter({hidden, experts, 2}), GLU({2, expert_hidden, ffn}), {}, std::nullopt,
          groups);
  };
  if (world.rank() == 1)
    CHECK_THROWS_WITH(build(), Catch::Matchers::ContainsSubstring("experts.hidden_size()"));
  else
    CHECK_THROWS_WITH(build(), Catch::Matchers::ContainsSubstring("another rank failed"));
}

TEST_CASE("a loss setting that differs across ranks is caught by the fingerprint", "[mpi]") {
  const auto world = MpiCommunicator::world();
  const auto groups = expert_parallel_groups(world);
  LayerOptions options;
  options.losses.z_loss = world.rank() == 1 ? 1e-3 : 0.0;
  using Layer = DistLayer<SoftmaxRouter, GLU>;
  CHECK_THROWS_WITH(Layer(SoftmaxRouter({hidden, 2 * world.size(), 2}), GLU({2, hidden, ffn}),
                          options, std::nullopt, groups),
                    Catch::Matchers::ContainsSubstring("losses.z_loss"));
}

TEST_CASE("a rank that fails in forward makes every rank throw, without a hang", "[mpi]") {
  const auto world = MpiCommunicator::world();
  const auto groups = expert_parallel_groups(world);
  const int experts = 2 * world.size();
  DistLayer<SoftmaxRouter, GLU> layer(SoftmaxRouter({hidden, experts, 2}), GLU({2, hidden, ffn}),
                                      {}, std::nullopt, groups);
  fill_normal(layer.parameters(), 0.3, 5);
  const int width = world.rank() == 1 ? hidden + 1 : hidden;
  Matrix<S, X> bad("x", tokens_per_rank, width), y("y", tokens_per_rank, width);
  if (world.rank() == 1)
    CHECK_THROWS_AS(layer.forward(bad, y), kmoe::invalid_argument);
  else
    CHECK_THROWS_AS(layer.forward(bad, y), kmoe::runtime_error);
  // The group is still usable: a correct step afterwards completes on every rank.
  Matrix<S, X> x("x", tokens_per_rank, hidden), out("out", tokens_per_rank, hidden);
  fill_normal(x, 1.0, 6);
  CHECK_NOTHROW(layer.forward(x, out));
}

TEST_CASE("overlapping the shared experts with the dispatch leaves the results unchanged",
          "[mpi]") {
  const auto world = MpiCommunicator::world();
  const auto groups = expert_parallel_groups(world);
  const int experts = 2 * world.size();
  Matrix<S, X> x("x", tokens_per_rank, hidden);
  fill_normal(x, 1.0, 40 + world.rank());
  std::vector<Matrix<S, X>> outputs;
  for (bool overlap : {true, false}) {
    LayerOptions options;
    options.overlap_shared_experts = overlap;
    DistLayer<SoftmaxRouter, GLU> layer(SoftmaxRouter({hidden, experts, 2, true}),
                                        GLU({2, hidden, ffn}), options,
                                        GLU({1, hidden, 2 * ffn}, "shared_experts"), groups);
    fill_normal(layer.parameters(), 0.3, 41);
    outputs.emplace_back("y", tokens_per_rank, hidden);
    layer.forward(x, outputs.back());
  }
  for (std::size_t i = 0; i < outputs[0].size(); ++i)
    CHECK(outputs[0].data()[i] == outputs[1].data()[i]);
}

TEST_CASE("weights on the expert inputs (Llama 4) across ranks equal the single-rank layer",
          "[mpi]") {
  Case c;
  c.routing_weight = RoutingWeightPlacement::input;
  c.experts = 8;
  c.shared = true;
  SECTION("sigmoid, SwiGLU, dropless") {
    c.name = "input-weighted sigmoid dropless";
    run_all_layouts<SigmoidRouter, GLU>(c);
  }
  SECTION("sigmoid, SwiGLU, replicas of the hot experts") {
    c.name = "input-weighted sigmoid replicas";
    c.replicate = true;
    run_all_layouts<SigmoidRouter, GLU>(c);
  }
  SECTION("softmax, FFN with biases, capacity, round robin") {
    c.name = "input-weighted softmax capacity";
    c.bias = true;
    c.capacity_factor = 0.75;
    c.placement = Placement::round_robin;
    run_all_layouts<SoftmaxRouter, FFN>(c);
  }
}
