// SPDX-License-Identifier: BSD-3-Clause
// What the expert-parallel dispatch puts on the wire: the layer runs over a communicator
// that records every hidden-state all-to-all-v it is asked to make, and the dispatch's
// send counts must equal the deduplicated minimum (one row per token and destination rank
// holding any of its kept experts), computed here by a plain loop over the routing. For a
// double layer and for a bf16 layer (whose header values take two elements each, and with
// more tokens than bf16 counts exactly), whose dispatch must also send fewer rows than the
// undeduplicated one (rows scaled per slot: one row per kept assignment).
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <catch2/catch_test_macros.hpp>

#include <memory>
#include <string>
#include <type_traits>
#include <vector>

using namespace kmoe;

namespace {

using X = Kokkos::DefaultHostExecutionSpace;

/// MpiCommunicator that logs the per-peer element counts of every all-to-all-v of S
/// (hidden-state rows) before making it. Copies and splits share the log.
template <class S>
class CountingCommunicator {
 public:
  using Request = MpiCommunicator::Request;
  using Log = std::vector<std::vector<std::int64_t>>;

  CountingCommunicator() = default;
  CountingCommunicator(MpiCommunicator inner, std::shared_ptr<Log> log)
      : inner_(std::move(inner)), log_(std::move(log)) {}

  int rank() const { return inner_.rank(); }
  int size() const { return inner_.size(); }
  std::vector<std::int64_t> exchange_counts(const std::vector<std::int64_t>& send) const {
    return inner_.exchange_counts(send);
  }
  template <class SendView, class RecvView>
  void all_to_all_v(const SendView& send, const std::vector<std::int64_t>& send_counts,
                    const RecvView& recv, const std::vector<std::int64_t>& recv_counts) const {
    record<SendView>(send_counts);
    inner_.all_to_all_v(send, send_counts, recv, recv_counts);
  }
  template <class SendView, class RecvView>
  Request all_to_all_v_start(const SendView& send, const std::vector<std::int64_t>& send_counts,
                             const RecvView& recv,
                             const std::vector<std::int64_t>& recv_counts) const {
    record<SendView>(send_counts);
    return inner_.all_to_all_v_start(send, send_counts, recv, recv_counts);
  }
  template <class View>
  void all_reduce_sum(const View& data) const {
    inner_.all_reduce_sum(data);
  }
  template <class View>
  void all_reduce_max(const View& data) const {
    inner_.all_reduce_max(data);
  }
  template <class SendView, class RecvView>
  void all_gather(const SendView& send, const RecvView& recv) const {
    inner_.all_gather(send, recv);
  }
  CountingCommunicator split(int color, int key) const { return {inner_.split(color, key), log_}; }
  bool any_error(bool local_error) const { return inner_.any_error(local_error); }

 private:
  template <class View>
  void record(const std::vector<std::int64_t>& counts) const {
    if (log_ && std::is_same_v<typename View::non_const_value_type, S>) log_->push_back(counts);
  }
  MpiCommunicator inner_;
  std::shared_ptr<Log> log_;
};

constexpr int hidden = 8, ffn = 12;

/// Elements of S a header value of the dispatch takes (a float's two halves in 16 bits).
template <class S>
constexpr std::int64_t header_value_elements() {
  return is_packed_float_v<S> ? 2 : 1;
}

template <class S>
void check_deduplicated_dispatch(int tokens) {
  using Router = SoftmaxTopKRouter<X, S>;
  using Experts = SwiGLUExperts<X, S>;
  using Comm = CountingCommunicator<S>;
  using Layer = MoELayer<Router, Experts, WeightedSumCombiner<X, S>, Comm>;
  static_assert(check_valid_communicator<Comm>());
  const auto world = MpiCommunicator::world();
  const int ranks = world.size();
  // k = ranks + 1 experts per token over `ranks` ranks: every token has two experts on some
  // rank, so sending one row per assignment would exceed the minimum.
  const int experts = 2 * ranks, top_k = ranks + 1;
  for (const auto placement : {Placement::block, Placement::round_robin}) {
    for (const double capacity_factor : {0.0, 0.5}) {
      DYNAMIC_SECTION("placement " << int(placement) << ", capacity factor " << capacity_factor) {
        auto log = std::make_shared<typename Comm::Log>();
        ParallelLayout layout;
        layout.ep = ranks;
        layout.placement = placement;
        const auto groups = ParallelGroups<Comm>::create(Comm(world, log), layout);
        const auto owned = layout.local_experts(experts, groups.ep_rank);
        LayerOptions options;
        options.capacity.factor = capacity_factor;
        Layer layer(Router({hidden, experts, top_k, true}),
                    Experts({int(owned.size()), hidden, ffn}), options, std::nullopt, groups);
        fill_normal(layer.parameters(), 0.5, 11);
        Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden);
        fill_normal(x, 1.0, 12 + world.rank());
        RouteContext<X> context;
        context.training = true;
        log->clear();
        const auto stats = layer.forward(x, y, context);

        // The minimum, from the routing by a plain loop.
        const auto expert =
            Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.routing().expert);
        const auto position =
            Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.positions());
        std::vector<int> owner(experts);
        std::vector<std::int64_t> experts_of(ranks, 0);
        for (int r = 0; r < ranks; ++r)
          for (int e : layout.local_experts(experts, r)) owner[e] = r, ++experts_of[r];
        std::vector<std::int64_t> minimum(ranks, 0), links(ranks, 0);
        std::int64_t kept = 0;
        for (int t = 0; t < tokens; ++t) {
          std::vector<bool> reaches(ranks, false);
          for (int s = 0; s < top_k; ++s)
            if (position(t, s) >= 0) {
              reaches[owner[expert(t, s)]] = true;
              ++links[owner[expert(t, s)]];
              ++kept;
            }
          for (int r = 0; r < ranks; ++r) minimum[r] += reaches[r];
        }
        std::int64_t minimum_total = 0;
        for (auto m : minimum) minimum_total += m;
        if (capacity_factor == 0.0) CHECK(minimum_total < kept);
        if (capacity_factor > 0.0) CHECK(stats.dropped > 0);

        // What went on the wire: the first hidden-state exchange of forward is the dispatch,
        // each peer's block the minimum rows after its header (one value per expert of the
        // peer, its count, and one per kept assignment sent there, its link; whole rows).
        REQUIRE(!log->empty());
        std::vector<std::int64_t> minimum_elements(minimum);
        for (int r = 0; r < ranks; ++r)
          minimum_elements[r] =
              (minimum[r] +
               ((experts_of[r] + links[r]) * header_value_elements<S>() + hidden - 1) / hidden) *
              hidden;
        CHECK(log->front() == minimum_elements);
        CHECK(stats.dispatch_rows == minimum);

        // The undeduplicated dispatch of the same routing (rows scaled per slot) sends one
        // row per kept assignment and no header: more elements than the deduplicated one.
        options.routing_weight = RoutingWeightPlacement::input;
        Layer undeduplicated(Router({hidden, experts, top_k, true}),
                             Experts({int(owned.size()), hidden, ffn}), options, std::nullopt,
                             groups);
        fill_normal(undeduplicated.parameters(), 0.5, 11);
        log->clear();
        const auto undeduplicated_stats = undeduplicated.forward(x, y, context);
        CHECK(undeduplicated_stats.dispatch_rows == links);
        REQUIRE(!log->empty());
        std::int64_t deduplicated_total = 0, undeduplicated_total = 0;
        for (int r = 0; r < ranks; ++r) {
          CHECK(log->front()[r] == links[r] * hidden);
          deduplicated_total += minimum_elements[r];
          undeduplicated_total += log->front()[r];
        }
        if (capacity_factor == 0.0) CHECK(deduplicated_total < undeduplicated_total);
      }
    }
  }
}

}  // namespace

TEST_CASE("the dispatch sends each token once per destination rank, the deduplicated minimum",
          "[mpi][dispatch]") {
  check_deduplicated_dispatch<double>(37);
}

TEST_CASE("a bf16 layer's dispatch is deduplicated, its header exact past 256 tokens",
          "[mpi][dispatch][precision]") {
  check_deduplicated_dispatch<bfloat16>(300);
}
