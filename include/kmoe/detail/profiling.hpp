// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file profiling.hpp
/// \brief Named regions and labelled fences for Kokkos Tools (space-time-stack, the NVTX
/// connector, Caliper), so that a profile shows the layer's phases around its kernels.
/// Without a tool loaded Kokkos skips the callbacks itself; a region then costs the
/// construction of its name string.

#include <Kokkos_Core.hpp>
// Kokkos::Profiling::ScopedRegion first shipped in Kokkos 4.1.
#if KOKKOS_VERSION >= 40100
#include <Kokkos_Profiling_ScopedRegion.hpp>
#endif

#include <string>

namespace kmoe::detail {

#if KOKKOS_VERSION >= 40100
using ProfilingRegion = Kokkos::Profiling::ScopedRegion;
#else
/// Kokkos::Profiling::ScopedRegion for Kokkos before 4.1: pushes the region on
/// construction and pops it on destruction, so that the tool's region stack stays balanced
/// when an exception leaves the scope.
class ProfilingRegion {
 public:
  explicit ProfilingRegion(const std::string& name) { Kokkos::Profiling::pushRegion(name); }
  ~ProfilingRegion() { Kokkos::Profiling::popRegion(); }
  ProfilingRegion(const ProfilingRegion&) = delete;
  ProfilingRegion& operator=(const ProfilingRegion&) = delete;
};
#endif

/// Waits for the work submitted to `space`, naming the fence to Kokkos Tools where Kokkos
/// takes a name (labelled fences first shipped in Kokkos 3.5).
template <class ExecSpace>
void labelled_fence(const ExecSpace& space, const char* label) {
#if KOKKOS_VERSION >= 30500
  space.fence(label);
#else
  static_cast<void>(label);
  space.fence();
#endif
}

}  // namespace kmoe::detail
