// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file math.hpp
/// \brief Device-callable math that compiles against Kokkos 3.4 and 4.x alike (the
/// functions moved from Kokkos::Experimental to Kokkos in 4.0).

#include <Kokkos_Core.hpp>

#include <cmath>

namespace kmoe::detail {

#if KOKKOS_VERSION >= 40000
namespace kmath = ::Kokkos;
#else
namespace kmath = ::Kokkos::Experimental;
#endif

/// a * b + c rounded once (Kokkos 3.4 has no fma): CUDA's overloads on the device, std::fma
/// on the host, where only a target with FMA instructions makes it cheap.
template <class T>
KOKKOS_INLINE_FUNCTION T fused_multiply_add(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  return ::fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

template <class T>
KOKKOS_INLINE_FUNCTION T exp(T x) {
  return kmath::exp(x);
}
template <class T>
KOKKOS_INLINE_FUNCTION T log(T x) {
  return kmath::log(x);
}
template <class T>
KOKKOS_INLINE_FUNCTION T log1p(T x) {
  return kmath::log1p(x);
}
template <class T>
KOKKOS_INLINE_FUNCTION T tanh(T x) {
  return kmath::tanh(x);
}
template <class T>
KOKKOS_INLINE_FUNCTION T erf(T x) {
  return kmath::erf(x);
}
template <class T>
KOKKOS_INLINE_FUNCTION T sqrt(T x) {
  return kmath::sqrt(x);
}
template <class T>
KOKKOS_INLINE_FUNCTION T abs(T x) {
  return x < T(0) ? -x : x;
}
template <class T>
KOKKOS_INLINE_FUNCTION T cos(T x) {
  return kmath::cos(x);
}
template <class T>
KOKKOS_INLINE_FUNCTION bool isfinite(T x) {
  return kmath::isfinite(x);
}

/// Logistic sigmoid, evaluated so that neither branch overflows.
template <class T>
KOKKOS_INLINE_FUNCTION T sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + exp(-x));
  const T e = exp(x);
  return e / (T(1) + e);
}

/// softplus(x) = log(1 + e^x) without overflow for large x.
template <class T>
KOKKOS_INLINE_FUNCTION T softplus(T x) {
  return x > T(0) ? x + log1p(exp(-x)) : log1p(exp(x));
}

/// splitmix64: the fixed, documented hash behind hash routing and seeded noise, so a token
/// gets the same expert or noise on every backend and rank.
KOKKOS_INLINE_FUNCTION std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

/// Standard normal sample determined by (seed, a, b, c) alone (Box-Muller on two hashes).
template <class T>
KOKKOS_INLINE_FUNCTION T counter_normal(std::uint64_t seed, std::uint64_t a, std::uint64_t b,
                                        std::uint64_t c) {
  const std::uint64_t h1 = splitmix64(seed ^ splitmix64(a ^ splitmix64(b ^ splitmix64(c))));
  const std::uint64_t h2 = splitmix64(h1);
  // 53-bit uniforms in (0, 1]: never 0, so the logarithm is finite.
  const double u1 = (double((h1 >> 11)) + 1.0) * (1.0 / 9007199254740992.0);
  const double u2 = double(h2 >> 11) * (1.0 / 9007199254740992.0);
  return T(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

}  // namespace kmoe::detail
