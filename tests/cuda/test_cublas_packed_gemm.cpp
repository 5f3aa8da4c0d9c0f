// SPDX-License-Identifier: BSD-3-Clause
// gemm::CublasMixed (backends/cublas) on Kokkos::Cuda: the packed bf16 / fp16 products
// (cublasGemmEx, fp32 compute) against a plain host loop over the activations rounded to the
// weights' type and the stored weights, segments of 0 to 300 rows; and PackedGLUExperts on it
// against the same experts on the default policy (the streaming / panel kernels, float
// activations). Without a CUDA device it exits 77 (ctest: skipped) before Kokkos starts.
#include <kmoe/experts/packed_glu.hpp>
#include <kmoe/gemm/cublas_mixed.hpp>
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
    diff += std::pow(double(ha.data()[i]) - double(hb.data()[i]), 2);
    norm += std::pow(double(hb.data()[i]), 2);
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

int main(int argc, char* argv[]) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("test_cublas_packed_gemm: no CUDA device, built and linked only (skipped)\n");
    return 77;
  }
  Kokkos::ScopeGuard kokkos(argc, argv);
  return Catch::Session().run(argc, argv);
}
