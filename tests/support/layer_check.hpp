// SPDX-License-Identifier: BSD-3-Clause
#pragma once
// Runs a kmoe layer and the plain-loop reference on the same random inputs and compares.
#include <kmoe/kmoe.hpp>

#include <catch2/catch_test_macros.hpp>

#include "reference.hpp"

namespace kmoe::test {

template <class View>
RefMatrix to_ref(const View& v) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  RefMatrix m(int(v.extent(0)), int(v.extent(1)));
  for (int r = 0; r < m.rows; ++r)
    for (int c = 0; c < m.cols; ++c) m(r, c) = double(h(r, c));
  return m;
}

template <class View3>
RefMatrix slice_to_ref(const View3& v, int e) {
  return to_ref(Kokkos::subview(v, e, Kokkos::ALL, Kokkos::ALL));
}

template <class View2>
std::vector<double> row_to_vector(const View2& v, int e) {
  if (v.extent(0) == 0) return {};
  const auto m = to_ref(v);
  return std::vector<double>(m.v.begin() + std::size_t(e) * m.cols,
                             m.v.begin() + std::size_t(e + 1) * m.cols);
}

template <class X, class S, class A, class G>
RefExpertWeights expert_weights(const GLUExperts<X, S, A, G>& experts, int e) {
  return {slice_to_ref(experts.w_gate().value, e),
          slice_to_ref(experts.w_up().value, e),
          slice_to_ref(experts.w_down().value, e),
          {},
          {}};
}

template <class X, class S, class A, class G>
RefExpertWeights expert_weights(const FFNExperts<X, S, A, G>& experts, int e) {
  return {slice_to_ref(experts.w1().value, e), RefMatrix(), slice_to_ref(experts.w2().value, e),
          row_to_vector(experts.b1().value, e), row_to_vector(experts.b2().value, e)};
}

template <class Experts>
constexpr ExpertKind expert_kind_of() {
  return std::is_same_v<Experts,
                        GLUExperts<typename Experts::execution_space, typename Experts::scalar_type,
                                   typename Experts::activation_type>>
             ? ExpertKind::glu
             : ExpertKind::ffn;
}

template <class Activation>
constexpr ActKind act_kind_of() {
  if constexpr (std::is_same_v<Activation, activation::Relu>) return ActKind::relu;
  if constexpr (std::is_same_v<Activation, activation::Silu>) return ActKind::silu;
  if constexpr (std::is_same_v<Activation, activation::GeluErf>) return ActKind::gelu_erf;
  return ActKind::gelu_tanh;
}

/// max |a - b| / max(max |b|, tiny)
inline double relative_error(const RefMatrix& a, const RefMatrix& b) {
  double diff = 0, scale = 1e-300;
  for (std::size_t i = 0; i < a.v.size(); ++i) {
    diff = std::max(diff, std::abs(a.v[i] - b.v[i]));
    scale = std::max(scale, std::abs(b.v[i]));
  }
  return diff / scale;
}

template <class S>
constexpr double tolerance() {
  return std::is_same_v<S, double> ? 1e-6 : 1e-4;
}

/// Result of comparing one forward pass with the reference.
struct ForwardComparison {
  double logit_error = 0, output_error = 0;
  std::int64_t reference_dropped = 0;
  std::vector<std::int64_t> reference_counts;
};

/// Forward of `layer` on x; reference routing from the layer's own logits (checked
/// separately against x W^T) so that float rounding cannot flip a near-tie.
template <class Layer>
ForwardComparison compare_forward(
    Layer& layer, const RefRouterConfig& rc,
    const ConstMatrix<typename Layer::scalar_type, typename Layer::execution_space>& x,
    const Matrix<typename Layer::scalar_type, typename Layer::execution_space>& y,
    const ForwardStats& stats, const RefMatrix* gate_weight,
    const std::vector<std::int64_t>* token_ids = nullptr, const RefMatrix* noise = nullptr,
    const RefMatrix* noise_logits = nullptr) {
  using Experts = std::decay_t<decltype(layer.experts())>;
  ForwardComparison out;
  const RefMatrix xr = to_ref(x);
  const int T = xr.rows, H = xr.cols, E = rc.experts;
  RefMatrix logits(T, E);
  if (gate_weight != nullptr) {
    const RefMatrix lib_logits = to_ref(layer.routing().logits);
    for (int t = 0; t < T; ++t)
      for (int e = 0; e < E; ++e) {
        double s = 0;
        for (int h = 0; h < H; ++h) s += xr(t, h) * (*gate_weight)(e, h);
        logits(t, e) = s;
      }
    out.logit_error = relative_error(lib_logits, logits);
    logits = lib_logits;
  }
  const RefRouting routing = ref_route(rc, logits, noise, noise_logits, token_ids);
  const int k = layer.router().slots_per_token();
  const auto& cap = layer.options().capacity;
  const long long C =
      cap.dropless()
          ? -1
          : std::max<long long>((long long)std::ceil(double(k) * T * cap.factor / E), cap.minimum);
  const auto kept = ref_capacity(routing, E, C, cap.drop == DropPolicy::by_probability);
  std::vector<RefExpertWeights> w;
  for (int e = 0; e < E; ++e) w.push_back(expert_weights(layer.experts(), e));
  std::optional<RefExpertWeights> shared;
  if (layer.shared_experts()) shared = expert_weights(*layer.shared_experts(), 0);
  constexpr ExpertKind kind = expert_kind_of<Experts>();
  constexpr ActKind act = act_kind_of<typename Experts::activation_type>();
  RefMatrix yr(T, H);
  out.reference_counts.assign(E, 0);
  for (int t = 0; t < T; ++t) {
    for (std::size_t j = 0; j < routing.expert[t].size(); ++j) {
      const int e = routing.expert[t][j];
      ++out.reference_counts[e];
      if (!kept[t][j]) {
        ++out.reference_dropped;
        continue;
      }
      const auto ye = ref_expert(kind, act, w[e], &xr.v[std::size_t(t) * H]);
      for (int h = 0; h < H; ++h) yr(t, h) += routing.weight[t][j] * ye[h];
    }
    if (shared) {
      const auto ys = ref_expert(kind, act, *shared, &xr.v[std::size_t(t) * H]);
      for (int h = 0; h < H; ++h) yr(t, h) += ys[h];
    }
  }
  out.output_error = relative_error(to_ref(y), yr);
  CHECK(stats.tokens_per_expert == out.reference_counts);
  CHECK(stats.dropped == out.reference_dropped);
  return out;
}

}  // namespace kmoe::test
