// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file init.hpp
/// \brief Deterministic parameter initialisation: the same values on every backend, thread
/// count, rank and parallel layout, because each element's value depends only on the seed,
/// the tensor and the element's index in the *unsharded* tensor (its ShardMap).

#include <kmoe/detail/math.hpp>
#include <kmoe/error.hpp>
#include <kmoe/parameters.hpp>

#include <cmath>

namespace kmoe {

/// \brief Fills a contiguous view with N(0, stddev^2) samples keyed by (seed, element index).
template <class View>
void fill_normal(const View& view, double stddev, std::uint64_t seed) {
  using Scalar = typename View::non_const_value_type;
  using ExecSpace = typename View::execution_space;
  auto* data = view.data();
  Kokkos::parallel_for(
      "kmoe::fill_normal", Kokkos::RangePolicy<ExecSpace>(0, view.size()),
      KOKKOS_LAMBDA(std::size_t i) {
        data[i] = Scalar(stddev * detail::counter_normal<double>(seed, i, 0x6b6d6f65, 0));
      });
}

namespace detail {
/// The flat-index map of a parameter's shard into its unsharded tensor; `experts` receives
/// the device copy of the local-to-global expert table that the map points into.
template <class ExecSpace, class Scalar>
GlobalIndexMap global_index_map(const Parameter<ExecSpace, Scalar>& p,
                                Vector<int, ExecSpace>& experts) {
  GlobalIndexMap map;
  require(p.shape.size() <= std::size_t(GlobalIndexMap::max_rank), "kmoe::global_index_map",
          ("rank of " + p.name).c_str(), p.shape.size(), "must be at most 4");
  map.rank = int(p.shape.size());
  const auto global = p.shard.global_shape(p.shape);
  for (int a = 0; a < map.rank; ++a) {
    map.local[a] = p.shape[std::size_t(a)];
    map.global[a] = global[std::size_t(a)];
  }
  map.expert_axis = p.shard.expert_axis;
  map.ffn_axis = p.shard.ffn_axis;
  if (map.ffn_axis >= 0) map.ffn_offset = std::int64_t(p.shard.ffn_rank) * map.local[map.ffn_axis];
  if (map.expert_axis >= 0 && !p.shard.experts.empty()) {
    experts = Vector<int, ExecSpace>("kmoe::global_index_map::experts", p.shard.experts.size());
    auto host = Kokkos::create_mirror_view(experts);
    for (std::size_t e = 0; e < p.shard.experts.size(); ++e) host(e) = p.shard.experts[e];
    Kokkos::deep_copy(experts, host);
    map.experts = experts.data();
  }
  return map;
}

/// N(0, stddev^2) into `p`, element i taking the sample of its index in the unsharded tensor.
template <class ExecSpace, class Scalar>
void fill_normal_global(const Parameter<ExecSpace, Scalar>& p, double stddev, std::uint64_t seed) {
  Vector<int, ExecSpace> experts;
  const GlobalIndexMap map = global_index_map(p, experts);
  const auto value = p.value;
  Kokkos::parallel_for(
      "kmoe::fill_normal", Kokkos::RangePolicy<ExecSpace>(0, value.size()),
      KOKKOS_LAMBDA(std::size_t i) {
        const auto g = std::uint64_t(map(std::int64_t(i)));
        value(i) = Scalar(stddev * detail::counter_normal<double>(seed, g, 0x6b6d6f65, 0));
      });
  ExecSpace().fence();
}
}  // namespace detail

/// \brief Initialises every parameter of a list with N(0, stddev^2), one seed per tensor
/// (by its position in the list, which every rank of a layer shares). Sharded tensors
/// (expert-parallel, tensor-parallel) get exactly the values of the same elements in the
/// single-rank layer, so every layout starts from the same model.
template <class ExecSpace, class Scalar>
void fill_normal(const ParameterList<ExecSpace, Scalar>& list, double stddev, std::uint64_t seed) {
  for (std::size_t i = 0; i < list.size(); ++i)
    detail::fill_normal_global(list[i], stddev, detail::splitmix64(seed + i));
}

/// \brief Standard deviations by parameter role (Megatron-Core's init_method_std for
/// inputs, output_layer_init_method = std / sqrt(2 * layers) for projections back to H).
struct InitConfig {
  double router_std = 0.02;
  double input_std = 0.02;   ///< expert H -> F projections
  double output_std = 0.02;  ///< expert F -> H projections; Megatron: input_std / sqrt(2 L)
  double bias_std = 0.0;     ///< 0: biases start at zero
  double other_std = 0.02;   ///< tensors a custom policy did not classify

  double stddev(ParameterRole role) const {
    switch (role) {
      case ParameterRole::router:
        return router_std;
      case ParameterRole::input_projection:
        return input_std;
      case ParameterRole::output_projection:
        return output_std;
      case ParameterRole::bias:
        return bias_std;
      default:
        return other_std;
    }
  }

  void validate() const {
    for (auto [name, value] : {std::pair<const char*, double>{"router_std", router_std},
                               {"input_std", input_std},
                               {"output_std", output_std},
                               {"bias_std", bias_std},
                               {"other_std", other_std}})
      require(value >= 0 && std::isfinite(value), "kmoe::InitConfig", name, value,
              "must be finite and >= 0");
  }
};

/// \brief Initialises each parameter with N(0, std(role)^2) keyed by the tensor's position
/// and the element's global index, as fill_normal; zero std gives zeros.
template <class ExecSpace, class Scalar>
void initialize(const ParameterList<ExecSpace, Scalar>& list, const InitConfig& config,
                std::uint64_t seed) {
  config.validate();
  for (std::size_t i = 0; i < list.size(); ++i)
    detail::fill_normal_global(list[i], config.stddev(list[i].role), detail::splitmix64(seed + i));
}

}  // namespace kmoe
