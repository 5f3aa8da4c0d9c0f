// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file linear_gate.hpp
/// \brief The learned linear map x -> x W^T that most routers start from.

#include <kmoe/error.hpp>
#include <kmoe/gemm.hpp>
#include <kmoe/parameters.hpp>
#include <kmoe/types.hpp>

#include <string>

namespace kmoe {

/// \brief Weight [E, H] stored as torch.nn.Linear stores it (out features first), so a
/// checkpoint's `gate.weight` is copied as is; logits = x W^T.
template <class ExecSpace, class Scalar, class Gemm = DefaultGemm>
class LinearGate {
  static_assert(check_valid_gemm<Gemm, ExecSpace, Scalar>());

 public:
  LinearGate() = default;
  LinearGate(const std::string& name, int hidden, int experts)
      : name_(name),
        weight_(Kokkos::view_alloc(name + ".weight"), experts, hidden),
        grad_(Kokkos::view_alloc(name + ".weight.grad"), experts, hidden) {}

  int experts() const { return int(weight_.extent(0)); }
  int hidden() const { return int(weight_.extent(1)); }
  const Matrix<Scalar, ExecSpace>& weight() const { return weight_; }
  const Matrix<Scalar, ExecSpace>& grad() const { return grad_; }

  /// logits[T, E] = x[T, H] W^T.
  template <class XView, class LogitView>
  void forward(const XView& x, const LogitView& logits) const {
    Gemm::gemm(ExecSpace(), false, true, Scalar(1), x, weight_, Scalar(0), logits);
  }

  /// Accumulates dW += g^T x and grad_x += g W for g = dLoss/dlogits [T, E].
  template <class XView, class GradLogitView, class GradXView>
  void backward(const XView& x, const GradLogitView& grad_logits, const GradXView& grad_x) const {
    Gemm::gemm(ExecSpace(), true, false, Scalar(1), grad_logits, x, Scalar(1), grad_);
    Gemm::gemm(ExecSpace(), false, false, Scalar(1), grad_logits, weight_, Scalar(1), grad_x);
  }

  void collect_parameters(ParameterList<ExecSpace, Scalar>& list) const {
    list.push_back(make_parameter<ExecSpace>(name_ + ".weight", weight_, grad_,
                                             ParameterRole::router, -1, -1));
  }

 private:
  std::string name_;
  Matrix<Scalar, ExecSpace> weight_;
  Matrix<Scalar, ExecSpace> grad_;
};

}  // namespace kmoe
