// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file cublas_mixed.hpp
/// \brief GEMM policy gemm::CublasMixed (target kmoe::cublas): gemm::CublasGrouped, plus the
/// products of weight-only bf16 / fp16 experts (PackedGLUExperts, gemm/packed_product.hpp)
/// as cuBLAS bf16 / fp16 GEMMs with fp32 accumulation on Kokkos::Cuda.
///
/// Per projection, the activations (float) are rounded to the weights' type (cuBLAS takes
/// both inputs of a bf16 / fp16 GEMM in that type), then every non-empty segment is one
/// cublasGemmEx: A = the expert's stored weight, B = its rounded rows, C = float rows,
/// CUBLAS_COMPUTE_32F. Rounding the activations adds the 16-bit type's relative error once
/// more (2^-9 for bf16, 2^-12 for fp16) to what the weights' rounding already costs; the
/// host kernels multiply float activations by the widened weights instead. INT8 weights and
/// double activations, and every other execution space, keep the packed product's own paths
/// (streaming, or a dequantised panel and CublasGrouped's float GEMM).
///
/// Selection: `PackedGLUExperts<Kokkos::Cuda, float, kmoe::bfloat16, Activation,
/// kmoe::gemm::CublasMixed>`, or `weight_only_layer` on a layer whose experts use it.

#include <kmoe/error.hpp>
#include <kmoe/gemm/cublas.hpp>
#include <kmoe/low_precision.hpp>
#include <kmoe/segments.hpp>

#include <Kokkos_Core.hpp>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <utility>

namespace kmoe::gemm {
namespace cublas_detail {

template <class Element>
struct packed_type;
template <>
struct packed_type<bfloat16> {
  static constexpr cudaDataType_t data = CUDA_R_16BF;
};
template <>
struct packed_type<float16> {
  static constexpr cudaDataType_t data = CUDA_R_16F;
};

/// The process's cuBLAS handle for the current device, set to `stream` with host pointer
/// mode; usable while `lock` (State's mutex) is held, i.e. while this object lives.
struct StreamHandle {
  std::unique_lock<std::mutex> lock;
  cublasHandle_t handle;
};
inline StreamHandle handle_on(cudaStream_t stream) {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  State& state = State::instance();
  std::unique_lock<std::mutex> lock(state.mutex);
  const cublasHandle_t handle = state.handle(device);
  check(cublasSetStream(handle, stream), "cublasSetStream");
  check(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
  return {std::move(lock), handle};
}

/// narrow = in rounded to Element (nearest even), as bit patterns.
template <class Element, class ExecSpace, class In, class Narrow>
void round_rows(const ExecSpace& space, const In& in, const Narrow& narrow) {
  Kokkos::parallel_for(
      "kmoe::gemm::CublasMixed::round_rows",
      Kokkos::MDRangePolicy<ExecSpace, Kokkos::Rank<2>>(space, {0, 0},
                                                        {int(in.extent(0)), int(in.extent(1))}),
      KOKKOS_LAMBDA(int r, int k) { narrow(r, k) = Element(float(in(r, k))).bits(); });
}

}  // namespace cublas_detail

/// \brief GEMM policy: gemm::CublasGrouped, and cuBLAS bf16 / fp16 GEMMs (fp32 compute) for
/// packed 16-bit expert weights with float activations and for the GEMMs of a layer stored
/// in 16 bits (gemm::multiply), on Kokkos::Cuda.
struct CublasMixed : CublasGrouped {
  static constexpr const char* name = "cublas-mixed";

  /// The packed products this policy does itself (gemm/packed_product.hpp).
  template <class ExecSpace, class Element, class Scalar>
  static constexpr bool multiplies_packed = cublas_detail::is_cuda_v<ExecSpace>&&
      is_packed_float_v<Element>&& std::is_same_v<Scalar, float>;

  /// The GEMMs of 16-bit storage this policy does itself (gemm::multiply): both inputs in
  /// one 16-bit type, the result in float or that type.
  template <class ExecSpace, class A, class B, class C>
  static constexpr bool multiplies_sixteen_bit =
      cublas_detail::is_cuda_v<ExecSpace>&& is_packed_float_v<A>&& std::is_same_v<A, B> &&
      (std::is_same_v<C, float> || std::is_same_v<C, A>);

  /// Row-major c = alpha op(a) op(b) + beta c as one cublasGemmEx with fp32 compute: a
  /// 16-bit c is rounded once from the fp32 sum (and read in 16 bits where beta != 0).
  template <class ExecSpace, class AView, class BView, class CView>
  static void gemm_sixteen_bit(const ExecSpace& space, bool transpose_a, bool transpose_b,
                               float alpha, const AView& a, const BView& b, float beta,
                               const CView& c) {
    using namespace cublas_detail;
    using Element = typename AView::non_const_value_type;
    using Result = typename CView::non_const_value_type;
    constexpr const char* where = "kmoe::gemm::CublasMixed::gemm_sixteen_bit";
    const std::size_t m = c.extent(0), n = c.extent(1);
    const std::size_t k = transpose_a ? a.extent(0) : a.extent(1);
    require((transpose_a ? a.extent(1) : a.extent(0)) == m &&
                (transpose_b ? b.extent(1) : b.extent(0)) == k &&
                (transpose_b ? b.extent(0) : b.extent(1)) == n,
            where, "operand extents", k, "op(a) [m, k] times op(b) [k, n] must give c [m, n]");
    if (m == 0 || n == 0) return;
    require_rows_contiguous(a, "a");
    require_rows_contiguous(b, "b");
    require_rows_contiguous(c, "c");
    constexpr cudaDataType_t result_type =
        std::is_same_v<Result, float> ? CUDA_R_32F : packed_type<Element>::data;
    const StreamHandle cublas = handle_on(space.cuda_stream());
    const cublasHandle_t handle = cublas.handle;
    // A row-major matrix is its transpose in column-major, so c^T = op(b)^T op(a)^T: b and
    // a swap places and keep their own transposition flags.
    check(cublasGemmEx(handle, transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                       transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N, as_int(n, "n"), as_int(m, "m"),
                       as_int(k, "k"), &alpha, b.data(), packed_type<Element>::data,
                       as_int(std::max<std::size_t>(b.stride(0), 1), "b row stride"), a.data(),
                       packed_type<Element>::data,
                       as_int(std::max<std::size_t>(a.stride(0), 1), "a row stride"), &beta,
                       c.data(), result_type,
                       as_int(std::max<std::size_t>(c.stride(0), 1), "c row stride"),
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx");
  }

  /// out[seg e] = round(in[seg e]) * values[e]^T for every non-empty segment, values [E, N, K]
  /// stored in Element, out overwritten; `narrow_in` is the caller's buffer for the rounded
  /// rows (sized here).
  template <class ExecSpace, class In, class Values, class Out, class Narrow>
  static void segment_times_packed(const ExecSpace& space, const Segments<ExecSpace>& segments,
                                   const In& in, const Values& values, const Out& out,
                                   Narrow& narrow_in) {
    using Element = typename Values::non_const_value_type;
    using namespace cublas_detail;
    static_assert(multiplies_packed<ExecSpace, Element, typename Out::non_const_value_type>,
                  "kmoe::gemm::CublasMixed: packed products are bf16 / fp16 weights with float "
                  "activations on Kokkos::Cuda");
    constexpr const char* where = "kmoe::gemm::CublasMixed::segment_times_packed";
    const int experts = segments.experts();
    require(values.extent(0) == std::size_t(experts), where, "weight experts", values.extent(0),
            "must equal the number of segments");
    require(in.extent(0) == std::size_t(segments.rows()) && out.extent(0) == in.extent(0), where,
            "rows", out.extent(0), "in and out must have the segments' rows");
    require(values.extent(2) == in.extent(1), where, "weight inputs", values.extent(2),
            "must equal the columns of in");
    require(values.extent(1) == out.extent(1), where, "weight outputs", values.extent(1),
            "must equal the columns of out");
    if (segments.rows() == 0 || out.extent(1) == 0) return;
    if (in.extent(1) == 0) {
      Kokkos::deep_copy(space, out, 0.0f);
      return;
    }
    require_rows_contiguous(out, "out");
    kmoe::detail::ensure_extents(narrow_in, "kmoe::gemm::CublasMixed::narrow_in", in.extent(0),
                                 in.extent(1));
    round_rows<Element>(space, in, narrow_in);
    const int n_out = as_int(out.extent(1), "out columns"), k = as_int(in.extent(1), "in columns");
    const int ld_out = as_int(out.stride(0), "out row stride");
    const std::size_t expert_stride = values.stride(0);
    const float one = 1, zero = 0;
    const StreamHandle cublas = handle_on(space.cuda_stream());
    const cublasHandle_t handle = cublas.handle;
    // Column-major view of the row-major operands: out_e^T (N x n_e) = W_e^T-as-stored
    // (transposed: W_e is [N, K] row-major, i.e. K x N column-major) times in_e^T (K x n_e).
    for (int e = 0; e < experts; ++e) {
      const int b = segments.begin(e), rows = segments.end(e) - b;
      if (rows == 0) continue;
      check(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n_out, rows, k, &one,
                         values.data() + std::size_t(e) * expert_stride, packed_type<Element>::data,
                         k, narrow_in.data() + std::size_t(b) * narrow_in.stride(0),
                         packed_type<Element>::data, k, &zero,
                         out.data() + std::size_t(b) * out.stride(0), CUDA_R_32F, ld_out,
                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            "cublasGemmEx");
    }
  }
};

}  // namespace kmoe::gemm
