// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file hf.hpp
/// \brief Builds the MoE block of one decoder layer of a Hugging Face model directory
/// (`config.json` plus `model.safetensors` or shards) as a kmoe::MoELayer: Mixtral,
/// DeepSeek-V3 and Qwen3-MoE. Also maps every kmoe parameter, and each expert's slice of a
/// stacked expert tensor, to its checkpoint name, so that weights are read and gradients
/// written under the names the checkpoint uses. docs/models.md describes the fields read.
///
/// Needs nlohmann-json (link kmoe::io).

#include <kmoe/error.hpp>
#include <kmoe/experts/glu.hpp>
#include <kmoe/io/safetensors.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/routers/sigmoid_bias.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace kmoe::models {

/// \brief Mixtral's block: softmax over all experts, top-k, always renormalised.
template <class ExecSpace, class Scalar>
using MixtralLayer = MoELayer<SoftmaxTopKRouter<ExecSpace, Scalar>, SwiGLUExperts<ExecSpace, Scalar>>;
/// \brief Qwen3-MoE's block: Mixtral's, renormalised only if norm_topk_prob.
template <class ExecSpace, class Scalar>
using Qwen3MoeLayer = MoELayer<SoftmaxTopKRouter<ExecSpace, Scalar>, SwiGLUExperts<ExecSpace, Scalar>>;
/// \brief DeepSeek-V3's block: biased sigmoid selection, group limit, scaling, shared expert.
template <class ExecSpace, class Scalar>
using DeepseekV3Layer = MoELayer<SigmoidBiasRouter<ExecSpace, Scalar>, SwiGLUExperts<ExecSpace, Scalar>>;

/// \brief `config.json` of a model directory, with typed field access whose errors name the
/// field and the file.
class ConfigFile {
 public:
  explicit ConfigFile(const std::string& model_dir)
      : path_((std::filesystem::path(model_dir) / "config.json").string()) {
    std::ifstream in(path_, std::ios::binary);
    if (!in)
      throw invalid_argument("kmoe::models::ConfigFile", "model_dir", model_dir,
                             "cannot read " + path_);
    try {
      json_ = nlohmann::json::parse(in);
    } catch (const nlohmann::json::parse_error& e) {
      throw runtime_error("kmoe::models: " + path_ + ": not valid JSON: " + e.what());
    }
    if (!json_.is_object()) throw runtime_error("kmoe::models: " + path_ + ": not a JSON object");
  }

  const std::string& path() const { return path_; }
  /// A field that is absent or null counts as missing, as it does for transformers.
  bool has(const std::string& field) const {
    const auto it = json_.find(field);
    return it != json_.end() && !it->is_null();
  }
  std::string string(const std::string& field) const {
    const auto& v = get(field);
    if (!v.is_string()) wrong_type(field, "a string");
    return v.get<std::string>();
  }
  long long integer(const std::string& field) const {
    const auto& v = get(field);
    if (!v.is_number_integer()) wrong_type(field, "an integer");
    return v.get<long long>();
  }
  /// An integer that must be at least `minimum` and fit an int (shapes, counts).
  int count(const std::string& field, int minimum) const {
    const long long v = integer(field);
    if (v < minimum || v > 0x7fffffff)
      throw runtime_error("kmoe::models: " + path_ + ": field \"" + field + "\" = " +
                          std::to_string(v) + " must be at least " + std::to_string(minimum));
    return int(v);
  }
  double number(const std::string& field) const {
    const auto& v = get(field);
    if (!v.is_number()) wrong_type(field, "a number");
    return v.get<double>();
  }
  bool boolean(const std::string& field) const {
    const auto& v = get(field);
    if (!v.is_boolean()) wrong_type(field, "true or false");
    return v.get<bool>();
  }
  std::vector<long long> integers(const std::string& field) const {
    const auto& v = get(field);
    if (!v.is_array()) wrong_type(field, "a list of integers");
    std::vector<long long> out;
    for (const auto& item : v) {
      if (!item.is_number_integer()) wrong_type(field, "a list of integers");
      out.push_back(item.get<long long>());
    }
    return out;
  }

 private:
  const nlohmann::json& get(const std::string& field) const {
    if (!has(field))
      throw runtime_error("kmoe::models: " + path_ + ": missing field \"" + field + "\"");
    return json_.at(field);
  }
  [[noreturn]] void wrong_type(const std::string& field, const char* expected) const {
    throw runtime_error("kmoe::models: " + path_ + ": field \"" + field + "\" = " +
                        json_.at(field).dump() + " must be " + expected);
  }

  std::string path_;
  nlohmann::json json_;
};

/// \brief The `model_type` of the model in `model_dir` ("mixtral", "deepseek_v3", ...).
inline std::string load_model_type(const std::string& model_dir) {
  return ConfigFile(model_dir).string("model_type");
}

/// \brief Everything a loader needs about one layer's MoE block, read from config.json.
struct MoEBlockConfig {
  std::string model_type;
  std::string config_path;
  int layer = 0;
  std::string prefix;  ///< checkpoint name prefix of the block, e.g. "model.layers.1.mlp."
  int hidden = 0, experts = 0, top_k = 0, ffn = 0;
  bool normalize = false;
  double scaling_factor = 1.0;
  GroupLimit group = {};
  int shared_ffn = 0;  ///< F of the shared expert (n_shared_experts folded in); 0 if none
  /// Checkpoint names of an expert's gate, up and down projections, and the names of the
  /// expert list and shared expert inside the block.
  std::string gate_proj, up_proj, down_proj;
  std::string experts_scope = "experts.", shared_scope;
  /// Checkpoint name of the selection bias (DeepSeek-V3 e_score_correction_bias), or empty.
  std::string selection_bias;
};

/// \brief One kmoe parameter, or one expert's slice of it, and its checkpoint name.
struct CheckpointTensor {
  std::string parameter;  ///< kmoe parameter name: "router.weight", "experts.w_gate", ...
  int expert = -1;        ///< slice along the leading (expert) extent, -1 for the whole tensor
  std::string checkpoint; ///< e.g. "model.layers.1.block_sparse_moe.experts.3.w1.weight"
};

namespace detail {

inline void require_silu(const ConfigFile& config) {
  const std::string act = config.string("hidden_act");
  if (act != "silu")
    throw runtime_error("kmoe::models: " + config.path() + ": field \"hidden_act\" = \"" + act +
                        "\" is not supported: kmoe builds SwiGLU experts, which need \"silu\"");
}

inline void require_value(const ConfigFile& config, const std::string& field,
                          const std::string& expected) {
  // transformers 4.57 does not write these DeepSeek-V3 fields; the released configs do.
  if (!config.has(field)) return;
  const std::string value = config.string(field);
  if (value != expected)
    throw runtime_error("kmoe::models: " + config.path() + ": field \"" + field + "\" = \"" +
                        value + "\" is not supported (only \"" + expected + "\")");
}

[[noreturn]] inline void dense_layer(const ConfigFile& config, int layer, const std::string& why) {
  throw invalid_argument("kmoe::models", "layer", std::to_string(layer),
                         "decoder layer " + std::to_string(layer) + " of " + config.path() +
                             " is a dense MLP, not an MoE block (" + why + ")");
}

inline MoEBlockConfig mixtral_block(const ConfigFile& config, MoEBlockConfig b) {
  b.prefix = "model.layers." + std::to_string(b.layer) + ".block_sparse_moe.";
  b.hidden = config.count("hidden_size", 1);
  b.ffn = config.count("intermediate_size", 1);
  b.experts = config.count("num_local_experts", 1);
  b.top_k = config.count("num_experts_per_tok", 1);
  b.normalize = true;  // MixtralSparseMoeBlock always renormalises the top-k weights
  b.gate_proj = "w1", b.up_proj = "w3", b.down_proj = "w2";
  return b;
}

inline MoEBlockConfig qwen3_moe_block(const ConfigFile& config, MoEBlockConfig b) {
  // Qwen3MoeDecoderLayer: dense if listed in mlp_only_layers or off the sparse step.
  if (config.has("mlp_only_layers")) {
    const auto dense = config.integers("mlp_only_layers");
    if (std::find(dense.begin(), dense.end(), b.layer) != dense.end())
      dense_layer(config, b.layer, "listed in \"mlp_only_layers\"");
  }
  const int step = config.has("decoder_sparse_step") ? config.count("decoder_sparse_step", 1) : 1;
  if ((b.layer + 1) % step != 0)
    dense_layer(config, b.layer, "\"decoder_sparse_step\" = " + std::to_string(step));
  b.prefix = "model.layers." + std::to_string(b.layer) + ".mlp.";
  b.hidden = config.count("hidden_size", 1);
  b.ffn = config.count("moe_intermediate_size", 1);
  b.experts = config.count("num_experts", 1);
  b.top_k = config.count("num_experts_per_tok", 1);
  b.normalize = config.boolean("norm_topk_prob");
  b.gate_proj = "gate_proj", b.up_proj = "up_proj", b.down_proj = "down_proj";
  return b;
}

inline MoEBlockConfig deepseek_v3_block(const ConfigFile& config, MoEBlockConfig b) {
  require_value(config, "scoring_func", "sigmoid");
  require_value(config, "topk_method", "noaux_tc");
  const int first_moe = config.count("first_k_dense_replace", 0);
  if (b.layer < first_moe)
    dense_layer(config, b.layer,
                "\"first_k_dense_replace\" = " + std::to_string(first_moe));
  // transformers ignores moe_layer_freq; DeepSeek's own code honours it (1 in V3).
  const int freq = config.has("moe_layer_freq") ? config.count("moe_layer_freq", 1) : 1;
  if (b.layer % freq != 0)
    dense_layer(config, b.layer, "\"moe_layer_freq\" = " + std::to_string(freq));
  b.prefix = "model.layers." + std::to_string(b.layer) + ".mlp.";
  b.hidden = config.count("hidden_size", 1);
  b.ffn = config.count("moe_intermediate_size", 1);
  b.experts = config.count("n_routed_experts", 1);
  b.top_k = config.count("num_experts_per_tok", 1);
  b.normalize = config.boolean("norm_topk_prob");
  b.scaling_factor = config.number("routed_scaling_factor");
  b.group.n_group = config.count("n_group", 1);
  b.group.topk_group = config.count("topk_group", 1);
  b.group.score_terms = 2;  // a group scores the sum of its two best biased scores
  const int shared = config.has("n_shared_experts") ? config.count("n_shared_experts", 0) : 0;
  b.shared_ffn = shared * b.ffn;
  b.gate_proj = "gate_proj", b.up_proj = "up_proj", b.down_proj = "down_proj";
  b.shared_scope = "shared_experts.";
  b.selection_bias = b.prefix + "gate.e_score_correction_bias";
  return b;
}

}  // namespace detail

/// \brief Reads `model_dir/config.json` and describes the MoE block of decoder layer `layer`.
///
/// Throws kmoe::invalid_argument for a layer index out of range or naming a dense layer,
/// kmoe::runtime_error for an unknown model_type, a missing or mistyped field, or a
/// setting kmoe cannot reproduce (hidden_act other than silu, DeepSeek scoring other than
/// sigmoid / noaux_tc); every message names the field and the file.
inline MoEBlockConfig read_block_config(const std::string& model_dir, int layer) {
  const ConfigFile config(model_dir);
  MoEBlockConfig b;
  b.model_type = config.string("model_type");
  b.config_path = config.path();
  b.layer = layer;
  if (b.model_type != "mixtral" && b.model_type != "qwen3_moe" && b.model_type != "deepseek_v3")
    throw runtime_error("kmoe::models: " + config.path() + ": field \"model_type\" = \"" +
                        b.model_type +
                        "\" is not supported (supported: mixtral, deepseek_v3, qwen3_moe)");
  const int layers = config.count("num_hidden_layers", 1);
  if (layer < 0 || layer >= layers)
    throw invalid_argument("kmoe::models", "layer", std::to_string(layer),
                           "must be in [0, " + std::to_string(layers) + ") (num_hidden_layers in " +
                               config.path() + ")");
  detail::require_silu(config);
  if (b.model_type == "mixtral") return detail::mixtral_block(config, b);
  if (b.model_type == "qwen3_moe") return detail::qwen3_moe_block(config, b);
  return detail::deepseek_v3_block(config, b);
}

/// \brief Every trainable kmoe parameter of the block and the checkpoint tensor holding it:
/// the router weight whole, stacked expert tensors one expert slice at a time. The
/// DeepSeek-V3 selection bias is a buffer, not a parameter, so it is not listed.
inline std::vector<CheckpointTensor> checkpoint_tensors(const MoEBlockConfig& b) {
  std::vector<CheckpointTensor> out;
  out.push_back({"router.weight", -1, b.prefix + "gate.weight"});
  const std::pair<const char*, const std::string*> projections[] = {
      {"w_gate", &b.gate_proj}, {"w_up", &b.up_proj}, {"w_down", &b.down_proj}};
  for (const auto& [param, proj] : projections)
    for (int e = 0; e < b.experts; ++e)
      out.push_back({std::string("experts.") + param, e,
                     b.prefix + b.experts_scope + std::to_string(e) + "." + *proj + ".weight"});
  if (b.shared_ffn > 0)
    for (const auto& [param, proj] : projections)
      out.push_back({std::string("shared.") + param, 0,
                     b.prefix + b.shared_scope + *proj + ".weight"});
  return out;
}

namespace detail {

/// Extents of the checkpoint tensor for `t`: the parameter's, minus the expert extent.
template <class Param>
std::vector<std::int64_t> slice_shape(const Param& p, const CheckpointTensor& t) {
  if (t.expert < 0) return p.shape;
  return std::vector<std::int64_t>(p.shape.begin() + 1, p.shape.end());
}

inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

inline void require_tensor(const io::ShardedCheckpoint& checkpoint, const MoEBlockConfig& b,
                           const std::string& name, const std::vector<std::int64_t>& shape) {
  if (!checkpoint.contains(name))
    throw runtime_error("kmoe::models: checkpoint " + checkpoint.directory() + " (" +
                        b.model_type + ", layer " + std::to_string(b.layer) +
                        ") has no tensor \"" + name + "\"");
  if (checkpoint.info(name).shape != shape)
    throw runtime_error("kmoe::models: checkpoint " + checkpoint.directory() + ": tensor \"" +
                        name + "\" has shape " + shape_string(checkpoint.info(name).shape) +
                        ", config.json implies " + shape_string(shape));
}

template <class Layer>
void load_weights(Layer& layer, const MoEBlockConfig& b, const io::ShardedCheckpoint& checkpoint) {
  using S = typename Layer::scalar_type;
  const auto params = layer.parameters();
  const auto tensors = checkpoint_tensors(b);
  for (const auto& p : params) {
    // Parameters live in the layer's memory space: fill a host copy, then copy it once.
    auto host = Kokkos::create_mirror_view(p.value);
    bool mapped = false;
    for (const auto& t : tensors) {
      if (t.parameter != p.name) continue;
      const auto shape = slice_shape(p, t);
      require_tensor(checkpoint, b, t.checkpoint, shape);
      const std::size_t size = t.expert < 0 ? host.size() : host.size() / std::size_t(p.shape[0]);
      checkpoint.read_into<S>(t.checkpoint, host.data() + size * std::size_t(std::max(t.expert, 0)),
                              size);
      mapped = true;
    }
    if (!mapped)
      throw invalid_argument("kmoe::models", "parameter", p.name,
                             "has no checkpoint name for model_type " + b.model_type);
    Kokkos::deep_copy(p.value, host);
  }
}

inline MoEBlockConfig family_block(const std::string& model_dir, int layer, const char* family,
                                   const char* where) {
  MoEBlockConfig b = read_block_config(model_dir, layer);
  if (b.model_type != family)
    throw invalid_argument(where, "model_dir", model_dir,
                           "config.json has model_type \"" + b.model_type + "\", not \"" +
                               family + "\"");
  return b;
}

template <class X, class S>
std::optional<SwiGLUExperts<X, S>> shared_experts(const MoEBlockConfig& b) {
  if (b.shared_ffn == 0) return std::nullopt;
  return SwiGLUExperts<X, S>(ExpertShape{1, b.hidden, b.shared_ffn}, "shared");
}

/// Mixtral and Qwen3-MoE differ only in their config fields and names.
template <class X, class S>
MoELayer<SoftmaxTopKRouter<X, S>, SwiGLUExperts<X, S>> load_softmax_family(
    const std::string& model_dir, int layer, const LayerOptions& options, const char* family,
    const char* where) {
  const MoEBlockConfig b = family_block(model_dir, layer, family, where);
  const io::ShardedCheckpoint checkpoint(model_dir);
  SoftmaxTopKConfig router;
  router.hidden = b.hidden, router.experts = b.experts, router.top_k = b.top_k;
  router.normalize = b.normalize;
  MoELayer<SoftmaxTopKRouter<X, S>, SwiGLUExperts<X, S>> moe(
      SoftmaxTopKRouter<X, S>(router),
      SwiGLUExperts<X, S>(ExpertShape{b.experts, b.hidden, b.ffn}), options);
  load_weights(moe, b, checkpoint);
  return moe;
}

}  // namespace detail

/// \brief The MoE block (`block_sparse_moe`) of decoder layer `layer` of the Mixtral model
/// in `model_dir`, weights converted to Scalar.
template <class ExecSpace, class Scalar>
MixtralLayer<ExecSpace, Scalar> load_mixtral(const std::string& model_dir, int layer,
                                             const LayerOptions& options = {}) {
  return detail::load_softmax_family<ExecSpace, Scalar>(model_dir, layer, options, "mixtral",
                                                        "kmoe::models::load_mixtral");
}

/// \brief The MoE block (`mlp`) of decoder layer `layer` of the Qwen3-MoE model in
/// `model_dir`, weights converted to Scalar.
template <class ExecSpace, class Scalar>
Qwen3MoeLayer<ExecSpace, Scalar> load_qwen3_moe(const std::string& model_dir, int layer,
                                                const LayerOptions& options = {}) {
  return detail::load_softmax_family<ExecSpace, Scalar>(model_dir, layer, options, "qwen3_moe",
                                                        "kmoe::models::load_qwen3_moe");
}

/// \brief The MoE block (`mlp`, with its shared expert and selection bias) of decoder layer
/// `layer` of the DeepSeek-V3 model in `model_dir`, weights converted to Scalar.
template <class ExecSpace, class Scalar>
DeepseekV3Layer<ExecSpace, Scalar> load_deepseek_v3(const std::string& model_dir, int layer,
                                                    const LayerOptions& options = {}) {
  constexpr const char* where = "kmoe::models::load_deepseek_v3";
  const MoEBlockConfig b = detail::family_block(model_dir, layer, "deepseek_v3", where);
  const io::ShardedCheckpoint checkpoint(model_dir);
  SigmoidBiasConfig router;
  router.hidden = b.hidden, router.experts = b.experts, router.top_k = b.top_k;
  router.normalize = b.normalize;
  router.scaling_factor = b.scaling_factor;
  router.group = b.group;
  DeepseekV3Layer<ExecSpace, Scalar> moe(
      SigmoidBiasRouter<ExecSpace, Scalar>(router),
      SwiGLUExperts<ExecSpace, Scalar>(ExpertShape{b.experts, b.hidden, b.ffn}), options,
      detail::shared_experts<ExecSpace, Scalar>(b));
  detail::load_weights(moe, b, checkpoint);
  detail::require_tensor(checkpoint, b, b.selection_bias, {b.experts});
  const auto bias = moe.router().bias();
  auto host = Kokkos::create_mirror_view(bias);
  checkpoint.read_into(b.selection_bias, host.data(), host.size());
  Kokkos::deep_copy(bias, host);
  return moe;
}

/// \brief Calls `visit(tensor, shape, data)` for every entry of checkpoint_tensors(b), with
/// `data` pointing at the host copy of that slice of the parameter's value (`gradient`
/// false) or gradient (true) and `shape` its checkpoint extents.
template <class Layer, class Visit>
void visit_checkpoint_tensors(const Layer& layer, const MoEBlockConfig& b, bool gradient,
                              const Visit& visit) {
  const auto tensors = checkpoint_tensors(b);
  for (const auto& p : layer.parameters()) {
    // One host copy per parameter, however many expert slices it has.
    const auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(),
                                                          gradient ? p.grad : p.value);
    for (const auto& t : tensors) {
      if (t.parameter != p.name) continue;
      const std::size_t size = t.expert < 0 ? host.size() : host.size() / std::size_t(p.shape[0]);
      visit(t, detail::slice_shape(p, t), host.data() + size * std::size_t(std::max(t.expert, 0)));
    }
  }
}

}  // namespace kmoe::models
