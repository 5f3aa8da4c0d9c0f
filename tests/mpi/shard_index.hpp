// SPDX-License-Identifier: BSD-3-Clause
#pragma once
// Where an element of a rank's parameter shard sits in the single-rank tensor, computed
// from the shapes alone (independent of the library's ShardMap): the reference side of the
// layout tests.
#include <cstdint>
#include <string>
#include <vector>

namespace kmoe::test {

/// Flat index in the full tensor of element `i` of a shard: routed-expert tensors map axis
/// 0 through `owned`, and an axis narrower in the shard is this TP rank's slice of it.
inline std::size_t full_index(const std::vector<std::int64_t>& full_shape,
                              const std::vector<std::int64_t>& shard_shape, std::size_t i,
                              const std::vector<int>& owned, int tp_rank) {
  std::vector<std::int64_t> index(shard_shape.size());
  for (int a = int(shard_shape.size()) - 1; a >= 0; --a) {
    index[a] = std::int64_t(i % std::size_t(shard_shape[a]));
    i /= std::size_t(shard_shape[a]);
  }
  if (!owned.empty()) index[0] = owned[index[0]];
  for (std::size_t a = 1; a < shard_shape.size(); ++a)
    if (shard_shape[a] != full_shape[a]) index[a] += tp_rank * shard_shape[a];
  std::size_t flat = 0;
  for (std::size_t a = 0; a < full_shape.size(); ++a)
    flat = flat * std::size_t(full_shape[a]) + std::size_t(index[a]);
  return flat;
}

/// The routed experts' tensors (the shipped policies' default name); the rest is replicated.
inline bool is_routed_expert(const std::string& name) { return name.rfind("experts.", 0) == 0; }

}  // namespace kmoe::test
