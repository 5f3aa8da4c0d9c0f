// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file peak_memory.hpp
/// \brief The process's peak resident host memory, as the kernel counts it.

#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>

namespace kmoe {

/// \brief Peak resident set size of this process in bytes (Linux: VmHWM of
/// /proc/self/status), or -1 where the system does not report it. Host memory only: device
/// allocations on a GPU are not part of it.
inline std::int64_t peak_resident_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) != 0) continue;
    std::istringstream fields(line.substr(6));
    std::int64_t kibibytes = -1;
    std::string unit;
    if (fields >> kibibytes >> unit && unit == "kB") return kibibytes * 1024;
    return -1;
  }
  return -1;
}

}  // namespace kmoe
