// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file float16.hpp
/// \brief Exact conversions between float/double and the 16-bit storage formats used by
/// checkpoints: IEEE 754 binary16 ("half", F16) and bfloat16 (BF16).
///
/// The 16-bit values travel as raw bit patterns (std::uint16_t) so that no compiler
/// extension type is needed. Narrowing conversions round to nearest, ties to even, in a
/// single step from the source precision (converting a double does not first round to
/// float, which could round twice). Overflow gives infinity, values below half the smallest
/// subnormal give a signed zero, and NaN stays NaN (quiet, sign and leading payload bits
/// kept). Widening conversions are exact. The code uses integer arithmetic only, so it does
/// not depend on the floating-point environment (rounding mode, flush-to-zero).

#include <cstdint>
#include <cstring>
#include <limits>

namespace kmoe::io {

namespace detail {

/// \brief Layout of a binary interchange format with at most 32 bits.
struct BinaryFormat {
  int precision;      ///< significand bits including the implicit leading bit
  int bias;           ///< exponent bias
  int exponent_bits;  ///< width of the exponent field
};

inline constexpr BinaryFormat half_format{11, 15, 5};
inline constexpr BinaryFormat bfloat16_format{8, 127, 8};

inline int highest_bit(std::uint64_t x) {
  int bit = -1;
  while (x != 0) {
    x >>= 1;
    ++bit;
  }
  return bit;
}

/// \brief Encodes sign * mant * 2^exp (mant > 0) in format `f`, rounding to nearest even.
/// Returns the bits without the sign; the caller ORs in the sign bit.
inline std::uint32_t round_and_pack(std::uint64_t mant, int exp, BinaryFormat f) {
  const int p = f.precision;
  const int emin = 1 - f.bias;
  const int top = highest_bit(mant) + exp;  // value lies in [2^top, 2^(top+1))
  // Quantum (weight of the last significand bit) of the result: subnormals share emin's.
  const int quantum = (top < emin ? emin : top) - (p - 1);
  const int shift = quantum - exp;
  std::uint64_t m;
  if (shift <= 0) {
    m = mant << -shift;  // exact: mant has fewer than p significant bits here
  } else if (shift >= 64) {
    m = 0;  // below half the quantum, so it rounds to zero
  } else {
    m = mant >> shift;
    const std::uint64_t rest = mant & ((std::uint64_t{1} << shift) - 1);
    const std::uint64_t half = std::uint64_t{1} << (shift - 1);
    if (rest > half || (rest == half && (m & 1) != 0)) ++m;
  }
  // For normals, m is in [2^(p-1), 2^p]; adding it on top of (biased exponent - 1) folds
  // the implicit bit into the exponent field, so a carry from rounding moves to the next
  // binade (or to infinity) by itself. A subnormal that rounds up to 2^(p-1) likewise
  // becomes the smallest normal.
  const std::uint64_t packed =
      top < emin ? m : (static_cast<std::uint64_t>(top + f.bias - 1) << (p - 1)) + m;
  const std::uint64_t infinity = ((std::uint64_t{1} << f.exponent_bits) - 1) << (p - 1);
  return static_cast<std::uint32_t>(packed < infinity ? packed : infinity);
}

/// \brief Encodes a source value given as IEEE fields (biased exponent, fraction) of a
/// format with `src` layout into format `dst`.
inline std::uint16_t convert_fields(bool negative, std::uint64_t biased_exponent,
                                    std::uint64_t fraction, BinaryFormat src, BinaryFormat dst) {
  const std::uint32_t sign =
      negative ? std::uint32_t{1} << (dst.precision - 1 + dst.exponent_bits) : 0;
  const std::uint64_t max_exponent = (std::uint64_t{1} << src.exponent_bits) - 1;
  const std::uint32_t infinity = ((std::uint32_t{1} << dst.exponent_bits) - 1)
                                 << (dst.precision - 1);
  if (biased_exponent == max_exponent) {
    if (fraction == 0) return static_cast<std::uint16_t>(sign | infinity);
    const std::uint32_t quiet = std::uint32_t{1} << (dst.precision - 2);
    const auto payload = static_cast<std::uint32_t>(fraction >> (src.precision - dst.precision));
    return static_cast<std::uint16_t>(sign | infinity | quiet | payload);
  }
  if (biased_exponent == 0 && fraction == 0) return static_cast<std::uint16_t>(sign);
  // Subnormal sources have no implicit bit and the exponent of biased value 1.
  const std::uint64_t mant =
      biased_exponent == 0 ? fraction : fraction | (std::uint64_t{1} << (src.precision - 1));
  const int exp =
      static_cast<int>(biased_exponent == 0 ? 1 : biased_exponent) - src.bias - (src.precision - 1);
  return static_cast<std::uint16_t>(sign | round_and_pack(mant, exp, dst));
}

inline std::uint16_t from_float(float value, BinaryFormat dst) {
  static_assert(std::numeric_limits<float>::is_iec559, "float must be IEEE binary32");
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return convert_fields((bits >> 31) != 0, (bits >> 23) & 0xffu, bits & 0x7fffffu,
                        BinaryFormat{24, 127, 8}, dst);
}

inline std::uint16_t from_double(double value, BinaryFormat dst) {
  static_assert(std::numeric_limits<double>::is_iec559, "double must be IEEE binary64");
  std::uint64_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return convert_fields((bits >> 63) != 0, (bits >> 52) & 0x7ffu, bits & 0xfffffffffffffu,
                        BinaryFormat{53, 1023, 11}, dst);
}

inline float float_from_bits(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

}  // namespace detail

/// \brief Rounds a float to the nearest IEEE half (ties to even); returns its bit pattern.
inline std::uint16_t to_half_bits(float value) {
  return detail::from_float(value, detail::half_format);
}

/// \brief Rounds a double to the nearest IEEE half in one step (ties to even).
inline std::uint16_t to_half_bits(double value) {
  return detail::from_double(value, detail::half_format);
}

/// \brief Rounds a float to the nearest bfloat16 (ties to even); returns its bit pattern.
inline std::uint16_t to_bfloat16_bits(float value) {
  return detail::from_float(value, detail::bfloat16_format);
}

/// \brief Rounds a double to the nearest bfloat16 in one step (ties to even).
inline std::uint16_t to_bfloat16_bits(double value) {
  return detail::from_double(value, detail::bfloat16_format);
}

/// \brief The float equal to the IEEE half with bit pattern `bits` (always exact).
inline float half_bits_to_float(std::uint16_t bits) {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
  int exponent = (bits >> 10) & 0x1f;
  std::uint32_t fraction = bits & 0x3ffu;
  if (exponent == 0x1f) return detail::float_from_bits(sign | 0x7f800000u | (fraction << 13));
  if (exponent == 0) {
    if (fraction == 0) return detail::float_from_bits(sign);
    // Every half subnormal is a float normal: shift the leading one into the implicit bit.
    exponent = 1;
    while ((fraction & 0x400u) == 0) {
      fraction <<= 1;
      --exponent;
    }
    fraction &= 0x3ffu;
  }
  const auto biased = static_cast<std::uint32_t>(exponent + 127 - 15);
  return detail::float_from_bits(sign | (biased << 23) | (fraction << 13));
}

/// \brief The float equal to the bfloat16 with bit pattern `bits` (always exact).
inline float bfloat16_bits_to_float(std::uint16_t bits) {
  return detail::float_from_bits(static_cast<std::uint32_t>(bits) << 16);
}

}  // namespace kmoe::io
