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

TEST_CASE(
    "a DeepSeek-V3 block keeps its group limit, scaling, shared expert and selection bias in both layouts",
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

  for (const auto layout : {models::ExpertLayout::per_expert, models::ExpertLayout::fused}) {
    CAPTURE(models::layout_name(layout));
    const auto dir = scratch(std::string("deepseek_") + models::layout_name(layout));
    models::export_hf_block(layer, "deepseek_v3", dir, 1, layout);
    const io::ShardedCheckpoint checkpoint(dir);
    CHECK(checkpoint.contains("model.layers.1.mlp.experts.gate_up_proj") ==
          (layout == models::ExpertLayout::fused));
    CHECK(checkpoint.contains("model.layers.1.mlp.shared_experts.up_proj.weight"));
    auto loaded = models::load_deepseek_v3<X, S>(dir, 1);
    check_same_block(layer, loaded);
    auto loaded_bias =
        Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), loaded.router().bias());
    for (std::size_t e = 0; e < bias.size(); ++e) CHECK(loaded_bias(e) == bias(e));
  }
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

TEST_CASE("a block exported in the fused layout holds the per-expert tensors, read back alike",
          "[models][export][fused]") {
  auto mixtral = softmax_layer(true);
  const auto per_dir = scratch("mixtral_per_expert"), fused_dir = scratch("mixtral_fused");
  models::export_hf_block(mixtral, "mixtral", per_dir, 1);
  models::export_hf_block(mixtral, "mixtral", fused_dir, 1, models::ExpertLayout::fused);
  const io::ShardedCheckpoint per(per_dir), fused(fused_dir);

  // transformers 5.x's names and shapes: Mixtral's block is `mlp` there, gate_up_proj
  // [E, 2F, H] with expert e's gate rows then its up rows, down_proj [E, H, F].
  const std::string gate_up = "model.layers.1.mlp.experts.gate_up_proj";
  const std::string down = "model.layers.1.mlp.experts.down_proj";
  REQUIRE(fused.contains(gate_up));
  CHECK(fused.info(gate_up).shape == std::vector<std::int64_t>{experts, 2 * ffn, hidden});
  CHECK(fused.info(down).shape == std::vector<std::int64_t>{experts, hidden, ffn});
  CHECK(fused.contains("model.layers.1.mlp.gate.weight"));
  CHECK_FALSE(fused.contains("model.layers.1.block_sparse_moe.gate.weight"));
  const auto fused_gate_up = fused.read<S>(gate_up), fused_down = fused.read<S>(down);
  for (int e = 0; e < experts; ++e) {
    const std::string expert = "model.layers.1.block_sparse_moe.experts." + std::to_string(e);
    const auto w1 = per.read<S>(expert + ".w1.weight"), w3 = per.read<S>(expert + ".w3.weight");
    const auto w2 = per.read<S>(expert + ".w2.weight");
    CAPTURE(e);
    for (int i = 0; i < ffn * hidden; ++i) {
      CHECK(fused_gate_up[std::size_t(e) * 2 * ffn * hidden + i] == w1[i]);
      CHECK(fused_gate_up[std::size_t(e) * 2 * ffn * hidden + ffn * hidden + i] == w3[i]);
      CHECK(fused_down[std::size_t(e) * hidden * ffn + i] == w2[i]);
    }
  }

  const auto block = models::read_block(fused_dir, 1, fused);
  CHECK(block.layout == models::ExpertLayout::fused);
  CHECK(block.prefix == "model.layers.1.mlp.");
  auto loaded = models::load_mixtral<X, S>(fused_dir, 1);
  check_same_block(mixtral, loaded);
}

TEST_CASE("a fused checkpoint with a stale or misshapen expert tensor is refused by name",
          "[models][export][fused][errors]") {
  auto mixtral = softmax_layer(true);
  const auto dir = scratch("mixtral_broken_fused");
  models::export_hf_block(mixtral, "mixtral", dir, 0, models::ExpertLayout::fused);
  const io::SafetensorsFile exported(dir + "/model.safetensors");
  const auto rewrite = [&](const std::string& target, const std::string& extra_name,
                           std::vector<std::int64_t> extra_shape) {
    io::SafetensorsWriter writer;
    for (const auto& name : exported.names()) {
      const auto& info = exported.info(name);
      if (name == extra_name) continue;  // replaced below
      writer.add(name, info.dtype, info.shape, exported.read<double>(name));
    }
    std::int64_t count = 1;
    for (auto n : extra_shape) count *= n;
    writer.add(extra_name, io::DType::F32, extra_shape, std::vector<double>(std::size_t(count)));
    std::filesystem::create_directories(target);
    std::filesystem::copy_file(dir + "/config.json", target + "/config.json",
                               std::filesystem::copy_options::overwrite_existing);
    writer.write(target + "/model.safetensors");
  };
  const auto load = [](const std::string& d) { models::load_mixtral<X, S>(d, 0); };
  // Both layouts: either could be the stale copy, so neither is guessed.
  const auto both = scratch("mixtral_both_layouts");
  rewrite(both, "model.layers.0.block_sparse_moe.experts.0.w1.weight", {ffn, hidden});
  CHECK_THROWS_MATCHES(load(both), runtime_error,
                       MessageMatches(ContainsSubstring("holds both") &&
                                      ContainsSubstring("experts.gate_up_proj")));
  // A gate_up_proj one expert short.
  const auto short_dir = scratch("mixtral_short_fused");
  rewrite(short_dir, "model.layers.0.mlp.experts.gate_up_proj", {experts - 1, 2 * ffn, hidden});
  CHECK_THROWS_MATCHES(
      load(short_dir), runtime_error,
      MessageMatches(ContainsSubstring("\"model.layers.0.mlp.experts.gate_up_proj\"") &&
                     ContainsSubstring("[7, 48, 16]") && ContainsSubstring("[8, 48, 16]")));
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

  // ERNIE-4.5's options: neither Mixtral nor Qwen3-MoE has a selection bias or a clamp.
  SoftmaxTopKConfig biased = hot;
  biased.temperature = 1.0, biased.selection_bias = true;
  models::MixtralLayer<X, S> with_bias(SoftmaxTopKRouter<X, S>(biased),
                                       SwiGLUExperts<X, S>({experts, hidden, ffn}));
  CHECK_THROWS_MATCHES(models::export_hf_block(with_bias, "qwen3_moe", scratch("wrong")),
                       invalid_argument, MessageMatches(ContainsSubstring("selection_bias")));
  SoftmaxTopKConfig clamped = hot;
  clamped.temperature = 1.0, clamped.norm_min = 1e-12;
  models::MixtralLayer<X, S> with_clamp(SoftmaxTopKRouter<X, S>(clamped),
                                        SwiGLUExperts<X, S>({experts, hidden, ffn}));
  CHECK_THROWS_MATCHES(models::export_hf_block(with_clamp, "mixtral", scratch("wrong")),
                       invalid_argument, MessageMatches(ContainsSubstring("norm_min")));

  // A shared expert under a name the loaders do not use would be dropped silently.
  SigmoidBiasConfig router;
  router.hidden = hidden, router.experts = experts, router.top_k = 2;
  models::DeepseekV3Layer<X, S> renamed(SigmoidBiasRouter<X, S>(router),
                                        SwiGLUExperts<X, S>({experts, hidden, ffn}), {},
                                        SwiGLUExperts<X, S>({1, hidden, ffn}, "shared_experts"));
  CHECK_THROWS_MATCHES(models::export_hf_block(renamed, "deepseek_v3", scratch("wrong")),
                       invalid_argument, MessageMatches(ContainsSubstring("shared_experts")));
}
