// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file exchange/expert_parallel_exchange.hpp
/// \brief kmoe::ExpertParallelExchange: the expert placement and the exchange plan of one
/// forward. It moves the dispatched rows to the EP ranks holding their experts, arranges
/// them into the experts' segments, takes the expert outputs back in the send order, and
/// does the same for the gradients in backward. On one EP rank every exchange and, without
/// padding, every arrangement is an alias (no copy).

#include <kmoe/communicator.hpp>
#include <kmoe/error.hpp>
#include <kmoe/exchange/deduplicated_dispatch.hpp>
#include <kmoe/exchange/dispatch.hpp>
#include <kmoe/exchange/hierarchical_exchange.hpp>
#include <kmoe/exchange/input_weighting.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/segments.hpp>
#include <kmoe/types.hpp>

#include <vector>

namespace kmoe {

namespace detail {
// Free functions, not private members: nvcc rejects an extended __host__ __device__
// lambda (KOKKOS_LAMBDA) whose enclosing function is private.

/// Row maps of the expert order, from blocks b = (source p, local expert j) of blocks(b, 2)
/// rows at row blocks(b, 0) of the receive order and blocks(b, 1) of the expert order: for
/// each expert row (-1 for padding) the receive-order row it holds and, when `link` is not
/// empty (deduplicated dispatch), the received row of its token, first(p) + link(receive row).
template <class X, class Blocks, class Map, class Link, class First>
void map_expert_rows(const Blocks& blocks, int local, const Map& receive_row, const Map& token_row,
                     const Link& link, const First& first) {
  using Team = typename Kokkos::TeamPolicy<X>::member_type;
  const bool deduplicated = link.extent(0) > 0;
  Kokkos::deep_copy(receive_row, -1);
  if (deduplicated) Kokkos::deep_copy(token_row, -1);
  Kokkos::parallel_for(
      "kmoe::MoELayer::map_expert_rows", Kokkos::TeamPolicy<X>(int(blocks.extent(0)), Kokkos::AUTO),
      KOKKOS_LAMBDA(const Team& team) {
        const int b = team.league_rank();
        const int recv_row = blocks(b, 0), expert_row = blocks(b, 1), rows = blocks(b, 2);
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, rows), [&](int i) {
          receive_row(expert_row + i) = recv_row + i;
          if (deduplicated) token_row(expert_row + i) = first(b / local) + link(recv_row + i);
        });
      });
}

/// out(r) = in(map(r)), zero where map(r) < 0. One team per row: its threads (CUDA) or
/// its vectorised loop (host) walk the contiguous row.
template <class X, class Map, class In, class Out>
void gather_mapped_rows(const Map& map, const In& in, const Out& out) {
  using Team = typename Kokkos::TeamPolicy<X>::member_type;
  using S = typename Out::non_const_value_type;
  const int width = int(out.extent(1));
  Kokkos::parallel_for(
      "kmoe::MoELayer::gather_mapped_rows", Kokkos::TeamPolicy<X>(int(out.extent(0)), Kokkos::AUTO),
      KOKKOS_LAMBDA(const Team& team) {
        const int r = team.league_rank(), from = map(r);
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, width),
                             [&](int h) { out(r, h) = from < 0 ? S(0) : in(from, h); });
      });
}

/// out(map(r)) = in(r) where map(r) >= 0 (the inverse of gather_mapped_rows).
template <class X, class Map, class In, class Out>
void scatter_mapped_rows(const Map& map, const In& in, const Out& out) {
  using Team = typename Kokkos::TeamPolicy<X>::member_type;
  const int width = int(in.extent(1));
  Kokkos::parallel_for(
      "kmoe::MoELayer::scatter_mapped_rows", Kokkos::TeamPolicy<X>(int(in.extent(0)), Kokkos::AUTO),
      KOKKOS_LAMBDA(const Team& team) {
        const int r = team.league_rank(), to = map(r);
        if (to < 0) return;
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, width),
                             [&](int h) { out(to, h) = in(r, h); });
      });
}

template <class X, class In, class Source, class Out>
void gather_rows(const In& x, const Source& source, int slots, const Out& send) {
  Kokkos::parallel_for(
      "kmoe::MoELayer::gather",
      Kokkos::MDRangePolicy<X, Kokkos::Rank<2>>({0, 0}, {std::int64_t(send.extent(0)),
                                                         std::int64_t(send.extent(1))}),
      KOKKOS_LAMBDA(std::int64_t r, std::int64_t h) { send(r, h) = x(source(r) / slots, h); });
}

template <class X, class Position, class M>
void scatter_add_rows(const Position& position, const M& rows, const M& grad_x) {
  using S = typename M::non_const_value_type;
  const int slots = int(position.extent(1));
  Kokkos::parallel_for(
      "kmoe::MoELayer::scatter_add",
      Kokkos::MDRangePolicy<X, Kokkos::Rank<2>>({0, 0}, {std::int64_t(grad_x.extent(0)),
                                                         std::int64_t(grad_x.extent(1))}),
      KOKKOS_LAMBDA(std::int64_t t, std::int64_t h) {
        S sum = 0;
        for (int s = 0; s < slots; ++s)
          if (position(t, s) >= 0) sum += rows(position(t, s), h);
        grad_x(t, h) = sum;
      });
}
}  // namespace detail

/// \brief The expert-parallel exchange of a layer: where each global expert lives and how
/// the rows of one forward travel to the experts and back.
///
/// Forward: plan() (the send rows), exchange_counts() (counts, links, expert segments),
/// dispatch_start() and its wait (the payload; the layer overlaps the shared experts with
/// it), arrive() (expert-ordered rows), combine() (expert outputs back in the send order).
/// Backward: to_experts() then arrive_gradient() (dL/d expert output in the expert order),
/// from_experts() (dL/dx per token). Kernel and buffer labels keep the layer's names.
template <class X, class S, class Communicator>
class ExpertParallelExchange {
 public:
  using Request = typename Communicator::Request;

  ExpertParallelExchange() = default;

  /// Placement of `experts` global experts over the EP group of `groups` (layout.placement);
  /// rows of `hidden` elements; expert segments padded to `alignment` rows. `deduplicate`
  /// false sends one row per kept assignment across EP ranks too (rows scaled per slot,
  /// RoutingWeightPlacement::input, differ between the slots of one token).
  /// Keys sort experts by (owner EP rank, local index): the send buffer is then grouped by
  /// destination rank and, within it, by the destination's local expert order.
  ExpertParallelExchange(const ParallelGroups<Communicator>& groups, int experts, int hidden,
                         int alignment, bool deduplicate = true)
      : ep_(groups.ep),
        ranks_(groups.layout.ep),
        hidden_(hidden),
        alignment_(alignment),
        deduplicate_(deduplicate) {
    const int ranks = ranks_;
    key_host_.assign(experts, -1);
    local_count_.assign(ranks, 0);
    int key = 0;
    for (int r = 0; r < ranks; ++r) {
      const auto owned = groups.layout.local_experts(experts, r);
      local_count_[r] = std::int64_t(owned.size());
      for (int e : owned) key_host_[e] = key++;
    }
    local_ = int(local_count_[groups.ep_rank]);
    expert_key_ = Vector<int, X>("kmoe::MoELayer::expert_key", experts);
    expert_rank_ = Vector<int, X>("kmoe::MoELayer::expert_rank", experts);
    auto key_mirror = Kokkos::create_mirror_view(expert_key_);
    auto rank_mirror = Kokkos::create_mirror_view(expert_rank_);
    for (int r = 0; r < ranks; ++r)
      for (int e : groups.layout.local_experts(experts, r)) rank_mirror(e) = r;
    for (int e = 0; e < experts; ++e) key_mirror(e) = key_host_[e];
    Kokkos::deep_copy(expert_key_, key_mirror);
    Kokkos::deep_copy(expert_rank_, rank_mirror);
  }

  /// Sends the rows over `route` (flat or hierarchical, exchange/hierarchical_exchange.hpp)
  /// instead of the EP communicator's own all-to-all-v.
  void set_route(ExchangeRoute<Communicator> route) { ep_ = std::move(route); }

  /// Sort key of each global expert (the Dispatch's keys), on the device and the host.
  const Vector<int, X>& expert_key() const { return expert_key_; }
  int key(int expert) const { return key_host_[expert]; }
  /// Whether the dispatch sends each token once per destination rank (EP > 1, unless built
  /// with deduplicate = false).
  bool deduplicated() const { return deduplicate_ && ranks_ > 1; }
  /// Hidden-state rows sent to each EP rank by the last exchange_counts() (one per token, or
  /// one per kept assignment without deduplication); empty on one EP rank.
  const std::vector<std::int64_t>& dispatch_rows() const {
    return across_ranks(deduplicated() ? deduplicated_.rows_per_rank : send_rows_);
  }
  /// Rows received from each EP rank by the last exchange_counts(): hidden states of the
  /// dispatch (one per token) and expert outputs the combine returns to each rank (one per
  /// assignment) and receives from it. Empty on one EP rank.
  const std::vector<std::int64_t>& dispatch_rows_received() const {
    return across_ranks(recv_token_rows_);
  }
  const std::vector<std::int64_t>& combine_rows_sent() const { return across_ranks(recv_rows_); }
  const std::vector<std::int64_t>& combine_rows_received() const {
    return across_ranks(send_rows_);
  }
  /// This rank's expert segments of the last forward (padded to the alignment).
  const Segments<X>& segments() const { return segments_; }
  /// The expert-ordered input rows of the last forward (kept for backward).
  const Matrix<S, X>& expert_x() const { return expert_x_; }
  /// The expert outputs of the last forward in the send order (one row per kept assignment).
  const Matrix<S, X>& send_y() const { return send_y_; }
  /// Bytes of the row buffers of both directions, each allocation once (on one EP rank
  /// some of them alias), leaving out the one at `counted_elsewhere` (the caller's expert
  /// outputs, which the combine's buffers alias on one EP rank).
  std::size_t buffer_bytes(const S* counted_elsewhere) const {
    std::vector<const Matrix<S, X>*> buffers = {&send_x_,        &recv_x_,      &expert_x_,
                                                &recv_y_,        &send_y_,      &grad_recv_y_,
                                                &grad_expert_y_, &grad_recv_x_, &grad_send_x_};
    std::size_t bytes = 0;
    for (std::size_t i = 0; i < buffers.size(); ++i) {
      bool seen = buffers[i]->data() == counted_elsewhere;
      for (std::size_t j = 0; j < i; ++j) seen = seen || buffers[j]->data() == buffers[i]->data();
      if (!seen) bytes += buffers[i]->span() * sizeof(S);
    }
    return bytes;
  }

  /// Plans the exchange of a forward from its dispatch and routing table (expert [T, S]),
  /// and gathers the rows to send from x: on one EP rank every kept assignment in key
  /// order; across ranks each token once per destination rank. A non-empty `input_weight`
  /// [T, S] (RoutingWeightPlacement::input, never deduplicated) scales each assignment's row
  /// by its slot's weight.
  template <class R>
  void plan(const Dispatch<X>& dispatch, const Matrix<int, X>& expert, const ConstMatrix<S, X>& x,
            const Matrix<R, X>& input_weight) {
    kept_per_key_ = dispatch.kept_per_key;
    position_ = dispatch.position;
    if (input_weight.extent(0) > 0) {
      require(!deduplicated(), "kmoe::ExpertParallelExchange::plan", "input_weight",
              "per-slot scaled rows", "need an exchange built with deduplicate = false");
      detail::ensure_extents(send_x_, "kmoe::MoELayer::send_x", dispatch.kept_total, hidden_);
      detail::gather_weighted_rows<X>(x, dispatch.source, input_weight, send_x_);
    } else if (deduplicated()) {
      deduplicated_.build(dispatch.position, expert, expert_rank_, ranks_, dispatch.kept_total);
      detail::ensure_extents(send_x_, "kmoe::MoELayer::send_x", deduplicated_.rows_total, hidden_);
      detail::gather_mapped_rows<X>(deduplicated_.token, x, send_x_);
    } else {
      detail::ensure_extents(send_x_, "kmoe::MoELayer::send_x", dispatch.kept_total, hidden_);
      detail::gather_rows<X>(x, dispatch.source, int(expert.extent(1)), send_x_);
    }
  }
  /// plan() of unweighted rows.
  void plan(const Dispatch<X>& dispatch, const Matrix<int, X>& expert, const ConstMatrix<S, X>& x) {
    plan(dispatch, expert, x, Matrix<routing_t<S>, X>());
  }

  /// Per-peer counts of the dispatch exchange: each destination gets its local experts'
  /// assignment counts (which lay out its expert segments) and, last, the number of rows
  /// sent to it. Builds the expert segments, padded to the capacity alignment; when the
  /// dispatch is deduplicated, also sends each assignment's link (the row of its token in
  /// the block sent to its rank) so that the receiver can expand the rows.
  void exchange_counts() {
    const bool deduplicate = deduplicated();
    const int ranks = ranks_;
    const int local = local_;
    const int per_peer = local + 1;
    const int experts = int(key_host_.size());
    send_rows_.assign(ranks, 0);
    std::vector<std::int64_t> send_counts(ranks), recv_counts(ranks, per_peer);
    detail::ensure_extents(count_send_, "kmoe::MoELayer::count_send", std::size_t(experts + ranks));
    detail::ensure_extents(count_recv_, "kmoe::MoELayer::count_recv",
                           std::size_t(ranks) * per_peer);
    auto send_host = Kokkos::create_mirror_view(count_send_);
    for (int r = 0, key = 0, at = 0; r < ranks; ++r) {
      send_counts[r] = local_count_[r] + 1;
      for (int j = 0; j < local_count_[r]; ++j, ++key) {
        send_rows_[r] += kept_per_key_[key];
        send_host(at++) = kept_per_key_[key];
      }
      send_host(at++) = deduplicate ? deduplicated_.rows_per_rank[r] : send_rows_[r];
    }
    Kokkos::deep_copy(count_send_, send_host);
    ep_.all_to_all_v(count_send_, send_counts, count_recv_, recv_counts);
    auto recv_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), count_recv_);
    const auto received = [&](int p, int j) { return recv_host(p * per_peer + j); };

    // Blocks (source p, local expert j): rows recv_offset in the receive buffer, moved to
    // expert_offset in the expert buffer, where expert j's segment is padded to alignment.
    const int alignment = alignment_;
    recv_rows_.assign(ranks, 0);
    segments_.offsets_host =
        Kokkos::View<int*, Kokkos::HostSpace>("kmoe::MoELayer::segments", local + 1);
    auto blocks = Kokkos::View<int**, Kokkos::LayoutRight, Kokkos::HostSpace>(
        "kmoe::MoELayer::blocks", std::size_t(ranks) * local, 3);
    std::vector<std::int64_t> recv_begin(ranks + 1, 0);
    recv_token_rows_.assign(ranks, 0);
    detail::ensure_extents(token_first_, "kmoe::MoELayer::token_first", std::size_t(ranks));
    auto token_first = Kokkos::create_mirror_view(token_first_);
    for (int p = 0, first = 0; p < ranks; ++p) {
      for (int j = 0; j < local; ++j) recv_rows_[p] += received(p, j);
      recv_begin[p + 1] = recv_begin[p] + recv_rows_[p];
      recv_token_rows_[p] = received(p, local);
      token_first(p) = first;
      first += int(recv_token_rows_[p]);
    }
    int expert_row = 0;
    for (int j = 0; j < local; ++j) {
      segments_.offsets_host(j) = expert_row;
      for (int p = 0; p < ranks; ++p) {
        std::int64_t before = 0;
        for (int i = 0; i < j; ++i) before += received(p, i);
        const int b = p * local + j;
        blocks(b, 0) = int(recv_begin[p] + before);
        blocks(b, 1) = expert_row;
        blocks(b, 2) = int(received(p, j));
        expert_row += blocks(b, 2);
      }
      expert_row = (expert_row + alignment - 1) / alignment * alignment;
    }
    segments_.offsets_host(local) = expert_row;
    segments_.sync_from_host();
    identity_arrangement_ = ranks == 1 && alignment == 1;
    recv_total_ = recv_begin[ranks];
    detail::ensure_extents(recv_link_, "kmoe::MoELayer::recv_link",
                           deduplicate ? std::size_t(recv_total_) : 0);
    if (deduplicate) {
      Kokkos::deep_copy(token_first_, token_first);
      ep_.all_to_all_v(deduplicated_.link, send_rows_, recv_link_, recv_rows_);
    }
    if (identity_arrangement_) return;
    detail::ensure_extents(blocks_, "kmoe::MoELayer::blocks", std::size_t(ranks) * local, 3);
    Kokkos::deep_copy(blocks_, blocks);
    detail::ensure_extents(expert_receive_row_, "kmoe::MoELayer::expert_receive_row",
                           std::size_t(expert_row));
    detail::ensure_extents(expert_token_row_, "kmoe::MoELayer::expert_token_row",
                           deduplicate ? std::size_t(expert_row) : 0);
    detail::map_expert_rows<X>(blocks_, local, expert_receive_row_, expert_token_row_, recv_link_,
                               token_first_);
  }

  /// Starts the payload exchange of the planned rows (after exchange_counts); the caller
  /// waits on the request (and may compute meanwhile) before arrive().
  Request dispatch_start() {
    if (!deduplicated())
      return start_exchange(send_x_, send_rows_, recv_x_, recv_rows_, "kmoe::MoELayer::recv_x");
    // A token's rows for several ranks of one node cross nodes once (hierarchical route).
    if (receive_in_place(send_x_, recv_x_, recv_token_rows_, "kmoe::MoELayer::recv_x")) return {};
    return ep_.all_to_all_rows_start(flat(send_x_), elements(deduplicated_.rows_per_rank),
                                     flat(recv_x_), elements(recv_token_rows_), hidden_,
                                     deduplicated_.token);
  }

  /// The received rows in the expert order (segments()), after the dispatch's wait.
  const Matrix<S, X>& arrive() {
    if (deduplicated())
      expand_to_experts(recv_x_, expert_x_);
    else
      arrange_to_experts(recv_x_, expert_x_, "kmoe::MoELayer::expert_x");
    return expert_x_;
  }

  /// Expert outputs (expert order) back to the ranks that sent the rows, in the send order
  /// (one row per kept assignment, Dispatch row order). `before_exchange` runs between the
  /// arrangement and the transfer (the layer's timing of the wait for the slowest rank).
  template <class BeforeExchange>
  const Matrix<S, X>& combine(const Matrix<S, X>& expert_y, BeforeExchange&& before_exchange) {
    arrange_from_experts(expert_y, recv_y_, "kmoe::MoELayer::recv_y");
    before_exchange();
    exchange(recv_y_, recv_rows_, send_y_, send_rows_, "kmoe::MoELayer::send_y");
    return send_y_;
  }
  const Matrix<S, X>& combine(const Matrix<S, X>& expert_y) {
    return combine(expert_y, [] {});
  }

  /// Backward of combine, its transfer: dL/d(send_y) to the expert ranks.
  void to_experts(const Matrix<S, X>& grad_send_y) {
    exchange(grad_send_y, send_rows_, grad_recv_y_, recv_rows_, "kmoe::MoELayer::grad_recv_y");
  }
  /// Backward of combine, its arrangement: dL/d(expert_y) in the expert order.
  const Matrix<S, X>& arrive_gradient() {
    arrange_to_experts(grad_recv_y_, grad_expert_y_, "kmoe::MoELayer::grad_expert_y");
    return grad_expert_y_;
  }
  /// Backward of dispatch: dL/d(expert_x) back to the tokens; grad_x(t) = the sum over
  /// t's kept slots, in slot order, of the returned rows.
  void from_experts(const Matrix<S, X>& grad_expert_x, const Matrix<S, X>& grad_x) {
    arrange_from_experts(grad_expert_x, grad_recv_x_, "kmoe::MoELayer::grad_recv_x");
    exchange(grad_recv_x_, recv_rows_, grad_send_x_, send_rows_, "kmoe::MoELayer::grad_send_x");
    detail::scatter_add_rows<X>(position_, grad_send_x_, grad_x);
  }
  /// from_experts for rows that were scaled by `input_weight` in plan(): grad_x(t) = the sum
  /// over t's kept slots, in slot order, of w(t, s) times the returned row, and
  /// grad_weight(t, s) = <returned row, x(t)> (overwritten; 0 for empty or dropped slots).
  template <class R>
  void from_experts(const Matrix<S, X>& grad_expert_x, const Matrix<S, X>& grad_x,
                    const ConstMatrix<S, X>& x, const Matrix<R, X>& input_weight,
                    const Matrix<R, X>& grad_weight) {
    arrange_from_experts(grad_expert_x, grad_recv_x_, "kmoe::MoELayer::grad_recv_x");
    exchange(grad_recv_x_, recv_rows_, grad_send_x_, send_rows_, "kmoe::MoELayer::grad_send_x");
    detail::scatter_add_weighted_rows<X>(position_, input_weight, grad_send_x_, x, grad_x,
                                         grad_weight);
  }

 private:
  using FlatView =
      Kokkos::View<S*, typename X::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;

  template <class View>
  static FlatView flat(const View& v) {
    return FlatView(v.data(), v.size());
  }

  /// Starts sending rows per peer and receiving rows per peer (EP group); on one EP rank
  /// the receive buffer is the send buffer itself.
  Request start_exchange(const Matrix<S, X>& send, const std::vector<std::int64_t>& send_rows,
                         Matrix<S, X>& recv, const std::vector<std::int64_t>& recv_rows,
                         const char* label) {
    if (receive_in_place(send, recv, recv_rows, label)) return {};
    return ep_.all_to_all_v_start(flat(send), elements(send_rows), flat(recv), elements(recv_rows));
  }

  /// start_exchange and wait, through the communicator's blocking form (nothing to overlap,
  /// so no request to keep).
  void exchange(const Matrix<S, X>& send, const std::vector<std::int64_t>& send_rows,
                Matrix<S, X>& recv, const std::vector<std::int64_t>& recv_rows, const char* label) {
    if (receive_in_place(send, recv, recv_rows, label)) return;
    ep_.all_to_all_v(flat(send), elements(send_rows), flat(recv), elements(recv_rows));
  }

  /// Sizes the receive buffer; on one EP rank aliases it to the send buffer and returns true.
  bool receive_in_place(const Matrix<S, X>& send, Matrix<S, X>& recv,
                        const std::vector<std::int64_t>& recv_rows, const char* label) const {
    if (ranks_ == 1) {
      recv = send;
      return true;
    }
    std::int64_t total = 0;
    for (auto r : recv_rows) total += r;
    detail::ensure_extents(recv, label, std::size_t(total), std::size_t(hidden_));
    return false;
  }

  std::vector<std::int64_t> elements(const std::vector<std::int64_t>& rows) const {
    std::vector<std::int64_t> counts(rows);
    for (auto& c : counts) c *= hidden_;
    return counts;
  }

  /// Receive order (source rank, local expert, token) -> expert order (local expert, source
  /// rank, token) with zero padding rows; the identity on one rank without padding.
  void arrange_to_experts(const Matrix<S, X>& in, Matrix<S, X>& out, const char* label) {
    if (identity_arrangement_) {
      out = in;
      return;
    }
    detail::ensure_extents(out, label, std::size_t(segments_.rows()), std::size_t(hidden_));
    detail::gather_mapped_rows<X>(expert_receive_row_, in, out);
  }

  /// Deduplicated receive rows -> expert order (local expert, source rank, token), each
  /// assignment taking its token's row, with zero padding rows.
  void expand_to_experts(const Matrix<S, X>& in, Matrix<S, X>& out) {
    detail::ensure_extents(out, "kmoe::MoELayer::expert_x", std::size_t(segments_.rows()),
                           std::size_t(hidden_));
    detail::gather_mapped_rows<X>(expert_token_row_, in, out);
  }

  /// Inverse of arrange_to_experts (padding rows are dropped).
  void arrange_from_experts(const Matrix<S, X>& in, Matrix<S, X>& out, const char* label) {
    if (identity_arrangement_) {
      out = in;
      return;
    }
    detail::ensure_extents(out, label, std::size_t(recv_total_), std::size_t(hidden_));
    detail::scatter_mapped_rows<X>(expert_receive_row_, in, out);
  }

  /// Per-peer row counts are reported only across ranks (one EP rank exchanges nothing).
  const std::vector<std::int64_t>& across_ranks(const std::vector<std::int64_t>& rows) const {
    static const std::vector<std::int64_t> none;
    return ranks_ > 1 ? rows : none;
  }

  ExchangeRoute<Communicator> ep_;  ///< the EP group's all-to-all-v, flat unless set_route()
  int ranks_ = 1, local_ = 0, hidden_ = 0, alignment_ = 1;
  bool deduplicate_ = true;

  // Placement: sort key of each global expert, experts per EP rank.
  std::vector<int> key_host_;
  std::vector<std::int64_t> local_count_;
  Vector<int, X> expert_key_;
  Vector<int, X> expert_rank_;  ///< EP rank owning each global expert

  // The dispatch of the last forward: kept assignments per key, row of each (token, slot).
  std::vector<std::int64_t> kept_per_key_;
  Matrix<int, X> position_;

  // Exchange layout of the last forward.
  std::vector<std::int64_t> send_rows_, recv_rows_;
  std::int64_t recv_total_ = 0;
  Vector<std::int64_t, X> count_send_, count_recv_;
  Kokkos::View<int**, Kokkos::LayoutRight, typename X::memory_space> blocks_;
  // Deduplicated dispatch (EP > 1): this rank's send rows and links, the rows received from
  // each peer, where each peer's rows start, and the received links.
  DeduplicatedDispatch<X> deduplicated_;
  std::vector<std::int64_t> recv_token_rows_;
  Vector<int, X> token_first_, recv_link_;
  // For each row of the expert order (-1: padding): its row in the receive order and, when
  // deduplicated, its token's row among the received rows.
  Vector<int, X> expert_receive_row_, expert_token_row_;
  bool identity_arrangement_ = true;
  Segments<X> segments_;

  // Forward rows (expert_x_ and send_y_ are kept for backward) and backward rows; on one
  // rank without padding the exchange/arrange steps alias them.
  Matrix<S, X> send_x_, recv_x_, expert_x_, recv_y_, send_y_;
  Matrix<S, X> grad_recv_y_, grad_expert_y_, grad_recv_x_, grad_send_x_;
};

}  // namespace kmoe
