// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file global_clip.hpp
/// \brief Clipping by the gradient norm of the *global* model on any parallel layout: each
/// parameter element counted once however many ranks hold a replica of it, so every rank
/// gets the same norm and the same scale (a rank-local clip scales the replicas of the
/// router apart, and the next optimizer step pulls them apart).

#include <kmoe/optimizer.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/parameters.hpp>

namespace kmoe {

namespace detail {
/// Whether this rank adds `p` to the global sum of squares: replicas are counted on one
/// rank of their group only. Routed-expert tensors are replicated over DP (and over TP when
/// their F axis is whole, like an output bias); everything else over every rank.
template <class ExecSpace, class Scalar, class Communicator>
bool counts_toward_global_norm(const Parameter<ExecSpace, Scalar>& p,
                               const ParallelGroups<Communicator>& groups) {
  if (!p.shard.expert_parallel) return groups.world.rank() == 0;
  return groups.dp_rank == 0 && (p.shard.ffn_ranks > 1 || groups.tp_rank == 0);
}

/// sqrt of the sum over the world of each rank's `local` sum of squares (one all-reduce of
/// one value): the same on every rank.
template <class ExecSpace, class Communicator>
double global_norm(double local, const ParallelGroups<Communicator>& groups) {
  Vector<double, ExecSpace> total("kmoe::clip_grad_norm::total", 1);
  auto host = Kokkos::create_mirror_view(total);
  host(0) = local;
  Kokkos::deep_copy(total, host);
  Communicator world = groups.world;
  if (world.size() > 1) world.all_reduce_sum(total);
  Kokkos::deep_copy(host, total);
  return std::sqrt(host(0));
}
}  // namespace detail

/// \brief Scales the gradients of `list` (one rank's share of a layer's parameters, with
/// their ShardMaps, as MoELayer::parameters() gives them, after synchronize_gradients())
/// so that the global L2 norm is at most `max_norm`; returns the global norm before
/// clipping, identical on every rank of `groups.world` (one all-reduce of one value).
template <class ExecSpace, class Scalar, class Communicator>
double clip_grad_norm(const ParameterList<ExecSpace, Scalar>& list, double max_norm,
                      const ParallelGroups<Communicator>& groups) {
  require(max_norm > 0 && std::isfinite(max_norm), "kmoe::clip_grad_norm", "max_norm", max_norm,
          "must be positive and finite");
  double local = 0;
  for (const auto& p : list)
    if (detail::counts_toward_global_norm(p, groups))
      local += detail::sum_of_squares<ExecSpace>(p.grad);
  const double norm = detail::global_norm<ExecSpace>(local, groups);
  detail::scale_gradients<ExecSpace>(list, norm, max_norm);
  return norm;
}

/// \brief The global clip over every parameter of a layer in its own parallel layout.
template <class Layer>
double clip_grad_norm(const Layer& layer, double max_norm) {
  return clip_grad_norm(layer.parameters(), max_norm, layer.groups());
}

}  // namespace kmoe
