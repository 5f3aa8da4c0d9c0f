// SPDX-License-Identifier: BSD-3-Clause
// The segmented GEMM interface (gemm/segmented.hpp) against plain loops, with empty, small
// and large segments (the concurrent and the sequential paths), and its grouped switch: a
// GEMM policy that supplies a grouped form gets one call per projection, and a layer using
// it gives the default policy's bits.
#include <kmoe/kmoe.hpp>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>

#include <cmath>
#include <vector>

#include "support/spaces.hpp"

using namespace kmoe;
using kmoe::test::ExecutionSpaces;

namespace {

template <class X>
Segments<X> segments_of(const std::vector<int>& sizes) {
  Segments<X> s;
  s.offsets_host = Kokkos::View<int*, Kokkos::HostSpace>("offsets", sizes.size() + 1);
  for (std::size_t e = 0; e < sizes.size(); ++e)
    s.offsets_host(e + 1) = s.offsets_host(e) + sizes[e];
  s.sync_from_host();
  return s;
}

/// A host copy, never an alias (a mirror *view* of host memory is the view itself).
template <class View>
auto host(const View& v) {
  auto copy = Kokkos::create_mirror(Kokkos::HostSpace(), v);
  Kokkos::deep_copy(copy, v);
  return copy;
}

/// The default policy, plus a grouped form that counts its calls and runs each segment
/// through the default policy's gemm (so its bits equal the loop's).
struct CountingGroupedGemm {
  static inline int grouped_calls = 0;

  template <class X, class A, class B, class C>
  static void gemm(const X& space, bool ta, bool tb, typename C::const_value_type alpha, const A& a,
                   const B& b, typename C::const_value_type beta, const C& c) {
    DefaultGemm::gemm(space, ta, tb, alpha, a, b, beta, c);
  }
  template <class X, class In, class Weight, class Out>
  static void segment_times_weight(const X& space, const Segments<X>& segments, const In& in,
                                   const Weight& weight, bool transpose_weight,
                                   typename Out::const_value_type alpha,
                                   typename Out::const_value_type beta, const Out& out) {
    ++grouped_calls;
    for (int e = 0; e < segments.experts(); ++e) {
      const auto rows = Kokkos::make_pair(segments.begin(e), segments.end(e));
      if (rows.first == rows.second) continue;
      gemm(space, false, transpose_weight, alpha, Kokkos::subview(in, rows, Kokkos::ALL),
           Kokkos::subview(weight, e, Kokkos::ALL, Kokkos::ALL), beta,
           Kokkos::subview(out, rows, Kokkos::ALL));
    }
  }
  template <class X, class Left, class Right, class GradWeight>
  static void segment_weight_gradient(const X& space, const Segments<X>& segments, const Left& left,
                                      const Right& right, const GradWeight& grad_weight) {
    ++grouped_calls;
    using S = typename GradWeight::non_const_value_type;
    for (int e = 0; e < segments.experts(); ++e) {
      const auto rows = Kokkos::make_pair(segments.begin(e), segments.end(e));
      if (rows.first == rows.second) continue;
      gemm(space, true, false, S(1), Kokkos::subview(left, rows, Kokkos::ALL),
           Kokkos::subview(right, rows, Kokkos::ALL), S(1),
           Kokkos::subview(grad_weight, e, Kokkos::ALL, Kokkos::ALL));
    }
  }
};

}  // namespace

TEMPLATE_LIST_TEST_CASE("segmented GEMMs match plain loops over every segment", "[gemm][segments]",
                        ExecutionSpaces) {
  using X = TestType;
  // Few large segments (sequential, each GEMM multithreaded) and many small ones with
  // empty experts among them (concurrent on host spaces with several threads).
  const auto sizes = GENERATE(std::vector<int>{300, 0, 45, 1}, std::vector<int>(64, 3),
                              std::vector<int>{0, 0, 7, 0, 2, 9, 0, 1, 4, 4, 0, 3, 5, 6, 0, 2});
  const bool transpose = GENERATE(false, true);
  const int experts = int(sizes.size()), in_width = 19, out_width = 11;
  const auto segments = segments_of<X>(sizes);
  const int rows = segments.rows();
  CAPTURE(experts, rows, transpose);

  Matrix<double, X> in("in", rows, in_width), out("out", rows, out_width);
  Kokkos::View<double***, Kokkos::LayoutRight, typename X::memory_space> weight(
      "weight", experts, transpose ? out_width : in_width, transpose ? in_width : out_width);
  fill_normal(in, 1.0, 1);
  fill_normal(out, 1.0, 2);
  fill_normal(weight, 1.0, 3);
  const auto in_h = host(in), before = host(out), w = host(weight);
  gemm::segment_times_weight<DefaultGemm>(segments, in, weight, transpose, 0.5, 2.0, out);
  const auto got = host(out);
  double worst = 0;
  for (int e = 0; e < experts; ++e)
    for (int r = segments.begin(e); r < segments.end(e); ++r)
      for (int j = 0; j < out_width; ++j) {
        double sum = 0;
        for (int p = 0; p < in_width; ++p)
          sum += in_h(r, p) * (transpose ? w(e, j, p) : w(e, p, j));
        worst = std::max(worst, std::abs(got(r, j) - (0.5 * sum + 2.0 * before(r, j))));
      }
  CHECK(worst < 1e-12 * in_width);

  // grad_weight[e] += left[seg e]^T right[seg e].
  Matrix<double, X> left("left", rows, out_width);
  Kokkos::View<double***, Kokkos::LayoutRight, typename X::memory_space> grad("grad", experts,
                                                                              out_width, in_width);
  fill_normal(left, 1.0, 4);
  fill_normal(grad, 1.0, 5);
  const auto left_h = host(left), grad_before = host(grad);
  gemm::segment_weight_gradient<DefaultGemm>(segments, left, in, grad);
  const auto grad_got = host(grad);
  worst = 0;
  for (int e = 0; e < experts; ++e)
    for (int i = 0; i < out_width; ++i)
      for (int j = 0; j < in_width; ++j) {
        double sum = 0;
        for (int r = segments.begin(e); r < segments.end(e); ++r) sum += left_h(r, i) * in_h(r, j);
        worst = std::max(worst, std::abs(grad_got(e, i, j) - (sum + grad_before(e, i, j))));
      }
  CHECK(worst < 1e-12 * rows);
}

TEMPLATE_LIST_TEST_CASE("a GEMM policy's grouped form replaces the segment loop",
                        "[gemm][segments]", ExecutionSpaces) {
  using X = TestType;
  using S = double;
  constexpr int hidden = 8, ffn = 12, experts = 6, tokens = 29;
  using Default = MoELayer<SoftmaxTopKRouter<X, S>, SwiGLUExperts<X, S>>;
  using Grouped = MoELayer<SoftmaxTopKRouter<X, S>, SwiGLUExperts<X, S, CountingGroupedGemm>>;
  Default reference(SoftmaxTopKRouter<X, S>({hidden, experts, 2}),
                    SwiGLUExperts<X, S>({experts, hidden, ffn}));
  Grouped grouped(SoftmaxTopKRouter<X, S>({hidden, experts, 2}),
                  SwiGLUExperts<X, S, CountingGroupedGemm>({experts, hidden, ffn}));
  fill_normal(reference.parameters(), 0.5, 9);
  fill_normal(grouped.parameters(), 0.5, 9);

  Matrix<S, X> x("x", tokens, hidden), y_ref("y_ref", tokens, hidden), y("y", tokens, hidden);
  Matrix<S, X> gx_ref("gx_ref", tokens, hidden), gx("gx", tokens, hidden);
  fill_normal(x, 1.0, 10);
  RouteContext<X> training;
  training.training = true;
  reference.forward(x, y_ref, training);
  CountingGroupedGemm::grouped_calls = 0;
  grouped.forward(x, y, training);
  CHECK(CountingGroupedGemm::grouped_calls == 3);  // gate, up, down: one call each
  reference.backward(y_ref, gx_ref);
  CountingGroupedGemm::grouped_calls = 0;
  grouped.backward(y, gx);
  // Three weight gradients and three input-gradient products.
  CHECK(CountingGroupedGemm::grouped_calls == 6);

  const auto same = [](const auto& a, const auto& b) {
    const auto ha = host(a), hb = host(b);
    for (std::size_t i = 0; i < ha.size(); ++i)
      if (ha.data()[i] != hb.data()[i]) return false;
    return true;
  };
  CHECK(same(y, y_ref));
  CHECK(same(gx, gx_ref));
  const auto a = reference.parameters(), b = grouped.parameters();
  for (std::size_t p = 0; p < a.size(); ++p) {
    CAPTURE(a[p].name);
    CHECK(same(a[p].grad, b[p].grad));
  }
}
