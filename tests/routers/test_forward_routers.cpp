// SPDX-License-Identifier: BSD-3-Clause
// Every router inside a full layer against the plain-loop reference, float and double,
// on every enabled execution space, including T not a multiple of anything, E = 1, k = E.
#include <catch2/catch_approx.hpp>
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>

#include "support/layer_check.hpp"
#include "support/spaces.hpp"

#include <cmath>

using namespace kmoe;
using namespace kmoe::test;

namespace {

template <class R>
using gate_of = decltype(std::declval<R&>().gate());

template <class Layer>
void check_layer(Layer& layer, const RefRouterConfig& rc, int tokens, std::uint64_t seed,
                 bool training = false) {
  using Router = std::decay_t<decltype(layer.router())>;
  constexpr bool with_gate = detail::is_detected_v<gate_of, Router>;
  using X = typename Layer::execution_space;
  using S = typename Layer::scalar_type;
  fill_normal(layer.parameters(), 0.3, seed);
  Matrix<S, X> x("x", tokens, layer.hidden_size()), y("y", tokens, layer.hidden_size());
  fill_normal(x, 1.0, seed + 1);
  RouteContext<X> context;
  context.training = training;
  context.step = 7;
  Vector<std::int64_t, X> ids("ids", tokens);
  std::vector<std::int64_t> ids_host(tokens);
  for (int t = 0; t < tokens; ++t) ids_host[t] = std::int64_t(seed * 31 + t * 977);
  Kokkos::deep_copy(ids, Kokkos::View<std::int64_t*, Kokkos::HostSpace>(ids_host.data(), tokens));
  context.token_ids = ids;
  const auto stats = layer.forward(x, y, context);
  RefMatrix gate;
  if constexpr (with_gate) gate = to_ref(layer.router().gate().weight());
  const auto cmp = compare_forward(layer, rc, x, y, stats, with_gate ? &gate : nullptr, &ids_host);
  CAPTURE(tokens, rc.experts, rc.top_k);
  CHECK(cmp.logit_error < tolerance<S>());
  CHECK(cmp.output_error < tolerance<S>());
}

template <class X, class S>
void softmax_cases() {
  const int tokens = GENERATE(1, 13, 37);
  const int experts = GENERATE(1, 4, 8);
  const int k = GENERATE(1, 2, 100);  // 100 -> k = E
  const int top_k = std::min(k, experts);
  const bool normalize = GENERATE(false, true);
  CAPTURE(tokens, experts, top_k, normalize);
  using R = SoftmaxTopKRouter<X, S>;
  using Ex = SwiGLUExperts<X, S>;
  MoELayer<R, Ex> layer(R({16, experts, top_k, normalize, normalize ? 1.0 : 2.5}),
                        Ex({experts, 16, 24}));
  RefRouterConfig rc;
  rc.kind = RouterKind::softmax_topk;
  rc.experts = experts;
  rc.top_k = top_k;
  rc.normalize = normalize;
  rc.scale = normalize ? 1.0 : 2.5;
  check_layer(layer, rc, tokens, 11 + tokens + experts);
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("softmax-then-top-k layer matches the reference", "[router]",
                        ExecutionSpaces) {
  softmax_cases<TestType, double>();
  softmax_cases<TestType, float>();
}

TEMPLATE_LIST_TEST_CASE("group-limited routers match the reference", "[router]", ExecutionSpaces) {
  using X = TestType;
  const int tokens = GENERATE(5, 29);
  const int terms = GENERATE(1, 2);
  {
    using R = SigmoidBiasRouter<X, double>;
    using Ex = SwiGLUExperts<X, double>;
    SigmoidBiasConfig c{12, 16, 4, true, 2.5, {4, 2, terms}};
    MoELayer<R, Ex> layer(R(c), Ex({16, 12, 8}));
    // A bias large enough to change choices.
    auto bias = Kokkos::create_mirror_view(layer.router().bias());
    RefRouterConfig rc;
    rc.kind = RouterKind::sigmoid_bias;
    rc.experts = 16;
    rc.top_k = 4;
    rc.normalize = true;
    rc.scale = 2.5;
    rc.n_group = 4;
    rc.topk_group = 2;
    rc.group_terms = terms;
    for (int e = 0; e < 16; ++e) rc.bias.push_back(bias(e) = 0.05 * ((e * 7) % 5) - 0.1);
    Kokkos::deep_copy(layer.router().bias(), bias);
    check_layer(layer, rc, tokens, 5 + tokens);
  }
  {
    using R = SoftmaxTopKRouter<X, float>;
    using Ex = SwiGLUExperts<X, float>;
    MoELayer<R, Ex> layer(R({12, 16, 3, false, 1.0, {8, 3, terms}}), Ex({16, 12, 8}));
    RefRouterConfig rc;
    rc.kind = RouterKind::softmax_topk;
    rc.experts = 16;
    rc.top_k = 3;
    rc.n_group = 8;
    rc.topk_group = 3;
    rc.group_terms = terms;
    check_layer(layer, rc, tokens, 3 + tokens);
  }
}

TEMPLATE_LIST_TEST_CASE("sigmoid router without normalisation and top-k-then-softmax", "[router]",
                        ExecutionSpaces) {
  using X = TestType;
  const int tokens = GENERATE(3, 17);
  {
    using R = SigmoidBiasRouter<X, float>;
    using Ex = GeGLUExperts<X, float>;
    MoELayer<R, Ex> layer(R({8, 6, 2, false, 1.5, {}}), Ex({6, 8, 10}));
    RefRouterConfig rc;
    rc.kind = RouterKind::sigmoid_bias;
    rc.experts = 6;
    rc.top_k = 2;
    rc.scale = 1.5;
    check_layer(layer, rc, tokens, 21);
  }
  {
    using R = TopKSoftmaxRouter<X, double>;
    using Ex = SwiGLUExperts<X, double>;
    MoELayer<R, Ex> layer(R({8, 6, 3}), Ex({6, 8, 10}));
    RefRouterConfig rc;
    rc.kind = RouterKind::topk_softmax;
    rc.experts = 6;
    rc.top_k = 3;
    check_layer(layer, rc, tokens, 23);
  }
}

TEMPLATE_LIST_TEST_CASE("noisy top-k adds seeded noise in training only", "[router]",
                        ExecutionSpaces) {
  using X = TestType;
  using S = double;
  using R = NoisyTopKRouter<X, S>;
  using Ex = SwiGLUExperts<X, S>;
  const int tokens = 19, experts = 8, k = 2;
  MoELayer<R, Ex> layer(R({8, experts, k, 1234}), Ex({experts, 8, 12}));
  fill_normal(layer.parameters(), 0.3, 3);
  Matrix<S, X> x("x", tokens, 8), y_eval("y_eval", tokens, 8), y_train("y_train", tokens, 8);
  fill_normal(x, 1.0, 4);
  RouteContext<X> context;
  const auto eval_stats = layer.forward(x, y_eval, context);
  RefMatrix gate = to_ref(layer.router().gate().weight());
  RefRouterConfig rc;
  rc.kind = RouterKind::noisy_topk;
  rc.experts = experts;
  rc.top_k = k;
  CHECK(compare_forward(layer, rc, x, y_eval, eval_stats, &gate).output_error < 1e-6);

  context.training = true;
  context.step = 3;
  const auto train_stats = layer.forward(x, y_train, context);
  RefMatrix noise(tokens, experts), noise_logits(tokens, experts);
  const RefMatrix xr = to_ref(x), wn = to_ref(layer.router().noise_gate().weight());
  for (int t = 0; t < tokens; ++t)
    for (int e = 0; e < experts; ++e) {
      noise(t, e) = R::noise(1234, 3, t, e);
      for (int h = 0; h < 8; ++h) noise_logits(t, e) += xr(t, h) * wn(e, h);
    }
  const auto cmp =
      compare_forward(layer, rc, x, y_train, train_stats, &gate, nullptr, &noise, &noise_logits);
  CHECK(cmp.output_error < 1e-6);
  CHECK(relative_error(to_ref(y_train), to_ref(y_eval)) > 1e-3);  // the noise changed something
}

TEMPLATE_LIST_TEST_CASE("expert choice and hash routing", "[router]", ExecutionSpaces) {
  using X = TestType;
  const int tokens = GENERATE(1, 10, 33);
  const double cf = GENERATE(0.5, 1.0, 2.0);
  {
    using R = ExpertChoiceRouter<X, double>;
    using Ex = SwiGLUExperts<X, double>;
    MoELayer<R, Ex> layer(R({8, 4, cf}), Ex({4, 8, 6}));
    RefRouterConfig rc;
    rc.kind = RouterKind::expert_choice;
    rc.experts = 4;
    rc.ec_capacity_factor = cf;
    check_layer(layer, rc, tokens, 40 + tokens);
  }
  {
    using R = HashRouter<X, float>;
    using Ex = FFNExperts<X, float, activation::Relu>;
    MoELayer<R, Ex> layer(R({8, 5, 99}), Ex({5, 8, 6, true}));
    RefRouterConfig rc;
    rc.kind = RouterKind::hash;
    rc.experts = 5;
    rc.hash_seed = 99;
    check_layer(layer, rc, tokens, 50 + tokens);
  }
}

namespace {

/// docs/semantics.md section 4 in plain loops from the logits: f_i = count_i / (T k) over the chosen
/// experts, P_i = mean over tokens of p (softmax; normalised sigmoid for sigmoid routers),
/// L_aux = alpha E sum f P, the sequence-wise term the mean of the same over blocks of
/// `seq_len` tokens, L_z = beta mean_t logsumexp(l_t)^2.
BalanceLosses reference_losses(const RefMatrix& logits, const RefRouting& routing, int top_k,
                               bool sigmoid, const BalanceLossConfig& c) {
  const int T = logits.rows, E = logits.cols;
  RefMatrix p(T, E);
  for (int t = 0; t < T; ++t) {
    double sum = 0, largest = logits(t, 0);
    for (int e = 0; e < E; ++e) largest = std::max(largest, logits(t, e));
    for (int e = 0; e < E; ++e)
      sum += p(t, e) =
          sigmoid ? 1 / (1 + std::exp(-logits(t, e))) : std::exp(logits(t, e) - largest);
    for (int e = 0; e < E; ++e) p(t, e) /= sum;
  }
  const auto term = [&](int first, int count) {
    double total = 0;
    for (int e = 0; e < E; ++e) {
      double chosen = 0, mean_p = 0;
      for (int t = first; t < first + count; ++t) {
        for (int x : routing.expert[t]) chosen += x == e;
        mean_p += p(t, e) / count;
      }
      total += chosen / (double(count) * top_k) * mean_p;
    }
    return E * total;
  };
  BalanceLosses out;
  out.switch_aux = c.switch_aux * term(0, T);
  double sequences = 0;
  for (int first = 0; first < T; first += c.sequence_length)
    sequences += term(first, c.sequence_length);
  out.sequence_aux = c.sequence_aux * sequences / (T / c.sequence_length);
  double z = 0;
  for (int t = 0; t < T; ++t) {
    double largest = logits(t, 0), sum = 0;
    for (int e = 0; e < E; ++e) largest = std::max(largest, logits(t, e));
    for (int e = 0; e < E; ++e) sum += std::exp(logits(t, e) - largest);
    z += std::pow(largest + std::log(sum), 2) / T;
  }
  out.z_loss = c.z_loss * z;
  return out;
}

template <class Layer>
void check_losses(Layer& layer, const RefRouterConfig& rc, int tokens, bool sigmoid,
                  std::uint64_t seed) {
  using X = typename Layer::execution_space;
  using S = typename Layer::scalar_type;
  fill_normal(layer.parameters(), 0.5, seed);
  Matrix<S, X> x("x", tokens, layer.hidden_size()), y("y", tokens, layer.hidden_size());
  fill_normal(x, 1.0, seed + 1);
  const auto stats = layer.forward(x, y);
  const RefMatrix logits = to_ref(layer.routing().logits);
  const RefRouting routing = ref_route(rc, logits);
  const auto expected =
      reference_losses(logits, routing, rc.top_k, sigmoid, layer.options().losses);
  const double tolerance = std::is_same_v<S, float> ? 1e-5 : 1e-12;
  CAPTURE(tokens, sigmoid);
  CHECK(stats.losses.switch_aux == Catch::Approx(expected.switch_aux).epsilon(tolerance));
  CHECK(stats.losses.sequence_aux == Catch::Approx(expected.sequence_aux).epsilon(tolerance));
  CHECK(stats.losses.z_loss == Catch::Approx(expected.z_loss).epsilon(tolerance));
  // Three sequences that differ: the sequence-wise term is not the batch-wide one.
  CHECK(stats.losses.sequence_aux / layer.options().losses.sequence_aux !=
        Catch::Approx(stats.losses.switch_aux / layer.options().losses.switch_aux).epsilon(1e-6));
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("balance losses equal a plain-loop computation from the logits", "[losses]",
                        ExecutionSpaces) {
  using X = TestType;
  LayerOptions options;
  options.losses = {0.5, 0.25, 7, 0.125};  // three sequences of 7 tokens
  constexpr int tokens = 21;
  RefRouterConfig rc;
  rc.experts = 6;
  rc.top_k = 2;
  {
    using R = SoftmaxTopKRouter<X, double>;
    using Ex = SwiGLUExperts<X, double>;
    rc.normalize = true;
    MoELayer<R, Ex> layer(R({10, 6, 2, true}), Ex({6, 10, 8}), options);
    check_losses(layer, rc, tokens, false, 41);
  }
  {
    using R = SoftmaxTopKRouter<X, float>;
    using Ex = SwiGLUExperts<X, float>;
    MoELayer<R, Ex> layer(R({10, 6, 2, true}), Ex({6, 10, 8}), options);
    check_losses(layer, rc, tokens, false, 43);
  }
  {
    using R = SigmoidBiasRouter<X, double>;
    using Ex = SwiGLUExperts<X, double>;
    rc.kind = RouterKind::sigmoid_bias;
    rc.bias.assign(6, 0.0);
    MoELayer<R, Ex> layer(R({10, 6, 2, true}), Ex({6, 10, 8}), options);
    check_losses(layer, rc, tokens, true, 47);
  }
}
