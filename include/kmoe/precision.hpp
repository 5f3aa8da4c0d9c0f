// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file precision.hpp
/// \brief kmoe::Precision: the types one layer stores, accumulates, routes and communicates
/// in, in the spirit of CUTLASS's element / accumulator / compute split.
///
/// - storage: weights and activations in memory (float, double, bfloat16, float16);
/// - accumulation: what GEMMs and reductions sum in (float or double, never narrower than
///   the storage), so a bf16 layer still adds its products in fp32 as cuBLAS and every
///   framework's bf16 path do;
/// - routing: router logits, probabilities and top-k (float or double and at least the
///   accumulation's width: a top-k decided in bf16 would tie experts that fp32 tells apart);
/// - communication: what the exchanges and the gradient all-reduce carry (the storage type,
///   or a 16-bit type to halve the bytes of an fp32 layer).
///
/// A bare Scalar means what it always meant: Precision<float> and Precision<double> hold
/// that one type everywhere, so their results are today's bit for bit. Combinations kmoe
/// does not support fail at compile time with a message naming them.

#include <kmoe/low_precision.hpp>

#include <type_traits>

namespace kmoe {

namespace detail {
template <class T>
inline constexpr bool is_wide_float_v = std::is_same_v<T, float> || std::is_same_v<T, double>;

/// A 16-bit storage accumulates in float; float and double accumulate in themselves.
template <class Storage>
using default_accumulation_t = std::conditional_t<is_packed_float_v<Storage>, float, Storage>;
}  // namespace detail

template <class Storage, class Accumulation = detail::default_accumulation_t<Storage>,
          class Routing = Accumulation, class Communication = Storage>
struct Precision {
  static_assert(detail::is_wide_float_v<Storage> || is_packed_float_v<Storage>,
                "kmoe::Precision: storage must be float, double, kmoe::bfloat16 or kmoe::float16");
  static_assert(!is_packed_float_v<Accumulation>,
                "kmoe::Precision: bfloat16/float16 accumulation is not supported (16-bit storage "
                "accumulates in float or double)");
  static_assert(detail::is_wide_float_v<Accumulation>,
                "kmoe::Precision: accumulation must be float or double");
  static_assert(sizeof(Accumulation) >= sizeof(Storage),
                "kmoe::Precision: accumulation narrower than storage (double storage with float "
                "accumulation) is not supported");
  static_assert(detail::is_wide_float_v<Routing> && sizeof(Routing) >= sizeof(Accumulation),
                "kmoe::Precision: routing must be float or double and at least as wide as the "
                "accumulation");
  static_assert(detail::is_wide_float_v<Communication> || is_packed_float_v<Communication>,
                "kmoe::Precision: communication must be float, double, kmoe::bfloat16 or "
                "kmoe::float16");
  static_assert(sizeof(Communication) <= sizeof(Storage),
                "kmoe::Precision: communication wider than the storage adds bytes and no accuracy");

  using storage_type = Storage;
  using accumulation_type = Accumulation;
  using routing_type = Routing;
  using communication_type = Communication;

  /// Whether exchanges convert (and so round) what they carry.
  static constexpr bool compresses_communication = !std::is_same_v<Communication, Storage>;
};

/// \brief The Precision a layer parameter names: a Precision as it is, a bare Scalar as
/// Precision<Scalar>.
template <class T>
struct precision_of {
  using type = Precision<T>;
};
template <class S, class A, class R, class C>
struct precision_of<Precision<S, A, R, C>> {
  using type = Precision<S, A, R, C>;
};
template <class T>
using precision_of_t = typename precision_of<T>::type;

/// \brief The storage type a policy's ScalarOrPrecision parameter names: a bare Scalar
/// itself, or a Precision's storage.
///
/// Every router, expert and combiner takes either spelling (SoftmaxTopKRouter<X, float> and
/// SoftmaxTopKRouter<X, Precision<float>> compute the same bits). The policies add in their
/// storage's default accumulation type and route in it: a Precision asking for another
/// accumulation or routing type fails here, with the combination named.
template <class T>
struct storage_of {
  using type = T;
};
template <class S, class A, class R, class C>
struct storage_of<Precision<S, A, R, C>> {
  static_assert(!(is_packed_float_v<S> && std::is_same_v<A, double>),
                "kmoe policies: Precision<bfloat16/float16, double> (16-bit storage with double "
                "accumulation) is not supported: 16-bit storage accumulates in float");
  static_assert(!(std::is_same_v<S, float> && std::is_same_v<A, double>),
                "kmoe policies: Precision<float, double> (float storage with double "
                "accumulation) is not supported: use Precision<double>");
  static_assert(std::is_same_v<R, A>,
                "kmoe policies: Precision<Storage, Accumulation, Routing> with routing wider than "
                "the accumulation (e.g. Precision<float, float, double>) is not supported: "
                "routing runs in the accumulation type");
  using type = S;
};
template <class T>
using storage_t = typename storage_of<T>::type;

/// \brief What a policy instantiated with storage Scalar adds its products and sums in, and
/// keeps its gradients in: float for bfloat16 / float16, the Scalar itself for float and
/// double (so their arithmetic is today's, bit for bit).
template <class Scalar>
using accumulation_t = typename Precision<std::remove_cv_t<Scalar>>::accumulation_type;

}  // namespace kmoe
