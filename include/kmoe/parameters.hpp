// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file parameters.hpp
/// \brief Trainable tensors exposed by name, so that kmoe's optimizers and a user's own
/// drive the same list.

#include <kmoe/sharding.hpp>
#include <kmoe/types.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace kmoe {

/// \brief One trainable tensor: its flat value and gradient (aliases of the policy's own
/// storage, valid while the layer lives) and its logical shape. The gradient is kept in
/// the accumulation type (accumulation_t: float for 16-bit storage, the Scalar otherwise).
template <class ExecSpace, class Scalar>
struct Parameter {
  using grad_type = accumulation_t<Scalar>;
  using flat_view = Kokkos::View<Scalar*, typename ExecSpace::memory_space,
                                 Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  using grad_view = Kokkos::View<grad_type*, typename ExecSpace::memory_space,
                                 Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  std::string name;                 ///< e.g. "router.weight", "experts.w_gate"
  std::vector<std::int64_t> shape;  ///< logical extents, row-major
  flat_view value;
  grad_view grad;
  ParameterRole role = ParameterRole::other;
  ShardMap shard;  ///< where its elements sit in the unsharded model (sharding.hpp)
};

template <class ExecSpace, class Scalar>
using ParameterList = std::vector<Parameter<ExecSpace, Scalar>>;

/// \brief Makes a Parameter aliasing a contiguous value view and its gradient view.
template <class ExecSpace, class ValueView, class GradView>
auto make_parameter(const std::string& name, const ValueView& value, const GradView& grad) {
  using Scalar = typename ValueView::non_const_value_type;
  Parameter<ExecSpace, Scalar> p;
  p.name = name;
  for (unsigned r = 0; r < ValueView::rank; ++r) p.shape.push_back(std::int64_t(value.extent(r)));
  p.value = typename Parameter<ExecSpace, Scalar>::flat_view(value.data(), value.size());
  p.grad = typename Parameter<ExecSpace, Scalar>::grad_view(grad.data(), grad.size());
  return p;
}

/// \brief make_parameter with the tensor's role and its expert and F axes (ShardMap).
template <class ExecSpace, class ValueView, class GradView>
auto make_parameter(const std::string& name, const ValueView& value, const GradView& grad,
                    ParameterRole role, int expert_axis, int ffn_axis) {
  auto p = make_parameter<ExecSpace>(name, value, grad);
  p.role = role;
  p.shard.expert_axis = expert_axis;
  p.shard.ffn_axis = ffn_axis;
  return p;
}

/// \brief Sets every gradient in the list to zero.
template <class ExecSpace, class Scalar>
void zero_gradients(const ParameterList<ExecSpace, Scalar>& list) {
  using Grad = typename Parameter<ExecSpace, Scalar>::grad_type;
  for (const auto& p : list) Kokkos::deep_copy(ExecSpace(), p.grad, Grad(0));
  ExecSpace().fence();
}

}  // namespace kmoe
