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

  /// \brief The nested config object `field` (e.g. a multimodal model's "text_config"),
  /// read like the file; its errors name the field by its path ("text_config.num_experts").
  ConfigFile section(const std::string& field) const {
    const auto& v = get(field);
    if (!v.is_object()) wrong_type(field, "a JSON object");
    ConfigFile nested(*this);
    nested.json_ = v;
    nested.scope_ = scope_ + field + ".";
    return nested;
  }

  /// \brief `field` as error messages name it: its path from the top of the file.
  std::string qualified(const std::string& field) const { return scope_ + field; }

  /// `field`'s JSON value as it stands (for an error message quoting it).
  const nlohmann::json& raw(const std::string& field) const { return get(field); }

  /// Whether `field` is set to a JSON array.
  bool is_array(const std::string& field) const { return has(field) && json_.at(field).is_array(); }

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
  /// A finite number, zero or more.
  double non_negative_number(const std::string& field) const {
    const auto& v = get(field);
    if (!v.is_number()) wrong_type(field, "a number");
    const double x = v.get<double>();
    if (!(x >= 0) || !std::isfinite(x)) wrong_type(field, "a finite number >= 0");
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
      names += std::string(names.empty() ? "" : " or ") + "\"" + qualified(field) + "\"";
      if (!has(field)) continue;
      if (!found.empty() && json_.at(found) != json_.at(field))
        throw runtime_error("kmoe::models: " + path_ + ": fields \"" + qualified(found) +
                            "\" = " + io::json_excerpt(json_.at(found)) + " and \"" +
                            qualified(field) + "\" = " + io::json_excerpt(json_.at(field)) +
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
    throw runtime_error("kmoe::models: " + path_ + ": field \"" + qualified(field) +
                        "\" = " + value + " must be in [" + std::to_string(minimum) + ", " +
                        std::to_string(maximum) + "]" + why);
  }

 private:
  const nlohmann::json& get(const std::string& field) const {
    if (!has(field))
      throw runtime_error("kmoe::models: " + path_ + ": missing field \"" + qualified(field) +
                          "\"");
    return json_.at(field);
  }
  [[noreturn]] void wrong_type(const std::string& field, const char* expected) const {
    throw runtime_error("kmoe::models: " + path_ + ": field \"" + qualified(field) +
                        "\" = " + io::json_excerpt(json_.at(field)) + " must be " + expected);
  }

  std::string path_;
  std::string scope_;  ///< "" at the top of the file, "text_config." inside that section
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

/// \brief The router a family's block uses: softmax over all experts then top-k (Mixtral,
/// Qwen3-MoE, DeepSeek-V2, ...: kmoe::SoftmaxTopKRouter), sigmoid scores with a selection
/// bias (DeepSeek-V3 and its descendants: kmoe::SigmoidBiasRouter), top-k of the logits
/// then a softmax over the chosen (Granite-MoE: kmoe::TopKSoftmaxRouter), or sparsemixer's
/// inference path (Phi-MoE: kmoe::SparseMixerRouter).
enum class BlockRouter { softmax_topk, sigmoid_bias, topk_softmax, sparse_mixer };

/// \brief The routed experts a family's block uses: SwiGLU (kmoe::SwiGLUExperts, every family
/// but one), or GPT-OSS's clamped, alpha-scaled SwiGLU with biases
/// (kmoe::ClampedSwiGLUExperts).
enum class BlockExperts { swiglu, clamped_swiglu };

/// \brief One way a family's checkpoints name a block's router and routed experts.
struct CheckpointNaming {
  ExpertLayout layout = ExpertLayout::per_expert;
  std::string prefix;         ///< of the block, e.g. "model.layers.1.mlp."
  std::string router_weight;  ///< relative to prefix, e.g. "gate.weight"
  /// Fused layout: the [E, 2F, H] gate-then-up and [E, H, F] tensors, relative to prefix.
  std::string fused_gate_up, fused_down;
  /// Fused tensors stored transposed: gate_up [E, H, 2F] (gate columns first), down
  /// [E, F, H] (Qwen3-VL-MoE's own checkpoints).
  bool transposed = false;
  /// With `transposed`: gate and up columns interleaved (gate 2f, up 2f + 1; GPT-OSS).
  bool interleaved = false;
  /// Biases relative to prefix, empty if none: the router's [E] (GPT-OSS "router.bias"),
  /// the fused gate-up [E, 2F] (laid out as gate_up's columns) and down [E, H] ones.
  std::string router_bias, fused_gate_up_bias, fused_down_bias;
  /// DBRX: three 2-D [E·F, H] tensors, relative to prefix: expert e's gate and up rows
  /// e·F ... e·F + F - 1, and its down projection stored as its transpose [F, H].
  std::string stacked_gate, stacked_up, stacked_down;
  /// Selection bias relative to prefix (DeepSeek-V3 "gate.e_score_correction_bias"), or
  /// empty; ERNIE-4.5 names it differently in its two layouts.
  std::string selection_bias;
};

/// \brief Everything a loader needs about one layer's MoE block, read from config.json.
/// Every size in it has been checked: each checkpoint matrix holds at most
/// max_matrix_elements, top_k and the groups fit the experts.
struct MoEBlockConfig {
  std::string model_type;
  std::string config_path;
  int layer = 0;
  /// Every naming the family's checkpoints come in (transformers' per-expert and fused
  /// ones; Mixtral's block is `block_sparse_moe` in one, `mlp` in the other), and the one
  /// in use (namings[naming]; detect_naming picks it from a checkpoint's names).
  std::vector<CheckpointNaming> namings;
  std::size_t naming = 0;
  ExpertLayout layout = ExpertLayout::per_expert;  ///< namings[naming].layout
  std::string prefix;                              ///< namings[naming].prefix
  int hidden = 0, experts = 0, top_k = 0, ffn = 0;
  bool normalize = false;
  double scaling_factor = 1.0;
  BlockRouter router = BlockRouter::softmax_topk;
  /// BlockRouter::sparse_mixer: eps of its masks (Phi-MoE's router_jitter_noise).
  double jitter_eps = 0.0;
  BlockExperts expert_kind = BlockExperts::swiglu;
  /// BlockExperts::clamped_swiglu: the sigmoid gain and the clamp (kmoe::ClampedSwiGLU).
  double swiglu_alpha = 1.702, swiglu_limit = 7.0;
  /// Group-limited routing (n_group = topk_group = 1 disables it): a group's score is the
  /// sum of its `group_score_terms` best scores (DeepSeek-V3: 2; DeepSeek-V2: 1, the max).
  int n_group = 1, topk_group = 1, group_score_terms = 2;
  int shared_ffn = 0;  ///< F of the shared expert (n_shared_experts folded in); 0 if none
  /// Per-expert layout: an expert's gate, up and down projections are named
  /// prefix + experts_scope + e + "." + <proj> + ".weight".
  std::string gate_proj, up_proj, down_proj;
  std::string experts_scope = "experts.";
  /// The shared expert's tensors (absolute names, the same in every naming):
  /// shared_prefix + <proj> + ".weight", or, if shared_gate_up is set, one [2F, H]
  /// gate-then-up tensor and shared_down [H, F] (Granite's shared_mlp).
  std::string shared_prefix, shared_gate_up, shared_down;
  /// The shared expert's output scaled per token by sigmoid(x · w), w [1, H] named
  /// `shared_gate` (Qwen2-MoE's shared_expert_gate.weight); empty if ungated.
  std::string shared_gate;
  /// The selection bias's checkpoint shape ([E]; ERNIE-4.5: [1, E]), if the namings have one.
  std::vector<std::int64_t> selection_bias_shape;
  /// Renormalisation divides by max(sum of the chosen weights, norm_min) (ERNIE-4.5).
  double norm_min = 0.0;
  /// The routing weight scales each expert's input and the expert outputs are added with
  /// weight 1 (Llama 4); the loaders build the layer with RoutingWeightPlacement::input.
  bool weight_on_input = false;

  const CheckpointNaming& current_naming() const { return namings.at(naming); }
  std::string router_name() const { return prefix + current_naming().router_weight; }
  bool has_selection_bias() const { return !current_naming().selection_bias.empty(); }
  /// The checkpoint name of the selection bias (has_selection_bias()).
  std::string selection_bias_name() const { return prefix + current_naming().selection_bias; }
  bool has_router_bias() const { return !current_naming().router_bias.empty(); }
  bool has_expert_bias() const { return !current_naming().fused_gate_up_bias.empty(); }
};

/// \brief A naming with one tensor per expert and projection.
inline CheckpointNaming per_expert_naming(const std::string& prefix,
                                          const std::string& router_weight) {
  CheckpointNaming n;
  n.prefix = prefix, n.router_weight = router_weight;
  return n;
}

/// \brief A naming with the fused gate-up and down tensors `gate_up`, `down` (relative to
/// `prefix`), stored [E, 2F, H] / [E, H, F], or transposed [E, H, 2F] / [E, F, H].
inline CheckpointNaming fused_naming(const std::string& prefix, const std::string& router_weight,
                                     const std::string& gate_up, const std::string& down,
                                     bool transposed = false) {
  CheckpointNaming n;
  n.layout = ExpertLayout::fused;
  n.prefix = prefix, n.router_weight = router_weight;
  n.fused_gate_up = gate_up, n.fused_down = down, n.transposed = transposed;
  return n;
}

/// \brief Namings of a block written by transformers: per expert under `per_expert_prefix`
/// and fused (experts.gate_up_proj, experts.down_proj) under `fused_prefix`.
inline std::vector<CheckpointNaming> transformers_namings(
    const std::string& per_expert_prefix, const std::string& fused_prefix,
    const std::string& router_weight = "gate.weight") {
  return {per_expert_naming(per_expert_prefix, router_weight),
          fused_naming(fused_prefix, router_weight, "experts.gate_up_proj", "experts.down_proj")};
}

/// \brief `b` using namings[index].
inline MoEBlockConfig with_naming(MoEBlockConfig b, std::size_t index) {
  b.naming = index;
  b.layout = b.current_naming().layout;
  b.prefix = b.current_naming().prefix;
  return b;
}

/// \brief `b` with its routed experts stored in `layout` (the family's first naming of that
/// layout); kmoe::invalid_argument if the family has none.
inline MoEBlockConfig with_layout(const MoEBlockConfig& b, ExpertLayout layout) {
  for (std::size_t i = 0; i < b.namings.size(); ++i)
    if (b.namings[i].layout == layout) return with_naming(b, i);
  throw invalid_argument("kmoe::models::with_layout", "layout", layout_name(layout),
                         "model_type \"" + b.model_type + "\" is not written in that layout");
}

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
  /// A transposed slice (region_rows > 0): the checkpoint holds, from `offset`, a row-major
  /// [region_rows, region_cols] matrix M, and the parameter slice P, of extents
  /// [count / region_rows, region_rows], is P[i][j] = M[j][first_column + i * column_stride]
  /// (column_stride 2: every other column, GPT-OSS's interleaved gate and up).
  std::int64_t region_rows = 0, region_cols = 0, first_column = 0, column_stride = 1;
  /// Where P[i][j] lies in M (row-major, from `offset`).
  std::int64_t region_index(std::int64_t i, std::int64_t j) const {
    return j * region_cols + first_column + i * column_stride;
  }
  bool transposed() const { return region_rows > 0; }
  /// Elements read from the checkpoint for this slice.
  std::int64_t region_count() const { return transposed() ? region_rows * region_cols : count; }
};

namespace detail {

/// "model.layers.<layer>.", where transformers' decoder layers keep their blocks.
inline std::string layer_prefix(const MoEBlockConfig& b) {
  return "model.layers." + std::to_string(b.layer) + ".";
}

inline void require_silu(const ConfigFile& config, const std::string& field) {
  const std::string act = config.string(field);
  if (act != "silu")
    throw runtime_error("kmoe::models: " + config.path() + ": field \"" + config.qualified(field) +
                        "\" = \"" + io::excerpt(act) +
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

/// Mixtral and MiniMax (MiniMaxSparseMoeBlock is Mixtral's block; MiniMax's residual
/// scaling lies outside it).
inline MoEBlockConfig mixtral_block(const ConfigFile& config, MoEBlockConfig b) {
  b.namings = transformers_namings(layer_prefix(b) + "block_sparse_moe.", layer_prefix(b) + "mlp.");
  b.hidden = config.count("hidden_size", 1);
  b.ffn = config.count("intermediate_size", 1);
  b.experts = config.count("num_local_experts", 1, max_experts);
  b.top_k = config.count("num_experts_per_tok", 1);
  b.normalize = true;  // MixtralSparseMoeBlock always renormalises the top-k weights
  b.gate_proj = "w1", b.up_proj = "w3", b.down_proj = "w2";
  check_sizes(config, b, "intermediate_size", "num_local_experts");
  return b;
}

/// The fields of a Qwen3-MoE-style block (`mlp`, softmax top-k renormalised iff
/// norm_topk_prob), its expert width under `ffn_field`.
inline MoEBlockConfig qwen3_style_block(const ConfigFile& config, MoEBlockConfig b,
                                        const std::string& ffn_field,
                                        const char* normalize_field = "norm_topk_prob") {
  b.namings = transformers_namings(layer_prefix(b) + "mlp.", layer_prefix(b) + "mlp.");
  b.hidden = config.count("hidden_size", 1);
  b.ffn = config.count(ffn_field, 1);
  // transformers 4.x writes num_experts, 5.x num_local_experts (its attribute_map).
  const std::string experts_field = config.either({"num_experts", "num_local_experts"});
  b.experts = config.count(experts_field, 1, max_experts);
  b.top_k = config.count("num_experts_per_tok", 1);
  // Without a normalize_field the block always renormalises.
  b.normalize = normalize_field == nullptr || config.boolean(normalize_field);
  b.gate_proj = "gate_proj", b.up_proj = "up_proj", b.down_proj = "down_proj";
  check_sizes(config, b, ffn_field, experts_field);
  return b;
}

/// Qwen3MoeDecoderLayer (and Qwen3-VL-MoE's): dense if listed in mlp_only_layers or off
/// the sparse step.
inline void require_qwen3_moe_layer(const ConfigFile& config, int layer) {
  if (config.has("mlp_only_layers")) {
    const auto dense = config.integers("mlp_only_layers");
    if (std::find(dense.begin(), dense.end(), layer) != dense.end())
      dense_layer(config, layer, "listed in \"" + config.qualified("mlp_only_layers") + "\"");
  }
  const int step = config.has("decoder_sparse_step") ? config.count("decoder_sparse_step", 1) : 1;
  if ((layer + 1) % step != 0)
    dense_layer(config, layer,
                "\"" + config.qualified("decoder_sparse_step") + "\" = " + std::to_string(step));
}

inline MoEBlockConfig qwen3_moe_block(const ConfigFile& config, MoEBlockConfig b) {
  require_qwen3_moe_layer(config, b.layer);
  return qwen3_style_block(config, b, "moe_intermediate_size");
}

/// DeepSeek's shared expert: one SwiGLU of width n_shared_experts × moe_intermediate_size
/// (absent or null: none); a product that does not fit must fail, not shrink the expert.
inline void read_shared_experts(const ConfigFile& config, MoEBlockConfig& b) {
  const int shared = config.has("n_shared_experts") ? config.count("n_shared_experts", 0) : 0;
  b.shared_ffn =
      int(field_product(config, "n_shared_experts", shared, "moe_intermediate_size", b.ffn,
                        std::numeric_limits<int>::max(), "a shared expert width"));
  field_product(config, "hidden_size", b.hidden, "n_shared_experts x moe_intermediate_size",
                b.shared_ffn, max_matrix_elements, "a shared expert projection");
  b.shared_prefix = layer_prefix(b) + "mlp.shared_experts.";
}

/// The largest number of groups the sigmoid-bias router accepts (kmoe/detail/topk.hpp).
inline constexpr int max_router_groups = 64;

/// DeepSeek's group limit: n_group groups dividing the routed experts, topk_group kept.
inline void read_groups(const ConfigFile& config, MoEBlockConfig& b) {
  b.n_group = config.count("n_group", 1, max_router_groups);
  if (b.experts % b.n_group != 0)
    config.out_of_range("n_group", std::to_string(b.n_group), 1, max_router_groups,
                        " and divide n_routed_experts = " + std::to_string(b.experts));
  b.topk_group = config.count("topk_group", 1, b.n_group);
}

/// top_k must fit in the experts of the kept groups.
inline void require_top_k_in_groups(const ConfigFile& config, const MoEBlockConfig& b) {
  const int eligible = b.topk_group * (b.experts / b.n_group);
  if (b.top_k > eligible)
    config.out_of_range("num_experts_per_tok", std::to_string(b.top_k), 1, eligible,
                        " (the experts of topk_group = " + std::to_string(b.topk_group) +
                            " groups)");
}

/// DeepSeek's dense prefix: layers below first_k_dense_replace, and off moe_layer_freq
/// (transformers ignores moe_layer_freq; DeepSeek's own code honours it, 1 in V2 and V3).
inline void require_deepseek_moe_layer(const ConfigFile& config, int layer) {
  const int first_moe =
      config.has("first_k_dense_replace") ? config.count("first_k_dense_replace", 0) : 0;
  if (layer < first_moe)
    dense_layer(config, layer, "\"first_k_dense_replace\" = " + std::to_string(first_moe));
  const int freq = config.has("moe_layer_freq") ? config.count("moe_layer_freq", 1) : 1;
  if (layer % freq != 0) dense_layer(config, layer, "\"moe_layer_freq\" = " + std::to_string(freq));
}

/// Qwen3-VL-MoE's text model (Qwen3VLMoeTextSparseMoeBlock, fields under text_config):
/// Qwen3-MoE's block, always renormalised (its router ignores norm_topk_prob), under
/// model.language_model. Its own checkpoints store the fused experts transposed,
/// gate_up_proj [E, H, 2F] and down_proj [E, F, H]; transformers 5.x's fused naming is
/// the second.
inline MoEBlockConfig qwen3_vl_moe_block(const ConfigFile& config, MoEBlockConfig b) {
  require_qwen3_moe_layer(config, b.layer);
  b = qwen3_style_block(config, b, "moe_intermediate_size", nullptr);
  const std::string prefix = "model.language_model.layers." + std::to_string(b.layer) + ".mlp.";
  b.namings = {fused_naming(prefix, "gate.weight", "experts.gate_up_proj", "experts.down_proj",
                            true),
               fused_naming(prefix, "gate.weight", "experts.gate_up_proj", "experts.down_proj")};
  return b;
}

/// Qwen2-MoE and Qwen3-Next (Qwen2MoeSparseMoeBlock, Qwen3NextSparseMoeBlock): Qwen3-MoE's
/// block plus a shared expert of width shared_expert_intermediate_size whose output is
/// scaled per token by sigmoid(x · shared_expert_gate).
inline MoEBlockConfig qwen2_moe_block(const ConfigFile& config, MoEBlockConfig b) {
  require_qwen3_moe_layer(config, b.layer);
  b = qwen3_style_block(config, b, "moe_intermediate_size");
  b.shared_ffn = config.count("shared_expert_intermediate_size", 0);
  field_product(config, "hidden_size", b.hidden, "shared_expert_intermediate_size", b.shared_ffn,
                max_matrix_elements, "a shared expert projection");
  if (b.shared_ffn > 0) {
    b.shared_prefix = layer_prefix(b) + "mlp.shared_expert.";
    b.shared_gate = layer_prefix(b) + "mlp.shared_expert_gate.weight";
  }
  return b;
}

/// DBRX (DbrxFFN, `transformer.blocks.<L>.ffn`, fields under ffn_config): softmax top-k,
/// the weights divided by their Lp norm with p = moe_normalize_expert_weights (1, the
/// released value, is renormalisation; absent or null, none; any other p is refused), and
/// SwiGLU experts in three 2-D tensors (CheckpointNaming::stacked_*). moe_jitter_eps is
/// training-time input noise kmoe does not add (as Mixtral's router_jitter_noise).
inline MoEBlockConfig dbrx_block(const ConfigFile& config, MoEBlockConfig b) {
  const ConfigFile ffn = config.section("ffn_config");
  // transformers' default when ffn_act_fn is absent is {"name": "silu"}.
  if (ffn.has("ffn_act_fn")) require_silu(ffn.section("ffn_act_fn"), "name");
  CheckpointNaming naming;
  naming.layout = ExpertLayout::fused;
  naming.prefix = "transformer.blocks." + std::to_string(b.layer) + ".ffn.";
  naming.router_weight = "router.layer.weight";
  naming.stacked_gate = "experts.mlp.w1", naming.stacked_up = "experts.mlp.v1";
  naming.stacked_down = "experts.mlp.w2";
  b.namings = {naming};
  b.hidden = config.count("d_model", 1);
  b.ffn = ffn.count("ffn_hidden_size", 1);
  b.experts = ffn.count("moe_num_experts", 1, max_experts);
  b.top_k = ffn.count("moe_top_k", 1);
  if (ffn.has("moe_normalize_expert_weights")) {
    const double p = ffn.positive_number("moe_normalize_expert_weights");
    if (p != 1.0)
      throw runtime_error("kmoe::models: " + config.path() + ": field \"" +
                          ffn.qualified("moe_normalize_expert_weights") +
                          "\" = " + std::to_string(p) +
                          " is not supported: kmoe renormalises by the sum (p = 1) or not at all");
    b.normalize = true;
  }
  check_sizes(ffn, b, "ffn_hidden_size", "moe_num_experts");
  field_product(config, "moe_num_experts x ffn_hidden_size", std::int64_t(b.experts) * b.ffn,
                "d_model", b.hidden, std::numeric_limits<std::int64_t>::max() / 8,
                "a stacked expert tensor");
  return b;
}

/// Hunyuan-MoE (HunYuanMoEV1Moe): softmax top-k, always renormalised, router `gate.wg`,
/// plus a shared MLP of the experts' width (intermediate_size) added with weight 1.
/// moe_topk may list one top-k per layer; num_experts must be one count, because
/// transformers sizes the experts by num_local_experts, its alias of the whole field.
inline MoEBlockConfig hunyuan_v1_moe_block(const ConfigFile& config, MoEBlockConfig b) {
  b.namings =
      transformers_namings(layer_prefix(b) + "mlp.", layer_prefix(b) + "mlp.", "gate.wg.weight");
  b.hidden = config.count("hidden_size", 1);
  b.ffn = config.count("intermediate_size", 1);
  b.experts = config.count("num_experts", 1, max_experts);
  if (config.has("moe_topk") && config.is_array("moe_topk")) {
    const auto per_layer = config.integers("moe_topk");
    if (std::size_t(b.layer) >= per_layer.size())
      config.out_of_range("moe_topk", "a list of " + std::to_string(per_layer.size()), b.layer + 1,
                          max_experts, " entries (one top-k per layer)");
    if (per_layer[std::size_t(b.layer)] < 1 || per_layer[std::size_t(b.layer)] > b.experts)
      config.out_of_range("moe_topk[" + std::to_string(b.layer) + "]",
                          std::to_string(per_layer[std::size_t(b.layer)]), 1, b.experts);
    b.top_k = int(per_layer[std::size_t(b.layer)]);
  } else {
    b.top_k = config.count(config.either({"moe_topk", "num_experts_per_tok"}), 1);
  }
  b.normalize = true;
  b.gate_proj = "gate_proj", b.up_proj = "up_proj", b.down_proj = "down_proj";
  check_sizes(config, b, "intermediate_size", "num_experts");
  b.shared_ffn = b.ffn;
  b.shared_prefix = layer_prefix(b) + "mlp.shared_mlp.";
  return b;
}

/// Ernie4_5_MoeDecoderLayer: an MoE block on layer i if (i + 1) % moe_layer_interval == 0
/// and moe_layer_start_index <= i <= moe_layer_end_index (-1: the last layer), a dense MLP
/// otherwise; absent fields take transformers' defaults (1, -1, 1).
inline void require_ernie4_5_moe_layer(const ConfigFile& config, int layer) {
  const int interval = config.has("moe_layer_interval") ? config.count("moe_layer_interval", 1) : 1;
  if ((layer + 1) % interval != 0)
    dense_layer(config, layer, "\"moe_layer_interval\" = " + std::to_string(interval));
  const long long start =
      config.has("moe_layer_start_index") ? config.integer("moe_layer_start_index") : 1;
  if (layer < start)
    dense_layer(config, layer, "\"moe_layer_start_index\" = " + std::to_string(start));
  const long long end =
      config.has("moe_layer_end_index") ? config.integer("moe_layer_end_index") : -1;
  const long long last = end == -1 ? config.count("num_hidden_layers", 1) - 1 : end;
  if (layer > last) dense_layer(config, layer, "\"moe_layer_end_index\" = " + std::to_string(end));
}

/// ERNIE-4.5-MoE (Ernie4_5_MoeSparseMoeBlock): softmax over all experts; the top-k chosen by
/// p + moe_statics.e_score_correction_bias ([1, E], under the router `gate` in the fused
/// layout); the chosen p divided by max(their sum, moe_norm_min); plus the shared experts,
/// one MLP of width moe_num_shared_experts x moe_intermediate_size added with weight 1.
/// Absent optional fields take transformers' defaults (moe_num_shared_experts 2,
/// moe_norm_min 1e-12, use_bias false).
inline MoEBlockConfig ernie4_5_moe_block(const ConfigFile& config, MoEBlockConfig b) {
  require_ernie4_5_moe_layer(config, b.layer);
  if (config.has("use_bias") && config.boolean("use_bias"))
    throw runtime_error("kmoe::models: " + config.path() +
                        ": field \"use_bias\" = true is not supported (kmoe's shared expert has "
                        "no biases)");
  const std::string prefix = layer_prefix(b) + "mlp.";
  b.namings = transformers_namings(prefix, prefix);
  b.namings[0].selection_bias = "moe_statics.e_score_correction_bias";
  b.namings[1].selection_bias = "gate.moe_statics.e_score_correction_bias";
  b.hidden = config.count("hidden_size", 1);
  b.ffn = config.count("moe_intermediate_size", 1);
  // config.json says moe_num_experts / moe_k; num_experts / num_experts_per_tok are
  // transformers' attribute aliases of them.
  const std::string experts_field = config.either({"moe_num_experts", "num_experts"});
  b.experts = config.count(experts_field, 1, max_experts);
  b.top_k = config.count(config.either({"moe_k", "num_experts_per_tok"}), 1, b.experts);
  b.normalize = true;
  b.norm_min = config.has("moe_norm_min") ? config.non_negative_number("moe_norm_min") : 1e-12;
  b.selection_bias_shape = {1, b.experts};
  b.gate_proj = "gate_proj", b.up_proj = "up_proj", b.down_proj = "down_proj";
  check_sizes(config, b, "moe_intermediate_size", experts_field);
  const int shared =
      config.has("moe_num_shared_experts") ? config.count("moe_num_shared_experts", 0) : 2;
  b.shared_ffn =
      int(field_product(config, "moe_num_shared_experts", shared, "moe_intermediate_size", b.ffn,
                        std::numeric_limits<int>::max(), "a shared expert width"));
  field_product(config, "hidden_size", b.hidden, "moe_num_shared_experts x moe_intermediate_size",
                b.shared_ffn, max_matrix_elements, "a shared expert projection");
  b.shared_prefix = prefix + "shared_experts.";
  return b;
}

/// OLMoE and FlexOlmo: Qwen3-MoE's block, with the expert width under intermediate_size
/// and every layer an MoE layer.
inline MoEBlockConfig olmoe_block(const ConfigFile& config, MoEBlockConfig b) {
  return qwen3_style_block(config, b, "intermediate_size");
}

/// DeepSeek-V3, GLM-4-MoE and dots1 (transformers 5.x runs the same router code for all
/// three).
inline MoEBlockConfig deepseek_v3_block(const ConfigFile& config, MoEBlockConfig b) {
  require_value(config, "scoring_func", "sigmoid");
  require_value(config, "topk_method", "noaux_tc");
  config.count("first_k_dense_replace", 0);  // required: released V3 configs set it
  require_deepseek_moe_layer(config, b.layer);
  b.namings = transformers_namings(layer_prefix(b) + "mlp.", layer_prefix(b) + "mlp.");
  b.hidden = config.count("hidden_size", 1);
  b.ffn = config.count("moe_intermediate_size", 1);
  b.experts = config.count("n_routed_experts", 1, max_experts);
  b.top_k = config.count("num_experts_per_tok", 1);
  b.normalize = config.boolean("norm_topk_prob");
  b.scaling_factor = config.positive_number("routed_scaling_factor");
  read_groups(config, b);
  check_sizes(config, b, "moe_intermediate_size", "n_routed_experts");
  require_top_k_in_groups(config, b);
  read_shared_experts(config, b);
  b.gate_proj = "gate_proj", b.up_proj = "up_proj", b.down_proj = "down_proj";
  b.router = BlockRouter::sigmoid_bias;
  for (auto& naming : b.namings) naming.selection_bias = "gate.e_score_correction_bias";
  b.selection_bias_shape = {b.experts};
  return b;
}

/// DeepSeek-V2 (DeepseekV2Moe): softmax over all experts, top-k greedy or group-limited
/// greedy (a group scored by its best expert), weights scaled by routed_scaling_factor and
/// never renormalised, plus a shared expert.
inline MoEBlockConfig deepseek_v2_block(const ConfigFile& config, MoEBlockConfig b) {
  require_deepseek_moe_layer(config, b.layer);
  if (config.has("mlp_bias") && config.boolean("mlp_bias"))
    throw runtime_error("kmoe::models: " + config.path() +
                        ": field \"mlp_bias\" = true is not supported (kmoe's experts have no "
                        "biases)");
  // transformers 5.x ignores norm_topk_prob for DeepSeek-V2, DeepSeek's own code honours
  // it: with true the two references disagree, so neither is guessed.
  if (config.has("norm_topk_prob") && config.boolean("norm_topk_prob"))
    throw runtime_error("kmoe::models: " + config.path() +
                        ": field \"norm_topk_prob\" = true is not supported for deepseek_v2 "
                        "(transformers ignores it, DeepSeek's code renormalises)");
  b.namings = transformers_namings(layer_prefix(b) + "mlp.", layer_prefix(b) + "mlp.");
  b.hidden = config.count("hidden_size", 1);
  b.ffn = config.count("moe_intermediate_size", 1);
  b.experts = config.count("n_routed_experts", 1, max_experts);
  b.top_k = config.count("num_experts_per_tok", 1);
  b.normalize = false;
  b.scaling_factor =
      config.has("routed_scaling_factor") ? config.positive_number("routed_scaling_factor") : 1.0;
  const std::string method = config.has("topk_method") ? config.string("topk_method") : "greedy";
  if (method == "group_limited_greedy") {
    read_groups(config, b);
    b.group_score_terms = 1;
  } else if (method != "greedy") {
    throw runtime_error(
        "kmoe::models: " + config.path() + ": field \"topk_method\" = \"" + io::excerpt(method) +
        "\" is not supported (deepseek_v2: \"greedy\" or \"group_limited_greedy\")");
  }
  check_sizes(config, b, "moe_intermediate_size", "n_routed_experts");
  require_top_k_in_groups(config, b);
  read_shared_experts(config, b);
  b.gate_proj = "gate_proj", b.up_proj = "up_proj", b.down_proj = "down_proj";
  return b;
}

/// Jamba (JambaSparseMoeBlock, `feed_forward`): softmax top-k, never renormalised, the
/// router named `router`; MoE on layers with layer % expert_layer_period ==
/// expert_layer_offset (the others have a dense MLP).
inline MoEBlockConfig jamba_block(const ConfigFile& config, MoEBlockConfig b) {
  const int period = config.has("expert_layer_period") ? config.count("expert_layer_period", 1) : 2;
  const int offset =
      config.has("expert_layer_offset") ? config.count("expert_layer_offset", 0, period - 1) : 1;
  if (b.layer % period != offset)
    dense_layer(config, b.layer,
                "\"expert_layer_period\" = " + std::to_string(period) +
                    ", \"expert_layer_offset\" = " + std::to_string(offset));
  b.namings = transformers_namings(layer_prefix(b) + "feed_forward.",
                                   layer_prefix(b) + "feed_forward.", "router.weight");
  b.hidden = config.count("hidden_size", 1);
  b.ffn = config.count("intermediate_size", 1);
  const std::string experts_field = config.either({"num_experts", "num_local_experts"});
  b.experts = config.count(experts_field, 1, max_experts);
  b.top_k = config.count("num_experts_per_tok", 1);
  b.normalize = false;
  b.gate_proj = "gate_proj", b.up_proj = "up_proj", b.down_proj = "down_proj";
  check_sizes(config, b, "intermediate_size", experts_field);
  return b;
}

/// Granite-MoE and Granite-MoE-shared (GraniteMoeMoE, `block_sparse_moe`): top-k of the
/// logits, softmax over the chosen. Its own checkpoints are already fused, under other
/// names (input_linear [E, 2F, H] gate rows first, output_linear [E, H, F],
/// router.layer.weight); transformers 5.x's fused names are the second naming. The shared
/// MLP (shared_intermediate_size > 0) sits beside the block on the decoder layer and is
/// added with weight 1, as kmoe's shared expert is.
inline MoEBlockConfig granitemoe_block(const ConfigFile& config, MoEBlockConfig b) {
  const std::string prefix = layer_prefix(b) + "block_sparse_moe.";
  b.namings = {fused_naming(prefix, "router.layer.weight", "input_linear.weight",
                            "output_linear.weight"),
               fused_naming(prefix, "router.weight", "experts.gate_up_proj", "experts.down_proj")};
  b.router = BlockRouter::topk_softmax;
  b.hidden = config.count("hidden_size", 1);
  b.ffn = config.count("intermediate_size", 1);
  b.experts = config.count("num_local_experts", 1, max_experts);
  b.top_k = config.count("num_experts_per_tok", 1);
  b.normalize = true;  // a softmax over the chosen logits sums to 1
  check_sizes(config, b, "intermediate_size", "num_local_experts");
  if (b.model_type == "granitemoeshared") {
    b.shared_ffn =
        config.has("shared_intermediate_size") ? config.count("shared_intermediate_size", 0) : 0;
    field_product(config, "hidden_size", b.hidden, "shared_intermediate_size", b.shared_ffn,
                  max_matrix_elements / 2, "a shared MLP projection");
    b.shared_gate_up = layer_prefix(b) + "shared_mlp.input_linear.weight";
    b.shared_down = layer_prefix(b) + "shared_mlp.output_linear.weight";
  }
  return b;
}

/// Phi-MoE (PhimoeSparseMoeBlock; `block_sparse_moe` with router `gate.weight` in the
/// original layout, `mlp` with `router.weight` in 5.x's fused one): sparsemixer routing to
/// exactly two experts (transformers ignores num_experts_per_tok and routes to two, so any
/// other value is refused rather than followed or overridden), its masks' eps from
/// router_jitter_noise (default 0.01, as transformers'), SwiGLU experts w1 / w3 / w2.
/// input_jitter_noise only acts in training, on the random path kmoe does not take.
inline MoEBlockConfig phimoe_block(const ConfigFile& config, MoEBlockConfig b) {
  b.namings = {per_expert_naming(layer_prefix(b) + "block_sparse_moe.", "gate.weight"),
               fused_naming(layer_prefix(b) + "mlp.", "router.weight", "experts.gate_up_proj",
                            "experts.down_proj")};
  b.router = BlockRouter::sparse_mixer;
  b.hidden = config.count("hidden_size", 1);
  b.ffn = config.count("intermediate_size", 1);
  b.experts = config.count("num_local_experts", 2, max_experts);
  b.top_k = config.has("num_experts_per_tok") ? config.count("num_experts_per_tok", 1) : 2;
  if (b.top_k != 2)
    throw runtime_error("kmoe::models: " + config.path() + ": field \"" +
                        config.qualified("num_experts_per_tok") +
                        "\" = " + std::to_string(b.top_k) +
                        " is not supported: phimoe's sparsemixer routes every token to exactly 2 "
                        "experts (transformers ignores the field), so only 2 is read");
  b.jitter_eps =
      config.has("router_jitter_noise") ? config.non_negative_number("router_jitter_noise") : 0.01;
  b.normalize = false;  // each slot's weight is its own masked softmax; the two do not sum to 1
  b.gate_proj = "w1", b.up_proj = "w3", b.down_proj = "w2";
  check_sizes(config, b, "intermediate_size", "num_local_experts");
  return b;
}

/// Llama4TextDecoderLayer: MoE iff listed in moe_layers, or, without that list, on the
/// interleave step (layers step - 1, 2 step - 1, ...: transformers' default list).
inline void require_llama4_moe_layer(const ConfigFile& config, int layer) {
  if (config.has("moe_layers")) {
    const auto sparse = config.integers("moe_layers");
    if (std::find(sparse.begin(), sparse.end(), layer) == sparse.end())
      dense_layer(config, layer, "not listed in \"" + config.qualified("moe_layers") + "\"");
    return;
  }
  const int step =
      config.has("interleave_moe_layer_step") ? config.count("interleave_moe_layer_step", 1) : 1;
  if ((layer + 1) % step != 0)
    dense_layer(config, layer,
                "\"" + config.qualified("interleave_moe_layer_step") +
                    "\" = " + std::to_string(step));
}

/// Llama 4 (Llama4TextMoe under `feed_forward` of the decoder layers named `layers`):
/// router.weight [E, H]; experts chosen by the top-k logits, each run on sigmoid(logit) * x
/// and added with weight 1 (weight_on_input); experts fused and transposed (gate_up_proj
/// [E, H, 2F], down_proj [E, F, H], the only layout: transformers 5.x has no conversion for
/// them); a shared expert of the experts' width, added with weight 1.
inline MoEBlockConfig llama4_style_block(const ConfigFile& config, MoEBlockConfig b,
                                         const std::string& layers) {
  require_llama4_moe_layer(config, b.layer);
  const std::string prefix = layers + std::to_string(b.layer) + ".feed_forward.";
  b.namings = {fused_naming(prefix, "router.weight", "experts.gate_up_proj", "experts.down_proj",
                            /*transposed=*/true)};
  b.hidden = config.count("hidden_size", 1);
  b.ffn = config.count("intermediate_size", 1);
  b.experts = config.count("num_local_experts", 1, max_experts);
  b.top_k = config.count("num_experts_per_tok", 1);
  // SigmoidBiasRouter without bias, normalisation or scaling: sigmoid of the chosen logits.
  b.router = BlockRouter::sigmoid_bias;
  b.normalize = false;
  b.weight_on_input = true;
  b.gate_proj = "gate_proj", b.up_proj = "up_proj", b.down_proj = "down_proj";
  check_sizes(config, b, "intermediate_size", "num_local_experts");
  b.shared_ffn = b.ffn;
  b.shared_prefix = prefix + "shared_expert.";
  return b;
}

/// Llama4ForCausalLM (model_type llama4_text): decoder layers under model.layers.
inline MoEBlockConfig llama4_text_block(const ConfigFile& config, MoEBlockConfig b) {
  return llama4_style_block(config, b, "model.layers.");
}

/// Llama4ForConditionalGeneration (model_type llama4): the text model's fields under
/// text_config, its decoder layers under language_model.model.layers.
inline MoEBlockConfig llama4_block(const ConfigFile& config, MoEBlockConfig b) {
  return llama4_style_block(config, b, "language_model.model.layers.");
}

/// GPT-OSS (GptOssMLP: router GptOssTopKRouter, experts GptOssExperts): the top-k logits of
/// x W^T + b and a softmax over them; experts with biases whose gate and up columns are
/// interleaved in one transposed tensor, gate_up_proj [E, H, 2F] (gate 2f, up 2f + 1),
/// down_proj [E, F, H], and the clamped SwiGLU with swiglu_alpha and swiglu_limit.
/// transformers 5.24 has no conversion for these tensors, so this is its only layout.
/// hidden_act is not read: GptOssExperts ignores it. Released checkpoints are MXFP4
/// (quantization_config, `…_blocks` / `…_scales` tensors), which kmoe refuses.
inline MoEBlockConfig gpt_oss_block(const ConfigFile& config, MoEBlockConfig b) {
  if (config.has("quantization_config")) {
    const std::string what = io::json_excerpt(config.raw("quantization_config"));
    throw runtime_error("kmoe::models: " + config.path() + ": field \"" +
                        config.qualified("quantization_config") + "\" = " + what +
                        " is not supported: kmoe reads unquantised weights (F16, BF16, F32, F64); "
                        "dequantise the checkpoint first (transformers: Mxfp4Config(dequantize="
                        "True), then save_pretrained)");
  }
  CheckpointNaming n = fused_naming(layer_prefix(b) + "mlp.", "router.weight",
                                    "experts.gate_up_proj", "experts.down_proj", true);
  n.interleaved = true;
  n.router_bias = "router.bias";
  n.fused_gate_up_bias = "experts.gate_up_proj_bias", n.fused_down_bias = "experts.down_proj_bias";
  b.namings = {n};
  b.hidden = config.count("hidden_size", 1);
  b.ffn = config.count("intermediate_size", 1);
  const std::string experts_field = config.either({"num_local_experts", "num_experts"});
  b.experts = config.count(experts_field, 1, max_experts);
  b.top_k = config.count("num_experts_per_tok", 1);
  b.normalize = true;  // a softmax over the chosen logits sums to 1
  b.router = BlockRouter::topk_softmax;
  b.expert_kind = BlockExperts::clamped_swiglu;
  // transformers' defaults (GptOssConfig) when absent.
  if (config.has("swiglu_alpha")) b.swiglu_alpha = config.positive_number("swiglu_alpha");
  if (config.has("swiglu_limit")) b.swiglu_limit = config.positive_number("swiglu_limit");
  check_sizes(config, b, "intermediate_size", experts_field);
  field_product(config, "hidden_size", b.hidden, "2 x intermediate_size", 2 * std::int64_t(b.ffn),
                max_matrix_elements, "an expert's gate_up_proj");
  return b;
}

/// One model_type kmoe reads, and how its config describes the block.
struct Family {
  const char* model_type;
  MoEBlockConfig (*read)(const ConfigFile&, MoEBlockConfig);
  /// The config object holding the text model's fields (multimodal models: "text_config"),
  /// or nullptr for the top level.
  const char* section = nullptr;
  /// The field holding the number of decoder layers.
  const char* layers_field = "num_hidden_layers";
  /// Whether `hidden_act` names the activation (DBRX's reader checks ffn_config's itself).
  bool hidden_act = true;
};

/// Every family read_block_config accepts. Families that share a block share its reader.
inline const std::vector<Family>& families() {
  static const std::vector<Family> table = {
      {"mixtral", mixtral_block},
      {"minimax", mixtral_block},
      {"qwen3_moe", qwen3_moe_block},
      {"olmoe", olmoe_block},
      {"flex_olmo", olmoe_block},
      {"deepseek_v3", deepseek_v3_block},
      {"glm4_moe", deepseek_v3_block},
      {"dots1", deepseek_v3_block},
      {"deepseek_v2", deepseek_v2_block},
      {"jamba", jamba_block},
      {"granitemoe", granitemoe_block},
      {"granitemoeshared", granitemoe_block},
      {"qwen3_vl_moe", qwen3_vl_moe_block, "text_config"},
      {"qwen2_moe", qwen2_moe_block},
      {"qwen3_next", qwen2_moe_block},
      {"dbrx", dbrx_block, nullptr, "n_layers", false},
      {"hunyuan_v1_moe", hunyuan_v1_moe_block},
      {"phimoe", phimoe_block},
      {"llama4_text", llama4_text_block},
      {"llama4", llama4_block, "text_config"},
      {"ernie4_5_moe", ernie4_5_moe_block},
      {"gpt_oss", gpt_oss_block, nullptr, "num_hidden_layers", false},
  };
  return table;
}

}  // namespace detail

/// \brief The model_type values read_block_config accepts, comma-separated.
inline std::string supported_model_types() {
  std::string out;
  for (const auto& f : detail::families())
    out += std::string(out.empty() ? "" : ", ") + f.model_type;
  return out;
}

/// \brief Reads `model_dir/config.json` and describes the MoE block of decoder layer `layer`.
///
/// Throws kmoe::invalid_argument for a layer index out of range or naming a dense layer,
/// kmoe::runtime_error for an unreadable or malformed file, an unknown model_type, a
/// missing, mistyped or out-of-range field, sizes whose products do not fit (see
/// max_matrix_elements), or a setting kmoe cannot reproduce (hidden_act other than silu,
/// DeepSeek scoring other than sigmoid / noaux_tc, a quantised GPT-OSS checkpoint); every
/// message names the field and the file.
inline MoEBlockConfig read_block_config(const std::string& model_dir, int layer) {
  const ConfigFile config(model_dir);
  MoEBlockConfig b;
  b.model_type = config.string("model_type");
  b.config_path = config.path();
  b.layer = layer;
  const auto& table = detail::families();
  const auto family = std::find_if(table.begin(), table.end(), [&](const detail::Family& f) {
    return b.model_type == f.model_type;
  });
  if (family == table.end())
    throw runtime_error("kmoe::models: " + config.path() + ": field \"model_type\" = \"" +
                        io::excerpt(b.model_type) +
                        "\" is not supported (supported: " + supported_model_types() + ")");
  const ConfigFile text = family->section ? config.section(family->section) : config;
  const int layers = text.count(family->layers_field, 1);
  if (layer < 0 || layer >= layers)
    throw invalid_argument("kmoe::models", "layer", std::to_string(layer),
                           "must be in [0, " + std::to_string(layers) + ") (" +
                               text.qualified(family->layers_field) + " in " + config.path() + ")");
  if (family->hidden_act) detail::require_silu(text, "hidden_act");
  return with_naming(family->read(text, b), 0);
}

/// \brief Calls `visit(const CheckpointTensor&)` for every entry of checkpoint_tensors(b),
/// in the same order, one at a time.
template <class Visit>
void for_each_checkpoint_tensor(const MoEBlockConfig& b, const Visit& visit) {
  using Shape = std::vector<std::int64_t>;
  const std::int64_t E = b.experts, H = b.hidden, F = b.ffn;
  visit(CheckpointTensor{"router.weight", -1, b.router_name(), Shape{E, H}, 0, E * H});
  const std::pair<const char*, const std::string*> projections[] = {
      {"w_gate", &b.gate_proj}, {"w_up", &b.up_proj}, {"w_down", &b.down_proj}};
  for (const auto& [param, proj] : projections) {
    const bool down = std::string(param) == "w_down";
    for (std::int64_t e = 0; e < E; ++e) {
      CheckpointTensor t{std::string("experts.") + param, int(e), "", {}, 0, F * H};
      const CheckpointNaming& n = b.current_naming();
      if (b.layout == ExpertLayout::per_expert) {
        t.checkpoint = b.prefix + b.experts_scope + std::to_string(e) + "." + *proj + ".weight";
        t.shape = down ? Shape{H, F} : Shape{F, H};
      } else if (!n.stacked_gate.empty()) {
        const bool up = std::string(param) == "w_up";
        t.checkpoint = b.prefix + (down ? n.stacked_down : up ? n.stacked_up : n.stacked_gate);
        t.shape = Shape{E * F, H}, t.offset = e * F * H;
        if (down) t.region_rows = F, t.region_cols = H;  // [F, H]: w_down[e] transposed
      } else if (b.current_naming().transposed) {
        // [E, H, 2F] gate_up: expert e's matrix, gate columns then up columns (or gate and
        // up interleaved); [E, F, H] down.
        const bool up = std::string(param) == "w_up";
        t.checkpoint =
            b.prefix + (down ? b.current_naming().fused_down : b.current_naming().fused_gate_up);
        t.shape = down ? Shape{E, F, H} : Shape{E, H, 2 * F};
        t.offset = e * (down ? F * H : 2 * F * H);
        t.region_rows = down ? F : H, t.region_cols = down ? H : 2 * F;
        if (!down && n.interleaved)
          t.first_column = up ? 1 : 0, t.column_stride = 2;
        else
          t.first_column = up ? F : 0;
      } else if (down) {
        t.checkpoint = b.prefix + b.current_naming().fused_down;
        t.shape = Shape{E, H, F}, t.offset = e * H * F;
      } else {
        // [E, 2F, H]: expert e's gate rows, then its up rows.
        t.checkpoint = b.prefix + b.current_naming().fused_gate_up;
        t.shape = Shape{E, 2 * F, H},
        t.offset = e * 2 * F * H + (std::string(param) == "w_up" ? F * H : 0);
      }
      visit(t);
    }
  }
  const CheckpointNaming& n = b.current_naming();
  if (b.has_router_bias())
    visit(CheckpointTensor{"router.bias", -1, b.prefix + n.router_bias, Shape{E}, 0, E});
  if (b.has_expert_bias()) {
    // gate_up's bias [E, 2F] is laid out as its columns: a one-row region per expert.
    for (const char* param : {"b_gate", "b_up"}) {
      const bool up = std::string(param) == "b_up";
      for (std::int64_t e = 0; e < E; ++e) {
        CheckpointTensor t{std::string("experts.") + param,
                           int(e),
                           b.prefix + n.fused_gate_up_bias,
                           Shape{E, 2 * F},
                           e * 2 * F,
                           F};
        t.region_rows = 1, t.region_cols = 2 * F;
        if (n.interleaved)
          t.first_column = up ? 1 : 0, t.column_stride = 2;
        else
          t.first_column = up ? F : 0;
        visit(t);
      }
    }
    for (std::int64_t e = 0; e < E; ++e)
      visit(CheckpointTensor{"experts.b_down", int(e), b.prefix + n.fused_down_bias, Shape{E, H},
                             e * H, H});
  }
  if (b.shared_ffn > 0) {
    const std::int64_t S = b.shared_ffn;
    for (const auto& [param, proj] : projections) {
      const bool down = std::string(param) == "w_down";
      CheckpointTensor t{std::string("shared.") + param,   0, b.shared_prefix + *proj + ".weight",
                         down ? Shape{H, S} : Shape{S, H}, 0, S * H};
      if (!b.shared_gate_up.empty() && down) {
        t.checkpoint = b.shared_down;
      } else if (!b.shared_gate_up.empty()) {
        t.checkpoint = b.shared_gate_up, t.shape = Shape{2 * S, H};
        t.offset = std::string(param) == "w_up" ? S * H : 0;
      }
      visit(t);
    }
    if (!b.shared_gate.empty())
      visit(CheckpointTensor{"shared.w_output_gate", 0, b.shared_gate, Shape{1, H}, 0, H});
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

/// \brief The index of the naming `checkpoint` uses for block `b`, told from the names of
/// expert 0's gate slice (its per-expert tensor or the fused gate-up tensor) and, where two
/// namings share that name (Qwen3-VL-MoE's transposed and plain fused tensors), from its
/// shape. A checkpoint matching two namings is refused, since either set could be the stale
/// one or the shapes cannot tell them apart (hidden_size = 2F); one matching none gets the
/// first naming, so that check_checkpoint names the first missing or misshapen tensor.
inline std::size_t detect_naming(const MoEBlockConfig& b, const io::ShardedCheckpoint& checkpoint) {
  std::vector<std::size_t> named;
  std::vector<CheckpointTensor> keys;
  for (std::size_t i = 0; i < b.namings.size(); ++i) {
    const CheckpointTensor key = checkpoint_tensors(with_naming(b, i)).at(1);  // expert 0's gate
    keys.push_back(key);
    if (checkpoint.contains(key.checkpoint)) named.push_back(i);
  }
  const auto where = [&] {
    return "kmoe::models: checkpoint " + checkpoint.directory() + " (" + b.model_type + ", layer " +
           std::to_string(b.layer) + ")";
  };
  for (std::size_t n = 1; n < named.size(); ++n)
    if (keys[named[n]].checkpoint != keys[named[0]].checkpoint)
      throw runtime_error(where() + " holds both \"" + keys[named[0]].checkpoint + "\" (" +
                          layout_name(b.namings[named[0]].layout) + " layout) and \"" +
                          keys[named[n]].checkpoint + "\" (" +
                          layout_name(b.namings[named[n]].layout) +
                          " layout); it must hold one layout only");
  if (named.size() < 2) return named.empty() ? 0 : named[0];
  const auto& shape = checkpoint.info(keys[named[0]].checkpoint).shape;
  std::vector<std::size_t> fitting;
  for (const std::size_t i : named)
    if (keys[i].shape == shape) fitting.push_back(i);
  if (fitting.size() > 1)
    throw runtime_error(where() + ": tensor \"" + keys[named[0]].checkpoint + "\" of shape " +
                        io::excerpt(detail::shape_string(shape)) +
                        " fits both its transposed and its plain fused layout (hidden_size = 2 x "
                        "the expert width), so kmoe cannot tell which one it is");
  return fitting.empty() ? named[0] : fitting[0];
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
  if (b.has_selection_bias())
    detail::require_tensor(checkpoint, b, b.selection_bias_name(), b.selection_bias_shape);
}

/// \brief Block `b` (from read_block_config) in the naming `checkpoint` stores it in
/// (detect_naming), with every tensor of it checked (check_checkpoint).
inline MoEBlockConfig resolve_naming(const MoEBlockConfig& b,
                                     const io::ShardedCheckpoint& checkpoint) {
  MoEBlockConfig resolved = with_naming(b, detect_naming(b, checkpoint));
  check_checkpoint(resolved, checkpoint);
  return resolved;
}

/// \brief read_block_config resolved against the checkpoint of `model_dir`.
inline MoEBlockConfig read_block(const std::string& model_dir, int layer,
                                 const io::ShardedCheckpoint& checkpoint) {
  return resolve_naming(read_block_config(model_dir, layer), checkpoint);
}

/// \brief read_block_config resolved against the checkpoint of `model_dir`, opened only
/// after config.json has been read, so that a broken model directory is reported by its
/// config.json first.
inline MoEBlockConfig read_block(const std::string& model_dir, int layer) {
  const MoEBlockConfig b = read_block_config(model_dir, layer);
  return resolve_naming(b, io::ShardedCheckpoint(model_dir));
}

}  // namespace kmoe::models
