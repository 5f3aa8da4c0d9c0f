// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file gated_router.hpp
/// \brief What every router with a learned gate shares, as a base class: the gate
/// (logits = x W^T, optionally + b: kmoe::LinearGate), the sizes the Router role asks for, the parameter
/// list, and the checks of those sizes. A router derives from it and writes its own
/// forward and backward kernels (see examples/custom_router.cpp); the shipped softmax and
/// sigmoid routers do the same.

#include <kmoe/gemm.hpp>
#include <kmoe/parameters.hpp>
#include <kmoe/routers/linear_gate.hpp>
#include <kmoe/routers/validation.hpp>
#include <kmoe/routing_plan.hpp>
#include <kmoe/types.hpp>

namespace kmoe {

template <class ExecSpace, class ScalarOrPrecision, class Gemm = DefaultGemm>
class GatedRouter {
  using Scalar = storage_t<ScalarOrPrecision>;

 public:
  using execution_space = ExecSpace;
  using scalar_type = Scalar;
  using precision_type = precision_of_t<ScalarOrPrecision>;
  using route_type = routing_t<Scalar>;

  int num_experts() const { return gate_.experts(); }
  int hidden_size() const { return gate_.hidden(); }
  int slots_per_token() const { return slots_; }
  const LinearGate<ExecSpace, Scalar, Gemm>& gate() const { return gate_; }
  void collect_parameters(ParameterList<ExecSpace, Scalar>& list) const {
    gate_.collect_parameters(list);
  }

 protected:
  /// \param where the router's name in error messages (hidden and experts must be >= 1)
  /// \param slots assignments per token (top-k)
  /// \param bias whether the gate adds a learned bias to the logits (LinearGate)
  GatedRouter(const char* where, int hidden, int experts, int slots, bool bias = false)
      : gate_(checked_gate(where, hidden, experts, bias)), slots_(slots) {}

  /// Sizes `plan` for x's tokens (with logits) and fills plan.logits = x W^T.
  void gate_forward(const ConstMatrix<Scalar, ExecSpace>& x, RoutingPlan<ExecSpace, Scalar>& plan) {
    plan.resize(int(x.extent(0)), num_experts(), slots_, true);
    gate_.forward(x, plan.logits);
  }
  /// Accumulates the gate's weight gradient and adds dLoss/dx from dLoss/dlogits.
  void gate_backward(const ConstMatrix<Scalar, ExecSpace>& x,
                     const Matrix<route_type, ExecSpace>& grad_logits,
                     const Matrix<Scalar, ExecSpace>& grad_x) const {
    gate_.backward(x, grad_logits, grad_x);
  }

 private:
  static LinearGate<ExecSpace, Scalar, Gemm> checked_gate(const char* where, int hidden,
                                                          int experts, bool bias) {
    detail::validate_router_shape(where, hidden, experts);
    return LinearGate<ExecSpace, Scalar, Gemm>("router", hidden, experts, bias);
  }

  LinearGate<ExecSpace, Scalar, Gemm> gate_;
  int slots_;
};

}  // namespace kmoe
