// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file config.hpp
/// \brief Reading and validating a Hugging Face `config.json` (Mixtral, DeepSeek-V3,
/// Qwen3-MoE) into a description of one layer's MoE block, the checkpoint names of its
/// tensors, and the check of a checkpoint's tensor shapes against it, all before anything
/// is allocated. docs/models.md describes the fields read.
///
/// Nothing here depends on Kokkos (hf.hpp builds the layer), so the parser can be fuzzed
/// on its own (fuzz/). Needs nlohmann-json.

#include <kmoe/detail/checked.hpp>
#include <kmoe/error.hpp>
#include <kmoe/io/file.hpp>
#include <kmoe/io/json.hpp>
#include <kmoe/io/safetensors.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace kmoe::models {

/// \brief Largest config.json read (released configs are a few kilobytes).
inline constexpr std::uint64_t max_config_bytes = 16u << 20;

/// \brief Largest element count of one checkpoint matrix (an expert's projection, the
/// router weight): Kokkos 3.4 computes the stride of a rank-3 view's last two extents in
/// `int`, so an [E, F, H] view with F·H ≥ 2^31 wraps to a 0-byte allocation.
inline constexpr std::int64_t max_matrix_elements = std::numeric_limits<int>::max();

/// \brief Largest number of experts accepted: the groups of DeepSeek-V3 and every expert
/// list are indexed in `int`, and each expert needs three checkpoint tensors anyway.
inline constexpr int max_experts = 1 << 20;

/// \brief `config.json` of a model directory, with typed field access whose errors name the
/// field and the file.
class ConfigFile {
 public:
  explicit ConfigFile(const std::string& model_dir)
      : path_((std::filesystem::path(model_dir) / "config.json").string()) {
    std::string text;
    try {
      text = io::read_small_file(path_, max_config_bytes, "kmoe::models::ConfigFile");
    } catch (const invalid_argument& e) {
      throw invalid_argument("kmoe::models::ConfigFile", "model_dir", model_dir,
                             std::string("cannot read config.json: ") + e.what());
    }
    json_ = io::parse_json(text, path_, "kmoe::models");
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
    // nlohmann keeps integers above 2^63 - 1 unsigned; get<long long> would wrap them.
    if (v.is_number_unsigned() &&
        v.get<std::uint64_t>() > std::uint64_t(std::numeric_limits<long long>::max()))
      wrong_type(field, "an integer below 2^63");
    return v.get<long long>();
  }
  /// An integer in [minimum, maximum] (shapes, counts).
  int count(const std::string& field, int minimum,
            int maximum = std::numeric_limits<int>::max()) const {
    const long long v = integer(field);
    if (v < minimum || v > maximum) out_of_range(field, std::to_string(v), minimum, maximum);
    return int(v);
  }
  /// A finite number greater than zero.
  double positive_number(const std::string& field) const {
    const auto& v = get(field);
    if (!v.is_number()) wrong_type(field, "a number");
    const double x = v.get<double>();
    if (!(x > 0) || !std::isfinite(x)) wrong_type(field, "a finite number > 0");
    return x;
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
      if (!item.is_number_integer() ||
          (item.is_number_unsigned() &&
           item.get<std::uint64_t>() > std::uint64_t(std::numeric_limits<long long>::max())))
        wrong_type(field, "a list of integers below 2^63");
      out.push_back(item.get<long long>());
    }
    return out;
  }

  /// The one of `fields` the file sets (a key transformers renamed between versions:
  /// Qwen3-MoE's `num_experts` is `num_local_experts` in 5.x); runtime_error if none is
  /// set, or if two are set to different values.
  std::string either(std::initializer_list<const char*> fields) const {
    std::string found, names;
    for (const char* field : fields) {
      names += std::string(names.empty() ? "" : " or ") + "\"" + field + "\"";
      if (!has(field)) continue;
      if (!found.empty() && json_.at(found) != json_.at(field))
        throw runtime_error("kmoe::models: " + path_ + ": fields \"" + found +
                            "\" = " + io::json_excerpt(json_.at(found)) + " and \"" + field +
                            "\" = " + io::json_excerpt(json_.at(field)) +
                            " name the same setting and disagree");
      if (found.empty()) found = field;
    }
    if (found.empty()) throw runtime_error("kmoe::models: " + path_ + ": missing field " + names);
    return found;
  }

  /// runtime_error "<path>: field "<field>" = <value> must be in [minimum, maximum]".
  [[noreturn]] void out_of_range(const std::string& field, const std::string& value,
                                 long long minimum, long long maximum,
                                 const std::string& why = "") const {
    throw runtime_error("kmoe::models: " + path_ + ": field \"" + field + "\" = " + value +
                        " must be in [" + std::to_string(minimum) + ", " + std::to_string(maximum) +
                        "]" + why);
  }

 private:
  const nlohmann::json& get(const std::string& field) const {
    if (!has(field))
      throw runtime_error("kmoe::models: " + path_ + ": missing field \"" + field + "\"");
    return json_.at(field);
  }
  [[noreturn]] void wrong_type(const std::string& field, const char* expected) const {
    throw runtime_error("kmoe::models: " + path_ + ": field \"" + field +
                        "\" = " + io::json_excerpt(json_.at(field)) + " must be " + expected);
  }

  std::string path_;
  nlohmann::json json_;
};

/// \brief The `model_type` of the model in `model_dir` ("mixtral", "deepseek_v3", ...).
inline std::string load_model_type(const std::string& model_dir) {
  return ConfigFile(model_dir).string("model_type");
}

/// \brief How a checkpoint stores the routed experts: one tensor per expert and projection
/// (`experts.3.w1.weight`, what released checkpoints and transformers' default
/// save_pretrained write), or transformers 5.x's fused 3-D tensors (`experts.gate_up_proj`
/// [E, 2F, H] with the gate rows first, `experts.down_proj` [E, H, F]), which
/// save_pretrained(..., save_original_format=False) writes and some models are published in.
enum class ExpertLayout { per_expert, fused };

inline const char* layout_name(ExpertLayout layout) {
  return layout == ExpertLayout::fused ? "fused" : "per-expert";
}

/// \brief Everything a loader needs about one layer's MoE block, read from config.json.
/// Every size in it has been checked: each checkpoint matrix holds at most
/// max_matrix_elements, top_k and the groups fit the experts.
struct MoEBlockConfig {
  std::string model_type;
  std::string config_path;
  int layer = 0;
  ExpertLayout layout = ExpertLayout::per_expert;
  /// Checkpoint name prefix of the block in `layout`, e.g. "model.layers.1.mlp.": one of
  /// the two below (Mixtral's block is `block_sparse_moe` per expert, `mlp` fused).
  std::string prefix;
  std::string per_expert_prefix, fused_prefix;
  int hidden = 0, experts = 0, top_k = 0, ffn = 0;
  bool normalize = false;
  double scaling_factor = 1.0;
  /// DeepSeek-V3 group-limited routing (n_group = topk_group = 1 disables it); the layer's
  /// GroupLimit scores a group by the sum of its two best biased scores.
  int n_group = 1, topk_group = 1;
  int shared_ffn = 0;  ///< F of the shared expert (n_shared_experts folded in); 0 if none
  /// Checkpoint names of an expert's gate, up and down projections, and the names of the
  /// expert list and shared expert inside the block.
  std::string gate_proj, up_proj, down_proj;
  std::string experts_scope = "experts.", shared_scope;
  /// Checkpoint name of the selection bias (DeepSeek-V3 e_score_correction_bias), or empty.
  std::string selection_bias;
};

/// \brief One kmoe parameter, or one expert's slice of it, and where the checkpoint holds
/// it: elements [offset, offset + count) of the checkpoint tensor `checkpoint` (the whole
/// tensor in the per-expert layout; one expert's rows of a fused tensor otherwise).
struct CheckpointTensor {
  std::string parameter;   ///< kmoe parameter name: "router.weight", "experts.w_gate", ...
  int expert = -1;         ///< slice along the leading (expert) extent, -1 for the whole tensor
  std::string checkpoint;  ///< e.g. "model.layers.1.block_sparse_moe.experts.3.w1.weight"
  std::vector<std::int64_t> shape;  ///< extents of the whole checkpoint tensor
  std::int64_t offset = 0;          ///< first element of the slice in the checkpoint tensor
  std::int64_t count = 0;           ///< elements of the slice
};

namespace detail {

inline void require_silu(const ConfigFile& config) {
  const std::string act = config.string("hidden_act");
  if (act != "silu")
    throw runtime_error("kmoe::models: " + config.path() + ": field \"hidden_act\" = \"" +
                        io::excerpt(act) +
                        "\" is not supported: kmoe builds SwiGLU experts, which need \"silu\"");
}

inline void require_value(const ConfigFile& config, const std::string& field,
                          const std::string& expected) {
  // transformers 4.57 does not write these DeepSeek-V3 fields; the released configs do.
  if (!config.has(field)) return;
  const std::string value = config.string(field);
  if (value != expected)
    throw runtime_error("kmoe::models: " + config.path() + ": field \"" + field + "\" = \"" +
                        io::excerpt(value) + "\" is not supported (only \"" + expected + "\")");
}

[[noreturn]] inline void dense_layer(const ConfigFile& config, int layer, const std::string& why) {
  throw invalid_argument("kmoe::models", "layer", std::to_string(layer),
                         "decoder layer " + std::to_string(layer) + " of " + config.path() +
                             " is a dense MLP, not an MoE block (" + why + ")");
}

/// a × b for two config fields, or runtime_error naming both fields, the file and the limit.
inline std::int64_t field_product(const ConfigFile& config, const std::string& field_a,
                                  std::int64_t a, const std::string& field_b, std::int64_t b,
                                  std::int64_t limit, const char* what) {
  const std::string fields = field_a + " x " + field_b;
  try {
    return kmoe::detail::checked_mul(a, b, "kmoe::models", fields.c_str(), limit);
  } catch (const invalid_argument& e) {
    throw runtime_error("kmoe::models: " + config.path() + ": fields " + fields + " = " +
                        std::to_string(a) + " x " + std::to_string(b) + " give " + what +
                        " larger than " + std::to_string(limit) + " elements (" + e.what() + ")");
  }
}

/// The checks every family shares: sizes of each checkpoint matrix, and top_k against the
/// experts.
inline void check_sizes(const ConfigFile& config, const MoEBlockConfig& b,
                        const std::string& ffn_field, const std::string& experts_field) {
  if (b.top_k > b.experts)
    config.out_of_range("num_experts_per_tok", std::to_string(b.top_k), 1, b.experts,
                        " (" + experts_field + " = " + std::to_string(b.experts) + ")");
  field_product(config, "hidden_size", b.hidden, ffn_field, b.ffn, max_matrix_elements,
                "an expert projection");
  field_product(config, experts_field, b.experts, "hidden_size", b.hidden, max_matrix_elements,
                "a router weight");
  // The stacked [E, F, H] tensors then hold at most max_experts × 2^31 elements, which
  // Kokkos sizes in 64 bits.
}

inline MoEBlockConfig mixtral_block(const ConfigFile& config, MoEBlockConfig b) {
  b.prefix = b.per_expert_prefix = "model.layers." + std::to_string(b.layer) + ".block_sparse_moe.";
  b.fused_prefix = "model.layers." + std::to_string(b.layer) + ".mlp.";
  b.hidden = config.count("hidden_size", 1);
  b.ffn = config.count("intermediate_size", 1);
  b.experts = config.count("num_local_experts", 1, max_experts);
  b.top_k = config.count("num_experts_per_tok", 1);
  b.normalize = true;  // MixtralSparseMoeBlock always renormalises the top-k weights
  b.gate_proj = "w1", b.up_proj = "w3", b.down_proj = "w2";
  check_sizes(config, b, "intermediate_size", "num_local_experts");
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
  b.prefix = b.per_expert_prefix = b.fused_prefix =
      "model.layers." + std::to_string(b.layer) + ".mlp.";
  b.hidden = config.count("hidden_size", 1);
  b.ffn = config.count("moe_intermediate_size", 1);
  // transformers 4.x writes num_experts, 5.x num_local_experts (its attribute_map).
  const std::string experts_field = config.either({"num_experts", "num_local_experts"});
  b.experts = config.count(experts_field, 1, max_experts);
  b.top_k = config.count("num_experts_per_tok", 1);
  b.normalize = config.boolean("norm_topk_prob");
  b.gate_proj = "gate_proj", b.up_proj = "up_proj", b.down_proj = "down_proj";
  check_sizes(config, b, "moe_intermediate_size", experts_field);
  return b;
}

/// The largest number of groups the sigmoid-bias router accepts (kmoe/detail/topk.hpp).
inline constexpr int max_router_groups = 64;

inline MoEBlockConfig deepseek_v3_block(const ConfigFile& config, MoEBlockConfig b) {
  require_value(config, "scoring_func", "sigmoid");
  require_value(config, "topk_method", "noaux_tc");
  const int first_moe = config.count("first_k_dense_replace", 0);
  if (b.layer < first_moe)
    dense_layer(config, b.layer, "\"first_k_dense_replace\" = " + std::to_string(first_moe));
  // transformers ignores moe_layer_freq; DeepSeek's own code honours it (1 in V3).
  const int freq = config.has("moe_layer_freq") ? config.count("moe_layer_freq", 1) : 1;
  if (b.layer % freq != 0)
    dense_layer(config, b.layer, "\"moe_layer_freq\" = " + std::to_string(freq));
  b.prefix = b.per_expert_prefix = b.fused_prefix =
      "model.layers." + std::to_string(b.layer) + ".mlp.";
  b.hidden = config.count("hidden_size", 1);
  b.ffn = config.count("moe_intermediate_size", 1);
  b.experts = config.count("n_routed_experts", 1, max_experts);
  b.top_k = config.count("num_experts_per_tok", 1);
  b.normalize = config.boolean("norm_topk_prob");
  b.scaling_factor = config.positive_number("routed_scaling_factor");
  b.n_group = config.count("n_group", 1, max_router_groups);
  if (b.experts % b.n_group != 0)
    config.out_of_range("n_group", std::to_string(b.n_group), 1, max_router_groups,
                        " and divide n_routed_experts = " + std::to_string(b.experts));
  b.topk_group = config.count("topk_group", 1, b.n_group);
  check_sizes(config, b, "moe_intermediate_size", "n_routed_experts");
  const int eligible = b.topk_group * (b.experts / b.n_group);
  if (b.top_k > eligible)
    config.out_of_range("num_experts_per_tok", std::to_string(b.top_k), 1, eligible,
                        " (the experts of topk_group = " + std::to_string(b.topk_group) +
                            " groups)");
  const int shared = config.has("n_shared_experts") ? config.count("n_shared_experts", 0) : 0;
  // The shared expert is one SwiGLU of width n_shared_experts × moe_intermediate_size: a
  // product that does not fit must fail, not shrink the expert.
  b.shared_ffn =
      int(field_product(config, "n_shared_experts", shared, "moe_intermediate_size", b.ffn,
                        std::numeric_limits<int>::max(), "a shared expert width"));
  field_product(config, "hidden_size", b.hidden, "n_shared_experts x moe_intermediate_size",
                b.shared_ffn, max_matrix_elements, "a shared expert projection");
  b.gate_proj = "gate_proj", b.up_proj = "up_proj", b.down_proj = "down_proj";
  b.shared_scope = "shared_experts.";
  b.selection_bias = b.prefix + "gate.e_score_correction_bias";
  return b;
}

}  // namespace detail

/// \brief Reads `model_dir/config.json` and describes the MoE block of decoder layer `layer`.
///
/// Throws kmoe::invalid_argument for a layer index out of range or naming a dense layer,
/// kmoe::runtime_error for an unreadable or malformed file, an unknown model_type, a
/// missing, mistyped or out-of-range field, sizes whose products do not fit (see
/// max_matrix_elements), or a setting kmoe cannot reproduce (hidden_act other than silu,
/// DeepSeek scoring other than sigmoid / noaux_tc); every message names the field and the
/// file.
inline MoEBlockConfig read_block_config(const std::string& model_dir, int layer) {
  const ConfigFile config(model_dir);
  MoEBlockConfig b;
  b.model_type = config.string("model_type");
  b.config_path = config.path();
  b.layer = layer;
  if (b.model_type != "mixtral" && b.model_type != "qwen3_moe" && b.model_type != "deepseek_v3")
    throw runtime_error("kmoe::models: " + config.path() + ": field \"model_type\" = \"" +
                        io::excerpt(b.model_type) +
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

/// \brief `b` with its routed experts stored in `layout`: the checkpoint names (and the
/// block prefix, which differs for Mixtral) of that layout.
inline MoEBlockConfig with_layout(MoEBlockConfig b, ExpertLayout layout) {
  const std::string& to = layout == ExpertLayout::fused ? b.fused_prefix : b.per_expert_prefix;
  if (!b.selection_bias.empty()) b.selection_bias = to + b.selection_bias.substr(b.prefix.size());
  b.prefix = to;
  b.layout = layout;
  return b;
}

/// \brief Calls `visit(const CheckpointTensor&)` for every entry of checkpoint_tensors(b),
/// in the same order, one at a time.
template <class Visit>
void for_each_checkpoint_tensor(const MoEBlockConfig& b, const Visit& visit) {
  using Shape = std::vector<std::int64_t>;
  const std::int64_t E = b.experts, H = b.hidden, F = b.ffn;
  visit(CheckpointTensor{"router.weight", -1, b.prefix + "gate.weight", Shape{E, H}, 0, E * H});
  const std::pair<const char*, const std::string*> projections[] = {
      {"w_gate", &b.gate_proj}, {"w_up", &b.up_proj}, {"w_down", &b.down_proj}};
  for (const auto& [param, proj] : projections) {
    const bool down = std::string(param) == "w_down";
    for (std::int64_t e = 0; e < E; ++e) {
      CheckpointTensor t{std::string("experts.") + param, int(e), "", {}, 0, F * H};
      if (b.layout == ExpertLayout::per_expert) {
        t.checkpoint = b.prefix + b.experts_scope + std::to_string(e) + "." + *proj + ".weight";
        t.shape = down ? Shape{H, F} : Shape{F, H};
      } else if (down) {
        t.checkpoint = b.prefix + b.experts_scope + "down_proj";
        t.shape = Shape{E, H, F}, t.offset = e * H * F;
      } else {
        // [E, 2F, H]: expert e's gate rows, then its up rows.
        t.checkpoint = b.prefix + b.experts_scope + "gate_up_proj";
        t.shape = Shape{E, 2 * F, H},
        t.offset = e * 2 * F * H + (std::string(param) == "w_up" ? F * H : 0);
      }
      visit(t);
    }
  }
  if (b.shared_ffn > 0) {
    const std::int64_t S = b.shared_ffn;
    for (const auto& [param, proj] : projections)
      visit(CheckpointTensor{std::string("shared.") + param, 0,
                             b.prefix + b.shared_scope + *proj + ".weight",
                             std::string(param) == "w_down" ? Shape{H, S} : Shape{S, H}, 0, S * H});
  }
}

/// \brief Every trainable kmoe parameter of the block and the checkpoint tensor holding it:
/// the router weight whole, stacked expert tensors one expert slice at a time. The
/// DeepSeek-V3 selection bias is a buffer, not a parameter, so it is not listed.
inline std::vector<CheckpointTensor> checkpoint_tensors(const MoEBlockConfig& b) {
  std::vector<CheckpointTensor> out;
  for_each_checkpoint_tensor(b, [&](const CheckpointTensor& t) { out.push_back(t); });
  return out;
}

namespace detail {

inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

inline void require_tensor(const io::ShardedCheckpoint& checkpoint, const MoEBlockConfig& b,
                           const std::string& name, const std::vector<std::int64_t>& shape) {
  if (!checkpoint.contains(name))
    throw runtime_error("kmoe::models: checkpoint " + checkpoint.directory() + " (" + b.model_type +
                        ", layer " + std::to_string(b.layer) + ", " + layout_name(b.layout) +
                        " layout) has no tensor \"" + name + "\"");
  const io::TensorInfo& info = checkpoint.info(name);
  if (info.shape != shape)
    throw runtime_error("kmoe::models: " + checkpoint.path_of(name) + ": tensor \"" + name +
                        "\" has shape " + io::excerpt(shape_string(info.shape)) +
                        ", config.json implies " + shape_string(shape));
  if (!io::is_floating(info.dtype))
    throw runtime_error("kmoe::models: " + checkpoint.path_of(name) + ": tensor \"" + name +
                        "\" has dtype " + io::dtype_name(info.dtype) +
                        "; weights must be F16, BF16, F32 or F64");
}

}  // namespace detail

/// \brief The layout `checkpoint` stores block `b`'s routed experts in, told from the tensor
/// names: a fused `experts.gate_up_proj`, or expert 0's gate projection. A checkpoint
/// holding both is refused, since either set could be the stale one; one holding neither
/// is reported as per-expert, so that check_checkpoint names the first missing tensor.
inline ExpertLayout detect_layout(const MoEBlockConfig& b,
                                  const io::ShardedCheckpoint& checkpoint) {
  const MoEBlockConfig per = with_layout(b, ExpertLayout::per_expert);
  const MoEBlockConfig fused = with_layout(b, ExpertLayout::fused);
  const std::string per_name = per.prefix + per.experts_scope + "0." + per.gate_proj + ".weight";
  const std::string fused_name = fused.prefix + fused.experts_scope + "gate_up_proj";
  const bool has_per = checkpoint.contains(per_name), has_fused = checkpoint.contains(fused_name);
  if (has_per && has_fused)
    throw runtime_error("kmoe::models: checkpoint " + checkpoint.directory() + " (" + b.model_type +
                        ", layer " + std::to_string(b.layer) + ") holds both \"" + per_name +
                        "\" (per-expert layout) and \"" + fused_name +
                        "\" (fused layout); it must hold one layout only");
  return has_fused ? ExpertLayout::fused : ExpertLayout::per_expert;
}

/// \brief Checks that `checkpoint` holds every tensor of block `b` (router first, so an
/// absurd expert count fails on one tensor), with the shape config.json implies and a
/// floating dtype; throws kmoe::runtime_error naming the tensor and the directory. Run
/// before any layer is allocated: the sizes in config.json are only claims until the
/// checkpoint's data backs them. A fused tensor is checked once, not once per slice.
inline void check_checkpoint(const MoEBlockConfig& b, const io::ShardedCheckpoint& checkpoint) {
  std::string previous;
  for_each_checkpoint_tensor(b, [&](const CheckpointTensor& t) {
    if (t.checkpoint == previous) return;
    detail::require_tensor(checkpoint, b, t.checkpoint, t.shape);
    previous = t.checkpoint;
  });
  if (!b.selection_bias.empty())
    detail::require_tensor(checkpoint, b, b.selection_bias, {b.experts});
}

/// \brief read_block_config for the layout `checkpoint` stores the block in (detect_layout),
/// with every tensor of it checked (check_checkpoint).
inline MoEBlockConfig read_block(const std::string& model_dir, int layer,
                                 const io::ShardedCheckpoint& checkpoint) {
  const MoEBlockConfig b = read_block_config(model_dir, layer);
  MoEBlockConfig resolved = with_layout(b, detect_layout(b, checkpoint));
  check_checkpoint(resolved, checkpoint);
  return resolved;
}

}  // namespace kmoe::models
