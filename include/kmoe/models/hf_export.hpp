// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file hf_export.hpp
/// \brief Writes a single-rank layer as the MoE block of a Hugging Face model directory
/// (`config.json` + `model.safetensors`) that the loaders of hf.hpp, `kmoe-run` and
/// transformers' block modules read: the way a kmoe training run (a training checkpoint
/// loaded onto one rank, io/checkpoint.hpp) leaves as a model others can run.
///
/// The tensor names are the loaders' own (models/config.hpp's checkpoint_tensors), so a
/// round trip export -> load gives back the same weights bit for bit. config.json holds the
/// block's fields only; transformers fills every other field with its defaults.
///
/// Needs nlohmann-json (link kmoe::io).

#include <kmoe/error.hpp>
#include <kmoe/io/file.hpp>
#include <kmoe/io/safetensors.hpp>
#include <kmoe/models/config.hpp>
#include <kmoe/models/hf.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <string>
#include <type_traits>

namespace kmoe::models {

namespace detail {

template <class S>
constexpr io::DType export_dtype() {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>,
                "kmoe::models::export_hf_block: float or double layers");
  return std::is_same_v<S, float> ? io::DType::F32 : io::DType::F64;
}

/// config.json of a one-block model whose MoE block is decoder layer `layer` (earlier
/// layers are declared dense where the family allows, so the block sits where it was).
template <class Layer>
nlohmann::ordered_json block_config(const Layer& moe, const std::string& model_type, int layer) {
  const auto& router = moe.router().config();
  const int ffn = moe.experts().ffn_size();
  nlohmann::ordered_json c;
  c["model_type"] = model_type;
  c["architectures"] = nlohmann::ordered_json::array();
  c["hidden_size"] = moe.hidden_size();
  c["num_hidden_layers"] = layer + 1;
  c["hidden_act"] = "silu";
  c["num_experts_per_tok"] = router.top_k;
  if (model_type == "mixtral") {
    c["architectures"].push_back("MixtralForCausalLM");
    c["intermediate_size"] = ffn;
    c["num_local_experts"] = moe.num_experts();
  } else if (model_type == "qwen3_moe") {
    c["architectures"].push_back("Qwen3MoeForCausalLM");
    c["moe_intermediate_size"] = ffn;
    c["num_experts"] = moe.num_experts();
    c["norm_topk_prob"] = router.normalize;
    c["decoder_sparse_step"] = 1;
    c["mlp_only_layers"] = nlohmann::ordered_json::array();
  } else {
    c["architectures"].push_back("DeepseekV3ForCausalLM");
    c["moe_intermediate_size"] = ffn;
    c["n_routed_experts"] = moe.num_experts();
    c["norm_topk_prob"] = router.normalize;
    c["routed_scaling_factor"] = router.scaling_factor;
    c["n_group"] = router.group.n_group;
    c["topk_group"] = router.group.topk_group;
    c["scoring_func"] = "sigmoid";
    c["topk_method"] = "noaux_tc";
    c["first_k_dense_replace"] = layer;
    c["moe_layer_freq"] = 1;
    const auto& shared = moe.shared_experts();
    const int shared_ffn = shared ? shared->ffn_size() : 0;
    // n_shared_experts x moe_intermediate_size is the shared width the loaders build.
    require(shared_ffn % ffn == 0, "kmoe::models::export_hf_block", "shared expert F", shared_ffn,
            "must be a multiple of the routed F " + std::to_string(ffn) +
                " (DeepSeek-V3 writes n_shared_experts x moe_intermediate_size)");
    c["n_shared_experts"] = shared_ffn / ffn;
  }
  return c;
}

}  // namespace detail

/// \brief Writes `moe` (one rank: every expert here) as decoder layer `layer`'s MoE block of
/// a `model_type` model ("mixtral", "qwen3_moe" or "deepseek_v3", which fixes the router and
/// expert kinds the layer must have) into `directory`: config.json and model.safetensors,
/// each staged and renamed, so a reader never sees half a file. `layout` chooses the routed
/// experts' tensors: one per expert (what transformers' default save_pretrained writes) or
/// fused 3-D tensors (save_original_format=False); transformers 5.x loads both.
template <class Layer>
void export_hf_block(const Layer& moe, const std::string& model_type, const std::string& directory,
                     int layer = 0, ExpertLayout layout = ExpertLayout::per_expert) {
  constexpr const char* where = "kmoe::models::export_hf_block";
  using S = typename Layer::scalar_type;
  using X = typename Layer::execution_space;
  constexpr bool softmax_family = std::is_same_v<Layer, MixtralLayer<X, S>>;
  constexpr bool deepseek_family = std::is_same_v<Layer, DeepseekV3Layer<X, S>>;
  static_assert(softmax_family || deepseek_family,
                "kmoe::models::export_hf_block: a MixtralLayer / Qwen3MoeLayer (SoftmaxTopKRouter) "
                "or a DeepseekV3Layer (SigmoidBiasRouter), SwiGLU experts");
  // Router settings the target family cannot express would silently change the results.
  const auto& router = moe.router().config();
  require(router.scaling_factor == 1.0 || deepseek_family, where, "router scaling_factor",
          router.scaling_factor, "must be 1 for " + model_type);
  require(!router.group.enabled() || (deepseek_family && router.group.score_terms == 2), where,
          "router group limit", router.group.n_group,
          "only deepseek_v3 limits groups, scoring a group by its 2 best experts");
  if constexpr (softmax_family) {
    require(router.temperature == 1.0, where, "router temperature", router.temperature,
            "must be 1: " + model_type + " has no router temperature");
    require(model_type == "mixtral" || model_type == "qwen3_moe", where, "model_type", model_type,
            "a SoftmaxTopKRouter layer exports as \"mixtral\" or \"qwen3_moe\"");
    require(model_type != "mixtral" || moe.router().config().normalize, where, "router normalize",
            "false", "Mixtral always renormalises the top-k weights; export as \"qwen3_moe\"");
    require(!moe.shared_experts().has_value(), where, "shared experts", "present",
            model_type + " blocks have none; export as \"deepseek_v3\"");
    require(!router.selection_bias, where, "router selection_bias", "true",
            model_type + " has no selection bias");
    require(router.norm_min == 0.0, where, "router norm_min", router.norm_min,
            "must be 0: " + model_type + " does not clamp the normalisation");
  } else {
    require(model_type == "deepseek_v3", where, "model_type", model_type,
            "a SigmoidBiasRouter layer exports as \"deepseek_v3\"");
  }
  require(moe.groups().world.size() == 1, where, "ranks", moe.groups().world.size(),
          "export a one-rank layer (load the training checkpoint onto one rank first)");
  require(layer >= 0, where, "layer", layer, "must be >= 0");

  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(directory, ec);
  if (ec)
    throw runtime_error(std::string(where) + ": cannot create " + directory + ": " + ec.message());
  const std::string config_text = detail::block_config(moe, model_type, layer).dump(2) + "\n";
  io::StagedFile config((fs::path(directory) / "config.json").string(), where);
  config.write(config_text.data(), config_text.size());
  config.commit();

  // The names come from the file just written, read back the way the loaders read it.
  const MoEBlockConfig block = with_layout(read_block_config(directory, layer), layout);
  // Every parameter needs a checkpoint name, or the export would drop it.
  const auto names = checkpoint_tensors(block);
  for (const auto& p : moe.parameters())
    require(std::any_of(names.begin(), names.end(),
                        [&](const CheckpointTensor& t) { return t.parameter == p.name; }),
            where, "parameter", p.name,
            "has no " + model_type +
                " checkpoint name (the loaders name the routed experts "
                "\"experts\" and the shared expert \"shared\")");
  io::SafetensorsWriter writer;
  visit_checkpoint_tensors(moe, block, false,
                           [&](const std::string& name, const std::vector<std::int64_t>& shape,
                               const S* data) {
                             writer.add(name, detail::export_dtype<S>(), shape, data);
                           });
  if constexpr (deepseek_family) {
    const auto bias = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), moe.router().bias());
    using Bias = typename std::decay_t<decltype(bias)>::non_const_value_type;
    writer.add(block.selection_bias_name(), detail::export_dtype<Bias>(),
               {std::int64_t(bias.size())}, bias.data());
  }
  writer.write((fs::path(directory) / "model.safetensors").string());
}

}  // namespace kmoe::models
