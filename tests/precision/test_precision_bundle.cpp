// SPDX-License-Identifier: BSD-3-Clause
// Every router, expert and combiner takes a Precision bundle where it takes a bare Scalar
// (kmoe/precision.hpp): the policies name the bundle's storage as their scalar_type and
// the bundle itself as their precision_type, a layer of Precision<S> policies computes the
// bits of the bare-S layer (float, double and bfloat16, forward and backward), a
// communication type of bf16 over float storage turns the exchange compression on (the
// cross-rank effect is in tests/mpi/test_mpi_compressed_dispatch.cpp), and a 16-bit layer
// refuses the compression option, naming it.
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <kmoe/experts/packed_glu.hpp>

#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "support/layer_check.hpp"
#include "support/spaces.hpp"

using namespace kmoe;
using namespace kmoe::test;

namespace {

constexpr int tokens = 20, hidden = 12, ffn = 10, experts = 5, top_k = 2;

using H = Kokkos::DefaultHostExecutionSpace;
using Bf16 = Precision<bfloat16>;

template <class Policy, class Storage, class Bundle>
constexpr bool names_bundle_v = std::is_same_v<typename Policy::scalar_type, Storage>&&
    std::is_same_v<typename Policy::precision_type, Bundle>;

static_assert(names_bundle_v<SoftmaxTopKRouter<H, Bf16>, bfloat16, Bf16>);
static_assert(names_bundle_v<TopKSoftmaxRouter<H, Bf16>, bfloat16, Bf16>);
static_assert(names_bundle_v<SigmoidBiasRouter<H, Bf16>, bfloat16, Bf16>);
static_assert(names_bundle_v<NoisyTopKRouter<H, Bf16>, bfloat16, Bf16>);
static_assert(names_bundle_v<ExpertChoiceRouter<H, Bf16>, bfloat16, Bf16>);
static_assert(names_bundle_v<HashRouter<H, Bf16>, bfloat16, Bf16>);
static_assert(names_bundle_v<SparseMixerRouter<H, Bf16>, bfloat16, Bf16>);
static_assert(names_bundle_v<SwiGLUExperts<H, Bf16>, bfloat16, Bf16>);
static_assert(names_bundle_v<FFNExperts<H, Bf16>, bfloat16, Bf16>);
static_assert(names_bundle_v<ClampedSwiGLUExperts<H, Precision<float>>, float, Precision<float>>);
static_assert(
    names_bundle_v<PackedGLUExperts<H, Precision<float>, bfloat16>, float, Precision<float>>);
static_assert(names_bundle_v<WeightedSumCombiner<H, Bf16>, bfloat16, Bf16>);
// A bare Scalar is Precision<Scalar>, and the layer takes its router's bundle.
static_assert(names_bundle_v<SoftmaxTopKRouter<H, double>, double, Precision<double>>);
static_assert(std::is_same_v<
              MoELayer<SoftmaxTopKRouter<H, Bf16>, SwiGLUExperts<H, Bf16>>::precision_type, Bf16>);

template <class View>
std::vector<unsigned char> bytes_of(const View& v) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  std::vector<unsigned char> out(h.size() * sizeof(typename View::value_type));
  if (!out.empty()) std::memcpy(out.data(), h.data(), out.size());
  return out;
}

/// Forward and backward of two layers given the same parameters, input and output
/// gradient; every result must have the same bytes.
template <class A, class B>
void check_same_bits(A& a, B& b, std::uint64_t seed) {
  using X = typename A::execution_space;
  using S = typename A::scalar_type;
  static_assert(std::is_same_v<S, typename B::scalar_type>);
  const auto pa = a.parameters(), pb = b.parameters();
  REQUIRE(pa.size() == pb.size());
  fill_normal(pa, 0.3, seed);
  for (std::size_t i = 0; i < pa.size(); ++i) Kokkos::deep_copy(pb[i].value, pa[i].value);
  Matrix<S, X> x("x", tokens, hidden), g("g", tokens, hidden);
  Matrix<S, X> ya("ya", tokens, hidden), yb("yb", tokens, hidden);
  Matrix<S, X> gxa("gxa", tokens, hidden), gxb("gxb", tokens, hidden);
  fill_normal(x, 1.0, seed + 1);
  fill_normal(g, 1.0, seed + 2);
  RouteContext<X> context;
  context.training = true;
  a.forward(x, ya, context);
  b.forward(x, yb, context);
  CHECK(bytes_of(ya) == bytes_of(yb));
  zero_gradients(pa);
  zero_gradients(pb);
  a.backward(g, gxa);
  b.backward(g, gxb);
  CHECK(bytes_of(gxa) == bytes_of(gxb));
  for (std::size_t i = 0; i < pa.size(); ++i) {
    CAPTURE(pa[i].name);
    CHECK(bytes_of(pa[i].grad) == bytes_of(pb[i].grad));
  }
}

template <class X, class S>
void bare_and_bundle_agree() {
  LayerOptions options;
  options.losses.switch_aux = 1e-2;
  options.losses.z_loss = 1e-4;
  {
    using P = Precision<S>;
    MoELayer<SoftmaxTopKRouter<X, S>, SwiGLUExperts<X, S>> bare(
        SoftmaxTopKRouter<X, S>({hidden, experts, top_k}),
        SwiGLUExperts<X, S>({experts, hidden, ffn}), options);
    MoELayer<SoftmaxTopKRouter<X, P>, SwiGLUExperts<X, P>> bundle(
        SoftmaxTopKRouter<X, P>({hidden, experts, top_k}),
        SwiGLUExperts<X, P>({experts, hidden, ffn}), options);
    check_same_bits(bare, bundle, 11);
  }
  {
    using P = Precision<S>;
    const ExpertShape shape{experts, hidden, ffn, true};
    const ExpertShape shared{1, hidden, ffn, true};
    MoELayer<SigmoidBiasRouter<X, S>, FFNExperts<X, S>> bare(
        SigmoidBiasRouter<X, S>({hidden, experts, top_k}), FFNExperts<X, S>(shape), options,
        FFNExperts<X, S>(shared, "shared_experts"));
    MoELayer<SigmoidBiasRouter<X, P>, FFNExperts<X, P>> bundle(
        SigmoidBiasRouter<X, P>({hidden, experts, top_k}), FFNExperts<X, P>(shape), options,
        FFNExperts<X, P>(shared, "shared_experts"));
    check_same_bits(bare, bundle, 21);
  }
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("a layer of Precision<S> policies computes the bare S layer's bits",
                        "[precision]", ExecutionSpaces) {
  using X = TestType;
  SECTION("float") { bare_and_bundle_agree<X, float>(); }
  SECTION("double") { bare_and_bundle_agree<X, double>(); }
  SECTION("bfloat16") { bare_and_bundle_agree<X, bfloat16>(); }
}

TEMPLATE_LIST_TEST_CASE("a Precision's communication type chooses the exchange compression",
                        "[precision]", ExecutionSpaces) {
  using X = TestType;
  using Wire = Precision<float, float, float, bfloat16>;
  using WireLayer = MoELayer<SoftmaxTopKRouter<X, Wire>, SwiGLUExperts<X, Wire>>;
  WireLayer wire(SoftmaxTopKRouter<X, Wire>({hidden, experts, top_k}),
                 SwiGLUExperts<X, Wire>({experts, hidden, ffn}));
  CHECK(wire.options().exchange_compression == WireCompression::bf16);
  // One rank exchanges nothing: the float layer's bits.
  MoELayer<SoftmaxTopKRouter<X, float>, SwiGLUExperts<X, float>> plain(
      SoftmaxTopKRouter<X, float>({hidden, experts, top_k}),
      SwiGLUExperts<X, float>({experts, hidden, ffn}));
  check_same_bits(plain, wire, 31);

  LayerOptions fp16;
  fp16.exchange_compression = WireCompression::fp16;
  CHECK_THROWS_WITH(WireLayer(SoftmaxTopKRouter<X, Wire>({hidden, experts, top_k}),
                              SwiGLUExperts<X, Wire>({experts, hidden, ffn}), fp16),
                    Catch::Matchers::ContainsSubstring("options.exchange_compression") &&
                        Catch::Matchers::ContainsSubstring("communication type is bf16"));
}

TEMPLATE_LIST_TEST_CASE("a 16-bit layer refuses the exchange compression option, naming it",
                        "[precision]", ExecutionSpaces) {
  using X = TestType;
  LayerOptions options;
  options.exchange_compression = WireCompression::bf16;
  using Layer = MoELayer<SoftmaxTopKRouter<X, bfloat16>, SwiGLUExperts<X, bfloat16>>;
  CHECK_THROWS_WITH(Layer(SoftmaxTopKRouter<X, bfloat16>({hidden, experts, top_k}),
                          SwiGLUExperts<X, bfloat16>({experts, hidden, ffn}), options),
                    Catch::Matchers::ContainsSubstring("options.exchange_compression") &&
                        Catch::Matchers::ContainsSubstring("already travel in 16 bits"));
}
