// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file cublas.hpp
/// \brief GEMM policy gemm::CublasGrouped (target kmoe::cublas): gemm::KokkosKernels for
/// single GEMMs, plus the grouped form of gemm/segmented.hpp on Kokkos::Cuda, where every
/// expert's segment of one projection is one group of a single cublasGemmGroupedBatchedEx
/// call (CUDA 12.5 or newer) instead of one cuBLAS call per expert.
///
/// Selection: an expert (or router) takes its GEMM policy as a template parameter, e.g.
/// `SwiGLUExperts<Kokkos::Cuda, float, kmoe::gemm::CublasGrouped>`. On any other execution
/// space CublasGrouped offers no grouped form, so the segments run as the usual loop over
/// gemm::KokkosKernels with the same bits as the default policy.

#include <kmoe/error.hpp>
#include <kmoe/gemm/kokkos_kernels.hpp>
#include <kmoe/gemm/policy.hpp>
#include <kmoe/segments.hpp>

#include <Kokkos_Core.hpp>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace kmoe::gemm {
namespace cublas_detail {

/// Whether X is Kokkos::Cuda (false in a Kokkos without CUDA).
template <class X>
inline constexpr bool is_cuda_v =
#ifdef KOKKOS_ENABLE_CUDA
    std::is_same_v<X, Kokkos::Cuda>;
#else
    false;
#endif

inline void check(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw runtime_error(std::string("kmoe::gemm::CublasGrouped: ") + call +
                        " failed: " + cublasGetStatusName(status) + " (" +
                        std::to_string(int(status)) + "): " + cublasGetStatusString(status));
}
inline void check(cudaError_t status, const char* call) {
  if (status != cudaSuccess)
    throw runtime_error(std::string("kmoe::gemm::CublasGrouped: ") + call +
                        " failed: " + cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
}

/// The process's cuBLAS handles (one per CUDA device, created on first use and kept for the
/// process's lifetime: destroying them at exit would race the CUDA runtime's own teardown)
/// and, per stream, a device buffer for the groups' pointer arrays. The mutex serialises
/// set-stream + call on the shared handle and the buffer's reuse.
struct State {
  struct Buffer {
    void* data = nullptr;
    std::size_t bytes = 0;
  };
  std::mutex mutex;
  std::map<int, cublasHandle_t> handles;
  std::map<std::pair<int, cudaStream_t>, Buffer> buffers;

  static State& instance() {
    static State* state = new State();  // never destroyed, see above
    return *state;
  }

  /// Called with the mutex held.
  cublasHandle_t handle(int device) {
    auto it = handles.find(device);
    if (it != handles.end()) return it->second;
    cublasHandle_t h = nullptr;
    check(cublasCreate(&h), "cublasCreate");
    handles.emplace(device, h);
    return h;
  }

  /// At least `bytes` of device memory for work on `stream` (mutex held). Work queued on
  /// the stream reads the buffer in stream order, so reuse needs no fence; growing waits for
  /// the stream before the old buffer is freed.
  void* buffer(int device, cudaStream_t stream, std::size_t bytes) {
    Buffer& b = buffers[{device, stream}];
    if (b.bytes < bytes) {
      if (b.data) {
        check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        check(cudaFree(b.data), "cudaFree");
        b = Buffer{};
      }
      check(cudaMalloc(&b.data, bytes), "cudaMalloc");
      b.bytes = bytes;
    }
    return b.data;
  }
};

template <class Scalar>
struct types;
template <>
struct types<float> {
  static constexpr cudaDataType_t data = CUDA_R_32F;
  static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
};
template <>
struct types<double> {
  static constexpr cudaDataType_t data = CUDA_R_64F;
  static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_64F;
};

/// One group per problem (group_size 1): each segment has its own rows and pointers.
/// Column-major operands, as cuBLAS takes them.
template <class Scalar>
struct Problems {
  std::vector<cublasOperation_t> op_a, op_b;
  std::vector<int> m, n, k, lda, ldb, ldc, size;
  std::vector<Scalar> alpha, beta;
  std::vector<const void*> pointers_a, pointers_b;
  std::vector<void*> pointers_c;

  void add(cublasOperation_t ta, cublasOperation_t tb, int m_, int n_, int k_, Scalar alpha_,
           const Scalar* a, int lda_, const Scalar* b, int ldb_, Scalar beta_, Scalar* c,
           int ldc_) {
    op_a.push_back(ta);
    op_b.push_back(tb);
    m.push_back(m_);
    n.push_back(n_);
    k.push_back(k_);
    lda.push_back(lda_);
    ldb.push_back(ldb_);
    ldc.push_back(ldc_);
    size.push_back(1);
    alpha.push_back(alpha_);
    beta.push_back(beta_);
    pointers_a.push_back(a);
    pointers_b.push_back(b);
    pointers_c.push_back(c);
  }
  int count() const { return int(m.size()); }
};

/// Issues every problem as one cublasGemmGroupedBatchedEx on `stream`. The pointer arrays
/// go to the device with an asynchronous copy from pageable memory, which returns once the
/// source has been staged, so the host vectors may go away when this returns.
template <class Scalar>
void run(cudaStream_t stream, const Problems<Scalar>& p) {
  const int groups = p.count();
  if (groups == 0) return;
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  std::vector<const void*> pointers;
  pointers.reserve(3 * std::size_t(groups));
  pointers.insert(pointers.end(), p.pointers_a.begin(), p.pointers_a.end());
  pointers.insert(pointers.end(), p.pointers_b.begin(), p.pointers_b.end());
  pointers.insert(pointers.end(), p.pointers_c.begin(), p.pointers_c.end());
  const std::size_t bytes = pointers.size() * sizeof(void*);

  State& state = State::instance();
  const std::lock_guard<std::mutex> lock(state.mutex);
  const cublasHandle_t handle = state.handle(device);
  void** on_device = static_cast<void**>(state.buffer(device, stream, bytes));
  check(cudaMemcpyAsync(on_device, pointers.data(), bytes, cudaMemcpyHostToDevice, stream),
        "cudaMemcpyAsync");
  check(cublasSetStream(handle, stream), "cublasSetStream");
  check(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
  check(cublasGemmGroupedBatchedEx(
            handle, p.op_a.data(), p.op_b.data(), p.m.data(), p.n.data(), p.k.data(),
            p.alpha.data(), const_cast<const void* const*>(on_device), types<Scalar>::data,
            p.lda.data(), const_cast<const void* const*>(on_device + groups), types<Scalar>::data,
            p.ldb.data(), p.beta.data(), on_device + 2 * groups, types<Scalar>::data, p.ldc.data(),
            groups, p.size.data(), types<Scalar>::compute),
        "cublasGemmGroupedBatchedEx");
}

inline int as_int(std::size_t value, const char* parameter) {
  require(value <= std::size_t(INT_MAX), "kmoe::gemm::CublasGrouped", parameter, value,
          "cuBLAS takes int sizes");
  return int(value);
}

/// Row-major rank-2 (or a rank-3 slice's) leading dimension: LayoutRight rows are contiguous.
template <class View>
void require_rows_contiguous(const View& v, const char* parameter) {
  static_assert(std::is_same_v<typename View::array_layout, Kokkos::LayoutRight>,
                "kmoe::gemm::CublasGrouped: operands must be LayoutRight views");
  require(v.stride(View::rank - 1) == 1 || v.extent(View::rank - 1) <= 1,
          "kmoe::gemm::CublasGrouped", parameter, "strided", "rows must be contiguous");
}

}  // namespace cublas_detail

/// \brief GEMM policy: gemm::KokkosKernels, plus one cublasGemmGroupedBatchedEx per
/// segmented projection on Kokkos::Cuda (float and double).
///
/// Row-major views are the column-major views of their transposes, so for expert e with
/// rows [b, b + n_e):
///  - segment_times_weight: out_e^T (N x n_e) = alpha op(W_e)^T in_e^T + beta out_e^T, i.e.
///    cuBLAS A = W_e (transposed when W_e is stored [N, K], not when [K, N]), B = in_e;
///  - segment_weight_gradient: G_e^T (I x O) += right_e^T left_e, i.e. A = right_e, B =
///    left_e transposed.
/// Empty segments are no group. The call runs on the instance's stream
/// (`space.cuda_stream()`), asynchronously like any kernel on it; cuBLAS errors are thrown
/// as kmoe::runtime_error naming the call and the status.
struct CublasGrouped {
  static constexpr const char* name = "cublas-grouped";

  template <class ExecSpace, class AView, class BView, class CView>
  static void gemm(const ExecSpace& space, bool transpose_a, bool transpose_b,
                   typename CView::const_value_type alpha, const AView& a, const BView& b,
                   typename CView::const_value_type beta, const CView& c) {
    KokkosKernels::gemm(space, transpose_a, transpose_b, alpha, a, b, beta, c);
  }

  /// Host spaces: the same calling-thread form as gemm::KokkosKernels, so that many small
  /// segments still run concurrently with the default policy's bits.
  template <class ExecSpace, class AView, class BView, class CView>
  static void gemm_on_calling_thread(const ExecSpace& space, bool transpose_a, bool transpose_b,
                                     typename CView::const_value_type alpha, const AView& a,
                                     const BView& b, typename CView::const_value_type beta,
                                     const CView& c) {
    KokkosKernels::gemm_on_calling_thread(space, transpose_a, transpose_b, alpha, a, b, beta, c);
  }

  /// out[seg e] = alpha in[seg e] op(weight[e]) + beta out[seg e], every non-empty e, in
  /// one cublasGemmGroupedBatchedEx (Kokkos::Cuda only: detected, so other spaces loop).
  template <class ExecSpace, class In, class Weight, class Out,
            std::enable_if_t<cublas_detail::is_cuda_v<ExecSpace>, int> = 0>
  static void segment_times_weight(const ExecSpace& space, const Segments<ExecSpace>& segments,
                                   const In& in, const Weight& weight, bool transpose_weight,
                                   typename Out::const_value_type alpha,
                                   typename Out::const_value_type beta, const Out& out) {
    using Scalar = typename Out::non_const_value_type;
    using namespace cublas_detail;
    constexpr const char* where = "kmoe::gemm::CublasGrouped::segment_times_weight";
    const int experts = segments.experts();
    const std::size_t inner = in.extent(1), width = out.extent(1);
    require(weight.extent(0) == std::size_t(experts), where, "weight experts", weight.extent(0),
            "must equal the number of segments");
    require(in.extent(0) == std::size_t(segments.rows()) && out.extent(0) == in.extent(0), where,
            "rows", out.extent(0), "in and out must have the segments' rows");
    require((transpose_weight ? weight.extent(2) : weight.extent(1)) == inner, where,
            "weight inner extent", transpose_weight ? weight.extent(2) : weight.extent(1),
            "must equal the columns of in");
    require((transpose_weight ? weight.extent(1) : weight.extent(2)) == width, where,
            "weight outer extent", transpose_weight ? weight.extent(1) : weight.extent(2),
            "must equal the columns of out");
    if (width == 0 || segments.rows() == 0) return;
    if (inner == 0) {
      // An empty inner dimension only scales out by beta: the loop does it.
      for (int e = 0; e < experts; ++e) {
        const auto rows = Kokkos::make_pair(segments.begin(e), segments.end(e));
        if (rows.first == rows.second) continue;
        gemm(space, false, transpose_weight, alpha, Kokkos::subview(in, rows, Kokkos::ALL),
             Kokkos::subview(weight, e, Kokkos::ALL, Kokkos::ALL), beta,
             Kokkos::subview(out, rows, Kokkos::ALL));
      }
      return;
    }
    require_rows_contiguous(in, "in");
    require_rows_contiguous(weight, "weight");
    require_rows_contiguous(out, "out");
    const int n_out = as_int(width, "out columns"), k = as_int(inner, "in columns");
    const int ld_in = as_int(in.stride(0), "in row stride");
    const int ld_out = as_int(out.stride(0), "out row stride");
    const int ld_w = as_int(weight.stride(1), "weight row stride");
    Problems<Scalar> problems;
    for (int e = 0; e < experts; ++e) {
      const int b = segments.begin(e), rows = segments.end(e) - b;
      if (rows == 0) continue;
      problems.add(transpose_weight ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, n_out, rows, k,
                   Scalar(alpha), weight.data() + std::size_t(e) * weight.stride(0), ld_w,
                   in.data() + std::size_t(b) * in.stride(0), ld_in, Scalar(beta),
                   out.data() + std::size_t(b) * out.stride(0), ld_out);
    }
    run(space.cuda_stream(), problems);
  }

  /// grad_weight[e] += left[seg e]^T right[seg e], every non-empty e, in one
  /// cublasGemmGroupedBatchedEx (Kokkos::Cuda only).
  template <class ExecSpace, class Left, class Right, class GradWeight,
            std::enable_if_t<cublas_detail::is_cuda_v<ExecSpace>, int> = 0>
  static void segment_weight_gradient(const ExecSpace& space, const Segments<ExecSpace>& segments,
                                      const Left& left, const Right& right,
                                      const GradWeight& grad_weight) {
    using Scalar = typename GradWeight::non_const_value_type;
    using namespace cublas_detail;
    constexpr const char* where = "kmoe::gemm::CublasGrouped::segment_weight_gradient";
    const int experts = segments.experts();
    require(grad_weight.extent(0) == std::size_t(experts), where, "grad_weight experts",
            grad_weight.extent(0), "must equal the number of segments");
    require(left.extent(0) == std::size_t(segments.rows()) && right.extent(0) == left.extent(0),
            where, "rows", left.extent(0), "left and right must have the segments' rows");
    require(grad_weight.extent(1) == left.extent(1), where, "grad_weight rows",
            grad_weight.extent(1), "must equal the columns of left");
    require(grad_weight.extent(2) == right.extent(1), where, "grad_weight columns",
            grad_weight.extent(2), "must equal the columns of right");
    if (left.extent(1) == 0 || right.extent(1) == 0 || segments.rows() == 0) return;
    require_rows_contiguous(left, "left");
    require_rows_contiguous(right, "right");
    require_rows_contiguous(grad_weight, "grad_weight");
    const int n_left = as_int(left.extent(1), "left columns");
    const int n_right = as_int(right.extent(1), "right columns");
    const int ld_left = as_int(left.stride(0), "left row stride");
    const int ld_right = as_int(right.stride(0), "right row stride");
    const int ld_grad = as_int(grad_weight.stride(1), "grad_weight row stride");
    Problems<Scalar> problems;
    for (int e = 0; e < experts; ++e) {
      const int b = segments.begin(e), rows = segments.end(e) - b;
      if (rows == 0) continue;
      problems.add(CUBLAS_OP_N, CUBLAS_OP_T, n_right, n_left, rows, Scalar(1),
                   right.data() + std::size_t(b) * right.stride(0), ld_right,
                   left.data() + std::size_t(b) * left.stride(0), ld_left, Scalar(1),
                   grad_weight.data() + std::size_t(e) * grad_weight.stride(0), ld_grad);
    }
    run(space.cuda_stream(), problems);
  }
};

}  // namespace kmoe::gemm
