// SPDX-License-Identifier: BSD-3-Clause
// The segmented GEMM interface (gemm/segmented.hpp) on its own: one projection of every
// expert's segment, y[seg e] = x[seg e] W_e^T, and its weight gradient, against the dense
// GEMM of the same rows x K x N (one weight for all rows) timed interleaved in the same
// run. The ratio segmented / dense is what splitting the rows over E experts costs with
// the default GEMM policy (the per-segment loop, or the concurrent path for many small
// segments); a grouped backend is measured the same way.
//
//   segmented_gemm_bench [--repeats N] [--quick]
#include <kmoe/gemm.hpp>
#include <kmoe/gemm/segmented.hpp>
#include <kmoe/init.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "support/timing.hpp"

namespace {

using X = Kokkos::DefaultExecutionSpace;
using S = float;
using Gemm = kmoe::DefaultGemm;

struct Shape {
  const char* name;
  int rows, experts, inner, outer;  // rows split evenly over the experts
};

template <class F>
double time_ms(const F& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  Kokkos::fence();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

void run(const Shape& s, int repeats) {
  kmoe::Segments<X> segments;
  segments.offsets_host = Kokkos::View<int*, Kokkos::HostSpace>("offsets", s.experts + 1);
  for (int e = 0; e < s.experts; ++e)
    segments.offsets_host(e + 1) = int(std::int64_t(s.rows) * (e + 1) / s.experts);
  segments.sync_from_host();
  kmoe::Matrix<S, X> x("x", s.rows, s.inner), y("y", s.rows, s.outer);
  kmoe::Matrix<S, X> grad_y("grad_y", s.rows, s.outer);
  Kokkos::View<S***, X::memory_space> weight("weight", s.experts, s.outer, s.inner);
  Kokkos::View<S***, X::memory_space> grad_weight("grad_weight", s.experts, s.outer, s.inner);
  kmoe::fill_normal(x, 1.0, 1);
  kmoe::fill_normal(grad_y, 1.0, 2);
  kmoe::fill_normal(weight, 0.02, 3);
  const auto weight_0 = Kokkos::subview(weight, 0, Kokkos::ALL, Kokkos::ALL);
  const auto grad_weight_0 = Kokkos::subview(grad_weight, 0, Kokkos::ALL, Kokkos::ALL);

  const auto segmented_forward = [&] {
    kmoe::gemm::segment_times_weight<Gemm>(segments, x, weight, true, S(1), S(0), y);
  };
  const auto dense_forward = [&] { Gemm::gemm(X(), false, true, S(1), x, weight_0, S(0), y); };
  const auto segmented_gradient = [&] {
    kmoe::gemm::segment_weight_gradient<Gemm>(segments, grad_y, x, grad_weight);
  };
  const auto dense_gradient = [&] {
    Gemm::gemm(X(), true, false, S(1), grad_y, x, S(1), grad_weight_0);
  };
  // Warm-up, then each pair in turn so that a drift of the machine's speed hits both sides.
  segmented_forward(), dense_forward(), segmented_gradient(), dense_gradient();
  std::vector<double> sf, df, sg, dg;
  for (int r = 0; r < repeats; ++r) {
    sf.push_back(time_ms(segmented_forward));
    df.push_back(time_ms(dense_forward));
    sg.push_back(time_ms(segmented_gradient));
    dg.push_back(time_ms(dense_gradient));
  }
  std::printf("%-18s %6d %4d %5d %5d | %9.3f %9.3f %6.3f | %9.3f %9.3f %6.3f\n", s.name, s.rows,
              s.experts, s.inner, s.outer, kmoe::bench::median(sf), kmoe::bench::median(df),
              kmoe::bench::median(sf) / kmoe::bench::median(df), kmoe::bench::median(sg),
              kmoe::bench::median(dg), kmoe::bench::median(sg) / kmoe::bench::median(dg));
}

}  // namespace

int main(int argc, char** argv) {
  Kokkos::ScopeGuard kokkos(argc, argv);
  int repeats = 5;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--repeats" && i + 1 < argc)
      repeats = std::max(1, std::atoi(argv[++i]));
    else if (a == "--quick")
      quick = true;
    else if (a.rfind("--kokkos", 0) != 0) {
      std::fprintf(stderr,
                   "segmented_gemm_bench: unknown argument '%s'\n"
                   "usage: segmented_gemm_bench [--repeats N] [--quick]\n",
                   argv[i]);
      return 1;
    }
  }
  std::printf(
      "segmented_gemm_bench: %s, %d threads, float32, gemm: %s; times in ms (median of %d)\n",
      X::name(), X().concurrency(), Gemm::name, repeats);
  std::printf("%-18s %6s %4s %5s %5s | %9s %9s %6s | %9s %9s %6s\n", "shape", "rows", "E", "K", "N",
              "seg_fwd", "dense", "ratio", "seg_grad", "dense", "ratio");
  // Mixtral's up projection at 4096 tokens x top-2; DeepSeek-V3-like fine-grained experts
  // at 4096 tokens x top-6 (the concurrent path); a decode step's 8 tokens x top-2.
  const std::vector<Shape> shapes = quick
                                        ? std::vector<Shape>{{"quick", 64, 4, 32, 48}}
                                        : std::vector<Shape>{{"mixtral-up", 8192, 8, 1024, 3584},
                                                             {"deepseek-up", 24576, 64, 1024, 256},
                                                             {"decode-up", 16, 8, 1024, 3584}};
  for (const auto& s : shapes) run(s, repeats);
  return 0;
}
