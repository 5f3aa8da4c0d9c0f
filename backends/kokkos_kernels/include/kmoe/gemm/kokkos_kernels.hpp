// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file kokkos_kernels.hpp
/// \brief GEMM backend that sends every expert and router GEMM to KokkosBlas::gemm, which
/// reaches the vendor BLAS (OpenBLAS on host, cuBLAS on CUDA) through Kokkos Kernels' TPLs.

#include <kmoe/error.hpp>
#include <kmoe/types.hpp>

#include <KokkosBlas3_gemm.hpp>

#include <algorithm>
#include <string>
#include <type_traits>

namespace kmoe::gemm {

namespace detail {

/// Rows of C up to which a host GEMM C = A B^T goes to the streaming kernel below.
inline constexpr std::size_t skinny_rows = 8;

/// Where the independent pieces of one GEMM (output columns of the skinny kernel, tiles of
/// C) run: spread over the execution space by a Kokkos kernel, or in index order on the
/// calling thread, which launches nothing and so may run inside a Kokkos kernel (Kokkos
/// forbids dispatch from inside one: 4.x deadlocks on the instance mutex, 5.x aborts).
/// Each piece does the same arithmetic either way, so both give the same bits.
struct Dispatched {};
struct OnCallingThread {};

template <class Form, class Schedule, class ExecSpace, class Piece>
void for_each_piece(const ExecSpace& space, const char* label, std::size_t count,
                    const Piece& piece) {
  if constexpr (std::is_same_v<Form, OnCallingThread>) {
    for (std::size_t i = 0; i < count; ++i) piece(i);
  } else {
    Kokkos::parallel_for(label, Kokkos::RangePolicy<ExecSpace, Schedule>(space, 0, count), piece);
  }
}

/// C = alpha A B^T + beta C for M rows of A (M small, as in decode): each output column j
/// is the dot product of the M rows of A with the contiguous row j of B, so B (the
/// [out, in] weight) is read exactly once, with no packing copy, and A stays in cache.
/// Vendor BLAS packs B first, which for a few rows costs more than the product itself.
template <int M, class Form, class ExecSpace, class Scalar>
void skinny_times_transposed(const ExecSpace& space, std::size_t n, std::size_t k, Scalar alpha,
                             const Scalar* a, const Scalar* b, Scalar beta, Scalar* c) {
  for_each_piece<Form, Kokkos::Schedule<Kokkos::Static>>(
      space, "kmoe::gemm::skinny", n, KOKKOS_LAMBDA(std::size_t j) {
        // Independent lanes let the compiler vectorise the k loop without reassociating.
        constexpr std::size_t lanes = 16;
        Scalar acc[M][lanes] = {};
        const Scalar* w = b + j * k;
        const std::size_t body = k / lanes * lanes;
        for (std::size_t p = 0; p < body; p += lanes)
          for (int r = 0; r < M; ++r)
            for (std::size_t l = 0; l < lanes; ++l) acc[r][l] += a[r * k + p + l] * w[p + l];
        for (int r = 0; r < M; ++r) {
          Scalar sum = 0;
          for (std::size_t l = 0; l < lanes; ++l) sum += acc[r][l];
          for (std::size_t p = body; p < k; ++p) sum += a[r * k + p] * w[p];
          Scalar& out = c[r * n + j];
          out = alpha * sum + (beta == Scalar(0) ? Scalar(0) : beta * out);
        }
      });
}

template <class Form, class ExecSpace, class Scalar, int M = 1>
void skinny_dispatch(const ExecSpace& space, std::size_t m, std::size_t n, std::size_t k,
                     Scalar alpha, const Scalar* a, const Scalar* b, Scalar beta, Scalar* c) {
  if constexpr (M <= int(skinny_rows)) {
    if (m == std::size_t(M))
      skinny_times_transposed<M, Form>(space, n, k, alpha, a, b, beta, c);
    else
      skinny_dispatch<Form, ExecSpace, Scalar, M + 1>(space, m, n, k, alpha, a, b, beta, c);
  }
}

/// Fixed tile of a host GEMM in rows x columns of the row-major C. Vendor BLAS threading
/// partitions C by the thread count, and OpenBLAS (0.3.21, Zen kernels) then gives other
/// bits for the same product; tiles that depend on the shape alone, each computed by one
/// single-threaded BLAS call, give the same bits for any thread count at a cost within a
/// few percent of the vendor's own threading (docs/design.md, "Determinism").
inline constexpr std::size_t host_tile_rows = 256;
inline constexpr std::size_t host_tile_columns = 1024;
/// Narrower tiles when C has a single row tile, so that a short GEMM (small expert
/// segments, decode-sized batches) still spreads over the threads.
inline constexpr std::size_t host_tile_columns_short = 256;

inline std::size_t host_tile_width(std::size_t rows) {
  return rows <= host_tile_rows ? host_tile_columns_short : host_tile_columns;
}

/// Row-major C = alpha op(A) op(B) + beta C on column-major aliases (see KokkosKernels),
/// its pieces run as Form says. A free function, not a private member: nvcc refuses an
/// extended __host__ __device__ lambda whose enclosing function is private.
template <class Form, class ExecSpace, class AView, class BView, class CView>
void gemm_row_major(const ExecSpace& space, bool transpose_a, bool transpose_b,
                    typename CView::const_value_type alpha, const AView& a, const BView& b,
                    typename CView::const_value_type beta, const CView& c) {
  using Scalar = typename CView::non_const_value_type;
  using Memory = typename ExecSpace::memory_space;
  using Device = Kokkos::Device<ExecSpace, Memory>;
  using ColMajor =
      Kokkos::View<Scalar**, Kokkos::LayoutLeft, Device, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  using ConstColMajor = Kokkos::View<const Scalar**, Kokkos::LayoutLeft, Device,
                                     Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  const std::size_t m = c.extent(0), n = c.extent(1);
  const std::size_t k = transpose_a ? a.extent(0) : a.extent(1);
  require((transpose_a ? a.extent(1) : a.extent(0)) == m, "kmoe::gemm::KokkosKernels::gemm",
          "A rows", (transpose_a ? a.extent(1) : a.extent(0)), "must equal rows of C");
  require((transpose_b ? b.extent(1) : b.extent(0)) == k, "kmoe::gemm::KokkosKernels::gemm",
          "B rows", (transpose_b ? b.extent(1) : b.extent(0)),
          "must equal the inner dimension of op(A)");
  require((transpose_b ? b.extent(0) : b.extent(1)) == n, "kmoe::gemm::KokkosKernels::gemm",
          "B columns", (transpose_b ? b.extent(0) : b.extent(1)), "must equal columns of C");
  if (m == 0 || n == 0) return;
  require(a.span_is_contiguous() && b.span_is_contiguous() && c.span_is_contiguous(),
          "kmoe::gemm::KokkosKernels::gemm", "operand layout", "strided",
          "operands must be contiguous row-major blocks");
  const ConstColMajor a_t(a.data(), a.extent(1), a.extent(0));
  const ConstColMajor b_t(b.data(), b.extent(1), b.extent(0));
  const ColMajor c_t(c.data(), n, m);
  if (k == 0) {
    // An empty inner dimension leaves C = beta * C; beta = 0 overwrites, as BLAS does.
    Scalar* c_data = c.data();
    for_each_piece<Form, Kokkos::Schedule<Kokkos::Static>>(
        space, "kmoe::gemm::scale", m * n, KOKKOS_LAMBDA(std::size_t i) {
          c_data[i] = beta == Scalar(0) ? Scalar(0) : c_data[i] * beta;
        });
    return;
  }
  // A few rows times a transposed weight (decode, small expert segments): stream the
  // weight once on host spaces; device BLAS handles skinny shapes itself.
  constexpr bool host = Kokkos::SpaceAccessibility<Kokkos::HostSpace, Memory>::accessible;
  if constexpr (host) {
    if (!transpose_a && transpose_b && m <= skinny_rows) {
      skinny_dispatch<Form>(space, m, n, k, Scalar(alpha), a.data(), b.data(), Scalar(beta),
                            c.data());
      return;
    }
  }
  const char* op_b = transpose_b ? "T" : "N";
  const char* op_a = transpose_a ? "T" : "N";
  if constexpr (host) {
    // Tiles of C run concurrently, each a single-threaded BLAS call (a BLAS call inside
    // the parallel region runs single-threaded), or in turn on the calling thread: the
    // same calls either way.
    const std::size_t row_tiles = (m + host_tile_rows - 1) / host_tile_rows;
    const std::size_t width = host_tile_width(m);
    const std::size_t column_tiles = (n + width - 1) / width;
    for_each_piece<Form, Kokkos::Schedule<Kokkos::Dynamic>>(
        space, "kmoe::gemm::host_tiles", row_tiles * column_tiles, [&](std::size_t tile) {
          const std::size_t i0 = tile / column_tiles * host_tile_rows;
          const std::size_t j0 = tile % column_tiles * width;
          const auto rows = Kokkos::make_pair(i0, std::min(m, i0 + host_tile_rows));
          const auto columns = Kokkos::make_pair(j0, std::min(n, j0 + width));
          // In the column-major aliases C's rows are columns: op(B)^T gives the tile's
          // columns of C, op(A)^T its rows.
          const auto c_tile = Kokkos::subview(c_t, columns, rows);
          const auto with_b = [&](const auto& b_tile) {
            if (transpose_a)
              KokkosBlas::gemm(op_b, op_a, alpha, b_tile, Kokkos::subview(a_t, rows, Kokkos::ALL),
                               beta, c_tile);
            else
              KokkosBlas::gemm(op_b, op_a, alpha, b_tile, Kokkos::subview(a_t, Kokkos::ALL, rows),
                               beta, c_tile);
          };
          if (transpose_b)
            with_b(Kokkos::subview(b_t, Kokkos::ALL, columns));
          else
            with_b(Kokkos::subview(b_t, columns, Kokkos::ALL));
        });
  } else {
#if defined(KOKKOSKERNELS_VERSION) && KOKKOSKERNELS_VERSION >= 40000
    // The caller's instance (its CUDA stream), so that the GEMM orders with its other work.
    KokkosBlas::gemm(space, op_b, op_a, alpha, b_t, a_t, beta, c_t);
#else
    // Kokkos Kernels 3.x has no instance overload: the default instance's stream.
    KokkosBlas::gemm(op_b, op_a, alpha, b_t, a_t, beta, c_t);
#endif
  }
}

}  // namespace detail

/// \brief GEMM policy: row-major C = alpha * op(A) * op(B) + beta * C via Kokkos Kernels.
///
/// kmoe stores everything row-major (a token is a contiguous row), while the BLAS TPLs of
/// Kokkos Kernels are specialised for column-major views. A row-major matrix is the
/// column-major view of its transpose, so C = op(A) op(B) is computed as
/// C^T = op(B)^T op(A)^T on column-major aliases of the same memory: no copy, and the
/// vendor fast path is chosen at compile time by Kokkos Kernels.
struct KokkosKernels {
  static constexpr const char* name = "kokkos-kernels";

  template <class ExecSpace, class AView, class BView, class CView>
  static void gemm(const ExecSpace& space, bool transpose_a, bool transpose_b,
                   typename CView::const_value_type alpha, const AView& a, const BView& b,
                   typename CView::const_value_type beta, const CView& c) {
    detail::gemm_row_major<detail::Dispatched>(space, transpose_a, transpose_b, alpha, a, b, beta,
                                               c);
  }

  /// \brief The same product, with the same bits, computed on the calling thread of a host
  /// space without launching a Kokkos kernel, so that it may itself run inside one: many
  /// small expert GEMMs at once, one per thread (gemm/segmented.hpp). A BLAS call
  /// made there runs single-threaded (OpenBLAS' OpenMP build sees the parallel region), as
  /// each tile's call does in gemm().
  template <class ExecSpace, class AView, class BView, class CView>
  static void gemm_on_calling_thread(const ExecSpace& space, bool transpose_a, bool transpose_b,
                                     typename CView::const_value_type alpha, const AView& a,
                                     const BView& b, typename CView::const_value_type beta,
                                     const CView& c) {
    static_assert(
        Kokkos::SpaceAccessibility<Kokkos::HostSpace, typename ExecSpace::memory_space>::accessible,
        "kmoe::gemm::KokkosKernels::gemm_on_calling_thread: host execution spaces only");
    detail::gemm_row_major<detail::OnCallingThread>(space, transpose_a, transpose_b, alpha, a, b,
                                                    beta, c);
  }
};

}  // namespace kmoe::gemm
