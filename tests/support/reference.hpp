// SPDX-License-Identifier: BSD-3-Clause
#pragma once
// Plain-loop double-precision reference of an MoE layer, written from docs/semantics.md without any
// kmoe code: routing, capacity, experts, combine. Tests compare the library against it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace kmoe::test {

enum class RouterKind { softmax_topk, topk_softmax, sigmoid_bias, noisy_topk, expert_choice, hash };
enum class ActKind { relu, silu, gelu_erf, gelu_tanh };
enum class ExpertKind { ffn, glu };

struct RefMatrix {
  int rows = 0, cols = 0;
  std::vector<double> v;
  RefMatrix() = default;
  RefMatrix(int r, int c) : rows(r), cols(c), v(std::size_t(r) * c, 0.0) {}
  double& operator()(int r, int c) { return v[std::size_t(r) * cols + c]; }
  double operator()(int r, int c) const { return v[std::size_t(r) * cols + c]; }
};

struct RefRouterConfig {
  RouterKind kind = RouterKind::softmax_topk;
  int experts = 0, top_k = 1;
  bool normalize = false;
  double scale = 1.0;
  int n_group = 1, topk_group = 1, group_terms = 2;
  double ec_capacity_factor = 1.0;
  std::uint64_t hash_seed = 0;
  std::vector<double> bias;  // sigmoid router selection bias
};

struct RefRouting {
  std::vector<std::vector<int>> expert;     // per token, chosen experts in slot order
  std::vector<std::vector<double>> weight;  // matching weights
};

inline double ref_act(ActKind a, double x) {
  switch (a) {
    case ActKind::relu:
      return x > 0 ? x : 0;
    case ActKind::silu:
      return x / (1 + std::exp(-x));
    case ActKind::gelu_erf:
      return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
    case ActKind::gelu_tanh:
      return 0.5 * x * (1 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
  }
  return 0;
}

/// Indices of the k largest values among `eligible`, larger first, ties to the lower index.
inline std::vector<int> ref_top(const std::vector<double>& value, int k,
                                const std::vector<bool>& eligible) {
  std::vector<int> idx;
  for (int i = 0; i < int(value.size()); ++i)
    if (eligible[i]) idx.push_back(i);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return value[a] > value[b]; });
  idx.resize(std::min<std::size_t>(idx.size(), std::size_t(k)));
  return idx;
}

inline std::vector<double> ref_softmax(const std::vector<double>& l) {
  const double m = *std::max_element(l.begin(), l.end());
  std::vector<double> p(l.size());
  double s = 0;
  for (std::size_t i = 0; i < l.size(); ++i) s += (p[i] = std::exp(l[i] - m));
  for (auto& x : p) x /= s;
  return p;
}

inline std::uint64_t ref_splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

/// Group-limited eligibility: keep the topk_group groups with the best sum of top-`terms`.
inline std::vector<bool> ref_group_mask(const std::vector<double>& score, int n_group,
                                        int topk_group, int terms) {
  const int E = int(score.size()), size = E / n_group;
  std::vector<bool> all(E, true);
  if (n_group <= 1 || topk_group >= n_group) return all;
  std::vector<double> group_score(n_group, 0.0);
  for (int g = 0; g < n_group; ++g) {
    std::vector<double> in(score.begin() + g * size, score.begin() + (g + 1) * size);
    std::sort(in.begin(), in.end(), std::greater<double>());
    for (int j = 0; j < std::min(terms, size); ++j) group_score[g] += in[j];
  }
  const auto groups = ref_top(group_score, topk_group, std::vector<bool>(n_group, true));
  std::vector<bool> mask(E, false);
  for (int g : groups)
    for (int e = g * size; e < (g + 1) * size; ++e) mask[e] = true;
  return mask;
}

/// Routes T tokens given logits [T, E] (noise: the standard normal samples and the noise
/// gate's logits, used by noisy top-k in training; token_ids for hash routing).
inline RefRouting ref_route(const RefRouterConfig& c, const RefMatrix& logits,
                            const RefMatrix* noise = nullptr,
                            const RefMatrix* noise_logits = nullptr,
                            const std::vector<std::int64_t>* token_ids = nullptr) {
  const int T = logits.rows, E = c.experts;
  RefRouting out;
  out.expert.resize(T);
  out.weight.resize(T);
  if (c.kind == RouterKind::expert_choice) {
    std::vector<std::vector<double>> p(T);
    for (int t = 0; t < T; ++t)
      p[t] = ref_softmax(std::vector<double>(logits.v.begin() + std::size_t(t) * E,
                                             logits.v.begin() + std::size_t(t + 1) * E));
    const int C = std::min<int>(T, int(std::ceil(double(T) * c.ec_capacity_factor / E)));
    std::vector<std::vector<bool>> chosen(T, std::vector<bool>(E, false));
    for (int e = 0; e < E; ++e) {
      std::vector<double> col(T);
      for (int t = 0; t < T; ++t) col[t] = p[t][e];
      for (int t : ref_top(col, C, std::vector<bool>(T, true))) chosen[t][e] = true;
    }
    for (int t = 0; t < T; ++t)
      for (int e = 0; e < E; ++e)
        if (chosen[t][e]) {
          out.expert[t].push_back(e);
          out.weight[t].push_back(p[t][e]);
        }
    return out;
  }
  for (int t = 0; t < T; ++t) {
    if (c.kind == RouterKind::hash) {
      out.expert[t] = {int(ref_splitmix64(std::uint64_t((*token_ids)[t]) ^ c.hash_seed) % E)};
      out.weight[t] = {1.0};
      continue;
    }
    std::vector<double> l(logits.v.begin() + std::size_t(t) * E,
                          logits.v.begin() + std::size_t(t + 1) * E);
    const std::vector<bool> all(E, true);
    if (c.kind == RouterKind::softmax_topk) {
      const auto p = ref_softmax(l);
      const auto chosen =
          ref_top(p, c.top_k, ref_group_mask(p, c.n_group, c.topk_group, c.group_terms));
      double z = 0;
      for (int e : chosen) z += p[e];
      for (int e : chosen) {
        out.expert[t].push_back(e);
        out.weight[t].push_back(c.scale * (c.normalize ? p[e] / z : p[e]));
      }
    } else if (c.kind == RouterKind::sigmoid_bias) {
      std::vector<double> s(E), biased(E);
      for (int e = 0; e < E; ++e) {
        s[e] = 1 / (1 + std::exp(-l[e]));
        biased[e] = s[e] + (c.bias.empty() ? 0.0 : c.bias[e]);
      }
      const auto chosen =
          ref_top(biased, c.top_k, ref_group_mask(biased, c.n_group, c.topk_group, c.group_terms));
      double z = 1e-20;
      for (int e : chosen) z += s[e];
      for (int e : chosen) {
        out.expert[t].push_back(e);
        out.weight[t].push_back(c.scale * (c.normalize ? s[e] / z : s[e]));
      }
    } else {  // top-k then softmax over the chosen (noisy: on the noisy logits)
      std::vector<double> h = l;
      if (c.kind == RouterKind::noisy_topk && noise != nullptr)
        for (int e = 0; e < E; ++e) {
          const double r = (*noise_logits)(t, e);
          const double softplus = r > 0 ? r + std::log1p(std::exp(-r)) : std::log1p(std::exp(r));
          h[e] += (*noise)(t, e) * softplus;
        }
      const auto chosen = ref_top(h, c.top_k, all);
      std::vector<double> v;
      for (int e : chosen) v.push_back(h[e]);
      const auto w = ref_softmax(v);
      for (std::size_t j = 0; j < chosen.size(); ++j) {
        out.expert[t].push_back(chosen[j]);
        out.weight[t].push_back(w[j]);
      }
    }
  }
  return out;
}

/// Applies capacity C per expert (C < 0: dropless): returns kept[t][j].
inline std::vector<std::vector<bool>> ref_capacity(const RefRouting& r, int experts, long long C,
                                                   bool by_probability) {
  std::vector<std::vector<bool>> kept(r.expert.size());
  for (std::size_t t = 0; t < r.expert.size(); ++t) kept[t].assign(r.expert[t].size(), C < 0);
  if (C < 0) return kept;
  for (int e = 0; e < experts; ++e) {
    std::vector<std::pair<int, int>> list;  // (token, slot) in token order
    for (std::size_t t = 0; t < r.expert.size(); ++t)
      for (std::size_t j = 0; j < r.expert[t].size(); ++j)
        if (r.expert[t][j] == e) list.emplace_back(int(t), int(j));
    if (by_probability)
      std::stable_sort(list.begin(), list.end(), [&](auto a, auto b) {
        return r.weight[a.first][a.second] > r.weight[b.first][b.second];
      });
    for (std::size_t i = 0; i < list.size() && (long long)i < C; ++i)
      kept[list[i].first][list[i].second] = true;
  }
  return kept;
}

/// One expert on one row: FFN y = act(x W1^T + b1) W2^T + b2 or GLU y = (act(x Wg^T) * x Wu^T) Wd^T.
/// Weights in torch.nn.Linear layout: w_in [F, H] (w1 or w_gate), w_up [F, H], w_out [H, F].
struct RefExpertWeights {
  RefMatrix w_in, w_up, w_out;
  std::vector<double> b_in, b_out;
};

inline std::vector<double> ref_expert(ExpertKind kind, ActKind act, const RefExpertWeights& w,
                                      const double* x) {
  const int F = w.w_in.rows, H = w.w_in.cols;
  std::vector<double> hidden(F), y(H, 0.0);
  for (int f = 0; f < F; ++f) {
    double a = 0, u = 0;
    for (int h = 0; h < H; ++h) {
      a += x[h] * w.w_in(f, h);
      if (kind == ExpertKind::glu) u += x[h] * w.w_up(f, h);
    }
    if (!w.b_in.empty()) a += w.b_in[f];
    hidden[f] = kind == ExpertKind::glu ? ref_act(act, a) * u : ref_act(act, a);
  }
  for (int h = 0; h < H; ++h) {
    double s = w.b_out.empty() ? 0.0 : w.b_out[h];
    for (int f = 0; f < F; ++f) s += hidden[f] * w.w_out(h, f);
    y[h] = s;
  }
  return y;
}

}  // namespace kmoe::test
