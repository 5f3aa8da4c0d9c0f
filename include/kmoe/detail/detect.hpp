// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file detect.hpp
/// \brief Detection idiom behind the policy checks: each rule is a trait that is false
/// (rather than a hard error) when a user type lacks what the rule asks for.

#include <kmoe/types.hpp>

#include <type_traits>

namespace kmoe::detail {

template <class, template <class...> class Op, class... Args>
struct detector : std::false_type {};
template <template <class...> class Op, class... Args>
struct detector<std::void_t<Op<Args...>>, Op, Args...> : std::true_type {};

/// True when Op<Args...> is well formed.
template <template <class...> class Op, class... Args>
inline constexpr bool is_detected_v = detector<void, Op, Args...>::value;

template <class Default, class, template <class...> class Op, class... Args>
struct detected_or {
  using type = Default;
};
template <class Default, template <class...> class Op, class... Args>
struct detected_or<Default, std::void_t<Op<Args...>>, Op, Args...> {
  using type = Op<Args...>;
};

/// Op<Args...> when well formed, else Default.
template <class Default, template <class...> class Op, class... Args>
using detected_or_t = typename detected_or<Default, void, Op, Args...>::type;

/// Stand-ins used when a policy lacks its execution_space / scalar_type, so that the later
/// rules still evaluate (to false) instead of failing to compile with an unrelated error.
struct missing_type {};
using fallback_space = Kokkos::DefaultHostExecutionSpace;

template <class T>
using execution_space_of = typename T::execution_space;
template <class T>
using scalar_type_of = typename T::scalar_type;
template <class T>
using precision_type_of = typename T::precision_type;

template <class T, class = void>
struct space_or_fallback {
  using type = fallback_space;
};
template <class T>
struct space_or_fallback<T, std::void_t<typename T::execution_space>> {
  using type = std::conditional_t<Kokkos::is_execution_space<typename T::execution_space>::value,
                                  typename T::execution_space, fallback_space>;
};
template <class T, class = void>
struct scalar_or_fallback {
  using type = float;
};
template <class T>
struct scalar_or_fallback<T, std::void_t<typename T::scalar_type>> {
  using type = std::conditional_t<is_supported_scalar_v<typename T::scalar_type>,
                                  typename T::scalar_type, float>;
};

}  // namespace kmoe::detail
