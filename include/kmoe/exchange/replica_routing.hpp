// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file replica_routing.hpp
/// \brief kmoe::ReplicaRouting: the layer's side of a replicated placement
/// (LayerOptions::expert_placement). Maps each (token, slot)'s logical expert to one of its
/// physical replicas, by token index (token t goes to replica t mod replicas), so the split
/// is deterministic and needs no communication; after backward, sums each replicated
/// expert's gradients over its replicas (an all-reduce over the EP group of the replicated
/// experts' slices only), so that every replica holds the logical expert's gradient and
/// the replicas stay identical through any optimizer.

#include <kmoe/error.hpp>
#include <kmoe/parameters.hpp>
#include <kmoe/placement/expert_placement.hpp>
#include <kmoe/types.hpp>

#include <algorithm>
#include <string>
#include <vector>

namespace kmoe {

template <class ExecSpace, class Scalar>
class ReplicaRouting {
 public:
  using X = ExecSpace;

  ReplicaRouting() = default;
  /// `placement` is validated by the caller; `ep_rank` is this rank's place in it.
  ReplicaRouting(const ExpertPlacement& placement, int ep_rank) : placement_(placement) {
    const int experts = placement.logical_experts, slots = placement.physical_experts();
    const auto held = placement.replicas();
    offsets_ = Vector<int, X>("kmoe::ReplicaRouting::offsets", std::size_t(experts) + 1);
    replica_slots_ = Vector<int, X>("kmoe::ReplicaRouting::slots", std::size_t(slots));
    set_failed(std::vector<char>(std::size_t(slots), 0));
    std::vector<int> row_of_logical(std::size_t(experts), -1);
    for (int e = 0; e < experts; ++e)
      if (held[e].size() > 1) row_of_logical[e] = replicated_++;
    const int per_rank = placement.slots_per_rank;
    local_rows_ = Vector<int, X>("kmoe::ReplicaRouting::local_rows", std::size_t(per_rank));
    auto local_rows = Kokkos::create_mirror_view(local_rows_);
    for (int j = 0; j < per_rank; ++j) {
      const int e = placement.logical[std::size_t(ep_rank) * per_rank + j];
      local_logical_.push_back(e);
      local_rows(j) = row_of_logical[e];
    }
    Kokkos::deep_copy(local_rows_, local_rows);
  }

  bool active() const { return placement_.ranks > 0; }
  int physical_experts() const { return placement_.physical_experts(); }
  /// Logical expert of each of this rank's slots (its experts' global identity).
  const std::vector<int>& local_logical() const { return local_logical_; }
  /// Logical expert of physical slot `slot`.
  int logical_of(int slot) const { return placement_.logical[std::size_t(slot)]; }

  /// Routes only to the slots not `failed` (one flag per slot, failover.hpp); returns the
  /// logical experts left without a healthy replica (their assignments map to -1).
  /// The tables are rebuilt only when the failed set changed (failover calls this every
  /// forward).
  std::vector<int> set_failed(const std::vector<char>& failed) {
    if (failed == failed_) return dead_;
    failed_ = failed;
    const int experts = placement_.logical_experts;
    const auto held = placement_.replicas();
    auto offsets = Kokkos::create_mirror_view(offsets_);
    auto replica_slots = Kokkos::create_mirror_view(replica_slots_);
    std::vector<int> dead;
    int at = 0;
    for (int e = 0; e < experts; ++e) {
      offsets(e) = at;
      for (int slot : held[e])
        if (!failed[std::size_t(slot)]) replica_slots(at++) = slot;
      if (at == offsets(e)) dead.push_back(e);
    }
    offsets(experts) = at;
    Kokkos::deep_copy(offsets_, offsets);
    Kokkos::deep_copy(replica_slots_, replica_slots);
    dead_ = dead;
    return dead;
  }

  /// physical(t, s) = a replica of logical(t, s) chosen by t (or -1 where it is -1 or the
  /// expert has no healthy replica).
  void map(const Matrix<int, X>& logical, const Matrix<int, X>& physical) const {
    const auto offsets = offsets_;
    const auto replica_slots = replica_slots_;
    const int slots = int(logical.extent(1));
    Kokkos::parallel_for(
        "kmoe::ReplicaRouting::map",
        Kokkos::MDRangePolicy<X, Kokkos::Rank<2>>({0, 0}, {int(logical.extent(0)), slots}),
        KOKKOS_LAMBDA(int t, int s) {
          const int e = logical(t, s);
          if (e < 0) {
            physical(t, s) = -1;
            return;
          }
          const int first = offsets(e), count = offsets(e + 1) - first;
          physical(t, s) = count > 0 ? replica_slots(first + t % count) : -1;
        });
  }

  /// Sums every per-expert gradient of `parameters` (this rank's expert slots first on
  /// each tensor) over the replicas of each replicated expert, through `ep`.
  template <class Communicator>
  void sum_replica_gradients(Communicator& ep, const ParameterList<X, Scalar>& parameters) {
    if (replicated_ == 0) return;
    const int per_rank = placement_.slots_per_rank;
    for (const auto& p : parameters) {
      const std::size_t width = p.grad.size() / std::size_t(per_rank);
      const std::size_t rows = std::size_t(replicated_);
      // One buffer, grown to the largest tensor, serves every tensor of every backward.
      detail::ensure_extents(sum_, "kmoe::ReplicaRouting::sum",
                             std::max(sum_.extent(0), rows * width));
      const Kokkos::View<Grad*, typename X::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>
          sum(sum_.data(), rows * width);
      Kokkos::deep_copy(sum, Grad(0));
      const auto grad = p.grad;
      const auto local_rows = local_rows_;
      Kokkos::parallel_for(
          "kmoe::ReplicaRouting::gather", Kokkos::RangePolicy<X>(0, std::size_t(per_rank) * width),
          KOKKOS_LAMBDA(std::size_t i) {
            const int row = local_rows(int(i / width));
            if (row >= 0) sum(std::size_t(row) * width + i % width) = grad(i);
          });
      ep.all_reduce_sum(sum);
      Kokkos::parallel_for(
          "kmoe::ReplicaRouting::scatter", Kokkos::RangePolicy<X>(0, std::size_t(per_rank) * width),
          KOKKOS_LAMBDA(std::size_t i) {
            const int row = local_rows(int(i / width));
            if (row >= 0) grad(i) = sum(std::size_t(row) * width + i % width);
          });
    }
    X().fence();
  }

 private:
  ExpertPlacement placement_;
  int replicated_ = 0;              ///< logical experts with more than one replica
  Vector<int, X> offsets_;          ///< [E + 1] into replica_slots_
  Vector<int, X> replica_slots_;    ///< physical slots of each logical expert, slot order
  Vector<int, X> local_rows_;       ///< row of each local slot's expert in the sum, or -1
  std::vector<int> local_logical_;  ///< logical expert of each local slot
  std::vector<char> failed_;        ///< the failed set the tables were built for
  std::vector<int> dead_;           ///< its logical experts without a healthy replica
  /// Gradients are kept, and summed, in the accumulation type (float for 16-bit storage).
  using Grad = accumulation_t<Scalar>;
  Vector<Grad, X> sum_;  ///< the replica-gradient sum's buffer
};

}  // namespace kmoe
