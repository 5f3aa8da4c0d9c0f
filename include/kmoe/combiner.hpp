// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file combiner.hpp
/// \brief The Combiner role (how expert outputs return to their tokens), its check, and the
/// shipped weighted sum.
///
/// A Combiner C (execution space X, scalar S, R = routing_t<S>) provides:
///  - `using execution_space = X; using scalar_type = S;`
///  - `void combine(ConstMatrix<S,X> rows, ConstMatrix<int,X> position, ConstMatrix<R,X> weight,
///    ConstMatrix<S,X> base, Matrix<S,X> y)`: y(t) = base(t) (if base is non-empty) plus the
///    combination of rows(position(t, s)) over the slots s with position >= 0;
///  - `void backward(ConstMatrix<S,X> grad_y, ConstMatrix<S,X> rows, ConstMatrix<int,X> position,
///    ConstMatrix<R,X> weight, Matrix<S,X> grad_rows, Matrix<R,X> grad_weight)`.

#include <kmoe/detail/detect.hpp>
#include <kmoe/types.hpp>

namespace kmoe {

/// \brief y_t = base_t + sum over kept slots s, in slot order, of w_{t,s} * rows(position(t,s)).
/// Each token sums its own slots in a fixed order, so the result has the same bits for any
/// thread count and backend.
template <class ExecSpace, class ScalarOrPrecision>
class WeightedSumCombiner {
  using Scalar = storage_t<ScalarOrPrecision>;

 public:
  using execution_space = ExecSpace;
  using scalar_type = Scalar;
  using precision_type = precision_of_t<ScalarOrPrecision>;
  using route_type = routing_t<Scalar>;
  using Accumulation = accumulation_t<Scalar>;  ///< each token's sum, rounded once to Scalar

  void combine(const ConstMatrix<Scalar, ExecSpace>& rows,
               const ConstMatrix<int, ExecSpace>& position,
               const ConstMatrix<route_type, ExecSpace>& weight,
               const ConstMatrix<Scalar, ExecSpace>& base,
               const Matrix<Scalar, ExecSpace>& y) const {
    const int tokens = int(y.extent(0)), width = int(y.extent(1)), slots = int(position.extent(1));
    const bool has_base = base.extent(0) > 0;
    Kokkos::parallel_for(
        "kmoe::WeightedSumCombiner::combine",
        Kokkos::MDRangePolicy<ExecSpace, Kokkos::Rank<2>>({0, 0}, {tokens, width}),
        KOKKOS_LAMBDA(int t, int h) {
          Accumulation sum = 0;
          for (int s = 0; s < slots; ++s) {
            const int row = position(t, s);
            if (row >= 0) sum += Accumulation(weight(t, s)) * Accumulation(rows(row, h));
          }
          y(t, h) = Scalar(has_base ? sum + Accumulation(base(t, h)) : sum);
        });
  }

  void backward(const ConstMatrix<Scalar, ExecSpace>& grad_y,
                const ConstMatrix<Scalar, ExecSpace>& rows,
                const ConstMatrix<int, ExecSpace>& position,
                const ConstMatrix<route_type, ExecSpace>& weight,
                const Matrix<Scalar, ExecSpace>& grad_rows,
                const Matrix<route_type, ExecSpace>& grad_weight) const {
    const int tokens = int(grad_y.extent(0)), width = int(grad_y.extent(1));
    const int slots = int(position.extent(1));
    Kokkos::parallel_for(
        "kmoe::WeightedSumCombiner::backward", Kokkos::RangePolicy<ExecSpace>(0, tokens),
        KOKKOS_LAMBDA(int t) {
          for (int s = 0; s < slots; ++s) {
            const int row = position(t, s);
            route_type dot = 0;
            if (row >= 0) {
              const Accumulation w = Accumulation(weight(t, s));
              for (int h = 0; h < width; ++h) {
                grad_rows(row, h) = Scalar(w * Accumulation(grad_y(t, h)));
                dot += route_type(Accumulation(grad_y(t, h)) * Accumulation(rows(row, h)));
              }
            }
            grad_weight(t, s) = dot;
          }
        });
  }
};

namespace detail {
template <class C, class X, class S>
using combiner_combine = decltype(std::declval<const C&>().combine(
    std::declval<const ConstMatrix<S, X>&>(), std::declval<const ConstMatrix<int, X>&>(),
    std::declval<const ConstMatrix<routing_t<S>, X>&>(), std::declval<const ConstMatrix<S, X>&>(),
    std::declval<const Matrix<S, X>&>()));
template <class C, class X, class S>
using combiner_backward = decltype(std::declval<const C&>().backward(
    std::declval<const ConstMatrix<S, X>&>(), std::declval<const ConstMatrix<S, X>&>(),
    std::declval<const ConstMatrix<int, X>&>(), std::declval<const ConstMatrix<routing_t<S>, X>&>(),
    std::declval<const Matrix<S, X>&>(), std::declval<const Matrix<routing_t<S>, X>&>()));
}  // namespace detail

/// \brief Compile-time check that C is a Combiner; one message per missing piece.
template <class C>
constexpr bool check_valid_combiner() {
  using X = typename detail::space_or_fallback<C>::type;
  using S = typename detail::scalar_or_fallback<C>::type;
  static_assert(detail::is_detected_v<detail::execution_space_of, C>,
                "kmoe Combiner: missing member type 'execution_space'");
  static_assert(detail::is_detected_v<detail::scalar_type_of, C>,
                "kmoe Combiner: missing member type 'scalar_type'");
  static_assert(detail::is_detected_v<detail::combiner_combine, C, X, S>,
                "kmoe Combiner: missing 'void combine(ConstMatrix<S,X> rows, ConstMatrix<int,X> "
                "position, ConstMatrix<R,X> weight, ConstMatrix<S,X> base, Matrix<S,X> y) const'");
  static_assert(detail::is_detected_v<detail::combiner_backward, C, X, S>,
                "kmoe Combiner: missing 'void backward(ConstMatrix<S,X> grad_y, ConstMatrix<S,X> "
                "rows, ConstMatrix<int,X> position, ConstMatrix<R,X> weight, Matrix<S,X> "
                "grad_rows, Matrix<R,X> grad_weight) const'");
  return true;
}

// The shipped combiner meets its role wherever it is included.
static_assert(
    check_valid_combiner<WeightedSumCombiner<Kokkos::DefaultHostExecutionSpace, float>>());

}  // namespace kmoe
