// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file exchange/compressed_payload.hpp
/// \brief kmoe::CompressedPayload: the expert-parallel exchange's rows on the wire in 16
/// bits (LayerOptions::exchange_compression). The rows are narrowed to kmoe::bfloat16 or
/// kmoe::float16 (round to nearest, ties to even) as they are packed and widened back as
/// they are unpacked; every collective then moves 2-byte elements.
///
/// What must stay exact does: a block of a buffer may start with `exact` values (the
/// deduplicated dispatch's header: the counts and links, exchange/expert_parallel_exchange.hpp)
/// that travel bit for bit, each as sizeof(S) / 2 wire elements, so that a header keeps its
/// bytes and only the hidden-state values halve theirs (for S = float).
/// A buffer is described by its blocks (one per peer, or per (chunk, peer)): each block's
/// elements of S and its leading exact values. On the wire, block b takes
/// elements(b) + exact(b) (sizeof(S) / 2 - 1) elements, blocks in the same order.

#include <kmoe/detail/growing_buffer.hpp>
#include <kmoe/detail/math.hpp>
#include <kmoe/error.hpp>
#include <kmoe/low_precision.hpp>
#include <kmoe/types.hpp>
#include <kmoe/wire_compression.hpp>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace kmoe {

namespace detail {

/// Wire elements an exact value of S takes: its bits in 16-bit pieces.
template <class S>
inline constexpr int wire_pieces_v = int(sizeof(S) / sizeof(std::uint16_t));

/// out(at + k), k < wire_pieces_v<Value> = value's bits in 16-bit pieces, as elements of the
/// 16-bit type Wire (the bits as they are, whatever value they spell there).
template <class Wire, class Value, class Out>
KOKKOS_INLINE_FUNCTION void store_exact_pieces(const Value value, const Out& out, std::int64_t at) {
  constexpr int pieces = wire_pieces_v<Value>;
  std::uint16_t bits[pieces];
  std::memcpy(bits, &value, sizeof(Value));
  for (int k = 0; k < pieces; ++k) out(at + k) = Wire::from_bits(bits[k]);
}

/// The Value store_exact_pieces wrote from out(at).
template <class Value, class In>
KOKKOS_INLINE_FUNCTION Value load_exact_pieces(const In& in, std::int64_t at) {
  constexpr int pieces = wire_pieces_v<Value>;
  std::uint16_t bits[pieces];
  for (int k = 0; k < pieces; ++k) bits[k] = in(at + k).bits();
  Value value;
  std::memcpy(&value, bits, sizeof(Value));
  return value;
}

/// out's first `pieces` x n elements = in's n values bit for bit, each in 16-bit pieces. A
/// free function, like the kernels below: nvcc refuses an extended lambda in a private
/// member.
template <class X, class Wire, class In, class Out>
void split_exact_values(const In& in, const Out& out) {
  using S = typename In::non_const_value_type;
  constexpr int pieces = wire_pieces_v<S>;
  Kokkos::parallel_for(
      "kmoe::CompressedPayload::split_exact", Kokkos::RangePolicy<X>(0, std::int64_t(in.size())),
      KOKKOS_LAMBDA(std::int64_t i) { store_exact_pieces<Wire>(in(i), out, i * pieces); });
}

/// The inverse of split_exact_values.
template <class X, class Wire, class In, class Out>
void join_exact_values(const In& in, const Out& out) {
  using S = typename Out::non_const_value_type;
  constexpr int pieces = wire_pieces_v<S>;
  Kokkos::parallel_for(
      "kmoe::CompressedPayload::join_exact", Kokkos::RangePolicy<X>(0, std::int64_t(out.size())),
      KOKKOS_LAMBDA(std::int64_t i) { out(i) = load_exact_pieces<S>(in, i * pieces); });
}

/// out = in rounded to Wire (nearest, ties to even).
template <class X, class Wire, class In, class Out>
void round_values(const In& in, const Out& out) {
  Kokkos::parallel_for(
      "kmoe::CompressedPayload::narrow", Kokkos::RangePolicy<X>(0, std::int64_t(in.size())),
      KOKKOS_LAMBDA(std::int64_t i) { out(i) = Wire(float(in(i))); });
}

/// round_values, returning how many finite values became infinite (beyond the format's
/// largest finite value).
template <class X, class Wire, class In, class Out>
std::int64_t round_values_counting_overflow(const In& in, const Out& out) {
  std::int64_t overflowed = 0;
  Kokkos::parallel_reduce(
      "kmoe::CompressedPayload::narrow", Kokkos::RangePolicy<X>(0, std::int64_t(in.size())),
      KOKKOS_LAMBDA(std::int64_t i, std::int64_t & count) {
        const float value = float(in(i));
        const Wire narrow = Wire(value);
        out(i) = narrow;
        if (detail::isfinite(value) && !detail::isfinite(float(narrow))) ++count;
      },
      overflowed);
  return overflowed;
}

/// out = in through Wire, except in's first `exact` values, which go bit for bit at out's
/// head (wire_pieces_v<S> elements each). Returns the finite values that became infinite
/// on the way: counted for float16 (finite up to 65504); bfloat16 has float's range (only
/// values within half a bf16 unit of FLT_MAX round to infinity) and skips the count, the
/// reduction costing more than its rounding.
template <class X, class Wire, class In, class Out>
std::int64_t narrow_values(const In& in, std::int64_t exact, const Out& out) {
  using S = typename In::non_const_value_type;
  const std::int64_t n = std::int64_t(in.size()), head = exact * wire_pieces_v<S>;
  const auto values = std::make_pair(exact, n);
  const auto wire = std::make_pair(head, head + n - exact);
  if (exact > 0)
    split_exact_values<X, Wire>(Kokkos::subview(in, std::make_pair(std::int64_t(0), exact)),
                                Kokkos::subview(out, std::make_pair(std::int64_t(0), head)));
  if constexpr (std::is_same_v<Wire, float16>) {
    return round_values_counting_overflow<X, Wire>(Kokkos::subview(in, values),
                                                   Kokkos::subview(out, wire));
  } else {
    round_values<X, Wire>(Kokkos::subview(in, values), Kokkos::subview(out, wire));
    return 0;
  }
}

/// The inverse of narrow_values: out's first `exact` values from their pieces, the others
/// widened from Wire (exactly).
template <class X, class Wire, class In, class Out>
void widen_values(const In& in, std::int64_t exact, const Out& out) {
  using S = typename Out::non_const_value_type;
  const std::int64_t n = std::int64_t(out.size()), head = exact * wire_pieces_v<S>;
  if (exact > 0)
    join_exact_values<X, Wire>(Kokkos::subview(in, std::make_pair(std::int64_t(0), head)),
                               Kokkos::subview(out, std::make_pair(std::int64_t(0), exact)));
  const auto wire = Kokkos::subview(in, std::make_pair(head, head + n - exact));
  const auto values = Kokkos::subview(out, std::make_pair(exact, n));
  Kokkos::parallel_for(
      "kmoe::CompressedPayload::widen", Kokkos::RangePolicy<X>(0, n - exact),
      KOKKOS_LAMBDA(std::int64_t i) { values(i) = S(float(wire(i))); });
}

}  // namespace detail

/// \brief The 16-bit wire copies of the exchange's row buffers, and the collectives on them.
///
/// Two lanes of buffers, so that a dispatch chunk and a return chunk of the pipelined
/// forward can be in flight together: `dispatch` (the forward's rows to the experts) and
/// `rows` (the return and both backward exchanges, which never overlap one another).
template <class X, class S>
class CompressedPayload {
  static_assert(sizeof(S) % sizeof(std::uint16_t) == 0,
                "kmoe::CompressedPayload: S must be a whole number of 16-bit pieces");

 public:
  using memory_space = typename X::memory_space;
  using FlatView = Kokkos::View<S*, memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  enum class Lane { dispatch, rows };

  /// Wire elements an exact value takes.
  static constexpr int pieces = detail::wire_pieces_v<S>;

  /// \brief A buffer's blocks, in order: elements of S and leading exact values of each.
  struct Blocks {
    std::vector<std::int64_t> elements, exact;

    /// Blocks of `elements`, none with an exact head.
    static Blocks plain(const std::vector<std::int64_t>& elements) {
      return {elements, std::vector<std::int64_t>(elements.size(), 0)};
    }
    std::int64_t wire(std::size_t b) const { return elements[b] + exact[b] * (pieces - 1); }
    /// First element of each block, of S (wire = false) or on the wire; [size()] the total.
    std::vector<std::int64_t> begin(bool wire) const {
      std::vector<std::int64_t> at(elements.size() + 1, 0);
      for (std::size_t b = 0; b < elements.size(); ++b)
        at[b + 1] = at[b] + (wire ? this->wire(b) : elements[b]);
      return at;
    }
  };

  CompressedPayload() = default;
  explicit CompressedPayload(WireCompression format) : format_(format) {}

  WireCompression format() const { return format_; }
  bool active() const { return format_ != WireCompression::none; }

  /// Narrows blocks [first, first + count) of `send` (laid out as `blocks`; count 0: all
  /// from first) into the lane's send buffer, which is sized for the whole layout when
  /// first is 0 (pack a layout's blocks in order, as start() sends them).
  void pack(Lane lane, const FlatView& send, const Blocks& blocks, std::size_t first = 0,
            std::size_t count = 0) {
    const auto at = blocks.begin(false), wire_at = blocks.begin(true);
    const std::size_t last = count == 0 ? blocks.elements.size() : first + count;
    auto& buffer = lane_of(lane).send;
    if (first == 0)
      detail::ensure_rows(buffer, storage(lane, true), label(lane, true), wire_at.back());
    with_wire([&](auto tag) {
      using Wire = decltype(tag);
      const auto out = typed<Wire>(buffer);
      for_runs(blocks, first, last, [&](std::size_t b, std::size_t end) {
        overflowed_ += detail::narrow_values<X, Wire>(
            range(send, at[b], at[end]), blocks.exact[b],
            Kokkos::subview(out, std::make_pair(wire_at[b], wire_at[end])));
      });
    });
  }

  /// Starts the all-to-all-v of the packed blocks [first, first + peers) of `send` into
  /// blocks [first, first + peers) of the lane's receive buffer, laid out as `recv` (the
  /// receive buffer is sized for the whole of `recv`: start a layout's blocks in order,
  /// all of a forward's before the next layout).
  template <class Route>
  auto start(Route& route, Lane lane, const Blocks& send, const Blocks& recv, std::size_t first,
             std::size_t peers) {
    const auto send_at = send.begin(true), recv_at = recv.begin(true);
    auto& buffers = lane_of(lane);
    if (first == 0)
      detail::ensure_rows(buffers.recv, storage(lane, false), label(lane, false), recv_at.back());
    std::vector<std::int64_t> send_counts(peers), recv_counts(peers);
    for (std::size_t p = 0; p < peers; ++p) {
      send_counts[p] = send.wire(first + p);
      recv_counts[p] = recv.wire(first + p);
    }
    return with_wire([&](auto tag) {
      using Wire = decltype(tag);
      return route.all_to_all_v_start(
          Kokkos::subview(typed<Wire>(buffers.send),
                          std::make_pair(send_at[first], send_at[first + peers])),
          send_counts,
          Kokkos::subview(typed<Wire>(buffers.recv),
                          std::make_pair(recv_at[first], recv_at[first + peers])),
          recv_counts);
    });
  }

  /// Widens the received blocks [first, first + count) (laid out as `blocks`) into `recv`,
  /// at their places of S.
  void unpack(Lane lane, const Blocks& blocks, std::size_t first, std::size_t count,
              const FlatView& recv) {
    const auto at = blocks.begin(false), wire_at = blocks.begin(true);
    with_wire([&](auto tag) {
      using Wire = decltype(tag);
      const auto in = typed<Wire>(lane_of(lane).recv);
      for_runs(blocks, first, first + count, [&](std::size_t b, std::size_t end) {
        detail::widen_values<X, Wire>(Kokkos::subview(in, std::make_pair(wire_at[b], wire_at[end])),
                                      blocks.exact[b], range(recv, at[b], at[end]));
      });
    });
  }

  /// pack, start, wait and unpack in one (a blocking exchange of plain rows).
  template <class Route>
  void exchange(Route& route, const FlatView& send, const std::vector<std::int64_t>& send_counts,
                const FlatView& recv, const std::vector<std::int64_t>& recv_counts) {
    const auto send_blocks = Blocks::plain(send_counts), recv_blocks = Blocks::plain(recv_counts);
    pack(Lane::rows, send, send_blocks);
    start(route, Lane::rows, send_blocks, recv_blocks, 0, send_counts.size()).wait();
    unpack(Lane::rows, recv_blocks, 0, recv_counts.size(), recv);
  }

  /// The dispatch through a communicator that sizes messages by their sender
  /// (Communicator::all_to_all_v_sized_by_sender): packs `send` (blocks `blocks`, one per
  /// peer), exchanges it (each block received as it arrives, after those before it), reads
  /// the first `head` exact values of each block that arrived (they must be exact), asks
  /// `exact_of(values)` how many exact values that block starts with, and widens the
  /// blocks, in the order they arrived, into `receive(total elements of S)`. Returns each
  /// source's count of S; `received_at[p]` is where source p's block starts there.
  template <class Route, class ExactOf, class Receive>
  std::vector<std::int64_t> exchange_sized_by_sender(Route& route, const FlatView& send,
                                                     const Blocks& blocks, std::size_t head,
                                                     const ExactOf& exact_of,
                                                     const Receive& receive,
                                                     std::vector<std::int64_t>& received_at) {
    pack(Lane::dispatch, send, blocks);
    const auto wire_at = blocks.begin(true);
    const std::size_t peers = blocks.elements.size();
    std::vector<std::int64_t> wire_counts(peers);
    for (std::size_t p = 0; p < peers; ++p) wire_counts[p] = blocks.wire(p);
    auto& buffers = lane_of(Lane::dispatch);
    std::vector<int> arrival;  // the sources in the order their blocks arrived
    std::vector<std::int64_t> wire_from(peers, 0);
    std::int64_t wire_received = 0;
    const auto arrived = with_wire([&](auto tag) {
      using Wire = decltype(tag);
      return route.all_to_all_v_sized_by_sender(
          Kokkos::subview(typed<Wire>(buffers.send), std::make_pair(wire_at[0], wire_at.back())),
          wire_counts, [&](int source, std::int64_t count) {
            detail::grow_keeping(storage(Lane::dispatch, false), label(Lane::dispatch, false),
                                 wire_received + count, wire_received);
            wire_from[std::size_t(source)] = wire_received;
            wire_received += count;
            arrival.push_back(source);
            return typed<Wire>(storage(Lane::dispatch, false)).data() + wire_from[source];
          });
    });
    buffers.recv = Kokkos::subview(storage(Lane::dispatch, false),
                                   std::make_pair(std::int64_t(0), wire_received));
    Blocks recv;  // in arrival order, as the wire buffer holds them
    recv.elements.assign(arrival.size(), 0);
    recv.exact.assign(arrival.size(), 0);
    std::vector<std::int64_t> elements(peers, 0);
    std::vector<S> values(head);
    std::vector<std::uint16_t> bits(head * pieces);
    for (std::size_t i = 0; i < arrival.size(); ++i) {
      const std::size_t p = std::size_t(arrival[i]);
      if (arrived[p] == 0) continue;
      require(arrived[p] >= std::int64_t(head * pieces),
              "kmoe::CompressedPayload::exchange_sized_by_sender", "block", arrived[p],
              "must hold its " + std::to_string(head) + " exact head values");
      const auto at = std::size_t(wire_from[p]);
      Kokkos::deep_copy(Kokkos::View<std::uint16_t*, Kokkos::HostSpace>(bits.data(), bits.size()),
                        Kokkos::subview(buffers.recv, std::make_pair(at, at + bits.size())));
      // The exact values travel as their bytes (S may be a 16-bit class type).
      if (head > 0) std::memcpy(static_cast<void*>(values.data()), bits.data(), head * sizeof(S));
      recv.exact[i] = exact_of(values);
      recv.elements[i] = arrived[p] - recv.exact[i] * (pieces - 1);
      elements[p] = recv.elements[i];
    }
    received_at.assign(peers, 0);
    std::int64_t total = 0;
    for (std::size_t i = 0; i < arrival.size(); ++i) {
      received_at[std::size_t(arrival[i])] = total;
      total += recv.elements[i];
    }
    unpack(Lane::dispatch, recv, 0, arrival.size(), receive(total));
    return elements;
  }

  /// Starts the route's all_to_all_rows_start (the hierarchical route's deduplicated rows)
  /// of every packed block of `send` into the lane's receive buffer, laid out as `recv`:
  /// rows of `width` wire elements, `row_key` one key per wire row (an exact row of S is
  /// `pieces` wire rows).
  template <class Route, class Keys>
  auto start_rows(Route& route, Lane lane, const Blocks& send, const Blocks& recv, int width,
                  const Keys& row_key) {
    auto& buffers = lane_of(lane);
    const auto recv_at = recv.begin(true), send_at = send.begin(true);
    detail::ensure_rows(buffers.recv, storage(lane, false), label(lane, false), recv_at.back());
    std::vector<std::int64_t> send_counts(send.elements.size()), recv_counts(recv.elements.size());
    for (std::size_t p = 0; p < send_counts.size(); ++p) send_counts[p] = send.wire(p);
    for (std::size_t p = 0; p < recv_counts.size(); ++p) recv_counts[p] = recv.wire(p);
    return with_wire([&](auto tag) {
      using Wire = decltype(tag);
      return route.all_to_all_rows_start(
          Kokkos::subview(typed<Wire>(buffers.send), std::make_pair(send_at[0], send_at.back())),
          send_counts,
          Kokkos::subview(typed<Wire>(buffers.recv), std::make_pair(recv_at[0], recv_at.back())),
          recv_counts, width, row_key);
    });
  }

  /// Finite values that narrowing made infinite since the last call (float16's range).
  std::int64_t take_overflows() {
    const auto n = overflowed_;
    overflowed_ = 0;
    return n;
  }

  /// Bytes of the wire buffers.
  std::size_t buffer_bytes() const {
    std::size_t bytes = 0;
    for (const auto& l : lanes_) bytes += (l.send_storage.span() + l.recv_storage.span()) * 2;
    return bytes;
  }

 private:
  using Storage = Kokkos::View<std::uint16_t*, memory_space>;
  template <class Wire>
  using WireView = Kokkos::View<Wire*, memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;

  struct Buffers {
    Storage send, recv;                  ///< views of the first elements of the storage
    Storage send_storage, recv_storage;  ///< growing allocations
  };

  Buffers& lane_of(Lane lane) { return lanes_[lane == Lane::dispatch ? 0 : 1]; }
  Storage& storage(Lane lane, bool send) {
    auto& l = lane_of(lane);
    return send ? l.send_storage : l.recv_storage;
  }
  static const char* label(Lane lane, bool send) {
    if (lane == Lane::dispatch)
      return send ? "kmoe::MoELayer::dispatch_wire_send" : "kmoe::MoELayer::dispatch_wire_recv";
    return send ? "kmoe::MoELayer::rows_wire_send" : "kmoe::MoELayer::rows_wire_recv";
  }

  /// f(Wire{}) with the wire type of the format.
  template <class F>
  decltype(auto) with_wire(F&& f) const {
    if (format_ == WireCompression::fp16) return f(float16());
    return f(bfloat16());
  }

  template <class Wire>
  static WireView<Wire> typed(const Storage& storage) {
    return WireView<Wire>(reinterpret_cast<Wire*>(storage.data()), storage.size());
  }
  static FlatView range(const FlatView& v, std::int64_t first, std::int64_t last) {
    return FlatView(v.data() + first, std::size_t(last - first));
  }

  /// f(b, end) over blocks [first, last) in runs: each block with an exact head alone, the
  /// consecutive blocks without one together (one kernel for a plain buffer).
  template <class F>
  static void for_runs(const Blocks& blocks, std::size_t first, std::size_t last, const F& f) {
    for (std::size_t b = first; b < last;) {
      std::size_t end = b + 1;
      if (blocks.exact[b] == 0)
        while (end < last && blocks.exact[end] == 0) ++end;
      f(b, end);
      b = end;
    }
  }

  WireCompression format_ = WireCompression::none;
  Buffers lanes_[2];
  std::int64_t overflowed_ = 0;
};

}  // namespace kmoe
