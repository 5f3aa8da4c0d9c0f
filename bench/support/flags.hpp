// SPDX-License-Identifier: BSD-3-Clause
#pragma once
// The benchmarks' integer flags ("--tokens 2048"): a malformed or out-of-range value exits 1
// naming the program, the flag and the value instead of running a shape nobody asked for.
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace kmoe::bench {

/// The value after `flag` in [minimum, 2^20], or `fallback` where the flag is absent.
inline int integer_flag(int argc, char** argv, const char* flag, int fallback, int minimum = 1) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], flag) != 0) continue;
    char* end = nullptr;
    const long value = std::strtol(argv[i + 1], &end, 10);
    if (end == argv[i + 1] || *end != '\0' || value < minimum || value > 1 << 20) {
      std::fprintf(stderr, "%s: %s %s: expected an integer in [%d, 2^20]\n", argv[0], flag,
                   argv[i + 1], minimum);
      std::exit(1);
    }
    return int(value);
  }
  return fallback;
}

}  // namespace kmoe::bench
