// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file hf.hpp
/// \brief Builds the MoE block of one decoder layer of a Hugging Face model directory
/// (`config.json` plus `model.safetensors` or shards) as a kmoe::MoELayer: Mixtral,
/// DeepSeek-V3 and Qwen3-MoE. Also maps every kmoe parameter, and each expert's slice of a
/// stacked expert tensor, to its checkpoint name, so that weights are read and gradients
/// written under the names the checkpoint uses. docs/models.md describes the fields read.
///
/// config.json is read and every size checked by kmoe/models/config.hpp, and the
/// checkpoint's tensor shapes are checked against it, before any layer is allocated.
///
/// Needs nlohmann-json (link kmoe::io).

#include <kmoe/detail/detect.hpp>
#include <kmoe/error.hpp>
#include <kmoe/experts/clamped_swiglu.hpp>
#include <kmoe/experts/glu.hpp>
#include <kmoe/io/safetensors.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/models/checkpoint_expert_store.hpp>
#include <kmoe/models/config.hpp>
#include <kmoe/routers/sigmoid_bias.hpp>
#include <kmoe/routers/softmax_topk.hpp>
#include <kmoe/routers/sparse_mixer.hpp>
#include <kmoe/routers/topk_softmax.hpp>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace kmoe::models {

/// \brief The block of every family whose router is softmax-then-top-k (BlockRouter::
/// softmax_topk: Mixtral, Qwen3-MoE, DeepSeek-V2 and the families sharing their blocks):
/// optional renormalisation, scaling, group limit and shared expert come from config.json.
template <class ExecSpace, class Scalar>
using SoftmaxBlockLayer =
    MoELayer<SoftmaxTopKRouter<ExecSpace, Scalar>, SwiGLUExperts<ExecSpace, Scalar>>;
/// \brief The block of every family whose router is DeepSeek-V3's (BlockRouter::
/// sigmoid_bias): biased sigmoid selection, group limit, scaling, shared expert.
template <class ExecSpace, class Scalar>
using SigmoidBiasBlockLayer =
    MoELayer<SigmoidBiasRouter<ExecSpace, Scalar>, SwiGLUExperts<ExecSpace, Scalar>>;

/// \brief The block of every family whose router takes the top-k logits and a softmax over
/// them (BlockRouter::topk_softmax: Granite-MoE), with an optional shared expert.
template <class ExecSpace, class Scalar>
using TopKSoftmaxBlockLayer =
    MoELayer<TopKSoftmaxRouter<ExecSpace, Scalar>, SwiGLUExperts<ExecSpace, Scalar>>;

/// \brief The block of every family whose router is sparsemixer's inference path
/// (BlockRouter::sparse_mixer: Phi-MoE).
template <class ExecSpace, class Scalar>
using SparseMixerBlockLayer =
    MoELayer<SparseMixerRouter<ExecSpace, Scalar>, SwiGLUExperts<ExecSpace, Scalar>>;
/// \brief The block of every family whose experts are GPT-OSS's (BlockExperts::
/// clamped_swiglu): top-k logits (with the router's bias) then a softmax over them, experts
/// with biases and the clamped, alpha-scaled SwiGLU.
template <class ExecSpace, class Scalar>
using ClampedSwiGLUBlockLayer =
    MoELayer<TopKSoftmaxRouter<ExecSpace, Scalar>, ClampedSwiGLUExperts<ExecSpace, Scalar>>;

/// \brief Mixtral's block: softmax over all experts, top-k, always renormalised.
template <class ExecSpace, class Scalar>
using MixtralLayer = SoftmaxBlockLayer<ExecSpace, Scalar>;
/// \brief Qwen3-MoE's block: Mixtral's, renormalised only if norm_topk_prob.
template <class ExecSpace, class Scalar>
using Qwen3MoeLayer = SoftmaxBlockLayer<ExecSpace, Scalar>;
/// \brief DeepSeek-V3's block.
template <class ExecSpace, class Scalar>
using DeepseekV3Layer = SigmoidBiasBlockLayer<ExecSpace, Scalar>;

namespace detail {

/// Fills every parameter of `layer` from the checkpoint, each slice read on its own (one
/// expert's rows of a fused tensor cost their own size); check_checkpoint(b, checkpoint)
/// has already matched every tensor's shape to the layer's.
template <class Layer>
void load_weights(Layer& layer, const MoEBlockConfig& b, const io::ShardedCheckpoint& checkpoint) {
  using S = typename Layer::scalar_type;
  const auto params = layer.parameters();
  const auto tensors = checkpoint_tensors(b);
  std::vector<S> region;  // a transposed slice's checkpoint matrix
  for (const auto& p : params) {
    // Parameters live in the layer's memory space: fill a host copy, then copy it once.
    auto host = Kokkos::create_mirror_view(p.value);
    bool mapped = false;
    for (const auto& t : tensors) {
      if (t.parameter != p.name) continue;
      read_checkpoint_slice(checkpoint, t,
                            host.data() + std::size_t(t.count) * std::size_t(std::max(t.expert, 0)),
                            region);
      mapped = true;
    }
    if (!mapped)
      throw invalid_argument("kmoe::models", "parameter", p.name,
                             "has no checkpoint name for model_type " + b.model_type);
    Kokkos::deep_copy(p.value, host);
  }
}

inline const char* loader_name(const MoEBlockConfig& b) {
  if (b.expert_kind == BlockExperts::clamped_swiglu) return "load_clamped_swiglu_block";
  switch (b.router) {
    case BlockRouter::sigmoid_bias:
      return "load_sigmoid_bias_block";
    case BlockRouter::topk_softmax:
      return "load_topk_softmax_block";
    case BlockRouter::sparse_mixer:
      return "load_sparse_mixer_block";
    default:
      return "load_softmax_block";
  }
}

/// The block of `layer` as config.json describes it; a family other than `family` (if
/// given), or one whose block has another router than `router` or other experts than
/// `experts`, is refused naming the model directory.
inline MoEBlockConfig family_block(const std::string& model_dir, int layer, const char* family,
                                   BlockRouter router, BlockExperts experts, const char* where) {
  const std::string type = load_model_type(model_dir);
  if (family != nullptr && type != family)
    throw invalid_argument(where, "model_dir", model_dir,
                           "config.json has model_type \"" + type + "\", not \"" + family + "\"");
  MoEBlockConfig b = read_block_config(model_dir, layer);
  if (b.router != router || b.expert_kind != experts)
    throw invalid_argument(where, "model_dir", model_dir,
                           "model_type \"" + type + "\" has another " +
                               (b.router != router ? "router" : "kind of experts") +
                               "; load it with " + loader_name(b));
  return b;
}

template <class X, class S>
std::optional<SwiGLUExperts<X, S>> shared_experts(const MoEBlockConfig& b, bool gradients = true) {
  if (b.shared_ffn == 0) return std::nullopt;
  return SwiGLUExperts<X, S>(
      ExpertShape{1, b.hidden, b.shared_ffn, false, !b.shared_gate.empty(), gradients}, "shared");
}

/// The router settings of block `b` (TopKSoftmaxConfig has no renormalisation, scaling
/// or group limit: a softmax over the chosen logits is normalised by construction, and it
/// alone has a logit bias; SparseMixerConfig has two slots by construction and its masks'
/// eps; SigmoidBiasConfig always has a selection bias and no clamped normalisation).
template <class Config>
Config router_config(const MoEBlockConfig& b) {
  Config c;
  c.hidden = b.hidden, c.experts = b.experts;
  if constexpr (std::is_same_v<Config, SparseMixerConfig>) {
    c.jitter_eps = b.jitter_eps;
  } else {
    c.top_k = b.top_k;
  }
  if constexpr (std::is_same_v<Config, TopKSoftmaxConfig>) {
    c.bias = b.has_router_bias();
  } else {
    require(!b.has_router_bias(), "kmoe::models", "router bias", b.current_naming().router_bias,
            "is read only with a top-k-softmax router");
  }
  if constexpr (!std::is_same_v<Config, TopKSoftmaxConfig> &&
                !std::is_same_v<Config, SparseMixerConfig>) {
    c.normalize = b.normalize;
    c.scaling_factor = b.scaling_factor;
    c.group = GroupLimit{b.n_group, b.topk_group, b.group_score_terms};
  }
  if constexpr (std::is_same_v<Config, SoftmaxTopKConfig>) {
    c.selection_bias = b.has_selection_bias();
    c.norm_min = b.norm_min;
  }
  return c;
}

/// A router's selection bias (SigmoidBiasRouter, SoftmaxTopKRouter), if it can hold one.
template <class R>
using selection_bias_of = decltype(std::declval<const R&>().bias());

/// The routed experts of block `b`: SwiGLU, or clamped SwiGLU (with biases if the block has
/// them).
template <class Experts>
Experts routed_experts(const MoEBlockConfig& b, bool gradients = true) {
  using X = typename Experts::execution_space;
  using S = typename Experts::scalar_type;
  ExpertShape shape{b.experts, b.hidden, b.ffn};
  shape.gradients = gradients;
  if constexpr (std::is_same_v<Experts, ClampedSwiGLUExperts<X, S>>) {
    shape.bias = b.has_expert_bias();
    return Experts(shape, ClampedSwiGLU{b.swiglu_alpha, b.swiglu_limit});
  } else {
    return Experts(shape);
  }
}

/// The shared expert of block `b`, if any (SwiGLU; no family with other experts has one).
template <class Experts>
std::optional<Experts> block_shared_experts(const MoEBlockConfig& b, bool gradients = true) {
  using X = typename Experts::execution_space;
  using S = typename Experts::scalar_type;
  if constexpr (std::is_same_v<Experts, SwiGLUExperts<X, S>>) {
    return shared_experts<X, S>(b, gradients);
  } else {
    require(b.shared_ffn == 0, "kmoe::models", "shared expert F", b.shared_ffn,
            "a shared expert is SwiGLU, built beside SwiGLU experts only");
    return std::nullopt;
  }
}

/// The block's selection bias (a buffer, not a parameter) into the router, if it has one.
template <class Router>
void load_selection_bias(Router& router, const MoEBlockConfig& b,
                         const io::ShardedCheckpoint& checkpoint, const std::string& model_dir,
                         const char* where) {
  if (!b.has_selection_bias()) return;
  if constexpr (kmoe::detail::is_detected_v<selection_bias_of, Router>) {
    const auto bias = router.bias();
    auto host = Kokkos::create_mirror_view(bias);
    checkpoint.read_into(b.selection_bias_name(), host.data(), host.size());
    Kokkos::deep_copy(bias, host);
  } else {
    throw invalid_argument(where, "model_dir", model_dir,
                           "the block has a selection bias, which this router cannot hold");
  }
}

/// The kind of router `Router` is (for family_block's check).
template <class Router>
constexpr BlockRouter router_kind() {
  using X = typename Router::execution_space;
  using S = typename Router::scalar_type;
  if constexpr (std::is_same_v<Router, SoftmaxTopKRouter<X, S>>) return BlockRouter::softmax_topk;
  if constexpr (std::is_same_v<Router, SigmoidBiasRouter<X, S>>) return BlockRouter::sigmoid_bias;
  if constexpr (std::is_same_v<Router, TopKSoftmaxRouter<X, S>>) return BlockRouter::topk_softmax;
  if constexpr (std::is_same_v<Router, SparseMixerRouter<X, S>>) return BlockRouter::sparse_mixer;
}

/// The kind of experts `Experts` are (for family_block's check).
template <class Experts>
constexpr BlockExperts expert_kind() {
  using X = typename Experts::execution_space;
  using S = typename Experts::scalar_type;
  return std::is_same_v<Experts, ClampedSwiGLUExperts<X, S>> ? BlockExperts::clamped_swiglu
                                                             : BlockExperts::swiglu;
}

/// A block's checkpoint opened for loading: the block as config.json describes it and the
/// checkpoint names its tensors, the checkpoint (shared: resident experts keep reading it),
/// and `options` with the block's routing-weight placement (on the experts' inputs or
/// outputs, as the family computes it), whatever they said.
struct OpenedBlock {
  MoEBlockConfig block;
  std::shared_ptr<const io::ShardedCheckpoint> checkpoint;
  LayerOptions options;
};

inline OpenedBlock open_block(const std::string& model_dir, int layer, const char* family,
                              BlockRouter router, BlockExperts experts, const LayerOptions& options,
                              const char* where) {
  const MoEBlockConfig config = family_block(model_dir, layer, family, router, experts, where);
  // Opened after config.json, whose errors come first.
  auto checkpoint = std::make_shared<const io::ShardedCheckpoint>(model_dir);
  OpenedBlock opened{resolve_naming(config, *checkpoint), checkpoint, options};
  opened.options.routing_weight =
      opened.block.weight_on_input ? RoutingWeightPlacement::input : RoutingWeightPlacement::output;
  return opened;
}

/// The block of `layer` with a `Router` (of kind `kind`) and `Experts` (of kind
/// `expert_kind`), its weights read from the checkpoint; the selection bias too if the block
/// has one. The routing weight's placement is the family's (Llama 4 scales the expert
/// inputs), whatever `options` says. Without `gradients` the experts hold no gradient
/// buffers (inference).
///
/// Each slice is read straight into the parameter's Scalar (io::SafetensorsFile::
/// read_range_into): a BF16 checkpoint into a kmoe::bfloat16 layer is copied bit for bit,
/// with no float copy of any tensor (a transposed slice goes through one expert's region,
/// in Scalar too).
template <class Router, class Experts>
MoELayer<Router, Experts> load_block(const std::string& model_dir, int layer,
                                     const LayerOptions& options, const char* family,
                                     BlockRouter kind, BlockExperts expert_kind, const char* where,
                                     bool gradients = true) {
  using Config = std::decay_t<decltype(std::declval<const Router&>().config())>;
  const OpenedBlock opened =
      open_block(model_dir, layer, family, kind, expert_kind, options, where);
  const MoEBlockConfig& b = opened.block;
  MoELayer<Router, Experts> moe(Router(router_config<Config>(b)),
                                routed_experts<Experts>(b, gradients), opened.options,
                                block_shared_experts<Experts>(b, gradients));
  load_weights(moe, b, *opened.checkpoint);
  load_selection_bias(moe.router(), b, *opened.checkpoint, model_dir, where);
  return moe;
}

template <class X, class S>
SoftmaxBlockLayer<X, S> load_softmax(const std::string& model_dir, int layer,
                                     const LayerOptions& options, const char* family,
                                     const char* where) {
  return load_block<SoftmaxTopKRouter<X, S>, SwiGLUExperts<X, S>>(
      model_dir, layer, options, family, BlockRouter::softmax_topk, BlockExperts::swiglu, where);
}

template <class X, class S>
SigmoidBiasBlockLayer<X, S> load_sigmoid_bias(const std::string& model_dir, int layer,
                                              const LayerOptions& options, const char* family,
                                              const char* where) {
  return load_block<SigmoidBiasRouter<X, S>, SwiGLUExperts<X, S>>(
      model_dir, layer, options, family, BlockRouter::sigmoid_bias, BlockExperts::swiglu, where);
}

}  // namespace detail

/// \brief The MoE block (and shared MLP, if any) of decoder layer `layer` of any model in
/// `model_dir` whose block takes the top-k logits, then a softmax over them
/// (BlockRouter::topk_softmax: Granite-MoE), weights converted to Scalar.
template <class ExecSpace, class Scalar>
TopKSoftmaxBlockLayer<ExecSpace, Scalar> load_topk_softmax_block(const std::string& model_dir,
                                                                 int layer,
                                                                 const LayerOptions& options = {}) {
  return detail::load_block<TopKSoftmaxRouter<ExecSpace, Scalar>, SwiGLUExperts<ExecSpace, Scalar>>(
      model_dir, layer, options, nullptr, BlockRouter::topk_softmax, BlockExperts::swiglu,
      "kmoe::models::load_topk_softmax_block");
}

/// \brief The MoE block of decoder layer `layer` of any model in `model_dir` whose experts
/// are clamped SwiGLU (read_block_config(...).expert_kind == BlockExperts::clamped_swiglu:
/// GPT-OSS), with its router bias and expert biases, weights converted to Scalar.
template <class ExecSpace, class Scalar>
ClampedSwiGLUBlockLayer<ExecSpace, Scalar> load_clamped_swiglu_block(
    const std::string& model_dir, int layer, const LayerOptions& options = {}) {
  return detail::load_block<TopKSoftmaxRouter<ExecSpace, Scalar>,
                            ClampedSwiGLUExperts<ExecSpace, Scalar>>(
      model_dir, layer, options, nullptr, BlockRouter::topk_softmax, BlockExperts::clamped_swiglu,
      "kmoe::models::load_clamped_swiglu_block");
}

/// \brief The MoE block of decoder layer `layer` of any model in `model_dir` whose block
/// routes by sparsemixer (BlockRouter::sparse_mixer: Phi-MoE; kmoe::SparseMixerRouter, its
/// inference path in training too), weights converted to Scalar.
template <class ExecSpace, class Scalar>
SparseMixerBlockLayer<ExecSpace, Scalar> load_sparse_mixer_block(const std::string& model_dir,
                                                                 int layer,
                                                                 const LayerOptions& options = {}) {
  return detail::load_block<SparseMixerRouter<ExecSpace, Scalar>, SwiGLUExperts<ExecSpace, Scalar>>(
      model_dir, layer, options, nullptr, BlockRouter::sparse_mixer, BlockExperts::swiglu,
      "kmoe::models::load_sparse_mixer_block");
}

/// \brief The MoE block of decoder layer `layer` of any model in `model_dir` whose block
/// has a softmax-then-top-k router (read_block_config(...).router ==
/// BlockRouter::softmax_topk), weights converted to Scalar.
template <class ExecSpace, class Scalar>
SoftmaxBlockLayer<ExecSpace, Scalar> load_softmax_block(const std::string& model_dir, int layer,
                                                        const LayerOptions& options = {}) {
  return detail::load_softmax<ExecSpace, Scalar>(model_dir, layer, options, nullptr,
                                                 "kmoe::models::load_softmax_block");
}

/// \brief The MoE block (with its shared expert and selection bias) of decoder layer
/// `layer` of any model in `model_dir` whose block has DeepSeek-V3's router
/// (BlockRouter::sigmoid_bias), weights converted to Scalar.
template <class ExecSpace, class Scalar>
SigmoidBiasBlockLayer<ExecSpace, Scalar> load_sigmoid_bias_block(const std::string& model_dir,
                                                                 int layer,
                                                                 const LayerOptions& options = {}) {
  return detail::load_sigmoid_bias<ExecSpace, Scalar>(model_dir, layer, options, nullptr,
                                                      "kmoe::models::load_sigmoid_bias_block");
}

/// \brief The MoE block of decoder layer `layer` of any model in `model_dir` whose router
/// is `Router` (SoftmaxTopKRouter for Mixtral, Qwen3-MoE; SigmoidBiasRouter for
/// DeepSeek-V3; ...) and experts `Experts`, for inference: no gradient buffers. With
/// Scalar = kmoe::bfloat16 or kmoe::float16 this is the block stored in 16 bits: each
/// tensor is read straight into 16-bit storage (a BF16 checkpoint into a bf16 layer bit for
/// bit, other dtypes rounded once to nearest even), so neither a float copy of the weights
/// nor float gradients are ever allocated; the router's weight is in Scalar as well, its
/// selection bias (DeepSeek-V3's e_score_correction_bias) in float (routing_t<Scalar>).
template <class Router, class Experts = SwiGLUExperts<typename Router::execution_space,
                                                      typename Router::scalar_type>>
MoELayer<Router, Experts> load_inference_block(const std::string& model_dir, int layer,
                                               const LayerOptions& options = {}) {
  return detail::load_block<Router, Experts>(model_dir, layer, options, nullptr,
                                             detail::router_kind<Router>(),
                                             detail::expert_kind<Experts>(),
                                             "kmoe::models::load_inference_block", false);
}

/// \brief The MoE block (`block_sparse_moe`) of decoder layer `layer` of the Mixtral model
/// in `model_dir`, weights converted to Scalar.
template <class ExecSpace, class Scalar>
MixtralLayer<ExecSpace, Scalar> load_mixtral(const std::string& model_dir, int layer,
                                             const LayerOptions& options = {}) {
  return detail::load_softmax<ExecSpace, Scalar>(model_dir, layer, options, "mixtral",
                                                 "kmoe::models::load_mixtral");
}

/// \brief The MoE block (`mlp`) of decoder layer `layer` of the Qwen3-MoE model in
/// `model_dir`, weights converted to Scalar.
template <class ExecSpace, class Scalar>
Qwen3MoeLayer<ExecSpace, Scalar> load_qwen3_moe(const std::string& model_dir, int layer,
                                                const LayerOptions& options = {}) {
  return detail::load_softmax<ExecSpace, Scalar>(model_dir, layer, options, "qwen3_moe",
                                                 "kmoe::models::load_qwen3_moe");
}

/// \brief The MoE block (`mlp`, with its shared expert and selection bias) of decoder layer
/// `layer` of the DeepSeek-V3 model in `model_dir`, weights converted to Scalar.
template <class ExecSpace, class Scalar>
DeepseekV3Layer<ExecSpace, Scalar> load_deepseek_v3(const std::string& model_dir, int layer,
                                                    const LayerOptions& options = {}) {
  return detail::load_sigmoid_bias<ExecSpace, Scalar>(model_dir, layer, options, "deepseek_v3",
                                                      "kmoe::models::load_deepseek_v3");
}

/// \brief Calls `visit(name, shape, data)` once for every checkpoint tensor of block `b` (in
/// the layout b.layout), in the order of checkpoint_tensors(b), with `data` pointing at a
/// host copy of the whole tensor assembled from the parameters' values (`gradient` false)
/// or gradients (true): the tensors a checkpoint in that layout holds, under its names.
template <class Layer, class Visit>
void visit_checkpoint_tensors(const Layer& layer, const MoEBlockConfig& b, bool gradient,
                              const Visit& visit) {
  using S = typename Layer::scalar_type;
  using Flat = typename decltype(layer.parameters())::value_type::flat_view;
  using HostFlat = decltype(Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), Flat()));
  // One host copy per parameter (its flat storage), however many checkpoint tensors it feeds.
  std::map<std::string, HostFlat> host;
  for (const auto& p : layer.parameters())
    host.emplace(p.name, Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(),
                                                             gradient ? p.grad : p.value));
  // A fused tensor is fed by many slices, not all adjacent (gate halves, then up halves).
  std::vector<std::string> order;
  std::map<std::string, std::vector<CheckpointTensor>> slices;
  for (const auto& t : checkpoint_tensors(b)) {
    if (!host.count(t.parameter))
      throw invalid_argument("kmoe::models::visit_checkpoint_tensors", "parameter", t.parameter,
                             "is not a parameter of the layer");
    auto& list = slices[t.checkpoint];
    if (list.empty()) order.push_back(t.checkpoint);
    list.push_back(t);
  }
  const auto slice_data = [&](const CheckpointTensor& t) {
    return host.at(t.parameter).data() + std::size_t(t.count) * std::size_t(std::max(t.expert, 0));
  };
  std::vector<S> assembled;
  for (const auto& name : order) {
    const auto& list = slices.at(name);
    const auto& shape = list.front().shape;
    const std::int64_t elements =
        std::accumulate(shape.begin(), shape.end(), std::int64_t(1), std::multiplies<>());
    if (list.size() == 1 && list.front().count == elements && !list.front().transposed()) {
      visit(name, shape, static_cast<const S*>(slice_data(list.front())));
      continue;
    }
    assembled.assign(std::size_t(elements), S(0));
    for (const auto& t : list) {
      const S* from = slice_data(t);
      if (!t.transposed()) {
        std::copy(from, from + t.count, assembled.begin() + t.offset);
        continue;
      }
      const std::int64_t rows = t.count / t.region_rows;
      for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t j = 0; j < t.region_rows; ++j)
          assembled[std::size_t(t.offset + t.region_index(i, j))] = from[i * t.region_rows + j];
    }
    visit(name, shape, static_cast<const S*>(assembled.data()));
  }
}

}  // namespace kmoe::models
