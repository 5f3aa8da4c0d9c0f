// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file sharding.hpp
/// \brief Where a rank's parameter tensor sits in the unsharded model: the global identity
/// of each element, so that initialisation, global gradient norms and checkpoints mean
/// the same thing on every parallel layout (docs/parallel.md, "Global identity of
/// parameters").

#include <kmoe/error.hpp>

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace kmoe {

/// \brief What a tensor is for, so that initialisation can follow the role (Megatron's
/// init_method for inputs, output_layer_init_method for projections back to H).
enum class ParameterRole {
  other,              ///< anything a custom policy does not classify
  router,             ///< router (gate) weights
  input_projection,   ///< expert H -> F projections (w_gate, w_up, w1)
  output_projection,  ///< expert F -> H projections (w_down, w2)
  bias                ///< expert biases
};

/// \brief Sharding of one tensor over the parallel layout. The policy that owns the tensor
/// names its axes; the layer fills in which experts and which F shard this rank holds.
struct ShardMap {
  int expert_axis = -1;             ///< axis indexing experts (-1: the tensor has none)
  int ffn_axis = -1;                ///< axis split over tensor-parallel ranks (-1: not split)
  std::vector<int> experts;         ///< global expert of each local index (empty: identity)
  std::int64_t global_experts = 0;  ///< experts in the unsharded tensor (0: as held)
  int ffn_rank = 0;                 ///< this rank's F shard
  int ffn_ranks = 1;                ///< F shards in all (1: the F axis is whole here)
  /// Routed-expert tensors are sharded over EP and replicated over DP; everything else
  /// (router, shared experts) is replicated over every rank.
  bool expert_parallel = false;

  /// Extents of the unsharded tensor, given this rank's extents.
  std::vector<std::int64_t> global_shape(const std::vector<std::int64_t>& local) const {
    std::vector<std::int64_t> global(local);
    if (expert_axis >= 0 && global_experts > 0) global[std::size_t(expert_axis)] = global_experts;
    if (ffn_axis >= 0) global[std::size_t(ffn_axis)] *= ffn_ranks;
    return global;
  }

  /// Checks the map against the tensor's extents (a policy's axes beyond its rank, or a
  /// placement listing a different number of experts, is a kmoe or policy bug made loud).
  void validate(const std::string& name, const std::vector<std::int64_t>& local) const {
    const int rank = int(local.size());
    require(expert_axis >= -1 && expert_axis < rank, "kmoe::ShardMap",
            ("expert_axis of " + name).c_str(), expert_axis,
            "must name an axis of the tensor or be -1");
    require(ffn_axis >= -1 && ffn_axis < rank, "kmoe::ShardMap", ("ffn_axis of " + name).c_str(),
            ffn_axis, "must name an axis of the tensor or be -1");
    if (expert_axis >= 0 && !experts.empty())
      require(std::int64_t(experts.size()) == local[std::size_t(expert_axis)], "kmoe::ShardMap",
              ("experts of " + name).c_str(), experts.size(),
              "must list one global index per local expert");
    require(ffn_ranks >= 1 && ffn_rank >= 0 && ffn_rank < ffn_ranks, "kmoe::ShardMap",
            ("ffn_rank of " + name).c_str(), ffn_rank, "must lie in [0, ffn_ranks)");
  }
};

/// \brief Maps flat indices of a rank's tensor to flat indices of the unsharded tensor,
/// on the host or inside a kernel (up to rank 4, the most any kmoe tensor has).
struct GlobalIndexMap {
  static constexpr int max_rank = 4;
  int rank = 0;
  std::int64_t local[max_rank] = {1, 1, 1, 1};
  std::int64_t global[max_rank] = {1, 1, 1, 1};
  int expert_axis = -1, ffn_axis = -1;
  std::int64_t ffn_offset = 0;
  const int* experts = nullptr;  ///< global expert per local one, in the kernel's memory

  KOKKOS_INLINE_FUNCTION std::int64_t operator()(std::int64_t i) const {
    std::int64_t coordinate[max_rank] = {0, 0, 0, 0};
    for (int a = rank - 1; a >= 0; --a) {
      coordinate[a] = i % local[a];
      i /= local[a];
    }
    if (expert_axis >= 0 && experts) coordinate[expert_axis] = experts[coordinate[expert_axis]];
    if (ffn_axis >= 0) coordinate[ffn_axis] += ffn_offset;
    std::int64_t g = 0;
    for (int a = 0; a < rank; ++a) g = g * global[a] + coordinate[a];
    return g;
  }
};

}  // namespace kmoe
