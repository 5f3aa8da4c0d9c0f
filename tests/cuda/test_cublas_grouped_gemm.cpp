// SPDX-License-Identifier: BSD-3-Clause
// gemm::CublasGrouped (backends/cublas) on Kokkos::Cuda against a plain host loop: random
// segment sizes with empty segments, both weight layouts, alpha/beta, float and double, and
// the weight gradient, through the public segmented interface (gemm/segmented.hpp), which
// must pick the grouped form, and a SwiGLU expert on it against the default policy. Without a CUDA device it exits 77 (ctest: skipped) before
// Kokkos starts, so the CUDA build can be linked and registered on any machine.
#include <kmoe/experts/glu.hpp>
#include <kmoe/gemm.hpp>
#include <kmoe/gemm/cublas.hpp>

#include <catch2/catch_session.hpp>
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

namespace {

using X = Kokkos::Cuda;
template <class S>
using Matrix = kmoe::Matrix<S, X>;
template <class S>
using Stack = Kokkos::View<S***, Kokkos::LayoutRight, X::memory_space>;

// The grouped form is detected on Kokkos::Cuda only; elsewhere the segments loop.
static_assert(kmoe::check_valid_gemm<kmoe::gemm::CublasGrouped, X, float>());
static_assert(
    kmoe::detail::is_detected_v<kmoe::gemm::detail::grouped_times_weight, kmoe::gemm::CublasGrouped,
                                X, Matrix<float>, Stack<float>, Matrix<float>>);
static_assert(kmoe::detail::is_detected_v<kmoe::gemm::detail::grouped_weight_gradient,
                                          kmoe::gemm::CublasGrouped, X, Matrix<double>,
                                          Matrix<double>, Stack<double>>);
#ifdef KOKKOS_ENABLE_SERIAL
static_assert(!kmoe::detail::is_detected_v<
              kmoe::gemm::detail::grouped_times_weight, kmoe::gemm::CublasGrouped, Kokkos::Serial,
              kmoe::Matrix<float, Kokkos::Serial>,
              Kokkos::View<float***, Kokkos::LayoutRight, Kokkos::HostSpace>,
              kmoe::Matrix<float, Kokkos::Serial>>);
#endif

kmoe::Segments<X> segments_of(const std::vector<int>& sizes) {
  kmoe::Segments<X> s;
  s.offsets_host = Kokkos::View<int*, Kokkos::HostSpace>("offsets", sizes.size() + 1);
  for (std::size_t e = 0; e < sizes.size(); ++e)
    s.offsets_host(e + 1) = s.offsets_host(e) + sizes[e];
  s.sync_from_host();
  return s;
}

/// Random sizes in [0, 40], about a third of them empty.
std::vector<int> random_sizes(std::mt19937& rng, int experts) {
  std::uniform_int_distribution<int> size(1, 40), coin(0, 2);
  std::vector<int> sizes(experts);
  for (int& s : sizes) s = coin(rng) == 0 ? 0 : size(rng);
  return sizes;
}

/// Fills a device view with uniform values in [-1, 1] from a host generator.
template <class View>
void fill(const View& v, std::mt19937& rng) {
  auto h = Kokkos::create_mirror_view(Kokkos::HostSpace(), v);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (std::size_t i = 0; i < h.size(); ++i)
    h.data()[i] = typename View::non_const_value_type(u(rng));
  Kokkos::deep_copy(v, h);
}

/// A host copy, never an alias.
template <class View>
auto host(const View& v) {
  auto copy = Kokkos::create_mirror(Kokkos::HostSpace(), v);
  Kokkos::deep_copy(copy, v);
  return copy;
}

template <class S>
constexpr double tolerance() {
  return std::is_same_v<S, float> ? 2e-6 : 1e-14;
}

}  // namespace

TEMPLATE_TEST_CASE("cuBLAS grouped segment_times_weight matches a host loop", "[cuda][cublas]",
                   float, double) {
  using S = TestType;
  const int experts = GENERATE(1, 5, 16);
  const int trial = GENERATE(0, 1, 2);
  const bool transpose = GENERATE(false, true);
  const auto scalars =
      GENERATE(std::pair<double, double>{1.0, 0.0}, std::pair<double, double>{0.5, 2.0},
               std::pair<double, double>{-1.5, 1.0});
  const double alpha = scalars.first, beta = scalars.second;
  std::mt19937 rng(1000 * experts + 10 * trial + transpose);
  auto sizes = random_sizes(rng, experts);
  if (trial == 2) sizes[0] = 300;  // one large segment among small and empty ones
  const int in_width = 19, out_width = 11;
  const auto segments = segments_of(sizes);
  const int rows = segments.rows();
  CAPTURE(experts, trial, transpose, alpha, beta, rows);

  Matrix<S> in("in", rows, in_width), out("out", rows, out_width);
  Stack<S> weight("weight", experts, transpose ? out_width : in_width,
                  transpose ? in_width : out_width);
  fill(in, rng);
  fill(out, rng);
  fill(weight, rng);
  const auto in_h = host(in), before = host(out);
  const auto w = host(weight);
  kmoe::gemm::segment_times_weight<kmoe::gemm::CublasGrouped>(segments, in, weight, transpose,
                                                              S(alpha), S(beta), out);
  const auto got = host(out);
  double worst = 0;
  for (int e = 0; e < experts; ++e)
    for (int r = segments.begin(e); r < segments.end(e); ++r)
      for (int j = 0; j < out_width; ++j) {
        double sum = 0, magnitude = 0;
        for (int p = 0; p < in_width; ++p) {
          const double term = double(in_h(r, p)) * (transpose ? w(e, j, p) : w(e, p, j));
          sum += term;
          magnitude += std::abs(term);
        }
        const double expected = alpha * sum + beta * before(r, j);
        const double scale = std::abs(alpha) * magnitude + std::abs(beta * before(r, j)) + 1;
        worst = std::max(worst, std::abs(got(r, j) - expected) / scale);
      }
  CHECK(worst < tolerance<S>() * in_width);
}

TEMPLATE_TEST_CASE("cuBLAS grouped segment_weight_gradient matches a host loop", "[cuda][cublas]",
                   float, double) {
  using S = TestType;
  const int experts = GENERATE(1, 6, 16);
  const int trial = GENERATE(0, 1, 2);
  std::mt19937 rng(7000 + 100 * experts + trial);
  auto sizes = random_sizes(rng, experts);
  if (trial == 2) sizes[experts - 1] = 300;
  const int in_width = 13, out_width = 9;
  const auto segments = segments_of(sizes);
  const int rows = segments.rows();
  CAPTURE(experts, trial, rows);

  Matrix<S> left("left", rows, out_width), right("right", rows, in_width);
  Stack<S> grad("grad", experts, out_width, in_width);
  fill(left, rng);
  fill(right, rng);
  fill(grad, rng);
  const auto left_h = host(left), right_h = host(right);
  const auto before = host(grad);
  kmoe::gemm::segment_weight_gradient<kmoe::gemm::CublasGrouped>(segments, left, right, grad);
  const auto got = host(grad);
  double worst = 0;
  for (int e = 0; e < experts; ++e)
    for (int i = 0; i < out_width; ++i)
      for (int j = 0; j < in_width; ++j) {
        double sum = 0, magnitude = 0;
        for (int r = segments.begin(e); r < segments.end(e); ++r) {
          const double term = double(left_h(r, i)) * right_h(r, j);
          sum += term;
          magnitude += std::abs(term);
        }
        // Empty segments leave their gradient untouched, bit for bit.
        if (segments.begin(e) == segments.end(e)) {
          CHECK(got(e, i, j) == before(e, i, j));
          continue;
        }
        const double scale = magnitude + std::abs(double(before(e, i, j))) + 1;
        worst = std::max(worst, std::abs(got(e, i, j) - (sum + before(e, i, j))) / scale);
      }
  CHECK(worst < tolerance<S>() * (rows + 1));
}

TEST_CASE("cuBLAS grouped GEMMs agree with the default policy's loop", "[cuda][cublas]") {
  // The same projections through gemm::KokkosKernels (one cuBLAS call per expert).
  using S = float;
  std::mt19937 rng(42);
  const int experts = 8, in_width = 32, out_width = 24;
  const auto sizes = random_sizes(rng, experts);
  const auto segments = segments_of(sizes);
  const int rows = segments.rows();
  Matrix<S> in("in", rows, in_width), grouped("grouped", rows, out_width),
      looped("looped", rows, out_width);
  Stack<S> weight("weight", experts, out_width, in_width);
  fill(in, rng);
  fill(weight, rng);
  kmoe::gemm::segment_times_weight<kmoe::gemm::CublasGrouped>(segments, in, weight, true, 1.0f,
                                                              0.0f, grouped);
  kmoe::gemm::segment_times_weight<kmoe::gemm::KokkosKernels>(segments, in, weight, true, 1.0f,
                                                              0.0f, looped);
  const auto a = host(grouped), b = host(looped);
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    worst = std::max(worst, double(std::abs(a.data()[i] - b.data()[i])));
  CHECK(worst < 1e-4);
}

TEST_CASE("a SwiGLU expert on CublasGrouped matches the default policy", "[cuda][cublas]") {
  // Forward and backward: every projection and weight gradient through the grouped form.
  using S = double;
  using Grouped = kmoe::SwiGLUExperts<X, S, kmoe::gemm::CublasGrouped>;
  using Default = kmoe::SwiGLUExperts<X, S>;
  const kmoe::ExpertShape shape{6, 16, 24};
  Grouped grouped(shape);
  Default reference(shape);
  std::mt19937 rng(11);
  fill(grouped.w_gate().value, rng);
  fill(grouped.w_up().value, rng);
  fill(grouped.w_down().value, rng);
  Kokkos::deep_copy(reference.w_gate().value, grouped.w_gate().value);
  Kokkos::deep_copy(reference.w_up().value, grouped.w_up().value);
  Kokkos::deep_copy(reference.w_down().value, grouped.w_down().value);
  const auto segments = segments_of({5, 0, 17, 1, 0, 9});
  const int rows = segments.rows();
  Matrix<S> x("x", rows, shape.hidden), grad_y("grad_y", rows, shape.hidden);
  fill(x, rng);
  fill(grad_y, rng);
  Matrix<S> y_a("y_a", rows, shape.hidden), y_b("y_b", rows, shape.hidden);
  Matrix<S> gx_a("gx_a", rows, shape.hidden), gx_b("gx_b", rows, shape.hidden);
  grouped.forward(x, segments, y_a, kmoe::ExpertMode::store);
  reference.forward(x, segments, y_b, kmoe::ExpertMode::store);
  grouped.backward(x, segments, grad_y, gx_a);
  reference.backward(x, segments, grad_y, gx_b);
  const auto close = [](const auto& a, const auto& b) {
    const auto ha = host(a), hb = host(b);
    double worst = 0;
    for (std::size_t i = 0; i < ha.size(); ++i)
      worst = std::max(worst, std::abs(double(ha.data()[i]) - double(hb.data()[i])));
    return worst;
  };
  CHECK(close(y_a, y_b) < 1e-12);
  CHECK(close(gx_a, gx_b) < 1e-12);
  CHECK(close(grouped.w_gate().grad, reference.w_gate().grad) < 1e-12);
  CHECK(close(grouped.w_up().grad, reference.w_up().grad) < 1e-12);
  CHECK(close(grouped.w_down().grad, reference.w_down().grad) < 1e-12);
}

TEST_CASE("cuBLAS grouped GEMMs with every segment empty change nothing", "[cuda][cublas]") {
  const auto segments = segments_of({0, 0, 0});
  Matrix<double> in("in", 0, 4), out("out", 0, 3);
  Stack<double> weight("weight", 3, 4, 3), grad("grad", 3, 3, 4);
  std::mt19937 rng(3);
  fill(grad, rng);
  const auto before = host(grad);
  kmoe::gemm::segment_times_weight<kmoe::gemm::CublasGrouped>(segments, in, weight, false, 1.0, 0.0,
                                                              out);
  kmoe::gemm::segment_weight_gradient<kmoe::gemm::CublasGrouped>(segments, out, in, grad);
  const auto after = host(grad);
  for (std::size_t i = 0; i < after.size(); ++i) CHECK(after.data()[i] == before.data()[i]);
}

int main(int argc, char* argv[]) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("test_cublas_grouped_gemm: no CUDA device, built and linked only (skipped)\n");
    return 77;
  }
  Kokkos::ScopeGuard kokkos(argc, argv);
  return Catch::Session().run(argc, argv);
}
