// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file allocation_tracker.hpp
/// \brief kmoe::AllocationTracker: the bytes of Kokkos allocations live in this process and
/// their peak inside each named profiling region (the layer's phases), counted by Kokkos
/// Tools callbacks (docs/training.md, "Memory accounting").
///
/// While a tracker lives, its callbacks see every Kokkos allocation and deallocation (any
/// memory space, any thread) and every region push and pop; the callbacks that were set
/// before (a loaded Kokkos tool) still run, after the tracker's. Allocations made before the
/// tracker started are not counted, nor is memory Kokkos does not allocate (MPI's buffers,
/// the host's std::vector, a GEMM library's workspace).

#include <kmoe/error.hpp>

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace kmoe {

/// \brief Counts live Kokkos allocation bytes and their peak per profiling region; one at a
/// time per process (constructing a second raises kmoe::invalid_argument).
class AllocationTracker {
 public:
  AllocationTracker() {
    std::lock_guard<std::mutex> lock(state().mutex);
    require(state().active == nullptr, "kmoe::AllocationTracker", "active trackers", 1,
            "only one tracker may count at a time");
    state().active = this;
    namespace tools = Kokkos::Tools::Experimental;
    previous_ = tools::get_callbacks();
    tools::set_allocate_data_callback(&on_allocate);
    tools::set_deallocate_data_callback(&on_deallocate);
    tools::set_push_region_callback(&on_push);
    tools::set_pop_region_callback(&on_pop);
  }
  ~AllocationTracker() {
    namespace tools = Kokkos::Tools::Experimental;
    tools::set_allocate_data_callback(previous_.allocate_data);
    tools::set_deallocate_data_callback(previous_.deallocate_data);
    tools::set_push_region_callback(previous_.push_region);
    tools::set_pop_region_callback(previous_.pop_region);
    std::lock_guard<std::mutex> lock(state().mutex);
    state().active = nullptr;
  }
  AllocationTracker(const AllocationTracker&) = delete;
  AllocationTracker& operator=(const AllocationTracker&) = delete;

  /// The tracker counting now, or nullptr.
  static const AllocationTracker* active() {
    std::lock_guard<std::mutex> lock(state().mutex);
    return state().active;
  }

  /// Bytes of the allocations made since the tracker started and not freed yet.
  std::int64_t live_bytes() const {
    std::lock_guard<std::mutex> lock(state().mutex);
    return live_;
  }
  /// The most live_bytes() has been since the tracker started or reset_peak().
  std::int64_t peak_bytes() const {
    std::lock_guard<std::mutex> lock(state().mutex);
    return peak_;
  }
  void reset_peak() {
    std::lock_guard<std::mutex> lock(state().mutex);
    peak_ = live_;
  }
  /// Peak live bytes during the latest run of the region `name` ("kmoe::MoELayer::experts");
  /// a region run several times inside one run of its enclosing region (the two exchanges
  /// of a forward) reports the highest. -1 for a region not seen.
  std::int64_t region_peak_bytes(const std::string& name) const {
    std::lock_guard<std::mutex> lock(state().mutex);
    const auto found = regions_.find(name);
    return found == regions_.end() ? -1 : found->second.peak;
  }

 private:
  struct Frame {
    std::string name;
    std::uint64_t id = 0, parent = 0;
    std::int64_t peak = 0;
  };
  struct RegionPeak {
    std::uint64_t parent = 0;  ///< the run of the enclosing region it was measured in
    std::int64_t peak = 0;
  };
  struct Shared {
    std::mutex mutex;
    AllocationTracker* active = nullptr;
  };
  static Shared& state() {
    static Shared shared;
    return shared;
  }

  static void on_allocate(Kokkos::Profiling::SpaceHandle space, const char* label, const void* ptr,
                          std::uint64_t size) {
    AllocationTracker* self = nullptr;
    {
      std::lock_guard<std::mutex> lock(state().mutex);
      self = state().active;
      if (self) {
        self->sizes_[ptr] = std::int64_t(size);
        self->live_ += std::int64_t(size);
        self->peak_ = std::max(self->peak_, self->live_);
        for (auto& frame : self->frames_) frame.peak = std::max(frame.peak, self->live_);
      }
    }
    if (self && self->previous_.allocate_data)
      self->previous_.allocate_data(space, label, ptr, size);
  }
  static void on_deallocate(Kokkos::Profiling::SpaceHandle space, const char* label,
                            const void* ptr, std::uint64_t size) {
    AllocationTracker* self = nullptr;
    {
      std::lock_guard<std::mutex> lock(state().mutex);
      self = state().active;
      if (self) {
        // An allocation made before the tracker started is not in the count.
        const auto found = self->sizes_.find(ptr);
        if (found != self->sizes_.end()) {
          self->live_ -= found->second;
          self->sizes_.erase(found);
        }
      }
    }
    if (self && self->previous_.deallocate_data)
      self->previous_.deallocate_data(space, label, ptr, size);
  }
  static void on_push(const char* name) {
    AllocationTracker* self = nullptr;
    {
      std::lock_guard<std::mutex> lock(state().mutex);
      self = state().active;
      if (self) {
        const std::uint64_t parent = self->frames_.empty() ? 0 : self->frames_.back().id;
        self->frames_.push_back({name, ++self->runs_, parent, self->live_});
      }
    }
    if (self && self->previous_.push_region) self->previous_.push_region(name);
  }
  static void on_pop() {
    AllocationTracker* self = nullptr;
    {
      std::lock_guard<std::mutex> lock(state().mutex);
      self = state().active;
      if (self && !self->frames_.empty()) {
        const Frame frame = self->frames_.back();
        self->frames_.pop_back();
        RegionPeak& region = self->regions_[frame.name];
        const bool same_run = region.parent == frame.parent && frame.parent != 0;
        region.peak = same_run ? std::max(region.peak, frame.peak) : frame.peak;
        region.parent = frame.parent;
      }
    }
    if (self && self->previous_.pop_region) self->previous_.pop_region();
  }

  Kokkos::Tools::Experimental::EventSet previous_{};
  std::unordered_map<const void*, std::int64_t> sizes_;
  std::int64_t live_ = 0, peak_ = 0;
  std::vector<Frame> frames_;
  std::uint64_t runs_ = 0;
  std::map<std::string, RegionPeak> regions_;
};

}  // namespace kmoe
