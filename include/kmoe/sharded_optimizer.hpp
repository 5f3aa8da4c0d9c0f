// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file sharded_optimizer.hpp
/// \brief ZeRO-1 and ZeRO-2 (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training
/// Trillion Parameter Models", 2020): an SGD or AdamW whose state is sharded over the ranks
/// that hold replicas of each parameter (docs/training.md, "Sharded optimizer state").
///
/// The parameters fall into the two groups MoELayer averages gradients over: routed-expert
/// tensors over the data-parallel group of their experts, everything else (router, shared
/// experts) over the world. Each group's tensors, flattened in list order, are cut into one
/// contiguous shard per rank of its group; a rank keeps the optimizer moments of its shard
/// only and updates only its shard, then an all-gather hands every rank the others' updated
/// elements. Stage 1 takes the gradients the layer's all-reduce averaged; stage 2 replaces
/// that all-reduce by a reduce-scatter, so that each rank receives only its shard of the
/// averaged gradient.
///
/// Bits: the update of an element is the wrapped optimizer's own kernel on the same values,
/// and the shards are cut at the gradient norm's chunk boundaries (detail::norm_chunk), so
/// the clipping norm adds the same partial sums in the same order as the unsharded global
/// clip. Stage 1 is therefore bitwise the unsharded step. Stage 2's reduce-scatter adds the
/// ranks' gradients in rank order (0 + 1 + 2 + ...): bitwise the unsharded step whenever the
/// all-reduce adds in that order too (always at 2 ranks; the MPI library chooses its own
/// order at more).

#include <kmoe/error.hpp>
#include <kmoe/global_clip.hpp>
#include <kmoe/optimizer.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/parameters.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

namespace kmoe {

/// \brief What a ShardedOptimizer shards (ZeRO's stages 1 and 2).
enum class ZeroStage {
  one = 1,  ///< optimizer state: gradients all-reduced by the layer, parameters all-gathered
  two = 2   ///< also the averaged gradient: reduce-scatter instead of the all-reduce
};

struct ShardingOptions {
  ZeroStage stage = ZeroStage::one;
  /// Largest staging buffer of the reduce-scatter and of the all-gather: they run in windows
  /// of at most this many bytes (at least detail::norm_chunk elements per rank).
  std::size_t bucket_bytes = std::size_t(25) << 20;
};

namespace detail {

/// Elements [begin, end) of tensor `tensor` (an index into its group), at `offset` in the
/// shard that holds them.
struct ShardSegment {
  std::size_t tensor = 0;
  std::size_t begin = 0, end = 0;
  std::size_t offset = 0;
};

/// One rank's shard of a group's flattened tensors.
struct Shard {
  std::vector<ShardSegment> segments;
  std::size_t length = 0;  ///< elements
  std::size_t chunks = 0;  ///< norm chunks (norm_chunk elements, shorter at a tensor's end)
};

/// Cuts tensors of `sizes` elements, flattened in order, into `ranks` contiguous shards of
/// near-equal length at norm-chunk boundaries: a chunk belongs to the rank whose equal share
/// of the flat index range holds the chunk's middle, so shards differ from total / ranks by
/// less than one chunk.
inline std::vector<Shard> partition_flat(const std::vector<std::size_t>& sizes, int ranks) {
  std::size_t total = 0;
  for (auto n : sizes) total += n;
  std::vector<Shard> shards(static_cast<std::size_t>(ranks));
  std::size_t start = 0;
  for (std::size_t t = 0; t < sizes.size(); ++t)
    for (std::size_t begin = 0; begin < sizes[t]; begin += norm_chunk) {
      const std::size_t end = std::min(sizes[t], begin + norm_chunk), n = end - begin;
      const std::size_t owner =
          std::min(std::size_t(ranks - 1), (2 * start + n) * std::size_t(ranks) / (2 * total));
      Shard& shard = shards[owner];
      if (!shard.segments.empty() && shard.segments.back().tensor == t &&
          shard.segments.back().end == begin)
        shard.segments.back().end = end;
      else
        shard.segments.push_back({t, begin, end, shard.length});
      shard.length += n;
      ++shard.chunks;
      start += n;
    }
  return shards;
}

/// Calls f(tensor, element, position, count) for each run of the shard's positions
/// [first, first + count) that lies in one tensor: `element` is where the run starts in
/// the tensor, `position` where it starts relative to `first`.
template <class F>
void for_each_run(const Shard& shard, std::size_t first, std::size_t count, F&& f) {
  for (const auto& s : shard.segments) {
    const std::size_t lo = std::max(s.offset, first);
    const std::size_t hi = std::min(s.offset + (s.end - s.begin), first + count);
    if (lo < hi) f(s.tensor, s.begin + (lo - s.offset), lo - first, hi - lo);
  }
}

/// Elements of a shard of `length` that fall in the window starting at `first`.
inline std::size_t window_count(std::size_t length, std::size_t first, std::size_t window) {
  return length > first ? std::min(window, length - first) : 0;
}

template <class View>
auto range_of(const View& v, std::size_t first, std::size_t count) {
  return Kokkos::subview(v, Kokkos::make_pair(first, first + count));
}

/// out(at + i) = (blocks(i) + blocks(count + i) + ... ) [* factor]: the ranks' blocks added
/// in rank order, then scaled as GradientBuckets scales a sum. A free function: nvcc
/// refuses an extended lambda in a private member.
template <class X, class Blocks, class Out, class S>
void add_in_rank_order(const Blocks& blocks, int ranks, std::size_t count, const Out& out,
                       std::size_t at, bool scale, S factor) {
  Kokkos::parallel_for(
      "kmoe::ShardedOptimizer::reduce_scatter", Kokkos::RangePolicy<X>(0, count),
      KOKKOS_LAMBDA(std::size_t i) {
        S sum = blocks(i);
        for (int p = 1; p < ranks; ++p) sum += blocks(std::size_t(p) * count + i);
        if (scale) sum *= factor;
        out(at + i) = sum;
      });
}

/// The execution space and scalar of an optimizer class template instance (SGD<X, S>).
template <class Optimizer>
struct optimizer_types;
template <template <class, class> class Optimizer, class X, class S>
struct optimizer_types<Optimizer<X, S>> {
  using execution_space = X;
  using scalar_type = S;
};

}  // namespace detail

/// \brief ZeRO-1/2 around kmoe::SGD or kmoe::AdamW (any optimizer class template of
/// <ExecSpace, Scalar> built from (ParameterList, Config), with step(), state(),
/// state_suffixes(), state_bytes(), steps() / set_steps() and set_learning_rate()).
///
/// A step with a layer: `layer.zero_gradients(); layer.forward(...); layer.backward(...);
/// opt.reduce_gradients(layer); opt.clip_grad_norm(max); opt.step();`. Collective over
/// the layer's world: every rank calls the same members in the same order.
template <class Optimizer, class Communicator>
class ShardedOptimizer {
 public:
  using execution_space = typename detail::optimizer_types<Optimizer>::execution_space;
  using scalar_type = typename detail::optimizer_types<Optimizer>::scalar_type;
  using Config = typename Optimizer::Config;
  using X = execution_space;
  using S = scalar_type;

  /// \param list    [in] one rank's parameters with their ShardMaps (MoELayer::parameters())
  /// \param groups  [in] the parallel groups of the layer they belong to
  /// \param config  [in] the wrapped optimizer's settings (learning rate, groups, ...)
  /// \param options [in] the ZeRO stage and the staging buffer size
  ShardedOptimizer(ParameterList<X, S> list, const ParallelGroups<Communicator>& groups,
                   const Config& config, const ShardingOptions& options = {})
      : list_(std::move(list)),
        groups_(groups),
        options_(options),
        shard_groups_(make_groups(list_, groups_, options_)),
        inner_(shard_parameters(list_, shard_groups_, options_.stage), config) {}

  /// \brief Shards the optimizer of `layer`'s parameters over `layer`'s groups.
  template <class Layer>
  ShardedOptimizer(const Layer& layer, const Config& config, const ShardingOptions& options = {})
      : ShardedOptimizer(layer.parameters(), layer.groups(), config, options) {}

  ZeroStage stage() const { return options_.stage; }

  /// \brief Averages the gradients backward left in `layer`: stage 1 by the layer's own
  /// synchronize_gradients(); stage 2 by a reduce-scatter into this rank's shard (the
  /// layer's gradients keep their local values). Stage 2 needs the layer's overlapped
  /// gradient sync off (that sync all-reduces inside backward).
  template <class Layer>
  void reduce_gradients(Layer& layer) {
    if (options_.stage == ZeroStage::one) {
      layer.synchronize_gradients();
      return;
    }
    require(!layer.options().gradient_sync.overlap, "kmoe::ShardedOptimizer::reduce_gradients",
            "layer.options().gradient_sync.overlap", "true",
            "must be false with ZeroStage::two: the reduce-scatter replaces the layer's "
            "all-reduce, which overlap starts inside backward");
    for (auto& group : shard_groups_) reduce_scatter(group);
    X().fence();
  }

  /// \brief Scales this rank's shard of the averaged gradients so that the global L2 norm
  /// is at most `max_norm`; returns the global norm before clipping, the same bits as
  /// kmoe::clip_grad_norm(list, max_norm, groups) on the unsharded gradients.
  double clip_grad_norm(double max_norm) {
    require(max_norm > 0 && std::isfinite(max_norm), "kmoe::ShardedOptimizer::clip_grad_norm",
            "max_norm", max_norm, "must be positive and finite");
    // Each tensor's chunk sums, gathered from the ranks that hold its chunks.
    std::vector<std::vector<double>> partials(list_.size());
    std::size_t segment = 0;
    for (auto& group : shard_groups_) {
      const int ranks = group.comm.size();
      const Shard& mine = group.shards[std::size_t(group.comm.rank())];
      std::size_t most = 0;
      for (const auto& s : group.shards) most = std::max(most, s.chunks);
      Vector<double, X> send("kmoe::ShardedOptimizer::chunk_sums", most),
          all("kmoe::ShardedOptimizer::all_chunk_sums", most * std::size_t(ranks));
      auto send_host = Kokkos::create_mirror_view(send);
      std::size_t at = 0;
      for (std::size_t k = 0; k < mine.segments.size(); ++k, ++segment)
        for (double sum : detail::chunk_sums_of_squares<X>(inner_list_[segment].grad))
          send_host(at++) = sum;
      Kokkos::deep_copy(send, send_host);
      if (ranks > 1 && most > 0)
        group.comm.all_gather(send, all);
      else
        Kokkos::deep_copy(all, send);
      const auto all_host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), all);
      for (int p = 0; p < ranks; ++p) {
        std::size_t next = std::size_t(p) * most;
        for (const auto& s : group.shards[std::size_t(p)].segments)
          for (std::size_t c = 0;
               c < (s.end - s.begin + detail::norm_chunk - 1) / detail::norm_chunk; ++c)
            partials[group.members[s.tensor]].push_back(all_host(next++));
      }
    }
    double local = 0;
    for (std::size_t i = 0; i < list_.size(); ++i)
      if (detail::counts_toward_global_norm(list_[i], groups_))
        local += detail::add_in_order(partials[i]);
    const double norm = detail::global_norm<X>(local, groups_);
    detail::scale_gradients<X>(inner_list_, norm, max_norm);
    return norm;
  }

  /// \brief Updates this rank's shard, then all-gathers every group's updated elements, so
  /// that every rank holds the whole updated parameters.
  void step() {
    inner_.step();
    X().fence();
    for (auto& group : shard_groups_) all_gather_parameters(group);
    X().fence();
  }

  void set_learning_rate(double lr) { inner_.set_learning_rate(lr); }
  double learning_rate() const { return inner_.learning_rate(); }
  long long steps() const { return inner_.steps(); }
  void set_steps(long long steps) { inner_.set_steps(steps); }

  /// Bytes of optimizer state (moments) this rank holds: its shards' only.
  std::size_t state_bytes() const { return inner_.state_bytes(); }
  /// Bytes of this rank's averaged-gradient shard (stage 2; 0 at stage 1).
  std::size_t reduced_gradient_bytes() const {
    std::size_t bytes = 0;
    for (const auto& group : shard_groups_) bytes += group.reduced.size() * sizeof(S);
    return bytes;
  }
  /// Elements of this rank's shard of each group (routed experts, then the replicated rest).
  std::vector<std::size_t> shard_elements() const {
    std::vector<std::size_t> lengths;
    for (const auto& group : shard_groups_)
      lengths.push_back(group.shards[std::size_t(group.comm.rank())].length);
    return lengths;
  }

  /// \brief Assembles the whole state of every parameter on every rank (collective over the
  /// world: an all-gather per group and state tensor); state() lists it until
  /// release_state() or scatter_state(). What checkpoints call around state().
  void gather_state() const {
    const auto inner_state = inner_.state();
    const std::size_t kinds = Optimizer::state_suffixes().size();
    gathered_.assign(list_.size(), {});
    for (std::size_t i = 0; i < list_.size(); ++i)
      for (std::size_t j = 0; j < kinds; ++j)
        gathered_[i].emplace_back("kmoe::ShardedOptimizer::gathered(" + list_[i].name + ")",
                                  list_[i].value.size());
    std::size_t first_segment = 0;
    for (const auto& group : shard_groups_) {
      const int ranks = group.comm.size(), me = group.comm.rank();
      const auto& mine = group.shards[std::size_t(me)];
      const std::size_t longest = group.longest;
      Vector<S, X> send("kmoe::ShardedOptimizer::state_shard", longest),
          all("kmoe::ShardedOptimizer::state_all", longest * std::size_t(ranks));
      for (std::size_t j = 0; j < kinds; ++j) {
        for (std::size_t k = 0; k < mine.segments.size(); ++k) {
          const auto& s = mine.segments[k];
          Kokkos::deep_copy(X(), detail::range_of(send, s.offset, s.end - s.begin),
                            inner_state[(first_segment + k) * kinds + j].value);
        }
        X().fence();
        if (ranks > 1 && longest > 0)
          group.comm.all_gather(send, all);
        else
          Kokkos::deep_copy(all, send);
        for (int p = 0; p < ranks; ++p)
          for (const auto& s : group.shards[std::size_t(p)].segments)
            Kokkos::deep_copy(
                X(),
                detail::range_of(gathered_[group.members[s.tensor]][j], s.begin, s.end - s.begin),
                detail::range_of(all, std::size_t(p) * longest + s.offset, s.end - s.begin));
      }
      first_segment += mine.segments.size();
    }
    X().fence();
  }

  /// \brief Takes this rank's shards back from the whole state (after a checkpoint was
  /// loaded into what state() lists), then releases it.
  void scatter_state() {
    require(!gathered_.empty() || list_.empty(), "kmoe::ShardedOptimizer::scatter_state",
            "gathered state", "none", "call gather_state() first");
    const auto inner_state = inner_.state();
    const std::size_t kinds = Optimizer::state_suffixes().size();
    std::size_t segment = 0;
    for (const auto& group : shard_groups_)
      for (const auto& s : group.shards[std::size_t(group.comm.rank())].segments) {
        for (std::size_t j = 0; j < kinds; ++j)
          Kokkos::deep_copy(X(), inner_state[segment * kinds + j].value,
                            detail::range_of(gathered_[group.members[s.tensor]][j], s.begin,
                                             s.end - s.begin));
        ++segment;
      }
    X().fence();
    release_state();
  }

  /// Frees what gather_state() assembled.
  void release_state() const { gathered_.clear(); }

  /// \brief The whole state of every parameter, named like the unsharded optimizer's
  /// ("router.weight.exp_avg"): valid between gather_state() and release_state().
  std::vector<OptimizerState<X, S>> state() const {
    require(!gathered_.empty() || list_.empty(), "kmoe::ShardedOptimizer::state", "gathered state",
            "none", "call gather_state() (collective) first: each rank holds only its shards");
    const auto suffixes = Optimizer::state_suffixes();
    std::vector<OptimizerState<X, S>> all;
    for (std::size_t i = 0; i < list_.size(); ++i)
      for (std::size_t j = 0; j < suffixes.size(); ++j)
        all.push_back({list_[i].name + suffixes[j], list_[i].name, gathered_[i][j]});
    return all;
  }

 private:
  using Shard = detail::Shard;
  using Flat = typename Parameter<X, S>::flat_view;

  /// The tensors averaged over one group of ranks, and how they are sharded over it.
  struct ShardGroup {
    Communicator comm;
    int divisor = 1;                   ///< what the layer divides their summed gradients by
    std::vector<std::size_t> members;  ///< indices into the parameter list
    std::vector<Shard> shards;         ///< one per rank of comm
    std::size_t longest = 0;           ///< the longest shard
    Vector<S, X> reduced;              ///< stage 2: this rank's shard of the averaged gradient
  };

  /// Routed-expert tensors over the data-parallel group, divided by the ranks with distinct
  /// tokens; the rest over the world (as MoELayer::start_gradient_sync).
  static std::vector<ShardGroup> make_groups(const ParameterList<X, S>& list,
                                             const ParallelGroups<Communicator>& groups,
                                             const ShardingOptions& options) {
    constexpr const char* where = "kmoe::ShardedOptimizer";
    require(options.stage == ZeroStage::one || options.stage == ZeroStage::two, where,
            "options.stage", int(options.stage), "must be ZeroStage::one or ZeroStage::two");
    std::vector<ShardGroup> all(2);
    all[0].comm = groups.dp;
    all[0].divisor = groups.tokens.size();
    all[1].comm = groups.world;
    all[1].divisor = groups.world.size();
    for (std::size_t i = 0; i < list.size(); ++i)
      all[list[i].shard.expert_parallel ? 0 : 1].members.push_back(i);
    for (auto& group : all) {
      std::vector<std::size_t> sizes;
      for (auto i : group.members) sizes.push_back(list[i].value.size());
      group.shards = detail::partition_flat(sizes, group.comm.size());
      for (const auto& s : group.shards) group.longest = std::max(group.longest, s.length);
      if (options.stage == ZeroStage::two)
        group.reduced = Vector<S, X>("kmoe::ShardedOptimizer::reduced_gradient",
                                     group.shards[std::size_t(group.comm.rank())].length);
    }
    return all;
  }

  /// This rank's segments as parameters for the wrapped optimizer: the same name and role
  /// (so parameter groups resolve alike), values aliasing the layer's, gradients aliasing
  /// the layer's (stage 1) or the reduced shard (stage 2).
  ParameterList<X, S> shard_parameters(const ParameterList<X, S>& list,
                                       const std::vector<ShardGroup>& groups, ZeroStage stage) {
    inner_list_.clear();
    for (const auto& group : groups)
      for (const auto& s : group.shards[std::size_t(group.comm.rank())].segments) {
        const auto& p = list[group.members[s.tensor]];
        Parameter<X, S> piece;
        piece.name = p.name;
        piece.role = p.role;
        piece.shard = p.shard;
        piece.shape = {std::int64_t(s.end - s.begin)};
        piece.value = Flat(p.value.data() + s.begin, s.end - s.begin);
        piece.grad = stage == ZeroStage::two
                         ? Flat(group.reduced.data() + s.offset, s.end - s.begin)
                         : Flat(p.grad.data() + s.begin, s.end - s.begin);
        inner_list_.push_back(piece);
      }
    return inner_list_;
  }

  /// Elements per rank and window: bucket_bytes over the group, at least one norm chunk.
  std::size_t window(int ranks) const {
    return std::max(detail::norm_chunk, options_.bucket_bytes / sizeof(S) / std::size_t(ranks));
  }

  static void ensure(Vector<S, X>& staging, std::size_t n, const char* label) {
    if (staging.extent(0) < n)
      staging =
          Vector<S, X>(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string(label)), n);
  }

  /// Each rank receives every rank's gradient elements of its shard, window by window, and
  /// adds them in rank order.
  void reduce_scatter(ShardGroup& group) {
    const int ranks = group.comm.size(), me = group.comm.rank();
    const bool scale = group.divisor != 1;
    const S factor = S(1) / S(group.divisor);
    const std::size_t step = window(ranks);
    std::vector<std::int64_t> send_counts(static_cast<std::size_t>(ranks)),
        recv_counts(static_cast<std::size_t>(ranks));
    for (std::size_t first = 0; first < group.longest; first += step) {
      const std::size_t mine =
          detail::window_count(group.shards[std::size_t(me)].length, first, step);
      std::size_t packed = 0;
      ensure(send_, step * std::size_t(ranks), "kmoe::ShardedOptimizer::send");
      ensure(receive_, step * std::size_t(ranks), "kmoe::ShardedOptimizer::receive");
      for (int p = 0; p < ranks; ++p) {
        const Shard& shard = group.shards[std::size_t(p)];
        const std::size_t count = detail::window_count(shard.length, first, step);
        detail::for_each_run(
            shard, first, count,
            [&](std::size_t t, std::size_t element, std::size_t at, std::size_t n) {
              Kokkos::deep_copy(X(), detail::range_of(send_, packed + at, n),
                                detail::range_of(list_[group.members[t]].grad, element, n));
            });
        send_counts[std::size_t(p)] = std::int64_t(count);
        recv_counts[std::size_t(p)] = std::int64_t(mine);
        packed += count;
      }
      X().fence();
      if (ranks > 1)
        group.comm.all_to_all_v(send_, send_counts, receive_, recv_counts);
      else
        Kokkos::deep_copy(detail::range_of(receive_, 0, mine), detail::range_of(send_, 0, mine));
      detail::add_in_rank_order<X>(receive_, ranks, mine, group.reduced, first, scale, factor);
    }
  }

  /// Every rank's updated shard to every rank, window by window.
  void all_gather_parameters(ShardGroup& group) {
    const int ranks = group.comm.size(), me = group.comm.rank();
    if (ranks == 1) return;
    const std::size_t step = window(ranks);
    for (std::size_t first = 0; first < group.longest; first += step) {
      const std::size_t block = std::min(step, group.longest - first);
      ensure(send_, block, "kmoe::ShardedOptimizer::send");
      ensure(receive_, block * std::size_t(ranks), "kmoe::ShardedOptimizer::receive");
      const Shard& mine = group.shards[std::size_t(me)];
      detail::for_each_run(mine, first, detail::window_count(mine.length, first, step),
                           [&](std::size_t t, std::size_t element, std::size_t at, std::size_t n) {
                             Kokkos::deep_copy(X(), detail::range_of(send_, at, n),
                                               detail::range_of(list_[group.members[t]].value,
                                                                element, n));
                           });
      X().fence();
      group.comm.all_gather(detail::range_of(send_, 0, block),
                            detail::range_of(receive_, 0, block * std::size_t(ranks)));
      for (int p = 0; p < ranks; ++p) {
        if (p == me) continue;
        const Shard& shard = group.shards[std::size_t(p)];
        detail::for_each_run(
            shard, first, detail::window_count(shard.length, first, step),
            [&](std::size_t t, std::size_t element, std::size_t at, std::size_t n) {
              Kokkos::deep_copy(X(), detail::range_of(list_[group.members[t]].value, element, n),
                                detail::range_of(receive_, std::size_t(p) * block + at, n));
            });
      }
    }
  }

  ParameterList<X, S> list_;
  ParallelGroups<Communicator> groups_;
  ShardingOptions options_;
  std::vector<ShardGroup> shard_groups_;
  ParameterList<X, S> inner_list_;  ///< this rank's segments, in shard order (set before inner_)
  Optimizer inner_;
  Vector<S, X> send_, receive_;  ///< staging of the reduce-scatter and the all-gather
  mutable std::vector<std::vector<Vector<S, X>>> gathered_;  ///< gather_state()'s whole state
};

}  // namespace kmoe
