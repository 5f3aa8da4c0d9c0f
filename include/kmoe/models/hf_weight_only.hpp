// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file hf_weight_only.hpp
/// \brief The MoE block of one decoder layer of a Hugging Face checkpoint with its GLU
/// experts' weights in bf16, fp16 or INT8 from the load on (kmoe::PackedGLUExperts): each
/// expert is read from the checkpoint into one expert's float buffers and packed before the
/// next is read, so a bf16 checkpoint never has a float copy of its experts in memory (the
/// peak is the packed experts plus one float expert; models/hf.hpp's loaders and
/// kmoe::weight_only_layer hold every expert in float first).
///
/// Inference only (packed experts do not train). Needs nlohmann-json (link kmoe::io).

#include <kmoe/experts/packed_glu.hpp>
#include <kmoe/models/checkpoint_expert_store.hpp>
#include <kmoe/models/hf_resident.hpp>

#include <memory>
#include <optional>
#include <string>

namespace kmoe::models {

/// \brief A block with router `Router` and SwiGLU experts packed to `Element`.
template <class Router, class Element>
using WeightOnlyBlockLayer =
    MoELayer<Router, PackedGLUExperts<typename Router::execution_space,
                                      typename Router::scalar_type, Element>>;

namespace detail {
/// Packs the experts `store` holds, one at a time through `one` (float, one expert).
template <class Element, class X, class S>
PackedGLUExperts<X, S, Element> pack_from_store(SwiGLUExperts<X, S> one,
                                                const CheckpointExpertStore& store) {
  return PackedGLUExperts<X, S, Element>(std::move(one), store.num_experts(),
                                         [&](int e, SwiGLUExperts<X, S>& expert) {
                                           ParameterList<X, S> list;
                                           expert.collect_parameters(list);
                                           for (const auto& p : list) {
                                             auto host = Kokkos::create_mirror_view(p.value);
                                             store.read(p.name, e, host.data());
                                             Kokkos::deep_copy(p.value, host);
                                           }
                                         });
}
}  // namespace detail

/// \brief The block of decoder layer `layer` of `model_dir` with its routed (and shared)
/// experts packed to `Element` (std::int8_t per output channel, kmoe::bfloat16 or
/// kmoe::float16) as they are read. The router kind must be the block's (SoftmaxTopKRouter
/// for Mixtral, Qwen3-MoE; SigmoidBiasRouter for DeepSeek-V3; ...); the experts are SwiGLU
/// (GPT-OSS's clamped experts have no packed form). The router stays in Scalar.
template <class Element, class Router>
WeightOnlyBlockLayer<Router, Element> load_weight_only_block(const std::string& model_dir,
                                                             int layer,
                                                             const LayerOptions& options = {}) {
  constexpr const char* where = "kmoe::models::load_weight_only_block";
  using X = typename Router::execution_space;
  using S = typename Router::scalar_type;
  using Config = std::decay_t<decltype(std::declval<const Router&>().config())>;
  using Packed = PackedGLUExperts<X, S, Element>;
  const detail::OpenedBlock opened =
      detail::open_block(model_dir, layer, nullptr, detail::router_kind<Router>(),
                         BlockExperts::swiglu, options, where);
  const MoEBlockConfig& b = opened.block;
  const auto& checkpoint = opened.checkpoint;
  MoEBlockConfig one = b;
  one.experts = 1;
  Packed routed =
      detail::pack_from_store<Element>(detail::routed_experts<SwiGLUExperts<X, S>>(one, false),
                                       CheckpointExpertStore(checkpoint, b));
  std::optional<Packed> shared;
  if (auto expert = detail::shared_experts<X, S>(b))
    shared.emplace(detail::pack_from_store<Element>(std::move(*expert),
                                                    CheckpointExpertStore(checkpoint, b, true)));
  WeightOnlyBlockLayer<Router, Element> moe(Router(detail::router_config<Config>(b)),
                                            std::move(routed), opened.options, std::move(shared));
  detail::load_weights(moe, b, *checkpoint);  // the router's: the experts are packed
  detail::load_selection_bias(moe.router(), b, *checkpoint, model_dir, where);
  return moe;
}

}  // namespace kmoe::models
