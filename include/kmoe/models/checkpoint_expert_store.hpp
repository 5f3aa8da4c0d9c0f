// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file checkpoint_expert_store.hpp
/// \brief An ExpertStore (memory/host_expert_store.hpp) that reads each expert's tensors
/// from a Hugging Face checkpoint when a forward needs them: lazy loading for
/// kmoe::ResidentExperts, so that a block whose experts exceed memory runs with only its
/// resident experts in memory.
///
/// The file stays the backing store, in its own dtype: a read converts one expert's slice
/// (SafetensorsFile::read_range_into reads only its bytes) to the compute scalar. Files are
/// read with pread rather than mapped: a mapped file truncated underneath raises SIGBUS in
/// the reading thread, where a pread reports an error naming the file; and the pages read
/// land in the caller's slot, not in the process's RSS a second time as mapped pages would.
/// Before each read the shard is checked to be the file its header came from (size,
/// modification time, inode), so a checkpoint rewritten during a run gives an error naming
/// the file rather than weights from two versions.
///
/// Needs nlohmann-json (link kmoe::io).

#include <kmoe/error.hpp>
#include <kmoe/io/safetensors.hpp>
#include <kmoe/models/config.hpp>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace kmoe::models {

/// \brief Reads slice `t` of the checkpoint (one expert's part of a parameter, or a whole
/// parameter) into `slice` (t.count elements, the kmoe parameter's layout), transposing a
/// transposed slice through `region`.
template <class S>
void read_checkpoint_slice(const io::ShardedCheckpoint& checkpoint, const CheckpointTensor& t,
                           S* slice, std::vector<S>& region) {
  if (!t.transposed()) {
    checkpoint.read_range_into<S>(t.checkpoint, std::uint64_t(t.offset), slice,
                                  std::size_t(t.count));
    return;
  }
  region.resize(std::size_t(t.region_count()));
  checkpoint.read_range_into<S>(t.checkpoint, std::uint64_t(t.offset), region.data(),
                                region.size());
  const std::int64_t rows = t.count / t.region_rows;
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < t.region_rows; ++j)
      slice[i * t.region_rows + j] = region[std::size_t(t.region_index(i, j))];
}

/// \brief The experts of block `b` (the routed ones, parameters "experts.*", or the shared
/// expert, "shared.*", as one expert) read lazily from `checkpoint`. Copies share the
/// checkpoint; reads are thread-safe.
class CheckpointExpertStore {
 public:
  /// \param checkpoint [in] the open checkpoint (resolve_naming has checked its shapes)
  /// \param b          [in] the block, naming resolved against the checkpoint
  /// \param shared     [in] the shared expert instead of the routed experts
  CheckpointExpertStore(std::shared_ptr<const io::ShardedCheckpoint> checkpoint,
                        const MoEBlockConfig& b, bool shared = false)
      : checkpoint_(std::move(checkpoint)), experts_(shared ? 1 : b.experts) {
    const std::string prefix = shared ? "shared." : "experts.";
    for (const CheckpointTensor& t : checkpoint_tensors(b)) {
      if (t.parameter.compare(0, prefix.size(), prefix) != 0) continue;
      auto& slices = slices_[t.parameter];
      slices.resize(std::size_t(experts_));
      slices[std::size_t(std::max(t.expert, 0))] = t;
      expert_bytes_ +=
          t.region_count() * std::int64_t(io::dtype_size(checkpoint_->info(t.checkpoint).dtype));
    }
    expert_bytes_ /= experts_;  // every expert's slices were summed
    require(!slices_.empty(), "kmoe::models::CheckpointExpertStore", "shared",
            shared ? "true" : "false", "the block has no such experts");
  }

  int num_experts() const { return experts_; }

  std::int64_t expert_elements(const std::string& parameter) const {
    return slices(parameter).front().count;
  }

  /// Bytes read from the checkpoint for one expert (its dtype; a transposed slice reads its
  /// whole region).
  std::int64_t expert_storage_bytes() const { return expert_bytes_; }

  template <class S>
  void read(const std::string& parameter, int expert, S* dst) const {
    require(expert >= 0 && expert < experts_, "kmoe::models::CheckpointExpertStore::read", "expert",
            expert, "must lie in [0, " + std::to_string(experts_) + ")");
    const CheckpointTensor& t = slices(parameter)[std::size_t(expert)];
    checkpoint_->require_unchanged(t.checkpoint);
    std::vector<S> region;
    read_checkpoint_slice(*checkpoint_, t, dst, region);
  }

  const io::ShardedCheckpoint& checkpoint() const { return *checkpoint_; }

 private:
  const std::vector<CheckpointTensor>& slices(const std::string& parameter) const {
    const auto it = slices_.find(parameter);
    if (it == slices_.end())
      throw invalid_argument("kmoe::models::CheckpointExpertStore", "parameter", parameter,
                             "has no tensor in checkpoint " + checkpoint_->directory());
    return it->second;
  }

  std::shared_ptr<const io::ShardedCheckpoint> checkpoint_;
  int experts_ = 0;
  std::int64_t expert_bytes_ = 0;
  std::map<std::string, std::vector<CheckpointTensor>> slices_;  ///< per parameter, per expert
};

}  // namespace kmoe::models
