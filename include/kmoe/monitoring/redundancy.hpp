// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file redundancy.hpp
/// \brief Expert-redundancy diagnostics: cosine similarity between experts' weights and
/// between their outputs on a batch, the pairs above a threshold (0.8 by default: two
/// experts that similar do nearly the same work) and the experts that received no token
/// over a load window (ExpertLoadWindow).
///
/// Both similarities are Gram matrices computed with the experts' GEMM policy, in the
/// experts' memory space: weights as sum_p W_p W_p^T over the per-expert parameters W_p
/// viewed as [E, n_p]; outputs as O O^T with O [E, T * H]. Under expert parallelism an
/// Expert object holds this rank's experts only, so the pairs are this rank's (indices are
/// local).

#include <kmoe/error.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/gemm.hpp>
#include <kmoe/monitoring/load_window.hpp>
#include <kmoe/parameters.hpp>
#include <kmoe/segments.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace kmoe {

/// \brief Two experts whose cosine similarity reached the threshold (first < second).
struct SimilarExperts {
  int first = 0, second = 0;
  double similarity = 0;
};

/// \brief What redundancy_report finds.
struct RedundancyReport {
  double threshold = 0.8;
  std::vector<SimilarExperts> similar_weights;  ///< pairs by weight similarity
  std::vector<SimilarExperts> similar_outputs;  ///< pairs by output similarity on the batch
  std::vector<int> dead_experts;                ///< no token over the load window
};

namespace detail {

/// Cosine similarities [E, E] (row-major, host) from a Gram matrix G = A A^T. A zero
/// vector is similar to nothing, itself included (0), rather than NaN.
template <class GramView>
std::vector<double> cosine_from_gram(const GramView& gram) {
  const auto g = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), gram);
  const int n = int(g.extent(0));
  std::vector<double> out(std::size_t(n) * n, 0.0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      const double norms = std::sqrt(double(g(i, i))) * std::sqrt(double(g(j, j)));
      if (norms > 0) out[std::size_t(i) * n + j] = double(g(i, j)) / norms;
    }
  return out;
}

}  // namespace detail

/// \brief Cosine similarity between every pair of experts' weights: expert e's vector is
/// the concatenation of its slices of every per-expert parameter (weights and biases).
/// Returns [E, E] row-major on the host.
template <class Expert, class Gemm = DefaultGemm>
std::vector<double> expert_weight_similarity(const Expert& experts) {
  static_assert(check_valid_expert<Expert>());
  using X = typename Expert::execution_space;
  using S = typename Expert::scalar_type;
  using Unmanaged = Kokkos::View<const S**, Kokkos::LayoutRight, typename X::memory_space,
                                 Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  const int n = experts.num_experts();
  ParameterList<X, S> params;
  experts.collect_parameters(params);
  Matrix<S, X> gram("kmoe::expert_weight_similarity::gram", n, n);
  for (const auto& p : params) {
    if (p.shard.expert_axis != 0) continue;  // not one slice per expert
    const std::size_t per_expert = p.value.size() / std::size_t(n);
    const Unmanaged w(p.value.data(), std::size_t(n), per_expert);
    Gemm::gemm(X(), false, true, S(1), w, w, S(1), gram);
  }
  X().fence();
  return detail::cosine_from_gram(gram);
}

/// \brief Cosine similarity between every pair of experts' outputs on the rows x [T, H]:
/// every expert runs on every row (T * E rows in all). Runs the experts' forward in
/// inference mode, which reuses their workspace: call it between steps, not between a
/// training forward and its backward. Returns [E, E] row-major on the host.
template <class Expert, class Gemm = DefaultGemm>
std::vector<double> expert_output_similarity(
    Expert& experts,
    const ConstMatrix<typename Expert::scalar_type, typename Expert::execution_space>& x) {
  static_assert(check_valid_expert<Expert>());
  using X = typename Expert::execution_space;
  using S = typename Expert::scalar_type;
  const int n = experts.num_experts();
  const int tokens = int(x.extent(0)), hidden = int(x.extent(1));
  require(hidden == experts.hidden_size(), "kmoe::expert_output_similarity", "x.extent(1)", hidden,
          "must equal the experts' hidden size " + std::to_string(experts.hidden_size()));
  require(tokens >= 1, "kmoe::expert_output_similarity", "x.extent(0)", tokens,
          "must be at least 1");
  Segments<X> segments;
  segments.offsets_host =
      Kokkos::View<int*, Kokkos::HostSpace>("kmoe::expert_output_similarity::offsets", n + 1);
  for (int e = 0; e <= n; ++e) segments.offsets_host(e) = e * tokens;
  segments.sync_from_host();
  Matrix<S, X> rows("kmoe::expert_output_similarity::rows", std::size_t(n) * tokens, hidden);
  for (int e = 0; e < n; ++e)
    Kokkos::deep_copy(
        Kokkos::subview(rows, Kokkos::make_pair(e * tokens, (e + 1) * tokens), Kokkos::ALL), x);
  Matrix<S, X> outputs("kmoe::expert_output_similarity::outputs", std::size_t(n) * tokens, hidden);
  experts.forward(rows, segments, outputs, ExpertMode::inference);
  // Expert e's outputs are rows [e T, (e + 1) T): contiguous, so O is [E, T * H].
  using Unmanaged = Kokkos::View<const S**, Kokkos::LayoutRight, typename X::memory_space,
                                 Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  const Unmanaged o(outputs.data(), std::size_t(n), std::size_t(tokens) * hidden);
  Matrix<S, X> gram("kmoe::expert_output_similarity::gram", n, n);
  Gemm::gemm(X(), false, true, S(1), o, o, S(0), gram);
  X().fence();
  return detail::cosine_from_gram(gram);
}

/// \brief The pairs (i < j) of an [E, E] similarity matrix at or above `threshold`, in
/// decreasing similarity (ties: by index).
inline std::vector<SimilarExperts> similar_pairs(const std::vector<double>& similarity, int experts,
                                                 double threshold) {
  require(similarity.size() == std::size_t(experts) * experts, "kmoe::similar_pairs",
          "similarity.size()", similarity.size(), "must be experts * experts");
  std::vector<SimilarExperts> pairs;
  for (int i = 0; i < experts; ++i)
    for (int j = i + 1; j < experts; ++j) {
      const double s = similarity[std::size_t(i) * experts + j];
      if (s >= threshold) pairs.push_back({i, j, s});
    }
  std::stable_sort(pairs.begin(), pairs.end(),
                   [](const auto& a, const auto& b) { return a.similarity > b.similarity; });
  return pairs;
}

/// \brief Weight and output similarity of `experts` (outputs on the rows x) at `threshold`,
/// and the dead experts of `window`.
template <class Expert, class Gemm = DefaultGemm>
RedundancyReport redundancy_report(
    Expert& experts,
    const ConstMatrix<typename Expert::scalar_type, typename Expert::execution_space>& x,
    const ExpertLoadWindow& window, double threshold = 0.8) {
  require(threshold >= -1 && threshold <= 1, "kmoe::redundancy_report", "threshold", threshold,
          "must be a cosine similarity in [-1, 1]");
  RedundancyReport report;
  report.threshold = threshold;
  const int n = experts.num_experts();
  report.similar_weights =
      similar_pairs(expert_weight_similarity<Expert, Gemm>(experts), n, threshold);
  report.similar_outputs =
      similar_pairs(expert_output_similarity<Expert, Gemm>(experts, x), n, threshold);
  report.dead_experts = window.dead_experts();
  return report;
}

}  // namespace kmoe
