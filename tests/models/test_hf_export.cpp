// SPDX-License-Identifier: BSD-3-Clause
// Export of a layer as a Hugging Face MoE block, read back by the model loaders (what
// kmoe-run runs): every weight and the forward output come back bit for bit, for each family
// and from a training checkpoint; a layer the family cannot express is refused by name.
// tests/models/check_export_transformers.py runs an exported block in transformers itself.
#include <kmoe/io/checkpoint.hpp>
#include <kmoe/kmoe.hpp>
#include <kmoe/models/hf.hpp>
#include <kmoe/models/hf_export.hpp>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_exception.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <filesystem>
#include <string>
#include <unistd.h>
#include <vector>

using namespace kmoe;
using Catch::Matchers::ContainsSubstring;
using Catch::Matchers::MessageMatches;
using X = Kokkos::DefaultExecutionSpace;
using S = float;

namespace {

constexpr int hidden = 16, ffn = 24, experts = 8, tokens = 13;

std::string scratch(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("kmoe_hf_export_" + std::to_string(::getpid())) / name;
  std::filesystem::remove_all(dir);
  return dir.string();
}

std::vector<S> host_copy(const Parameter<X, S>::flat_view& v) {
  auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  return std::vector<S>(host.data(), host.data() + host.size());
}

template <class Layer>
std::vector<S> forward(Layer& layer) {
  Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden);
  fill_normal(x, 1.0, 5);
  layer.forward(x, y);
  auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), y);
  return std::vector<S>(host.data(), host.data() + host.size());
}

/// Same parameter names, values and forward output, bit for bit.
template <class A, class B>
void check_same_block(A& original, B& loaded) {
  const auto a = original.parameters(), b = loaded.parameters();
  REQUIRE(a.size() == b.size());
  for (std::size_t p = 0; p < a.size(); ++p) {
    CAPTURE(a[p].name);
    CHECK(a[p].name == b[p].name);
    CHECK(a[p].shape == b[p].shape);
    CHECK(host_copy(a[p].value) == host_copy(b[p].value));
  }
  CHECK(forward(original) == forward(loaded));
}

models::MixtralLayer<X, S> softmax_layer(bool normalize) {
  SoftmaxTopKConfig router;
  router.hidden = hidden, router.experts = experts, router.top_k = 2, router.normalize = normalize;
  models::MixtralLayer<X, S> layer(SoftmaxTopKRouter<X, S>(router),
                                   SwiGLUExperts<X, S>({experts, hidden, ffn}));
  fill_normal(layer.parameters(), 0.3, 17);
  return layer;
}

}  // namespace

TEST_CASE("a Mixtral and a Qwen3-MoE block round-trip through export and the loaders",
          "[models][export]") {
  auto mixtral = softmax_layer(true);
  const auto mixtral_dir = scratch("mixtral");
  models::export_hf_block(mixtral, "mixtral", mixtral_dir);
  auto loaded = models::load_mixtral<X, S>(mixtral_dir, 0);
  check_same_block(mixtral, loaded);

  // Qwen3 without renormalisation, as decoder layer 2.
  auto qwen = softmax_layer(false);
  const auto qwen_dir = scratch("qwen3");
  models::export_hf_block(qwen, "qwen3_moe", qwen_dir, 2);
  const auto block = models::read_block_config(qwen_dir, 2);
  CHECK(block.prefix == "model.layers.2.mlp.");
  CHECK_FALSE(block.normalize);
  CHECK(
      (block.hidden == hidden && block.ffn == ffn && block.experts == experts && block.top_k == 2));
  auto loaded_qwen = models::load_qwen3_moe<X, S>(qwen_dir, 2);
  check_same_block(qwen, loaded_qwen);
}

TEST_CASE("a DeepSeek-V3 block keeps its group limit, scaling, shared expert and selection bias",
          "[models][export]") {
  SigmoidBiasConfig router;
  router.hidden = hidden, router.experts = experts, router.top_k = 2, router.normalize = true;
  router.scaling_factor = 2.5;
  router.group = GroupLimit{4, 2, 2};
  models::DeepseekV3Layer<X, S> layer(SigmoidBiasRouter<X, S>(router),
                                      SwiGLUExperts<X, S>({experts, hidden, ffn}), {},
                                      SwiGLUExperts<X, S>({1, hidden, 2 * ffn}, "shared"));
  fill_normal(layer.parameters(), 0.3, 23);
  auto bias = Kokkos::create_mirror_view(layer.router().bias());
  for (std::size_t e = 0; e < bias.size(); ++e) bias(e) = 0.05f * float(e % 3) - 0.04f;
  Kokkos::deep_copy(layer.router().bias(), bias);

  const auto dir = scratch("deepseek");
  models::export_hf_block(layer, "deepseek_v3", dir, 1);
  auto loaded = models::load_deepseek_v3<X, S>(dir, 1);
  check_same_block(layer, loaded);
  auto loaded_bias =
      Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), loaded.router().bias());
  for (std::size_t e = 0; e < bias.size(); ++e) CHECK(loaded_bias(e) == bias(e));
}

TEST_CASE("a trained layer leaves its training checkpoint as an HF block", "[models][export]") {
  auto trained = softmax_layer(true);
  AdamW<X, S> optimizer(trained.parameters(), {1e-2, 0.9, 0.999, 1e-8, 0.01});
  Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden), grad_x("grad_x", tokens, hidden);
  RouteContext<X> training;
  training.training = true;
  for (int step = 0; step < 3; ++step) {
    fill_normal(x, 1.0, 100 + step);
    trained.zero_gradients();
    trained.forward(x, y, training);
    trained.backward(y, grad_x);  // loss = |y|^2 / 2
    optimizer.step();
  }
  const auto checkpoint = scratch("checkpoint");
  io::save_checkpoint(checkpoint, trained, optimizer, {3, {}});

  // A fresh layer restored from the checkpoint is what gets exported.
  auto restored = softmax_layer(true);
  AdamW<X, S> restored_optimizer(restored.parameters(), {});
  io::load_checkpoint(checkpoint, restored, restored_optimizer);
  const auto dir = scratch("trained");
  models::export_hf_block(restored, "mixtral", dir);
  auto loaded = models::load_mixtral<X, S>(dir, 0);
  check_same_block(trained, loaded);
}

TEST_CASE("export refuses what the family cannot express, naming it", "[models][export]") {
  auto mixtral = softmax_layer(true);
  CHECK_THROWS_MATCHES(models::export_hf_block(mixtral, "deepseek_v3", scratch("wrong")),
                       invalid_argument, MessageMatches(ContainsSubstring("model_type")));
  auto unnormalised = softmax_layer(false);
  CHECK_THROWS_MATCHES(models::export_hf_block(unnormalised, "mixtral", scratch("wrong")),
                       invalid_argument, MessageMatches(ContainsSubstring("qwen3_moe")));
  CHECK_THROWS_MATCHES(models::export_hf_block(mixtral, "mixtral", scratch("wrong"), -1),
                       invalid_argument, MessageMatches(ContainsSubstring("layer")));

  SoftmaxTopKConfig hot;
  hot.hidden = hidden, hot.experts = experts, hot.top_k = 2, hot.normalize = true;
  hot.temperature = 2.0;
  models::MixtralLayer<X, S> tempered(SoftmaxTopKRouter<X, S>(hot),
                                      SwiGLUExperts<X, S>({experts, hidden, ffn}));
  CHECK_THROWS_MATCHES(models::export_hf_block(tempered, "mixtral", scratch("wrong")),
                       invalid_argument, MessageMatches(ContainsSubstring("temperature")));

  // A shared expert under a name the loaders do not use would be dropped silently.
  SigmoidBiasConfig router;
  router.hidden = hidden, router.experts = experts, router.top_k = 2;
  models::DeepseekV3Layer<X, S> renamed(SigmoidBiasRouter<X, S>(router),
                                        SwiGLUExperts<X, S>({experts, hidden, ffn}), {},
                                        SwiGLUExperts<X, S>({1, hidden, ffn}, "shared_experts"));
  CHECK_THROWS_MATCHES(models::export_hf_block(renamed, "deepseek_v3", scratch("wrong")),
                       invalid_argument, MessageMatches(ContainsSubstring("shared_experts")));
}
