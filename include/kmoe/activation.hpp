// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file activation.hpp
/// \brief Expert activations (docs/semantics.md section 3) with their derivatives for backward.
/// An activation is a type with static device functions `value(x)` and `derivative(x)`.

#include <kmoe/detail/math.hpp>

namespace kmoe::activation {

struct Relu {
  static constexpr const char* name = "relu";
  template <class T>
  KOKKOS_INLINE_FUNCTION static T value(T x) {
    return x > T(0) ? x : T(0);
  }
  template <class T>
  KOKKOS_INLINE_FUNCTION static T derivative(T x) {
    return x > T(0) ? T(1) : T(0);
  }
};

/// silu(x) = x * sigmoid(x) (SwiGLU in Mixtral, DeepSeek, Qwen).
struct Silu {
  static constexpr const char* name = "silu";
  template <class T>
  KOKKOS_INLINE_FUNCTION static T value(T x) {
    return x * detail::sigmoid(x);
  }
  template <class T>
  KOKKOS_INLINE_FUNCTION static T derivative(T x) {
    const T s = detail::sigmoid(x);
    return s * (T(1) + x * (T(1) - s));
  }
};

/// Exact gelu(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)) (torch's default).
struct GeluErf {
  static constexpr const char* name = "gelu";
  template <class T>
  KOKKOS_INLINE_FUNCTION static T value(T x) {
    return T(0.5) * x * (T(1) + detail::erf(x * T(0.70710678118654752440)));
  }
  template <class T>
  KOKKOS_INLINE_FUNCTION static T derivative(T x) {
    const T cdf = T(0.5) * (T(1) + detail::erf(x * T(0.70710678118654752440)));
    const T pdf = T(0.39894228040143267794) * detail::exp(T(-0.5) * x * x);
    return cdf + x * pdf;
  }
};

/// Tanh approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
/// (torch approximate='tanh', "gelu_pytorch_tanh" / "gelu_new" in HF configs).
struct GeluTanh {
  static constexpr const char* name = "gelu_tanh";
  template <class T>
  KOKKOS_INLINE_FUNCTION static T value(T x) {
    const T u = T(0.79788456080286535588) * (x + T(0.044715) * x * x * x);
    return T(0.5) * x * (T(1) + detail::tanh(u));
  }
  template <class T>
  KOKKOS_INLINE_FUNCTION static T derivative(T x) {
    const T u = T(0.79788456080286535588) * (x + T(0.044715) * x * x * x);
    const T th = detail::tanh(u);
    const T du = T(0.79788456080286535588) * (T(1) + T(3) * T(0.044715) * x * x);
    return T(0.5) * (T(1) + th) + T(0.5) * x * (T(1) - th * th) * du;
  }
};

}  // namespace kmoe::activation
