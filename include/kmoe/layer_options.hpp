// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file layer_options.hpp
/// \brief kmoe::LayerOptions: the run-time settings of an MoELayer (capacity, balance
/// losses, training memory mode, non-finite policy, overlap, gradient sync) and the part of
/// them every rank must share (fingerprint()).

#include <kmoe/capacity.hpp>
#include <kmoe/exchange/node_options.hpp>
#include <kmoe/experts/expert_mode.hpp>
#include <kmoe/fingerprint.hpp>
#include <kmoe/gradient_buckets.hpp>
#include <kmoe/losses.hpp>
#include <kmoe/placement/expert_placement.hpp>
#include <kmoe/placement/failover.hpp>
#include <kmoe/wire_compression.hpp>

#include <cstdint>
#include <string>

namespace kmoe {

/// \brief What to do with non-finite router logits or weights.
enum class NonFinitePolicy {
  raise,     ///< throw kmoe::runtime_error naming the first bad token and expert (default)
  propagate  ///< let NaN/Inf flow to the output, as the PyTorch systems do
};

/// \brief Where a slot's routing weight w_{t,s} enters its expert's contribution to token t.
enum class RoutingWeightPlacement {
  output,  ///< y_t += w * expert(x_t): the weighted sum of the expert outputs (default)
  input    ///< y_t += expert(w * x_t): the expert runs on the scaled input and its output
           ///< is added with weight 1 (Llama 4). Across EP ranks the dispatch then sends one
           ///< row per kept assignment instead of one per token and rank (each row is scaled
           ///< by its own slot's weight).
};

/// \brief Run-time options of a layer.
struct LayerOptions {
  Capacity capacity = {};
  BalanceLossConfig losses = {};
  /// What experts keep for backward in training (ExpertMode::store or ExpertMode::recompute).
  ExpertMode training_mode = ExpertMode::store;
  NonFinitePolicy non_finite = NonFinitePolicy::raise;
  RoutingWeightPlacement routing_weight = RoutingWeightPlacement::output;
  /// Compute the shared experts while the dispatch exchange is in flight (DeepSeek's
  /// overlap); false runs them after it, for measuring what the overlap saves.
  bool overlap_shared_experts = true;
  /// Chunks C of the pipelined forward and backward (docs/parallel.md, "Pipelined
  /// exchange"): each EP rank's experts in C groups whose rows (forward) or gradients
  /// (backward) travel, compute and return one after another, so that the experts of chunk
  /// i run while later chunks are in flight and earlier ones return. 0 lets the layer choose (pipelined_chunks()), 1 is the sequential exchange.
  /// Results are bitwise those of C = 1. The pipeline runs where it keeps them so: expert
  /// parallelism with the deduplicated dispatch, TP = 1, no failover health checks, and
  /// no activations stored for backward (inference, or training_mode recompute);
  /// elsewhere C is 1.
  int exchange_chunks = 0;
  /// Fence and time each phase of forward into ForwardStats::phase_ms (costs the fences,
  /// and under expert parallelism a synchronisation of the EP group before each exchange).
  bool time_phases = false;
  /// Bucketed gradient averaging; overlap starts it inside backward (gradient_buckets.hpp).
  GradientSyncOptions gradient_sync = {};
  /// Replicated experts (placement/expert_placement.hpp): the logical expert each EP rank's
  /// expert slots hold, one rank's replicas of an expert sharing its tokens by token index.
  /// Left empty (ranks = 0), each expert has one replica, placed by
  /// ParallelLayout::placement. Dropless only (a capacity per replica would drop other
  /// tokens than the unreplicated layer).
  ExpertPlacement expert_placement = {};
  /// Failed experts and health checks (placement/failover.hpp); off by default.
  FailoverOptions failover = {};
  /// The expert-parallel exchange (flat or hierarchical) and the grouping of ranks into
  /// nodes (exchange/node_options.hpp, docs/parallel.md "Nodes").
  NodeOptions nodes = {};
  /// The expert-parallel exchange's hidden-state rows in 16 bits (docs/precision.md,
  /// "Compressed dispatch and return"): tokens to the experts, expert outputs back, and
  /// both backward exchanges carry bf16 or fp16, rounded to nearest even as they are
  /// packed, widened as they are unpacked; the dispatch's counts and links stay exact.
  /// Half the bytes of a float layer's rows. For float layers (a double layer refuses it);
  /// with one EP rank nothing is exchanged and nothing rounded. fp16 holds values up to
  /// 65504: under NonFinitePolicy::raise a larger one raises (after the step, on every rank).
  WireCompression exchange_compression = WireCompression::none;

  /// The settings that change results or the collectives a step runs, which every rank
  /// must share. overlap_shared_experts changes neither; time_phases adds a synchronisation
  /// of the EP group and can be switched later (MoELayer::set_phase_timing), so it is the
  /// caller's to set alike on every rank.
  void fingerprint(Fingerprint& print) const {
    print.real("capacity.factor", capacity.factor);
    print.integer("capacity.minimum", capacity.minimum);
    print.integer("capacity.alignment", capacity.alignment);
    print.choice("capacity.drop", int(capacity.drop), {"by_probability", "by_position"});
    print.real("losses.switch_aux", losses.switch_aux);
    print.real("losses.sequence_aux", losses.sequence_aux);
    print.integer("losses.sequence_length", losses.sequence_length);
    print.real("losses.z_loss", losses.z_loss);
    print.real("losses.kl_uniform", losses.kl_uniform);
    print.real("losses.global_batch_aux", losses.global_batch_aux);
    print.integer("losses.global_batch_micro_batches", losses.global_batch_micro_batches);
    print.choice("non_finite", int(non_finite), {"raise", "propagate"});
    print.choice("training_mode", int(training_mode), {"inference", "store", "recompute"});
    print.flag("gradient_sync.overlap", gradient_sync.overlap);
    print.integer("gradient_sync.bucket_bytes", std::int64_t(gradient_sync.bucket_bytes));
    print.integer("gradient_sync.compression", std::int64_t(gradient_sync.compression));
    failover.fingerprint(print);
    print.integer("expert_placement.ranks", expert_placement.ranks);
    print.integer("expert_placement.slots_per_rank", expert_placement.slots_per_rank);
    for (std::size_t slot = 0; slot < expert_placement.logical.size(); ++slot)
      print.integer("expert_placement.logical[" + std::to_string(slot) + "]",
                    expert_placement.logical[slot]);
    print.choice("routing_weight", int(routing_weight), {"output", "input"});
    nodes.fingerprint(print);
    print.integer("exchange_chunks", exchange_chunks);
    print.choice("exchange_compression", int(exchange_compression), {"none", "bf16", "fp16"});
  }
};

}  // namespace kmoe
