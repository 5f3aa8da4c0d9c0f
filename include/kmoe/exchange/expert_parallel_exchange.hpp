// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file exchange/expert_parallel_exchange.hpp
/// \brief kmoe::ExpertParallelExchange: the expert placement and the exchange plan of one
/// forward. It moves the dispatched rows to the EP ranks holding their experts, arranges
/// them into the experts' segments, takes the expert outputs back in the send order, and
/// does the same for the gradients in backward. On one EP rank every exchange and, without
/// padding, every arrangement is an alias (no copy).

#include <kmoe/communicator.hpp>
#include <kmoe/detail/growing_buffer.hpp>
#include <kmoe/error.hpp>
#include <kmoe/exchange/compressed_payload.hpp>
#include <kmoe/exchange/deduplicated_dispatch.hpp>
#include <kmoe/exchange/dispatch.hpp>
#include <kmoe/exchange/hierarchical_exchange.hpp>
#include <kmoe/exchange/input_weighting.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/segments.hpp>
#include <kmoe/types.hpp>

#include <algorithm>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace kmoe {

namespace detail {
// Free functions, not private members: nvcc rejects an extended __host__ __device__
// lambda (KOKKOS_LAMBDA) whose enclosing function is private.

/// What the deduplicated dispatch's header values (counts and links, integers) are written
/// as in a payload of S: values of S, exact to 2^digits (float 2^24); for 16-bit S, which
/// holds integers exactly only to 256 (bf16) or 2048 (fp16), a float's bits in two
/// elements of S (compressed_payload.hpp's exact pieces), which MPI and NCCL move as they are.
template <class S>
using header_value_t = std::conditional_t<is_packed_float_v<S>, float, S>;
/// Elements of S one header value takes.
template <class S>
inline constexpr int header_elements_v = int(sizeof(header_value_t<S>) / sizeof(S));

/// Header value `index` of the header that starts at element `header` of `payload` = value.
template <class Flat>
KOKKOS_INLINE_FUNCTION void store_header_value(const Flat& payload, std::int64_t header,
                                               std::int64_t index, std::int64_t value) {
  using S = typename Flat::non_const_value_type;
  if constexpr (is_packed_float_v<S>)
    store_exact_pieces<S>(float(value), payload, header + index * header_elements_v<S>);
  else
    payload(header + index) = S(value);
}
/// The value store_header_value wrote.
template <class Flat>
KOKKOS_INLINE_FUNCTION std::int64_t load_header_value(const Flat& payload, std::int64_t header,
                                                      std::int64_t index) {
  using S = typename Flat::non_const_value_type;
  if constexpr (is_packed_float_v<S>)
    return std::int64_t(load_exact_pieces<float>(payload, header + index * header_elements_v<S>));
  else
    return std::int64_t(payload(header + index));
}

/// Row maps of the expert order, from blocks b = (source p, local expert j) of blocks(b, 2)
/// rows at row blocks(b, 1) of the expert order: for each expert row (-1 for padding) its
/// row in the receive order (source, local expert, token), blocks(b, 0), and, when
/// `return_row` is not empty (pipelined exchange), in the chunk-major return order,
/// blocks(b, 3).
template <class X, class Blocks, class Map>
void map_expert_rows(const Blocks& blocks, const Map& receive_row, const Map& return_row) {
  using Team = typename Kokkos::TeamPolicy<X>::member_type;
  const bool chunked = return_row.extent(0) > 0;
  Kokkos::deep_copy(receive_row, -1);
  if (chunked) Kokkos::deep_copy(return_row, -1);
  Kokkos::parallel_for(
      "kmoe::MoELayer::map_expert_rows", Kokkos::TeamPolicy<X>(int(blocks.extent(0)), Kokkos::AUTO),
      KOKKOS_LAMBDA(const Team& team) {
        const int b = team.league_rank();
        const int recv_row = blocks(b, 0), expert_row = blocks(b, 1), rows = blocks(b, 2);
        const int ret_row = blocks(b, 3);
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, rows), [&](int i) {
          receive_row(expert_row + i) = recv_row + i;
          if (chunked) return_row(expert_row + i) = ret_row + i;
        });
      });
}

/// Deduplicated dispatch: the received row of each expert row's token (-1 for padding).
/// Source p's links arrived as values in the header of its first block, `received` flat
/// from element header_at(p); the link of block b = (p, j)'s row i is header element
/// blocks(b, 4) + i, a token row of p's block, which is chunk c's row link - first(p, c)
/// at received row token_at(p, c) + link - first(p, c).
template <class X, class Blocks, class Map, class Flat, class At, class Table>
void map_expert_tokens(const Blocks& blocks, int local, const Map& token_row, const Flat& received,
                       const At& header_at, const Table& first, const Table& token_at) {
  using Team = typename Kokkos::TeamPolicy<X>::member_type;
  const int chunks = int(token_at.extent(1));
  Kokkos::deep_copy(token_row, -1);
  Kokkos::parallel_for(
      "kmoe::MoELayer::map_expert_tokens",
      Kokkos::TeamPolicy<X>(int(blocks.extent(0)), Kokkos::AUTO), KOKKOS_LAMBDA(const Team& team) {
        const int b = team.league_rank(), p = b / local;
        const int expert_row = blocks(b, 1), rows = blocks(b, 2), link_at = blocks(b, 4);
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, rows), [&](int i) {
          const int link = int(load_header_value(received, header_at(p), link_at + i));
          int c = 0;
          while (c + 1 < chunks && link >= first(p, c + 1)) ++c;
          token_row(expert_row + i) = token_at(p, c) + link - first(p, c);
        });
      });
}

/// The last b in [0, n) with begin(b) <= value (begin ascending, begin(0) <= value).
template <class Begin, class I>
KOKKOS_INLINE_FUNCTION int block_containing(const Begin& begin, int n, I value) {
  int lo = 0, hi = n;  // invariant: begin(lo) <= value, answer in [lo, hi)
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (begin(mid) <= value)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

/// Deduplicated send rows into the exchange buffer: dispatch row i, of block b (rank, chunk)
/// whose rows start at begin(b), holds x's row token(i) and goes to row at(b) + i - begin(b).
template <class X, class In, class Token, class Begin, class Out>
void pack_token_rows(const In& x, const Token& token, const Begin& begin, const Begin& at,
                     const Out& send) {
  using Team = typename Kokkos::TeamPolicy<X>::member_type;
  const int width = int(send.extent(1)), blocks = int(at.extent(0));
  Kokkos::parallel_for(
      "kmoe::MoELayer::pack_token_rows", Kokkos::TeamPolicy<X>(int(token.extent(0)), Kokkos::AUTO),
      KOKKOS_LAMBDA(const Team& team) {
        const int i = team.league_rank();
        const int b = block_containing(begin, blocks, i);
        const int to = at(b) + i - begin(b), from = token(i);
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, width),
                             [&](int h) { send(to, h) = x(from, h); });
      });
}

/// Rank r's header, flat from element header_at(r): the kept assignments of each of r's
/// experts (keys from key_begin(r); Dispatch kept_per_key), then each kept assignment's
/// link (Dispatch key order; r's assignments from assignment_begin(r)), as header values
/// (store_header_value).
template <class X, class Kept, class Link, class Begin, class Flat>
void pack_header(const Kept& kept, const Link& link, const Begin& key_begin,
                 const Begin& assignment_begin, const Begin& header_at, const Flat& send) {
  const int ranks = int(header_at.extent(0));
  Kokkos::parallel_for(
      "kmoe::MoELayer::pack_counts", Kokkos::RangePolicy<X>(0, kept.extent(0)),
      KOKKOS_LAMBDA(int key) {
        const int r = block_containing(key_begin, ranks, key);
        store_header_value(send, header_at(r), key - key_begin(r), kept(key));
      });
  Kokkos::parallel_for(
      "kmoe::MoELayer::pack_links", Kokkos::RangePolicy<X>(0, link.extent(0)),
      KOKKOS_LAMBDA(int a) {
        const int r = block_containing(assignment_begin, ranks, a);
        const auto experts = key_begin(r + 1) - key_begin(r);
        store_header_value(send, header_at(r), experts + a - assignment_begin(r), link(a));
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
/// Forward: plan() (the send rows), exchange_counts() (counts; expert segments),
/// dispatch_start() and its wait (the payload; the layer overlaps the shared experts with
/// it), arrive() (expert-ordered rows), combine() (expert outputs back in the send order).
/// Pipelined forward (set_chunks(C > 1), deduplicated only): dispatch_chunk_start(c) for
/// every chunk, then per chunk arrive_chunk(c), the experts of chunk_segments(c), and
/// return_chunk_start(c); return_chunk_finish(c) after each return's wait.
/// Backward: to_experts() then arrive_gradient() (dL/d expert output in the expert order),
/// from_experts() (dL/dx per token). Pipelined backward (after a pipelined forward):
/// to_experts_chunk_start(c) for every chunk, then per chunk arrive_gradient_chunk(c), the
/// experts' backward of chunk_segments(c), from_experts_chunk_start(c);
/// from_experts_chunk_finish(c) after each wait, then sum_returned_gradients(). Kernel and
/// buffer labels keep the layer's names.
///
/// A forward makes two collectives before the return: the counts (one all-to-all of a few
/// integers per peer) and the payload, whose block for each peer starts with the links of
/// a deduplicated dispatch (one value per assignment, in whole rows: the "header";
/// detail::header_value_t), so the
/// receiver never waits for a separate link exchange. Buffers are kept across steps and
/// grow only (no allocation per step once the largest step has run).
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
    set_chunks(1);
  }

  /// Sends the rows over `route` (flat or hierarchical, exchange/hierarchical_exchange.hpp)
  /// instead of the EP communicator's own all-to-all-v.
  /// instead of the EP communicator's own all-to-all-v. The hierarchical route exchanges
  /// unchunked (set_chunks(C) keeps chunks() at 1) and sends the counts in their own
  /// all-to-all (its receivers must know what the relays forward).
  void set_route(ExchangeRoute<Communicator> route) {
    ep_ = std::move(route);
    if (ep_.hierarchical()) set_chunks(1);
  }

  /// Sends the hidden-state rows of every exchange across EP ranks in 16 bits from the next
  /// plan() on (exchange/compressed_payload.hpp): the dispatch's rows and the return's,
  /// and both backward exchanges; the dispatch's header (counts, links) stays exact. Every
  /// row, this rank's own block included, is rounded once on its way; one EP rank
  /// exchanges nothing and rounds nothing.
  void set_compression(WireCompression format) { compression_ = Payload(format); }
  WireCompression compression() const { return compression_.format(); }
  /// Finite values the 16-bit rows could not hold (float16 beyond 65504: they travelled
  /// as infinities) since the last call.
  std::int64_t take_wire_overflows() { return compression_.take_overflows(); }

  /// Sort key of each global expert (the Dispatch's keys), on the device and the host.
  const Vector<int, X>& expert_key() const { return expert_key_; }
  int key(int expert) const { return key_host_[expert]; }
  /// Whether the dispatch sends each token once per destination rank (EP > 1, unless built
  /// with deduplicate = false).
  bool deduplicated() const { return deduplicate_ && ranks_ > 1; }

  /// Chunks of the pipelined forward from the next plan() on: each EP rank's local experts
  /// split into `chunks` consecutive groups (some empty when a rank has fewer experts),
  /// chunk c carrying the rows of group c of every rank. Every rank must use the same
  /// number (it sets the number of collectives). Only a deduplicated exchange over the
  /// flat route pipelines: elsewhere chunks() stays 1.
  void set_chunks(int chunks) {
    require(chunks >= 1, "kmoe::ExpertParallelExchange::set_chunks", "chunks", chunks,
            "must be >= 1");
    // The hierarchical route's start is blocking (its second level needs the first), so
    // chunks could not overlap there: it exchanges unchunked.
    chunks_ = deduplicated() && !ep_.hierarchical() ? chunks : 1;
    const int experts = int(key_host_.size());
    auto chunk_mirror = Kokkos::create_mirror_view(
        Kokkos::HostSpace(),
        detail::ensure_view(expert_chunk_, "kmoe::MoELayer::expert_chunk", std::size_t(experts)));
    std::vector<int> chunk_of_key;
    for (int r = 0; r < ranks_; ++r)
      for (int j = 0; j < local_count_[r]; ++j) chunk_of_key.push_back(chunk_of(r, j));
    for (int e = 0; e < experts; ++e)
      chunk_mirror(e) = key_host_[e] < 0 ? 0 : chunk_of_key[key_host_[e]];
    Kokkos::deep_copy(expert_chunk_, chunk_mirror);
  }
  int chunks() const { return chunks_; }
  /// The fewest experts any EP rank holds (the most chunks that leave none empty).
  int fewest_local_experts() const {
    return local_count_.empty() ? 0
                                : int(*std::min_element(local_count_.begin(), local_count_.end()));
  }

  /// Hidden-state rows sent to each EP rank by the last exchange_counts() (one per token, or
  /// one per kept assignment without deduplication; the links' header rows not included);
  /// empty on one EP rank.
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
  /// Rows of the links' header in the dispatch payload to each EP rank (the links of a
  /// deduplicated dispatch, one value per assignment, rounded up to whole rows); empty on
  /// one EP rank or without deduplication.
  const std::vector<std::int64_t>& header_rows() const {
    static const std::vector<std::int64_t> none;
    return deduplicated() ? header_send_ : none;
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
    std::vector<const Matrix<S, X>*> buffers = {&send_x_,        &recv_x_,         &expert_x_,
                                                &recv_y_,        &send_y_,         &grad_recv_y_,
                                                &grad_expert_y_, &grad_recv_x_,    &grad_send_x_,
                                                &grad_staged_y_, &grad_returned_x_};
    std::size_t bytes = 0;
    for (std::size_t i = 0; i < buffers.size(); ++i) {
      bool seen = buffers[i]->data() == counted_elsewhere;
      for (std::size_t j = 0; j < i; ++j) seen = seen || buffers[j]->data() == buffers[i]->data();
      if (!seen) bytes += buffers[i]->span() * sizeof(S);
    }
    return bytes + compression_.buffer_bytes();
  }

  /// Plans the exchange of a forward from its dispatch and routing table (expert [T, S]),
  /// and gathers the rows to send from x: on one EP rank every kept assignment in key
  /// order; across ranks each token once per destination rank, after the links' header.
  /// A non-empty `input_weight` [T, S] (RoutingWeightPlacement::input, never deduplicated)
  /// scales each assignment's row by its slot's weight.
  template <class R>
  void plan(const Dispatch<X>& dispatch, const Matrix<int, X>& expert, const ConstMatrix<S, X>& x,
            const Matrix<R, X>& input_weight) {
    kept_per_key_ = dispatch.kept_per_key;
    position_ = dispatch.position;
    plan_send_layout();
    if (input_weight.extent(0) > 0) {
      require(!deduplicated(), "kmoe::ExpertParallelExchange::plan", "input_weight",
              "per-slot scaled rows", "need an exchange built with deduplicate = false");
      detail::ensure_rows(send_x_, send_x_buffer_, "kmoe::MoELayer::send_x", dispatch.kept_total,
                          hidden_);
      detail::gather_weighted_rows<X>(x, dispatch.source, input_weight, send_x_);
    } else if (deduplicated()) {
      // Links travel as header values: every row index of a rank's tokens must be exact.
      constexpr int digits = std::numeric_limits<detail::header_value_t<S>>::digits;
      require(digits >= 31 || x.extent(0) < (std::size_t(1) << digits),
              "kmoe::ExpertParallelExchange::plan", "tokens", x.extent(0),
              "must be below 2^" + std::to_string(digits) +
                  " under expert parallelism (the dispatch's links travel as exact values of "
                  "the scalar type, float for 16-bit storage)");
      deduplicated_.build(dispatch.position, expert, expert_rank_, ranks_, dispatch.kept_total,
                          expert_chunk_, chunks_);
      pack_deduplicated(x);
    } else {
      detail::ensure_rows(send_x_, send_x_buffer_, "kmoe::MoELayer::send_x", dispatch.kept_total,
                          hidden_);
      detail::gather_rows<X>(x, dispatch.source, int(expert.extent(1)), send_x_);
    }
  }
  /// plan() of unweighted rows.
  void plan(const Dispatch<X>& dispatch, const Matrix<int, X>& expert, const ConstMatrix<S, X>& x) {
    plan(dispatch, expert, x, Matrix<routing_t<S>, X>());
  }

  /// Per-peer counts of the dispatch exchange, in one all-to-all: each destination gets its
  /// local experts' assignment counts (which lay out its expert segments) and, last, the
  /// number of rows sent to it in each chunk. Builds the expert segments, padded to the
  /// capacity alignment, and the receive layout (the links themselves arrive with the
  /// payload).
  void exchange_counts() {
    const bool deduplicate = deduplicated();
    const int ranks = ranks_, local = local_, chunks = chunks_;
    const int per_peer = local + chunks;
    const int experts = int(key_host_.size());
    count_send_counts_.assign(ranks, 0);
    count_recv_counts_.assign(ranks, per_peer);
    detail::ensure_extents(count_send_, "kmoe::MoELayer::count_send",
                           std::size_t(experts + ranks * chunks));
    detail::ensure_extents(count_recv_, "kmoe::MoELayer::count_recv",
                           std::size_t(ranks) * per_peer);
    auto send_host = detail::ensure_view(count_send_host_, "kmoe::MoELayer::count_send_host",
                                         std::size_t(experts + ranks * chunks));
    for (int r = 0, key = 0, at = 0; r < ranks; ++r) {
      count_send_counts_[r] = local_count_[r] + chunks;
      for (int j = 0; j < local_count_[r]; ++j, ++key) send_host(at++) = kept_per_key_[key];
      for (int c = 0; c < chunks; ++c)
        send_host(at++) = deduplicate ? deduplicated_.rows_per_chunk[r * chunks + c]
                                      : (c == 0 ? send_rows_[r] : 0);
    }
    auto recv_host = detail::ensure_view(count_recv_host_, "kmoe::MoELayer::count_recv_host",
                                         std::size_t(ranks) * per_peer);
    payload_arrived_ = false;
    if constexpr (detail::is_detected_v<detail::comm_sized_exchange, Communicator>) {
      if (deduplicate && chunks == 1 && !ep_.hierarchical()) {
        receive_sized_by_sender(recv_host);
        payload_arrived_ = true;
      }
    }
    if (!payload_arrived_) {
      Kokkos::deep_copy(count_send_, send_host);
      if (ranks > 1)
        ep_.all_to_all_v(count_send_, count_send_counts_, count_recv_, count_recv_counts_);
      else
        Kokkos::deep_copy(count_recv_, count_send_);
      Kokkos::deep_copy(recv_host, count_recv_);
    }
    const auto received = [&](int p, int j) { return recv_host(p * per_peer + j); };

    // Receive layout, chunk-major: chunk c holds, per source p, the links' header (chunk 0
    // of a deduplicated dispatch) and p's token rows of chunk c.
    recv_rows_.assign(ranks, 0);
    recv_token_rows_.assign(ranks, 0);
    header_recv_.assign(ranks, 0);
    recv_block_rows_.assign(std::size_t(chunks) * ranks, 0);
    auto first = detail::ensure_view(token_first_host_, "kmoe::MoELayer::token_first_host",
                                     std::size_t(ranks), std::size_t(chunks));
    auto token_at = detail::ensure_view(token_at_host_, "kmoe::MoELayer::token_at_host",
                                        std::size_t(ranks), std::size_t(chunks));
    auto header_at =
        detail::ensure_view(header_at_host_, "kmoe::MoELayer::header_at_host", std::size_t(ranks));
    for (int p = 0; p < ranks; ++p) {
      for (int j = 0; j < local; ++j) recv_rows_[p] += received(p, j);
      header_recv_[p] = deduplicate ? header_rows_of(local + recv_rows_[p]) : 0;
      for (int c = 0, before = 0; c < chunks; ++c) {
        first(p, c) = before;
        before += int(received(p, local + c));
        recv_token_rows_[p] += received(p, local + c);
        recv_block_rows_[std::size_t(c) * ranks + p] =
            (c == 0 ? header_recv_[p] : 0) + received(p, local + c);
      }
    }
    for (std::size_t b = 0, row = 0; b < recv_block_rows_.size(); ++b) {
      const int c = int(b) / ranks, p = int(b) % ranks;
      // Sized by the sender, the blocks lie in the order they arrived (received_at_).
      if (payload_arrived_) row = std::size_t(received_at_[p] / hidden_);
      if (c == 0) header_at(p) = std::int64_t(row) * hidden_;
      token_at(p, c) = int(row + (c == 0 ? header_recv_[p] : 0));
      row += recv_block_rows_[b];
    }

    // Blocks (source p, local expert j): rows at recv_row of the receive order (p, j,
    // token), moved to expert_row of the expert order, where expert j's segment is padded
    // to the alignment; return_row in the chunk-major return order (chunk of j, p, j,
    // token); the links of p's block from header element link_at.
    const int alignment = alignment_;
    auto blocks = detail::ensure_view(blocks_host_, "kmoe::MoELayer::blocks_host",
                                      std::size_t(ranks) * local, std::size_t(5));
    std::vector<std::int64_t> recv_begin(ranks + 1, 0);
    for (int p = 0; p < ranks; ++p) recv_begin[p + 1] = recv_begin[p] + recv_rows_[p];
    return_rows_.assign(std::size_t(chunks) * ranks, 0);
    for (int p = 0; p < ranks; ++p)
      for (int j = 0; j < local; ++j)
        return_rows_[std::size_t(chunk_of(my_rank(), j)) * ranks + p] += received(p, j);
    std::vector<std::int64_t> return_begin(return_rows_.size() + 1, 0);
    for (std::size_t b = 0; b < return_rows_.size(); ++b)
      return_begin[b + 1] = return_begin[b] + return_rows_[b];
    detail::ensure_view(segments_.offsets_host, "kmoe::MoELayer::segments", std::size_t(local + 1));
    int expert_row = 0;
    for (int j = 0; j < local; ++j) {
      segments_.offsets_host(j) = expert_row;
      const int c = chunk_of(my_rank(), j);
      for (int p = 0; p < ranks; ++p) {
        std::int64_t before = 0, before_in_chunk = 0;
        for (int i = 0; i < j; ++i) {
          before += received(p, i);
          if (chunk_of(my_rank(), i) == c) before_in_chunk += received(p, i);
        }
        const int b = p * local + j;
        blocks(b, 0) = int(recv_begin[p] + before);
        blocks(b, 1) = expert_row;
        blocks(b, 2) = int(received(p, j));
        blocks(b, 3) = int(return_begin[std::size_t(c) * ranks + p] + before_in_chunk);
        blocks(b, 4) = int(local + before);  // after the counts at the header's head
        expert_row += blocks(b, 2);
      }
      expert_row = (expert_row + alignment - 1) / alignment * alignment;
    }
    segments_.offsets_host(local) = expert_row;
    segments_.sync_from_host();
    build_chunk_segments();
    identity_arrangement_ = ranks == 1 && alignment == 1;
    recv_total_ = recv_begin[ranks];
    if (identity_arrangement_ && !deduplicate) return;
    detail::ensure_extents(blocks_, "kmoe::MoELayer::blocks", std::size_t(ranks) * local, 5);
    Kokkos::deep_copy(blocks_, blocks);
    detail::ensure_rows(expert_receive_row_, expert_receive_row_buffer_,
                        "kmoe::MoELayer::expert_receive_row", expert_row);
    detail::ensure_rows(expert_return_row_, expert_return_row_buffer_,
                        "kmoe::MoELayer::expert_return_row", chunks > 1 ? expert_row : 0);
    detail::map_expert_rows<X>(blocks_, expert_receive_row_, expert_return_row_);
    if (!deduplicate) return;
    detail::ensure_rows(expert_token_row_, expert_token_row_buffer_,
                        "kmoe::MoELayer::expert_token_row", expert_row);
    detail::ensure_extents(token_first_, "kmoe::MoELayer::token_first", std::size_t(ranks),
                           std::size_t(chunks));
    detail::ensure_extents(token_at_, "kmoe::MoELayer::token_at", std::size_t(ranks),
                           std::size_t(chunks));
    detail::ensure_extents(header_at_, "kmoe::MoELayer::header_at", std::size_t(ranks));
    Kokkos::deep_copy(token_first_, first);
    Kokkos::deep_copy(token_at_, token_at);
    Kokkos::deep_copy(header_at_, header_at);
    std::int64_t total = 0;
    for (auto rows : recv_block_rows_) total += rows;
    if (ranks > 1)
      detail::ensure_rows(recv_x_, recv_x_buffer_, "kmoe::MoELayer::recv_x", total, hidden_);
  }

  /// Starts the payload exchange of the planned rows (after exchange_counts); the caller
  /// waits on the request (and may compute meanwhile) before arrive(). Unchunked only.
  Request dispatch_start() {
    require(chunks_ == 1, "kmoe::ExpertParallelExchange::dispatch_start", "chunks()", chunks_,
            "the unchunked dispatch needs set_chunks(1) before plan(); pipelined: "
            "dispatch_chunk_start");
    if (ranks_ == 1) {
      recv_x_ = send_x_;
      return {};
    }
    if (!deduplicated())
      return start_exchange(send_x_, send_rows_, recv_x_, recv_rows_, "kmoe::MoELayer::recv_x");
    if (payload_arrived_) return {};  // with the counts, by all_to_all_v_sized_by_sender
    if (!ep_.hierarchical()) return dispatch_chunk_start(0);
    if (compressing()) {
      compression_.pack(Lane::dispatch, flat(send_x_), dispatch_blocks(true));
      dispatch_pending_ = true;
      return compression_.start_rows(ep_, Lane::dispatch, dispatch_blocks(true),
                                     dispatch_blocks(false), hidden_, route_keys(Payload::pieces));
    }
    // Hierarchical route: a token's rows for several ranks of one node cross nodes once;
    // the header rows (distinct keys below every token's) travel per rank, as rows.
    return ep_.all_to_all_rows_start(flat(send_x_), elements(send_block_rows_), flat(recv_x_),
                                     elements(recv_block_rows_), hidden_, route_keys());
  }

  /// The received rows in the expert order (segments()), after the dispatch's wait.
  const Matrix<S, X>& arrive() {
    if (dispatch_pending_) {
      dispatch_pending_ = false;
      if (deduplicated())
        compression_.unpack(Lane::dispatch, dispatch_blocks(false), 0, std::size_t(ranks_),
                            flat(recv_x_));
      else
        compression_.unpack(Lane::dispatch, Blocks::plain(elements(recv_rows_)), 0,
                            std::size_t(ranks_), flat(recv_x_));
    }
    if (deduplicated()) {
      arrive_links();
      expand_to_experts(recv_x_, expert_x_, 0, segments_.rows());
    } else {
      arrange_to_experts(recv_x_, expert_x_, "kmoe::MoELayer::expert_x");
    }
    return expert_x_;
  }

  /// Pipelined forward: starts chunk c of the dispatch (every rank starts every chunk, in
  /// order, after exchange_counts).
  Request dispatch_chunk_start(int c) {
    const int ranks = ranks_;
    std::vector<std::int64_t>& send = chunk_counts_send_;
    std::vector<std::int64_t>& recv = chunk_counts_recv_;
    send.assign(ranks, 0);
    recv.assign(ranks, 0);
    std::int64_t send_first = 0, recv_first = 0;
    for (std::size_t b = 0; b < std::size_t(c) * ranks; ++b) {
      send_first += send_block_rows_[b];
      recv_first += recv_block_rows_[b];
    }
    std::int64_t send_rows = 0, recv_rows = 0;
    for (int p = 0; p < ranks; ++p) {
      send[p] = send_block_rows_[std::size_t(c) * ranks + p] * hidden_;
      recv[p] = recv_block_rows_[std::size_t(c) * ranks + p] * hidden_;
      send_rows += send_block_rows_[std::size_t(c) * ranks + p];
      recv_rows += recv_block_rows_[std::size_t(c) * ranks + p];
    }
    if (compressing()) {
      if (c == 0) compression_.pack(Lane::dispatch, flat(send_x_), dispatch_blocks(true));
      dispatch_pending_ = chunks_ == 1;  // arrive() unpacks; pipelined: arrive_chunk(c)
      return compression_.start(ep_, Lane::dispatch, dispatch_blocks(true), dispatch_blocks(false),
                                std::size_t(c) * ranks, std::size_t(ranks));
    }
    return ep_.all_to_all_v_start(flat_rows(send_x_, send_first, send_rows), send,
                                  flat_rows(recv_x_, recv_first, recv_rows), recv);
  }

  /// Pipelined forward, after chunk c's dispatch (and every earlier chunk's) completed: the
  /// expert-ordered input rows of chunk c's experts, rows [chunk_begin(c), chunk_begin(c + 1))
  /// of expert_x(); its segments are chunk_segments(c).
  Matrix<S, X> arrive_chunk(int c) {
    if (compressing())
      compression_.unpack(Lane::dispatch, dispatch_blocks(false), std::size_t(c) * ranks_,
                          std::size_t(ranks_), flat(recv_x_));
    if (c == 0) {
      detail::ensure_rows(expert_x_, expert_x_buffer_, "kmoe::MoELayer::expert_x", segments_.rows(),
                          hidden_);
      arrive_links();
    }
    expand_to_experts(recv_x_, expert_x_, chunk_begin(c), chunk_begin(c + 1));
    return chunk_rows(expert_x_, c);
  }
  /// First expert row of chunk c's experts (c = chunks(): the end).
  int chunk_begin(int c) const { return chunk_row_begin_[c]; }
  /// The segments of chunk c's experts, rows counted from chunk_begin(c); the other
  /// experts' segments are empty.
  const Segments<X>& chunk_segments(int c) const { return chunk_segments_[c]; }
  /// Rows [chunk_begin(c), chunk_begin(c + 1)) of an expert-ordered matrix.
  static Matrix<S, X> chunk_rows(const Matrix<S, X>& m, int c, const std::vector<int>& begin) {
    return Kokkos::subview(m, Kokkos::make_pair(begin[c], begin[c + 1]), Kokkos::ALL);
  }
  Matrix<S, X> chunk_rows(const Matrix<S, X>& m, int c) const {
    return chunk_rows(m, c, chunk_row_begin_);
  }

  /// Pipelined forward: chunk c's expert outputs (rows of chunk c in the expert-ordered
  /// expert_y) back to the ranks that sent them.
  Request return_chunk_start(int c, const Matrix<S, X>& expert_y) {
    if (c == 0) {
      std::int64_t total = 0;
      for (auto rows : return_rows_) total += rows;
      detail::ensure_rows(recv_y_, recv_y_buffer_, "kmoe::MoELayer::recv_y", total, hidden_);
      detail::ensure_rows(return_y_, return_y_buffer_, "kmoe::MoELayer::return_y", send_total(),
                          hidden_);
    }
    detail::scatter_mapped_rows<X>(chunk_return_rows(c), chunk_rows(expert_y, c), recv_y_);
    return chunk_exchange(c, Lane::rows, recv_y_, return_rows_, return_y_, send_chunk_rows_);
  }
  /// Pipelined forward, after chunk c's return completed: its rows into the send order.
  void return_chunk_finish(int c) {
    if (c == 0)
      detail::ensure_rows(send_y_, send_y_buffer_, "kmoe::MoELayer::send_y", send_total(), hidden_);
    chunk_unpack(c, Lane::rows, send_chunk_rows_, return_y_);
    copy_chunk_blocks(c, return_y_, send_y_, true);
  }

  /// Pipelined backward (the forward's chunks, the forward's return reversed): stages the
  /// output gradients (send order, one row per kept assignment) chunk-major, then starts
  /// chunk c's way to the experts (every rank starts every chunk, in order).
  Request to_experts_chunk_start(int c, const Matrix<S, X>& grad_send_y) {
    if (c == 0) {
      detail::ensure_rows(grad_staged_y_, grad_staged_y_buffer_, "kmoe::MoELayer::grad_staged_y",
                          send_total(), hidden_);
      detail::ensure_rows(grad_recv_y_, grad_recv_y_buffer_, "kmoe::MoELayer::grad_recv_y",
                          recv_total_, hidden_);
    }
    copy_chunk_blocks(c, grad_staged_y_, grad_send_y, false);
    return chunk_exchange(c, Lane::dispatch, grad_staged_y_, send_chunk_rows_, grad_recv_y_,
                          return_rows_);
  }
  /// Pipelined backward, after chunk c's gradients arrived: dL/d(expert_y) of chunk c's
  /// experts, rows [chunk_begin(c), chunk_begin(c + 1)) of the expert order (zero padding).
  Matrix<S, X> arrive_gradient_chunk(int c) {
    if (c == 0)
      detail::ensure_rows(grad_expert_y_, grad_expert_y_buffer_, "kmoe::MoELayer::grad_expert_y",
                          segments_.rows(), hidden_);
    chunk_unpack(c, Lane::dispatch, return_rows_, grad_recv_y_);
    detail::gather_mapped_rows<X>(chunk_return_rows(c), grad_recv_y_,
                                  chunk_rows(grad_expert_y_, c));
    return chunk_rows(grad_expert_y_, c);
  }
  /// Pipelined backward: chunk c's input gradients (rows of chunk c in the expert-ordered
  /// grad_expert_x) back to the ranks that sent the rows.
  Request from_experts_chunk_start(int c, const Matrix<S, X>& grad_expert_x) {
    if (c == 0) {
      detail::ensure_rows(grad_recv_x_, grad_recv_x_buffer_, "kmoe::MoELayer::grad_recv_x",
                          recv_total_, hidden_);
      detail::ensure_rows(grad_returned_x_, grad_returned_x_buffer_,
                          "kmoe::MoELayer::grad_returned_x", send_total(), hidden_);
    }
    detail::scatter_mapped_rows<X>(chunk_return_rows(c), chunk_rows(grad_expert_x, c),
                                   grad_recv_x_);
    return chunk_exchange(c, Lane::rows, grad_recv_x_, return_rows_, grad_returned_x_,
                          send_chunk_rows_);
  }
  /// Pipelined backward, after chunk c's input gradients returned: its rows into the send
  /// order.
  void from_experts_chunk_finish(int c) {
    if (c == 0)
      detail::ensure_rows(grad_send_x_, grad_send_x_buffer_, "kmoe::MoELayer::grad_send_x",
                          send_total(), hidden_);
    chunk_unpack(c, Lane::rows, send_chunk_rows_, grad_returned_x_);
    copy_chunk_blocks(c, grad_returned_x_, grad_send_x_, true);
  }
  /// Pipelined backward, after every chunk's from_experts_chunk_finish: grad_x(t) = the sum
  /// over t's kept slots, in slot order, of the returned rows (as from_experts).
  void sum_returned_gradients(const Matrix<S, X>& grad_x) {
    detail::scatter_add_rows<X>(position_, grad_send_x_, grad_x);
  }

  /// Expert outputs (expert order) back to the ranks that sent the rows, in the send order
  /// (one row per kept assignment, Dispatch row order). `before_exchange` runs between the
  /// arrangement and the transfer (the layer's timing of the wait for the slowest rank).
  template <class BeforeExchange>
  const Matrix<S, X>& combine(const Matrix<S, X>& expert_y, BeforeExchange&& before_exchange) {
    arrange_from_experts(expert_y, recv_y_, "kmoe::MoELayer::recv_y");
    before_exchange();
    exchange(recv_y_, recv_rows_, send_y_, send_rows_, "kmoe::MoELayer::send_y", send_y_buffer_);
    return send_y_;
  }
  const Matrix<S, X>& combine(const Matrix<S, X>& expert_y) {
    return combine(expert_y, [] {});
  }

  /// Backward of combine, its transfer: dL/d(send_y) to the expert ranks.
  void to_experts(const Matrix<S, X>& grad_send_y) {
    exchange(grad_send_y, send_rows_, grad_recv_y_, recv_rows_, "kmoe::MoELayer::grad_recv_y",
             grad_recv_y_buffer_);
  }
  /// to_experts, started: the caller may compute (the shared experts' backward) before the
  /// request's wait and arrive_gradient().
  Request to_experts_start(const Matrix<S, X>& grad_send_y) {
    return start_exchange(grad_send_y, send_rows_, grad_recv_y_, recv_rows_,
                          "kmoe::MoELayer::grad_recv_y", grad_recv_y_buffer_);
  }
  /// Backward of combine, its arrangement: dL/d(expert_y) in the expert order.
  const Matrix<S, X>& arrive_gradient() {
    if (gradient_pending_) {
      gradient_pending_ = false;
      compression_.unpack(Lane::rows, Blocks::plain(elements(recv_rows_)), 0, std::size_t(ranks_),
                          flat(grad_recv_y_));
    }
    arrange_to_experts(grad_recv_y_, grad_expert_y_, "kmoe::MoELayer::grad_expert_y");
    return grad_expert_y_;
  }
  /// Backward of dispatch: dL/d(expert_x) back to the tokens; grad_x(t) = the sum over
  /// t's kept slots, in slot order, of the returned rows.
  void from_experts(const Matrix<S, X>& grad_expert_x, const Matrix<S, X>& grad_x) {
    arrange_from_experts(grad_expert_x, grad_recv_x_, "kmoe::MoELayer::grad_recv_x");
    exchange(grad_recv_x_, recv_rows_, grad_send_x_, send_rows_, "kmoe::MoELayer::grad_send_x",
             grad_send_x_buffer_);
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
    exchange(grad_recv_x_, recv_rows_, grad_send_x_, send_rows_, "kmoe::MoELayer::grad_send_x",
             grad_send_x_buffer_);
    detail::scatter_add_weighted_rows<X>(position_, input_weight, grad_send_x_, x, grad_x,
                                         grad_weight);
  }

 private:
  using FlatView =
      Kokkos::View<S*, typename X::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  using Payload = CompressedPayload<X, S>;
  using Lane = typename Payload::Lane;
  using Blocks = typename Payload::Blocks;

  /// Whether rows cross EP ranks in 16 bits.
  bool compressing() const { return compression_.active() && ranks_ > 1; }
  /// The deduplicated dispatch's (chunk, rank) blocks, chunk-major, on the send side or
  /// the receive side: each block's values, led in chunk 0 by its exact header rows.
  Blocks dispatch_blocks(bool send) const {
    const auto& rows = send ? send_block_rows_ : recv_block_rows_;
    const auto& header = send ? header_send_ : header_recv_;
    Blocks blocks = Blocks::plain(elements(rows));
    for (int r = 0; r < ranks_; ++r)
      blocks.exact[std::size_t(r)] = header[std::size_t(r)] * hidden_;
    return blocks;
  }

  template <class View>
  static FlatView flat(const View& v) {
    return FlatView(v.data(), v.size());
  }
  /// Rows [first, first + rows) of a row-major matrix, flat.
  FlatView flat_rows(const Matrix<S, X>& m, std::int64_t first, std::int64_t rows) const {
    return FlatView(m.data() + first * hidden_, std::size_t(rows * hidden_));
  }

  int my_rank() const { return ep_.rank(); }
  /// Row of each of chunk c's expert rows in the chunk-major return order (-1: padding).
  Kokkos::View<int*, typename X::memory_space> chunk_return_rows(int c) const {
    return Kokkos::subview(expert_return_row_,
                           Kokkos::make_pair(chunk_begin(c), chunk_begin(c + 1)));
  }
  /// Starts chunk c of a chunk-major exchange: `from` and `to` hold rows per (chunk, peer)
  /// block, `from_blocks` and `to_blocks` rows (block c * ranks + p), chunk c's blocks
  /// after those of earlier chunks. Compressed, chunk c's rows are narrowed into `lane`'s
  /// wire buffer (chunk_unpack widens them into `to` once the chunk arrived).
  Request chunk_exchange(int c, Lane lane, const Matrix<S, X>& from,
                         const std::vector<std::int64_t>& from_blocks, const Matrix<S, X>& to,
                         const std::vector<std::int64_t>& to_blocks) {
    const int ranks = ranks_;
    if (compressing()) {
      const auto sent = Blocks::plain(elements(from_blocks));
      compression_.pack(lane, flat(from), sent, std::size_t(c) * ranks, std::size_t(ranks));
      return compression_.start(ep_, lane, sent, Blocks::plain(elements(to_blocks)),
                                std::size_t(c) * ranks, std::size_t(ranks));
    }
    std::vector<std::int64_t>& send = chunk_counts_send_;
    std::vector<std::int64_t>& recv = chunk_counts_recv_;
    send.assign(ranks, 0);
    recv.assign(ranks, 0);
    std::int64_t send_first = 0, recv_first = 0, send_rows = 0, recv_rows = 0;
    for (std::size_t b = 0; b < std::size_t(c) * ranks; ++b) {
      send_first += from_blocks[b];
      recv_first += to_blocks[b];
    }
    for (int p = 0; p < ranks; ++p) {
      const std::size_t b = std::size_t(c) * ranks + p;
      send_rows += from_blocks[b];
      recv_rows += to_blocks[b];
      send[p] = from_blocks[b] * hidden_;
      recv[p] = to_blocks[b] * hidden_;
    }
    return ep_.all_to_all_v_start(flat_rows(from, send_first, send_rows), send,
                                  flat_rows(to, recv_first, recv_rows), recv);
  }
  /// Compressed: widens chunk c's arrived rows (blocks of `to_blocks` rows) into `to`.
  void chunk_unpack(int c, Lane lane, const std::vector<std::int64_t>& to_blocks,
                    const Matrix<S, X>& to) {
    if (compressing())
      compression_.unpack(lane, Blocks::plain(elements(to_blocks)), std::size_t(c) * ranks_,
                          std::size_t(ranks_), flat(to));
  }
  /// Chunk c's blocks between a token-side chunk-major matrix (blocks (c, r) in order) and
  /// the send order (block (c, r) at send_chunk_begin_): one block copy per rank, into the
  /// send order or out of it.
  void copy_chunk_blocks(int c, const Matrix<S, X>& chunk_major, const Matrix<S, X>& send_order,
                         bool to_send_order) {
    const int ranks = ranks_;
    std::int64_t at = 0;
    for (std::size_t b = 0; b < std::size_t(c) * ranks; ++b) at += send_chunk_rows_[b];
    for (int r = 0; r < ranks; ++r) {
      const std::int64_t rows = send_chunk_rows_[std::size_t(c) * ranks + r];
      const std::int64_t to = send_chunk_begin_[std::size_t(c) * ranks + r];
      const auto block =
          Kokkos::subview(chunk_major, Kokkos::make_pair(at, at + rows), Kokkos::ALL);
      const auto sent = Kokkos::subview(send_order, Kokkos::make_pair(to, to + rows), Kokkos::ALL);
      if (rows > 0) {
        if (to_send_order)
          Kokkos::deep_copy(sent, block);
        else
          Kokkos::deep_copy(block, sent);
      }
      at += rows;
    }
  }

  /// Chunk of rank r's local expert j: consecutive groups of about local_count_[r] / chunks_.
  int chunk_of(int r, int j) const {
    const std::int64_t n = local_count_[r];
    int c = 0;
    while (c + 1 < chunks_ && j >= n * (c + 1) / chunks_) ++c;
    return c;
  }
  /// Rows of the header for `values` header values (header_elements_v<S> elements each,
  /// whole rows).
  std::int64_t header_rows_of(std::int64_t values) const {
    return (values * detail::header_elements_v<S> + hidden_ - 1) / hidden_;
  }
  std::int64_t send_total() const {
    std::int64_t total = 0;
    for (auto rows : send_rows_) total += rows;
    return total;
  }

  /// The send side of the plan: assignments to each rank (in total and per chunk) and
  /// where each (chunk, rank) block of the send order starts.
  void plan_send_layout() {
    const int ranks = ranks_, chunks = chunks_;
    send_rows_.assign(ranks, 0);
    send_chunk_rows_.assign(std::size_t(chunks) * ranks, 0);
    send_chunk_begin_.assign(std::size_t(chunks) * ranks, 0);
    assignment_begin_host_.assign(ranks + 1, 0);
    for (int r = 0, key = 0; r < ranks; ++r) {
      std::int64_t row = assignment_begin_host_[r];
      for (int j = 0; j < local_count_[r]; ++j, ++key) {
        const std::size_t b = std::size_t(chunk_of(r, j)) * ranks + r;
        if (send_chunk_rows_[b] == 0 && kept_per_key_[key] > 0) send_chunk_begin_[b] = row;
        send_chunk_rows_[b] += kept_per_key_[key];
        send_rows_[r] += kept_per_key_[key];
        row += kept_per_key_[key];
      }
      assignment_begin_host_[r + 1] = row;
    }
  }

  /// Deduplicated send buffer, chunk-major: chunk c holds per destination r the links'
  /// header (c = 0) and r's token rows of chunk c.
  void pack_deduplicated(const ConstMatrix<S, X>& x) {
    const int ranks = ranks_, chunks = chunks_;
    header_send_.assign(ranks, 0);
    for (int r = 0; r < ranks; ++r)
      header_send_[r] = header_rows_of(local_count_[r] + send_rows_[r]);
    send_block_rows_.assign(std::size_t(chunks) * ranks, 0);
    auto begin = detail::ensure_view(token_begin_host_, "kmoe::MoELayer::token_begin_host",
                                     std::size_t(ranks * chunks + 1));
    auto at = detail::ensure_view(token_to_host_, "kmoe::MoELayer::token_to_host",
                                  std::size_t(ranks * chunks));
    auto header_at =
        detail::ensure_view(header_to_host_, "kmoe::MoELayer::header_to_host", std::size_t(ranks));
    auto assignment_begin =
        detail::ensure_view(assignment_begin_host_view_, "kmoe::MoELayer::assignment_begin_host",
                            std::size_t(ranks + 1));
    std::int64_t row = 0;
    for (int c = 0; c < chunks; ++c)
      for (int r = 0; r < ranks; ++r) {
        const std::size_t b = std::size_t(c) * ranks + r;
        const std::int64_t header = c == 0 ? header_send_[r] : 0;
        const std::int64_t tokens = deduplicated_.rows_per_chunk[std::size_t(r) * chunks + c];
        if (c == 0) header_at(r) = row * hidden_;
        at(r * chunks + c) = row + header;
        send_block_rows_[b] = header + tokens;
        row += header + tokens;
      }
    begin(0) = 0;
    for (int b = 0; b < ranks * chunks; ++b)
      begin(b + 1) = begin(b) + deduplicated_.rows_per_chunk[std::size_t(b)];
    for (int r = 0; r <= ranks; ++r) assignment_begin(r) = assignment_begin_host_[r];
    detail::ensure_rows(send_x_, send_x_buffer_, "kmoe::MoELayer::send_x", row, hidden_);
    detail::ensure_extents(token_begin_, "kmoe::MoELayer::token_begin",
                           std::size_t(ranks * chunks + 1));
    detail::ensure_extents(token_to_, "kmoe::MoELayer::token_to", std::size_t(ranks * chunks));
    detail::ensure_extents(header_to_, "kmoe::MoELayer::header_to", std::size_t(ranks));
    detail::ensure_extents(assignment_begin_, "kmoe::MoELayer::assignment_begin",
                           std::size_t(ranks + 1));
    Kokkos::deep_copy(token_begin_, begin);
    Kokkos::deep_copy(token_to_, at);
    Kokkos::deep_copy(header_to_, header_at);
    Kokkos::deep_copy(assignment_begin_, assignment_begin);
    // Header rows are zero past their links, so that the payload is deterministic.
    for (int r = 0; r < ranks; ++r)
      if (header_send_[r] > 0)
        Kokkos::deep_copy(flat_rows(send_x_, header_at(r) / hidden_, header_send_[r]), S(0));
    detail::pack_token_rows<X>(x, deduplicated_.token, token_begin_, token_to_, send_x_);
    auto kept = detail::ensure_view(kept_host_, "kmoe::MoELayer::kept_host", kept_per_key_.size());
    auto key_begin = detail::ensure_view(key_begin_host_, "kmoe::MoELayer::key_begin_host",
                                         std::size_t(ranks + 1));
    for (std::size_t key = 0; key < kept_per_key_.size(); ++key) kept(key) = kept_per_key_[key];
    key_begin(0) = 0;
    for (int r = 0; r < ranks; ++r) key_begin(r + 1) = key_begin(r) + local_count_[r];
    detail::ensure_extents(kept_, "kmoe::MoELayer::kept", kept_per_key_.size());
    detail::ensure_extents(key_begin_, "kmoe::MoELayer::key_begin", std::size_t(ranks + 1));
    Kokkos::deep_copy(kept_, kept);
    Kokkos::deep_copy(key_begin_, key_begin);
    detail::pack_header<X>(kept_, deduplicated_.link, key_begin_, assignment_begin_, header_to_,
                           flat(send_x_));
  }

  /// The unchunked deduplicated dispatch through a communicator that sizes messages by
  /// their sender: the payload arrives with its counts (its header's first values), so no
  /// count all-to-all precedes it. Each block is received, as soon as its envelope is
  /// found, after those received before it (received_at_: where each source's block
  /// starts). Fills the counts as the all-to-all would have (recv_host: per source, its
  /// experts' assignments, then its token rows).
  template <class Host>
  void receive_sized_by_sender(const Host& recv_host) {
    const int ranks = ranks_, local = local_, per_peer = local + 1;
    // Elements of S at the head of each block that hold its counts (header values).
    const int head_elements = local * detail::header_elements_v<S>;
    using HostFlat =
        Kokkos::View<const S*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
    received_at_.assign(ranks, 0);
    std::vector<std::int64_t> counts;
    if (compressing()) {
      // A block's exact header (its rows) follows from its head: the counts.
      const auto header_of = [&](const std::vector<S>& head) {
        const HostFlat values(head.data(), head.size());
        std::int64_t links = 0;
        for (int j = 0; j < local; ++j) links += detail::load_header_value(values, 0, j);
        return header_rows_of(local + links) * hidden_;
      };
      counts = compression_.exchange_sized_by_sender(
          ep_, flat(send_x_), dispatch_blocks(true), std::size_t(head_elements), header_of,
          [&](std::int64_t total) {
            detail::ensure_rows(recv_x_, recv_x_buffer_, "kmoe::MoELayer::recv_x", total / hidden_,
                                hidden_);
            return flat(recv_x_);
          },
          received_at_);
    } else {
      std::int64_t received = 0;
      counts = ep_.all_to_all_v_sized_by_sender(
          flat(send_x_), elements(send_block_rows_), [&](int source, std::int64_t elements) {
            grow_receive_buffer(received + elements, received);
            received_at_[source] = received;
            received += elements;
            return recv_x_buffer_.data() + received_at_[source];
          });
      detail::ensure_rows(recv_x_, recv_x_buffer_, "kmoe::MoELayer::recv_x", received / hidden_,
                          hidden_);
    }
    // Each block's counts, from the head of its header, to the host.
    auto head = detail::ensure_view(received_head_, "kmoe::MoELayer::received_head",
                                    std::size_t(ranks) * std::max(head_elements, 1));
    for (int p = 0; p < ranks; ++p)
      if (local > 0 && counts[p] > 0)
        Kokkos::deep_copy(Kokkos::subview(head, std::make_pair(std::size_t(p) * head_elements,
                                                               std::size_t(p + 1) * head_elements)),
                          FlatView(recv_x_.data() + received_at_[p], std::size_t(head_elements)));
    for (int p = 0; p < ranks; ++p) {
      std::int64_t links = 0;
      for (int j = 0; j < local; ++j) {
        const auto kept =
            counts[p] > 0 ? detail::load_header_value(head, std::int64_t(p) * head_elements, j) : 0;
        recv_host(p * per_peer + j) = kept;
        links += kept;
      }
      recv_host(p * per_peer + local) = counts[p] / hidden_ - header_rows_of(local + links);
    }
  }

  /// Room for `elements` values in the dispatch's receive buffer, keeping its first `kept`
  /// (the blocks already received): a larger buffer, an eighth more, only when too small.
  void grow_receive_buffer(std::int64_t elements, std::int64_t kept) {
    if (recv_x_buffer_.extent(1) == std::size_t(hidden_) &&
        std::int64_t(recv_x_buffer_.size()) >= elements)
      return;
    const std::int64_t rows = (elements + hidden_ - 1) / hidden_;
    Matrix<S, X> larger;
    detail::ensure_extents(larger, "kmoe::MoELayer::recv_x", std::size_t(rows + rows / 8),
                           std::size_t(hidden_));
    if (kept > 0)
      Kokkos::deep_copy(FlatView(larger.data(), std::size_t(kept)),
                        FlatView(recv_x_buffer_.data(), std::size_t(kept)));
    recv_x_buffer_ = larger;
  }

  /// The hierarchical route's key of each send row of the unchunked deduplicated dispatch
  /// (rows of equal keys hold equal values, ascending within each destination's block):
  /// the token of a token row; a header row, whose values are its destination's own, a
  /// distinct key below every token's.
  /// Compressed, each header row travels as `header_pieces` wire rows, each with a key.
  const Vector<int, X>& route_keys(int header_pieces = 1) {
    const int ranks = ranks_;
    const auto token =
        Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), deduplicated_.token);
    std::int64_t total = 0;
    for (auto rows : send_block_rows_) total += rows;
    for (auto rows : header_send_) total += rows * (header_pieces - 1);
    auto keys =
        detail::ensure_view(route_key_host_, "kmoe::MoELayer::route_key_host", std::size_t(total));
    std::int64_t row = 0, token_row = 0;
    int header_key = std::numeric_limits<int>::min();
    for (int r = 0; r < ranks; ++r) {
      for (std::int64_t i = 0; i < header_send_[r] * header_pieces; ++i) keys(row++) = header_key++;
      for (std::int64_t i = 0; i < deduplicated_.rows_per_rank[r]; ++i)
        keys(row++) = token(token_row++);
    }
    detail::ensure_extents(route_key_, "kmoe::MoELayer::route_key", std::size_t(total));
    Kokkos::deep_copy(route_key_, keys);
    return route_key_;
  }

  /// Deduplicated dispatch, once its first chunk (the headers) has arrived: the received
  /// row of each expert row's token.
  void arrive_links() {
    detail::map_expert_tokens<X>(blocks_, local_, expert_token_row_, flat(recv_x_), header_at_,
                                 token_first_, token_at_);
  }

  /// Each chunk's first expert row and segments (from the expert segments).
  void build_chunk_segments() {
    const int chunks = chunks_, local = local_;
    chunk_row_begin_.assign(chunks + 1, 0);
    for (int j = 0; j < local; ++j) chunk_row_begin_[chunk_of(my_rank(), j) + 1] = segments_.end(j);
    for (int c = 1; c <= chunks; ++c)
      chunk_row_begin_[c] = std::max(chunk_row_begin_[c], chunk_row_begin_[c - 1]);
    if (chunks == 1) return;
    chunk_segments_.resize(chunks);
    for (int c = 0; c < chunks; ++c) {
      auto& segments = chunk_segments_[c];
      detail::ensure_view(segments.offsets_host, "kmoe::MoELayer::chunk_segments",
                          std::size_t(local + 1));
      const int first = chunk_row_begin_[c], last = chunk_row_begin_[c + 1];
      for (int j = 0; j <= local; ++j) {
        const int at = j < local ? segments_.begin(j) : segments_.rows();
        segments.offsets_host(j) = std::min(std::max(at, first), last) - first;
      }
      segments.sync_from_host();
    }
  }

  /// Starts sending rows per peer and receiving rows per peer (EP group); on one EP rank
  /// the receive buffer is the send buffer itself.
  Request start_exchange(const Matrix<S, X>& send, const std::vector<std::int64_t>& send_rows,
                         Matrix<S, X>& recv, const std::vector<std::int64_t>& recv_rows,
                         const char* label, Matrix<S, X>& buffer) {
    if (receive_in_place(send, recv, recv_rows, label, buffer)) return {};
    if (compressing()) {
      // The dispatch's rows in its lane; the output gradients (to_experts_start) in the other.
      const Lane lane = &recv == &recv_x_ ? Lane::dispatch : Lane::rows;
      const auto send_blocks = Blocks::plain(elements(send_rows));
      compression_.pack(lane, flat(send), send_blocks);
      (lane == Lane::dispatch ? dispatch_pending_ : gradient_pending_) = true;
      return compression_.start(ep_, lane, send_blocks, Blocks::plain(elements(recv_rows)), 0,
                                std::size_t(ranks_));
    }
    return ep_.all_to_all_v_start(flat(send), elements(send_rows), flat(recv), elements(recv_rows));
  }
  Request start_exchange(const Matrix<S, X>& send, const std::vector<std::int64_t>& send_rows,
                         Matrix<S, X>& recv, const std::vector<std::int64_t>& recv_rows,
                         const char* label) {
    return start_exchange(send, send_rows, recv, recv_rows, label, recv_x_buffer_);
  }

  /// start_exchange and wait, through the communicator's blocking form (nothing to overlap,
  /// so no request to keep).
  void exchange(const Matrix<S, X>& send, const std::vector<std::int64_t>& send_rows,
                Matrix<S, X>& recv, const std::vector<std::int64_t>& recv_rows, const char* label,
                Matrix<S, X>& buffer) {
    if (receive_in_place(send, recv, recv_rows, label, buffer)) return;
    if (compressing()) {
      compression_.exchange(ep_, flat(send), elements(send_rows), flat(recv), elements(recv_rows));
      return;
    }
    ep_.all_to_all_v(flat(send), elements(send_rows), flat(recv), elements(recv_rows));
  }

  /// Sizes the receive buffer; on one EP rank aliases it to the send buffer and returns true.
  bool receive_in_place(const Matrix<S, X>& send, Matrix<S, X>& recv,
                        const std::vector<std::int64_t>& recv_rows, const char* label,
                        Matrix<S, X>& buffer) const {
    if (ranks_ == 1) {
      recv = send;
      return true;
    }
    std::int64_t total = 0;
    for (auto r : recv_rows) total += r;
    detail::ensure_rows(recv, buffer, label, total, hidden_);
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
    detail::ensure_rows(out, buffer_of(out), label, segments_.rows(), hidden_);
    detail::gather_mapped_rows<X>(expert_receive_row_, in, out);
  }

  /// Deduplicated receive rows -> expert rows [first, last) of the expert order (local
  /// expert, source rank, token), each assignment taking its token's row, with zero
  /// padding rows.
  void expand_to_experts(const Matrix<S, X>& in, Matrix<S, X>& out, int first, int last) {
    if (first == 0 && last == segments_.rows())
      detail::ensure_rows(out, expert_x_buffer_, "kmoe::MoELayer::expert_x", segments_.rows(),
                          hidden_);
    const auto rows = Kokkos::make_pair(first, last);
    detail::gather_mapped_rows<X>(Kokkos::subview(expert_token_row_, rows), in,
                                  Kokkos::subview(out, rows, Kokkos::ALL));
  }

  /// Inverse of arrange_to_experts (padding rows are dropped).
  void arrange_from_experts(const Matrix<S, X>& in, Matrix<S, X>& out, const char* label) {
    if (identity_arrangement_) {
      out = in;
      return;
    }
    detail::ensure_rows(out, buffer_of(out), label, recv_total_, hidden_);
    detail::scatter_mapped_rows<X>(expert_receive_row_, in, out);
  }

  /// The growing buffer behind each arranged matrix.
  Matrix<S, X>& buffer_of(const Matrix<S, X>& view) {
    if (&view == &expert_x_) return expert_x_buffer_;
    if (&view == &grad_expert_y_) return grad_expert_y_buffer_;
    if (&view == &recv_y_) return recv_y_buffer_;
    return grad_recv_x_buffer_;
  }

  /// Per-peer row counts are reported only across ranks (one EP rank exchanges nothing).
  const std::vector<std::int64_t>& across_ranks(const std::vector<std::int64_t>& rows) const {
    static const std::vector<std::int64_t> none;
    return ranks_ > 1 ? rows : none;
  }

  ExchangeRoute<Communicator> ep_;  ///< the EP group's all-to-all-v, flat unless set_route()
  int ranks_ = 1, local_ = 0, hidden_ = 0, alignment_ = 1, chunks_ = 1;
  bool deduplicate_ = true;

  // Placement: sort key of each global expert, experts per EP rank, chunk of each expert.
  std::vector<int> key_host_;
  std::vector<std::int64_t> local_count_;
  Vector<int, X> expert_key_;
  Vector<int, X> expert_rank_;   ///< EP rank owning each global expert
  Vector<int, X> expert_chunk_;  ///< pipeline chunk of each global expert

  // The dispatch of the last forward: kept assignments per key, row of each (token, slot).
  std::vector<std::int64_t> kept_per_key_;
  Matrix<int, X> position_;

  // Send side of the last forward: assignments per rank, per (chunk, rank) block and where
  // those start in the send order; header rows and exchange rows per (chunk, rank) block.
  std::vector<std::int64_t> send_rows_, send_chunk_rows_, send_chunk_begin_;
  std::vector<std::int64_t> assignment_begin_host_, header_send_, send_block_rows_;
  // Receive side: assignments and token rows per source, header rows per source, exchange
  // rows per (chunk, source) block, return rows per (chunk, source) block.
  std::vector<std::int64_t> recv_rows_, recv_token_rows_, header_recv_, recv_block_rows_;
  std::vector<std::int64_t> return_rows_;
  std::vector<std::int64_t> count_send_counts_, count_recv_counts_;
  std::vector<std::int64_t> chunk_counts_send_, chunk_counts_recv_;
  std::int64_t recv_total_ = 0;
  Vector<std::int64_t, X> count_send_, count_recv_;
  Kokkos::View<std::int64_t*, Kokkos::HostSpace> count_send_host_, count_recv_host_;
  // Send-side tables of the pack kernels and receive-side tables of the link decoding,
  // with their host copies (kept across steps).
  Vector<int, X> token_begin_, token_to_;
  Vector<std::int64_t, X> header_to_, assignment_begin_, header_at_, kept_, key_begin_;
  Kokkos::View<std::int64_t*, Kokkos::HostSpace> kept_host_, key_begin_host_;
  Kokkos::View<int*, Kokkos::HostSpace> token_begin_host_, token_to_host_;
  Kokkos::View<std::int64_t*, Kokkos::HostSpace> header_to_host_, assignment_begin_host_view_,
      header_at_host_;
  Kokkos::View<int**, Kokkos::LayoutRight, typename X::memory_space> token_first_, token_at_;
  Kokkos::View<int**, Kokkos::LayoutRight, Kokkos::HostSpace> token_first_host_, token_at_host_;
  Kokkos::View<int**, Kokkos::LayoutRight, typename X::memory_space> blocks_;
  Kokkos::View<int**, Kokkos::LayoutRight, Kokkos::HostSpace> blocks_host_;
  DeduplicatedDispatch<X> deduplicated_;
  // For each row of the expert order (-1: padding): its row in the receive order, in the
  // chunk-major return order (pipelined), and, when deduplicated, its token's received row.
  Vector<int, X> expert_receive_row_, expert_return_row_, expert_token_row_;
  Vector<int, X> expert_receive_row_buffer_, expert_return_row_buffer_, expert_token_row_buffer_;
  bool identity_arrangement_ = true;
  bool payload_arrived_ = false;  ///< the dispatch came with the counts (sized by sender)
  // Compressed rows (set_compression): the wire buffers, and the started receives that
  // arrive() and arrive_gradient() still have to widen.
  Payload compression_;
  bool dispatch_pending_ = false, gradient_pending_ = false;
  Vector<int, X> route_key_;  ///< the hierarchical route's key of each send row
  Kokkos::View<int*, Kokkos::HostSpace> route_key_host_;
  Kokkos::View<S*, Kokkos::HostSpace> received_head_;  ///< each block's counts, on the host
  std::vector<std::int64_t> received_at_;  ///< sized by the sender: each source's first element
  Segments<X> segments_;
  std::vector<Segments<X>> chunk_segments_;
  std::vector<int> chunk_row_begin_;

  // Forward rows (expert_x_ and send_y_ are kept for backward) and backward rows; on one
  // rank without padding the exchange/arrange steps alias them. Each is a view of the
  // first rows of its growing buffer.
  Matrix<S, X> send_x_, recv_x_, expert_x_, recv_y_, send_y_, return_y_;
  Matrix<S, X> grad_recv_y_, grad_expert_y_, grad_recv_x_, grad_send_x_;
  Matrix<S, X> send_x_buffer_, recv_x_buffer_, expert_x_buffer_, recv_y_buffer_, send_y_buffer_,
      return_y_buffer_;
  Matrix<S, X> grad_recv_y_buffer_, grad_expert_y_buffer_, grad_recv_x_buffer_, grad_send_x_buffer_;
  // Pipelined backward, token side, chunk-major: the output gradients staged for the
  // experts and the input gradients they return.
  Matrix<S, X> grad_staged_y_, grad_returned_x_, grad_staged_y_buffer_, grad_returned_x_buffer_;
};

}  // namespace kmoe
