// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file phase_clock.hpp
/// \brief Wall time per phase of a layer call (LayerOptions::time_phases).

#include <kmoe/detail/profiling.hpp>

#include <chrono>

namespace kmoe::detail {

/// Adds the time since the previous lap to a phase's total, fencing the layer's execution
/// space first so that the asynchronous kernels of the phase are counted; does nothing when
/// disabled.
template <class X>
class PhaseClock {
 public:
  explicit PhaseClock(bool enabled) : enabled_(enabled) {
    if (enabled_) {
      labelled_fence(X(), "kmoe::MoELayer::time_phases");
      last_ = std::chrono::steady_clock::now();
    }
  }
  void lap(double& total_ms) {
    if (!enabled_) return;
    labelled_fence(X(), "kmoe::MoELayer::time_phases");
    const auto now = std::chrono::steady_clock::now();
    total_ms += std::chrono::duration<double, std::milli>(now - last_).count();
    last_ = now;
  }

 private:
  bool enabled_;
  std::chrono::steady_clock::time_point last_;
};

}  // namespace kmoe::detail
