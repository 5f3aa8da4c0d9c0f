// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file communicator.hpp
/// \brief The Communicator role, its compile-time check, and the single-process one.
///
/// A Communicator C is a handle on a group of ranks (copyable; copies share the group):
///  - `int rank() const; int size() const;`
///  - `std::vector<std::int64_t> exchange_counts(const std::vector<std::int64_t>& send)`:
///    send[p] goes to rank p, the result's [p] came from rank p (the count step of
///    all-to-all-v);
///  - `template <class SendView, class RecvView> void all_to_all_v(const SendView& send,
///    const std::vector<std::int64_t>& send_counts, const RecvView& recv,
///    const std::vector<std::int64_t>& recv_counts)`: rank-1 contiguous Kokkos views in the
///    memory space the layer runs in; counts in elements, blocks laid out in rank order;
///  - `all_to_all_v_start(...)`, same arguments, returning a `Request` whose `wait()`
///    completes it (lets independent work overlap the exchange);
///  - `template <class View> void all_reduce_sum(const View& data)` and `all_reduce_max`
///    (in place), `all_gather(const SendView& send, const RecvView& recv)` (recv holds
///    size() blocks of send.size() in rank order);
///  - `C split(int color, int key) const`: the sub-group of ranks with the same color,
///    ordered by key;
///  - `bool any_error(bool local_error)`: true on every rank if any rank passed true (the
///    agreement step that keeps a failing rank from leaving the others blocked).
/// Optional members, used where present (detected, not required):
///  - `[[noreturn]] void abort(const std::string& message) const`: ends the job
///    (agreement.hpp's abort_on_failure; MpiCommunicator: MPI_Abort);
///  - `void set_step(const std::string& step) const`: the call this process is in, for
///    diagnostics (set at each of the layer's agreement points; MpiCommunicator's watchdog);
///  - `void set_name(const std::string& name) const`: the group's role, set by
///    ParallelGroups::create ("tp", "ep", "dp", "tokens");
///  - `template <class View> Request all_reduce_sum_start(const View& data) const`: the
///    in-place sum started and completed by the Request's wait(), so that a gradient
///    bucket's reduction overlaps the rest of backward (gradient_buckets.hpp). Without it,
///    the buckets reduce with the blocking all_reduce_sum as they start;
///  - `bool Request::test()`: advances a started operation and says whether it completed
///    (MPI progresses a non-blocking collective only inside MPI calls); polled between
///    the phases of an overlapped backward.
///  - `template <class SendView, class Receive> std::vector<std::int64_t>
///    all_to_all_v_sized_by_sender(const SendView& send, const std::vector<std::int64_t>&
///    send_counts, const Receive& receive)`: an all-to-all-v whose receiver learns the
///    counts from the messages, calling `receive(source, count)` once per source rank for
///    where to receive that block (a pointer to host-accessible room for `count` values),
///    and returning the counts; the expert-parallel exchange then sends its counts inside
///    the payload instead of in an all-to-all of their own (one synchronisation fewer per
///    forward).
/// `kmoe::check_valid_communicator<C>()` asserts each rule with its own message.

#include <kmoe/detail/detect.hpp>
#include <kmoe/error.hpp>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace kmoe {
namespace detail {

// The rules are checked with a plain rank-1 view of double; every Communicator takes any
// rank-1 view of its memory space, and the layer's views are of this shape.
using communicator_probe_view = Kokkos::View<double*>;
using communicator_counts = std::vector<std::int64_t>;

template <class C>
using comm_rank = decltype(int(std::declval<const C&>().rank()));
template <class C>
using comm_size = decltype(int(std::declval<const C&>().size()));
template <class C>
using comm_exchange_counts =
    std::enable_if_t<std::is_same_v<decltype(std::declval<C&>().exchange_counts(
                                        std::declval<const communicator_counts&>())),
                                    communicator_counts>>;
template <class C>
using comm_all_to_all_v = decltype(std::declval<C&>().all_to_all_v(
    std::declval<const communicator_probe_view&>(), std::declval<const communicator_counts&>(),
    std::declval<const communicator_probe_view&>(), std::declval<const communicator_counts&>()));
template <class C>
using comm_request = typename C::Request;
template <class C>
using comm_request_wait = decltype(std::declval<typename C::Request&>().wait());
template <class C>
using comm_all_to_all_v_start =
    std::enable_if_t<std::is_same_v<decltype(std::declval<C&>().all_to_all_v_start(
                                        std::declval<const communicator_probe_view&>(),
                                        std::declval<const communicator_counts&>(),
                                        std::declval<const communicator_probe_view&>(),
                                        std::declval<const communicator_counts&>())),
                                    typename C::Request>>;
template <class C>
using comm_all_reduce_sum =
    decltype(std::declval<C&>().all_reduce_sum(std::declval<const communicator_probe_view&>()));
template <class C>
using comm_all_reduce_max =
    decltype(std::declval<C&>().all_reduce_max(std::declval<const communicator_probe_view&>()));
template <class C>
using comm_all_gather =
    decltype(std::declval<C&>().all_gather(std::declval<const communicator_probe_view&>(),
                                           std::declval<const communicator_probe_view&>()));
template <class C>
using comm_split =
    std::enable_if_t<std::is_same_v<decltype(std::declval<const C&>().split(0, 0)), C>>;
/// The receive callback of all_to_all_v_sized_by_sender (declared only: for detection).
struct communicator_probe_receive {
  double* operator()(int source, std::int64_t count) const;
};
template <class C>
using comm_sized_exchange = decltype(std::declval<const C&>().all_to_all_v_sized_by_sender(
    std::declval<const communicator_probe_view&>(), std::declval<const communicator_counts&>(),
    std::declval<const communicator_probe_receive&>()));
template <class C>
using comm_any_error =
    std::enable_if_t<std::is_same_v<decltype(std::declval<C&>().any_error(true)), bool>>;

}  // namespace detail

/// \brief Compile-time check that C is a Communicator; each missing piece gets its own message.
template <class C>
constexpr bool check_valid_communicator() {
  static_assert(std::is_copy_constructible_v<C> && std::is_copy_assignable_v<C>,
                "kmoe Communicator: must be copyable (copies share the group)");
  static_assert(std::is_default_constructible_v<C>,
                "kmoe Communicator: must be default-constructible (a group of this rank alone)");
  static_assert(detail::is_detected_v<detail::comm_rank, C>,
                "kmoe Communicator: missing 'int rank() const'");
  static_assert(detail::is_detected_v<detail::comm_size, C>,
                "kmoe Communicator: missing 'int size() const'");
  static_assert(detail::is_detected_v<detail::comm_exchange_counts, C>,
                "kmoe Communicator: missing 'std::vector<std::int64_t> exchange_counts(const "
                "std::vector<std::int64_t>& send)'");
  static_assert(detail::is_detected_v<detail::comm_all_to_all_v, C>,
                "kmoe Communicator: missing 'void all_to_all_v(send, send_counts, recv, "
                "recv_counts)' taking rank-1 views and std::vector<std::int64_t> counts");
  static_assert(detail::is_detected_v<detail::comm_request, C>,
                "kmoe Communicator: missing member type 'Request'");
  static_assert(
      std::is_default_constructible_v<detail::detected_or_t<int, detail::comm_request, C>>,
      "kmoe Communicator: 'Request' must be default-constructible (an exchange that "
      "needs no communication returns Request{})");
  static_assert(detail::is_detected_v<detail::comm_request_wait, C>,
                "kmoe Communicator: missing 'void Request::wait()'");
  static_assert(detail::is_detected_v<detail::comm_all_to_all_v_start, C>,
                "kmoe Communicator: missing 'Request all_to_all_v_start(send, send_counts, "
                "recv, recv_counts)'");
  static_assert(detail::is_detected_v<detail::comm_all_reduce_sum, C>,
                "kmoe Communicator: missing 'void all_reduce_sum(const View& data)'");
  static_assert(detail::is_detected_v<detail::comm_all_reduce_max, C>,
                "kmoe Communicator: missing 'void all_reduce_max(const View& data)'");
  static_assert(detail::is_detected_v<detail::comm_all_gather, C>,
                "kmoe Communicator: missing 'void all_gather(const SendView& send, const "
                "RecvView& recv)'");
  static_assert(detail::is_detected_v<detail::comm_split, C>,
                "kmoe Communicator: missing 'C split(int color, int key) const'");
  static_assert(detail::is_detected_v<detail::comm_any_error, C>,
                "kmoe Communicator: missing 'bool any_error(bool local_error)'");
  return true;
}

/// \brief The group of one rank: every collective is a local copy (or nothing).
class SingleProcessCommunicator {
 public:
  /// Completed-at-once request of a non-blocking exchange.
  struct Request {
    void wait() {}
    bool test() { return true; }
  };

  int rank() const { return 0; }
  int size() const { return 1; }

  std::vector<std::int64_t> exchange_counts(const std::vector<std::int64_t>& send) const {
    require(send.size() == 1, "kmoe::SingleProcessCommunicator::exchange_counts", "send.size()",
            send.size(), "must equal the group size 1");
    return send;
  }

  template <class SendView, class RecvView>
  void all_to_all_v(const SendView& send, const std::vector<std::int64_t>& send_counts,
                    const RecvView& recv, const std::vector<std::int64_t>& recv_counts) const {
    require(send_counts.size() == 1 && recv_counts.size() == 1 && send_counts[0] == recv_counts[0],
            "kmoe::SingleProcessCommunicator::all_to_all_v", "counts",
            send_counts.empty() ? -1 : send_counts[0], "one rank sends exactly what it receives");
    copy(send, recv, std::size_t(send_counts[0]));
  }

  template <class SendView, class RecvView>
  Request all_to_all_v_start(const SendView& send, const std::vector<std::int64_t>& send_counts,
                             const RecvView& recv,
                             const std::vector<std::int64_t>& recv_counts) const {
    all_to_all_v(send, send_counts, recv, recv_counts);
    return {};
  }

  template <class View>
  void all_reduce_sum(const View&) const {}
  template <class View>
  Request all_reduce_sum_start(const View&) const {
    return {};
  }
  template <class View>
  void all_reduce_max(const View&) const {}
  template <class SendView, class RecvView>
  void all_gather(const SendView& send, const RecvView& recv) const {
    copy(send, recv, send.size());
  }

  SingleProcessCommunicator split(int, int) const { return {}; }
  bool any_error(bool local_error) const { return local_error; }

 private:
  template <class SendView, class RecvView>
  static void copy(const SendView& send, const RecvView& recv, std::size_t n) {
    if (n == 0 || send.data() == recv.data()) return;
    Kokkos::deep_copy(Kokkos::subview(recv, std::make_pair(std::size_t(0), n)),
                      Kokkos::subview(send, std::make_pair(std::size_t(0), n)));
  }
};

/// \brief The maximum of one host value over the ranks of `comm` (views of MemorySpace,
/// the one the communicator takes); no collective on one rank.
template <class MemorySpace, class Communicator>
long long all_reduce_max_value(const Communicator& comm, long long value) {
  if (comm.size() == 1) return value;
  Kokkos::View<long long*, MemorySpace> v("kmoe::all_reduce_max_value", 1);
  Kokkos::deep_copy(v, value);
  comm.all_reduce_max(v);
  auto host = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  return host(0);
}

/// \brief Sums host values element-wise over the ranks of `comm`, in place, in one
/// all-reduce; no collective on one rank.
template <class MemorySpace, class Communicator>
void all_reduce_sum_values(const Communicator& comm, std::vector<std::int64_t>& values) {
  if (comm.size() == 1) return;
  Kokkos::View<std::int64_t*, MemorySpace> v("kmoe::all_reduce_sum_values", values.size());
  auto host = Kokkos::create_mirror_view(v);
  for (std::size_t i = 0; i < values.size(); ++i) host(i) = values[i];
  Kokkos::deep_copy(v, host);
  comm.all_reduce_sum(v);
  Kokkos::deep_copy(host, v);
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = host(i);
}

// The shipped communicators meet their role wherever they are included.
static_assert(check_valid_communicator<SingleProcessCommunicator>());

}  // namespace kmoe
