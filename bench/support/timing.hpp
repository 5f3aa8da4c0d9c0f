// SPDX-License-Identifier: BSD-3-Clause
#pragma once
// The benchmarks' timing: wall-clock seconds and the median of repeats (a median, not a
// mean, because this machine is shared and a neighbour's burst lands in a few repeats).
#include <algorithm>
#include <chrono>
#include <vector>

namespace kmoe::bench {

using clock_type = std::chrono::steady_clock;

inline double seconds_since(clock_type::time_point start) {
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

/// The upper median of `values` (taken by value: sorted in place); 0 for none (a phase the
/// run's flags skipped).
inline double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values.empty() ? 0.0 : values[values.size() / 2];
}

}  // namespace kmoe::bench
