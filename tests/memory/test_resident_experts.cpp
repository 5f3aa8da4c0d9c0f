// SPDX-License-Identifier: BSD-3-Clause
// kmoe::ResidentExperts against the all-resident layer: bitwise outputs over several
// forwards with 25% and 50% of the experts resident (so that experts are evicted and brought
// back), every router and expert kind, F32/F64 and BF16 stores, LRU and LFU, prefetch; the
// budget error; resident_bytes() within the budget; ZeRO-Offload-style training equal to
// all-resident training bitwise.
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <kmoe/kmoe.hpp>
#include <kmoe/memory/host_expert_store.hpp>
#include <kmoe/memory/resident_experts.hpp>

#include "support/spaces.hpp"

#include <cstring>
#include <set>
#include <vector>

using namespace kmoe;
using namespace kmoe::test;
using Catch::Matchers::ContainsSubstring;

namespace {

constexpr int hidden = 12, ffn = 10, experts = 8, top_k = 2;

template <class View>
std::vector<unsigned char> bits_of(const View& v) {
  const auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  std::vector<unsigned char> bits(host.span() * sizeof(typename View::value_type));
  std::memcpy(bits.data(), host.data(), bits.size());
  return bits;
}

template <class S>
constexpr StorageType own_storage() {
  return std::is_same_v<S, float> ? StorageType::f32 : StorageType::f64;
}

/// Rounds every value of `list` to bfloat16, so that a BF16 store holds them exactly.
template <class X, class S>
void round_to_bfloat16(const ParameterList<X, S>& list) {
  for (const auto& p : list) {
    auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), p.value);
    for (std::size_t i = 0; i < host.size(); ++i)
      host(i) = S(io::bfloat16_bits_to_float(io::to_bfloat16_bits(host(i))));
    Kokkos::deep_copy(p.value, host);
  }
}

/// The distinct experts the last forward of `layer` chose.
template <class Layer>
std::vector<int> chosen_experts(const Layer& layer) {
  const auto expert =
      Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.routing().expert);
  std::set<int> chosen(expert.data(), expert.data() + expert.size());
  return {chosen.begin(), chosen.end()};
}

struct Case {
  int slots = 2;
  int tokens = 1;
  StorageType storage = StorageType::f32;
  Eviction eviction = Eviction::lru;
  bool prefetch = false;
};

/// Runs `batches` forwards of the all-resident layer and of the resident one (sharing the
/// router) and checks each output bit for bit.
template <class X, class S, class Inner, class Router>
void check_inference(Router router, ExpertShape shape, const Case& c, std::uint64_t seed) {
  using Store = HostExpertStore<>;
  using Resident = ResidentExperts<Inner, Store>;
  const int batches = 12;
  MoELayer<Router, Inner> reference(router, Inner(shape));
  ParameterList<X, S> expert_parameters;
  reference.experts().collect_parameters(expert_parameters);
  fill_normal(expert_parameters, 0.3, seed);
  if (c.storage == StorageType::bf16) round_to_bfloat16(expert_parameters);
  ExpertShape slot_shape = shape;
  slot_shape.experts = c.slots;
  slot_shape.gradients = false;  // inference: the slots hold weights only
  MoELayer<Router, Resident> resident(
      router,
      Resident(Inner(slot_shape), Store::from_experts(reference.experts(), c.storage), c.eviction));
  const std::int64_t budget_bytes = std::int64_t(c.slots) * resident.experts().expert_bytes();

  std::vector<Matrix<S, X>> x, y_reference;
  std::vector<std::vector<int>> chosen;
  for (int b = 0; b < batches; ++b) {
    x.emplace_back("x", c.tokens, hidden);
    fill_normal(x.back(), 1.0, seed + 10 + b);
    y_reference.emplace_back("y_reference", c.tokens, hidden);
    reference.forward(x.back(), y_reference.back());
    chosen.push_back(chosen_experts(reference));
  }
  Matrix<S, X> y("y", c.tokens, hidden);
  for (int b = 0; b < batches; ++b) {
    CAPTURE(b, c.slots, c.tokens, int(c.storage), int(c.eviction), c.prefetch);
    // The hint for batch b + 1 is read while batch b computes.
    if (c.prefetch && b + 1 < batches) resident.experts().prefetch(chosen[b + 1]);
    const ForwardStats forward_stats = resident.forward(x[b], y);
    CHECK(bits_of(y) == bits_of(y_reference[b]));
    CHECK(std::int64_t(resident.experts().resident_bytes()) <= budget_bytes);
    // The layer's memory accounting reports the slots, not the experts in the store.
    CHECK(forward_stats.memory.expert_weights <= budget_bytes);
    CHECK(forward_stats.memory.expert_weights == std::int64_t(resident.experts().resident_bytes()));
  }
  const ResidencyStats& stats = resident.experts().residency_stats();
  CHECK(stats.forwards == batches);
  CHECK(stats.misses > c.slots);  // experts were evicted and brought in again
  CHECK(stats.loaded_bytes == stats.misses * resident.experts().expert_bytes());
  if (c.prefetch) CHECK(stats.prefetched > 0);
  if (c.storage == StorageType::bf16 && !c.prefetch)
    CHECK(stats.store_bytes * std::int64_t(sizeof(S)) == stats.loaded_bytes * 2);
}

template <class X, class S>
SigmoidBiasRouter<X, S> skewed_sigmoid_router() {
  SigmoidBiasConfig config;
  config.hidden = hidden, config.experts = experts, config.top_k = top_k;
  SigmoidBiasRouter<X, S> router(config);
  // Zipf-like popularity: a selection bias falling with the expert's rank.
  auto bias = Kokkos::create_mirror_view(router.bias());
  for (int e = 0; e < experts; ++e) bias(e) = S(0.5) / S(e + 1);
  Kokkos::deep_copy(router.bias(), bias);
  return router;
}

template <class X, class S>
void all_kinds(const Case& c) {
  using Softmax = SoftmaxTopKRouter<X, S>;
  ParameterList<X, S> router_parameters;
  Softmax softmax({hidden, experts, top_k, true});
  softmax.collect_parameters(router_parameters);
  fill_normal(router_parameters, 0.5, 3);
  auto sigmoid = skewed_sigmoid_router<X, S>();
  router_parameters.clear();
  sigmoid.collect_parameters(router_parameters);
  fill_normal(router_parameters, 0.5, 4);
  const ExpertShape shape{experts, hidden, ffn};
  const ExpertShape biased{experts, hidden, ffn, true};
  check_inference<X, S, SwiGLUExperts<X, S>>(softmax, shape, c, 100);
  check_inference<X, S, GeGLUExperts<X, S>>(sigmoid, shape, c, 200);
  check_inference<X, S, FFNExperts<X, S, activation::Relu>>(softmax, biased, c, 300);
  check_inference<X, S, FFNExperts<X, S, activation::GeluErf>>(sigmoid, shape, c, 400);
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("resident experts equal the all-resident layer bit for bit",
                        "[memory][residency]", ExecutionSpaces) {
  using X = TestType;
  SECTION("25% resident, decode (one token)") {
    all_kinds<X, float>({2, 1, StorageType::f32, Eviction::lru, false});
    all_kinds<X, double>({2, 1, StorageType::f64, Eviction::lfu, false});
  }
  SECTION("50% resident, two tokens") {
    all_kinds<X, float>({4, 2, StorageType::f32, Eviction::lfu, false});
    all_kinds<X, double>({4, 2, StorageType::f64, Eviction::lru, false});
  }
  SECTION("BF16 store, converted on load") {
    all_kinds<X, float>({2, 1, StorageType::bf16, Eviction::lru, false});
    all_kinds<X, double>({4, 2, StorageType::bf16, Eviction::lfu, false});
  }
  SECTION("prefetch of the next batch's experts") {
    all_kinds<X, float>({4, 2, StorageType::f32, Eviction::lru, true});
    all_kinds<X, double>({2, 1, StorageType::bf16, Eviction::lfu, true});
  }
}

TEMPLATE_LIST_TEST_CASE("a batch choosing more experts than the budget is refused by name",
                        "[memory][residency]", ExecutionSpaces) {
  using X = TestType;
  using S = float;
  using Inner = SwiGLUExperts<X, S>;
  using Store = HostExpertStore<>;
  using R = SoftmaxTopKRouter<X, S>;
  Inner all({experts, hidden, ffn});
  MoELayer<R, ResidentExperts<Inner, Store>> layer(
      R({hidden, experts, top_k, true}),
      ResidentExperts<Inner, Store>(Inner({2, hidden, ffn}),
                                    Store::from_experts(all, StorageType::f32)));
  fill_normal(layer.parameters(), 0.5, 9);
  Matrix<S, X> x("x", 16, hidden), y("y", 16, hidden);
  fill_normal(x, 1.0, 10);
  CHECK_THROWS_WITH(layer.forward(x, y), ContainsSubstring("budget = 2 resident experts") &&
                                             ContainsSubstring("raise the budget to at least"));
  // Inference-only store: a training forward says why it cannot train.
  RouteContext<X> training;
  training.training = true;
  Matrix<S, X> one("one", 1, hidden), y_one("y_one", 1, hidden);
  CHECK_THROWS_WITH(layer.forward(one, y_one, training), ContainsSubstring("master copies"));
  // Experts built without gradient buffers refuse backward by name.
  ExpertShape inference_only{experts, hidden, ffn};
  inference_only.gradients = false;
  MoELayer<R, Inner> plain(R({hidden, experts, top_k, true}), Inner(inference_only));
  plain.forward(one, y_one, training);
  CHECK_THROWS_WITH(plain.backward(y_one, one), ContainsSubstring("shape.gradients"));
  // Budgets that hold no expert, and slots that do not match the store.
  CHECK_THROWS_WITH((ResidencyBudget{0, 100}.slots(1000, 8)), ContainsSubstring("bytes = 100"));
  CHECK(ResidencyBudget{0, 4500}.slots(1000, 8) == 4);
  CHECK(ResidencyBudget{3, 4500}.slots(1000, 8) == 3);
  CHECK_THROWS_WITH((ResidentExperts<Inner, Store>(Inner({2, hidden, ffn + 1}),
                                                   Store::from_experts(all, StorageType::f32))),
                    ContainsSubstring("experts.w_gate"));
}

TEST_CASE("slot cache evicts the least recently or least frequently used expert",
          "[memory][residency]") {
  SlotCache lru(2, 6, Eviction::lru);
  lru.place({0});
  lru.place({1});
  lru.place({0});
  auto placed = lru.place({2});  // 1 is the least recently used
  CHECK(placed[0].load);
  CHECK(lru.slot_of(1) == -1);
  CHECK(lru.slot_of(0) >= 0);
  placed = lru.place({0, 3});  // 0 stays although it is older than 2: the batch needs it
  CHECK(!placed[0].load);
  CHECK(lru.slot_of(2) == -1);

  SlotCache lfu(2, 6, Eviction::lfu);
  lfu.place({0});
  lfu.place({0});
  lfu.place({1});
  lfu.place({2});  // 1 was used once, 0 twice
  CHECK(lfu.slot_of(1) == -1);
  CHECK(lfu.slot_of(0) >= 0);
  CHECK(lfu.resident() == 2);
  CHECK_THROWS_WITH(lfu.place({3, 4, 5}), ContainsSubstring("exceed the 2 slots"));
}

namespace {

/// Training steps of the all-resident layer and of the resident one (its experts' master
/// copies and optimizer state on the host) from the same start: every output, input
/// gradient and final parameter equal bit for bit.
template <class X, class S, class Inner>
void check_training(ExpertMode mode, bool adam) {
  using Store = HostExpertStore<>;
  using Resident = ResidentExperts<Inner, Store>;
  using R = SoftmaxTopKRouter<X, S>;
  const int tokens = 2, steps = 5;
  LayerOptions options;
  options.training_mode = mode;
  const ExpertShape shape{experts, hidden, ffn};
  MoELayer<R, Inner> reference(R({hidden, experts, top_k, true}), Inner(shape), options);
  fill_normal(reference.parameters(), 0.3, 21);
  MoELayer<R, Resident> resident(
      R({hidden, experts, top_k, true}),
      Resident(Inner({4, hidden, ffn}),
               Store::from_experts(reference.experts(), own_storage<S>(), true)),
      options);
  const auto from = reference.parameters(), to = resident.parameters();
  REQUIRE(from.size() == to.size());
  for (std::size_t i = 0; i < from.size(); ++i) {
    REQUIRE(from[i].name == to[i].name);
    REQUIRE(from[i].shape == to[i].shape);
    Kokkos::deep_copy(to[i].value, from[i].value);  // the router; the experts already match
  }
  AdamW<X, S> adam_reference(reference.parameters(), {}), adam_resident(resident.parameters(), {});
  SGD<X, S> sgd_reference(reference.parameters(), {0.05, 0.5}),
      sgd_resident(resident.parameters(), {0.05, 0.5});
  RouteContext<X> training;
  training.training = true;
  Matrix<S, X> x("x", tokens, hidden), g("g", tokens, hidden);
  Matrix<S, X> y_reference("y_reference", tokens, hidden), y("y", tokens, hidden);
  Matrix<S, X> gx_reference("gx_reference", tokens, hidden), gx("gx", tokens, hidden);
  for (int step = 0; step < steps; ++step) {
    CAPTURE(step, int(mode), adam);
    fill_normal(x, 1.0, 30 + step);
    fill_normal(g, 1.0, 40 + step);
    reference.zero_gradients();
    resident.zero_gradients();
    reference.forward(x, y_reference, training);
    resident.forward(x, y, training);
    CHECK(bits_of(y) == bits_of(y_reference));
    reference.backward(g, gx_reference);
    resident.backward(g, gx);
    CHECK(bits_of(gx) == bits_of(gx_reference));
    if (adam) {
      adam_reference.step();
      adam_resident.step();
    } else {
      sgd_reference.step();
      sgd_resident.step();
    }
  }
  const auto after_reference = reference.parameters(), after = resident.parameters();
  for (std::size_t i = 0; i < after.size(); ++i) {
    CAPTURE(after[i].name);
    CHECK(bits_of(after[i].value) == bits_of(after_reference[i].value));
  }
  // An evaluation forward after the last step sees the stepped host copies.
  Matrix<S, X> y_eval("y_eval", tokens, hidden);
  reference.forward(x, y_reference);
  resident.forward(x, y_eval);
  CHECK(bits_of(y_eval) == bits_of(y_reference));
  CHECK(resident.experts().residency_stats().misses > 0);
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("training with host master copies equals all-resident training",
                        "[memory][residency][training]", ExecutionSpaces) {
  using X = TestType;
  check_training<X, double, SwiGLUExperts<X, double>>(ExpertMode::store, true);
  check_training<X, float, FFNExperts<X, float, activation::Silu>>(ExpertMode::recompute, false);
}
