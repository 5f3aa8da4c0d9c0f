// SPDX-License-Identifier: BSD-3-Clause
// Randomized differential testing: a fixed set of random layer configurations (router, expert
// kind, capacity rule, shapes, scalar, shared expert, host execution space), each compared to
// the plain-loop reference and checked for the dispatch accounting invariants. Every
// configuration is derived from its own 64-bit seed, printed on failure; set
// KMOE_FUZZ_SEED=<seed> to replay just that configuration.
#include <catch2/catch_test_macros.hpp>

#include <cstdlib>
#include <sstream>
#include <string>

#include "support/layer_check.hpp"
#include "support/spaces.hpp"

using namespace kmoe;
using namespace kmoe::test;

namespace {

// 300 configurations take a few seconds on 2 cores (shapes are at most 64 x 16); the
// base seed is fixed so that CI runs the same set every time.
constexpr int fuzz_configurations = 300;
constexpr std::uint64_t fuzz_base_seed = 0x6b6d6f6566757a7aULL;

enum class ExpertPick { ffn_relu, ffn_gelu, ffn_silu, swiglu };
const char* const router_names[] = {"softmax_topk", "topk_softmax",  "sigmoid_bias",
                                    "noisy_topk",   "expert_choice", "hash"};
const char* const expert_names[] = {"ffn_relu", "ffn_gelu", "ffn_silu", "swiglu"};

using HostSpaces = type_list_cat<SerialSpaces, OpenMPSpaces>::type;

struct FuzzConfig {
  std::uint64_t seed = 0;
  RefRouterConfig router;
  ExpertPick expert = ExpertPick::swiglu;
  bool bias = false, shared = false, use_double = true, training = false;
  int space = 0;  // index into HostSpaces
  int tokens = 0, hidden = 1, ffn = 1;
  Capacity capacity;
};

/// Deterministic generator local to one configuration (splitmix64 stream).
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() { return state_ = ref_splitmix64(state_); }
  int uniform(int lo, int hi) { return lo + int(next() % std::uint64_t(hi - lo + 1)); }
  bool coin() { return next() & 1; }
  double real(double lo, double hi) { return lo + (hi - lo) * double(next() >> 11) * 0x1.0p-53; }

 private:
  std::uint64_t state_;
};

/// Divisors of n, for the number of expert groups.
std::vector<int> divisors(int n) {
  std::vector<int> out;
  for (int d = 1; d <= n; ++d)
    if (n % d == 0) out.push_back(d);
  return out;
}

FuzzConfig make_config(std::uint64_t seed) {
  Rng rng(seed);
  FuzzConfig c;
  c.seed = seed;
  auto& r = c.router;
  const RouterKind kinds[] = {RouterKind::softmax_topk, RouterKind::topk_softmax,
                              RouterKind::sigmoid_bias, RouterKind::expert_choice,
                              RouterKind::hash};
  r.kind = kinds[rng.uniform(0, 4)];
  r.experts = rng.uniform(1, 16);
  r.top_k = rng.uniform(1, r.experts);
  r.normalize = rng.coin();
  r.scale = rng.coin() ? 1.0 : rng.real(0.5, 3.0);
  if (r.kind == RouterKind::softmax_topk || r.kind == RouterKind::sigmoid_bias) {
    if (rng.coin()) {  // group-limited: n_group | E, top_k within the eligible groups
      const auto d = divisors(r.experts);
      r.n_group = d[rng.uniform(0, int(d.size()) - 1)];
      r.topk_group = rng.uniform(1, r.n_group);
      r.group_terms = rng.uniform(1, 3);
      r.top_k = rng.uniform(1, r.topk_group * (r.experts / r.n_group));
    }
  }
  if (r.kind == RouterKind::sigmoid_bias)
    for (int e = 0; e < r.experts; ++e) r.bias.push_back(rng.real(-0.3, 0.3));
  if (r.kind == RouterKind::expert_choice) r.ec_capacity_factor = rng.real(0.25, 2.5);
  if (r.kind == RouterKind::hash) r.hash_seed = rng.next();
  if (r.kind == RouterKind::hash) r.top_k = 1;
  if (r.kind == RouterKind::expert_choice) r.top_k = r.experts;  // slots per token
  if (r.kind == RouterKind::topk_softmax || r.kind == RouterKind::expert_choice ||
      r.kind == RouterKind::hash) {
    r.normalize = false;
    r.scale = 1.0;
  }
  c.expert = ExpertPick(rng.uniform(0, 3));
  c.bias = c.expert != ExpertPick::swiglu && rng.coin();
  c.shared = rng.coin();
  c.use_double = rng.coin();
  c.training = rng.coin();
  c.space = rng.uniform(0, int(std::tuple_size_v<HostSpaces>) - 1);
  c.tokens = rng.uniform(0, 64);
  c.hidden = rng.uniform(1, 16);
  c.ffn = rng.uniform(1, 16);
  switch (rng.uniform(0, 2)) {
    case 0:
      break;  // dropless
    case 1:
      c.capacity = {rng.real(0.1, 2.0), rng.uniform(0, 4), DropPolicy::by_probability,
                    rng.uniform(1, 8)};
      break;
    default:
      c.capacity = {rng.real(0.1, 2.0), rng.uniform(0, 4), DropPolicy::by_position,
                    rng.uniform(1, 8)};
      break;
  }
  return c;
}

std::string describe(const FuzzConfig& c) {
  std::ostringstream os;
  const auto& r = c.router;
  os << "KMOE_FUZZ_SEED=" << c.seed << "\n  router " << router_names[int(r.kind)]
     << " E=" << r.experts << " k=" << r.top_k << " normalize=" << r.normalize
     << " scale=" << r.scale << " n_group=" << r.n_group << " topk_group=" << r.topk_group
     << " group_terms=" << r.group_terms << " ec_factor=" << r.ec_capacity_factor
     << " hash_seed=" << r.hash_seed << " bias=[";
  for (double b : r.bias) os << b << ' ';
  os << "]\n  experts " << expert_names[int(c.expert)] << " H=" << c.hidden << " F=" << c.ffn
     << " bias=" << c.bias << " shared=" << c.shared << "\n  T=" << c.tokens
     << " scalar=" << (c.use_double ? "double" : "float") << " training=" << c.training
     << " space=" << c.space << "\n  capacity factor=" << c.capacity.factor
     << " minimum=" << c.capacity.minimum << " drop="
     << (c.capacity.drop == DropPolicy::by_probability ? "by_probability" : "by_position")
     << " alignment=" << c.capacity.alignment;
  return os.str();
}

template <class X, class S>
Matrix<S, X> nan_filled(const char* label, int rows, int cols) {
  Matrix<S, X> m{std::string(label), std::size_t(rows), std::size_t(cols)};
  Kokkos::deep_copy(m, std::numeric_limits<S>::quiet_NaN());
  return m;
}

template <class View>
bool all_finite(const View& v) {
  const auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  for (std::size_t i = 0; i < h.size(); ++i)
    if (!std::isfinite(double(h.data()[i]))) return false;
  return true;
}

template <class Router>
Router make_router(const FuzzConfig& c) {
  const auto& r = c.router;
  using X = typename Router::execution_space;
  using S = typename Router::scalar_type;
  const GroupLimit group{r.n_group, r.topk_group, r.group_terms};
  if constexpr (std::is_same_v<Router, SoftmaxTopKRouter<X, S>>)
    return Router({c.hidden, r.experts, r.top_k, r.normalize, r.scale, group});
  if constexpr (std::is_same_v<Router, TopKSoftmaxRouter<X, S>>)
    return Router({c.hidden, r.experts, r.top_k});
  if constexpr (std::is_same_v<Router, SigmoidBiasRouter<X, S>>)
    return Router({c.hidden, r.experts, r.top_k, r.normalize, r.scale, group});
  if constexpr (std::is_same_v<Router, ExpertChoiceRouter<X, S>>)
    return Router({c.hidden, r.experts, r.ec_capacity_factor});
  if constexpr (std::is_same_v<Router, HashRouter<X, S>>)
    return Router({c.hidden, r.experts, r.hash_seed});
}

template <class R>
using gate_of = decltype(std::declval<R&>().gate());

/// One configuration: forward against the reference, accounting, and (in training) a
/// backward that must write every element of grad_x.
template <class Router, class Experts>
void run_config(const FuzzConfig& c) {
  using X = typename Router::execution_space;
  using S = typename Router::scalar_type;
  const auto& r = c.router;
  std::optional<Experts> shared;
  if (c.shared) shared = Experts({1, c.hidden, c.ffn, c.bias}, "shared_experts");
  LayerOptions options;
  options.capacity = c.capacity;
  MoELayer<Router, Experts> layer(make_router<Router>(c),
                                  Experts({r.experts, c.hidden, c.ffn, c.bias}), options, shared);
  fill_normal(layer.parameters(), 0.3, c.seed);
  if constexpr (std::is_same_v<Router, SigmoidBiasRouter<X, S>>) {
    auto bias = Kokkos::create_mirror_view(layer.router().bias());
    for (int e = 0; e < r.experts; ++e) bias(e) = S(r.bias[e]);
    Kokkos::deep_copy(layer.router().bias(), bias);
  }
  Matrix<S, X> x("x", c.tokens, c.hidden);
  fill_normal(x, 1.0, c.seed ^ 0x5eed);
  auto y = nan_filled<X, S>("y", c.tokens, c.hidden);
  std::vector<std::int64_t> ids_host(c.tokens);
  for (int t = 0; t < c.tokens; ++t) ids_host[t] = std::int64_t(ref_splitmix64(c.seed + t) % 50000);
  Vector<std::int64_t, X> ids("ids", c.tokens);
  Kokkos::deep_copy(ids, Kokkos::View<std::int64_t*, Kokkos::HostSpace>(ids_host.data(), c.tokens));
  RouteContext<X> context;
  context.training = c.training;
  context.token_ids = ids;

  const auto stats = layer.forward(x, y, context);

  // Each token's output is written exactly once: no NaN from the fill survives.
  CHECK(all_finite(y));
  RefMatrix gate;
  constexpr bool with_gate = detail::is_detected_v<gate_of, Router>;
  if constexpr (with_gate) gate = to_ref(layer.router().gate().weight());
  const auto cmp = compare_forward(layer, r, x, y, stats, with_gate ? &gate : nullptr, &ids_host);
  CHECK(cmp.logit_error < tolerance<S>());
  CHECK(cmp.output_error < tolerance<S>());

  // Accounting: assignments are T * k for token choice (E * C for expert choice), kept +
  // dropped = assignments, and the kept assignments own the rows 0 .. kept-1 once each.
  std::int64_t expected = std::int64_t(c.tokens) * r.top_k;
  if (r.kind == RouterKind::expert_choice) {
    const int per_expert =
        std::min<int>(c.tokens, int(std::ceil(c.tokens * r.ec_capacity_factor / r.experts)));
    expected = std::int64_t(r.experts) * per_expert;
  }
  CHECK(stats.assignments == expected);
  const auto position = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.positions());
  std::vector<int> rows;
  for (std::size_t t = 0; t < position.extent(0); ++t)
    for (std::size_t s = 0; s < position.extent(1); ++s)
      if (position(t, s) >= 0) rows.push_back(position(t, s));
  CHECK(std::int64_t(rows.size()) + stats.dropped == stats.assignments);
  std::sort(rows.begin(), rows.end());
  bool rows_are_a_permutation = true;
  for (std::size_t i = 0; i < rows.size(); ++i) rows_are_a_permutation &= rows[i] == int(i);
  CHECK(rows_are_a_permutation);
  // No expert keeps more than the capacity; dropless drops nothing.
  const auto expert =
      Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.routing().expert);
  std::vector<std::int64_t> kept_per_expert(r.experts, 0);
  for (std::size_t t = 0; t < position.extent(0); ++t)
    for (std::size_t s = 0; s < position.extent(1); ++s)
      if (position(t, s) >= 0) ++kept_per_expert[expert(t, s)];
  if (c.capacity.dropless()) {
    CHECK(stats.capacity == -1);
    CHECK(stats.dropped == 0);
  } else {
    CHECK(stats.capacity >= c.capacity.minimum);
    CHECK(*std::max_element(kept_per_expert.begin(), kept_per_expert.end()) <= stats.capacity);
  }

  if (c.training) {
    Matrix<S, X> grad_y("grad_y", c.tokens, c.hidden);
    fill_normal(grad_y, 1.0, c.seed ^ 0x9a1d);
    auto grad_x = nan_filled<X, S>("grad_x", c.tokens, c.hidden);
    layer.zero_gradients();
    layer.backward(grad_y, grad_x);
    CHECK(all_finite(grad_x));
    for (const auto& p : layer.parameters()) {
      INFO("gradient of " << p.name);
      CHECK(all_finite(p.grad));
    }
  }
}

template <class X, class S, class Router>
void dispatch_expert(const FuzzConfig& c) {
  switch (c.expert) {
    case ExpertPick::ffn_relu:
      return run_config<Router, FFNExperts<X, S, activation::Relu>>(c);
    case ExpertPick::ffn_gelu:
      return run_config<Router, FFNExperts<X, S, activation::GeluErf>>(c);
    case ExpertPick::ffn_silu:
      return run_config<Router, FFNExperts<X, S, activation::Silu>>(c);
    case ExpertPick::swiglu:
      return run_config<Router, SwiGLUExperts<X, S>>(c);
  }
}

template <class X, class S>
void dispatch_router(const FuzzConfig& c) {
  switch (c.router.kind) {
    case RouterKind::softmax_topk:
      return dispatch_expert<X, S, SoftmaxTopKRouter<X, S>>(c);
    case RouterKind::topk_softmax:
      return dispatch_expert<X, S, TopKSoftmaxRouter<X, S>>(c);
    case RouterKind::sigmoid_bias:
      return dispatch_expert<X, S, SigmoidBiasRouter<X, S>>(c);
    case RouterKind::expert_choice:
      return dispatch_expert<X, S, ExpertChoiceRouter<X, S>>(c);
    case RouterKind::hash:
      return dispatch_expert<X, S, HashRouter<X, S>>(c);
    case RouterKind::noisy_topk:
      break;  // its noise has its own test; not drawn here
  }
}

template <std::size_t I = 0>
void dispatch_space(const FuzzConfig& c) {
  if constexpr (I < std::tuple_size_v<HostSpaces>) {
    using X = std::tuple_element_t<I, HostSpaces>;
    if (c.space != int(I)) return dispatch_space<I + 1>(c);
    if (c.use_double)
      dispatch_router<X, double>(c);
    else
      dispatch_router<X, float>(c);
  }
}

void run_seed(std::uint64_t seed) {
  const FuzzConfig c = make_config(seed);
  INFO(describe(c));
  try {
    dispatch_space(c);
  } catch (const std::exception& e) {
    FAIL_CHECK("unexpected exception: " << e.what());
  }
}

}  // namespace

TEST_CASE("random layer configurations match the reference and keep the accounting",
          "[randomized]") {
  if (const char* replay = std::getenv("KMOE_FUZZ_SEED")) {
    run_seed(std::strtoull(replay, nullptr, 0));
    return;
  }
  for (int i = 0; i < fuzz_configurations; ++i)
    run_seed(ref_splitmix64(fuzz_base_seed + std::uint64_t(i)));
}
