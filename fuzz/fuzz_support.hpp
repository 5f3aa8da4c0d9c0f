// SPDX-License-Identifier: BSD-3-Clause
#pragma once
// Shared by the libFuzzer targets: a scratch directory per fuzzing process, and the rule
// that a kmoe error is the expected outcome for bad input while anything else (another
// exception, a sanitizer report, a crash) is a finding.

#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "kmoe/error.hpp"

namespace kmoe_fuzz {

/// A directory private to this process, created on first use and reused by every input.
inline const std::filesystem::path& scratch() {
  static const std::filesystem::path dir = [] {
    const char* base = std::getenv("KMOE_FUZZ_SCRATCH");
    auto d =
        std::filesystem::path(base ? base : "/tmp") / ("kmoe-fuzz-" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    return d;
  }();
  return dir;
}

inline void write_file(const std::filesystem::path& path, const std::uint8_t* data,
                       std::size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
}

/// Runs `body`; kmoe's own errors are the documented answer to bad input.
template <class Body>
void expect_kmoe_errors_only(const Body& body) {
  try {
    body();
  } catch (const kmoe::invalid_argument&) {
  } catch (const kmoe::runtime_error&) {
  }
}

/// A broken invariant: abort so that libFuzzer records the input.
inline void require(bool condition, const char* what) {
  if (!condition) {
    std::fprintf(stderr, "kmoe fuzz: invariant broken: %s\n", what);
    std::abort();
  }
}

}  // namespace kmoe_fuzz
