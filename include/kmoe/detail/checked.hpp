// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file checked.hpp
/// \brief Size arithmetic that cannot wrap: every product or sum of sizes that becomes a
/// view extent, an element count, a byte offset or an MPI count goes through these, so an
/// oversized configuration raises kmoe::invalid_argument naming the parameter and the
/// product instead of wrapping into a small buffer that is later written past.

#include <kmoe/error.hpp>

#include <cstdint>
#include <limits>
#include <string>

namespace kmoe::detail {

/// The largest size kmoe accepts for any extent or element count. Kokkos 3.4 stores view
/// extents in 32 bits in places, and MPI counts are `int`; the per-use bounds below are
/// tighter where the consumer is.
constexpr std::int64_t max_size = std::numeric_limits<std::int64_t>::max() / 2;

/// a * b, or kmoe::invalid_argument "<where>: invalid <parameter> = a x b: ..." when either
/// factor is negative or the product exceeds `limit`.
inline std::int64_t checked_mul(std::int64_t a, std::int64_t b, const char* where,
                                const char* parameter, std::int64_t limit = max_size) {
  const auto shown = [&] { return std::to_string(a) + " x " + std::to_string(b); };
  if (a < 0 || b < 0) throw invalid_argument(where, parameter, shown(), "sizes must be >= 0");
  if (a != 0 && b > limit / a)
    throw invalid_argument(where, parameter, shown(),
                           "the product exceeds " + std::to_string(limit));
  return a * b;
}

/// a * b * c with the same checks (the intermediate product is checked too).
inline std::int64_t checked_mul(std::int64_t a, std::int64_t b, std::int64_t c, const char* where,
                                const char* parameter, std::int64_t limit = max_size) {
  const auto shown = [&] {
    return std::to_string(a) + " x " + std::to_string(b) + " x " + std::to_string(c);
  };
  if (a < 0 || b < 0 || c < 0)
    throw invalid_argument(where, parameter, shown(), "sizes must be >= 0");
  if ((a != 0 && b > limit / a) || (a * b != 0 && c > limit / (a * b)))
    throw invalid_argument(where, parameter, shown(),
                           "the product exceeds " + std::to_string(limit));
  return a * b * c;
}

/// a + b for sizes, with the same checks.
inline std::int64_t checked_add(std::int64_t a, std::int64_t b, const char* where,
                                const char* parameter, std::int64_t limit = max_size) {
  const auto shown = [&] { return std::to_string(a) + " + " + std::to_string(b); };
  if (a < 0 || b < 0) throw invalid_argument(where, parameter, shown(), "sizes must be >= 0");
  if (a > limit - b)
    throw invalid_argument(where, parameter, shown(), "the sum exceeds " + std::to_string(limit));
  return a + b;
}

/// `value` rounded up to a multiple of `alignment` (>= 1), checked.
inline std::int64_t checked_round_up(std::int64_t value, std::int64_t alignment, const char* where,
                                     const char* parameter, std::int64_t limit = max_size) {
  const std::int64_t padded = checked_add(value, alignment - 1, where, parameter, limit);
  return padded / alignment * alignment;
}

/// `value` as an `int` (MPI counts, Kokkos 3.4 32-bit extents), or invalid_argument.
inline int checked_int(std::int64_t value, const char* where, const char* parameter) {
  if (value < 0 || value > std::numeric_limits<int>::max())
    throw invalid_argument(where, parameter, std::to_string(value),
                           "must lie in [0, " + std::to_string(std::numeric_limits<int>::max()) +
                               "] (an int count)");
  return int(value);
}

}  // namespace kmoe::detail
