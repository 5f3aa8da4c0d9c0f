// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file parameter_groups.hpp
/// \brief Per-parameter optimizer settings (PyTorch's param_groups): a learning-rate scale
/// and whether weight decay applies, chosen by name prefix and/or role, e.g. a smaller
/// learning rate for the router, no weight decay on biases.

#include <kmoe/error.hpp>
#include <kmoe/parameters.hpp>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace kmoe {

/// \brief One rule; a parameter takes the first rule that matches it, or the defaults
/// (scale 1, weight decay on) if none does.
struct ParameterGroup {
  std::string name_prefix;            ///< matches names starting with this ("" matches all)
  std::optional<ParameterRole> role;  ///< matches this role only (unset matches all)
  double learning_rate_scale = 1.0;   ///< the parameter's lr = optimizer lr * this
  bool weight_decay = true;           ///< false: no decay for the parameter

  template <class ExecSpace, class Scalar>
  bool matches(const Parameter<ExecSpace, Scalar>& p) const {
    return p.name.rfind(name_prefix, 0) == 0 && (!role || *role == p.role);
  }
};

/// \brief The settings each parameter of `list` gets from `groups`.
struct ResolvedGroup {
  double learning_rate_scale = 1.0;
  bool weight_decay = true;
};

template <class ExecSpace, class Scalar>
std::vector<ResolvedGroup> resolve_groups(const ParameterList<ExecSpace, Scalar>& list,
                                          const std::vector<ParameterGroup>& groups,
                                          const char* where) {
  for (const auto& g : groups)
    require(g.learning_rate_scale >= 0 && std::isfinite(g.learning_rate_scale), where,
            "learning_rate_scale", g.learning_rate_scale, "must be finite and >= 0");
  std::vector<ResolvedGroup> resolved(list.size());
  for (std::size_t i = 0; i < list.size(); ++i)
    for (const auto& g : groups)
      if (g.matches(list[i])) {
        resolved[i] = {g.learning_rate_scale, g.weight_decay};
        break;
      }
  return resolved;
}

}  // namespace kmoe
