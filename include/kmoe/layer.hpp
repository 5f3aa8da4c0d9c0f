// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file layer.hpp
/// \brief kmoe::MoELayer: a Router, an Expert policy, a Combiner and a Communicator composed
/// at compile time into one Mixture-of-Experts layer with forward and backward.

#include <kmoe/agreement.hpp>
#include <kmoe/combiner.hpp>
#include <kmoe/communicator.hpp>
#include <kmoe/detail/non_finite.hpp>
#include <kmoe/detail/phase_clock.hpp>
#include <kmoe/detail/profiling.hpp>
#include <kmoe/detail/row_major.hpp>
#include <kmoe/exchange/expert_parallel_exchange.hpp>
#include <kmoe/exchange/node_topology.hpp>
#include <kmoe/exchange/replica_routing.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/fingerprint.hpp>
#include <kmoe/forward_stats.hpp>
#include <kmoe/gemm/widened.hpp>
#include <kmoe/gradient_buckets.hpp>
#include <kmoe/layer_options.hpp>
#include <kmoe/losses.hpp>
#include <kmoe/memory_accounting.hpp>
#include <kmoe/optimizer.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/placement/failover.hpp>
#include <kmoe/placement/placement_change.hpp>
#include <kmoe/router.hpp>
#include <kmoe/routers/node_limit.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <memory>
#include <optional>
#include <typeinfo>
#include <vector>

namespace kmoe {

/// The layer's kernels are free functions, not private members: nvcc rejects an extended
/// __host__ __device__ lambda (KOKKOS_LAMBDA) whose enclosing function is private.
namespace detail {
template <class X, class M>
void add_into(const M& from, const M& to) {
  Kokkos::parallel_for(
      "kmoe::MoELayer::add", Kokkos::RangePolicy<X>(0, to.size()),
      KOKKOS_LAMBDA(std::size_t i) { to.data()[i] += from.data()[i]; });
}

/// Lets every started request of a pipeline advance (Request::test() where the
/// communicator has it): MPI moves a started exchange on only inside MPI calls.
template <class Request>
void test_requests(std::vector<Request>& dispatched, std::vector<Request>& returned) {
  if constexpr (is_detected_v<request_test_of, Request>) {
    for (auto& request : dispatched) request.test();
    for (auto& request : returned) request.test();
  }
}

/// Sums the matrix `m` over `comm` (the TP group's partial expert outputs and input
/// gradients). A 16-bit matrix is summed in its accumulation type: MPI and NCCL add no
/// bf16 sums kmoe can order, and each rank's sum is then rounded once.
template <class X, class Communicator, class M>
void all_reduce_sum_matrix(const Communicator& comm, const M& m) {
  using S = typename M::non_const_value_type;
  using Flat = Kokkos::View<accumulation_t<S>*, typename X::memory_space,
                            Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  if constexpr (is_packed_float_v<S>) {
    Matrix<accumulation_t<S>, X> wide(Kokkos::view_alloc(Kokkos::WithoutInitializing,
                                                         "kmoe::MoELayer::widened_sum"),
                                      m.extent(0), m.extent(1));
    gemm::detail::convert_matrix<X>(m, wide);
    comm.all_reduce_sum(Flat(wide.data(), wide.size()));
    gemm::detail::convert_matrix<X>(wide, m);
  } else {
    comm.all_reduce_sum(Flat(m.data(), m.size()));
  }
}
}  // namespace detail

/// \brief Mixture-of-Experts layer y = sum_{kept e} w_{t,e} Expert_e(x_t) (+ shared(x_t)).
///
/// \tparam Router       chooses experts and weights (kmoe/router.hpp)
/// \tparam Expert       the routed experts held by this rank (kmoe/expert.hpp); the optional
///                      shared experts are another object of the same type with one expert
/// \tparam Combiner     returns expert outputs to their tokens (kmoe/combiner.hpp)
/// \tparam Communicator moves tokens between ranks (kmoe/communicator.hpp)
///
/// The execution space and the precision (kmoe/precision.hpp: a bare Scalar or a Precision
/// bundle; a policy without precision_type holds Precision<scalar_type>) come from the
/// Router; every policy must agree. A Precision whose communication type is 16 bits over
/// float storage turns LayerOptions::exchange_compression on.
template <class Router, class Expert,
          class Combiner =
              WeightedSumCombiner<typename Router::execution_space,
                                  detail::detected_or_t<Precision<typename Router::scalar_type>,
                                                        detail::precision_type_of, Router>>,
          class Communicator = SingleProcessCommunicator>
class MoELayer {
  static_assert(check_valid_router<Router>());
  static_assert(check_valid_expert<Expert>());
  static_assert(check_valid_combiner<Combiner>());
  static_assert(check_valid_communicator<Communicator>());

 public:
  using execution_space = typename Router::execution_space;
  using scalar_type = typename Router::scalar_type;
  using precision_type =
      detail::detected_or_t<Precision<scalar_type>, detail::precision_type_of, Router>;
  using route_type = routing_t<scalar_type>;
  using memory_space = typename execution_space::memory_space;
  using X = execution_space;
  using S = scalar_type;

  static_assert(std::is_same_v<typename Expert::execution_space, X>,
                "kmoe::MoELayer: Expert::execution_space must equal Router::execution_space");
  static_assert(std::is_same_v<typename Expert::scalar_type, S>,
                "kmoe::MoELayer: Expert::scalar_type must equal Router::scalar_type");
  static_assert(std::is_same_v<typename Combiner::execution_space, X>,
                "kmoe::MoELayer: Combiner::execution_space must equal Router::execution_space");
  static_assert(std::is_same_v<typename Combiner::scalar_type, S>,
                "kmoe::MoELayer: Combiner::scalar_type must equal Router::scalar_type");
  static_assert(
      std::is_same_v<detail::detected_or_t<precision_type, detail::precision_type_of, Expert>,
                     precision_type> &&
          std::is_same_v<detail::detected_or_t<precision_type, detail::precision_type_of, Combiner>,
                         precision_type>,
      "kmoe::MoELayer: the Expert's and Combiner's Precision must equal the Router's "
      "(give every policy the same Precision, or the same bare Scalar)");
  using communication_type = typename precision_type::communication_type;
  static_assert(!precision_type::compresses_communication ||
                    (std::is_same_v<S, float> && is_packed_float_v<communication_type>),
                "kmoe::MoELayer: a Precision's communication type differs from its storage only "
                "as bfloat16 or float16 over float storage (Precision<float, float, float, "
                "bfloat16>); double rows would lose 37 of their 53 bits");

  /// \param router   [in] the router (its expert count E is the global one)
  /// \param experts  [in] the routed experts this rank holds (all E on one rank)
  /// \param options  [in] capacity, balance losses, training memory mode, NaN policy
  /// \param shared   [in] optional shared experts (one expert applied to every token)
  /// \param groups   [in] parallel layout; defaults to a single rank
  MoELayer(Router router, Expert experts, const LayerOptions& options = {},
           std::optional<Expert> shared = std::nullopt,
           ParallelGroups<Communicator> groups = ParallelGroups<Communicator>{})
      : router_(std::move(router)),
        experts_(std::move(experts)),
        shared_(std::move(shared)),
        options_(with_precision_compression(options)),
        groups_(std::move(groups)),
        losses_(options.losses),
        gradient_buckets_(options.gradient_sync.bucket_bytes, options.gradient_sync.compression) {
    constexpr const char* where = "kmoe::MoELayer";
    // The TP all-reduce sums the F shards' outputs: a bias held whole by every TP rank is
    // added by rank 0 alone.
    if constexpr (detail::is_detected_v<detail::expert_output_bias, Expert>)
      experts_.apply_output_bias(groups_.tp_rank == 0);
    // Every rank takes part in the agreement even when its own checks fail, so a rank with
    // a bad argument does not leave the others waiting in the fingerprint all-gather.
    kmoe::agree_or_throw<memory_space>(groups_.world, where, calls_.enter(CallSequence::construct),
                                       [&] { check_arguments(); });
    check_configuration_agrees();
    build_nodes();
    compare_replicas(where);
  }

  int num_experts() const { return router_.num_experts(); }
  int hidden_size() const { return router_.hidden_size(); }
  Router& router() { return router_; }
  const Router& router() const { return router_; }
  Expert& experts() { return experts_; }
  const Expert& experts() const { return experts_; }
  std::optional<Expert>& shared_experts() { return shared_; }
  const std::optional<Expert>& shared_experts() const { return shared_; }
  const LayerOptions& options() const { return options_; }
  /// Turns the per-phase timing of forward (ForwardStats::phase_ms) on or off.
  void set_phase_timing(bool enabled) { options_.time_phases = enabled; }
  /// The loss scale of mixed-precision training (kmoe::DynamicLossScaler::scale()): the
  /// balance losses' gradients are multiplied by it, as the caller multiplies grad_y.
  void set_loss_scale(double scale) { losses_.set_gradient_scale(scale); }
  const ParallelGroups<Communicator>& groups() const { return groups_; }
  /// The routing decision of the last forward (expert indices, weights, logits).
  const RoutingPlan<X, S>& routing() const { return plan_; }
  /// The node of each EP rank (LayerOptions::nodes); empty when no node map was built.
  const NodeMap& node_map() const {
    static const NodeMap none;
    return nodes_ ? nodes_->map : none;
  }
  /// Bytes and messages every expert-parallel exchange of this layer (forward and backward)
  /// has handed to the communicators since construction, by node class.
  const ExchangeTraffic& exchange_traffic() const { return *traffic_; }
  /// Row of each (token, slot) in the permuted buffer of the last forward, -1 if dropped.
  const Matrix<int, X>& positions() const { return dispatch_.position; }

  /// \brief y = MoE(x).
  /// \param x       [in] hidden states [T, H], any rank-2 view of scalar_type in the
  ///                layer's memory (strided or column-major views are copied); in training
  ///                the layer keeps its own copy for backward, so x may change afterwards
  /// \param y       [out] output [T, H]; must not overlap x
  /// \param context [in] training flag, token ids (hash routing), step (noise)
  template <class XView, class YView>
  ForwardStats forward(const XView& x, const YView& y, const RouteContext<X>& context = {}) {
    static_assert(detail::check_layer_view<XView, S, X>());
    static_assert(detail::check_layer_view<YView, S, X>());
    constexpr const char* where = "kmoe::MoELayer::forward";
    const detail::ProfilingRegion forward_region(where);
    ForwardStats stats;
    detail::PhaseClock<X> phase_clock(options_.time_phases);
    // A failed forward leaves nothing for backward to differentiate.
    has_forward_ = false;
    bool copy_back = false;
    Matrix<S, X> y_rows;
    kmoe::agree_or_throw<memory_space>(
        groups_.world, where, calls_.enter(CallSequence::forward), [&] {
          require(x.extent(1) == std::size_t(hidden_size()), where, "x.extent(1)", x.extent(1),
                  "must equal the hidden size " + std::to_string(hidden_size()));
          require(y.extent(0) == x.extent(0) && y.extent(1) == x.extent(1), where, "y extents",
                  std::to_string(y.extent(0)) + "x" + std::to_string(y.extent(1)),
                  "must equal x's extents");
          require(!detail::overlaps(x, y), where, "y", "a view overlapping x",
                  "the output must not share memory with the input (the layer reads x after "
                  "writing parts of y, and backward needs x)");
          losses_.validate_tokens(where, int(x.extent(0)));
          training_ = context.training;
          // Training keeps a copy of x: backward must see the input of this forward even if
          // the caller reuses or edits its buffer in between (PyTorch raises on that edit;
          // keeping the copy makes it harmless).
          if (training_) {
            detail::ensure_extents(saved_x_, "kmoe::MoELayer::saved_x", x.extent(0), x.extent(1));
            Kokkos::deep_copy(saved_x_, x);
            x_ = saved_x_;
          } else {
            x_ = detail::row_major_input<S, X>(x, x_rows_, "kmoe::MoELayer::x_rows");
          }
          y_rows = detail::row_major_output<S, X>(y, y_rows_, "kmoe::MoELayer::y_rows", copy_back);
          const detail::ProfilingRegion route_region("kmoe::MoELayer::route");
          router_.forward(x_, plan_, context);
          check_row_bounds(std::int64_t(x.extent(0)));
          if (options_.non_finite == NonFinitePolicy::raise)
            detail::raise_if_non_finite_routing(plan_);
        });
    // Parameters are usually set between construction and the first forward (an
    // initializer, a checkpoint): their replicas are compared once more here.
    if (!replicas_compared_) {
      compare_replicas(where);
      replicas_compared_ = true;
    }
    // Failover's agreement point: every rank then holds the same failed set, so a refusal
    // to route around it is raised by all of them together.
    if (options_.failover.enabled) {
      agree_on_health();
      route_around_failures(where, stats);
    }
    const ExchangeTraffic traffic_before = *traffic_;
    // From here on the ranks are inside the step's collectives: see agreement.hpp.
    abort_on_failure(groups_.world, where, [&] {
      if (!options_.failover.health_checks()) {
        forward_after_routing(x_, y_rows, stats, phase_clock);
        return;
      }
      // The state a redo starts from (only health checks can ask for one).
      const ForwardStats routed = stats;
      const auto bias_counts = bias_counts_;
      forward_after_routing(x_, y_rows, stats, phase_clock);
      // A health check failed a slot during this step: redo it around the new failure, if
      // that needs no refusal (else the next forward's agreement raises it).
      while (agree_on_health() &&
             (failures_have_replicas() || (!training_ && options_.failover.reroute))) {
        const std::int64_t rerouted = stats.rerouted;
        stats = routed;
        bias_counts_ = bias_counts;
        route_around_failures(where, stats);
        stats.rerouted += rerouted;
        forward_after_routing(x_, y_rows, stats, phase_clock);
      }
    });
    stats.traffic = *traffic_ - traffic_before;
    if (copy_back) Kokkos::deep_copy(y, y_rows);
    // Finite inputs can still overflow inside the experts (3e38), and routers without
    // logits (hash routing) pass a NaN token straight through: under `raise`, the output
    // itself is checked, and every rank agrees so none is left in the next step's
    // collectives.
    if (options_.non_finite == NonFinitePolicy::raise)
      kmoe::agree_or_throw(groups_.world, where, [&] {
        raise_if_wire_overflow(where);
        detail::raise_if_non_finite<X>(y_rows, where, "output y");
      });
    has_forward_ = true;
    backward_done_ = false;
    stats.memory = memory_stats();
    return stats;
  }

  /// \brief Bytes this rank's layer holds now, by category (ForwardStats::memory, which
  /// forward fills), with the phase peaks of the last forward when an AllocationTracker
  /// counts. Activations count after a training forward only.
  MemoryStats memory_stats() const {
    MemoryStats memory;
    memory.expert_weights = detail::expert_weight_bytes(experts_);
    if (training_ && has_forward_) {
      memory.activations = detail::view_bytes(saved_x_) + detail::view_bytes(plan_.logits) +
                           detail::view_bytes(plan_.probs) + detail::view_bytes(plan_.expert) +
                           detail::view_bytes(plan_.weight) +
                           detail::view_bytes(dispatch_.position) + detail::view_bytes(expert_y_) +
                           detail::expert_saved_bytes(experts_);
      if (shared_)
        memory.activations += detail::view_bytes(shared_y_) + detail::expert_saved_bytes(*shared_);
    }
    memory.exchange_buffers = std::int64_t(exchange_.buffer_bytes(expert_y_.data()));
    memory.peak = detail::phase_peak_bytes();
    return memory;
  }

 private:
  void forward_after_routing(const ConstMatrix<S, X>& x, const Matrix<S, X>& y, ForwardStats& stats,
                             detail::PhaseClock<X>& phase_clock) {
    const int tokens = int(x.extent(0));
    const int slots = int(plan_.slots());
    const int experts = num_experts();
    // With replicas the dispatch and the exchange work on physical experts (each a replica
    // of the logical expert the router chose); the losses and stats stay logical.
    const int physical = replicas_.active() ? replicas_.physical_experts() : experts;
    const RoutingPlan<X, S>& routed = replicas_.active() ? physical_plan() : plan_;

    phase_clock.lap(stats.phase_ms.route);
    {
      const detail::ProfilingRegion dispatch_region("kmoe::MoELayer::dispatch");
      stats.capacity = options_.capacity.per_expert(tokens, slots, experts);
      if (stats.capacity >= 0)
        stats.capacity = all_reduce_max_value<memory_space>(groups_.ep, stats.capacity);
      dispatch_.build(routed, exchange_.expert_key(), physical, stats.capacity,
                      options_.capacity.drop);

      // Per-expert counts and, last, the token count, summed over the token groups in one
      // all-reduce: local batches may differ in size.
      std::vector<std::int64_t> counts(experts + 1, 0);
      for (int e = 0; e < physical; ++e)
        counts[replicas_.active() ? replicas_.logical_of(e) : e] +=
            dispatch_.routed_per_key[exchange_.key(e)];
      counts[experts] = tokens;
      all_reduce_sum_values<memory_space>(groups_.tokens, counts);
      const std::int64_t global_tokens = counts[experts];
      counts.pop_back();
      stats.tokens_per_expert = std::move(counts);
      // The bias update follows the training batches only (evaluation passes do not move it).
      if (training_)
        for (int e = 0; e < experts; ++e) bias_counts_[e] += stats.tokens_per_expert[e];
      for (int e = 0; e < physical; ++e) stats.assignments += dispatch_.routed_per_key[e];
      stats.dropped = stats.assignments - dispatch_.kept_total;
#ifndef NDEBUG
      dispatch_.check_accounting(plan_.expert, stats.assignments, stats.capacity);
#endif
      stats.losses = losses_.forward(plan_, Router::probability_kind, stats.tokens_per_expert,
                                     global_tokens, training_, groups_.tokens);

      // Gather the rows to send (on one EP rank: every kept assignment in key order; across
      // ranks: each token once per destination rank, or, with the weights on the expert
      // inputs, every kept assignment's scaled row).
      exchange_.set_chunks(pipelined_chunks());
      if (input_weighted()) {
        exchange_.plan(dispatch_, routed.expert, x, plan_.weight);
        detail::ensure_extents(unit_weight_, "kmoe::MoELayer::unit_weight", tokens, slots);
        Kokkos::deep_copy(unit_weight_, route_type(1));
      } else {
        exchange_.plan(dispatch_, routed.expert, x);
      }
      phase_clock.lap(stats.phase_ms.dispatch);
    }

    // Send the rows to their experts' ranks and compute the shared experts while the
    // exchange is in flight: their region then lies inside the exchange's.
    const ExpertMode mode = training_ ? options_.training_mode : ExpertMode::inference;
    const auto run_shared = [&] {
      if (!shared_) return;
      phase_clock.lap(stats.phase_ms.exchange);
      const detail::ProfilingRegion shared_region("kmoe::MoELayer::shared_experts");
      detail::ensure_extents(shared_y_, "kmoe::MoELayer::shared_y", tokens, hidden_size());
      if (shared_segments_.rows() != tokens) shared_segments_ = Segments<X>::single(tokens);
      shared_->forward(x, shared_segments_, shared_y_, mode);
      phase_clock.lap(stats.phase_ms.shared);
    };
    if (exchange_.chunks() > 1)
      forward_pipelined(mode, stats, phase_clock, run_shared);
    else
      forward_sequential(mode, stats, phase_clock, run_shared);
    const detail::ProfilingRegion combine_region("kmoe::MoELayer::combine");
    // Input-weighted rows already carry their weight: the combine adds them with weight 1.
    combiner_.combine(exchange_.send_y(), dispatch_.position, combine_weight(),
                      shared_ ? ConstMatrix<S, X>(shared_y_) : ConstMatrix<S, X>(), y);
    phase_clock.lap(stats.phase_ms.combine);
  }

  /// The counts of the exchange (through MPI, with the payload itself) and what they tell.
  void exchange_counts(ForwardStats& stats, detail::PhaseClock<X>& phase_clock) {
    wait_for_slowest_rank(phase_clock, stats.phase_ms);
    exchange_.exchange_counts();
    stats.dispatch_rows = exchange_.dispatch_rows();
    stats.dispatch_rows_received = exchange_.dispatch_rows_received();
    stats.combine_rows_sent = exchange_.combine_rows_sent();
    stats.combine_rows_received = exchange_.combine_rows_received();
    stats.dispatch_header_rows = exchange_.header_rows();
    stats.exchange_chunks = exchange_.chunks();
  }

  /// The dispatch, experts and combine of one forward, each waited for in turn (C = 1).
  template <class RunShared>
  void forward_sequential(ExpertMode mode, ForwardStats& stats, detail::PhaseClock<X>& phase_clock,
                          const RunShared& run_shared) {
    {
      const detail::ProfilingRegion exchange_region("kmoe::MoELayer::exchange");
      exchange_counts(stats, phase_clock);
      auto request = exchange_.dispatch_start();
      if (options_.overlap_shared_experts && shared_) {
        run_shared();
        // The ranks' shared experts may finish apart: time that wait as imbalance too.
        wait_for_slowest_rank(phase_clock, stats.phase_ms);
      }
      request.wait();
    }
    if (!options_.overlap_shared_experts) run_shared();
    phase_clock.lap(stats.phase_ms.exchange);
    {
      const detail::ProfilingRegion experts_region("kmoe::MoELayer::experts");
      const auto& expert_x = exchange_.arrive();
      const auto& segments = exchange_.segments();
      detail::ensure_extents(expert_y_, "kmoe::MoELayer::expert_y", segments.rows(), hidden_size());
      if (options_.failover.health_checks())
        run_experts_checked(expert_x, segments, mode);
      else
        experts_.forward(expert_x, segments, expert_y_, mode);
      if (groups_.tp.size() > 1) detail::all_reduce_sum_matrix<X>(groups_.tp, expert_y_);
      if (options_.failover.enabled && options_.failover.check_non_finite)
        mark_non_finite_slots(segments);
      phase_clock.lap(stats.phase_ms.experts);
    }
    {
      const detail::ProfilingRegion exchange_region("kmoe::MoELayer::exchange");
      exchange_.combine(expert_y_, [&] { wait_for_slowest_rank(phase_clock, stats.phase_ms); });
      phase_clock.lap(stats.phase_ms.exchange);
    }
  }

  /// The pipelined forward (C > 1 chunks, docs/parallel.md): every chunk's dispatch starts
  /// at once; the shared experts run while they travel; then each chunk's experts run as
  /// soon as it has arrived and its outputs start back at once, while later chunks are
  /// still in flight. MPI moves a started exchange on only inside MPI calls, so every
  /// started request is tested between the pieces of work.
  template <class RunShared>
  void forward_pipelined(ExpertMode mode, ForwardStats& stats, detail::PhaseClock<X>& phase_clock,
                         const RunShared& run_shared) {
    using Request = typename Communicator::Request;
    const int chunks = exchange_.chunks();
    std::vector<Request> dispatched(chunks), returned(chunks);
    const auto progress = [&] { detail::test_requests(dispatched, returned); };
    {
      const detail::ProfilingRegion exchange_region("kmoe::MoELayer::exchange");
      exchange_counts(stats, phase_clock);
      for (int c = 0; c < chunks; ++c) dispatched[c] = exchange_.dispatch_chunk_start(c);
      if (options_.overlap_shared_experts && shared_) {
        run_shared();
        progress();
      }
    }
    const auto& segments = exchange_.segments();
    detail::ensure_extents(expert_y_, "kmoe::MoELayer::expert_y", segments.rows(), hidden_size());
    for (int c = 0; c < chunks; ++c) {
      dispatched[c].wait();
      phase_clock.lap(stats.phase_ms.exchange);
      {
        const detail::ProfilingRegion experts_region("kmoe::MoELayer::experts");
        const Matrix<S, X> chunk_x = exchange_.arrive_chunk(c);
        progress();
        experts_.forward(chunk_x, exchange_.chunk_segments(c), exchange_.chunk_rows(expert_y_, c),
                         mode);
        phase_clock.lap(stats.phase_ms.experts);
      }
      returned[c] = exchange_.return_chunk_start(c, expert_y_);
      progress();
    }
    if (!options_.overlap_shared_experts) run_shared();
    const detail::ProfilingRegion exchange_region("kmoe::MoELayer::exchange");
    for (int c = 0; c < chunks; ++c) {
      returned[c].wait();
      exchange_.return_chunk_finish(c);
    }
    if (options_.failover.enabled && options_.failover.check_non_finite)
      mark_non_finite_slots(segments);
    phase_clock.lap(stats.phase_ms.exchange);
  }

  /// The chunks of this forward's pipelined exchange (LayerOptions::exchange_chunks): 1
  /// where the pipeline would change results or has nothing to split (see the option);
  /// the option's value where set; else (0) one chunk per local expert of the rank with
  /// the fewest, at most 4: more chunks hide more of the exchange behind the experts, but
  /// each adds two collectives and a pass over the chunk's rows.
  int pipelined_chunks() const {
    const ExpertMode mode = training_ ? options_.training_mode : ExpertMode::inference;
    const bool pipelinable = groups_.layout.ep > 1 && groups_.layout.tp == 1 &&
                             exchange_.deduplicated() && !options_.failover.health_checks() &&
                             mode != ExpertMode::store;
    if (!pipelinable) return 1;
    if (options_.exchange_chunks > 0) return options_.exchange_chunks;
    return std::max(1, std::min(4, exchange_.fewest_local_experts()));
  }

 public:
  /// \brief Backward of the last training forward: overwrites grad_x and accumulates every
  /// parameter's gradient (call zero_gradients() between steps). The balance losses enabled
  /// in the options are part of the differentiated loss.
  /// \param grad_y [in] dLoss/dy [T, H]
  /// \param grad_x [out] dLoss/dx [T, H]
  template <class GradYView, class GradXView>
  void backward(const GradYView& grad_y_in, const GradXView& grad_x_out) {
    static_assert(detail::check_layer_view<GradYView, S, X>());
    static_assert(detail::check_layer_view<GradXView, S, X>());
    constexpr const char* where = "kmoe::MoELayer::backward";
    const detail::ProfilingRegion backward_region(where);
    const bool raise = options_.non_finite == NonFinitePolicy::raise;
    ConstMatrix<S, X> grad_y;
    Matrix<S, X> grad_x;
    bool copy_back = false;
    kmoe::agree_or_throw<memory_space>(
        groups_.world, where, calls_.enter(CallSequence::backward), [&] {
          require(has_forward_ && training_, where, "state", has_forward_ ? "inference" : "none",
                  "backward needs a preceding forward with context.training = true");
          // A second backward would run the experts' backward on state the first consumed, and
          // the gradients would be neither g nor 2g; PyTorch refuses the same.
          require(!backward_done_, where, "state", "after backward",
                  "backward runs once per training forward; call forward again");
          require(!gradient_buckets_.pending(), where, "state", "gradient sync pending",
                  "with LayerOptions::gradient_sync.overlap every backward starts the gradient "
                  "sync; call synchronize_gradients() (or zero_gradients()) before the next one");
          require(grad_y_in.extent(0) == x_.extent(0) && grad_y_in.extent(1) == x_.extent(1), where,
                  "grad_y extents",
                  std::to_string(grad_y_in.extent(0)) + "x" + std::to_string(grad_y_in.extent(1)),
                  "must equal x's extents");
          require(grad_x_out.extent(0) == x_.extent(0) && grad_x_out.extent(1) == x_.extent(1),
                  where, "grad_x extents",
                  std::to_string(grad_x_out.extent(0)) + "x" + std::to_string(grad_x_out.extent(1)),
                  "must equal x's extents");
          require(!detail::overlaps(grad_y_in, grad_x_out), where, "grad_x",
                  "a view overlapping grad_y",
                  "backward reads grad_y after writing grad_x; pass separate buffers");
          if (raise) detail::raise_if_non_finite<X>(grad_y_in, where, "grad_y");
          grad_y =
              detail::row_major_input<S, X>(grad_y_in, grad_y_rows_, "kmoe::MoELayer::grad_y_rows");
          grad_x = detail::row_major_output<S, X>(grad_x_out, grad_x_rows_,
                                                  "kmoe::MoELayer::grad_x_rows", copy_back);
        });
    backward_done_ = true;
    non_finite_gradient_ = nullptr;
    abort_on_failure(groups_.world, where, [&] { backward_after_checks(grad_y, grad_x); });
    if (copy_back) Kokkos::deep_copy(grad_x_out, grad_x);
    // Finite grad_y can overflow on the way back, like the forward output (see forward).
    if (raise)
      kmoe::agree_or_throw(groups_.world, where, [&] {
        raise_if_wire_overflow(where);
        detail::raise_if_non_finite<X>(grad_x, where, "input gradient grad_x");
        if (non_finite_gradient_) std::rethrow_exception(non_finite_gradient_);
      });
  }

 private:
  void backward_after_checks(const ConstMatrix<S, X>& grad_y, const Matrix<S, X>& grad_x) {
    const int tokens = int(x_.extent(0)), slots = int(plan_.slots());
    {
      const detail::ProfilingRegion combine_region("kmoe::MoELayer::backward::combine");
      detail::ensure_extents(grad_send_y_, "kmoe::MoELayer::grad_send_y", dispatch_.kept_total,
                             hidden_size());
      detail::ensure_extents(grad_weight_, "kmoe::MoELayer::grad_weight", tokens, slots);
      // Input-weighted: the combine's weights are the constant 1, so what it writes into
      // grad_weight_ is replaced by the weights' gradient at the expert inputs (from_experts).
      combiner_.backward(grad_y, exchange_.send_y(), dispatch_.position, combine_weight(),
                         grad_send_y_, grad_weight_);
    }
    // The shared experts' backward needs nothing from the exchanges: it runs while the
    // output gradients travel to the experts (its input gradient is added to grad_x after
    // the routed experts' sum, as without the overlap, so the bits are the same).
    const bool shared_overlapped = options_.overlap_shared_experts && shared_;
    if (backward_pipelines())
      backward_exchange_pipelined(grad_y, grad_x, shared_overlapped);
    else
      backward_exchange_sequential(grad_y, grad_x, shared_overlapped);
    if (shared_) {
      if (!shared_overlapped) backward_shared(grad_y);
      detail::add_into<X>(shared_grad_x_, grad_x);
    }
    const detail::ProfilingRegion router_region("kmoe::MoELayer::backward::router");
    detail::ensure_extents(grad_logits_, "kmoe::MoELayer::grad_logits", tokens,
                           std::size_t(num_experts()));
    losses_.backward(plan_, Router::probability_kind, grad_logits_);
    router_.backward(x_, plan_, grad_weight_, grad_logits_, grad_x);
    gradients_produced(GradientGroup::router);
  }

  /// The backward's exchanges and experts, each waited for in turn: the output gradients
  /// to the experts, their backward, the input gradients home and summed per token.
  void backward_exchange_sequential(const ConstMatrix<S, X>& grad_y, const Matrix<S, X>& grad_x,
                                    bool shared_overlapped) {
    {
      const detail::ProfilingRegion exchange_region("kmoe::MoELayer::backward::exchange");
      if (shared_overlapped) {
        auto request = exchange_.to_experts_start(grad_send_y_);
        backward_shared(grad_y);
        request.wait();
      } else {
        exchange_.to_experts(grad_send_y_);
      }
    }
    {
      const detail::ProfilingRegion experts_region("kmoe::MoELayer::backward::experts");
      const auto& grad_expert_y = exchange_.arrive_gradient();
      const auto& segments = exchange_.segments();
      detail::ensure_extents(grad_expert_x_, "kmoe::MoELayer::grad_expert_x", segments.rows(),
                             hidden_size());
      experts_.backward(exchange_.expert_x(), segments, grad_expert_y, grad_expert_x_);
      if (replicas_.active())
        replicas_.sum_replica_gradients(groups_.ep, gradient_group(GradientGroup::experts));
      gradients_produced(GradientGroup::experts);
      if (groups_.tp.size() > 1) detail::all_reduce_sum_matrix<X>(groups_.tp, grad_expert_x_);
    }
    {
      // Back to the tokens: the rows' way home and their sum per token.
      const detail::ProfilingRegion exchange_region("kmoe::MoELayer::backward::exchange");
      if (input_weighted())
        exchange_.from_experts(grad_expert_x_, grad_x, x_, plan_.weight, grad_weight_);
      else
        exchange_.from_experts(grad_expert_x_, grad_x);
      gradient_buckets_.progress();  // overlap: let the expert gradients' sums advance
    }
  }

  /// Whether backward runs the forward's chunks (docs/parallel.md, "Pipelined exchange"):
  /// after a pipelined forward, with experts that can drop one chunk's saved rows before the
  /// next chunk's backward recomputes its own.
  bool backward_pipelines() const {
    return exchange_.chunks() > 1 && detail::is_detected_v<detail::expert_release_saved, Expert>;
  }

  /// The pipelined backward: the forward's schedule reversed. Every chunk's output
  /// gradients start towards the experts at once; the shared experts' backward runs while
  /// they travel; each chunk's experts run their backward as soon as it has arrived (each
  /// expert's GEMMs whole, as in the forward) and its input gradients start home at once;
  /// the routed experts' gradient sync starts (with gradient_sync.overlap) while the last
  /// returns travel. Every started request is tested between the pieces of work.
  void backward_exchange_pipelined(const ConstMatrix<S, X>& grad_y, const Matrix<S, X>& grad_x,
                                   bool shared_overlapped) {
    using Request = typename Communicator::Request;
    const int chunks = exchange_.chunks();
    std::vector<Request> dispatched(chunks), returned(chunks);
    const auto progress = [&] {
      detail::test_requests(dispatched, returned);
      gradient_buckets_.progress();
    };
    {
      const detail::ProfilingRegion exchange_region("kmoe::MoELayer::backward::exchange");
      for (int c = 0; c < chunks; ++c)
        dispatched[c] = exchange_.to_experts_chunk_start(c, grad_send_y_);
      if (shared_overlapped) {
        backward_shared(grad_y);
        progress();
      }
    }
    detail::ensure_extents(grad_expert_x_, "kmoe::MoELayer::grad_expert_x",
                           exchange_.segments().rows(), hidden_size());
    for (int c = 0; c < chunks; ++c) {
      dispatched[c].wait();
      const detail::ProfilingRegion experts_region("kmoe::MoELayer::backward::experts");
      const Matrix<S, X> grad_expert_y = exchange_.arrive_gradient_chunk(c);
      progress();
      // The experts keep one call's rows: the previous chunk's must not pass for this one's.
      if constexpr (detail::is_detected_v<detail::expert_release_saved, Expert>)
        experts_.release_saved();
      experts_.backward(exchange_.chunk_rows(exchange_.expert_x(), c), exchange_.chunk_segments(c),
                        grad_expert_y, exchange_.chunk_rows(grad_expert_x_, c));
      returned[c] = exchange_.from_experts_chunk_start(c, grad_expert_x_);
      progress();
    }
    if (replicas_.active())
      replicas_.sum_replica_gradients(groups_.ep, gradient_group(GradientGroup::experts));
    gradients_produced(GradientGroup::experts);
    const detail::ProfilingRegion exchange_region("kmoe::MoELayer::backward::exchange");
    for (int c = 0; c < chunks; ++c) {
      returned[c].wait();
      exchange_.from_experts_chunk_finish(c);
    }
    exchange_.sum_returned_gradients(grad_x);
    gradient_buckets_.progress();
  }

  /// The shared experts' backward: their input gradient into shared_grad_x_, their
  /// parameters' gradients accumulated (and, with gradient_sync.overlap, their sync started).
  void backward_shared(const ConstMatrix<S, X>& grad_y) {
    const detail::ProfilingRegion shared_region("kmoe::MoELayer::backward::shared_experts");
    detail::ensure_extents(shared_grad_x_, "kmoe::MoELayer::shared_grad_x", x_.extent(0),
                           hidden_size());
    shared_->backward(x_, shared_segments_, grad_y, shared_grad_x_);
    gradients_produced(GradientGroup::shared);
  }

  /// The three groups of gradients, in the order backward completes them; each is averaged
  /// over the ranks that hold it.
  enum class GradientGroup { experts, shared, router };

  ParameterList<X, S> gradient_group(GradientGroup group) const {
    ParameterList<X, S> list;
    if (group == GradientGroup::experts) experts_.collect_parameters(list);
    if (group == GradientGroup::shared && shared_) shared_->collect_parameters(list);
    if (group == GradientGroup::router) router_.collect_parameters(list);
    return list;
  }

  /// Routed experts over the data-parallel group, scaled by the ranks with distinct tokens;
  /// the router and shared experts over the world (docs/semantics.md section 5).
  void start_gradient_sync(GradientGroup group, const ParameterList<X, S>& parameters) {
    if (group == GradientGroup::experts)
      gradient_buckets_.start(groups_.dp, parameters, groups_.tokens.size());
    else
      gradient_buckets_.start(groups_.world, parameters, groups_.world.size());
  }

  /// Backward has finished a group's gradients: under NonFinitePolicy::raise, check them
  /// while they are still this rank's own (the first failure is raised after backward, on
  /// every rank); with overlap, start their sync.
  void gradients_produced(GradientGroup group) {
    const bool check = options_.non_finite == NonFinitePolicy::raise && !non_finite_gradient_;
    if (!check && !options_.gradient_sync.overlap) return;
    const auto parameters = gradient_group(group);  // collected once for both uses
    if (check) {
      try {
        for (const auto& p : parameters)
          detail::raise_if_non_finite<X>(p.grad, "kmoe::MoELayer::backward",
                                         "gradient of " + p.name);
      } catch (const kmoe::runtime_error&) {
        non_finite_gradient_ = std::current_exception();
      }
    }
    if (options_.gradient_sync.overlap) {
      start_gradient_sync(group, parameters);
      gradient_buckets_.progress();
    }
  }

 public:
  /// \brief Every trainable tensor: router, routed experts, shared experts.
  /// Each carries its ShardMap: which global experts and which F shard this rank holds
  /// (routed experts), or replicated (router, shared experts).
  ParameterList<X, S> parameters() const {
    ParameterList<X, S> list;
    router_.collect_parameters(list);
    const std::size_t first_expert = list.size();
    experts_.collect_parameters(list);
    const std::size_t first_shared = list.size();
    if (shared_) shared_->collect_parameters(list);
    const auto owned = local_experts();
    for (std::size_t i = first_expert; i < list.size(); ++i) {
      ShardMap& shard = list[i].shard;
      // An expert policy that names no axes stacks its experts first, as the shipped ones do.
      if (shard.expert_axis < 0) shard.expert_axis = 0;
      if (i < first_shared) {
        shard.experts = owned;
        shard.global_experts = num_experts();
        shard.expert_parallel = true;
        shard.ffn_rank = shard.ffn_axis >= 0 ? groups_.tp_rank : 0;
        shard.ffn_ranks = shard.ffn_axis >= 0 ? groups_.layout.tp : 1;
      } else {
        shard.ffn_axis = -1;  // the shared experts are whole on every rank
      }
      shard.validate(list[i].name, list[i].shape);
    }
    return list;
  }

  /// \brief Sets every gradient to zero; completes (and drops) a gradient sync a failed
  /// backward left started.
  void zero_gradients() {
    if (gradient_buckets_.pending()) gradient_buckets_.discard();
    kmoe::zero_gradients(parameters());
  }

  /// \brief Averages gradients over the ranks that hold each tensor (docs/semantics.md section 5):
  /// router and shared experts over the world, routed experts over the data-parallel
  /// group, both scaled so that the result is the gradient of the mean loss over every
  /// rank's tokens. Gradients travel in buckets (LayerOptions::gradient_sync); with overlap
  /// backward has started them and this waits for them. Either way the same collectives
  /// run on the same buffers, so overlapped and blocking give the same bits.
  void synchronize_gradients() {
    const detail::ProfilingRegion region("kmoe::MoELayer::synchronize_gradients");
    kmoe::agree_or_throw<memory_space>(groups_.world, "kmoe::MoELayer::synchronize_gradients",
                                       calls_.enter(CallSequence::synchronize_gradients), [] {});
    if (!options_.gradient_sync.overlap)
      for (auto group : {GradientGroup::experts, GradientGroup::shared, GradientGroup::router})
        start_gradient_sync(group, gradient_group(group));
    gradient_buckets_.finish();
  }

  /// \brief Compares every replicated parameter across the ranks that hold it (router and
  /// shared experts: the world; routed experts: the data-parallel group; an expert output
  /// bias: also the tensor-parallel group) by a bitwise checksum; if any differs, every
  /// rank throws kmoe::runtime_error naming it. Runs at construction and before the first
  /// forward; call it after loading or changing parameters (collective over the world).
  void check_replicas() {
    constexpr const char* where = "kmoe::MoELayer::check_replicas";
    kmoe::agree_or_throw<memory_space>(groups_.world, where,
                                       calls_.enter(CallSequence::check_replicas), [] {});
    compare_replicas(where);
  }

  /// \brief Aux-loss-free balance step (DeepSeek-V3): moves the router's selection bias
  /// by `rate` toward balance using the assignment counts accumulated since the last call
  /// (already summed over the ranks that route), then clears them.
  template <class R = Router>
  void apply_bias_update(double rate) {
    static_assert(detail::is_detected_v<detail::has_update_bias, R>,
                  "kmoe::MoELayer::apply_bias_update: the Router has no selection bias "
                  "(it needs update_bias(counts, rate), e.g. kmoe::SigmoidBiasRouter)");
    require(rate >= 0 && std::isfinite(rate), "kmoe::MoELayer::apply_bias_update", "rate", rate,
            "must be finite and >= 0");
    router_.update_bias(bias_counts_, rate);
    std::fill(bias_counts_.begin(), bias_counts_.end(), 0);
  }

  /// \brief What apply_placement moved on this rank.
  struct PlacementChange {
    int moved_slots = 0;          ///< slots (of all ranks) whose expert changed
    std::int64_t bytes_sent = 0;  ///< weights and optimizer state this rank sent
  };

  /// \brief Moves a replicated layer (LayerOptions::expert_placement) to placement `next`
  /// at a step boundary: every slot whose logical expert changes receives that expert's
  /// weights, and the given optimizer state tensors of the routed experts (e.g.
  /// `optimizer.state()`: AdamW's moments) their slices, from the first rank holding it
  /// under the current placement, through the EP communicator. Gradients are not moved:
  /// call it after the optimizer step and zero the gradients before the next backward.
  /// Collective over the world; every rank must pass the same `next` (same ranks, slots per
  /// rank and experts as now), else every rank raises.
  template <class OptimizerStates = std::vector<OptimizerState<X, S>>>
  PlacementChange apply_placement(const ExpertPlacement& next,
                                  const OptimizerStates& optimizer_state = {}) {
    constexpr const char* where = "kmoe::MoELayer::apply_placement";
    std::vector<SlotMove> moves;
    kmoe::agree_or_throw<memory_space>(
        groups_.world, where, calls_.enter(CallSequence::apply_placement), [&] {
          require(options_.expert_placement.ranks > 0, where, "options.expert_placement.ranks", 0,
                  "the layer was built without a replicated placement to change");
          require(!gradient_buckets_.pending(), where, "state", "gradient sync pending",
                  "apply the placement at a step boundary, after synchronize_gradients()");
          moves = placement_moves(options_.expert_placement, next);
          // A node-limited router must be able to name the node of each expert of `next`.
          if constexpr (detail::is_detected_v<detail::router_node_limited, Router>)
            if (nodes_ && router_.node_limited()) node_of_expert(next);
        });
    Fingerprint print;
    for (std::size_t slot = 0; slot < next.logical.size(); ++slot)
      print.integer("next.logical[" + std::to_string(slot) + "]", next.logical[slot]);
    check_fingerprints_agree<memory_space>(groups_.world, print, where,
                                           "every rank must apply the same placement");
    PlacementChange change;
    change.moved_slots = int(moves.size());
    const int slots = next.slots_per_rank;
    ParameterList<X, S> expert_parameters;
    experts_.collect_parameters(expert_parameters);
    for (const auto& p : expert_parameters) {
      change.bytes_sent += move_expert_slices(groups_.ep, moves, slots, p.value);
      for (const auto& state : optimizer_state)
        if (state.parameter == p.name)
          change.bytes_sent += move_expert_slices(groups_.ep, moves, slots, state.value);
    }
    X().fence();
    options_.expert_placement = next;
    build_placement();
    return change;
  }

  /// \brief Marks a physical expert slot (the global expert, without replicas) failed, as
  /// of the next forward's agreement point: marks made on any rank reach every rank there.
  /// Needs LayerOptions::failover.enabled.
  void mark_failed_slot(int slot) {
    require_failover("kmoe::MoELayer::mark_failed_slot");
    require(slot >= 0 && slot < health_.slots(), "kmoe::MoELayer::mark_failed_slot", "slot", slot,
            "must be in [0, " + std::to_string(health_.slots()) + ")");
    health_.mark_slot(slot);
  }
  /// \brief Marks every replica of logical expert `expert` failed (see mark_failed_slot).
  void mark_failed_expert(int expert) {
    require_failover("kmoe::MoELayer::mark_failed_expert");
    require(expert >= 0 && expert < num_experts(), "kmoe::MoELayer::mark_failed_expert", "expert",
            expert, "must be in [0, " + std::to_string(num_experts()) + ")");
    for (int slot = 0; slot < health_.slots(); ++slot)
      if (logical_of_slot(slot) == expert) health_.mark_slot(slot);
  }
  /// \brief Marks every slot of EP rank `ep_rank` failed (see mark_failed_slot).
  void mark_failed_rank(int ep_rank) {
    require_failover("kmoe::MoELayer::mark_failed_rank");
    require(ep_rank >= 0 && ep_rank < groups_.layout.ep, "kmoe::MoELayer::mark_failed_rank",
            "ep_rank", ep_rank, "must be in [0, " + std::to_string(groups_.layout.ep) + ")");
    health_.mark_rank(ep_rank);
  }
  /// \brief The failed slots every rank agreed on at the last agreement point.
  std::vector<int> failed_slots() const { return health_.failed_slots(); }

  /// Assignment counts accumulated for the next bias update.
  const std::vector<std::int64_t>& pending_bias_counts() const { return bias_counts_; }
  /// Restores the counts (checkpoints); one per expert, each >= 0.
  void set_pending_bias_counts(const std::vector<std::int64_t>& counts) {
    constexpr const char* where = "kmoe::MoELayer::set_pending_bias_counts";
    require(counts.size() == bias_counts_.size(), where, "counts.size()", counts.size(),
            "must equal the number of experts");
    for (auto c : counts) require(c >= 0, where, "count", c, "must be >= 0");
    bias_counts_ = counts;
  }

 private:
  /// Every row count of a step (assignments, padded expert segments, rows received from the
  /// EP group) is an `int` and, times H, an element count: bound them before any collective.
  /// Each rank checks its own T against the whole EP group's worst case (every rank sending
  /// this many assignments), so if every rank passes, the sum over ranks fits too.
  void check_row_bounds(std::int64_t tokens) const {
    constexpr const char* where = "kmoe::MoELayer::forward";
    const std::int64_t slots = std::int64_t(plan_.slots());
    const std::int64_t sent = detail::checked_mul(tokens, slots, groups_.layout.ep, where,
                                                  "x.extent(0) x slots x EP ranks");
    const std::int64_t padding =
        detail::checked_mul(experts_.num_experts(), options_.capacity.alignment - 1, where,
                            "local experts x (capacity.alignment - 1)");
    const std::int64_t rows = detail::checked_add(sent, padding, where, "expert rows");
    detail::checked_int(rows, where, "expert rows");
    detail::checked_mul(rows, hidden_size(), where, "expert rows x hidden size");
  }

  /// `options` with the exchange compression the Precision's communication type names; an
  /// explicit LayerOptions::exchange_compression must be none or that same format.
  static LayerOptions with_precision_compression(LayerOptions options) {
    if constexpr (precision_type::compresses_communication) {
      constexpr WireCompression wire = std::is_same_v<communication_type, bfloat16>
                                           ? WireCompression::bf16
                                           : WireCompression::fp16;
      require(options.exchange_compression == WireCompression::none ||
                  options.exchange_compression == wire,
              "kmoe::MoELayer", "options.exchange_compression",
              wire_compression_name(options.exchange_compression),
              "differs from the layer's Precision, whose communication type is " +
                  wire_compression_name(wire));
      options.exchange_compression = wire;
    }
    return options;
  }

  /// The constructor's local checks (they differ by rank: each rank holds its own experts).
  void check_arguments() {
    constexpr const char* where = "kmoe::MoELayer";
    options_.capacity.validate(where);
    options_.failover.validate(where);
    require(options_.training_mode != ExpertMode::inference, where, "options.training_mode",
            "inference", "must be store or recompute");
    require(options_.exchange_chunks >= 0, where, "options.exchange_chunks",
            options_.exchange_chunks, "must be >= 0 (0: the layer chooses, 1: sequential)");
    require(options_.exchange_compression == WireCompression::none || std::is_same_v<S, float>,
            where, "options.exchange_compression",
            wire_compression_name(options_.exchange_compression),
            is_packed_float_v<S>
                ? "needs a float layer (this one stores bfloat16/float16: its rows already "
                  "travel in 16 bits): set it to none"
                : "needs a float layer (this one's scalar type is double, whose rows would lose "
                  "37 of their 53 bits): set it to none");
    const ExpertPlacement& replicas = options_.expert_placement;
    if (replicas.ranks > 0) {
      replicas.validate(where);
      require(replicas.ranks == groups_.layout.ep, where, "options.expert_placement.ranks",
              replicas.ranks, "must equal the EP ranks " + std::to_string(groups_.layout.ep));
      require(replicas.logical_experts == router_.num_experts(), where,
              "options.expert_placement.logical_experts", replicas.logical_experts,
              "must equal the router's experts " + std::to_string(router_.num_experts()));
      require(options_.capacity.dropless(), where, "options.capacity.factor",
              options_.capacity.factor,
              "must be 0 (dropless) with replicated experts: a capacity per replica would "
              "drop other tokens than the unreplicated layer");
    }
    const auto owned = local_experts();
    require(experts_.num_experts() == int(owned.size()), where, "experts.num_experts()",
            experts_.num_experts(),
            "must equal the experts placed on this rank (" + std::to_string(owned.size()) + ")");
    require(experts_.hidden_size() == router_.hidden_size(), where, "experts.hidden_size()",
            experts_.hidden_size(), "must equal router.hidden_size()");
    if (shared_) {
      require(shared_->num_experts() == 1, where, "shared.num_experts()", shared_->num_experts(),
              "shared experts are one dense expert (fold n shared experts into its F)");
      require(shared_->hidden_size() == router_.hidden_size(), where, "shared.hidden_size()",
              shared_->hidden_size(), "must equal router.hidden_size()");
      shared_segments_ = Segments<X>::single(0);
    }
    // Optimizers, checkpoints and synchronize_gradients() address tensors by name.
    const auto list = parameters();
    for (std::size_t i = 0; i < list.size(); ++i)
      for (std::size_t j = 0; j < i; ++j)
        require(list[i].name != list[j].name, where, "parameter name", list[i].name,
                "is used twice; give the shared experts their own name (e.g. \"shared_experts\")");
    bias_counts_.assign(std::size_t(router_.num_experts()), 0);
    build_placement();
  }

  /// LayerOptions::exchange_compression: finite values this rank's rows could not hold in
  /// 16 bits (fp16 beyond 65504) travelled as infinities; raised with the agreed checks.
  void raise_if_wire_overflow(const char* where) {
    const std::int64_t overflows = exchange_.take_wire_overflows();
    if (overflows > 0)
      throw runtime_error(std::string(where) + ": options.exchange_compression " +
                          wire_compression_name(options_.exchange_compression) + ": " +
                          std::to_string(overflows) +
                          " values this rank sent exceed the format's largest finite value "
                          "(fp16: 65504) and travelled as infinities; use bf16 (float's range) "
                          "or none");
  }

  void require_failover(const char* where) const {
    require(options_.failover.enabled, where, "options.failover.enabled", "false",
            "marking experts failed needs failover on");
  }

  int logical_of_slot(int slot) const {
    return replicas_.active() ? replicas_.logical_of(slot) : slot;
  }

  /// Failover's agreement: every rank's marks and experts-phase time, all-reduced over the
  /// world. Returns whether the failed set grew.
  bool agree_on_health() {
    const auto share = [&](std::vector<std::int64_t>& buffer) {
      all_reduce_sum_values<memory_space>(groups_.world, buffer);
    };
    const std::int64_t experts_us = experts_us_;
    experts_us_ = -1;  // each forward's time is compared once
    return health_.agree(share, groups_.world.rank(), ep_rank_of_world_, experts_us,
                         options_.failover.latency_factor, options_.failover.latency_window);
  }

  /// The logical experts with no healthy replica under the agreed failed set (the healthy
  /// replicas take the others' tokens).
  std::vector<int> dead_experts() {
    if (replicas_.active()) return replicas_.set_failed(health_.failed());
    return health_.failed_slots();  // one replica per expert: the slot is the expert
  }
  bool failures_have_replicas() { return dead_experts().empty(); }

  /// Routes around the agreed failed set: replicas first; experts with none left are
  /// rerouted (inference with reroute on) or refused. Same decision on every rank.
  void route_around_failures(const char* where, ForwardStats& stats) {
    const auto dead = dead_experts();
    stats.failed_slots = health_.failed_slots();
    if (dead.empty()) return;
    require(!training_ && options_.failover.reroute, where, "failed expert", dead.front(),
            training_ ? "has no healthy replica; rerouting its tokens is for inference only "
                        "(training would differentiate another routing than the router's)"
                      : "has no healthy replica and options.failover.reroute is false");
    detail::ensure_extents(dead_flags_, "kmoe::MoELayer::dead_flags", std::size_t(num_experts()));
    auto flags = Kokkos::create_mirror_view(dead_flags_);
    Kokkos::deep_copy(flags, 0);
    for (int e : dead) flags(e) = 1;
    Kokkos::deep_copy(dead_flags_, flags);
    stats.rerouted += reroute_dead_experts<X, S>(plan_, dead_flags_);
  }

  /// Slot of each local expert segment (the global expert without replicas).
  int slot_of_local(int j) const {
    if (replicas_.active()) return groups_.ep_rank * options_.expert_placement.slots_per_rank + j;
    return local_experts()[std::size_t(j)];
  }

  /// The experts' forward under health checks: an exception fails every local slot (the
  /// rows become zeros, so the exchange goes on and no rank waits forever); the time of
  /// the phase is kept for the latency check.
  void run_experts_checked(const Matrix<S, X>& expert_x, const Segments<X>& segments,
                           ExpertMode mode) {
    const auto start = std::chrono::steady_clock::now();
    try {
      experts_.forward(expert_x, segments, expert_y_, mode);
      X().fence();
    } catch (const std::exception&) {
      if (!options_.failover.catch_exceptions) throw;
      Kokkos::deep_copy(expert_y_, S(0));
      for (int j = 0; j < segments.experts(); ++j) health_.mark_slot(slot_of_local(j));
    }
    experts_us_ = std::chrono::duration_cast<std::chrono::microseconds>(
                      std::chrono::steady_clock::now() - start)
                      .count();
  }

  /// Marks each local slot whose output rows hold a non-finite value.
  void mark_non_finite_slots(const Segments<X>& segments) {
    for (int j = 0; j < segments.experts(); ++j)
      if (detail::rows_have_non_finite<X>(expert_y_, segments.begin(j), segments.end(j)))
        health_.mark_slot(slot_of_local(j));
  }

  /// Where each global expert lives and how rows reach it (exchange/expert_parallel_exchange.hpp).
  void build_placement() {
    const int experts = num_experts();
    build_health();
    if (options_.expert_placement.ranks == 0) {
      exchange_ = Exchange(groups_, experts, hidden_size(), options_.capacity.alignment,
                           deduplicate_dispatch());
      route_exchange();
      return;
    }
    // Physical slot i lives on EP rank i / slots_per_rank: block placement of the slots.
    replicas_ = ReplicaRouting<X, S>(options_.expert_placement, groups_.ep_rank);
    ParallelGroups<Communicator> slots = groups_;
    slots.layout.placement = Placement::block;
    exchange_ = Exchange(slots, replicas_.physical_experts(), hidden_size(),
                         options_.capacity.alignment, deduplicate_dispatch());
    route_exchange();
  }

  /// The node map (LayerOptions::nodes), built when a setting or the router's node limit
  /// asks for one; collective over the world, after the fingerprints agree (so every rank
  /// takes the same branch). A node map the exchange or the router cannot use raises on
  /// every rank.
  void build_nodes() {
    bool wanted = options_.nodes.requested();
    if constexpr (detail::is_detected_v<detail::router_node_limited, Router>)
      wanted = wanted || router_.node_limited();
    if (!wanted) return;
    nodes_ = std::make_shared<const NodeTopology<Communicator>>(
        NodeTopology<Communicator>::template create<memory_space>(groups_, options_.nodes));
    kmoe::agree_or_throw(groups_.world, "kmoe::MoELayer", [&] { route_exchange(); });
  }

  /// Routes the exchange over the node map (flat or hierarchical, counting the traffic by
  /// node class) and gives a node-limited router the node of each expert.
  void route_exchange() {
    // Before build_nodes (the constructor's first placement) there is no map: flat.
    const ExchangeKind kind = nodes_ ? options_.nodes.exchange : ExchangeKind::flat;
    exchange_.set_route(ExchangeRoute<Communicator>(groups_.ep, nodes_, kind, traffic_));
    exchange_.set_compression(options_.exchange_compression);
    if constexpr (detail::is_detected_v<detail::router_node_limited, Router>)
      if (nodes_ && router_.node_limited())
        router_.set_expert_nodes(node_of_expert(options_.expert_placement), nodes_->map.nodes());
  }

  /// The node of each logical expert under placement `p` (none: ParallelLayout::placement);
  /// a replicated expert must keep its replicas on one node for the node limit to mean
  /// anything.
  std::vector<int> node_of_expert(const ExpertPlacement& p) const {
    const NodeMap& map = nodes_->map;
    std::vector<int> node(std::size_t(num_experts()), -1);
    if (p.ranks == 0) {
      for (int r = 0; r < groups_.layout.ep; ++r)
        for (int e : groups_.layout.local_experts(num_experts(), r))
          node[std::size_t(e)] = map.node(r);
      return node;
    }
    for (int slot = 0; slot < p.physical_experts(); ++slot) {
      const int e = p.logical[std::size_t(slot)], n = map.node(p.rank_of_slot(slot));
      require(node[std::size_t(e)] < 0 || node[std::size_t(e)] == n, "kmoe::MoELayer",
              "options.expert_placement",
              "expert " + std::to_string(e) + " on nodes " + std::to_string(node[std::size_t(e)]) +
                  " and " + std::to_string(n),
              "node-limited routing needs each expert's replicas on one node");
      node[std::size_t(e)] = n;
    }
    return node;
  }

  /// A failed set over this placement's slots (none failed yet).
  void build_health() {
    const ExpertPlacement& p = options_.expert_placement;
    std::vector<int> rank_of_slot;
    if (p.ranks > 0) {
      for (int slot = 0; slot < p.physical_experts(); ++slot)
        rank_of_slot.push_back(p.rank_of_slot(slot));
    } else {
      rank_of_slot.assign(std::size_t(num_experts()), 0);
      for (int r = 0; r < groups_.layout.ep; ++r)
        for (int e : groups_.layout.local_experts(num_experts(), r))
          rank_of_slot[std::size_t(e)] = r;
    }
    health_ = ExpertHealth(rank_of_slot, groups_.layout.ep);
    ep_rank_of_world_.assign(std::size_t(groups_.world.size()), 0);
    for (int r = 0; r < groups_.world.size(); ++r) {
      int tp_rank = 0, ep_rank = 0, dp_rank = 0;
      groups_.layout.coordinates(r, tp_rank, ep_rank, dp_rank);
      ep_rank_of_world_[std::size_t(r)] = ep_rank;
    }
  }

  /// Global (logical) expert of each of this rank's expert slots.
  std::vector<int> local_experts() const {
    if (options_.expert_placement.ranks > 0) {
      const ExpertPlacement& p = options_.expert_placement;
      const auto first = p.logical.begin() + std::ptrdiff_t(groups_.ep_rank) * p.slots_per_rank;
      return std::vector<int>(first, first + p.slots_per_rank);
    }
    return groups_.layout.local_experts(num_experts(), groups_.ep_rank);
  }

  /// plan_ with each logical expert replaced by the replica that takes the token.
  const RoutingPlan<X, S>& physical_plan() {
    physical_plan_ = plan_;  // shares every view but the expert table
    detail::ensure_extents(physical_expert_, "kmoe::MoELayer::physical_expert",
                           plan_.expert.extent(0), plan_.expert.extent(1));
    replicas_.map(plan_.expert, physical_expert_);
    physical_plan_.expert = physical_expert_;
    return physical_plan_;
  }

  bool input_weighted() const { return options_.routing_weight == RoutingWeightPlacement::input; }
  /// Rows scaled per slot cannot be shared by a token's slots on one rank. (16-bit storage
  /// deduplicates too: its header travels as exact floats, exchange/expert_parallel_exchange.hpp.)
  bool deduplicate_dispatch() const { return !input_weighted(); }
  /// The weights the Combiner applies to the expert outputs: the routing weights, or 1 when
  /// they scaled the expert inputs instead.
  ConstMatrix<route_type, X> combine_weight() const {
    return input_weighted() ? ConstMatrix<route_type, X>(unit_weight_)
                            : ConstMatrix<route_type, X>(plan_.weight);
  }

  /// Ranks must agree on the configuration before the first collective of a step; every
  /// rank sees every fingerprint, so they all raise the same error together. The error
  /// shows each rank's value: real settings travel as their exact bits, enumerations are
  /// shown by name, and a differing Router or Expert type has its name gathered too.
  void check_configuration_agrees() const {
    Fingerprint print;
    print.integer("experts", num_experts());
    print.integer("hidden", hidden_size());
    print.integer("top_k", router_.slots_per_token());
    options_.fingerprint(print);
    groups_.layout.fingerprint(print);
    print.type("Router type", typeid(Router));
    print.type("Expert type", typeid(Expert));
    print.choice("shared experts", shared_ ? 1 : 0, {"none", "present"});
    // Each policy's own settings, where it names them.
    if constexpr (detail::is_detected_v<detail::fingerprint_of, Router>) {
      Fingerprint part;
      router_.fingerprint(part);
      print.append("router.", part);
    }
    if constexpr (detail::is_detected_v<detail::fingerprint_of, Expert>) {
      Fingerprint part;
      experts_.fingerprint(part);
      print.append("experts.", part);
    }
    check_fingerprints_agree<memory_space>(groups_.world, print, "kmoe::MoELayer",
                                           "every rank must build the same layer");
  }

  /// Compares the replicated parameters over the groups that hold replicas (see
  /// check_replicas); collective over the world (every rank enters every group's gather,
  /// each of size 1 skipping it).
  void compare_replicas(const char* where) {
    using Tensors = std::vector<ReplicatedTensor<typename Parameter<X, S>::flat_view>>;
    const auto tensors_of = [](const ParameterList<X, S>& list) {
      Tensors tensors;
      for (const auto& p : list) tensors.push_back({p.name, p.value});
      return tensors;
    };
    ParameterList<X, S> everywhere, expert;
    router_.collect_parameters(everywhere);
    if (shared_) shared_->collect_parameters(everywhere);
    experts_.collect_parameters(expert);
    const int rank = groups_.world.rank();
    check_replicas_agree<X>(groups_.world, where, "world", tensors_of(everywhere), rank);
    check_replicas_agree<X>(groups_.dp, where, "dp", tensors_of(expert), rank);
    // Parameters not split by tensor parallelism (an output bias): each TP rank holds all.
    if constexpr (detail::is_detected_v<detail::expert_unsplit_parameters, Expert>) {
      ParameterList<X, S> unsplit;
      experts_.collect_unsplit_parameters(unsplit);
      if (!unsplit.empty())
        check_replicas_agree<X>(groups_.tp, where, "tp", tensors_of(unsplit), rank);
    }
  }

  /// Timed runs only (LayerOptions::time_phases): synchronises the EP group before an
  /// exchange, so that the exchange phase holds the transfer alone and the wait for slower
  /// ranks (load imbalance) is reported apart.
  void wait_for_slowest_rank(detail::PhaseClock<X>& clock, PhaseTimes& phases) {
    if (!options_.time_phases || groups_.ep.size() == 1) return;
    clock.lap(phases.exchange);
    groups_.ep.any_error(false);
    clock.lap(phases.imbalance);
  }

  Router router_;
  Expert experts_;
  std::optional<Expert> shared_;
  Combiner combiner_;
  LayerOptions options_;
  ParallelGroups<Communicator> groups_;
  BalanceLoss<X, S> losses_;
  RoutingPlan<X, S> plan_;
  Dispatch<X> dispatch_;

  std::vector<std::int64_t> bias_counts_;
  // Placement and the exchange plan of the last forward.
  using Exchange = ExpertParallelExchange<X, S, Communicator>;
  Exchange exchange_;
  // The node map (null unless built) and the running total of the exchanges' traffic.
  std::shared_ptr<const NodeTopology<Communicator>> nodes_;
  std::shared_ptr<ExchangeTraffic> traffic_ = std::make_shared<ExchangeTraffic>();
  // Failover (LayerOptions::failover): the failed set, the EP rank of each world rank, the
  // last experts-phase time (microseconds, -1 when none) and the dead-expert flags.
  ExpertHealth health_;
  std::vector<int> ep_rank_of_world_;
  std::int64_t experts_us_ = -1;
  Vector<int, X> dead_flags_;
  // Replicated placement (LayerOptions::expert_placement): the physical routing table.
  ReplicaRouting<X, S> replicas_;
  RoutingPlan<X, S> physical_plan_;
  Matrix<int, X> physical_expert_;
  Segments<X> shared_segments_;

  // Saved for backward: x_, plan_, dispatch_, the exchange's expert inputs and expert outputs
  // per kept assignment (for the weight gradient), and what the experts keep.
  ConstMatrix<S, X> x_;
  bool training_ = false, has_forward_ = false, backward_done_ = false;
  // Cross-rank checks: this rank's call sequence, and whether a forward has compared the
  // replicas (the first one does).
  CallSequence calls_;
  bool replicas_compared_ = false;
  // Gradient sync in flight (overlap), and the first non-finite gradient backward found.
  GradientBuckets<X, accumulation_t<S>, Communicator> gradient_buckets_;
  std::exception_ptr non_finite_gradient_;
  // The training copy of x, and row-major copies of strided arguments.
  Matrix<S, X> saved_x_, x_rows_, y_rows_, grad_y_rows_, grad_x_rows_;
  Matrix<S, X> expert_y_, shared_y_;
  // Backward buffers.
  Matrix<S, X> grad_send_y_, grad_expert_x_, shared_grad_x_;
  Matrix<route_type, X> grad_weight_, grad_logits_;
  // The combine's weights under RoutingWeightPlacement::input (all 1).
  Matrix<route_type, X> unit_weight_;
};

namespace detail {
/// T in a context that takes no part in deduction (C++20's std::type_identity_t).
template <class T>
struct non_deduced {
  using type = T;
};
}  // namespace detail

/// \brief Deduces the Communicator from the groups, with the default Combiner, so that a
/// distributed layer needs no template arguments:
/// `kmoe::MoELayer layer(router, experts, options, shared_or_nullopt, groups);`
template <class Router, class Expert, class Communicator>
MoELayer(Router, Expert, const LayerOptions&,
         std::optional<typename detail::non_deduced<Expert>::type>, ParallelGroups<Communicator>)
    -> MoELayer<Router, Expert,
                WeightedSumCombiner<typename Router::execution_space, typename Router::scalar_type>,
                Communicator>;

}  // namespace kmoe
