// SPDX-License-Identifier: BSD-3-Clause
// gemm::CublasMixed (backends/cublas) on Kokkos::Cuda: the packed bf16 / fp16 products
// (cublasGemmEx, fp32 compute) against a plain host loop over the activations rounded to the
// weights' type and the stored weights, segments of 0 to 300 rows; and PackedGLUExperts on it
// against the same experts on the default policy (the streaming / panel kernels, float
// activations); and gemm::multiply on it for a layer stored in 16 bits (both inputs bf16 /
// fp16, the result float or 16-bit, every transposition) against a host loop over the stored
// values. Without a CUDA device it exits 77 (ctest: skipped) before Kokkos starts.
#include <kmoe/experts/packed_glu.hpp>
#include <kmoe/gemm/cublas_mixed.hpp>
#include <kmoe/gemm/widened.hpp>
#include <kmoe/init.hpp>

#include <catch2/catch_session.hpp>
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

namespace {

using X = Kokkos::Cuda;

static_assert(
    kmoe::detail::gemm_multiplies_packed<kmoe::gemm::CublasMixed, X, kmoe::bfloat16, float>::value);
static_assert(
    !kmoe::detail::gemm_multiplies_packed<kmoe::gemm::CublasMixed, X, std::int8_t, float>::value);
static_assert(!kmoe::detail::gemm_multiplies_packed<kmoe::gemm::CublasMixed, X, kmoe::bfloat16,
                                                    double>::value);

static_assert(kmoe::gemm::detail::gemm_multiplies_sixteen_bit<
              kmoe::gemm::CublasMixed, X, kmoe::bfloat16, kmoe::bfloat16, float>::value);
static_assert(kmoe::gemm::detail::gemm_multiplies_sixteen_bit<
              kmoe::gemm::CublasMixed, X, kmoe::float16, kmoe::float16, kmoe::float16>::value);
// Mixed inputs (a 16-bit activation times a float gradient) keep the widened panels.
static_assert(!kmoe::gemm::detail::gemm_multiplies_sixteen_bit<
              kmoe::gemm::CublasMixed, X, kmoe::bfloat16, float, float>::value);

kmoe::Segments<X> segments_of(const std::vector<int>& sizes) {
  kmoe::Segments<X> s;
  s.offsets_host = Kokkos::View<int*, Kokkos::HostSpace>("offsets", sizes.size() + 1);
  for (std::size_t e = 0; e < sizes.size(); ++e)
    s.offsets_host(e + 1) = s.offsets_host(e) + sizes[e];
  s.sync_from_host();
  return s;
}

template <class View>
auto host(const View& v) {
  auto copy = Kokkos::create_mirror(Kokkos::HostSpace(), v);
  Kokkos::deep_copy(copy, v);
  return copy;
}

template <class View>
double relative_error(const View& a, const View& b) {
  const auto ha = host(a), hb = host(b);
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < ha.size(); ++i) {
    // Through float: a 16-bit value converts to float only.
    diff += std::pow(double(float(ha.data()[i])) - double(float(hb.data()[i])), 2);
    norm += std::pow(double(float(hb.data()[i])), 2);
  }
  return std::sqrt(diff / norm);
}

}  // namespace

TEMPLATE_TEST_CASE("cuBLAS bf16 / fp16 packed products match a host loop", "[cuda][cublas]",
                   kmoe::bfloat16, kmoe::float16) {
  using Element = TestType;
  const std::vector<int> sizes = {3, 0, 1, 300, 17, 0, 64};
  const int experts = int(sizes.size()), inputs = 37, outputs = 11;
  const auto segments = segments_of(sizes);
  const int rows = segments.rows();
  kmoe::Tensor3<float, X> w_float("w", experts, outputs, inputs);
  kmoe::fill_normal(w_float, 0.5, 7);
  const auto w = kmoe::pack_weight<Element, X, float>(w_float, "w");
  kmoe::Matrix<float, X> in("in", rows, inputs), out("out", rows, outputs);
  kmoe::fill_normal(in, 1.0, 8);
  kmoe::PackedProductWorkspace<X, float> ws;
  kmoe::segment_times_packed_weight<kmoe::gemm::CublasMixed>(segments, in, w, out, ws);
  const auto in_h = host(in), got = host(out);
  const auto q = host(w.values);
  std::size_t bad = 0;
  for (int e = 0; e < experts; ++e)
    for (int r = segments.begin(e); r < segments.end(e); ++r)
      for (int n = 0; n < outputs; ++n) {
        double sum = 0, magnitude = 0;
        for (int k = 0; k < inputs; ++k) {
          const double term = double(float(Element(in_h(r, k)))) * double(float(q(e, n, k)));
          sum += term;
          magnitude += std::abs(term);
        }
        bad += std::abs(double(got(r, n)) - sum) > 1e-5 * magnitude + 1e-30;
      }
  CHECK(bad == 0);
}

TEST_CASE("PackedGLUExperts on CublasMixed: close to the default policy's kernels",
          "[cuda][cublas]") {
  using Mixed = kmoe::PackedGLUExperts<X, float, kmoe::bfloat16, kmoe::activation::Silu,
                                       kmoe::gemm::CublasMixed>;
  using Plain = kmoe::PackedGLUExperts<X, float, kmoe::bfloat16>;
  const int experts = 4, hidden = 40, ffn = 36;
  kmoe::GLUExperts<X, float, kmoe::activation::Silu, kmoe::gemm::CublasMixed> mixed_float(
      {experts, hidden, ffn});
  kmoe::GLUExperts<X, float> plain_float({experts, hidden, ffn});
  kmoe::ParameterList<X, float> from, to;
  mixed_float.collect_parameters(from);
  plain_float.collect_parameters(to);
  for (std::size_t i = 0; i < from.size(); ++i) {
    kmoe::fill_normal(from[i].value, 0.3, 20 + i);
    Kokkos::deep_copy(to[i].value, from[i].value);
  }
  Mixed mixed(mixed_float);
  Plain plain(plain_float);
  const auto segments = segments_of({5, 0, 90, 2});
  kmoe::Matrix<float, X> x("x", segments.rows(), hidden),
      y_mixed("y_mixed", segments.rows(), hidden), y_plain("y_plain", segments.rows(), hidden);
  kmoe::fill_normal(x, 1.0, 30);
  mixed.forward(x, segments, y_mixed, kmoe::ExpertMode::inference);
  plain.forward(x, segments, y_plain, kmoe::ExpertMode::inference);
  // The activations (x, then the hidden) rounded to bf16 (2^-9 relative each): about 0.3%
  // on these shapes; bf16's own weight error is common to both sides.
  CHECK(relative_error(y_mixed, y_plain) < 0.01);
  CHECK(relative_error(y_mixed, y_plain) > 0);
}

/// c = 0.5 op(a) op(b) + 0.25 c through gemm::multiply on CublasMixed, against a host loop in
/// double over the stored inputs; a 16-bit c may differ by the one rounding of the sum.
template <class Element, class Result>
void check_sixteen_bit_gemm(bool transpose_a, bool transpose_b) {
  const int m = 33, n = 19, k = 45;
  kmoe::Matrix<float, X> a_float("a", transpose_a ? k : m, transpose_a ? m : k),
      b_float("b", transpose_b ? n : k, transpose_b ? k : n), c_float("c", m, n);
  kmoe::fill_normal(a_float, 1.0, 40);
  kmoe::fill_normal(b_float, 1.0, 41);
  kmoe::fill_normal(c_float, 1.0, 42);
  kmoe::Matrix<Element, X> a("a16", a_float.extent(0), a_float.extent(1)),
      b("b16", b_float.extent(0), b_float.extent(1));
  kmoe::Matrix<Result, X> c("c", m, n);
  kmoe::gemm::detail::convert_matrix<X>(a_float, a);
  kmoe::gemm::detail::convert_matrix<X>(b_float, b);
  kmoe::gemm::detail::convert_matrix<X>(c_float, c);
  const auto ha = host(a), hb = host(b);
  const auto c_before = host(c);
  kmoe::gemm::multiply<kmoe::gemm::CublasMixed>(X(), transpose_a, transpose_b, Result(0.5f), a, b,
                                                Result(0.25f), c);
  const auto got = host(c);
  const double rounding = std::is_same_v<Result, float>            ? 0.0
                          : std::is_same_v<Result, kmoe::bfloat16> ? 1.0 / 256
                                                                   : 1.0 / 2048;
  std::size_t bad = 0;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double sum = 0, magnitude = 0;
      for (int p = 0; p < k; ++p) {
        const double term = double(float(transpose_a ? ha(p, i) : ha(i, p))) *
                            double(float(transpose_b ? hb(j, p) : hb(p, j)));
        sum += term;
        magnitude += std::abs(term);
      }
      const double want = 0.5 * sum + 0.25 * double(float(c_before(i, j)));
      bad += std::abs(double(float(got(i, j))) - want) >
             1e-5 * magnitude + rounding * std::abs(want) + 1e-30;
    }
  CHECK(bad == 0);
}

TEMPLATE_TEST_CASE("cuBLAS bf16 / fp16 GEMMs of 16-bit storage match a host loop", "[cuda][cublas]",
                   kmoe::bfloat16, kmoe::float16) {
  using Element = TestType;
  for (const bool transpose_a : {false, true})
    for (const bool transpose_b : {false, true}) {
      CAPTURE(transpose_a, transpose_b);
      check_sixteen_bit_gemm<Element, float>(transpose_a, transpose_b);
      check_sixteen_bit_gemm<Element, Element>(transpose_a, transpose_b);
    }
}

TEST_CASE("bf16 GLU experts on CublasMixed: the widened default policy's results within the "
          "order of the fp32 sums",
          "[cuda][cublas]") {
  using Mixed =
      kmoe::GLUExperts<X, kmoe::bfloat16, kmoe::activation::Silu, kmoe::gemm::CublasMixed>;
  using Plain = kmoe::GLUExperts<X, kmoe::bfloat16>;
  const int experts = 3, hidden = 24, ffn = 20;
  Mixed mixed({experts, hidden, ffn});
  Plain plain({experts, hidden, ffn});
  kmoe::ParameterList<X, kmoe::bfloat16> from, to;
  mixed.collect_parameters(from);
  plain.collect_parameters(to);
  for (std::size_t i = 0; i < from.size(); ++i) {
    kmoe::fill_normal(from[i].value, 0.3, 50 + i);
    Kokkos::deep_copy(to[i].value, from[i].value);
  }
  const auto segments = segments_of({7, 0, 40});
  const int rows = segments.rows();
  kmoe::Matrix<kmoe::bfloat16, X> x("x", rows, hidden), g("g", rows, hidden);
  kmoe::Matrix<kmoe::bfloat16, X> y_mixed("y_mixed", rows, hidden),
      y_plain("y_plain", rows, hidden);
  kmoe::Matrix<kmoe::bfloat16, X> gx_mixed("gx_mixed", rows, hidden),
      gx_plain("gx_plain", rows, hidden);
  kmoe::fill_normal(x, 1.0, 60);
  kmoe::fill_normal(g, 1.0, 61);
  mixed.forward(x, segments, y_mixed, kmoe::ExpertMode::store);
  plain.forward(x, segments, y_plain, kmoe::ExpertMode::store);
  mixed.backward(x, segments, g, gx_mixed);
  plain.backward(x, segments, g, gx_plain);
  // Both sum in fp32 and round each stored value once: only the order of the sums differs,
  // which can move a value across one bf16 rounding boundary (2^-8 relative).
  CHECK(relative_error(y_mixed, y_plain) < 0.01);
  CHECK(relative_error(gx_mixed, gx_plain) < 0.01);
  for (std::size_t i = 0; i < from.size(); ++i) {
    CAPTURE(from[i].name);
    CHECK(relative_error(from[i].grad, to[i].grad) < 1e-4);
  }
}

int main(int argc, char* argv[]) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("test_cublas_packed_gemm: no CUDA device, built and linked only (skipped)\n");
    return 77;
  }
  Kokkos::ScopeGuard kokkos(argc, argv);
  return Catch::Session().run(argc, argv);
}
