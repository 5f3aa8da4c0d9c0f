// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file counting_communicator.hpp
/// \brief kmoe::CountingCommunicator: a Communicator that forwards every collective to
/// another one (MpiCommunicator, NcclCommunicator) and records, in a shared
/// kmoe::CommunicationLedger, the bytes this rank handed to it, by group, collective and
/// element size, and for all-to-all-v the bytes sent to each other world rank. It measures
/// what a layer's step sends (tests/mpi/test_mpi_layout_model.cpp checks kmoe-plan's
/// predictions against it).

#include <kmoe/communicator.hpp>
#include <kmoe/detail/detect.hpp>
#include <kmoe/parallel.hpp>

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace kmoe {

/// \brief The collectives a Communicator offers.
enum class CollectiveKind {
  exchange_counts,
  all_to_all_v,
  all_reduce_sum,
  all_reduce_max,
  all_gather,
  any_error
};

/// \brief Bytes one rank handed to its communicators, accumulated until reset().
/// Groups of one rank are not recorded (nothing leaves the rank).
/// - all_to_all_v, exchange_counts: the blocks sent to the other ranks (the own block stays);
/// - all_reduce_sum / all_reduce_max / any_error: the buffer reduced (what the application
///   hands over; an MPI ring moves 2 (n-1)/n of it each way per rank);
/// - all_gather: this rank's block.
class CommunicationLedger {
 public:
  struct Key {
    std::string group;  ///< the name set_name gave the group ("world" for the world)
    CollectiveKind kind;
    std::size_t element_bytes;
    bool floating;  ///< floating-point elements (payload, gradients) or integers (metadata)
    bool operator<(const Key& o) const {
      return std::tie(group, kind, element_bytes, floating) <
             std::tie(o.group, o.kind, o.element_bytes, o.floating);
    }
  };
  struct Entry {
    std::int64_t calls = 0;
    std::int64_t bytes = 0;
    std::map<int, std::int64_t> bytes_to_world_rank;  ///< all-to-all-v only
    std::vector<int> group_world_ranks;               ///< the group's members, by group rank
  };

  void record(const Key& key, std::int64_t bytes, const std::vector<int>& group_world_ranks) {
    auto& entry = entries_[key];
    ++entry.calls;
    entry.bytes += bytes;
    entry.group_world_ranks = group_world_ranks;
  }
  void record_to(const Key& key, int world_rank, std::int64_t bytes) {
    entries_[key].bytes_to_world_rank[world_rank] += bytes;
  }
  void reset() { entries_.clear(); }
  const std::map<Key, Entry>& entries() const { return entries_; }

  /// Bytes of every entry of `group` and `kind` with floating-point or integer elements.
  std::int64_t bytes(const std::string& group, CollectiveKind kind, bool floating) const {
    std::int64_t total = 0;
    for (const auto& [key, entry] : entries_)
      if (key.group == group && key.kind == kind && key.floating == floating) total += entry.bytes;
    return total;
  }

 private:
  std::map<Key, Entry> entries_;
};

namespace detail {
template <class C>
using comm_abort = decltype(std::declval<const C&>().abort(std::declval<const std::string&>()));
template <class C>
using comm_set_step =
    decltype(std::declval<const C&>().set_step(std::declval<const std::string&>()));
}  // namespace detail

/// \brief Forwards to `Inner` and counts (see CommunicationLedger). Copies share the group
/// and the ledger; split() results share the ledger. MemorySpace is where the inner
/// communicator takes its views (split() all-gathers the members' world ranks there, on
/// the inner communicator, uncounted).
template <class Inner, class MemorySpace = Kokkos::DefaultExecutionSpace::memory_space>
class CountingCommunicator {
 public:
  using Request = typename Inner::Request;

  /// This rank alone, counting nothing.
  CountingCommunicator() : group_(std::make_shared<Group>()) { group_->world_ranks = {0}; }

  /// Counts what is sent through `world` (its rank numbers are the world ranks).
  CountingCommunicator(const Inner& world, std::shared_ptr<CommunicationLedger> ledger)
      : inner_(world), ledger_(std::move(ledger)), group_(std::make_shared<Group>()) {
    group_->name = "world";
    for (int r = 0; r < world.size(); ++r) group_->world_ranks.push_back(r);
  }

  const Inner& inner() const { return inner_; }
  int rank() const { return inner_.rank(); }
  int size() const { return inner_.size(); }
  const std::string& name() const { return group_->name; }

  std::vector<std::int64_t> exchange_counts(const std::vector<std::int64_t>& send) const {
    if (counted()) {
      const Key key{group_->name, CollectiveKind::exchange_counts, sizeof(std::int64_t), false};
      std::int64_t bytes = 0;
      for (int p = 0; p < size(); ++p)
        if (p != rank()) {
          bytes += std::int64_t(sizeof(std::int64_t));
          ledger_->record_to(key, group_->world_ranks[p], sizeof(std::int64_t));
        }
      ledger_->record(key, bytes, group_->world_ranks);
    }
    return inner_.exchange_counts(send);
  }

  template <class SendView, class RecvView>
  void all_to_all_v(const SendView& send, const std::vector<std::int64_t>& send_counts,
                    const RecvView& recv, const std::vector<std::int64_t>& recv_counts) const {
    count_exchange<typename SendView::value_type>(send_counts);
    inner_.all_to_all_v(send, send_counts, recv, recv_counts);
  }

  template <class SendView, class RecvView>
  Request all_to_all_v_start(const SendView& send, const std::vector<std::int64_t>& send_counts,
                             const RecvView& recv,
                             const std::vector<std::int64_t>& recv_counts) const {
    count_exchange<typename SendView::value_type>(send_counts);
    return inner_.all_to_all_v_start(send, send_counts, recv, recv_counts);
  }

  /// Present where the inner communicator has it (the expert-parallel exchange detects it
  /// and then sends its counts inside the payload): counted as the all-to-all-v it is.
  template <class SendView, class Receive, class I = Inner>
  auto all_to_all_v_sized_by_sender(const SendView& send,
                                    const std::vector<std::int64_t>& send_counts,
                                    const Receive& receive) const
      -> decltype(std::declval<const I&>().all_to_all_v_sized_by_sender(send, send_counts,
                                                                        receive)) {
    count_exchange<typename SendView::value_type>(send_counts);
    return inner_.all_to_all_v_sized_by_sender(send, send_counts, receive);
  }

  template <class View>
  void all_reduce_sum(const View& data) const {
    count<typename View::value_type>(CollectiveKind::all_reduce_sum, data.size());
    inner_.all_reduce_sum(data);
  }
  /// Present where the inner communicator has it (gradient_buckets.hpp detects it).
  template <class View, class I = Inner>
  auto all_reduce_sum_start(const View& data) const
      -> decltype(std::declval<const I&>().all_reduce_sum_start(data)) {
    count<typename View::value_type>(CollectiveKind::all_reduce_sum, data.size());
    return inner_.all_reduce_sum_start(data);
  }
  template <class View>
  void all_reduce_max(const View& data) const {
    count<typename View::value_type>(CollectiveKind::all_reduce_max, data.size());
    inner_.all_reduce_max(data);
  }
  template <class SendView, class RecvView>
  void all_gather(const SendView& send, const RecvView& recv) const {
    count<typename SendView::value_type>(CollectiveKind::all_gather, send.size());
    inner_.all_gather(send, recv);
  }

  bool any_error(bool local_error) const {
    count<int>(CollectiveKind::any_error, 1);
    return inner_.any_error(local_error);
  }

  CountingCommunicator split(int color, int key) const {
    CountingCommunicator sub;
    sub.inner_ = inner_.split(color, key);
    sub.ledger_ = ledger_;
    sub.group_->name = group_->name + " split by color " + std::to_string(color);
    Kokkos::View<int*, MemorySpace> mine("kmoe::CountingCommunicator::world_rank", 1);
    Kokkos::View<int*, MemorySpace> all("kmoe::CountingCommunicator::world_ranks",
                                        sub.inner_.size());
    Kokkos::deep_copy(mine, group_->world_ranks[rank()]);
    sub.inner_.all_gather(mine, all);
    auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), all);
    sub.group_->world_ranks.assign(host.data(), host.data() + host.size());
    return sub;
  }

  /// Names the group in the ledger (ParallelGroups::create: "tp", "ep", "dp", "tokens"), and
  /// the inner group where it can be named.
  void set_name(const std::string& name) const {
    group_->name = name;
    if constexpr (detail::is_detected_v<detail::comm_set_name, Inner>) inner_.set_name(name);
  }
  template <class I = Inner>
  auto set_step(const std::string& step) const
      -> decltype(std::declval<const I&>().set_step(step)) {
    inner_.set_step(step);
  }
  template <class I = Inner, class = detail::comm_abort<I>>
  [[noreturn]] void abort(const std::string& message) const {
    inner_.abort(message);
  }

 private:
  using Key = CommunicationLedger::Key;
  struct Group {
    std::string name;
    std::vector<int> world_ranks;  ///< world rank of each member, by rank in the group
  };

  bool counted() const { return ledger_ && size() > 1; }

  template <class T>
  Key key_of(CollectiveKind kind) const {
    using Element = std::remove_cv_t<T>;
    return {group_->name, kind, sizeof(Element), std::is_floating_point_v<Element>};
  }

  template <class T>
  void count(CollectiveKind kind, std::size_t elements) const {
    if (counted())
      ledger_->record(key_of<T>(kind), std::int64_t(elements * sizeof(T)), group_->world_ranks);
  }

  template <class T>
  void count_exchange(const std::vector<std::int64_t>& send_counts) const {
    if (!counted()) return;
    const Key key = key_of<T>(CollectiveKind::all_to_all_v);
    std::int64_t bytes = 0;
    for (int p = 0; p < size(); ++p) {
      if (p == rank()) continue;
      const std::int64_t peer_bytes = send_counts[p] * std::int64_t(sizeof(T));
      bytes += peer_bytes;
      ledger_->record_to(key, group_->world_ranks[p], peer_bytes);
    }
    ledger_->record(key, bytes, group_->world_ranks);
  }

  Inner inner_;
  std::shared_ptr<CommunicationLedger> ledger_;
  std::shared_ptr<Group> group_;
};

}  // namespace kmoe
