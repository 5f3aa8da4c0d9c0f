// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file parallel.hpp
/// \brief Parallel layout (docs/semantics.md section 5): the world split into TP x EP x DP
/// ranks, the groups each kind of state is synchronised over, and where experts live.

#include <kmoe/agreement.hpp>
#include <kmoe/error.hpp>
#include <kmoe/fingerprint.hpp>

#include <algorithm>
#include <string>
#include <vector>

namespace kmoe {
namespace detail {
template <class C>
using comm_set_name =
    decltype(std::declval<const C&>().set_name(std::declval<const std::string&>()));
}  // namespace detail

/// \brief Order in which ranks are laid out, fastest-varying dimension first.
/// tp_ep_dp: world rank = tp + TP * (ep + EP * dp) (Megatron's default: TP ranks adjacent).
enum class RankOrder { tp_ep_dp, ep_tp_dp, tp_dp_ep, dp_tp_ep };

/// \brief How the E experts are spread over the EP ranks.
enum class Placement {
  block,       ///< contiguous blocks; E % EP extra experts go one each to the first ranks
  round_robin  ///< expert e on EP rank e % EP
};

struct ParallelLayout {
  int tp = 1;  ///< expert tensor parallel: each expert's F split over tp ranks
  int ep = 1;  ///< expert parallel: experts split over ep ranks (which also hold distinct tokens)
  int dp = 1;  ///< data parallel replicas
  RankOrder order = RankOrder::tp_ep_dp;
  Placement placement = Placement::block;

  /// The layout's part of the settings every rank must share (fingerprint.hpp).
  void fingerprint(Fingerprint& print) const {
    print.integer("layout.tp", tp);
    print.integer("layout.ep", ep);
    print.integer("layout.dp", dp);
    print.choice("layout.order", int(order), {"tp_ep_dp", "ep_tp_dp", "tp_dp_ep", "dp_tp_ep"});
    print.choice("layout.placement", int(placement), {"block", "round_robin"});
  }

  int world_size() const { return tp * ep * dp; }

  /// The dimensions (0 tp, 1 ep, 2 dp) from the fastest-varying to the slowest.
  const int* dimension_order() const {
    static const int orders[4][3] = {{0, 1, 2}, {1, 0, 2}, {0, 2, 1}, {2, 0, 1}};
    return orders[int(order)];
  }

  /// (tp, ep, dp) coordinates of a world rank.
  void coordinates(int rank, int& tp_rank, int& ep_rank, int& dp_rank) const {
    const int* order_index = dimension_order();
    int dims[3], sizes[3];
    const int all_sizes[3] = {tp, ep, dp};
    for (int i = 0; i < 3; ++i) sizes[i] = all_sizes[order_index[i]];
    int r = rank;
    for (int i = 0; i < 3; ++i) {
      dims[order_index[i]] = r % sizes[i];
      r /= sizes[i];
    }
    tp_rank = dims[0];
    ep_rank = dims[1];
    dp_rank = dims[2];
  }

  /// The world rank at (tp, ep, dp) coordinates (the inverse of coordinates()).
  int world_rank(int tp_rank, int ep_rank, int dp_rank) const {
    const int coordinate[3] = {tp_rank, ep_rank, dp_rank}, size[3] = {tp, ep, dp};
    int rank = 0, stride = 1;
    for (int i = 0; i < 3; ++i) {
      rank += coordinate[dimension_order()[i]] * stride;
      stride *= size[dimension_order()[i]];
    }
    return rank;
  }

  /// Experts owned by EP rank `ep_rank` out of `experts`, in local order.
  std::vector<int> local_experts(int experts, int ep_rank) const {
    std::vector<int> owned;
    if (placement == Placement::round_robin) {
      for (int e = ep_rank; e < experts; e += ep) owned.push_back(e);
    } else {
      const int base = experts / ep, extra = experts % ep;
      const int first = ep_rank * base + std::min(ep_rank, extra);
      for (int e = first; e < first + base + (ep_rank < extra ? 1 : 0); ++e) owned.push_back(e);
    }
    return owned;
  }

  void validate(const char* where, int world) const {
    require(tp >= 1, where, "layout.tp", tp, "must be >= 1");
    require(ep >= 1, where, "layout.ep", ep, "must be >= 1");
    require(dp >= 1, where, "layout.dp", dp, "must be >= 1");
    require(world_size() == world, where, "layout.tp*ep*dp", world_size(),
            "must equal the world size " + std::to_string(world));
  }
};

/// \brief Communicators of one rank for every role it plays.
template <class Communicator>
struct ParallelGroups {
  ParallelLayout layout;
  Communicator world;
  Communicator tp;      ///< same tokens, different F shards of the same experts
  Communicator ep;      ///< exchange tokens by all-to-all-v
  Communicator dp;      ///< replicas of the same experts on different tokens
  Communicator tokens;  ///< every rank with distinct tokens (EP x DP): counts are summed here
  int tp_rank = 0, ep_rank = 0, dp_rank = 0;

  /// Splits `world` according to `layout`.
  /// A layout that is invalid on any rank raises on every rank before the first split.
  static ParallelGroups create(const Communicator& world, const ParallelLayout& layout) {
    constexpr const char* where = "kmoe::ParallelGroups::create";
    Communicator agreement = world;
    agree_or_throw(agreement, where, [&] { layout.validate(where, world.size()); });
    ParallelGroups g;
    g.layout = layout;
    g.world = world;
    layout.coordinates(world.rank(), g.tp_rank, g.ep_rank, g.dp_rank);
    g.tp = world.split(g.ep_rank + layout.ep * g.dp_rank, g.tp_rank);
    g.ep = world.split(g.tp_rank + layout.tp * g.dp_rank, g.ep_rank);
    g.dp = world.split(g.tp_rank + layout.tp * g.ep_rank, g.dp_rank);
    g.tokens = world.split(g.tp_rank, g.ep_rank + layout.ep * g.dp_rank);
    // Communicators that can name their group (MpiCommunicator: in the watchdog's
    // diagnostics) learn their role here.
    if constexpr (detail::is_detected_v<detail::comm_set_name, Communicator>) {
      g.tp.set_name("tp");
      g.ep.set_name("ep");
      g.dp.set_name("dp");
      g.tokens.set_name("tokens");
    }
    return g;
  }
};

}  // namespace kmoe
