// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file linear_gate.hpp
/// \brief The learned linear map x -> x W^T (+ b) that most routers start from.

#include <kmoe/error.hpp>
#include <kmoe/gemm.hpp>
#include <kmoe/gemm/widened.hpp>
#include <kmoe/parameters.hpp>
#include <kmoe/types.hpp>

#include <string>

namespace kmoe {

/// \brief Weight [E, H] stored as torch.nn.Linear stores it (out features first), so a
/// checkpoint's `gate.weight` is copied as is; logits = x W^T, plus a learned bias b [E] if
/// built with one (GPT-OSS's router.bias: torch.nn.Linear with bias=True).
///
/// With 16-bit storage the weight is stored in 16 bits, the logits are written in the
/// routing type (float) straight from the widened GEMM, and the gradients are kept in the
/// accumulation type (float).
template <class ExecSpace, class ScalarOrPrecision, class Gemm = DefaultGemm>
class LinearGate {
  using Scalar = storage_t<ScalarOrPrecision>;
  static_assert(check_valid_gemm<Gemm, ExecSpace, accumulation_t<Scalar>>());

 public:
  using Vector = Kokkos::View<Scalar*, typename ExecSpace::memory_space>;
  using Accumulation = accumulation_t<Scalar>;
  using GradVector = Kokkos::View<Accumulation*, typename ExecSpace::memory_space>;

  LinearGate() = default;
  LinearGate(const std::string& name, int hidden, int experts, bool bias = false)
      : name_(name),
        weight_(Kokkos::view_alloc(name + ".weight"), experts, hidden),
        grad_(Kokkos::view_alloc(name + ".weight.grad"), experts, hidden) {
    if (bias) {
      bias_ = Vector(Kokkos::view_alloc(name + ".bias"), experts);
      bias_grad_ = GradVector(Kokkos::view_alloc(name + ".bias.grad"), experts);
    }
  }

  int experts() const { return int(weight_.extent(0)); }
  int hidden() const { return int(weight_.extent(1)); }
  const Matrix<Scalar, ExecSpace>& weight() const { return weight_; }
  const Matrix<Accumulation, ExecSpace>& grad() const { return grad_; }
  bool has_bias() const { return bias_.extent(0) != 0; }
  /// The bias [E] and its gradient; empty views without a bias.
  const Vector& bias() const { return bias_; }
  const GradVector& bias_grad() const { return bias_grad_; }

  /// logits[T, E] = x[T, H] W^T (+ b).
  template <class XView, class LogitView>
  void forward(const XView& x, const LogitView& logits) const {
    gemm::multiply<Gemm>(ExecSpace(), false, true, 1, x, weight_, 0, logits);
    if (!has_bias()) return;
    const auto bias = bias_;
    Kokkos::parallel_for(
        "kmoe::LinearGate::add_bias",
        Kokkos::MDRangePolicy<ExecSpace, Kokkos::Rank<2>>({0, 0}, {std::int64_t(logits.extent(0)),
                                                                   std::int64_t(logits.extent(1))}),
        KOKKOS_LAMBDA(std::int64_t t, std::int64_t e) { logits(t, e) += bias(e); });
  }

  /// Accumulates dW += g^T x, db += sum over tokens of g (with a bias) and grad_x += g W for
  /// g = dLoss/dlogits [T, E].
  template <class XView, class GradLogitView, class GradXView>
  void backward(const XView& x, const GradLogitView& grad_logits, const GradXView& grad_x) const {
    gemm::multiply<Gemm>(ExecSpace(), true, false, 1, grad_logits, x, 1, grad_);
    gemm::multiply<Gemm>(ExecSpace(), false, false, 1, grad_logits, weight_, 1, grad_x);
    if (!has_bias()) return;
    const auto bias_grad = bias_grad_;
    const int tokens = int(grad_logits.extent(0));
    Kokkos::parallel_for(
        "kmoe::LinearGate::bias_gradient",
        Kokkos::RangePolicy<ExecSpace>(0, int(grad_logits.extent(1))), KOKKOS_LAMBDA(int e) {
          Accumulation sum = 0;
          for (int t = 0; t < tokens; ++t) sum += grad_logits(t, e);
          bias_grad(e) += sum;
        });
  }

  void collect_parameters(ParameterList<ExecSpace, Scalar>& list) const {
    list.push_back(make_parameter<ExecSpace>(name_ + ".weight", weight_, grad_,
                                             ParameterRole::router, -1, -1));
    if (has_bias())
      list.push_back(make_parameter<ExecSpace>(name_ + ".bias", bias_, bias_grad_,
                                               ParameterRole::router, -1, -1));
  }

 private:
  std::string name_;
  Matrix<Scalar, ExecSpace> weight_;
  Matrix<Accumulation, ExecSpace> grad_;
  Vector bias_;           ///< [E], or empty without a bias
  GradVector bias_grad_;  ///< [E], or empty without a bias
};

}  // namespace kmoe
