// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file quantized_layer.hpp
/// \brief kmoe::int8_layer: the inference copy of a GLU layer whose routed and shared
/// experts hold weight-only INT8 weights (experts/int8_glu.hpp); the router, options and
/// parallel groups are the float layer's (the router's weights are shared, not copied).

#include <kmoe/experts/int8_glu.hpp>
#include <kmoe/layer.hpp>

#include <optional>

namespace kmoe {

template <class Router, class X, class S, class Activation, class Gemm, class Combiner,
          class Communicator>
MoELayer<Router, Int8GLUExperts<X, S, Activation, Gemm>, Combiner, Communicator> int8_layer(
    const MoELayer<Router, GLUExperts<X, S, Activation, Gemm>, Combiner, Communicator>& layer) {
  using Quantised = Int8GLUExperts<X, S, Activation, Gemm>;
  std::optional<Quantised> shared;
  if (layer.shared_experts()) shared.emplace(*layer.shared_experts());
  return {layer.router(), Quantised(layer.experts()), layer.options(), shared, layer.groups()};
}

}  // namespace kmoe
