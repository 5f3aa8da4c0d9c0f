// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file layout_model.hpp
/// \brief The cost model of one parallel layout (docs/parallel.md, "Choosing a layout:
/// kmoe-plan"): for a training step of a SwiGLU MoE layer (forward, backward, gradient
/// sync, AdamW), the memory one rank holds and the bytes it hands its communicators on each
/// link class, from the exchange counts of a routing (measured, or the expectation of
/// uniform top-k routing), and a roofline step time. It follows MoELayer's buffers and
/// collectives; tests/mpi/test_mpi_layout_model.cpp checks it against the layer.

#include <kmoe/error.hpp>
#include <kmoe/parallel.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace kmoe::planning {

/// \brief The layer: H, F, E, top-k, shared experts (fused into one SwiGLU of
/// shared_experts x shared_ffn, as MoELayer's shared-expert policy runs them), element size.
struct ModelShape {
  int hidden = 0;
  int ffn = 0;
  int experts = 0;
  int top_k = 1;
  int shared_experts = 0;
  int shared_ffn = 0;
  int dtype_bytes = 4;  ///< the layer's scalar (and gradient, optimizer moment) size
  /// MoE layers of the model, each its own MoELayer with this shape: memory, bytes and
  /// FLOPs are per layer times this (a training step keeps every layer's activations).
  int layers = 1;
  /// LayerOptions::gradient_sync.bucket_bytes: gradient tensors below it are copied into
  /// staging buckets for their all-reduce (memory), larger ones are reduced in place.
  std::int64_t bucket_bytes = 25 << 20;

  void validate(const char* where) const {
    require(hidden >= 1, where, "hidden", hidden, "must be >= 1");
    require(ffn >= 1, where, "ffn", ffn, "must be >= 1");
    require(experts >= 1, where, "experts", experts, "must be >= 1");
    require(top_k >= 1 && top_k <= experts, where, "top_k", top_k,
            "must be in [1, experts = " + std::to_string(experts) + "]");
    require(shared_experts >= 0, where, "shared_experts", shared_experts, "must be >= 0");
    require(shared_experts == 0 || shared_ffn >= 1, where, "shared_ffn", shared_ffn,
            "must be >= 1 with shared experts");
    require(dtype_bytes == 2 || dtype_bytes == 4 || dtype_bytes == 8, where, "dtype_bytes",
            dtype_bytes, "must be 2, 4 or 8");
    require(bucket_bytes >= 0, where, "bucket_bytes", bucket_bytes, "must be >= 0");
    require(layers >= 1, where, "layers", layers, "must be >= 1");
  }
  /// The fused shared expert's FFN size (0 without shared experts).
  std::int64_t shared_width() const { return std::int64_t(shared_experts) * shared_ffn; }
  /// Element size of the routing tensors (routing_t: float for 16-bit scalars).
  int route_bytes() const { return dtype_bytes < 4 ? 4 : dtype_bytes; }
};

/// \brief The machine: ranks, ranks per node (consecutive world ranks share a node),
/// memory per rank, bandwidths (bytes/s one rank sends to a rank of its own node, and to a
/// rank of another node: a NIC shared by the node's ranks counts once per rank's share) and
/// the compute rate of one rank (FLOP/s on the layer's GEMMs).
struct Machine {
  int ranks = 1;
  int ranks_per_node = 1;
  double memory_per_rank = 0;
  double intra_node_bandwidth = 0;
  double inter_node_bandwidth = 0;
  double flop_rate = 0;

  void validate(const char* where) const {
    require(ranks >= 1, where, "ranks", ranks, "must be >= 1");
    require(ranks_per_node >= 1, where, "ranks_per_node", ranks_per_node, "must be >= 1");
    require(ranks % ranks_per_node == 0, where, "ranks", ranks,
            "must be a multiple of ranks_per_node = " + std::to_string(ranks_per_node));
    require(memory_per_rank > 0, where, "memory_per_rank", memory_per_rank, "must be > 0");
    require(intra_node_bandwidth > 0, where, "intra_node_bandwidth", intra_node_bandwidth,
            "must be > 0");
    require(inter_node_bandwidth > 0, where, "inter_node_bandwidth", inter_node_bandwidth,
            "must be > 0");
    require(flop_rate > 0, where, "flop_rate", flop_rate, "must be > 0");
  }
  int node_of(int world_rank) const { return world_rank / ranks_per_node; }
};

/// \brief What the exchange moves, per token group g (g = ep_rank + EP x dp_rank, the ranks
/// with distinct tokens) and EP rank r of g's EP group: the distinct token rows the
/// deduplicated dispatch sends (one per token with a kept expert on r) and the kept
/// assignments to r's experts (the rows of the return and of both backward exchanges).
/// Real numbers so that an expectation fits too.
struct ExchangeCounts {
  int ep = 1;
  std::vector<double> tokens;       ///< [g] tokens of group g
  std::vector<double> rows;         ///< [g * ep + r]
  std::vector<double> assignments;  ///< [g * ep + r]

  double row(int g, int r) const { return rows[std::size_t(g) * ep + r]; }
  double assigned(int g, int r) const { return assignments[std::size_t(g) * ep + r]; }

  /// Counted from each token group's routing (`expert[g]`: its tokens' kept global experts,
  /// top_k per token, -1 for an empty or dropped slot), under the layout's placement.
  static ExchangeCounts from_routing(const ModelShape& shape, const ParallelLayout& layout,
                                     const std::vector<std::vector<int>>& expert) {
    constexpr const char* where = "kmoe::planning::ExchangeCounts::from_routing";
    const int groups = layout.ep * layout.dp;
    require(int(expert.size()) == groups, where, "expert.size()", expert.size(),
            "must be one routing per token group (EP x DP = " + std::to_string(groups) + ")");
    ExchangeCounts counts = empty(layout, groups);
    const std::vector<int> owner = owners(shape.experts, layout);
    for (int g = 0; g < groups; ++g) {
      const auto& table = expert[g];
      require(table.size() % std::size_t(shape.top_k) == 0, where, "expert[g].size()", table.size(),
              "must be a multiple of top_k");
      counts.tokens[g] = double(table.size() / shape.top_k);
      std::vector<char> reached(layout.ep);
      for (std::size_t t = 0; t < table.size(); t += shape.top_k) {
        std::fill(reached.begin(), reached.end(), 0);
        for (int s = 0; s < shape.top_k; ++s) {
          const int e = table[t + s];
          if (e < 0) continue;
          require(e < shape.experts, where, "expert", e, "must be < experts");
          counts.assignments[std::size_t(g) * layout.ep + owner[e]] += 1;
          reached[owner[e]] = 1;
        }
        for (int r = 0; r < layout.ep; ++r)
          counts.rows[std::size_t(g) * layout.ep + r] += reached[r];
      }
    }
    return counts;
  }

  /// The expectation when every token picks top_k distinct experts uniformly at random (no
  /// capacity drops): rank r holding n_r experts receives a token with probability
  /// 1 - C(E - n_r, k) / C(E, k), and k n_r / E of its assignments.
  static ExchangeCounts uniform(const ModelShape& shape, const ParallelLayout& layout,
                                double tokens_per_group) {
    const int groups = layout.ep * layout.dp;
    ExchangeCounts counts = empty(layout, groups);
    const int e = shape.experts, k = shape.top_k;
    for (int r = 0; r < layout.ep; ++r) {
      const int n = int(layout.local_experts(e, r).size());
      // C(E - n, k) / C(E, k) as a product of k ratios.
      double miss = 1;
      for (int i = 0; i < k; ++i) miss *= double(e - n - i) / double(e - i);
      if (e - n < k) miss = 0;
      for (int g = 0; g < groups; ++g) {
        counts.tokens[g] = tokens_per_group;
        counts.rows[std::size_t(g) * layout.ep + r] = tokens_per_group * (1 - miss);
        counts.assignments[std::size_t(g) * layout.ep + r] = tokens_per_group * k * n / e;
      }
    }
    return counts;
  }

  /// Global expert -> owning EP rank under the layout's placement.
  static std::vector<int> owners(int experts, const ParallelLayout& layout) {
    std::vector<int> owner(experts, 0);
    for (int r = 0; r < layout.ep; ++r)
      for (int e : layout.local_experts(experts, r)) owner[e] = r;
    return owner;
  }

 private:
  static ExchangeCounts empty(const ParallelLayout& layout, int groups) {
    ExchangeCounts counts;
    counts.ep = layout.ep;
    counts.tokens.assign(groups, 0);
    counts.rows.assign(std::size_t(groups) * layout.ep, 0);
    counts.assignments.assign(std::size_t(groups) * layout.ep, 0);
    return counts;
  }
};

/// \brief Bytes on links within a node and between nodes.
struct LinkBytes {
  double intra = 0;
  double inter = 0;
  double total() const { return intra + inter; }
  LinkBytes& operator+=(const LinkBytes& o) {
    intra += o.intra;
    inter += o.inter;
    return *this;
  }
};

/// \brief The classes of traffic of a training step.
enum class Traffic {
  dispatch,             ///< hidden-state rows to the experts: forward dispatch, backward dL/dy
  combine,              ///< rows back to the tokens: forward expert outputs, backward dL/dx
  exchange_metadata,    ///< the dispatch's header rows (counts and links as values of the
                        ///< element type, whole rows) and, where it runs, the counts' own
                        ///< all-to-all (int64)
  tp_all_reduce,        ///< expert outputs (forward) and input gradients (backward) over tp
  gradient_all_reduce,  ///< routed experts over dp; router and shared experts over world
};
constexpr int traffic_kinds = 5;

/// \brief How the layer's expert-parallel exchange carries its metadata (MoELayer's
/// choice, expert_parallel_exchange.hpp): the deduplicated dispatch's block for each peer
/// starts with a header of whole rows (the peer's experts' assignment counts, then one link
/// per assignment, as values of the element type); the counts also travel in an all-to-all
/// of their own (int64: the peer's experts' counts, then its token rows per chunk) unless
/// the communicator sizes messages by their sender (MpiCommunicator) and the forward is
/// unchunked on the flat route.
struct ExchangePath {
  /// Chunks of the pipelined forward (ForwardStats::exchange_chunks): 1 for a training
  /// forward under ExpertMode::store, under TP, or with LayerOptions::exchange_chunks = 1.
  int chunks = 1;
  /// Whether the communicator has all_to_all_v_sized_by_sender and the route is flat.
  bool sender_sized = true;
  bool counts_exchanged() const { return chunks > 1 || !sender_sized; }
};

/// \brief Bytes one rank hands its communicators in one training step, by traffic class and
/// link class: for an all-to-all-v the blocks sent to other ranks (by where each peer
/// lives); for an all-reduce the buffer reduced (the whole of it under `inter` when the
/// group spans nodes). Groups of one rank send nothing. The layer's agreement and count
/// reductions (a few integers per call) are not modelled.
struct RankTraffic {
  std::array<LinkBytes, traffic_kinds> bytes{};
  /// Every all-reduce's buffer with the size of its group: the roofline charges a ring
  /// 2 (n - 1) / n of each.
  struct Reduction {
    double bytes;
    int ranks;
    bool inter;
  };
  std::vector<Reduction> reductions;

  LinkBytes& operator[](Traffic t) { return bytes[int(t)]; }
  const LinkBytes& operator[](Traffic t) const { return bytes[int(t)]; }
  LinkBytes total() const {
    LinkBytes sum;
    for (const auto& b : bytes) sum += b;
    return sum;
  }
};

/// \brief Bytes per rank: parameters, their gradients, AdamW's two moments, and what a
/// step keeps alive (activations and workspaces, gradient staging).
struct RankMemory {
  double weights = 0;
  double gradients = 0;
  double optimizer = 0;
  double activations = 0;
  double total() const { return weights + gradients + optimizer + activations; }
};

/// \brief Where a world rank sits in a layout, and its groups' members.
struct LayoutRanks {
  ParallelLayout layout;
  int world_rank = 0, tp_rank = 0, ep_rank = 0, dp_rank = 0;

  LayoutRanks(const ParallelLayout& l, int rank) : layout(l), world_rank(rank) {
    layout.coordinates(rank, tp_rank, ep_rank, dp_rank);
  }
  int token_group() const { return ep_rank + layout.ep * dp_rank; }
  std::vector<int> tp_group() const {
    std::vector<int> g;
    for (int t = 0; t < layout.tp; ++t) g.push_back(layout.world_rank(t, ep_rank, dp_rank));
    return g;
  }
  std::vector<int> ep_group() const {
    std::vector<int> g;
    for (int e = 0; e < layout.ep; ++e) g.push_back(layout.world_rank(tp_rank, e, dp_rank));
    return g;
  }
  std::vector<int> dp_group() const {
    std::vector<int> g;
    for (int d = 0; d < layout.dp; ++d) g.push_back(layout.world_rank(tp_rank, ep_rank, d));
    return g;
  }
};

/// \brief The cost model of a layer shape on a machine.
class LayoutModel {
 public:
  LayoutModel(const ModelShape& shape, const Machine& machine) : shape_(shape), machine_(machine) {
    shape.validate("kmoe::planning::LayoutModel");
    machine.validate("kmoe::planning::LayoutModel");
  }

  const ModelShape& shape() const { return shape_; }
  const Machine& machine() const { return machine_; }

  /// Parameters of one rank, in elements: its experts' three [F/TP, H] matrices each, the
  /// router [E, H], the shared expert's three [Fs, H] matrices.
  double expert_parameters(const LayoutRanks& at) const {
    const double local = double(at.layout.local_experts(shape_.experts, at.ep_rank).size());
    return local * 3.0 * shape_.hidden * (double(shape_.ffn) / at.layout.tp);
  }
  double replicated_parameters() const {
    return double(shape_.experts) * shape_.hidden +
           3.0 * shape_.hidden * double(shape_.shared_width());
  }

  /// The bytes `world_rank` hands its communicators in one training step (forward,
  /// backward, gradient sync), or in a forward alone (`training` false: inference, or
  /// ep_bench's forward), over the exchange `path`.
  RankTraffic traffic(const ParallelLayout& layout, const ExchangeCounts& counts, int world_rank,
                      bool training = true, const ExchangePath& path = {}) const {
    const LayoutRanks at(layout, world_rank);
    RankTraffic out;
    const double row = double(shape_.hidden) * shape_.dtype_bytes;
    const double passes = training ? 2 : 1;  // backward repeats each exchange's rows
    const int g = at.token_group();
    const auto ep_group = at.ep_group();
    if (layout.ep > 1) {
      for (int q = 0; q < layout.ep; ++q) {
        if (q == at.ep_rank) continue;
        const bool inter = crosses(world_rank, ep_group[q]);
        const int peer_group = q + layout.ep * at.dp_rank;
        const double local_of_q = double(layout.local_experts(shape_.experts, q).size());
        // Forward: the deduplicated rows; backward: dL/dy per assignment.
        add(out[Traffic::dispatch], inter,
            (counts.row(g, q) + (passes - 1) * counts.assigned(g, q)) * row);
        // Forward return and backward dL/dx: one row per assignment of q's tokens here.
        add(out[Traffic::combine], inter, passes * counts.assigned(peer_group, at.ep_rank) * row);
        // The header of the dispatch's block for q: q's local experts' assignment counts and
        // one link per kept assignment sent to q, one element each, in whole rows; the
        // counts' all-to-all: the same counts and the token rows per chunk (int64).
        const double header_rows =
            std::ceil((local_of_q + counts.assigned(g, q)) / double(shape_.hidden));
        add(out[Traffic::exchange_metadata], inter,
            header_rows * row + (path.counts_exchanged() ? (local_of_q + path.chunks) * 8.0 : 0.0));
      }
    }
    if (layout.tp > 1) {
      // The expert rows here: every token group of the EP group's assignments to this rank.
      double expert_rows = 0;
      for (int p = 0; p < layout.ep; ++p)
        expert_rows += counts.assigned(p + layout.ep * at.dp_rank, at.ep_rank);
      reduce(out, Traffic::tp_all_reduce, passes * expert_rows * row, at.tp_group());
    }
    if (training && layout.dp > 1)
      reduce(out, Traffic::gradient_all_reduce, expert_parameters(at) * shape_.dtype_bytes,
             at.dp_group());
    if (training && layout.world_size() > 1) {
      std::vector<int> world(layout.world_size());
      for (int r = 0; r < layout.world_size(); ++r) world[r] = r;
      reduce(out, Traffic::gradient_all_reduce, replicated_parameters() * shape_.dtype_bytes,
             world);
    }
    for (auto& link : out.bytes) {
      link.intra *= shape_.layers;
      link.inter *= shape_.layers;
    }
    for (auto& r : out.reductions) r.bytes *= shape_.layers;
    return out;
  }

  /// The memory `world_rank` holds after a training step (the buffers MoELayer keeps
  /// between steps: kmoe's workspaces grow to the largest step and stay).
  RankMemory memory(const ParallelLayout& layout, const ExchangeCounts& counts,
                    int world_rank) const {
    const LayoutRanks at(layout, world_rank);
    const double b = shape_.dtype_bytes, route = shape_.route_bytes();
    const double h = shape_.hidden, e = shape_.experts, k = shape_.top_k;
    const double f_local = double(shape_.ffn) / layout.tp, fs = double(shape_.shared_width());
    const int g = at.token_group();
    RankMemory m;
    const double parameters = expert_parameters(at) + replicated_parameters();
    m.weights = parameters * b;
    m.gradients = parameters * b;
    m.optimizer = 2 * parameters * b;

    const double t = counts.tokens[g];
    double sent_rows = 0, kept = 0, arrived_rows = 0, expert_rows = 0;
    for (int q = 0; q < layout.ep; ++q) {
      sent_rows += counts.row(g, q);
      kept += counts.assigned(g, q);
      const int p = q + layout.ep * at.dp_rank;
      arrived_rows += counts.row(p, at.ep_rank);
      expert_rows += counts.assigned(p, at.ep_rank);
    }
    // [rows, H] buffers. Every layer: the saved input, the kept rows in expert order
    // (send_x) and their gradient (grad_send_y), the expert outputs and the gradient at the
    // expert inputs (expert_y, grad_expert_x).
    double rows = t + 2 * kept + 2 * expert_rows;
    // Integer tables: the routing's expert indices and the dispatch's order, positions and
    // sources, one per slot.
    double integers = 4 * t * k;
    if (layout.ep > 1) {
      // Across ranks each exchange has its own send and receive buffers: the arrived rows
      // (recv_x), the expert-ordered inputs, returned outputs and gradients (expert_x,
      // recv_y, grad_recv_y, grad_expert_y, grad_recv_x), the returned outputs and input
      // gradients per kept slot (send_y, grad_send_x); send_x holds the deduplicated rows.
      rows += arrived_rows + 5 * expert_rows + 2 * kept - (kept - sent_rows);
      // The deduplication's links and rows per slot and tokens per sent row; the received
      // links and the two row maps per expert row.
      integers += 2 * t * k + sent_rows + 3 * expert_rows;
    }
    if (shape_.shared_experts > 0) rows += 2 * t;  // shared_y, shared_grad_x
    m.activations = rows * h * b + integers * 4;
    // The experts' saved projections and hidden state (gate, up, hidden), the shared
    // expert's the same on every token.
    m.activations += 3 * expert_rows * f_local * b + 3 * t * fs * b;
    // Routing: logits, probabilities, their gradient [T, E]; weights, their gradient [T, k].
    m.activations += 3 * t * e * route + 2 * t * k * route;
    m.activations += staging(at);
    for (double* part : {&m.weights, &m.gradients, &m.optimizer, &m.activations})
      *part *= shape_.layers;
    return m;
  }

  /// FLOPs of one rank's training step: the expert GEMMs on its rows (3 matrices, forward
  /// once, backward twice), the shared expert on its tokens, the router.
  double flops(const ParallelLayout& layout, const ExchangeCounts& counts, int world_rank) const {
    const LayoutRanks at(layout, world_rank);
    double expert_rows = 0;
    for (int p = 0; p < layout.ep; ++p)
      expert_rows += counts.assigned(p + layout.ep * at.dp_rank, at.ep_rank);
    const double t = counts.tokens[at.token_group()], h = shape_.hidden;
    const double gemm = 2.0 * 3.0 * 3.0;  // 2 FLOPs per multiply-add, 3 matrices, 3 passes
    return shape_.layers *
           (gemm * expert_rows * h * (double(shape_.ffn) / layout.tp) +
            gemm * t * h * double(shape_.shared_width()) + 3.0 * 2.0 * t * h * shape_.experts);
  }

  /// Seconds a rank spends communicating: exchanges at the link's bandwidth, all-reduces as
  /// a ring (2 (n - 1) / n of the buffer) at the slowest link the group spans.
  double communication_seconds(const RankTraffic& traffic) const {
    double seconds = 0;
    for (Traffic kind : {Traffic::dispatch, Traffic::combine, Traffic::exchange_metadata}) {
      seconds += traffic[kind].intra / machine_.intra_node_bandwidth;
      seconds += traffic[kind].inter / machine_.inter_node_bandwidth;
    }
    for (const auto& r : traffic.reductions)
      seconds += 2.0 * (r.ranks - 1) / r.ranks * r.bytes /
                 (r.inter ? machine_.inter_node_bandwidth : machine_.intra_node_bandwidth);
    return seconds;
  }

 private:
  bool crosses(int a, int b) const { return machine_.node_of(a) != machine_.node_of(b); }

  static void add(LinkBytes& into, bool inter, double bytes) {
    (inter ? into.inter : into.intra) += bytes;
  }

  void reduce(RankTraffic& out, Traffic kind, double bytes, const std::vector<int>& group) const {
    bool inter = false;
    for (int r : group) inter = inter || crosses(group.front(), r);
    add(out[kind], inter, bytes);
    out.reductions.push_back({bytes, int(group.size()), inter});
  }

  /// Gradient staging buckets: tensors below bucket_bytes, of groups larger than one rank,
  /// are packed into buffers of their own for the all-reduce.
  double staging(const LayoutRanks& at) const {
    const double b = shape_.dtype_bytes;
    const auto staged = [&](double elements) {
      return elements * b < double(shape_.bucket_bytes) ? elements * b : 0.0;
    };
    double bytes = 0;
    if (at.layout.dp > 1) {
      const double local = double(at.layout.local_experts(shape_.experts, at.ep_rank).size());
      bytes += 3 * staged(local * shape_.hidden * (double(shape_.ffn) / at.layout.tp));
    }
    if (at.layout.world_size() > 1) {
      bytes += staged(double(shape_.experts) * shape_.hidden);
      if (shape_.shared_experts > 0)
        bytes += 3 * staged(double(shape_.hidden) * double(shape_.shared_width()));
    }
    return bytes;
  }

  ModelShape shape_;
  Machine machine_;
};

}  // namespace kmoe::planning
