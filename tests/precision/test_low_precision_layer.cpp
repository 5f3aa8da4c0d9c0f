// SPDX-License-Identifier: BSD-3-Clause
// A layer stored in bf16 / fp16 against the fp32 layer run on the same 16-bit-rounded
// inputs and weights: the routing is the same decision (logits are computed in fp32 from
// the same values), and the outputs, the input gradient and every parameter gradient agree
// within a tolerance derived from the storage's unit roundoff u (bf16 2^-8, fp16 2^-11).
//
// Tolerance. The 16-bit layer rounds each stored value once, to within u relative: along
// an expert's forward the projections (gate, up), the hidden activation, the expert output
// and the combined output, 5 roundings; backward adds as many again. An error of u on
// each term of a sum of n terms of either sign moves the sum by up to u * sum |terms|,
// which for random weights is about sqrt(n) times |sum|; measured against the largest
// output the combined bound is 5 * sqrt(F) u forward and 10 * sqrt(F) u for gradients
// (F = 16 here, so 20u and 40u).
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>

#include <cmath>
#include <optional>
#include <tuple>

#include "support/layer_check.hpp"
#include "support/spaces.hpp"

using namespace kmoe;
using namespace kmoe::test;

namespace {

constexpr int tokens = 24, hidden = 16, ffn = 16, experts = 6, top_k = 2;

template <class Storage>
constexpr double unit_roundoff() {
  return std::is_same_v<Storage, bfloat16> ? 1.0 / 256 : 1.0 / 2048;
}

/// The values of a float view rounded to Storage, into `to` (Storage) and back into `from`.
template <class Storage, class From, class To>
void round_into(const From& from, const To& to) {
  auto f = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), from);
  auto t = Kokkos::create_mirror_view(to);
  for (std::size_t i = 0; i < f.size(); ++i) {
    t.data()[i] = Storage(f.data()[i]);
    f.data()[i] = float(t.data()[i]);
  }
  Kokkos::deep_copy(to, t);
  Kokkos::deep_copy(from, f);
}

template <class View>
std::vector<double> host_values(const View& v) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  std::vector<double> out(h.size());
  for (std::size_t i = 0; i < h.size(); ++i) out[i] = double(float(h.data()[i]));
  return out;
}

/// max |a - b| / max |b|.
inline double relative_difference(const std::vector<double>& a, const std::vector<double>& b) {
  double diff = 0, scale = 1e-30;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return diff / scale;
}

/// Runs forward and backward of a 16-bit layer and of its fp32 twin on the same rounded
/// parameters, input and output gradient, and compares (the gradients unless
/// `compare_gradients` is false).
template <class Storage, class Wide, class Narrow>
void compare_layers(Wide& wide, Narrow& narrow, std::uint64_t seed, bool compare_gradients = true) {
  using X = typename Wide::execution_space;
  const double u = unit_roundoff<Storage>();
  const double forward_bound = 5 * std::sqrt(double(ffn)) * u;
  const double backward_bound = 10 * std::sqrt(double(ffn)) * u;
  const auto wide_parameters = wide.parameters();
  const auto narrow_parameters = narrow.parameters();
  REQUIRE(wide_parameters.size() == narrow_parameters.size());
  fill_normal(wide_parameters, 0.3, seed);
  for (std::size_t i = 0; i < wide_parameters.size(); ++i)
    round_into<Storage>(wide_parameters[i].value, narrow_parameters[i].value);

  Matrix<float, X> x("x", tokens, hidden), y("y", tokens, hidden), g("g", tokens, hidden),
      grad_x("grad_x", tokens, hidden);
  Matrix<Storage, X> x16("x16", tokens, hidden), y16("y16", tokens, hidden),
      g16("g16", tokens, hidden), grad_x16("grad_x16", tokens, hidden);
  fill_normal(x, 1.0, seed + 1);
  fill_normal(g, 1.0, seed + 2);
  round_into<Storage>(x, x16);
  round_into<Storage>(g, g16);

  Vector<std::int64_t, X> ids("ids", tokens);
  auto ids_host = Kokkos::create_mirror_view(ids);
  for (int t = 0; t < tokens; ++t) ids_host(t) = 17 * t + 3;
  Kokkos::deep_copy(ids, ids_host);
  RouteContext<X> context;
  context.training = true;
  context.token_ids = ids;
  context.step = 5;
  const auto wide_stats = wide.forward(x, y, context);
  const auto narrow_stats = narrow.forward(x16, y16, context);
  // The same routing decision: the logits come from the same values through fp32 sums.
  CHECK(host_values(wide.routing().expert) == host_values(narrow.routing().expert));
  CHECK(wide_stats.tokens_per_expert == narrow_stats.tokens_per_expert);
  CHECK(wide_stats.dropped == narrow_stats.dropped);
  // The balance losses are computed from the same fp32 routing tables.
  CHECK(wide_stats.losses.total() == narrow_stats.losses.total());
  const double output_error = relative_difference(host_values(y16), host_values(y));
  CAPTURE(output_error, forward_bound);
  CHECK(output_error < forward_bound);
  // Not equal either: the 16-bit layer does round its intermediate values.
  CHECK(output_error > 0);
  if (!compare_gradients) return;

  zero_gradients(wide_parameters);
  zero_gradients(narrow_parameters);
  wide.backward(g, grad_x);
  narrow.backward(g16, grad_x16);
  const double input_gradient_error =
      relative_difference(host_values(grad_x16), host_values(grad_x));
  CAPTURE(input_gradient_error, backward_bound);
  CHECK(input_gradient_error < backward_bound);
  for (std::size_t i = 0; i < wide_parameters.size(); ++i) {
    const double error = relative_difference(host_values(narrow_parameters[i].grad),
                                             host_values(wide_parameters[i].grad));
    CAPTURE(wide_parameters[i].name, error, backward_bound);
    CHECK(error < backward_bound);
  }
}

/// Builds the fp32 and the 16-bit layer of one router and expert kind (GLU shared experts
/// with Qwen2-MoE's output gate, FFN ones with biases) and compares them.
template <class X, class Storage, template <class, class> class Router,
          template <class, class> class Experts, class Config>
void check_case(const Config& config, const LayerOptions& options, bool shared,
                std::uint64_t seed) {
  using EW = Experts<X, float>;
  using EN = Experts<X, Storage>;
  constexpr bool ffn_kind = std::is_same_v<EW, FFNExperts<X, float>>;
  const ExpertShape shape{experts, hidden, ffn, ffn_kind};
  const ExpertShape shared_shape{1, hidden, ffn, ffn_kind, !ffn_kind};
  const auto shared_of = [&](auto kind) {
    using E = decltype(kind);
    return shared ? std::optional<E>(E(shared_shape, "shared_experts")) : std::nullopt;
  };
  MoELayer<Router<X, float>, EW> wide{Router<X, float>(config), EW(shape), options,
                                      shared_of(EW(shape))};
  MoELayer<Router<X, Storage>, EN> narrow{Router<X, Storage>(config), EN(shape), options,
                                          shared_of(EN(shape))};
  compare_layers<Storage>(wide, narrow, seed);
}

template <class X, class S>
using FFNGelu = FFNExperts<X, S>;

LayerOptions with_losses(int capacity_case) {
  LayerOptions o;
  o.losses.switch_aux = 1e-2;
  o.losses.z_loss = 1e-4;
  o.losses.kl_uniform = 1e-3;
  if (capacity_case == 1) o.capacity = {1.0, 0, DropPolicy::by_probability, 1};
  if (capacity_case == 2) o.capacity = {0.75, 2, DropPolicy::by_position, 4};
  o.training_mode = capacity_case == 2 ? ExpertMode::recompute : ExpertMode::store;
  return o;
}

template <class X, class S>
void every_router_and_expert_kind(int capacity_case) {
  const LayerOptions o = with_losses(capacity_case);
  check_case<X, S, SoftmaxTopKRouter, SwiGLUExperts>(SoftmaxTopKConfig{hidden, experts, top_k}, o,
                                                     false, 1);
  check_case<X, S, SoftmaxTopKRouter, SwiGLUExperts>(
      SoftmaxTopKConfig{hidden, experts, 3, false, 2.0, {3, 2, 2}}, o, true, 2);
  check_case<X, S, TopKSoftmaxRouter, GeGLUExperts>(TopKSoftmaxConfig{hidden, experts, top_k}, o,
                                                    false, 3);
  check_case<X, S, SigmoidBiasRouter, SwiGLUExperts>(
      SigmoidBiasConfig{hidden, experts, top_k, true, 2.5, {3, 2, 2}}, o, true, 4);
  check_case<X, S, NoisyTopKRouter, FFNGelu>(NoisyTopKConfig{hidden, experts, top_k, 77}, o, false,
                                             5);
  check_case<X, S, ExpertChoiceRouter, FFNGelu>(ExpertChoiceConfig{hidden, experts, 1.5}, o, true,
                                                6);
  check_case<X, S, HashRouter, SwiGLUExperts>(HashConfig{hidden, experts, 9}, o, false, 7);
  check_case<X, S, SparseMixerRouter, SwiGLUExperts>(SparseMixerConfig{hidden, experts}, o, false,
                                                     8);
}

/// GPT-OSS's experts (biases, the clamped SwiGLU) behind its router (top-k, then softmax).
/// The clamp's gradient jumps at its bounds (torch passes none from the bound on): a
/// pre-activation within a rounding of a bound can take the other branch in 16 bits than in
/// fp32 and change a whole gradient term, which no rounding tolerance covers. So gradients
/// are compared where nothing is clamped (GPT-OSS's limit 7 at these scales: pre-activations
/// have a standard deviation of about 1.2), and the forward also where the clamp is active
/// (limit 1.5 clamps about a fifth of the values; h is continuous there).
template <class X, class S>
void check_clamped_swiglu(const LayerOptions& options, double limit, bool compare_gradients,
                          std::uint64_t seed) {
  using EW = ClampedSwiGLUExperts<X, float>;
  using EN = ClampedSwiGLUExperts<X, S>;
  const ExpertShape shape{experts, hidden, ffn, true};
  const ClampedSwiGLU activation{1.702, limit};
  const TopKSoftmaxConfig config{hidden, experts, top_k};
  MoELayer<TopKSoftmaxRouter<X, float>, EW> wide{TopKSoftmaxRouter<X, float>(config),
                                                 EW(shape, activation), options};
  MoELayer<TopKSoftmaxRouter<X, S>, EN> narrow{TopKSoftmaxRouter<X, S>(config),
                                               EN(shape, activation), options};
  compare_layers<S>(wide, narrow, seed, compare_gradients);
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("bf16 and fp16 clamped SwiGLU (GPT-OSS) layers match the fp32 layer",
                        "[precision][layer]", ExecutionSpaces) {
  using X = TestType;
  const int capacity_case = GENERATE(0, 2);
  CAPTURE(capacity_case);
  const LayerOptions o = with_losses(capacity_case);
  SECTION("bf16") {
    check_clamped_swiglu<X, bfloat16>(o, 7.0, true, 11);
    check_clamped_swiglu<X, bfloat16>(o, 1.5, false, 12);
  }
  SECTION("fp16") {
    check_clamped_swiglu<X, float16>(o, 7.0, true, 11);
    check_clamped_swiglu<X, float16>(o, 1.5, false, 12);
  }
}

TEMPLATE_LIST_TEST_CASE("bf16 and fp16 layers match the fp32 layer on rounded values",
                        "[precision][layer]", ExecutionSpaces) {
  using X = TestType;
  const int capacity_case = GENERATE(0, 1, 2);
  CAPTURE(capacity_case);
  SECTION("bf16") { every_router_and_expert_kind<X, bfloat16>(capacity_case); }
  // fp16 differs from bf16 only in its conversions: dropless suffices to keep the test fast.
  if (capacity_case == 0) SECTION("fp16") {
      every_router_and_expert_kind<X, float16>(0);
    }
}
