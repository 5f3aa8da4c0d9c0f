// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file exchange/deduplicated_dispatch.hpp
/// \brief Expert-parallel dispatch that sends a token's hidden state once per destination
/// rank, however many of its kept experts live there (DeepEP's dispatch): the send rows,
/// and for every kept assignment the row of its token within the block sent to its rank,
/// which the receiver uses to expand the rows into its experts' segments.

#include <kmoe/types.hpp>

#include <vector>

namespace kmoe {

template <class ExecSpace>
class DeduplicatedDispatch {
 public:
  using memory_space = typename ExecSpace::memory_space;

  /// Token of each send row; rows grouped by destination rank, tokens ascending within.
  Vector<int, ExecSpace> token;
  /// For each kept assignment row of the Dispatch (key order): the row of its token within
  /// the block sent to the assignment's destination rank.
  Vector<int, ExecSpace> link;
  /// Send rows per destination rank (the number of distinct tokens with a kept expert there).
  std::vector<std::int64_t> rows_per_rank;
  std::int64_t rows_total = 0;

  /// \param position    the Dispatch's row of each (token, slot), -1 when empty or dropped
  /// \param expert      the routing plan's global expert of each (token, slot)
  /// \param expert_rank EP rank owning each global expert
  /// \param ranks       EP group size
  /// \param kept_total  the Dispatch's kept assignments (the length of `link`)
  void build(const Matrix<int, ExecSpace>& position, const Matrix<int, ExecSpace>& expert,
             const Vector<int, ExecSpace>& expert_rank, int ranks, std::int64_t kept_total) {
    const int tokens = int(position.extent(0)), slots = int(position.extent(1));
    detail::ensure_extents(row_, "kmoe::DeduplicatedDispatch::row", ranks, tokens);
    detail::ensure_extents(begin_, "kmoe::DeduplicatedDispatch::begin", ranks + 1);
    detail::ensure_extents(link, "kmoe::DeduplicatedDispatch::link", std::size_t(kept_total));
    const auto row = row_;
    const auto begin = begin_;
    const auto pos = position;
    const auto owner = expert_rank;

    // 1. Which ranks each token goes to (one thread per token: no races).
    Kokkos::parallel_for(
        "kmoe::DeduplicatedDispatch::destinations", Kokkos::RangePolicy<ExecSpace>(0, tokens),
        KOKKOS_LAMBDA(int t) {
          for (int r = 0; r < ranks; ++r) row(r, t) = 0;
          for (int s = 0; s < slots; ++s)
            if (pos(t, s) >= 0) row(owner(expert(t, s)), t) = 1;
        });
    // 2. Exclusive scan in (rank, token) order numbers the send rows; begin(r) is the first
    //    row of rank r's block.
    Kokkos::deep_copy(begin_, 0);
    Kokkos::parallel_scan(
        "kmoe::DeduplicatedDispatch::number", Kokkos::RangePolicy<ExecSpace>(0, ranks * tokens),
        KOKKOS_LAMBDA(int idx, int& running, bool final) {
          const int r = idx / tokens, t = idx % tokens;
          const int sends = row(r, t);
          if (final) {
            row(r, t) = sends ? running : -1;
            if (t == 0) begin(r) = running;
          }
          running += sends;
          if (final && idx == ranks * tokens - 1) begin(ranks) = running;
        });
    auto begin_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), begin_);
    rows_per_rank.assign(ranks, 0);
    for (int r = 0; r < ranks; ++r) rows_per_rank[r] = begin_host(r + 1) - begin_host(r);
    rows_total = begin_host(ranks);

    // 3. The token of each send row, and each kept assignment's row within its rank's block.
    detail::ensure_extents(token, "kmoe::DeduplicatedDispatch::token", std::size_t(rows_total));
    const auto token_of = token;
    Kokkos::parallel_for(
        "kmoe::DeduplicatedDispatch::tokens", Kokkos::RangePolicy<ExecSpace>(0, ranks * tokens),
        KOKKOS_LAMBDA(int idx) {
          const int r = idx / tokens, t = idx % tokens;
          if (row(r, t) >= 0) token_of(row(r, t)) = t;
        });
    const auto link_of = link;
    Kokkos::parallel_for(
        "kmoe::DeduplicatedDispatch::links", Kokkos::RangePolicy<ExecSpace>(0, tokens * slots),
        KOKKOS_LAMBDA(int i) {
          const int t = i / slots, s = i % slots;
          if (pos(t, s) < 0) return;
          const int r = owner(expert(t, s));
          link_of(pos(t, s)) = row(r, t) - begin(r);
        });
  }

 private:
  Kokkos::View<int**, Kokkos::LayoutRight, memory_space> row_;  ///< [rank, token] send row or -1
  Vector<int, ExecSpace> begin_;
};

}  // namespace kmoe
