// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file hf_resident.hpp
/// \brief The MoE block of one decoder layer of a Hugging Face checkpoint with its experts
/// left in the checkpoint: only a budget of them is resident at a time (kmoe::ResidentExperts
/// over models::CheckpointExpertStore), read when a batch chooses them. The router and its
/// selection bias are read at load; the shared expert (one slot of its own) and the routed
/// experts are read when a forward first needs them. docs/memory.md describes the policy.
///
/// Inference only (the checkpoint is read-only and holds no optimizer state). Needs
/// nlohmann-json (link kmoe::io).

#include <kmoe/memory/resident_experts.hpp>
#include <kmoe/models/checkpoint_expert_store.hpp>
#include <kmoe/models/hf.hpp>

#include <memory>
#include <optional>
#include <string>
#include <type_traits>

namespace kmoe::models {

/// \brief Experts of kind `Inner` resident by budget, the rest read from the checkpoint.
template <class Inner>
using CheckpointResidentExperts = ResidentExperts<Inner, CheckpointExpertStore>;

/// \brief A block with router `Router` and experts `Inner` resident by budget.
template <class Router, class Inner>
using ResidentBlockLayer = MoELayer<Router, CheckpointResidentExperts<Inner>>;

namespace detail {
/// Bytes of one expert of block `b` in the compute scalar (what a resident slot holds).
template <class Inner>
std::int64_t slot_bytes(MoEBlockConfig b) {
  using X = typename Inner::execution_space;
  using S = typename Inner::scalar_type;
  b.experts = 1;
  ParameterList<X, S> list;
  routed_experts<Inner>(b, false).collect_parameters(list);
  std::int64_t bytes = 0;
  for (const auto& p : list) bytes += std::int64_t(p.value.size() * sizeof(S));
  return bytes;
}
}  // namespace detail

/// \brief The block of decoder layer `layer` of `model_dir` whose routed experts stay in
/// the checkpoint, at most `budget` of them resident (kmoe::ResidencyBudget: a count and/or
/// bytes of Scalar weights); `eviction` picks which resident expert a miss replaces. The
/// router kind and the expert kind must be the block's (e.g. SoftmaxTopKRouter and
/// SwiGLUExperts for Mixtral, Qwen3-MoE; SigmoidBiasRouter for DeepSeek-V3;
/// TopKSoftmaxRouter and ClampedSwiGLUExperts for GPT-OSS). A shared expert is one slot
/// of its own, always resident.
template <class Router, class Inner>
ResidentBlockLayer<Router, Inner> load_resident_block(const std::string& model_dir, int layer,
                                                      const ResidencyBudget& budget,
                                                      Eviction eviction = Eviction::lru,
                                                      const LayerOptions& options = {}) {
  constexpr const char* where = "kmoe::models::load_resident_block";
  using Config = std::decay_t<decltype(std::declval<const Router&>().config())>;
  using Experts = CheckpointResidentExperts<Inner>;
  const detail::OpenedBlock opened =
      detail::open_block(model_dir, layer, nullptr, detail::router_kind<Router>(),
                         detail::expert_kind<Inner>(), options, where);
  const MoEBlockConfig& b = opened.block;
  const auto& checkpoint = opened.checkpoint;
  MoEBlockConfig slots = b;
  slots.experts = budget.slots(detail::slot_bytes<Inner>(b), b.experts);
  // Inference only: the slots need no gradient buffers.
  Experts routed(detail::routed_experts<Inner>(slots, false), CheckpointExpertStore(checkpoint, b),
                 eviction);
  std::optional<Experts> shared;
  if (auto one = detail::block_shared_experts<Inner>(b))
    shared.emplace(std::move(*one), CheckpointExpertStore(checkpoint, b, true));
  ResidentBlockLayer<Router, Inner> moe(Router(detail::router_config<Config>(b)), std::move(routed),
                                        opened.options, std::move(shared));
  detail::load_weights(moe, b, *checkpoint);  // the router's: the experts' stay in the file
  detail::load_selection_bias(moe.router(), b, *checkpoint, model_dir, where);
  return moe;
}

}  // namespace kmoe::models
