// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file packed_weight.hpp
/// \brief Weight-only storage in fewer bits: stacked per-expert weights [E, N, K] held as
/// INT8 (quantised symmetrically per output channel, one fp32 scale per row n of each
/// expert) or as bf16 / fp16 (rounded to nearest even, no scale), and the segmented product
/// with them, converted inside the kernel; activations and sums stay in the caller's Scalar.
///
/// INT8 quantisation: scale = max_k |w(e, n, k)| / 127 and q = round(w / scale) (half away from
/// zero, as llama.cpp's Q8_0), so q lies in [-127, 127]; an all-zero row has scale 0.
/// The product out(r, n) = scale(e, n) * sum_k in(r, k) q(e, n, k) factors the scale out of
/// the sum (scale 1 for the 16-bit types). Segments of few rows (decode) stream each weight row once and use it for every
/// row of the segment; larger segments (prefill) dequantise their expert's slice into a
/// panel and call the GEMM policy, where the conversion is paid once per many rows.

#include <kmoe/detail/math.hpp>
#include <kmoe/gemm/segmented.hpp>
#include <kmoe/low_precision.hpp>
#include <kmoe/types.hpp>

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <string>
#include <type_traits>

namespace kmoe {

/// \brief Values [E, N, K] of Element (std::int8_t, bfloat16 or float16) and, for INT8, the
/// fp32 scales [E, N] of one stacked weight.
template <class ExecSpace, class Element>
struct PackedWeight {
  static_assert(std::is_same_v<Element, std::int8_t> || is_packed_float_v<Element>,
                "kmoe::PackedWeight: Element must be std::int8_t, kmoe::bfloat16 or kmoe::float16");
  using memory_space = typename ExecSpace::memory_space;
  using element_type = Element;
  static constexpr bool scaled = std::is_same_v<Element, std::int8_t>;
  Kokkos::View<Element***, Kokkos::LayoutRight, memory_space> values;
  Kokkos::View<float**, Kokkos::LayoutRight, memory_space> scales;  ///< INT8 only

  /// Bytes held: the values and the scales.
  std::size_t bytes() const {
    return values.size() * sizeof(Element) + scales.size() * sizeof(float);
  }
};

/// \brief `w` [E, N, K] quantised to INT8 per output channel (see the file comment).
template <class ExecSpace, class Scalar>
PackedWeight<ExecSpace, std::int8_t> quantize_per_output_channel(
    const Tensor3<Scalar, ExecSpace>& w, const std::string& name) {
  const int experts = int(w.extent(0)), outputs = int(w.extent(1)), inputs = int(w.extent(2));
  PackedWeight<ExecSpace, std::int8_t> q;
  q.values = decltype(q.values)(Kokkos::view_alloc(Kokkos::WithoutInitializing, name + ".int8"),
                                experts, outputs, inputs);
  q.scales = decltype(q.scales)(name + ".scale", experts, outputs);
  const auto values = q.values;
  const auto scales = q.scales;
  Kokkos::parallel_for(
      "kmoe::quantize_per_output_channel",
      Kokkos::MDRangePolicy<ExecSpace, Kokkos::Rank<2>>({0, 0}, {experts, outputs}),
      KOKKOS_LAMBDA(int e, int n) {
        double largest = 0;
        for (int k = 0; k < inputs; ++k) {
          const double magnitude = w(e, n, k) < 0 ? -double(w(e, n, k)) : double(w(e, n, k));
          largest = magnitude > largest ? magnitude : largest;
        }
        const float scale = float(largest / 127);
        scales(e, n) = scale;
        for (int k = 0; k < inputs; ++k) {
          const double ratio = scale > 0 ? double(w(e, n, k)) / double(scale) : 0.0;
          const double rounded = ratio < 0 ? -double(long(0.5 - ratio)) : double(long(ratio + 0.5));
          values(e, n, k) = std::int8_t(rounded > 127 ? 127 : (rounded < -127 ? -127 : rounded));
        }
      });
  return q;
}

/// \brief `w` [E, N, K] in Element: INT8 quantised per output channel, bf16 / fp16 rounded
/// to nearest even.
template <class Element, class ExecSpace, class Scalar>
PackedWeight<ExecSpace, Element> pack_weight(const Tensor3<Scalar, ExecSpace>& w,
                                             const std::string& name) {
  if constexpr (std::is_same_v<Element, std::int8_t>) {
    return quantize_per_output_channel<ExecSpace, Scalar>(w, name);
  } else {
    PackedWeight<ExecSpace, Element> packed;
    packed.values =
        decltype(packed.values)(Kokkos::view_alloc(Kokkos::WithoutInitializing, name + ".packed"),
                                w.extent(0), w.extent(1), w.extent(2));
    const auto values = packed.values;
    Kokkos::parallel_for(
        "kmoe::pack_weight", Kokkos::RangePolicy<ExecSpace>(0, w.size()),
        KOKKOS_LAMBDA(std::size_t i) { values.data()[i] = Element(float(w.data()[i])); });
    return packed;
  }
}

namespace detail {

/// A stored weight as Scalar (its scale applied separately).
template <class Scalar, class Element>
KOKKOS_FORCEINLINE_FUNCTION Scalar widen_weight(Element value) {
  if constexpr (std::is_same_v<Element, std::int8_t>)
    return Scalar(value);
  else
    return Scalar(float(value));
}

/// Rows per segment from which a segment converts its expert into a panel and calls the
/// GEMM policy instead of streaming the packed rows (at 64 rows the conversion of one
/// weight is shared by 64 products; below, streaming reads a quarter (INT8) or half (16-bit)
/// of fp32's bytes).
inline constexpr int packed_panel_rows = 64;

/// Lanes of the streaming dot products: independent partial sums, so the compiler keeps
/// them in vector registers without reordering any float addition (no -ffast-math); the
/// order is the same for every vector width.
inline constexpr int packed_lanes = 16;

/// acc[j] = sum_k x[j * stride + k] * q[k] for Rows rows, in lane order: lane l sums
/// k = l, l + 16, ... up to the last multiple of 16, the lanes are added in order, then the
/// tail of k. The stored values are converted once for all rows, a chunk at a time into a
/// buffer (a plain loop the compiler vectorises; converting inside the multiply-add loop
/// it does not). Rows is a constant so the partial sums stay in registers. Fused: each step
/// is one fused multiply-add (the AVX2 + FMA form and CUDA), so results depend on the
/// host's FMA, within the storage's error.
template <int Rows, bool Fused, class Scalar, class Element>
KOKKOS_FORCEINLINE_FUNCTION void packed_rows_dot_fixed(const Element* q, const Scalar* x,
                                                       std::size_t stride, int inputs,
                                                       Scalar* acc) {
  constexpr int chunk = 16 * packed_lanes;
  Scalar lanes[Rows][packed_lanes] = {};
  Scalar w[chunk];
  const int body = inputs - inputs % packed_lanes;
  for (int start = 0; start < body; start += chunk) {
    const int count = body - start < chunk ? body - start : chunk;
    for (int i = 0; i < count; ++i) w[i] = widen_weight<Scalar>(q[start + i]);
    for (int k = 0; k < count; k += packed_lanes)
      for (int j = 0; j < Rows; ++j)
        for (int l = 0; l < packed_lanes; ++l) {
          const Scalar xv = x[j * stride + std::size_t(start + k + l)];
          if constexpr (Fused)
            lanes[j][l] = fused_multiply_add(xv, w[k + l], lanes[j][l]);
          else
            lanes[j][l] += xv * w[k + l];
        }
  }
  for (int j = 0; j < Rows; ++j) {
    Scalar sum = 0;
    for (int l = 0; l < packed_lanes; ++l) sum += lanes[j][l];
    for (int k = body; k < inputs; ++k)
      sum += x[j * stride + std::size_t(k)] * widen_weight<Scalar>(q[k]);
    acc[j] = sum;
  }
}

/// packed_rows_dot_fixed for 1 to 4 rows. Both are inlined by force: the AVX2 form below
/// compiles them for its target only where they are inlined into it.
template <bool Fused, class Scalar, class Element>
KOKKOS_FORCEINLINE_FUNCTION void packed_rows_dot(const Element* q, const Scalar* x,
                                                 std::size_t stride, int rows, int inputs,
                                                 Scalar* acc) {
  switch (rows) {
    case 4:
      packed_rows_dot_fixed<4, Fused>(q, x, stride, inputs, acc);
      break;
    case 3:
      packed_rows_dot_fixed<3, Fused>(q, x, stride, inputs, acc);
      break;
    case 2:
      packed_rows_dot_fixed<2, Fused>(q, x, stride, inputs, acc);
      break;
    default:
      packed_rows_dot_fixed<1, Fused>(q, x, stride, inputs, acc);
      break;
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDA_ARCH__)
/// The fused form compiled for AVX2 + FMA (the library's flags target the x86-64 baseline,
/// where converting INT8 to float takes several SSE2 instructions and there is no fused
/// multiply-add); chosen at run time.
template <class Scalar, class Element>
__attribute__((target("avx2,fma"))) void packed_rows_dot_avx2(const Element* q, const Scalar* x,
                                                              std::size_t stride, int rows,
                                                              int inputs, Scalar* acc) {
  packed_rows_dot<true>(q, x, stride, rows, inputs, acc);
}
inline bool host_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

/// out(r, n) = alpha * scale(e, n) * sum_k in(r, k) q(e, n, k) + beta * out(r, n) for the rows r
/// of every segment e with fewer than packed_panel_rows rows.
template <class ExecSpace, class Element, class In, class Out>
void packed_stream_segments(const Segments<ExecSpace>& segments, const In& in,
                            const PackedWeight<ExecSpace, Element>& w,
                            typename Out::const_value_type alpha,
                            typename Out::const_value_type beta, const Out& out) {
  using Scalar = typename Out::non_const_value_type;
  const int experts = segments.experts(), outputs = int(w.values.extent(1));
  const int inputs = int(w.values.extent(2));
  const auto offsets = segments.offsets;
  const auto values = w.values;
  const auto scales = w.scales;
  const std::size_t stride = in.stride(0);
  constexpr bool scaled = PackedWeight<ExecSpace, Element>::scaled;
  // Device code fuses (a GPU multiply-add costs one instruction); the host's portable form
  // does not, since a baseline x86-64 build would call fma() from libm.
  constexpr bool host_space =
      Kokkos::SpaceAccessibility<Kokkos::HostSpace, typename ExecSpace::memory_space>::accessible;
  bool avx2 = false;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDA_ARCH__)
  avx2 = host_space && host_has_avx2();
#endif
  Kokkos::parallel_for(
      "kmoe::packed_stream_segments",
      Kokkos::MDRangePolicy<ExecSpace, Kokkos::Rank<2>>({0, 0}, {experts, outputs}),
      KOKKOS_LAMBDA(int e, int n) {
        const int begin = offsets(e), end = offsets(e + 1);
        if (end - begin >= packed_panel_rows) return;
        const Element* q = &values(e, n, 0);
        // A ternary, not `if constexpr`: nvcc rejects a lambda's first capture inside one.
        const Scalar scale = scaled ? Scalar(scales(e, n)) : Scalar(1);
        for (int r = begin; r < end; r += 4) {
          const int rows = end - r < 4 ? end - r : 4;
          Scalar acc[4];
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDA_ARCH__)
          if (avx2)
            packed_rows_dot_avx2(q, &in(r, 0), stride, rows, inputs, acc);
          else
#endif
            packed_rows_dot<!host_space>(q, &in(r, 0), stride, rows, inputs, acc);
          for (int j = 0; j < rows; ++j)
            out(r + j, n) =
                alpha * scale * acc[j] + (beta == Scalar(0) ? Scalar(0) : beta * out(r + j, n));
        }
      });
  (void)avx2;
}

/// panel = expert e of w as Scalar, its scale applied.
template <class ExecSpace, class Element, class Panel>
void unpack_expert(const PackedWeight<ExecSpace, Element>& w, int e, const Panel& panel) {
  using Scalar = typename Panel::non_const_value_type;
  constexpr bool scaled = PackedWeight<ExecSpace, Element>::scaled;
  const auto values = w.values;
  const auto scales = w.scales;
  Kokkos::parallel_for(
      "kmoe::unpack_expert",
      Kokkos::MDRangePolicy<ExecSpace, Kokkos::Rank<2>>({0, 0}, {int(values.extent(1)),
                                                                 int(values.extent(2))}),
      KOKKOS_LAMBDA(int o, int k) {
        const Scalar scale = scaled ? Scalar(scales(e, o)) : Scalar(1);
        panel(o, k) = scale * widen_weight<Scalar>(values(e, o, k));
      });
}

}  // namespace detail

/// \brief out[seg e] = alpha * in[seg e] * unpacked(w[e])^T + beta * out[seg e] for every
/// non-empty segment: the packed counterpart of gemm::segment_times_weight with a transposed
/// weight stored [out, in] (N = out's columns, K = in's columns).
template <class Gemm, class ExecSpace, class Element, class In, class Out>
void segment_times_packed_weight(const Segments<ExecSpace>& segments, const In& in,
                                 const PackedWeight<ExecSpace, Element>& w,
                                 typename Out::const_value_type alpha,
                                 typename Out::const_value_type beta, const Out& out) {
  using Scalar = typename Out::non_const_value_type;
  detail::packed_stream_segments(segments, in, w, alpha, beta, out);
  const int outputs = int(w.values.extent(1)), inputs = int(w.values.extent(2));
  Matrix<Scalar, ExecSpace> panel;
  for (int e = 0; e < segments.experts(); ++e) {
    const int b = segments.begin(e), n = segments.end(e) - b;
    if (n < detail::packed_panel_rows) continue;
    if (panel.extent(0) == 0)
      panel = Matrix<Scalar, ExecSpace>(
          Kokkos::view_alloc(Kokkos::WithoutInitializing, "kmoe::packed_panel"), outputs, inputs);
    detail::unpack_expert(w, e, panel);
    Gemm::gemm(ExecSpace(), false, true, alpha, gemm::detail::rows_of(in, b, b + n), panel, beta,
               gemm::detail::rows_of(out, b, b + n));
  }
}

}  // namespace kmoe
