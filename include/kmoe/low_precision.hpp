// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file low_precision.hpp
/// \brief kmoe::bfloat16 and kmoe::float16: 16-bit floating-point value types usable inside
/// Kokkos kernels on every backend (Serial, OpenMP, CUDA) and on every Kokkos kmoe supports.
///
/// Kokkos 3.4 offers only `Kokkos::Experimental::half_t` (and on the host a float in
/// disguise), so kmoe carries its own: a 16-bit pattern with conversions that round to
/// nearest, ties to even, in integer arithmetic (no dependence on the rounding mode or on
/// flush-to-zero). Arithmetic widens to float, as every GPU framework does for bf16 and fp16
/// storage: these are storage types, and kmoe::Precision (precision.hpp) names the type a
/// kernel accumulates in. Narrowing overflows to infinity, NaN stays a quiet NaN with its
/// sign, and widening is exact; io/float16.hpp holds the host-only reference these
/// conversions are tested against.

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace kmoe {

namespace detail {

KOKKOS_INLINE_FUNCTION std::uint32_t float_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

KOKKOS_INLINE_FUNCTION float float_from_bits(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

/// Drops the low `shift` bits of `magnitude`, rounding to nearest, ties to even.
KOKKOS_INLINE_FUNCTION std::uint32_t shift_right_to_nearest_even(std::uint32_t magnitude,
                                                                 int shift) {
  const std::uint32_t kept = magnitude >> shift;
  const std::uint32_t rest = magnitude & ((std::uint32_t{1} << shift) - 1);
  const std::uint32_t half = std::uint32_t{1} << (shift - 1);
  return kept + ((rest > half || (rest == half && (kept & 1) != 0)) ? 1 : 0);
}

/// bfloat16 is float's upper half: rounding the lower 16 bits away may carry into the
/// exponent, which is how the largest values round to infinity.
KOKKOS_INLINE_FUNCTION std::uint16_t bfloat16_bits_from_float(float value) {
  const std::uint32_t bits = float_bits(value);
  // Adding 0x7fff plus the kept part's lowest bit carries into bit 16 exactly when the
  // dropped half rounds up to nearest even; the magnitude is at most infinity's 0x7f800000,
  // so the carry never reaches the sign. A select, not a branch, so that loops vectorise
  // (the exchanges narrow whole payloads with it).
  const std::uint32_t rounded = bits + 0x7fffu + ((bits >> 16) & 1u);
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  return std::uint16_t((nan ? bits | 0x00400000u : rounded) >> 16);
}

KOKKOS_INLINE_FUNCTION float float_from_bfloat16_bits(std::uint16_t bits) {
  return float_from_bits(std::uint32_t(bits) << 16);
}

/// IEEE binary16: exponent bias 15, 10 stored significand bits, subnormals below 2^-14.
KOKKOS_INLINE_FUNCTION std::uint16_t float16_bits_from_float(float value) {
  const std::uint32_t bits = float_bits(value);
  const std::uint32_t sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u)  // NaN: quiet, leading payload bits kept
    return std::uint16_t(sign | 0x7e00u | ((magnitude >> 13) & 0x03ffu));
  const int exponent = int(magnitude >> 23);  // float's biased exponent
  // 65520 = 2^15 * (2 - 2^-11) and above round to infinity; so does float infinity.
  if (magnitude >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);
  if (exponent >= 113)  // normal in binary16: rebias (127 -> 15) and round 13 bits away
    return std::uint16_t(sign | shift_right_to_nearest_even(magnitude - (112u << 23), 13));
  // Subnormal in binary16 (quantum 2^-24): value = significand * 2^(exponent - 150).
  const int shift = 126 - exponent;  // float zero and subnormals give shift >= 25 too
  if (exponent == 0 || shift > 24) return std::uint16_t(sign);
  const std::uint32_t significand = (magnitude & 0x007fffffu) | 0x00800000u;
  return std::uint16_t(sign | shift_right_to_nearest_even(significand, shift));
}

KOKKOS_INLINE_FUNCTION float float_from_float16_bits(std::uint16_t bits) {
  const std::uint32_t sign = std::uint32_t(bits & 0x8000u) << 16;
  const std::uint32_t exponent = (bits >> 10) & 0x1fu, fraction = bits & 0x03ffu;
  if (exponent == 0x1fu) return float_from_bits(sign | 0x7f800000u | (fraction << 13));
  if (exponent != 0) return float_from_bits(sign | ((exponent + 112u) << 23) | (fraction << 13));
  // Subnormal or zero: fraction * 2^-24, exact in float.
  return float_from_bits(sign | float_bits(float(fraction) * 5.9604644775390625e-8f));
}

/// A 16-bit floating-point storage type; `Format` supplies the two conversions.
template <class Format>
class PackedFloat {
 public:
  PackedFloat() = default;
  /// A double converts through float: rounding twice can differ from one rounding by one
  /// unit in the last place; io/float16.hpp rounds once where checkpoints need it.
  KOKKOS_INLINE_FUNCTION PackedFloat(float value) : bits_(Format::narrow(value)) {}
  KOKKOS_INLINE_FUNCTION operator float() const { return Format::widen(bits_); }

  KOKKOS_INLINE_FUNCTION static PackedFloat from_bits(std::uint16_t bits) {
    PackedFloat value;
    value.bits_ = bits;
    return value;
  }
  KOKKOS_INLINE_FUNCTION std::uint16_t bits() const { return bits_; }

  KOKKOS_INLINE_FUNCTION PackedFloat& operator+=(float other) {
    return *this = PackedFloat(float(*this) + other);
  }
  KOKKOS_INLINE_FUNCTION PackedFloat& operator*=(float other) {
    return *this = PackedFloat(float(*this) * other);
  }

 private:
  std::uint16_t bits_;
};

struct BFloat16Format {
  KOKKOS_INLINE_FUNCTION static std::uint16_t narrow(float v) {
    return bfloat16_bits_from_float(v);
  }
  KOKKOS_INLINE_FUNCTION static float widen(std::uint16_t b) { return float_from_bfloat16_bits(b); }
};

struct Float16Format {
  KOKKOS_INLINE_FUNCTION static std::uint16_t narrow(float v) { return float16_bits_from_float(v); }
  KOKKOS_INLINE_FUNCTION static float widen(std::uint16_t b) { return float_from_float16_bits(b); }
};

}  // namespace detail

/// bfloat16 (8 exponent bits, 8 significant bits): float's range, 2^-8 relative precision.
using bfloat16 = detail::PackedFloat<detail::BFloat16Format>;
/// IEEE binary16 (5 exponent bits, 11 significant bits): largest finite 65504.
using float16 = detail::PackedFloat<detail::Float16Format>;

static_assert(sizeof(bfloat16) == 2 && sizeof(float16) == 2,
              "kmoe::bfloat16/float16 must be two bytes: they travel as such in exchanges");

/// \brief Whether T is one of kmoe's 16-bit storage types.
template <class T>
inline constexpr bool is_packed_float_v =
    std::is_same_v<std::remove_cv_t<T>, bfloat16> || std::is_same_v<std::remove_cv_t<T>, float16>;

}  // namespace kmoe
