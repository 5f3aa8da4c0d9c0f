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

#include <kmoe/detail/detect.hpp>
#include <kmoe/error.hpp>

#include <cstdint>
#include <cstring>
#include <vector>

namespace kmoe {

/// \brief The group of one rank: every collective is a local copy (or nothing).
class SingleProcessCommunicator {
 public:
  /// Completed-at-once request of a non-blocking exchange.
  struct Request {
    void wait() {}
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

  template <class View> void all_reduce_sum(const View&) const {}
  template <class View> void all_reduce_max(const View&) const {}
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

}  // namespace kmoe
