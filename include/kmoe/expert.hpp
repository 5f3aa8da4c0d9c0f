// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file expert.hpp
/// \brief The Expert role and its compile-time check.
///
/// An Expert policy E (execution space X, scalar S) holds E_local experts and provides:
///  - `using execution_space = X; using scalar_type = S;`
///  - `int num_experts() const; int hidden_size() const;`
///  - `void forward(ConstMatrix<S,X> x, const Segments<X>& segments, Matrix<S,X> y, ExpertMode mode)`:
///    y rows of segment e = expert e applied to x rows of segment e;
///  - `void backward(ConstMatrix<S,X> x, const Segments<X>& segments, ConstMatrix<S,X> grad_y,
///    Matrix<S,X> grad_x)`: overwrites grad_x, accumulates parameter gradients;
///  - `void collect_parameters(ParameterList<X,S>& list) const`.
/// Optional (detected): `void fingerprint(kmoe::Fingerprint& f) const`, settings every rank
/// must share beyond the types and sizes the layer compares itself ("experts.<name>").
/// Optional (detected), for experts with a parameter that expert tensor parallelism does not
/// split (FFNExperts' output bias): `void apply_output_bias(bool)` (the layer passes true on
/// TP rank 0 only, since the TP all-reduce sums the shards' outputs) and
/// `void collect_unsplit_parameters(ParameterList<X,S>&) const` (whose replicas the layer
/// compares over the TP group).
/// Optional (detected): `void release_saved()`, dropping what forward kept for backward so
/// that the next backward recomputes it; the layer's pipelined backward (one backward call
/// per chunk of experts) needs it, and without it runs the backward unchunked.
/// Shipped: GLUExperts (SwiGLU, GeGLU), FFNExperts (relu, gelu, silu; optional biases) and
/// ClampedSwiGLUExperts (GPT-OSS's clamped, alpha-scaled SwiGLU; optional biases).

#include <kmoe/detail/detect.hpp>
#include <kmoe/experts/clamped_swiglu.hpp>
#include <kmoe/experts/expert_mode.hpp>
#include <kmoe/experts/ffn.hpp>
#include <kmoe/experts/glu.hpp>
#include <kmoe/segments.hpp>

namespace kmoe {
namespace detail {

template <class T>
using expert_num_experts = decltype(int(std::declval<const T&>().num_experts()));
template <class T>
using expert_hidden_size = decltype(int(std::declval<const T&>().hidden_size()));
template <class T, class X, class S>
using expert_forward =
    decltype(std::declval<T&>().forward(std::declval<const ConstMatrix<S, X>&>(),
                                        std::declval<const Segments<X>&>(),
                                        std::declval<const Matrix<S, X>&>(), ExpertMode::store));
template <class T, class X, class S>
using expert_backward = decltype(std::declval<T&>().backward(
    std::declval<const ConstMatrix<S, X>&>(), std::declval<const Segments<X>&>(),
    std::declval<const ConstMatrix<S, X>&>(), std::declval<const Matrix<S, X>&>()));
template <class T, class X, class S>
using expert_parameters =
    decltype(std::declval<const T&>().collect_parameters(std::declval<ParameterList<X, S>&>()));
template <class E>
using expert_release_saved = decltype(std::declval<E&>().release_saved());
template <class E>
using expert_output_bias = decltype(std::declval<E&>().apply_output_bias(true));
template <class E>
using expert_unsplit_parameters = decltype(std::declval<const E&>().collect_unsplit_parameters(
    std::declval<ParameterList<typename E::execution_space, typename E::scalar_type>&>()));

}  // namespace detail

/// \brief Compile-time check that T is an Expert policy; one message per missing piece.
template <class T>
constexpr bool check_valid_expert() {
  using X = typename detail::space_or_fallback<T>::type;
  using S = typename detail::scalar_or_fallback<T>::type;
  static_assert(detail::is_detected_v<detail::execution_space_of, T>,
                "kmoe Expert: missing member type 'execution_space'");
  static_assert(detail::is_detected_v<detail::scalar_type_of, T>,
                "kmoe Expert: missing member type 'scalar_type'");
  static_assert(
      !detail::is_detected_v<detail::scalar_type_of, T> ||
          is_supported_scalar_v<detail::detected_or_t<float, detail::scalar_type_of, T>>,
      "kmoe Expert: 'scalar_type' must be float, double, kmoe::bfloat16 or kmoe::float16");
  static_assert(detail::is_detected_v<detail::expert_num_experts, T>,
                "kmoe Expert: missing 'int num_experts() const'");
  static_assert(detail::is_detected_v<detail::expert_hidden_size, T>,
                "kmoe Expert: missing 'int hidden_size() const'");
  static_assert(detail::is_detected_v<detail::expert_forward, T, X, S>,
                "kmoe Expert: missing 'void forward(ConstMatrix<S,X> x, const Segments<X>& "
                "segments, Matrix<S,X> y, ExpertMode mode)'");
  static_assert(detail::is_detected_v<detail::expert_backward, T, X, S>,
                "kmoe Expert: missing 'void backward(ConstMatrix<S,X> x, const Segments<X>& "
                "segments, ConstMatrix<S,X> grad_y, Matrix<S,X> grad_x)'");
  static_assert(detail::is_detected_v<detail::expert_parameters, T, X, S>,
                "kmoe Expert: missing 'void collect_parameters(ParameterList<X,S>& list) const'");
  return true;
}

}  // namespace kmoe
