// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file placement_change.hpp
/// \brief Moving from one ExpertPlacement to another of the same shape: which slots change
/// expert and where each takes its values from (placement_moves), and the move of one
/// per-expert tensor's slices between the EP ranks through the communicator
/// (move_expert_slices). MoELayer::apply_placement moves the weights and optimizer state
/// with them.

#include <kmoe/error.hpp>
#include <kmoe/placement/expert_placement.hpp>
#include <kmoe/types.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace kmoe {

/// \brief Slot `to` of the new placement takes the values of slot `from` of the old one.
struct SlotMove {
  int from = 0, to = 0;
};

/// \brief The slots of `after` whose logical expert differs from `before`'s, in slot order,
/// each fed from the first replica (lowest slot) of its expert under `before`. Both
/// placements must have the same ranks, slots and experts.
inline std::vector<SlotMove> placement_moves(const ExpertPlacement& before,
                                             const ExpertPlacement& after) {
  constexpr const char* where = "kmoe::placement_moves";
  before.validate(where);
  after.validate(where);
  require(after.ranks == before.ranks, where, "after.ranks", after.ranks,
          "must equal the current placement's " + std::to_string(before.ranks));
  require(after.slots_per_rank == before.slots_per_rank, where, "after.slots_per_rank",
          after.slots_per_rank,
          "must equal the current placement's " + std::to_string(before.slots_per_rank) +
              " (each rank's expert objects keep their size)");
  require(after.logical_experts == before.logical_experts, where, "after.logical_experts",
          after.logical_experts,
          "must equal the current placement's " + std::to_string(before.logical_experts));
  const auto sources = before.replicas();
  std::vector<SlotMove> moves;
  for (int slot = 0; slot < after.physical_experts(); ++slot)
    if (after.logical[slot] != before.logical[slot])
      moves.push_back({sources[after.logical[slot]].front(), slot});
  return moves;
}

/// \brief Applies `moves` to one per-expert tensor held as `slots_per_rank` contiguous
/// slices on each EP rank (`tensor`, this rank's slots), with one all-to-all-v over `ep`:
/// every slice that moves is read before any is written, so a slot may both send and
/// receive. Returns the bytes this rank sent (its own slices moving within the rank
/// included).
template <class Communicator, class View>
std::int64_t move_expert_slices(Communicator& ep, const std::vector<SlotMove>& moves,
                                int slots_per_rank, const View& tensor) {
  using T = typename View::non_const_value_type;
  const int ranks = ep.size(), me = ep.rank();
  const std::size_t width = tensor.size() / std::size_t(slots_per_rank);
  const auto rank_of = [&](int slot) { return slot / slots_per_rank; };
  std::vector<std::int64_t> send_counts(std::size_t(ranks), 0), recv_counts(std::size_t(ranks), 0);
  // Messages to (from) each rank hold their slices in the order of `to`, the moves' order.
  std::vector<SlotMove> sending, receiving;
  for (int q = 0; q < ranks; ++q)
    for (const SlotMove& m : moves)
      if (rank_of(m.from) == me && rank_of(m.to) == q) {
        sending.push_back(m);
        send_counts[std::size_t(q)] += std::int64_t(width);
      }
  for (int r = 0; r < ranks; ++r)
    for (const SlotMove& m : moves)
      if (rank_of(m.to) == me && rank_of(m.from) == r) {
        receiving.push_back(m);
        recv_counts[std::size_t(r)] += std::int64_t(width);
      }
  using Buffer = Kokkos::View<T*, typename View::memory_space>;
  Buffer send("kmoe::move_expert_slices::send", sending.size() * width);
  Buffer recv("kmoe::move_expert_slices::recv", receiving.size() * width);
  const auto slice = [&](const auto& view, std::size_t index) {
    return Kokkos::subview(view, std::make_pair(index * width, (index + 1) * width));
  };
  for (std::size_t i = 0; i < sending.size(); ++i)
    Kokkos::deep_copy(slice(send, i),
                      slice(tensor, std::size_t(sending[i].from - me * slots_per_rank)));
  ep.all_to_all_v(send, send_counts, recv, recv_counts);
  for (std::size_t i = 0; i < receiving.size(); ++i)
    Kokkos::deep_copy(slice(tensor, std::size_t(receiving[i].to - me * slots_per_rank)),
                      slice(recv, i));
  return std::int64_t(sending.size() * width * sizeof(T));
}

}  // namespace kmoe
