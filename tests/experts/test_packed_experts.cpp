// SPDX-License-Identifier: BSD-3-Clause
// Weight-only INT8 / bf16 / fp16 experts: the packing against its definition (plain loops;
// io/float16.hpp's exact roundings for the 16-bit types), the packed layer against the float
// layer run on the unpacked weights (tight: only the summation order differs) and against
// the float layer itself (the storage's error), in decode (streamed) and prefill (panel)
// shapes.
#include <kmoe/io/float16.hpp>
#include <kmoe/quantized_layer.hpp>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>

#include "support/layer_check.hpp"
#include "support/spaces.hpp"

#include <cmath>
#include <vector>

using namespace kmoe;
using namespace kmoe::test;

namespace {

/// Checks the packed `q` against `w` element by element and returns the unpacked weights.
/// INT8: |q| <= 127, each nonzero row reaches 127, scale * q within half a step (plus float
/// rounding) of w. bf16 / fp16: each value is w rounded to nearest even (io/float16.hpp).
template <class X, class S, class Element>
Tensor3<S, X> check_and_unpack(const Tensor3<S, X>& w, const PackedWeight<X, Element>& q) {
  const auto w_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), w);
  const auto values = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), q.values);
  const auto scales = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), q.scales);
  Tensor3<S, X> unpacked("unpacked", w.extent(0), w.extent(1), w.extent(2));
  auto u_host = Kokkos::create_mirror_view(unpacked);
  std::size_t bad = 0;
  for (std::size_t e = 0; e < w.extent(0); ++e)
    for (std::size_t n = 0; n < w.extent(1); ++n) {
      if constexpr (std::is_same_v<Element, std::int8_t>) {
        double largest = 0;
        int top = 0;
        for (std::size_t k = 0; k < w.extent(2); ++k) {
          largest = std::max(largest, std::abs(double(w_host(e, n, k))));
          top = std::max(top, std::abs(int(values(e, n, k))));
        }
        bad += std::abs(double(scales(e, n)) - largest / 127) > 1e-6 * largest;
        bad += largest > 0 && top != 127;
        for (std::size_t k = 0; k < w.extent(2); ++k) {
          const double deq = double(scales(e, n)) * values(e, n, k);
          bad += std::abs(deq - double(w_host(e, n, k))) > 0.5001 * double(scales(e, n)) + 1e-12;
          u_host(e, n, k) = S(deq);
        }
      } else {
        for (std::size_t k = 0; k < w.extent(2); ++k) {
          const float value = float(w_host(e, n, k));
          const std::uint16_t expected = std::is_same_v<Element, bfloat16>
                                             ? io::to_bfloat16_bits(value)
                                             : io::to_half_bits(value);
          bad += values(e, n, k).bits() != expected;
          u_host(e, n, k) = S(float(values(e, n, k)));
        }
      }
    }
  CHECK(bad == 0);
  Kokkos::deep_copy(unpacked, u_host);
  return unpacked;
}

template <class View>
double relative_error(const View& a, const View& b) {
  const auto ha = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), a);
  const auto hb = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), b);
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < ha.extent(0); ++i)
    for (std::size_t j = 0; j < ha.extent(1); ++j) {
      diff += std::pow(double(ha(i, j)) - double(hb(i, j)), 2);
      norm += std::pow(double(hb(i, j)), 2);
    }
  return std::sqrt(diff / norm);
}

/// `bound`: the storage's error on these shapes' outputs (INT8 about 0.5%, bf16 about 0.2%,
/// fp16 about 0.03%); INT8's is the 2%.
template <class X, class S, class Element>
void check_packed_layer(int tokens, bool with_shared, std::uint64_t seed, double bound) {
  using R = SoftmaxTopKRouter<X, S>;
  using E = SwiGLUExperts<X, S>;
  const int hidden = 40, ffn = 36, experts = 4, k = 2;
  std::optional<E> shared;
  if (with_shared) shared = E({1, hidden, 24, false, true}, "shared_experts");
  MoELayer<R, E> layer(R({hidden, experts, k, true}), E({experts, hidden, ffn}), {}, shared);
  fill_normal(layer.parameters(), 0.3, seed);
  auto quantized = weight_only_layer<Element>(layer);

  // The float layer on the dequantised weights: the INT8 layer's exact arithmetic up to the
  // order of the sums (scale * sum(x q) against sum(x (scale q))).
  MoELayer<R, E> dequantized_layer(
      layer.router(), E({experts, hidden, ffn}), {},
      with_shared ? std::optional<E>(E({1, hidden, 24, false, true}, "shared_experts"))
                  : std::nullopt);
  const auto copy_dequantized = [](const E& from, const PackedGLUExperts<X, S, Element>& q, E& to) {
    Kokkos::deep_copy(to.w_gate().value,
                      check_and_unpack<X, S, Element>(from.w_gate().value, q.w_gate()));
    Kokkos::deep_copy(to.w_up().value,
                      check_and_unpack<X, S, Element>(from.w_up().value, q.w_up()));
    Kokkos::deep_copy(to.w_down().value,
                      check_and_unpack<X, S, Element>(from.w_down().value, q.w_down()));
  };
  copy_dequantized(layer.experts(), quantized.experts(), dequantized_layer.experts());
  if (with_shared) {
    copy_dequantized(*layer.shared_experts(), *quantized.shared_experts(),
                     *dequantized_layer.shared_experts());
    ParameterList<X, S> from, to;
    layer.shared_experts()->collect_parameters(from);
    dequantized_layer.shared_experts()->collect_parameters(to);
    Kokkos::deep_copy(to.back().value, from.back().value);  // the output gate stays float
  }

  Matrix<S, X> x("x", tokens, hidden), y_float("y_float", tokens, hidden),
      y_int8("y_int8", tokens, hidden), y_dequantized("y_dequantized", tokens, hidden);
  fill_normal(x, 1.0, seed + 1);
  layer.forward(x, y_float);
  quantized.forward(x, y_int8);
  dequantized_layer.forward(x, y_dequantized);
  CAPTURE(tokens, with_shared);
  CHECK(relative_error(y_int8, y_dequantized) < 1e-5);
  // 8-bit weights with per-channel scales: about 0.5% relative error on these shapes; the
  // bound is the 2%.
  const double quantization_error = relative_error(y_int8, y_float);
  CHECK(quantization_error < bound);
  CHECK(quantization_error > 0);
  // The router is the float layer's: the same experts chosen.
  const auto chosen_float =
      Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.routing().expert);
  const auto chosen_int8 =
      Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), quantized.routing().expert);
  std::size_t differ = 0;
  for (std::size_t i = 0; i < chosen_float.size(); ++i)
    differ += chosen_float.data()[i] != chosen_int8.data()[i];
  CHECK(differ == 0);
  const std::size_t scale_bytes =
      std::is_same_v<Element, std::int8_t> ? sizeof(float) * experts * (2 * ffn + hidden) : 0;
  CHECK(quantized.experts().resident_bytes() ==
        std::size_t(3) * experts * hidden * ffn * sizeof(Element) + scale_bytes);
  // The layer's memory accounting reports the routed experts' packed bytes.
  CHECK(quantized.memory_stats().expert_weights ==
        std::int64_t(std::size_t(3) * experts * hidden * ffn * sizeof(Element) + scale_bytes));
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("Weight-only experts: decode streams the packed weights, close to "
                        "the float layer",
                        "[packed]", ExecutionSpaces) {
  check_packed_layer<TestType, float, std::int8_t>(8, false, 41, 0.02);
  check_packed_layer<TestType, float, std::int8_t>(8, true, 42, 0.02);
  check_packed_layer<TestType, double, std::int8_t>(5, false, 43, 0.02);
  check_packed_layer<TestType, float, bfloat16>(8, true, 46, 0.01);
  check_packed_layer<TestType, float, float16>(7, false, 47, 0.002);
}

TEMPLATE_LIST_TEST_CASE("Weight-only experts: prefill unpacks panels, close to the float layer",
                        "[packed]", ExecutionSpaces) {
  // 512 tokens x 2 / 4 experts: every segment far above packed_panel_rows.
  check_packed_layer<TestType, float, std::int8_t>(512, false, 44, 0.02);
  check_packed_layer<TestType, float, std::int8_t>(300, true, 45, 0.02);
  check_packed_layer<TestType, float, bfloat16>(400, false, 48, 0.01);
}

namespace {

/// Segments with the given rows per expert.
template <class X>
Segments<X> segments_of(const std::vector<int>& rows) {
  Segments<X> s;
  s.offsets_host = Kokkos::View<int*, Kokkos::HostSpace>("offsets", rows.size() + 1);
  for (std::size_t e = 0; e < rows.size(); ++e) s.offsets_host(e + 1) = s.offsets_host(e) + rows[e];
  s.sync_from_host();
  return s;
}

/// The packed products (segment_times_packed_weight, segment_glu_packed) against plain loops
/// in double over the stored values and scales: segments of 0 to 9 rows (streamed, every
/// register block size) and 70 (panel), K = 37 (a tail after the 8-lane body), N = 11 (an
/// odd output left over by the pairs); bound: float rounding of the sums, 1e-5 of
/// sum_k |x q| (double: 1e-12), so a wrong lane, row, pair, scale or tail shows.
template <class X, class S, class Element>
void check_packed_products() {
  const std::vector<int> rows = {3, 0, 1, 70, 2, 9, 4, 5};
  const int experts = int(rows.size()), inputs = 37, outputs = 11;
  const Segments<X> segments = segments_of<X>(rows);
  const int total = segments.rows();
  Tensor3<S, X> w_float("w", experts, outputs, inputs), u_float("u", experts, outputs, inputs);
  fill_normal(w_float, 0.5, 101);
  fill_normal(u_float, 0.5, 102);
  const auto w = pack_weight<Element, X, S>(w_float, "w");
  const auto u = pack_weight<Element, X, S>(u_float, "u");
  Matrix<S, X> x("x", total, inputs), out("out", total, outputs), hidden("hidden", total, outputs),
      up("up", total, outputs);
  fill_normal(x, 1.0, 103);
  PackedProductWorkspace<X, S> ws;
  segment_times_packed_weight<DefaultGemm>(segments, x, w, out, ws);
  segment_glu_packed<activation::Silu, DefaultGemm>(segments, x, w, u, hidden, up, ws);
  // A second call reuses the workspace: nothing is allocated per call.
  const S* panel = ws.panel.data();
  const int* streamed = ws.streamed.data();
  CHECK(panel != nullptr);
  segment_times_packed_weight<DefaultGemm>(segments, x, w, out, ws);
  CHECK(ws.panel.data() == panel);
  CHECK(ws.streamed.data() == streamed);
  // A projection of the transposed shape (a GLU's down after its gate) shares the panel.
  Tensor3<S, X> down_float("down", experts, inputs, outputs);
  fill_normal(down_float, 0.5, 104);
  Matrix<S, X> back("back", total, inputs);
  segment_times_packed_weight<DefaultGemm>(
      segments, out, pack_weight<Element, X, S>(down_float, "down"), back, ws);
  CHECK(ws.panel.data() == panel);

  const auto xh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), x);
  const auto oh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), out);
  const auto hh = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), hidden);
  const auto wq = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), w.values);
  const auto uq = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), u.values);
  const auto ws_h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), w.scales);
  const auto us_h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), u.scales);
  const double eps = std::is_same_v<S, float> ? 1e-5 : 1e-12;
  std::size_t bad_out = 0, bad_hidden = 0;
  for (int e = 0; e < experts; ++e)
    for (int r = segments.begin(e); r < segments.end(e); ++r)
      for (int n = 0; n < outputs; ++n) {
        double g = 0, v = 0, g_abs = 0, v_abs = 0;
        for (int k = 0; k < inputs; ++k) {
          const double gw = double(float(wq(e, n, k))), vw = double(float(uq(e, n, k)));
          g += double(xh(r, k)) * gw;
          v += double(xh(r, k)) * vw;
          g_abs += std::abs(double(xh(r, k)) * gw);
          v_abs += std::abs(double(xh(r, k)) * vw);
        }
        const double gs = ws_h.size() ? double(ws_h(e, n)) : 1.0;
        const double vs = us_h.size() ? double(us_h(e, n)) : 1.0;
        g *= gs, v *= vs, g_abs *= gs, v_abs *= vs;
        const double g_bound = eps * g_abs + 1e-30, v_bound = eps * v_abs + 1e-30;
        bad_out += std::abs(double(oh(r, n)) - g) > g_bound;
        const double silu = g / (1 + std::exp(-g));
        // silu' lies in [-0.1, 1.1]: the hidden's error from each sum's.
        const double h_bound = 1.1 * g_bound * (std::abs(v) + v_bound) +
                               (std::abs(silu) + 1.1 * g_bound) * v_bound +
                               eps * std::abs(silu * v);
        bad_hidden += std::abs(double(hh(r, n)) - silu * v) > h_bound;
      }
  CHECK(bad_out == 0);
  CHECK(bad_hidden == 0);
}

template <class X>
void check_packed_products_all_types() {
  check_packed_products<X, float, std::int8_t>();
  check_packed_products<X, float, bfloat16>();
  check_packed_products<X, float, float16>();
  check_packed_products<X, double, std::int8_t>();
  check_packed_products<X, double, bfloat16>();
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("Weight-only products: streamed and panel segments against plain loops",
                        "[packed]", ExecutionSpaces) {
  SECTION("the run-time choice (AVX2 + FMA where the host has it)") {
    check_packed_products_all_types<TestType>();
  }
  SECTION("the portable form") {
    detail::packed_stream_portable_only() = true;
    check_packed_products_all_types<TestType>();
    detail::packed_stream_portable_only() = false;
  }
}
