// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file quantized_layer.hpp
/// \brief kmoe::weight_only_layer: the inference copy of a GLU layer whose routed and shared
/// experts hold their weights in Element (INT8 per output channel, bf16 or fp16:
/// experts/packed_glu.hpp); the router, options and parallel groups are the float layer's
/// (the router's weights are shared, not copied).

#include <kmoe/experts/packed_glu.hpp>
#include <kmoe/layer.hpp>

#include <optional>

namespace kmoe {

template <class Element, class Router, class X, class S, class Activation, class Gemm,
          class Combiner, class Communicator>
MoELayer<Router, PackedGLUExperts<X, S, Element, Activation, Gemm>, Combiner, Communicator>
weight_only_layer(
    const MoELayer<Router, GLUExperts<X, S, Activation, Gemm>, Combiner, Communicator>& layer) {
  using Packed = PackedGLUExperts<X, S, Element, Activation, Gemm>;
  std::optional<Packed> shared;
  if (layer.shared_experts()) shared.emplace(*layer.shared_experts());
  return {layer.router(), Packed(layer.experts()), layer.options(), shared, layer.groups()};
}

}  // namespace kmoe
