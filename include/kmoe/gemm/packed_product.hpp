// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file packed_product.hpp
/// \brief Segmented products with weight-only (INT8, bf16, fp16) expert weights: one
/// projection (out = in q^T per segment) and a GLU's gate and up projections with the
/// activation (hidden = Activation(in q_gate^T) * (in q_up^T)), each in one of three ways:
///  - the GEMM policy's own packed product where it has one for this space and element
///    type (gemm::CublasMixed: cuBLAS bf16 / fp16 GEMMs on Kokkos::Cuda, kmoe::cublas);
///  - segments of fewer than packed_panel_rows rows (decode) stream the packed rows
///    (gemm/packed_stream.hpp), every expert's in one kernel;
///  - larger segments (prefill) unpack their expert into a Scalar panel and call the GEMM
///    policy, where the conversion is paid once for many rows.
/// The panel and the list of streamed experts live in a PackedProductWorkspace that the
/// caller keeps, so a forward allocates nothing once the shapes have been seen.

#include <kmoe/gemm/packed_stream.hpp>
#include <kmoe/gemm/packed_weight.hpp>
#include <kmoe/gemm/segmented.hpp>
#include <kmoe/segments.hpp>
#include <kmoe/types.hpp>

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <type_traits>

namespace kmoe {

/// \brief Buffers of the packed products, kept between calls by the caller.
template <class ExecSpace, class Scalar>
struct PackedProductWorkspace {
  /// One expert's weight as Scalar (prefill): storage for the largest N * K seen, viewed
  /// [N, K] per projection, so projections of transposed shapes (gate [F, H], down [H, F])
  /// share it without reallocating.
  Vector<Scalar, ExecSpace> panel;
  Vector<int, ExecSpace> streamed;  ///< the experts whose segments stream (decode)
  typename Vector<int, ExecSpace>::HostMirror streamed_host;
  /// Activations rounded to the weights' 16-bit type, for a GEMM policy whose packed
  /// product takes both operands in it (cuBLAS).
  Kokkos::View<std::uint16_t**, Kokkos::LayoutRight, typename ExecSpace::memory_space> narrow_in;
};

namespace detail {

/// Rows per segment from which a segment converts its expert into a panel and calls the
/// GEMM policy instead of streaming the packed rows (at 64 rows the conversion of one
/// weight is shared by 64 products; below, streaming reads a quarter (INT8) or half (16-bit)
/// of fp32's bytes once for all the rows).
inline constexpr int packed_panel_rows = 64;

/// Whether the GEMM policy multiplies Scalar activations by packed Element weights itself
/// on ExecSpace: a policy opts in with `template <class X, class E, class S> static
/// constexpr bool multiplies_packed` and a static
/// `segment_times_packed(space, segments, in, values, out, narrow_in)`.
template <class Gemm, class ExecSpace, class Element, class Scalar, class = void>
struct gemm_multiplies_packed : std::false_type {};
template <class Gemm, class ExecSpace, class Element, class Scalar>
struct gemm_multiplies_packed<
    Gemm, ExecSpace, Element, Scalar,
    std::enable_if_t<Gemm::template multiplies_packed<ExecSpace, Element, Scalar>>>
    : std::true_type {};

/// Lists the experts with 1 to packed_panel_rows - 1 rows in ws.streamed; returns how many.
template <class ExecSpace, class Scalar>
int list_streamed_experts(const Segments<ExecSpace>& segments,
                          PackedProductWorkspace<ExecSpace, Scalar>& ws) {
  const int experts = segments.experts();
  if (ws.streamed.extent(0) < std::size_t(experts)) {
    ws.streamed = Vector<int, ExecSpace>("kmoe::packed_streamed_experts", experts);
    ws.streamed_host = Kokkos::create_mirror_view(ws.streamed);
  }
  int count = 0;
  for (int e = 0; e < experts; ++e) {
    const int rows = segments.end(e) - segments.begin(e);
    if (rows > 0 && rows < packed_panel_rows) ws.streamed_host(count++) = e;
  }
  if (count > 0) Kokkos::deep_copy(ws.streamed, ws.streamed_host);
  return count;
}

/// out[seg e] = in[seg e] * unpacked(w[e])^T for every segment of packed_panel_rows or more
/// rows.
template <class Gemm, class ExecSpace, class Element, class In, class Out, class Scalar>
void packed_panel_segments(const Segments<ExecSpace>& segments, const In& in,
                           const PackedWeight<ExecSpace, Element>& w, const Out& out,
                           PackedProductWorkspace<ExecSpace, Scalar>& ws) {
  for (int e = 0; e < segments.experts(); ++e) {
    const int b = segments.begin(e), n = segments.end(e) - b;
    if (n < packed_panel_rows) continue;
    const std::size_t outputs = w.values.extent(1), inputs = w.values.extent(2);
    if (ws.panel.extent(0) < outputs * inputs)
      ws.panel = Vector<Scalar, ExecSpace>(
          Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::packed_panel"), outputs * inputs);
    const Kokkos::View<Scalar**, Kokkos::LayoutRight, typename ExecSpace::memory_space,
                       Kokkos::MemoryTraits<Kokkos::Unmanaged>>
        panel(ws.panel.data(), outputs, inputs);
    unpack_expert(w, e, panel);
    Gemm::gemm(ExecSpace(), false, true, Scalar(1), gemm::detail::rows_of(in, b, b + n), panel,
               Scalar(0), gemm::detail::rows_of(out, b, b + n));
  }
}

}  // namespace detail

/// \brief out[seg e] = in[seg e] * unpacked(w[e])^T for every non-empty segment: the packed
/// counterpart of gemm::segment_times_weight with a weight stored [out, in] (N = out's
/// columns, K = in's columns); out is overwritten.
template <class Gemm, class ExecSpace, class Element, class In, class Out, class Scalar>
void segment_times_packed_weight(const Segments<ExecSpace>& segments, const In& in,
                                 const PackedWeight<ExecSpace, Element>& w, const Out& out,
                                 PackedProductWorkspace<ExecSpace, Scalar>& ws) {
  static_assert(std::is_same_v<typename Out::non_const_value_type, Scalar>,
                "kmoe::segment_times_packed_weight: out and the workspace differ in Scalar");
  if constexpr (detail::gemm_multiplies_packed<Gemm, ExecSpace, Element, Scalar>::value) {
    Gemm::segment_times_packed(ExecSpace(), segments, in, w.values, out, ws.narrow_in);
  } else {
    const int count = detail::list_streamed_experts(segments, ws);
    detail::packed_stream<detail::PlainPairs>(segments, ws.streamed, count, in, w, w, out);
    detail::packed_panel_segments<Gemm>(segments, in, w, out, ws);
  }
}

/// \brief hidden[seg e] = Activation(x[seg e] q_gate[e]^T) * (x[seg e] q_up[e]^T) for every
/// non-empty segment (a GLU expert's first half); `up` [rows, F] is scratch for the
/// segments that do not stream. Streamed segments compute both projections from the same
/// activation loads and write only hidden.
template <class Activation, class Gemm, class ExecSpace, class Element, class In, class Out,
          class Scalar>
void segment_glu_packed(const Segments<ExecSpace>& segments, const In& x,
                        const PackedWeight<ExecSpace, Element>& w_gate,
                        const PackedWeight<ExecSpace, Element>& w_up, const Out& hidden,
                        const Out& up, PackedProductWorkspace<ExecSpace, Scalar>& ws) {
  const int ffn = int(w_gate.values.extent(1));
  const auto offsets = segments.offsets;
  const auto owner = segments.expert_of_row;
  // Rows left for the activation pass: every row where the policy does the products,
  // else the rows of segments that took the panel path.
  bool all_rows = true;
  if constexpr (detail::gemm_multiplies_packed<Gemm, ExecSpace, Element, Scalar>::value) {
    Gemm::segment_times_packed(ExecSpace(), segments, x, w_gate.values, hidden, ws.narrow_in);
    Gemm::segment_times_packed(ExecSpace(), segments, x, w_up.values, up, ws.narrow_in);
  } else {
    const int count = detail::list_streamed_experts(segments, ws);
    detail::packed_stream<detail::GluPairs<Activation>>(segments, ws.streamed, count, x, w_gate,
                                                        w_up, hidden);
    detail::packed_panel_segments<Gemm>(segments, x, w_gate, hidden, ws);
    detail::packed_panel_segments<Gemm>(segments, x, w_up, up, ws);
    all_rows = false;
    bool any_panel = false;
    for (int e = 0; e < segments.experts(); ++e)
      any_panel = any_panel || segments.end(e) - segments.begin(e) >= detail::packed_panel_rows;
    if (!any_panel) return;
  }
  Kokkos::parallel_for(
      "kmoe::segment_glu_packed::activation",
      Kokkos::MDRangePolicy<ExecSpace, Kokkos::Rank<2>>({0, 0}, {segments.rows(), ffn}),
      KOKKOS_LAMBDA(int r, int n) {
        const int e = owner(r);
        if (all_rows || offsets(e + 1) - offsets(e) >= detail::packed_panel_rows)
          hidden(r, n) = Activation::value(hidden(r, n)) * up(r, n);
      });
}

}  // namespace kmoe
