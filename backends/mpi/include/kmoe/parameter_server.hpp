// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file parameter_server.hpp
/// \brief Parameter-server gradient sync over MPI, the alternative to the all-reduce of
/// MoELayer::synchronize_gradients() (docs/parallel.md, "Parameter server").
///
/// The last `servers` ranks of the world are servers; the others are workers and train a
/// layer built on ParameterServer::workers(). The replicated parameters (router, shared
/// experts: ShardMap::expert_parallel false) are flattened into one vector split into one
/// contiguous shard per server. Each step a worker pushes its gradient shards to the servers
/// (MPI_Isend); each server sums the workers' shards in worker order, divides by the worker
/// count, steps its own optimizer on its shard and sends the new values back; the worker
/// pulls them (MPI_Irecv posted at push time). Routed-expert tensors keep their data-parallel
/// all-reduce and the worker's own optimizer.
///
/// Staleness s = 0 is synchronous: step t+1 starts from the values that include step t's
/// gradients, the same numbers as synchronize_gradients() and the optimizer on every rank.
/// s >= 1: the worker waits only for the reply to the push of s steps ago, so step t computes
/// with the values that include the gradients of steps 0 .. t-s-1 (exactly s updates old:
/// the worst case of the bound, reproducible run to run), while the newer replies travel
/// behind the computation.
///
/// Point-to-point on dedicated server ranks rather than one-sided RMA: the server must run
/// an optimizer (AdamW's moments cannot be an MPI_Accumulate), so it has to learn that
/// gradients arrived, which matched receives give it and passive-target RMA does not (it
/// would poll flags in a window); and a server that adds the workers' shards in a fixed
/// order gives the same bits every run, which concurrent MPI_Accumulates do not promise.
///
/// The waits are MPI's blocking ones, outside the MpiCommunicator watchdog. Every worker must
/// call synchronize() the same number of times and then finish(); a server that sees some
/// workers stop while others push ends the job (MPI_Abort) with a message, rather than hang.

#include <kmoe/agreement.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/error.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/parameters.hpp>

#include <Kokkos_Core.hpp>
#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace kmoe {

struct ParameterServerConfig {
  int servers = 1;    ///< the last `servers` ranks of the world serve; at least one must train
  int staleness = 0;  ///< 0: synchronous; s >= 1: step t uses values s updates old
};

/// The tensors a worker's own optimizer steps under a parameter server: the routed experts.
template <class ExecSpace, class Scalar>
ParameterList<ExecSpace, Scalar> expert_parallel_parameters(
    const ParameterList<ExecSpace, Scalar>& all) {
  ParameterList<ExecSpace, Scalar> experts;
  for (const auto& p : all)
    if (p.shard.expert_parallel) experts.push_back(p);
  return experts;
}

/// The tensors a parameter server owns: router and shared experts, held by every worker.
template <class ExecSpace, class Scalar>
ParameterList<ExecSpace, Scalar> replicated_parameters(
    const ParameterList<ExecSpace, Scalar>& all) {
  ParameterList<ExecSpace, Scalar> replicated;
  for (const auto& p : all)
    if (!p.shard.expert_parallel) replicated.push_back(p);
  return replicated;
}

/// \brief One rank's side of a parameter server: a worker (attach, synchronize, finish) or a
/// server (serve). Construction is collective over `world`.
template <class ExecSpace, class Scalar>
class ParameterServer {
  static_assert(
      Kokkos::SpaceAccessibility<Kokkos::HostSpace, typename ExecSpace::memory_space>::accessible,
      "kmoe::ParameterServer: MPI point-to-point needs host-accessible parameters");

 public:
  using List = ParameterList<ExecSpace, Scalar>;
  using Buffer = Kokkos::View<Scalar*, typename ExecSpace::memory_space>;

  /// Splits `world` (duplicated first, so that the server's messages never match the
  /// application's) into workers and servers. A configuration invalid on any rank, or
  /// different between ranks, raises kmoe::invalid_argument on every rank naming it.
  ParameterServer(const MpiCommunicator& world, const ParameterServerConfig& config)
      : config_(config), comm_(world.native(), world.options()) {
    constexpr const char* where = "kmoe::ParameterServer";
    const int size = comm_.size();
    agree_or_throw(comm_, where, [&] {
      require(config.servers >= 1 && config.servers < size, where, "config.servers", config.servers,
              "must be in [1, world size " + std::to_string(size) +
                  ") so that a rank is left to train");
      require(config.staleness >= 0, where, "config.staleness", config.staleness,
              "must be >= 0 (0 is synchronous)");
    });
    // Valid everywhere but different (one rank thinks rank 2 serves, another that it
    // trains) would leave messages unmatched: a hang, not an error.
    int bounds[4] = {config.servers, -config.servers, config.staleness, -config.staleness};
    MPI_Allreduce(MPI_IN_PLACE, bounds, 4, MPI_INT, MPI_MAX, comm_.native());
    if (bounds[0] != -bounds[1])
      throw invalid_argument(where, "config.servers", std::to_string(config.servers),
                             "differs across ranks (from " + std::to_string(-bounds[1]) + " to " +
                                 std::to_string(bounds[0]) + ")");
    if (bounds[2] != -bounds[3])
      throw invalid_argument(where, "config.staleness", std::to_string(config.staleness),
                             "differs across ranks (from " + std::to_string(-bounds[3]) + " to " +
                                 std::to_string(bounds[2]) + ")");
    worker_count_ = size - config.servers;
    server_ = comm_.rank() >= worker_count_;
    group_ = comm_.split(server_ ? 1 : 0, comm_.rank());
    group_.set_name(server_ ? "servers" : "workers");
    const int slots = config.staleness + 1;
    push_requests_.assign(std::size_t(slots), {});
    pull_requests_.assign(std::size_t(slots), {});
  }

  bool is_server() const { return server_; }
  int worker_count() const { return worker_count_; }
  int server_count() const { return config_.servers; }
  int staleness() const { return config_.staleness; }
  /// Steps pushed (worker) or updates applied (server).
  long long steps() const { return steps_; }

  /// The worker ranks: build the layer's ParallelGroups on it.
  const MpiCommunicator& workers() const {
    require(!server_, "kmoe::ParameterServer::workers", "role", "server",
            "only a worker rank belongs to the worker group");
    return group_;
  }

  /// \brief Worker side of the start (collective over the world with serve()): sends the
  /// replicated tensors' names, sizes and initial values to the servers. `parameters` must
  /// stay valid until finish() (a layer's parameters() alias its storage).
  void attach(const List& parameters, const ParallelGroups<MpiCommunicator>& groups) {
    constexpr const char* where = "kmoe::ParameterServer::attach";
    require(!server_, where, "role", "server", "servers call serve(), workers attach()");
    replicated_ = replicated_parameters(parameters);
    experts_ = expert_parallel_parameters(parameters);
    dp_ = groups.dp;
    token_ranks_ = groups.tokens.size();
    agree_or_throw(comm_, where, [&] {
      require(!attached_, where, "attach", "a second call", "a worker attaches once");
      int relation = MPI_UNEQUAL;
      MPI_Comm_compare(groups.world.native(), group_.native(), &relation);
      require(relation == MPI_IDENT || relation == MPI_CONGRUENT, where, "groups.world",
              std::to_string(groups.world.size()) + " ranks",
              "must be the " + std::to_string(worker_count_) +
                  " workers (ParallelGroups::create(server.workers(), layout))");
    });
    exchange_layout(where);
    // Each worker keeps its own start values (the layer checked that replicas agree); the
    // servers take theirs from world rank 0.
    Buffer initial("kmoe::ParameterServer::initial", total_);
    pack(initial, &Parameter<ExecSpace, Scalar>::value);
    MPI_Bcast(initial.data(), count(total_), mpi_type(), 0, comm_.native());
    for (int slot = 0; slot <= config_.staleness; ++slot) {
      gradient_slots_.emplace_back("kmoe::ParameterServer::gradients", total_);
      value_slots_.emplace_back("kmoe::ParameterServer::values", total_);
    }
    attached_ = true;
  }

  template <class Layer>
  void attach(const Layer& layer) {
    attach(layer.parameters(), layer.groups());
  }

  /// \brief Worker, after backward: pushes the replicated gradients, averages the routed
  /// experts' over the data-parallel group (as synchronize_gradients() does), and writes
  /// into the replicated values those of the reply `staleness()` pushes back. Step the
  /// worker's optimizer over expert_parallel_parameters() afterwards.
  void synchronize() {
    constexpr const char* where = "kmoe::ParameterServer::synchronize";
    require(attached_ && !finished_, where, "state", attached_ ? "finished" : "not attached",
            "call attach() first and nothing after finish()");
    const std::size_t slot = std::size_t(steps_ % (config_.staleness + 1));
    // This slot last carried the push of `staleness + 1` steps ago, whose reply was
    // awaited one step ago; its sends are matched by now.
    wait_all(push_requests_[slot]);
    pack(gradient_slots_[slot], &Parameter<ExecSpace, Scalar>::grad);
    ExecSpace().fence();
    for (int j = 0; j < config_.servers; ++j) {
      const auto [begin, length] = shard(j);
      MPI_Request send, receive;
      MPI_Isend(gradient_slots_[slot].data() + begin, count(length), mpi_type(), worker_count_ + j,
                tag_gradient, comm_.native(), &send);
      MPI_Irecv(value_slots_[slot].data() + begin, count(length), mpi_type(), worker_count_ + j,
                tag_values, comm_.native(), &receive);
      push_requests_[slot].push_back(send);
      pull_requests_[slot].push_back(receive);
    }
    // The experts' all-reduce runs while the servers step.
    const Scalar scale = Scalar(1) / Scalar(token_ranks_);
    for (const auto& p : experts_) {
      if (dp_.size() > 1) dp_.all_reduce_sum(p.grad);
      scale_in_place(p.grad, scale);
    }
    if (steps_ >= config_.staleness) {
      const std::size_t ready = std::size_t((steps_ - config_.staleness) % (config_.staleness + 1));
      wait_all(pull_requests_[ready]);
      unpack(value_slots_[ready]);
    }
    ++steps_;
  }

  /// \brief Worker, after the last synchronize(): takes the newest values (every worker
  /// ends on the servers' final state) and tells the servers to stop.
  void finish() {
    constexpr const char* where = "kmoe::ParameterServer::finish";
    require(attached_ && !finished_, where, "state", attached_ ? "finished" : "not attached",
            "call attach() first, and finish() once");
    const int slots = config_.staleness + 1;
    for (long long step = std::max(0LL, steps_ - config_.staleness); step < steps_; ++step) {
      const std::size_t slot = std::size_t(step % slots);
      wait_all(pull_requests_[slot]);
      if (step == steps_ - 1) unpack(value_slots_[slot]);
    }
    for (auto& requests : push_requests_) wait_all(requests);
    for (int j = 0; j < config_.servers; ++j)
      MPI_Send(nullptr, 0, mpi_type(), worker_count_ + j, tag_stop, comm_.native());
    finished_ = true;
  }

  /// \brief Server: receives the layout from the workers' attach(), then applies one update
  /// per step until the workers finish(); returns the updates applied.
  /// `make_optimizer(ParameterList)` builds the server's optimizer over its shard: one
  /// Parameter per replicated tensor the shard overlaps, with the tensor's name and role
  /// (so name- and role-based ParameterGroups apply) and the overlap as a 1-D shape.
  template <class MakeOptimizer>
  long long serve(const MakeOptimizer& make_optimizer) {
    constexpr const char* where = "kmoe::ParameterServer::serve";
    require(server_, where, "role", "worker", "workers attach(), servers serve()");
    agree_or_throw(comm_, where, [&] {
      require(!attached_, where, "serve", "a second call", "a server serves once");
    });
    exchange_layout(where);
    attached_ = true;
    Buffer initial("kmoe::ParameterServer::initial", total_);
    MPI_Bcast(initial.data(), count(total_), mpi_type(), 0, comm_.native());

    const auto range = shard(comm_.rank() - worker_count_);
    const std::size_t begin = range.first, length = range.second;  // captured by the kernel
    Buffer value("kmoe::ParameterServer::shard", length),
        grad("kmoe::ParameterServer::grad", length),
        received("kmoe::ParameterServer::received", std::size_t(worker_count_) * length);
    Kokkos::deep_copy(value, Kokkos::subview(initial, std::make_pair(begin, begin + length)));
    List shard_list;
    for (std::size_t i = 0, first = 0; i < sizes_.size(); first += sizes_[i], ++i) {
      const std::size_t lo = std::max(first, begin),
                        hi = std::min(first + sizes_[i], begin + length);
      if (lo >= hi) continue;
      Parameter<ExecSpace, Scalar> p;
      p.name = names_[i];
      p.shape = {std::int64_t(hi - lo)};
      p.role = ParameterRole(roles_[i]);
      p.value =
          typename Parameter<ExecSpace, Scalar>::flat_view(value.data() + (lo - begin), hi - lo);
      p.grad =
          typename Parameter<ExecSpace, Scalar>::flat_view(grad.data() + (lo - begin), hi - lo);
      shard_list.push_back(p);
    }
    auto optimizer = make_optimizer(shard_list);

    const int workers = worker_count_;
    std::vector<MPI_Request> receives(static_cast<std::size_t>(workers)), replies;
    std::vector<MPI_Status> statuses(static_cast<std::size_t>(workers));
    for (;;) {
      for (int w = 0; w < workers; ++w)
        MPI_Irecv(received.data() + std::size_t(w) * length, count(length), mpi_type(), w,
                  MPI_ANY_TAG, comm_.native(), &receives[std::size_t(w)]);
      MPI_Waitall(workers, receives.data(), statuses.data());
      int stopped = 0;
      for (const auto& status : statuses) stopped += status.MPI_TAG == tag_stop ? 1 : 0;
      if (stopped == workers) break;
      if (stopped > 0) {
        std::fprintf(stderr,
                     "kmoe::ParameterServer::serve: %d of %d workers called finish() while the "
                     "others pushed step %lld; every worker must synchronize() equally often\n",
                     stopped, workers, steps_);
        MPI_Abort(comm_.native(), 1);
      }
      // The previous replies read `value`, which the optimizer is about to change.
      wait_all(replies);
      // Worker order, then one multiply by 1/W: the all-reduce's sum and scale.
      const Scalar scale = Scalar(1) / Scalar(workers);
      const auto sum = grad;
      const auto from = received;
      Kokkos::parallel_for(
          "kmoe::ParameterServer::sum", Kokkos::RangePolicy<ExecSpace>(0, length),
          KOKKOS_LAMBDA(std::size_t i) {
            Scalar total = from(i);
            for (int w = 1; w < workers; ++w) total += from(std::size_t(w) * length + i);
            sum(i) = total;
            sum(i) *= scale;
          });
      optimizer.step();
      ExecSpace().fence();
      for (int w = 0; w < workers; ++w) {
        MPI_Request reply;
        MPI_Isend(value.data(), count(length), mpi_type(), w, tag_values, comm_.native(), &reply);
        replies.push_back(reply);
      }
      ++steps_;
    }
    wait_all(replies);
    finished_ = true;
    return steps_;
  }

 private:
  static constexpr int tag_gradient = 1, tag_stop = 2, tag_values = 3;

  static MPI_Datatype mpi_type() { return detail::mpi_datatype<Scalar>(); }

  static int count(std::size_t n) {
    require(n <= std::size_t(INT_MAX), "kmoe::ParameterServer", "replicated elements per message",
            n, "must fit MPI's int count");
    return int(n);
  }

  static void wait_all(std::vector<MPI_Request>& requests) {
    if (requests.empty()) return;
    MPI_Waitall(int(requests.size()), requests.data(), MPI_STATUSES_IGNORE);
    requests.clear();
  }

  static void scale_in_place(const typename Parameter<ExecSpace, Scalar>::flat_view& g,
                             Scalar scale) {
    Kokkos::parallel_for(
        "kmoe::ParameterServer::scale", Kokkos::RangePolicy<ExecSpace>(0, g.size()),
        KOKKOS_LAMBDA(std::size_t i) { g(i) *= scale; });
  }

  /// First element and length of server j's shard: contiguous blocks, the first
  /// total % servers of them one element longer.
  std::pair<std::size_t, std::size_t> shard(int j) const {
    const std::size_t servers = std::size_t(config_.servers), base = total_ / servers,
                      extra = total_ % servers, index = std::size_t(j);
    return {index * base + std::min(index, extra), base + (index < extra ? 1 : 0)};
  }

  template <class Field>
  void pack(const Buffer& flat, Field field) const {
    std::size_t offset = 0;
    for (const auto& p : replicated_) {
      const auto& source = p.*field;
      Kokkos::deep_copy(Kokkos::subview(flat, std::make_pair(offset, offset + source.size())),
                        source);
      offset += source.size();
    }
  }

  void unpack(const Buffer& flat) const {
    std::size_t offset = 0;
    for (const auto& p : replicated_) {
      Kokkos::deep_copy(p.value,
                        Kokkos::subview(flat, std::make_pair(offset, offset + p.value.size())));
      offset += p.value.size();
    }
  }

  /// World rank 0 (a worker) broadcasts the replicated tensors' names, sizes and roles; each
  /// worker checks its own against them, each server adopts them. Collective over the world.
  void exchange_layout(const char* where) {
    long long header[2] = {0, 0};
    std::string names;
    std::vector<long long> sizes, roles;
    if (!server_) {
      for (const auto& p : replicated_) {
        names += p.name + '\n';
        sizes.push_back((long long)p.value.size());
        roles.push_back((long long)p.role);
      }
      header[0] = (long long)replicated_.size();
      header[1] = (long long)names.size();
    }
    MPI_Bcast(header, 2, MPI_LONG_LONG, 0, comm_.native());
    std::vector<long long> numbers(std::size_t(2 * header[0]));
    std::string root_names(std::size_t(header[1]), '\0');
    if (comm_.rank() == 0) {
      std::copy(sizes.begin(), sizes.end(), numbers.begin());
      std::copy(roles.begin(), roles.end(), numbers.begin() + header[0]);
      root_names = names;
    }
    MPI_Bcast(numbers.data(), int(numbers.size()), MPI_LONG_LONG, 0, comm_.native());
    MPI_Bcast(root_names.data(), int(root_names.size()), MPI_CHAR, 0, comm_.native());
    agree_or_throw(comm_, where, [&] {
      if (server_) return;
      const bool same = sizes.size() == std::size_t(header[0]) && names == root_names &&
                        std::equal(sizes.begin(), sizes.end(), numbers.begin());
      require(same, where, "parameters", std::to_string(sizes.size()) + " replicated tensors",
              "must have the names and sizes of world rank 0's (" + std::to_string(header[0]) +
                  " tensors)");
    });
    names_.clear();
    sizes_.clear();
    roles_.clear();
    std::size_t start = 0;
    for (long long i = 0; i < header[0]; ++i) {
      const std::size_t end = root_names.find('\n', start);
      names_.push_back(root_names.substr(start, end - start));
      start = end + 1;
      sizes_.push_back(std::size_t(numbers[std::size_t(i)]));
      roles_.push_back(int(numbers[std::size_t(header[0] + i)]));
    }
    total_ = 0;
    for (auto n : sizes_) total_ += n;
  }

  ParameterServerConfig config_;
  MpiCommunicator comm_;   ///< the duplicated world: workers first, then servers
  MpiCommunicator group_;  ///< this rank's role: the workers or the servers
  int worker_count_ = 0;
  bool server_ = false, attached_ = false, finished_ = false;
  long long steps_ = 0;

  // The replicated layout, the same on every rank after exchange_layout().
  std::vector<std::string> names_;
  std::vector<std::size_t> sizes_;
  std::vector<int> roles_;
  std::size_t total_ = 0;

  // Worker state: one gradient and one value buffer per step in flight (staleness + 1).
  List replicated_, experts_;
  MpiCommunicator dp_;
  int token_ranks_ = 1;
  std::vector<Buffer> gradient_slots_, value_slots_;
  std::vector<std::vector<MPI_Request>> push_requests_, pull_requests_;
};

}  // namespace kmoe
