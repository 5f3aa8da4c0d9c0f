// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file select_top_count.hpp
/// \brief Keeps the `count` largest of n keys in O(n) by radix select. Used where a
/// quadratic rank count or a sort would dominate: expert-choice routing (each expert takes
/// its top C tokens) and capacity dropping by probability (each expert keeps its top C).

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace kmoe::detail {

/// Maps a finite float/double to an unsigned integer with the same order.
template <class Real>
KOKKOS_INLINE_FUNCTION auto ordered_bits(Real value) {
  using Bits = std::conditional_t<sizeof(Real) == 4, std::uint32_t, std::uint64_t>;
  Bits bits;
  memcpy(&bits, &value, sizeof(Real));
  constexpr Bits sign = Bits(1) << (8 * sizeof(Real) - 1);
  return (bits & sign) ? Bits(~bits) : Bits(bits | sign);
}

/// Calls keep(i) for the `count` indices i in [0, n) with the largest key(i); among equal
/// keys the lower index is kept first, so the choice is the same on every backend.
template <class Real, class Key, class Keep>
KOKKOS_INLINE_FUNCTION void select_top_count(int n, int count, const Key& key, const Keep& keep) {
  if (count <= 0) return;
  if (count >= n) {
    for (int i = 0; i < n; ++i) keep(i);
    return;
  }
  using Bits = decltype(ordered_bits(Real(0)));
  constexpr int bits = 8 * sizeof(Bits);
  Bits prefix = 0, mask = 0;
  int remaining = count;  // how many still to take among keys matching `prefix` so far
  for (int shift = bits - 8; shift >= 0; shift -= 8) {
    int histogram[256] = {};
    for (int i = 0; i < n; ++i) {
      const Bits u = ordered_bits(Real(key(i)));
      if ((u & mask) == prefix) ++histogram[(u >> shift) & 0xff];
    }
    int digit = 255;
    for (; digit > 0 && histogram[digit] < remaining; --digit) remaining -= histogram[digit];
    prefix |= Bits(digit) << shift;
    mask |= Bits(0xff) << shift;
  }
  // `prefix` is now the key of the count-th largest; `remaining` of its ties are kept.
  for (int i = 0; i < n; ++i) {
    const Bits u = ordered_bits(Real(key(i)));
    if (u > prefix) {
      keep(i);
    } else if (u == prefix && remaining > 0) {
      keep(i);
      --remaining;
    }
  }
}

}  // namespace kmoe::detail
