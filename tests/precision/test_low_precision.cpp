// SPDX-License-Identifier: BSD-3-Clause
#include <kmoe/io/float16.hpp>
#include <kmoe/precision.hpp>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "support/spaces.hpp"

namespace {

std::uint32_t bits_of(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

bool same_float(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || bits_of(a) == bits_of(b);
}

/// The floats where narrowing decides: each 16-bit value, the midpoints to its neighbour
/// (ties) and the floats one unit either side of each midpoint, plus random bit patterns.
template <class Widen>
std::vector<float> rounding_boundaries(Widen widen) {
  std::vector<float> values;
  for (std::uint32_t b = 0; b < 0xffff; ++b) {
    const float v = widen(std::uint16_t(b)), w = widen(std::uint16_t(b + 1));
    if (!std::isfinite(v)) continue;
    values.push_back(v);
    if (!std::isfinite(w) || (bits_of(v) >> 31) != (bits_of(w) >> 31)) continue;
    const float mid = float((double(v) + double(w)) / 2);  // exact: 16-bit values are short
    values.insert(values.end(),
                  {mid, std::nextafter(mid, -INFINITY), std::nextafter(mid, INFINITY)});
  }
  std::mt19937 generator(15);
  for (int i = 0; i < 200000; ++i) {
    const std::uint32_t bits = generator();
    float value;
    std::memcpy(&value, &bits, sizeof value);
    values.push_back(value);
  }
  values.insert(values.end(), {65504.f, 65519.99f, 65520.f, 3.4e38f, INFINITY, -INFINITY, NAN, -NAN,
                               1e-45f, -1e-45f, 2.9802322e-8f, 0.f, -0.f});
  return values;
}

/// Narrows every value inside a kernel on ExecSpace and returns the bit patterns.
template <class ExecSpace, class Packed>
std::vector<std::uint16_t> narrow_in_kernel(const std::vector<float>& values) {
  using Memory = typename ExecSpace::memory_space;
  Kokkos::View<float*, Memory> in("in", values.size());
  Kokkos::View<std::uint16_t*, Memory> out("out", values.size());
  const auto host_in = Kokkos::create_mirror_view(in);
  for (std::size_t i = 0; i < values.size(); ++i) host_in(i) = values[i];
  Kokkos::deep_copy(in, host_in);
  Kokkos::parallel_for(
      "narrow", Kokkos::RangePolicy<ExecSpace>(0, values.size()),
      KOKKOS_LAMBDA(std::size_t i) { out(i) = Packed(in(i)).bits(); });
  const auto host_out = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), out);
  return std::vector<std::uint16_t>(host_out.data(), host_out.data() + values.size());
}

/// Widens every 16-bit pattern inside a kernel on ExecSpace.
template <class ExecSpace, class Packed>
std::vector<float> widen_in_kernel() {
  Kokkos::View<float*, typename ExecSpace::memory_space> out("out", 65536);
  Kokkos::parallel_for(
      "widen", Kokkos::RangePolicy<ExecSpace>(0, 65536),
      KOKKOS_LAMBDA(std::size_t b) { out(b) = float(Packed::from_bits(std::uint16_t(b))); });
  const auto host_out = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), out);
  return std::vector<float>(host_out.data(), host_out.data() + 65536);
}

template <class ExecSpace, class Packed, class ReferenceNarrow, class ReferenceWiden>
void check_against_reference(ReferenceNarrow reference_narrow, ReferenceWiden reference_widen) {
  const auto widened = widen_in_kernel<ExecSpace, Packed>();
  std::size_t widen_mismatches = 0;
  for (std::uint32_t b = 0; b < 65536; ++b)
    widen_mismatches += !same_float(widened[b], reference_widen(std::uint16_t(b)));
  CHECK(widen_mismatches == 0);

  const auto values = rounding_boundaries(reference_widen);
  const auto narrowed = narrow_in_kernel<ExecSpace, Packed>(values);
  std::size_t narrow_mismatches = 0;
  for (std::size_t i = 0; i < values.size(); ++i) {
    const std::uint16_t expected = reference_narrow(values[i]);
    // NaN: any quiet NaN of the same sign is right; the reference keeps the same payload.
    if (narrowed[i] != expected && ++narrow_mismatches <= 5)
      UNSCOPED_INFO("value " << values[i] << " (bits " << bits_of(values[i]) << ") -> "
                             << narrowed[i] << ", reference " << expected);
  }
  CHECK(narrow_mismatches == 0);
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("bfloat16 rounds and widens as the exact reference, in kernels",
                        "[precision]", kmoe::test::ExecutionSpaces) {
  check_against_reference<TestType, kmoe::bfloat16>(
      [](float v) { return kmoe::io::to_bfloat16_bits(v); },
      [](std::uint16_t b) { return kmoe::io::bfloat16_bits_to_float(b); });
}

TEMPLATE_LIST_TEST_CASE("float16 rounds and widens as the exact reference, in kernels",
                        "[precision]", kmoe::test::ExecutionSpaces) {
  check_against_reference<TestType, kmoe::float16>(
      [](float v) { return kmoe::io::to_half_bits(v); },
      [](std::uint16_t b) { return kmoe::io::half_bits_to_float(b); });
}

TEST_CASE("16-bit arithmetic widens to float and rounds once per operation", "[precision]") {
  kmoe::bfloat16 x = 1.0f;
  x += 1.0f / 512;  // half a unit in the last place at 1: ties to even, stays 1
  CHECK(float(x) == 1.0f);
  x += 3.0f / 512;  // 1 + 3/512 rounds to 1 + 1/128
  CHECK(float(x) == 1.0f + 1.0f / 128);
  kmoe::float16 h = 60000.f;
  h *= 2.f;  // past 65504: infinity, as IEEE binary16
  CHECK(std::isinf(float(h)));
}

TEST_CASE("Precision: a bare Scalar keeps one type everywhere, 16-bit storage accumulates in "
          "float",
          "[precision]") {
  using Float = kmoe::precision_of_t<float>;
  STATIC_REQUIRE(std::is_same_v<Float::accumulation_type, float>);
  STATIC_REQUIRE(std::is_same_v<Float::routing_type, float>);
  STATIC_REQUIRE(!Float::compresses_communication);
  using Double = kmoe::precision_of_t<double>;
  STATIC_REQUIRE(std::is_same_v<Double::routing_type, double>);
  using BF16 = kmoe::precision_of_t<kmoe::bfloat16>;
  STATIC_REQUIRE(std::is_same_v<BF16::accumulation_type, float>);
  STATIC_REQUIRE(std::is_same_v<BF16::communication_type, kmoe::bfloat16>);
  using Compressed = kmoe::Precision<float, float, float, kmoe::bfloat16>;
  STATIC_REQUIRE(Compressed::compresses_communication);
  STATIC_REQUIRE(std::is_same_v<kmoe::precision_of_t<Compressed>, Compressed>);
}
