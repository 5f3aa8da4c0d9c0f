// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file non_finite.hpp
/// \brief The layer's NonFinitePolicy::raise checks: find the first NaN/Inf of a view or of
/// a routing decision and throw a kmoe::runtime_error naming its value and position.
///
/// The kernels are free functions, not private members: nvcc rejects an extended
/// __host__ __device__ lambda (KOKKOS_LAMBDA) whose enclosing function is private.

#include <kmoe/detail/math.hpp>
#include <kmoe/error.hpp>
#include <kmoe/routing_plan.hpp>

#include <cstdint>
#include <string>

namespace kmoe::detail {

/// Flat index of the first non-finite value of logits then weight; their total size if none.
template <class X, class Logits, class Weight>
std::int64_t first_non_finite(const Logits& logits, const Weight& weight) {
  using route_type = typename Logits::non_const_value_type;
  const std::int64_t n_logits = std::int64_t(logits.size()),
                     n_weights = std::int64_t(weight.size());
  std::int64_t first = 0;  // the reducer starts from the largest int64: "none found"
  Kokkos::parallel_reduce(
      "kmoe::MoELayer::check_finite", Kokkos::RangePolicy<X>(0, n_logits + n_weights),
      KOKKOS_LAMBDA(std::int64_t i, std::int64_t & found) {
        const route_type v = i < n_logits ? logits.data()[i] : weight.data()[i - n_logits];
        if (!detail::isfinite(v) && i < found) found = i;
      },
      Kokkos::Min<std::int64_t>(first));
  return first;
}

/// Element i of a rank-1 or rank-2 view read in row-major order. A function of its own:
/// nvcc refuses an extended lambda that first captures a variable inside `if constexpr`.
template <class View>
KOKKOS_INLINE_FUNCTION typename View::value_type flat_element(const View& v, std::int64_t i,
                                                              std::int64_t cols) {
  if constexpr (View::rank == 2)
    return v(i / cols, i % cols);
  else
    return v(i);
}

/// Flat (row-major) index of the first non-finite element of a rank-1 or rank-2 view,
/// any layout; its size if none.
template <class X, class View>
std::int64_t first_non_finite_element(const View& v) {
  const std::int64_t n = std::int64_t(v.size());
  const std::int64_t cols = View::rank == 2 ? std::int64_t(v.extent(1)) : 1;
  std::int64_t first = 0;  // the reducer starts from the largest int64: "none found"
  Kokkos::parallel_reduce(
      "kmoe::MoELayer::check_finite_result", Kokkos::RangePolicy<X>(0, n),
      KOKKOS_LAMBDA(std::int64_t i, std::int64_t & found) {
        if (!detail::isfinite(flat_element(v, i, cols)) && i < found) found = i;
      },
      Kokkos::Min<std::int64_t>(first));
  return first < n ? first : n;
}

/// Whether rows [begin, end) of the row-major matrix m hold a non-finite value (failover's
/// health check of one expert's outputs).
template <class X, class Matrix>
bool rows_have_non_finite(const Matrix& m, int begin, int end) {
  const std::int64_t cols = std::int64_t(m.extent(1));
  const std::int64_t first = std::int64_t(begin) * cols, last = std::int64_t(end) * cols;
  if (last <= first) return false;
  const auto data = m.data();
  std::int64_t bad = 0;
  Kokkos::parallel_reduce(
      "kmoe::MoELayer::check_finite_rows", Kokkos::RangePolicy<X>(first, last),
      KOKKOS_LAMBDA(std::int64_t i, std::int64_t & count) {
        if (!detail::isfinite(data[i])) ++count;
      },
      bad);
  return bad > 0;
}

/// Throws kmoe::runtime_error naming `what`, the first non-finite element of v and its
/// position (row = token for [T, H] views); returns if there is none.
template <class X, class View>
void raise_if_non_finite(const View& v, const char* where, const std::string& what) {
  const std::int64_t first = first_non_finite_element<X>(v);
  if (first >= std::int64_t(v.size())) return;
  std::string position;
  double value;
  if constexpr (View::rank == 2) {
    const std::int64_t cols = std::int64_t(v.extent(1)), t = first / cols, h = first % cols;
    auto one = Kokkos::subview(v, t, h);
    value = double(Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), one)());
    position = "at token " + std::to_string(t) + ", column " + std::to_string(h);
  } else {
    auto one = Kokkos::subview(v, first);
    value = double(Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), one)());
    position = "at element " + std::to_string(first);
  }
  throw runtime_error(std::string(where) + ": non-finite " + what + " " + to_display(value) + " " +
                      position + " (set LayerOptions::non_finite = propagate to let it through)");
}

/// Throws kmoe::runtime_error naming the first non-finite router logit (token, expert) or
/// routing weight (token, slot and its expert) of a routing decision.
template <class X, class S>
void raise_if_non_finite_routing(const RoutingPlan<X, S>& plan) {
  const auto logits = plan.logits;
  const auto weight = plan.weight;
  const int experts = int(logits.extent(1)), slots = int(weight.extent(1));
  const std::int64_t n_logits = std::int64_t(logits.size()),
                     n_weights = std::int64_t(weight.size());
  const std::int64_t first = first_non_finite<X>(logits, weight);
  if (first >= n_logits + n_weights) return;
  std::string what;
  if (first < n_logits) {
    auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), logits);
    const auto t = first / experts, e = first % experts;
    what = "non-finite router logit " + to_display(host(t, e)) + " at token " + std::to_string(t) +
           ", expert " + std::to_string(e);
  } else {
    auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), weight);
    auto chosen = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), plan.expert);
    const auto t = (first - n_logits) / slots, s = (first - n_logits) % slots;
    // Name the expert too: a slot index alone does not say which expert misbehaved.
    what = "non-finite routing weight " + to_display(host(t, s)) + " at token " +
           std::to_string(t) + ", slot " + std::to_string(s) + " (expert " +
           std::to_string(chosen(t, s)) + ")";
  }
  throw runtime_error("kmoe::MoELayer::forward: " + what +
                      " (set LayerOptions::non_finite = propagate to let it through)");
}

}  // namespace kmoe::detail
