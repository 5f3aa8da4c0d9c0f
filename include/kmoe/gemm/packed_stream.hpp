// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file packed_stream.hpp
/// \brief The decode kernel of weight-only experts: products of a few activation rows with
/// packed (INT8, bf16, fp16) weight rows, each weight row read once from memory for all the
/// rows its expert was routed, converted in registers, the INT8 scale applied once per output.
///
/// Work: one item is one expert and a tile of output pairs; a pair is two weight rows that
/// share each activation load (two outputs of one projection, or a GLU's gate and up rows of
/// the same output, whose activated product is then the only thing written). Within a pair
/// the expert's rows go through in blocks of up to 4, so a block keeps 4 x 2 accumulators in
/// registers and the pair's two weight rows (at most 2 x 7 KB at Mixtral's shapes) stay in
/// L1 between blocks: the weights come from memory once per expert per forward.
///
/// Summation: out(r, n) = scale(e, n) * sum_k in(r, k) q(e, n, k), the sum in 8 lanes (lane l
/// takes k = l, l + 8, ... up to the last multiple of 8), the lanes added in order, then the
/// tail of k. Fused: each lane step is one fused multiply-add; the host picks at run time an
/// AVX2 + FMA form with the same order (vector intrinsics: a bf16 widens by a 16-bit shift,
/// an fp16 by vcvtph2ps, an INT8 by sign extension and vcvtdq2ps), and elsewhere runs the
/// portable form unfused (a baseline x86-64 build would call fma() from libm); device code
/// fuses. Results therefore depend on the host's FMA, within float rounding of the sums.

#include <kmoe/detail/math.hpp>
#include <kmoe/gemm/packed_weight.hpp>
#include <kmoe/segments.hpp>
#include <kmoe/types.hpp>

#include <Kokkos_Core.hpp>

#include <cstddef>
#include <cstdint>
#include <type_traits>

// The intrinsics form: GCC / Clang on x86-64 host code, not under nvcc (whose front end
// parses the host code too and does not take every target-specific intrinsic).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#define KMOE_PACKED_STREAM_AVX2 1
#include <immintrin.h>
#endif

namespace kmoe::detail {

/// Lanes of the streaming sums (one AVX2 float register).
inline constexpr int packed_lanes = 8;
/// Activation rows per register block.
inline constexpr int packed_block_rows = 4;
/// Output pairs per work item: enough work per item to hide the scheduling, enough items
/// (a few hundred per projection at decode) to balance two to dozens of threads.
inline constexpr int packed_pairs_per_item = 8;

/// acc[j][o] = sum_k x[j * stride + k] * widen(q_o[k]) for Rows rows and the pair q_0, q_1,
/// in the order of the file comment.
template <int Rows, bool Fused, class Scalar, class Element>
KOKKOS_FORCEINLINE_FUNCTION void packed_pair_dot(const Element* q0, const Element* q1,
                                                 const Scalar* x, std::size_t stride, int inputs,
                                                 Scalar (*acc)[2]) {
  Scalar lanes[Rows][2][packed_lanes] = {};
  const int body = inputs - inputs % packed_lanes;
  for (int k = 0; k < body; k += packed_lanes) {
    Scalar w[2][packed_lanes];
    for (int l = 0; l < packed_lanes; ++l) {
      w[0][l] = widen_weight<Scalar>(q0[k + l]);
      w[1][l] = widen_weight<Scalar>(q1[k + l]);
    }
    for (int j = 0; j < Rows; ++j)
      for (int l = 0; l < packed_lanes; ++l) {
        const Scalar xv = x[j * stride + std::size_t(k + l)];
        for (int o = 0; o < 2; ++o) {
          if constexpr (Fused)
            lanes[j][o][l] = fused_multiply_add(xv, w[o][l], lanes[j][o][l]);
          else
            lanes[j][o][l] += xv * w[o][l];
        }
      }
  }
  for (int j = 0; j < Rows; ++j)
    for (int o = 0; o < 2; ++o) {
      const Element* q = o == 0 ? q0 : q1;
      Scalar sum = 0;
      for (int l = 0; l < packed_lanes; ++l) sum += lanes[j][o][l];
      for (int k = body; k < inputs; ++k) {
        const Scalar xv = x[j * stride + std::size_t(k)];
        if constexpr (Fused)
          sum = fused_multiply_add(xv, widen_weight<Scalar>(q[k]), sum);
        else
          sum += xv * widen_weight<Scalar>(q[k]);
      }
      acc[j][o] = sum;
    }
}

/// packed_pair_dot for 1 to packed_block_rows rows.
template <bool Fused, class Scalar, class Element>
KOKKOS_FORCEINLINE_FUNCTION void packed_pair_dot(const Element* q0, const Element* q1,
                                                 const Scalar* x, std::size_t stride, int rows,
                                                 int inputs, Scalar (*acc)[2]) {
  switch (rows) {
    case 4:
      packed_pair_dot<4, Fused>(q0, q1, x, stride, inputs, acc);
      break;
    case 3:
      packed_pair_dot<3, Fused>(q0, q1, x, stride, inputs, acc);
      break;
    case 2:
      packed_pair_dot<2, Fused>(q0, q1, x, stride, inputs, acc);
      break;
    default:
      packed_pair_dot<1, Fused>(q0, q1, x, stride, inputs, acc);
      break;
  }
}

#ifdef KMOE_PACKED_STREAM_AVX2
/// Eight stored values as floats.
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256 widen8_avx2(
    const std::int8_t* q) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256 widen8_avx2(
    const bfloat16* q) {
  // bf16 is float's upper half.
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256 widen8_avx2(
    const float16* q) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
}

/// packed_pair_dot<Rows, true> for float in AVX2 intrinsics: the same lanes, order and
/// fused steps (so the same bits), the 2 x Rows accumulators in registers.
template <int Rows, class Element>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void packed_pair_dot_avx2(
    const Element* q0, const Element* q1, const float* x, std::size_t stride, int inputs,
    float (*acc)[2]) {
  static_assert(sizeof(bfloat16) == 2 && sizeof(float16) == 2,
                "kmoe: the 16-bit types must be their bit pattern");
  __m256 lanes[Rows][2];
  for (int j = 0; j < Rows; ++j) lanes[j][0] = lanes[j][1] = _mm256_setzero_ps();
  const int body = inputs - inputs % packed_lanes;
  for (int k = 0; k < body; k += packed_lanes) {
    const __m256 w0 = widen8_avx2(q0 + k), w1 = widen8_avx2(q1 + k);
    for (int j = 0; j < Rows; ++j) {
      const __m256 xv = _mm256_loadu_ps(x + j * stride + std::size_t(k));
      lanes[j][0] = _mm256_fmadd_ps(xv, w0, lanes[j][0]);
      lanes[j][1] = _mm256_fmadd_ps(xv, w1, lanes[j][1]);
    }
  }
  for (int j = 0; j < Rows; ++j)
    for (int o = 0; o < 2; ++o) {
      const Element* q = o == 0 ? q0 : q1;
      alignas(32) float stored[packed_lanes];
      _mm256_store_ps(stored, lanes[j][o]);
      float sum = 0;
      for (int l = 0; l < packed_lanes; ++l) sum += stored[l];
      for (int k = body; k < inputs; ++k)
        sum = fused_multiply_add(x[j * stride + std::size_t(k)], widen_weight<float>(q[k]), sum);
      acc[j][o] = sum;
    }
}

/// The AVX2 + FMA form, 1 to packed_block_rows rows (double: the portable form compiled
/// for the target, fused).
template <class Scalar, class Element>
__attribute__((target("avx2,fma,f16c"))) void packed_pair_dot_avx2(const Element* q0,
                                                                   const Element* q1,
                                                                   const Scalar* x,
                                                                   std::size_t stride, int rows,
                                                                   int inputs, Scalar (*acc)[2]) {
  if constexpr (std::is_same_v<Scalar, float>) {
    switch (rows) {
      case 4:
        packed_pair_dot_avx2<4>(q0, q1, x, stride, inputs, acc);
        break;
      case 3:
        packed_pair_dot_avx2<3>(q0, q1, x, stride, inputs, acc);
        break;
      case 2:
        packed_pair_dot_avx2<2>(q0, q1, x, stride, inputs, acc);
        break;
      default:
        packed_pair_dot_avx2<1>(q0, q1, x, stride, inputs, acc);
        break;
    }
  } else {
    packed_pair_dot<true>(q0, q1, x, stride, rows, inputs, acc);
  }
}

inline bool host_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}
#endif

/// Tests set it to run the portable form on a host that has AVX2.
inline bool& packed_stream_portable_only() {
  static bool only = false;
  return only;
}

/// Whether a kernel on ExecSpace runs the AVX2 form.
template <class ExecSpace>
bool packed_stream_uses_avx2() {
#ifdef KMOE_PACKED_STREAM_AVX2
  return Kokkos::SpaceAccessibility<Kokkos::HostSpace,
                                    typename ExecSpace::memory_space>::accessible &&
         !packed_stream_portable_only() && host_has_avx2();
#else
  return false;
#endif
}

/// What a work item writes for a pair: Plain, two outputs n0 = 2 p and n0 + 1 (if any) of
/// one projection; Glu, the activated product Activation(gate) * up of output p.
struct PlainPairs {
  template <class Scalar>
  KOKKOS_FORCEINLINE_FUNCTION static Scalar combine(Scalar first, Scalar) {
    return first;
  }
};
template <class Activation>
struct GluPairs {
  template <class Scalar>
  KOKKOS_FORCEINLINE_FUNCTION static Scalar combine(Scalar gate, Scalar up) {
    return Activation::value(gate) * up;
  }
};

/// For every expert s of `streamed` [count] and its rows [begin, end): the pairs of `first`
/// and `second` (the same weight for PlainPairs) times in's rows, into out (see PlainPairs,
/// GluPairs).
template <class Pairs, class ExecSpace, class Element, class In, class Out>
void packed_stream(const Segments<ExecSpace>& segments, const Vector<int, ExecSpace>& streamed,
                   int count, const In& in, const PackedWeight<ExecSpace, Element>& first,
                   const PackedWeight<ExecSpace, Element>& second, const Out& out) {
  using Scalar = typename Out::non_const_value_type;
  constexpr bool glu = !std::is_same_v<Pairs, PlainPairs>;
  constexpr bool scaled = PackedWeight<ExecSpace, Element>::scaled;
  constexpr bool host_space =
      Kokkos::SpaceAccessibility<Kokkos::HostSpace, typename ExecSpace::memory_space>::accessible;
  const int outputs = int(first.values.extent(1)), inputs = int(first.values.extent(2));
  const int pairs = glu ? outputs : (outputs + 1) / 2;
  const int tiles = (pairs + packed_pairs_per_item - 1) / packed_pairs_per_item;
  if (count == 0 || tiles == 0) return;
  const auto offsets = segments.offsets;
  const auto q_first = first.values, q_second = second.values;
  const auto s_first = first.scales, s_second = second.scales;
  const std::size_t stride = in.stride(0);
  const bool avx2 = packed_stream_uses_avx2<ExecSpace>();
  // Dynamic: experts hold different numbers of rows, which at 16 or more rows per expert
  // (compute-bound) would leave a static split unbalanced.
  Kokkos::parallel_for(
      "kmoe::packed_stream",
      Kokkos::RangePolicy<ExecSpace, Kokkos::Schedule<Kokkos::Dynamic>>(0, count * tiles),
      KOKKOS_LAMBDA(int item) {
        const int e = streamed(item / tiles), tile = item % tiles;
        const int begin = offsets(e), end = offsets(e + 1);
        const int pair_end =
            (tile + 1) * packed_pairs_per_item < pairs ? (tile + 1) * packed_pairs_per_item : pairs;
        for (int p = tile * packed_pairs_per_item; p < pair_end; ++p) {
          const int n0 = glu ? p : 2 * p;
          const int n1 = glu ? p : (2 * p + 1 < outputs ? 2 * p + 1 : 2 * p);
          const Element* q0 = &q_first(e, n0, 0);
          const Element* q1 = glu ? &q_second(e, n1, 0) : &q_first(e, n1, 0);
          // Ternaries, not `if constexpr`: nvcc rejects a lambda's first capture inside one.
          const Scalar scale0 = scaled ? Scalar(s_first(e, n0)) : Scalar(1);
          const Scalar scale1 = scaled ? Scalar(glu ? s_second(e, n1) : s_first(e, n1)) : Scalar(1);
          for (int r = begin; r < end; r += packed_block_rows) {
            const int rows = end - r < packed_block_rows ? end - r : packed_block_rows;
            Scalar acc[packed_block_rows][2];
#ifdef KMOE_PACKED_STREAM_AVX2
            if (avx2)
              packed_pair_dot_avx2(q0, q1, &in(r, 0), stride, rows, inputs, acc);
            else
#endif
              packed_pair_dot<!host_space>(q0, q1, &in(r, 0), stride, rows, inputs, acc);
            for (int j = 0; j < rows; ++j) {
              const Scalar a0 = scale0 * acc[j][0], a1 = scale1 * acc[j][1];
              out(r + j, n0) = Pairs::combine(a0, a1);  // glu: n0 = p
              if (!glu && n1 != n0) out(r + j, n1) = a1;
            }
          }
        }
      });
  (void)avx2;
}

}  // namespace kmoe::detail
