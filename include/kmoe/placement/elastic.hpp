// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file elastic.hpp
/// \brief Elastic experts: a layer with experts removed and added, built from a trained
/// one. Kept experts keep their router rows, weights and optimizer moments; an added expert
/// is a copy of an existing one ("upcycling") or drawn at random, with a fresh router row
/// and zero moments. The result is a new layer of the same type, equal to one constructed
/// with the new expert count and those weights.
///
/// One rank (EP = TP = 1): under expert parallelism the new experts would also need a new
/// placement and their slices moved, which is not built.

#include <kmoe/detail/detect.hpp>
#include <kmoe/error.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/parameters.hpp>

#include <cstdint>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace kmoe {

/// \brief One added expert: a copy of expert `copy_of` (an index of the layer before the
/// change), or, with copy_of = -1, weights drawn from N(0, stddev^2); its router row is
/// drawn from N(0, router_stddev^2) either way (a copied row would tie with its source on
/// every token).
struct NewExpert {
  int copy_of = -1;
  double stddev = 0.02;
  double router_stddev = 0.02;
  std::uint64_t seed = 0;
};

namespace detail {

template <class R>
using router_selection_bias = decltype(std::declval<const R&>().bias());

/// Copies per-expert row `from` of `source` (or, from < 0, nothing) into row `to` of
/// `target`; both flat, `width` values per expert.
template <class Source, class Target>
void copy_expert_row(const Source& source, int from, const Target& target, int to,
                     std::size_t width) {
  Kokkos::deep_copy(
      Kokkos::subview(target, std::make_pair(std::size_t(to) * width, std::size_t(to + 1) * width)),
      Kokkos::subview(source,
                      std::make_pair(std::size_t(from) * width, std::size_t(from + 1) * width)));
}

inline void check_resize(const char* where, int experts, const std::vector<int>& keep,
                         const std::vector<NewExpert>& added) {
  std::set<int> seen;
  for (int e : keep) {
    require(e >= 0 && e < experts, where, "keep", e,
            "must name an expert of the layer, in [0, " + std::to_string(experts) + ")");
    require(seen.insert(e).second, where, "keep", e, "is listed twice");
  }
  for (const auto& n : added)
    require(n.copy_of >= -1 && n.copy_of < experts, where, "added.copy_of", n.copy_of,
            "must be -1 (random) or an expert of the layer, in [0, " + std::to_string(experts) +
                ")");
  require(!keep.empty() || !added.empty(), where, "experts after the change", 0,
          "must be at least 1");
}

}  // namespace detail

/// \brief The layer with experts `keep` (indices of `layer`, in their new order) followed
/// by `added`. Router rows, routed-expert slices and the selection bias (where the router
/// has one) follow their experts; shared experts and everything else are copied.
template <class Layer>
Layer resized_layer(const Layer& layer, const std::vector<int>& keep,
                    const std::vector<NewExpert>& added) {
  constexpr const char* where = "kmoe::resized_layer";
  using Router = std::decay_t<decltype(layer.router())>;
  using Expert = std::decay_t<decltype(layer.experts())>;
  const int before = layer.num_experts();
  detail::check_resize(where, before, keep, added);
  require(layer.groups().layout.ep == 1 && layer.groups().layout.tp == 1, where, "layout",
          "EP " + std::to_string(layer.groups().layout.ep) + ", TP " +
              std::to_string(layer.groups().layout.tp),
          "must hold every expert whole on each rank (EP = TP = 1)");
  const int after = int(keep.size() + added.size());
  auto router_config = layer.router().config();
  router_config.experts = after;
  ExpertShape shape = layer.experts().shape();
  shape.experts = after;
  Layer resized(Router(router_config), Expert(shape, layer.experts().name()), layer.options(),
                layer.shared_experts(), layer.groups());

  // Row r of the new layer: old expert keep[r], or added[r - keep.size()].
  const auto source_of = [&](int row) {
    return row < int(keep.size()) ? keep[std::size_t(row)]
                                  : added[std::size_t(row) - keep.size()].copy_of;
  };
  const auto fill_rows = [&](const auto& from_list, const auto& to_list, bool router) {
    for (std::size_t p = 0; p < to_list.size(); ++p) {
      const auto& from = from_list[p];
      const auto& to = to_list[p];
      const std::size_t width = from.value.size() / std::size_t(before);
      for (int row = 0; row < after; ++row) {
        const int source = router && row >= int(keep.size()) ? -1 : source_of(row);
        if (source >= 0) {
          detail::copy_expert_row(from.value, source, to.value, row, width);
          continue;
        }
        const NewExpert& n = added[std::size_t(row) - keep.size()];
        fill_normal(Kokkos::subview(to.value, std::make_pair(std::size_t(row) * width,
                                                             std::size_t(row + 1) * width)),
                    router ? n.router_stddev : n.stddev, n.seed + 7919 * p);
      }
    }
  };
  ParameterList<typename Layer::execution_space, typename Layer::scalar_type> from, to;
  layer.router().collect_parameters(from);
  resized.router().collect_parameters(to);
  fill_rows(from, to, true);
  from.clear(), to.clear();
  layer.experts().collect_parameters(from);
  resized.experts().collect_parameters(to);
  fill_rows(from, to, false);
  if (layer.shared_experts()) {
    from.clear(), to.clear();
    layer.shared_experts()->collect_parameters(from);
    resized.shared_experts()->collect_parameters(to);
    for (std::size_t p = 0; p < to.size(); ++p) Kokkos::deep_copy(to[p].value, from[p].value);
  }
  if constexpr (detail::is_detected_v<detail::router_selection_bias, Router>) {
    // A selection bias that is not a trained parameter (DeepSeek's, moved by the bias
    // update) follows its experts; an added expert starts without one. A router whose bias
    // is switched off (SoftmaxTopKRouter without selection_bias) holds an empty one.
    const auto old_bias =
        Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.router().bias());
    auto bias = Kokkos::create_mirror_view(resized.router().bias());
    if (old_bias.extent(0) == std::size_t(before) && bias.extent(0) == std::size_t(after)) {
      for (int row = 0; row < after; ++row)
        bias(row) = row < int(keep.size()) ? old_bias(keep[std::size_t(row)]) : 0;
      Kokkos::deep_copy(resized.router().bias(), bias);
    }
  }
  typename Layer::execution_space().fence();
  resized.check_replicas();
  return resized;
}

/// \brief Carries optimizer moments across resized_layer into the new layer's optimizer:
/// each tensor of `to` (e.g. `AdamW::state()` of an optimizer over `resized.parameters()`)
/// takes the same-named tensor of `from`; tensors of the router and the routed experts keep
/// the rows of the kept experts (`keep`, as passed to resized_layer) and start the added
/// experts' rows at zero, the shared experts' are copied whole.
template <class Layer, class State>
void carry_optimizer_state(const Layer& resized, const std::vector<State>& from,
                           const std::vector<State>& to, const std::vector<int>& keep) {
  constexpr const char* where = "kmoe::carry_optimizer_state";
  ParameterList<typename Layer::execution_space, typename Layer::scalar_type> per_expert;
  resized.router().collect_parameters(per_expert);
  resized.experts().collect_parameters(per_expert);
  const int after = resized.num_experts();
  for (const auto& target : to) {
    const State* source = nullptr;
    for (const auto& s : from)
      if (s.name == target.name) source = &s;
    require(source != nullptr, where, "state", target.name,
            "has no tensor of the same name in the old optimizer");
    bool rows = false;
    for (const auto& p : per_expert) rows = rows || p.name == target.parameter;
    if (!rows) {
      require(source->value.size() == target.value.size(), where, "state", target.name,
              "changes size but does not belong to the router or the routed experts");
      Kokkos::deep_copy(target.value, source->value);
      continue;
    }
    const std::size_t width = target.value.size() / std::size_t(after);
    Kokkos::deep_copy(target.value, 0);
    for (std::size_t row = 0; row < keep.size(); ++row)
      detail::copy_expert_row(source->value, keep[row], target.value, int(row), width);
  }
}

}  // namespace kmoe
