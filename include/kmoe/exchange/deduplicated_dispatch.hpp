// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file exchange/deduplicated_dispatch.hpp
/// \brief Expert-parallel dispatch that sends a token's hidden state once per destination
/// rank, however many of its kept experts live there (DeepEP's dispatch): the send rows,
/// and for every kept assignment the row of its token within the block sent to its rank,
/// which the receiver uses to expand the rows into its experts' segments. With chunks (the
/// pipelined exchange, docs/parallel.md), a rank's block is ordered by the first chunk that
/// needs each token there, then by token, so that chunk c's rows arrive with chunk c.

#include <kmoe/types.hpp>

#include <vector>

namespace kmoe {

template <class ExecSpace>
class DeduplicatedDispatch {
 public:
  using memory_space = typename ExecSpace::memory_space;

  /// Token of each send row; rows grouped by destination rank, then by first chunk, tokens
  /// ascending within.
  Vector<int, ExecSpace> token;
  /// For each kept assignment row of the Dispatch (key order): the row of its token within
  /// the block sent to the assignment's destination rank.
  Vector<int, ExecSpace> link;
  /// Send rows per destination rank (the number of distinct tokens with a kept expert there).
  std::vector<std::int64_t> rows_per_rank;
  /// Send rows per (destination rank, chunk), at [rank * chunks + chunk]: the tokens whose
  /// first kept expert chunk at that rank is this one.
  std::vector<std::int64_t> rows_per_chunk;
  std::int64_t rows_total = 0;

  /// \param position    the Dispatch's row of each (token, slot), -1 when empty or dropped
  /// \param expert      the routing plan's global expert of each (token, slot)
  /// \param expert_rank EP rank owning each global expert
  /// \param ranks       EP group size
  /// \param kept_total  the Dispatch's kept assignments (the length of `link`)
  /// \param expert_chunk chunk of each global expert in [0, chunks) (empty: all chunk 0)
  /// \param chunks      chunks of the pipelined exchange (1: unchunked)
  void build(const Matrix<int, ExecSpace>& position, const Matrix<int, ExecSpace>& expert,
             const Vector<int, ExecSpace>& expert_rank, int ranks, std::int64_t kept_total,
             const Vector<int, ExecSpace>& expert_chunk = {}, int chunks = 1) {
    const int tokens = int(position.extent(0)), slots = int(position.extent(1));
    const int blocks = ranks * chunks;  // (rank, chunk) blocks of the send rows
    detail::ensure_extents(row_, "kmoe::DeduplicatedDispatch::row", blocks, tokens);
    detail::ensure_extents(begin_, "kmoe::DeduplicatedDispatch::begin", blocks + 1);
    detail::ensure_extents(link, "kmoe::DeduplicatedDispatch::link", std::size_t(kept_total));
    const auto row = row_;
    const auto begin = begin_;
    const auto pos = position;
    const auto owner = expert_rank;
    const auto chunk_of = expert_chunk;
    const bool chunked = chunks > 1;

    // 1. Which (rank, chunk) blocks each token goes to: at each rank, the first chunk among
    //    its kept experts there (one thread per token: no races).
    Kokkos::parallel_for(
        "kmoe::DeduplicatedDispatch::destinations", Kokkos::RangePolicy<ExecSpace>(0, tokens),
        KOKKOS_LAMBDA(int t) {
          for (int b = 0; b < blocks; ++b) row(b, t) = 0;
          for (int r = 0; r < ranks; ++r) {
            int first = chunks;
            for (int s = 0; s < slots; ++s)
              if (pos(t, s) >= 0 && owner(expert(t, s)) == r) {
                const int c = chunked ? chunk_of(expert(t, s)) : 0;
                first = c < first ? c : first;
              }
            if (first < chunks) row(r * chunks + first, t) = 1;
          }
        });
    // 2. Exclusive scan in (rank, chunk, token) order numbers the send rows; begin(b) is the
    //    first row of block b.
    Kokkos::deep_copy(begin_, 0);
    Kokkos::parallel_scan(
        "kmoe::DeduplicatedDispatch::number", Kokkos::RangePolicy<ExecSpace>(0, blocks * tokens),
        KOKKOS_LAMBDA(int idx, int& running, bool final) {
          const int b = idx / tokens, t = idx % tokens;
          const int sends = row(b, t);
          if (final) {
            row(b, t) = sends ? running : -1;
            if (t == 0) begin(b) = running;
          }
          running += sends;
          if (final && idx == blocks * tokens - 1) begin(blocks) = running;
        });
    auto begin_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), begin_);
    rows_per_rank.assign(ranks, 0);
    rows_per_chunk.assign(blocks, 0);
    for (int b = 0; b < blocks; ++b) {
      rows_per_chunk[b] = begin_host(b + 1) - begin_host(b);
      rows_per_rank[b / chunks] += rows_per_chunk[b];
    }
    rows_total = begin_host(blocks);

    // 3. The token of each send row, and each kept assignment's row within its rank's block.
    detail::ensure_extents(token, "kmoe::DeduplicatedDispatch::token", std::size_t(rows_total));
    const auto token_of = token;
    Kokkos::parallel_for(
        "kmoe::DeduplicatedDispatch::tokens", Kokkos::RangePolicy<ExecSpace>(0, blocks * tokens),
        KOKKOS_LAMBDA(int idx) {
          const int b = idx / tokens, t = idx % tokens;
          if (row(b, t) >= 0) token_of(row(b, t)) = t;
        });
    const auto link_of = link;
    Kokkos::parallel_for(
        "kmoe::DeduplicatedDispatch::links", Kokkos::RangePolicy<ExecSpace>(0, tokens * slots),
        KOKKOS_LAMBDA(int i) {
          const int t = i / slots, s = i % slots;
          if (pos(t, s) < 0) return;
          const int r = owner(expert(t, s));
          for (int c = 0; c < chunks; ++c)
            if (row(r * chunks + c, t) >= 0)
              link_of(pos(t, s)) = row(r * chunks + c, t) - begin(r * chunks);
        });
  }

 private:
  /// [rank * chunks + chunk, token]: the send row, or -1
  Kokkos::View<int**, Kokkos::LayoutRight, memory_space> row_;
  Vector<int, ExecSpace> begin_;
};

}  // namespace kmoe
