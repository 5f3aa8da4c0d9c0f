// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file packed_weight.hpp
/// \brief Weight-only storage in fewer bits: stacked per-expert weights [E, N, K] held as
/// INT8 (quantised symmetrically per output channel, one fp32 scale per row n of each
/// expert) or as bf16 / fp16 (rounded to nearest even, no scale), their packing and
/// unpacking; the products with them are in gemm/packed_product.hpp.
///
/// INT8 quantisation: scale = max_k |w(e, n, k)| / 127 and q = round(w / scale) (half away from
/// zero, as llama.cpp's Q8_0), so q lies in [-127, 127]; an all-zero row has scale 0.
/// Products factor the scale out of the sum: out(r, n) = scale(e, n) * sum_k in(r, k) q(e, n, k)
/// (scale 1 for the 16-bit types).

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

/// panel = expert e of w as Scalar, its scale applied, on a host space: a thread per output
/// row, the row's conversion a loop the compiler vectorises.
template <class ExecSpace, class Element, class Panel>
void unpack_expert_by_rows(const PackedWeight<ExecSpace, Element>& w, int e, const Panel& panel) {
  using Scalar = typename Panel::non_const_value_type;
  constexpr bool scaled = PackedWeight<ExecSpace, Element>::scaled;
  const auto values = w.values;
  const auto scales = w.scales;
  const int inputs = int(values.extent(2));
  Kokkos::parallel_for(
      "kmoe::unpack_expert", Kokkos::RangePolicy<ExecSpace>(0, int(values.extent(1))),
      KOKKOS_LAMBDA(int o) {
        const Scalar scale = scaled ? Scalar(scales(e, o)) : Scalar(1);
        for (int k = 0; k < inputs; ++k)
          panel(o, k) = scale * widen_weight<Scalar>(values(e, o, k));
      });
}

/// The same on a device: a thread per element, neighbouring threads on neighbouring k.
template <class ExecSpace, class Element, class Panel>
void unpack_expert_by_elements(const PackedWeight<ExecSpace, Element>& w, int e,
                               const Panel& panel) {
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

/// panel = expert e of w as Scalar, its scale applied.
template <class ExecSpace, class Element, class Panel>
void unpack_expert(const PackedWeight<ExecSpace, Element>& w, int e, const Panel& panel) {
  if constexpr (Kokkos::SpaceAccessibility<Kokkos::HostSpace,
                                           typename ExecSpace::memory_space>::accessible)
    unpack_expert_by_rows(w, e, panel);
  else
    unpack_expert_by_elements(w, e, panel);
}

}  // namespace detail

}  // namespace kmoe
