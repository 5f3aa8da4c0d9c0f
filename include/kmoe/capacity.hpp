// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file capacity.hpp
/// \brief Expert capacity and dropping (docs/semantics.md section 2).

#include <kmoe/error.hpp>

#include <algorithm>
#include <cmath>
#include <string>

namespace kmoe {

/// \brief Which assignments an over-full expert keeps.
enum class DropPolicy {
  by_probability,  ///< the C assignments with the highest routing weight (ties: earlier token)
  by_position      ///< the first C assignments in token order
};

/// \brief Capacity rule. factor = 0 means dropless: nothing is dropped and per-expert
/// segments have whatever size routing gives them.
struct Capacity {
  double factor = 0.0;  ///< capacity factor cf; C = ceil(k * T * cf / E)
  int minimum = 0;      ///< C is at least this
  DropPolicy drop = DropPolicy::by_probability;
  int alignment = 1;  ///< pad every expert segment to a multiple of this (GEMM tiles)

  /// The largest alignment accepted: GEMM tiles are 8 to 256 rows; anything beyond this
  /// bound only pads segments with rows no kernel uses, and near INT_MAX the padding itself
  /// overflows the row indices.
  static constexpr int max_alignment = 1 << 16;

  bool dropless() const { return factor == 0.0; }

  /// C for T local tokens with k slots each over E experts; -1 when dropless. No expert
  /// can receive more than the T * k assignments there are, so C is clamped there: a huge
  /// factor (1e30) keeps everything instead of overflowing the conversion to an integer.
  long long per_expert(long long tokens, int k, int experts) const {
    if (dropless()) return -1;
    const double assignments = double(k) * double(tokens);
    const double c = std::ceil(assignments * factor / double(experts));
    const long long bounded =
        c < assignments ? static_cast<long long>(c) : static_cast<long long>(assignments);
    return std::max<long long>(bounded, minimum);
  }

  void validate(const char* where) const {
    require(factor >= 0 && std::isfinite(factor), where, "capacity.factor", factor,
            "must be finite and >= 0 (0 means dropless)");
    require(minimum >= 0, where, "capacity.minimum", minimum, "must be >= 0");
    require(alignment >= 1 && alignment <= max_alignment, where, "capacity.alignment", alignment,
            "must lie in [1, " + std::to_string(max_alignment) + "]");
  }
};

}  // namespace kmoe
