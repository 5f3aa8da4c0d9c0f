// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file widened.hpp
/// \brief GEMMs whose operands are stored in 16 bits (kmoe::bfloat16, kmoe::float16): each
/// 16-bit operand is widened into a panel of its accumulation type (float), the GEMM
/// policy multiplies the panels as it multiplies any float matrices (BLAS on the host,
/// cuBLAS on CUDA), and a 16-bit result is rounded once per stored value.
///
/// Operands already in the accumulation type are used in place, so a bf16 activation times
/// a bf16 weight may write a float result (router logits, weight gradients) without any
/// rounding. When every operand has one type (float or double layers) kmoe::gemm::multiply
/// calls the policy directly: the same call, and the same bits, as before this header. A
/// policy that multiplies 16-bit operands itself (multiplies_sixteen_bit, e.g. cuBLAS bf16
/// GEMMs with fp32 compute on CUDA) is handed them unwidened.

#include <kmoe/error.hpp>
#include <kmoe/gemm/policy.hpp>
#include <kmoe/precision.hpp>
#include <kmoe/types.hpp>

#include <type_traits>

namespace kmoe::gemm {
namespace detail {

template <class View>
using value_of = typename View::non_const_value_type;

/// Whether some operand is stored in 16 bits (and so takes the widened path).
template <class... Views>
inline constexpr bool widened_operands_v = (is_packed_float_v<value_of<Views>> || ...);

/// to(i, j) = To(from(i, j)): a 16-bit value widens exactly, a float narrows to nearest even.
template <class ExecSpace, class From, class To>
void convert_matrix(const From& from, const To& to) {
  using Target = value_of<To>;
  // A 16-bit value converts through float; float and double convert directly.
  using Via = std::conditional_t<is_packed_float_v<value_of<From>>, float, value_of<From>>;
  Kokkos::parallel_for(
      "kmoe::gemm::convert",
      Kokkos::MDRangePolicy<ExecSpace, Kokkos::Rank<2>>({0, 0}, {std::int64_t(from.extent(0)),
                                                                 std::int64_t(from.extent(1))}),
      KOKKOS_LAMBDA(std::int64_t i, std::int64_t j) { to(i, j) = Target(Via(from(i, j))); });
}

/// Whether the GEMM policy multiplies these 16-bit operands itself (a policy's
/// `multiplies_sixteen_bit<ExecSpace, A, B, C>`, e.g. gemm::CublasMixed's cuBLAS bf16 / fp16
/// GEMMs on CUDA) instead of taking widened float panels.
template <class Gemm, class ExecSpace, class A, class B, class C, class = void>
struct gemm_multiplies_sixteen_bit : std::false_type {};
template <class Gemm, class ExecSpace, class A, class B, class C>
struct gemm_multiplies_sixteen_bit<
    Gemm, ExecSpace, A, B, C,
    std::enable_if_t<Gemm::template multiplies_sixteen_bit<ExecSpace, A, B, C>>> : std::true_type {
};

/// `v` as a contiguous matrix of Accumulation: itself when it already is one (the policy
/// requires contiguous operands anyway), else a widened copy in `panel`.
template <class ExecSpace, class View, class Panel>
ConstMatrix<value_of<Panel>, ExecSpace> as_accumulation(const View& v, Panel& panel,
                                                        const char* label) {
  using Accumulation = value_of<Panel>;
  if constexpr (std::is_same_v<value_of<View>, Accumulation>) {
    require(v.span_is_contiguous(), "kmoe::gemm::multiply", "operand layout", "strided",
            "operands must be contiguous row-major blocks");
    return ConstMatrix<Accumulation, ExecSpace>(v.data(), v.extent(0), v.extent(1));
  } else {
    kmoe::detail::ensure_extents(panel, label, v.extent(0), v.extent(1));
    convert_matrix<ExecSpace>(v, panel);
    return panel;
  }
}

}  // namespace detail

/// \brief Row-major C = alpha op(A) op(B) + beta C through the GEMM policy, for operands of
/// any storage types sharing one accumulation type (see the file comment). A result stored
/// in 16 bits is rounded once from the accumulated float value.
template <class Gemm, class ExecSpace, class AView, class BView, class CView>
void multiply(const ExecSpace& space, bool transpose_a, bool transpose_b,
              typename CView::const_value_type alpha, const AView& a, const BView& b,
              typename CView::const_value_type beta, const CView& c) {
  using namespace detail;
  if constexpr (!widened_operands_v<AView, BView, CView>) {
    Gemm::gemm(space, transpose_a, transpose_b, alpha, a, b, beta, c);
  } else if constexpr (gemm_multiplies_sixteen_bit<Gemm, ExecSpace, value_of<AView>,
                                                   value_of<BView>, value_of<CView>>::value) {
    Gemm::gemm_sixteen_bit(space, transpose_a, transpose_b, float(alpha), a, b, float(beta), c);
  } else {
    using Accumulation = accumulation_t<value_of<CView>>;
    static_assert(std::is_same_v<accumulation_t<value_of<AView>>, Accumulation> &&
                      std::is_same_v<accumulation_t<value_of<BView>>, Accumulation>,
                  "kmoe::gemm::multiply: operands must share one accumulation type (a 16-bit "
                  "storage type accumulates in float: mix it with float, not double)");
    static_assert(check_valid_gemm<Gemm, ExecSpace, Accumulation>());
    Matrix<Accumulation, ExecSpace> a_panel, b_panel, c_panel;
    const auto a_wide = as_accumulation<ExecSpace>(a, a_panel, "kmoe::gemm::widened_a");
    const auto b_wide = as_accumulation<ExecSpace>(b, b_panel, "kmoe::gemm::widened_b");
    const Accumulation alpha_wide = Accumulation(float(alpha)),
                       beta_wide = Accumulation(float(beta));
    if constexpr (std::is_same_v<value_of<CView>, Accumulation>) {
      Gemm::gemm(space, transpose_a, transpose_b, alpha_wide, a_wide, b_wide, beta_wide, c);
    } else {
      kmoe::detail::ensure_extents(c_panel, "kmoe::gemm::widened_c", c.extent(0), c.extent(1));
      if (beta_wide != Accumulation(0)) convert_matrix<ExecSpace>(c, c_panel);
      Gemm::gemm(space, transpose_a, transpose_b, alpha_wide, a_wide, b_wide, beta_wide, c_panel);
      convert_matrix<ExecSpace>(c_panel, c);
    }
  }
}

}  // namespace kmoe::gemm
