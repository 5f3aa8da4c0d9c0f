// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file wire_compression.hpp
/// \brief kmoe::WireCompression: which 16-bit format a collective puts its floating-point
/// values in on the wire (kmoe::bfloat16, kmoe::float16 of low_precision.hpp), or none.
/// Shared by the gradient sums (GradientSyncOptions::compression) and the expert-parallel
/// exchange (LayerOptions::exchange_compression).

#include <string>

namespace kmoe {

/// \brief The wire format of a collective's floating-point values.
enum class WireCompression {
  none,  ///< the values' own type
  bf16,  ///< bfloat16: float's range, 8 significant bits (relative rounding error <= 2^-8)
  fp16   ///< IEEE binary16: 11 significant bits (<= 2^-11), finite only up to 65504
};

/// \brief The option's name as the docs and command lines spell it ("none", "bf16", "fp16").
inline std::string wire_compression_name(WireCompression compression) {
  switch (compression) {
    case WireCompression::bf16:
      return "bf16";
    case WireCompression::fp16:
      return "fp16";
    default:
      return "none";
  }
}

}  // namespace kmoe
