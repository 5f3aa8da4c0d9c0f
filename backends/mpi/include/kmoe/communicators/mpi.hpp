// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file mpi.hpp
/// \brief kmoe::MpiCommunicator: the Communicator role (kmoe/communicator.hpp) over MPI, for
/// layers whose views live in host-accessible memory.
///
/// Counts are 64-bit in the kmoe interface but `int` in MPI-3's MPI_Alltoallv, for counts
/// and displacements alike. Rather than silently truncate, an exchange whose any count or
/// displacement exceeds INT_MAX elements raises kmoe::invalid_argument on the calling rank
/// (one MoE exchange moves rows * hidden elements; 2^31 of them is 8 GiB of float per rank,
/// far beyond what one layer step sends). Reductions and gathers have no displacements and
/// are split into INT_MAX-element chunks instead.
///
/// Every collective fences Kokkos first: the views are written by kernels that may still be
/// running when the call starts.
///
/// The watchdog (MpiOptions::collective_timeout, on by default): every collective is MPI's
/// non-blocking form polled with MPI_Test against a deadline. A collective still incomplete
/// at its deadline ends the job (MPI_Abort) after each rank still alive has printed which
/// collective, group and step it waited in, and which ranks did not arrive; those are found
/// by point-to-point reports on the group itself (see report_timeout). Zero turns it off and
/// restores MPI's blocking calls. docs/parallel.md, "MPI watchdog".

#include <kmoe/communicator.hpp>
#include <kmoe/error.hpp>
#include <kmoe/low_precision.hpp>

#include <Kokkos_Core.hpp>
#include <mpi.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace kmoe {

/// \brief Options of an MpiCommunicator; split() hands them on to the sub-groups.
struct MpiOptions {
  /// The longest one collective may wait for its peers; past it the watchdog ends the job
  /// with a diagnostic on every rank still alive. Zero turns the watchdog off (MPI's
  /// blocking calls, which wait forever). The default leaves room for a slow rank (a
  /// checkpoint load, a long first kernel compilation) while still ending a stuck job.
  std::chrono::milliseconds collective_timeout = std::chrono::minutes(5);
};

namespace detail {

/// The collectives the watchdog names; their index travels in its reports.
enum class MpiCollective : long long {
  dup,
  split,
  exchange_counts,
  all_to_all_v,
  all_reduce,
  all_gather,
  any_error,
  sized_exchange,
  count
};

inline const char* mpi_collective_name(long long what) {
  static const char* const names[] = {
      "MPI_Comm_idup (constructor)",     "split (MPI_Ibarrier before MPI_Comm_split)",
      "exchange_counts (MPI_Ialltoall)", "all_to_all_v (MPI_Ialltoallv)",
      "all_reduce (MPI_Iallreduce)",     "all_gather (MPI_Iallgather)",
      "any_error (MPI_Iallreduce)",      "all_to_all_v_sized_by_sender (MPI_Isend, MPI_Improbe)"};
  return what >= 0 && what < (long long)(MpiCollective::count) ? names[what]
                                                               : "an unknown collective";
}

/// What this process is doing, for the watchdog's diagnostic: one process runs one step
/// at a time, whatever group its collectives use. Set through MpiCommunicator::set_step.
inline std::string& mpi_current_step() {
  static std::string step = "(no kmoe step begun)";
  return step;
}

/// Tag of the watchdog's reports. kmoe sends no other point-to-point message on its groups
/// (each is a duplicate the application never sees), and MPI never matches collective
/// traffic with point-to-point messages on the same communicator.
constexpr int mpi_watchdog_tag = 27181;
/// Tag of all_to_all_v_sized_by_sender's messages (MPI keeps the messages of one sender,
/// tag and communicator in order, so successive exchanges never mix).
constexpr int mpi_sized_exchange_tag = 27182;

/// MPI datatype of a view's value type; a static_assert names the unsupported ones. The
/// 16-bit floats (kmoe::bfloat16, kmoe::float16) travel as MPI_UINT16_T: MPI only moves
/// them (exchanges, all-gather); sums of them are refused (no_16_bit_reduction).
template <class T>
MPI_Datatype mpi_datatype() {
  using V = std::remove_cv_t<T>;
  static_assert(std::is_same_v<V, float> || std::is_same_v<V, double> || std::is_same_v<V, int> ||
                    std::is_same_v<V, long> || std::is_same_v<V, long long> || is_packed_float_v<V>,
                "kmoe::MpiCommunicator: value type must be float, double, int, long, long long "
                "(std::int64_t is one of the last two), kmoe::bfloat16 or kmoe::float16");
  if constexpr (std::is_same_v<V, float>)
    return MPI_FLOAT;
  else if constexpr (std::is_same_v<V, double>)
    return MPI_DOUBLE;
  else if constexpr (std::is_same_v<V, int>)
    return MPI_INT;
  else if constexpr (std::is_same_v<V, long>)
    return MPI_LONG;
  else if constexpr (is_packed_float_v<V>)
    return MPI_UINT16_T;
  else
    return MPI_LONG_LONG;
}

/// MPI would add 16-bit patterns as integers: reductions take float, double or integers.
template <class T>
constexpr void no_16_bit_reduction() {
  static_assert(!is_packed_float_v<std::remove_cv_t<T>>,
                "kmoe::MpiCommunicator: no all-reduce of kmoe::bfloat16/float16 (MPI has no such "
                "sum); kmoe::CompressedAllReduce sums 16-bit payloads in float");
}

inline void mpi_check(int code, const char* call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw runtime_error(std::string("kmoe::MpiCommunicator: ") + call +
                      " failed: " + std::string(text, std::size_t(length)));
}

template <class View>
constexpr void require_host_view() {
  static_assert(
      Kokkos::SpaceAccessibility<Kokkos::HostSpace, typename View::memory_space>::accessible,
      "kmoe::MpiCommunicator: views must be host-accessible (use NcclCommunicator "
      "for device memory)");
  static_assert(View::rank == 1, "kmoe::MpiCommunicator: views must be rank 1");
}

}  // namespace detail

/// \brief A group of MPI ranks. Copies share the group; the last copy frees the
/// communicator it owns (every communicator made by the constructor or split()).
class MpiCommunicator {
  using clock = std::chrono::steady_clock;

  // Owned communicators are freed with MPI_Comm_free unless MPI is already finalized
  // (a communicator kept in a static must not crash the program at exit).
  struct Handle {
    MPI_Comm comm = MPI_COMM_NULL;
    MpiOptions options;
    std::string name;
    /// Collectives begun on this group: the same number on every rank for the same call,
    /// so a watchdog report says whether a peer waits in this collective or another.
    unsigned long long collectives = 0;
    ~Handle() {
      int finalized = 0;
      MPI_Finalized(&finalized);
      if (comm != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm);
    }
  };
  static std::shared_ptr<Handle> make_handle() { return std::make_shared<Handle>(); }

  // An in-flight non-blocking collective (Ialltoallv, or the INT_MAX-element pieces of an
  // Iallreduce): MPI reads the count and displacement arrays until completion, and the
  // views must outlive it, so the request owns all of them.
  struct Pending {
    std::vector<MPI_Request> requests;
    std::vector<unsigned long long> sequences;  // the watchdog's number of each request
    detail::MpiCollective what = detail::MpiCollective::all_to_all_v;
    std::vector<int> send_counts, send_displs, recv_counts, recv_displs;
    std::shared_ptr<const void> buffers;
    std::shared_ptr<Handle> comm;

    void wait() {
      for (std::size_t i = 0; i < requests.size(); ++i)
        if (requests[i] != MPI_REQUEST_NULL) wait_watched(*comm, requests[i], what, sequences[i]);
      requests.clear();
    }
    ~Pending() {
      // A request dropped without wait() still completes here: freeing the buffers under
      // a running collective would corrupt memory.
      int finalized = 0;
      MPI_Finalized(&finalized);
      if (requests.empty() || finalized) return;
      try {
        wait();
      } catch (...) {
        // An MPI error while unwinding: nothing is left to report it to.
      }
    }
  };

 public:
  /// \brief Handle on a non-blocking all-to-all-v or all-reduce; wait() completes it (a
  /// no-op when empty).
  class Request {
   public:
    Request() = default;
    void wait() {
      if (!pending_) return;
      pending_->wait();
      pending_.reset();
    }
    /// \brief Lets MPI advance the collective (MPI_Testall: OpenMPI moves a non-blocking
    /// collective on only inside MPI calls) and says whether it has completed.
    bool test() {
      if (!pending_) return true;
      int done = 0;
      detail::mpi_check(MPI_Testall(int(pending_->requests.size()), pending_->requests.data(),
                                    &done, MPI_STATUSES_IGNORE),
                        "MPI_Testall");
      if (done) pending_.reset();
      return done != 0;
    }

   private:
    friend class MpiCommunicator;
    explicit Request(std::shared_ptr<Pending> p) : pending_(std::move(p)) {}
    std::shared_ptr<Pending> pending_;
  };

  /// \brief This rank alone, like SingleProcessCommunicator. Makes no MPI call, so that
  /// default-constructed members (ParallelGroups, a layer's default argument) cost nothing
  /// and never enter a collective that other ranks might not.
  MpiCommunicator() = default;

  /// \brief Duplicates `comm` (collective over it) so that kmoe's messages never match the
  /// application's own on the same ranks.
  explicit MpiCommunicator(MPI_Comm comm, const MpiOptions& options = {}) : handle_(make_handle()) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    require(initialized != 0, "kmoe::MpiCommunicator", "MPI state", "not initialized",
            "call MPI_Init before building a communicator");
    require(comm != MPI_COMM_NULL, "kmoe::MpiCommunicator", "comm", "MPI_COMM_NULL",
            "must be a valid communicator");
    require(options.collective_timeout.count() >= 0, "kmoe::MpiCommunicator",
            "options.collective_timeout (ms)", options.collective_timeout.count(),
            "must be >= 0 (0 turns the watchdog off)");
    handle_->options = options;
    handle_->name = comm == MPI_COMM_WORLD ? "world" : "application group";
    // Always the non-blocking duplicate, so that ranks given different options still enter
    // matching calls (MPI never matches a blocking collective with a non-blocking one).
    // kmoe's group does not exist until it completes, so a timeout here cannot ask the
    // peers where they are: it reports the wait alone.
    MPI_Request request = MPI_REQUEST_NULL;
    detail::mpi_check(MPI_Comm_idup(comm, &handle_->comm, &request), "MPI_Comm_idup");
    const auto timeout = options.collective_timeout;
    const auto deadline = clock::now() + timeout;
    for (int done = 0; !done;) {
      detail::mpi_check(MPI_Test(&request, &done, MPI_STATUS_IGNORE), "MPI_Test");
      if (!done && timeout.count() > 0 && clock::now() >= deadline) {
        int size = 0;
        MPI_Comm_size(comm, &size);
        abort_with(comm, std::string("kmoe watchdog: ") +
                             detail::mpi_collective_name((long long)detail::MpiCollective::dup) +
                             " over the " + std::to_string(size) + " ranks of the " +
                             handle_->name + " did not complete within " + seconds(options) +
                             " in step " + detail::mpi_current_step() +
                             "; the ranks that did not arrive cannot be named before kmoe's "
                             "group exists");
      }
    }
    cache_rank_size();
    agree_on_options();
  }

  /// \brief A duplicate of MPI_COMM_WORLD.
  static MpiCommunicator world(const MpiOptions& options = {}) {
    return MpiCommunicator(MPI_COMM_WORLD, options);
  }

  MPI_Comm native() const { return handle_ ? handle_->comm : MPI_COMM_SELF; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  /// The options this group was made with (a single-rank default one: the defaults).
  MpiOptions options() const { return handle_ ? handle_->options : MpiOptions{}; }

  /// \brief Names the group in the watchdog's diagnostics (and in MPI, MPI_Comm_set_name):
  /// ParallelGroups names its groups "world", "ep", "tp", "dp", "tokens".
  void set_name(const std::string& name) const {
    if (!handle_) return;
    handle_->name = name;
    detail::mpi_check(MPI_Comm_set_name(handle_->comm, name.c_str()), "MPI_Comm_set_name");
  }
  std::string name() const { return handle_ ? handle_->name : "single rank"; }

  /// \brief Names the step this process is in (e.g. "kmoe::MoELayer::forward #3") for the
  /// watchdog's diagnostics; the layer sets it at each agreement point.
  void set_step(const std::string& step) const { detail::mpi_current_step() = step; }

  std::vector<std::int64_t> exchange_counts(const std::vector<std::int64_t>& send) const {
    require(send.size() == std::size_t(size_), "kmoe::MpiCommunicator::exchange_counts",
            "send.size()", send.size(), "must equal the group size " + std::to_string(size_));
    std::vector<std::int64_t> recv(send.size());
    if (!watched()) {
      detail::mpi_check(MPI_Alltoall(send.data(), 1, MPI_INT64_T, recv.data(), 1, MPI_INT64_T,
                                     native()),
                        "MPI_Alltoall");
      return recv;
    }
    const auto sequence = begin_collective();
    MPI_Request request = MPI_REQUEST_NULL;
    detail::mpi_check(MPI_Ialltoall(send.data(), 1, MPI_INT64_T, recv.data(), 1, MPI_INT64_T,
                                    native(), &request),
                      "MPI_Ialltoall");
    wait_watched(*handle_, request, detail::MpiCollective::exchange_counts, sequence);
    return recv;
  }

  /// Blocking form: one MPI_Alltoallv (watchdog on: MPI_Ialltoallv polled to its deadline),
  /// without the request the non-blocking form keeps alive (on OpenMPI 4.1 shared memory
  /// the two took the same time: bench/ep_bench).
  template <class SendView, class RecvView>
  void all_to_all_v(const SendView& send, const std::vector<std::int64_t>& send_counts,
                    const RecvView& recv, const std::vector<std::int64_t>& recv_counts) const {
    check_exchange_views<SendView, RecvView>();
    constexpr const char* where = "kmoe::MpiCommunicator::all_to_all_v";
    std::vector<int> send_displs, recv_displs;
    const auto send_ints = to_int(send_counts, send.size(), where, "send_counts", send_displs);
    const auto recv_ints = to_int(recv_counts, recv.size(), where, "recv_counts", recv_displs);
    const auto type = detail::mpi_datatype<typename SendView::value_type>();
    Kokkos::fence();
    if (!watched()) {
      detail::mpi_check(MPI_Alltoallv(send.data(), send_ints.data(), send_displs.data(), type,
                                      recv.data(), recv_ints.data(), recv_displs.data(), type,
                                      native()),
                        "MPI_Alltoallv");
      return;
    }
    const auto sequence = begin_collective();
    MPI_Request request = MPI_REQUEST_NULL;
    detail::mpi_check(MPI_Ialltoallv(send.data(), send_ints.data(), send_displs.data(), type,
                                     recv.data(), recv_ints.data(), recv_displs.data(), type,
                                     native(), &request),
                      "MPI_Ialltoallv");
    wait_watched(*handle_, request, detail::MpiCollective::all_to_all_v, sequence);
  }

  /// \brief An all-to-all-v whose receiver learns each block's size from the message itself
  /// (MPI_Isend to every other rank, MPI_Improbe per sender, MPI_Mrecv), so that no count
  /// exchange has to precede it: one synchronisation instead of two. `receive(p, count)`
  /// is called once per source rank p (this rank's own block first, then the others in
  /// the order their envelopes arrive) with the block's element count, and returns where
  /// to receive it (host-accessible room for `count` values, overlapping neither another
  /// block nor the send view); the block is received there at once. Returns the counts.
  /// With the watchdog on, every probe and send is polled against its deadline.
  ///
  /// Like MPI_Alltoallv's own algorithms, the block a rank sends itself is copied in
  /// memory, not passed through MPI. Peers are visited in rotated order (sends to
  /// rank + 1, rank + 2, ...; probes from rank - 1, rank - 2, ...), each round of probes
  /// is non-blocking over every sender not yet found, and each block is received as soon
  /// as its envelope is found: waiting for every envelope before receiving any block cost
  /// 20 to 40% more than MPI_Alltoallv at 4 ranks oversubscribed 2 to 1
  /// (docs/performance.md).
  template <class SendView, class Receive>
  std::vector<std::int64_t> all_to_all_v_sized_by_sender(
      const SendView& send, const std::vector<std::int64_t>& send_counts,
      const Receive& receive) const {
    detail::require_host_view<SendView>();
    constexpr const char* where = "kmoe::MpiCommunicator::all_to_all_v_sized_by_sender";
    std::vector<int> send_displs;
    const auto send_ints = to_int(send_counts, send.size(), where, "send_counts", send_displs);
    using T = typename SendView::non_const_value_type;
    const auto type = detail::mpi_datatype<T>();
    const int me = rank_, ranks = size_;
    Kokkos::fence();
    const auto sequence = begin_collective();
    std::vector<MPI_Request> sends(std::size_t(ranks), MPI_REQUEST_NULL);
    for (int i = 1; i < ranks; ++i) {
      const int p = (me + i) % ranks;
      detail::mpi_check(MPI_Isend(send.data() + send_displs[p], send_ints[p], type, p,
                                  detail::mpi_sized_exchange_tag, native(), &sends[p]),
                        "MPI_Isend");
    }
    std::vector<std::int64_t> recv_counts(std::size_t(ranks), 0);
    recv_counts[me] = send_ints[me];
    T* own = receive(me, recv_counts[me]);
    std::copy_n(send.data() + send_displs[me], send_ints[me], own);
    std::vector<char> found(std::size_t(ranks), 0);
    found[me] = 1;
    const auto deadline = clock::now() + options().collective_timeout;
    for (int left = ranks - 1; left > 0;) {
      for (int i = 1; i < ranks; ++i) {
        const int p = (me - i + ranks) % ranks;
        if (found[p]) continue;
        int flag = 0;
        MPI_Message message = MPI_MESSAGE_NULL;
        MPI_Status status;
        detail::mpi_check(MPI_Improbe(p, detail::mpi_sized_exchange_tag, native(), &flag, &message,
                                      &status),
                          "MPI_Improbe");
        if (!flag) continue;
        int count = 0;
        detail::mpi_check(MPI_Get_count(&status, type, &count), "MPI_Get_count");
        recv_counts[p] = count;
        T* at = receive(p, std::int64_t(count));
        detail::mpi_check(MPI_Mrecv(at, count, type, &message, MPI_STATUS_IGNORE), "MPI_Mrecv");
        found[p] = 1;
        --left;
      }
      if (left == 0 || !watched()) continue;
      int reported = 0;
      detail::mpi_check(MPI_Iprobe(MPI_ANY_SOURCE, detail::mpi_watchdog_tag, native(), &reported,
                                   MPI_STATUS_IGNORE),
                        "MPI_Iprobe");
      if (reported || clock::now() >= deadline)
        report_timeout(*handle_, detail::MpiCollective::sized_exchange, sequence);
    }
    for (auto& request : sends)
      if (request == MPI_REQUEST_NULL)
        continue;
      else if (watched())
        wait_watched(*handle_, request, detail::MpiCollective::sized_exchange, sequence);
      else
        detail::mpi_check(MPI_Wait(&request, MPI_STATUS_IGNORE), "MPI_Wait");
    return recv_counts;
  }

  template <class SendView, class RecvView>
  Request all_to_all_v_start(const SendView& send, const std::vector<std::int64_t>& send_counts,
                             const RecvView& recv,
                             const std::vector<std::int64_t>& recv_counts) const {
    check_exchange_views<SendView, RecvView>();
    constexpr const char* where = "kmoe::MpiCommunicator::all_to_all_v_start";
    auto pending = std::make_shared<Pending>();
    pending->send_counts =
        to_int(send_counts, send.size(), where, "send_counts", pending->send_displs);
    pending->recv_counts =
        to_int(recv_counts, recv.size(), where, "recv_counts", pending->recv_displs);
    pending->buffers = std::make_shared<std::pair<SendView, RecvView>>(send, recv);
    pending->comm = handle_ ? handle_ : make_handle();
    pending->sequences.push_back(begin_collective());
    pending->requests.push_back(MPI_REQUEST_NULL);
    const auto type = detail::mpi_datatype<typename SendView::value_type>();
    Kokkos::fence();
    detail::mpi_check(MPI_Ialltoallv(send.data(), pending->send_counts.data(),
                                     pending->send_displs.data(), type, recv.data(),
                                     pending->recv_counts.data(), pending->recv_displs.data(), type,
                                     native(), &pending->requests.back()),
                      "MPI_Ialltoallv");
    return Request(std::move(pending));
  }

  template <class View>
  void all_reduce_sum(const View& data) const {
    all_reduce(data, MPI_SUM);
  }

  /// \brief The in-place sum of all_reduce_sum, started (MPI_Iallreduce in pieces of at
  /// most INT_MAX elements); the Request's wait() completes it, under the watchdog when on.
  /// The blocking form without the watchdog calls MPI_Allreduce, whose algorithm may add in
  /// another order: compare a started sum with a started sum when bits matter.
  template <class View>
  Request all_reduce_sum_start(const View& data) const {
    detail::require_host_view<View>();
    detail::no_16_bit_reduction<typename View::value_type>();
    if (size_ == 1 || data.size() == 0) return Request();
    auto pending = std::make_shared<Pending>();
    pending->what = detail::MpiCollective::all_reduce;
    pending->buffers = std::make_shared<View>(data);
    pending->comm = handle_;
    const auto type = detail::mpi_datatype<typename View::value_type>();
    Kokkos::fence();
    for (std::size_t begin = 0; begin < data.size(); begin += std::size_t(INT_MAX)) {
      const std::size_t n = std::min<std::size_t>(data.size() - begin, std::size_t(INT_MAX));
      pending->sequences.push_back(begin_collective());
      pending->requests.push_back(MPI_REQUEST_NULL);
      detail::mpi_check(MPI_Iallreduce(MPI_IN_PLACE, data.data() + begin, int(n), type, MPI_SUM,
                                       native(), &pending->requests.back()),
                        "MPI_Iallreduce");
    }
    return Request(std::move(pending));
  }
  template <class View>
  void all_reduce_max(const View& data) const {
    all_reduce(data, MPI_MAX);
  }

  template <class SendView, class RecvView>
  void all_gather(const SendView& send, const RecvView& recv) const {
    detail::require_host_view<SendView>();
    detail::require_host_view<RecvView>();
    require(recv.size() >= send.size() * std::size_t(size_), "kmoe::MpiCommunicator::all_gather",
            "recv.size()", recv.size(),
            "must hold size() * send.size() = " + std::to_string(send.size() * size_));
    require(send.size() <= std::size_t(INT_MAX), "kmoe::MpiCommunicator::all_gather", "send.size()",
            send.size(), "must not exceed INT_MAX elements");
    const auto type = detail::mpi_datatype<typename SendView::value_type>();
    Kokkos::fence();
    if (!watched()) {
      detail::mpi_check(MPI_Allgather(send.data(), int(send.size()), type, recv.data(),
                                      int(send.size()), type, native()),
                        "MPI_Allgather");
      return;
    }
    const auto sequence = begin_collective();
    MPI_Request request = MPI_REQUEST_NULL;
    detail::mpi_check(MPI_Iallgather(send.data(), int(send.size()), type, recv.data(),
                                     int(send.size()), type, native(), &request),
                      "MPI_Iallgather");
    wait_watched(*handle_, request, detail::MpiCollective::all_gather, sequence);
  }

  /// \brief The ranks with the same color, ordered by key (MPI_Comm_split). With the
  /// watchdog on, a watched barrier first makes sure every rank has arrived, since
  /// MPI_Comm_split has no non-blocking form.
  MpiCommunicator split(int color, int key) const {
    require(color >= 0, "kmoe::MpiCommunicator::split", "color", color, "must be >= 0");
    arrive_before_split();
    MpiCommunicator sub;
    sub.handle_ = make_handle();
    sub.handle_->options = options();
    sub.handle_->name = name() + " split by color " + std::to_string(color);
    detail::mpi_check(MPI_Comm_split(native(), color, key, &sub.handle_->comm), "MPI_Comm_split");
    sub.cache_rank_size();
    return sub;
  }

  /// \brief The ranks of this group sharing memory with this process, ordered by rank
  /// (MPI_Comm_split_type with MPI_COMM_TYPE_SHARED): this rank's node, which the layer's
  /// node map (exchange/node_topology.hpp) uses unless told otherwise.
  MpiCommunicator split_shared() const {
    arrive_before_split();
    MpiCommunicator sub;
    sub.handle_ = make_handle();
    sub.handle_->options = options();
    sub.handle_->name = name() + " split by node";
    detail::mpi_check(MPI_Comm_split_type(native(), MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL,
                                          &sub.handle_->comm),
                      "MPI_Comm_split_type");
    sub.cache_rank_size();
    return sub;
  }

  bool any_error(bool local_error) const {
    int mine = local_error ? 1 : 0, any = 0;
    if (!watched()) {
      detail::mpi_check(MPI_Allreduce(&mine, &any, 1, MPI_INT, MPI_LOR, native()), "MPI_Allreduce");
      return any != 0;
    }
    const auto sequence = begin_collective();
    MPI_Request request = MPI_REQUEST_NULL;
    detail::mpi_check(MPI_Iallreduce(&mine, &any, 1, MPI_INT, MPI_LOR, native(), &request),
                      "MPI_Iallreduce");
    wait_watched(*handle_, request, detail::MpiCollective::any_error, sequence);
    return any != 0;
  }

  /// \brief Ends every process of the job (MPI_Abort) after printing `message` with this
  /// rank's number: the way out of a failure once peers may already wait in a collective.
  [[noreturn]] void abort(const std::string& message) const { abort_with(native(), message); }

 private:
  /// With the watchdog on, a watched barrier: the splits have no non-blocking form.
  void arrive_before_split() const {
    if (!watched()) return;
    const auto sequence = begin_collective();
    MPI_Request request = MPI_REQUEST_NULL;
    detail::mpi_check(MPI_Ibarrier(native(), &request), "MPI_Ibarrier");
    wait_watched(*handle_, request, detail::MpiCollective::split, sequence);
  }

  /// Every rank must use the same timeout: with it off a rank makes MPI's blocking calls,
  /// which never match the non-blocking ones of a rank with it on. Raises on every rank
  /// with each rank's value otherwise (a non-blocking gather, matched whatever the values).
  void agree_on_options() {
    if (size_ == 1) return;
    const long long mine = handle_->options.collective_timeout.count();
    std::vector<long long> all(static_cast<std::size_t>(size_));
    MPI_Request request = MPI_REQUEST_NULL;
    detail::mpi_check(MPI_Iallgather(&mine, 1, MPI_LONG_LONG, all.data(), 1, MPI_LONG_LONG,
                                     native(), &request),
                      "MPI_Iallgather");
    wait_watched(*handle_, request, detail::MpiCollective::all_gather, begin_collective());
    if (std::all_of(all.begin(), all.end(), [&](long long v) { return v == all[0]; })) return;
    std::string values;
    for (int p = 0; p < size_; ++p)
      values += (p ? ", rank " : "rank ") + std::to_string(p) + " has " +
                std::to_string(all[std::size_t(p)]) + " ms";
    throw invalid_argument("kmoe::MpiCommunicator", "options.collective_timeout", values,
                           "every rank must use the same timeout");
  }

  /// True when collectives go through the watchdog: a group of several ranks with a timeout.
  bool watched() const {
    return handle_ && size_ > 1 && handle_->options.collective_timeout.count() > 0;
  }

  unsigned long long begin_collective() const { return handle_ ? ++handle_->collectives : 0; }

  static std::string seconds(const MpiOptions& options) {
    const auto ms = options.collective_timeout.count();
    return ms % 1000 == 0 ? std::to_string(ms / 1000) + " s" : std::to_string(ms) + " ms";
  }

  [[noreturn]] static void abort_with(MPI_Comm comm, const std::string& message) {
    int world_rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    std::fprintf(stderr, "kmoe: rank %d aborts the job: %s\n", world_rank, message.c_str());
    std::fflush(stderr);
    MPI_Abort(comm, 1);
    std::abort();  // MPI_Abort does not return; this keeps [[noreturn]] true if it did
  }

  /// Completes `request`, collective number `sequence` of `group`. Past the deadline, or as
  /// soon as a peer reports its own timeout on this group, the watchdog reports and ends
  /// the job. Without a timeout (or alone) this is MPI_Wait.
  static void wait_watched(Handle& group, MPI_Request& request, detail::MpiCollective what,
                           unsigned long long sequence) {
    int size = 1;
    if (group.comm != MPI_COMM_NULL) MPI_Comm_size(group.comm, &size);
    if (group.options.collective_timeout.count() == 0 || size == 1) {
      detail::mpi_check(MPI_Wait(&request, MPI_STATUS_IGNORE), "MPI_Wait");
      return;
    }
    const auto deadline = clock::now() + group.options.collective_timeout;
    for (;;) {
      int done = 0;
      detail::mpi_check(MPI_Test(&request, &done, MPI_STATUS_IGNORE), "MPI_Test");
      if (done) return;
      int reported = 0;
      detail::mpi_check(MPI_Iprobe(MPI_ANY_SOURCE, detail::mpi_watchdog_tag, group.comm, &reported,
                                   MPI_STATUS_IGNORE),
                        "MPI_Iprobe");
      if (reported || clock::now() >= deadline) report_timeout(group, what, sequence);
    }
  }

  /// The watchdog's report. This rank tells every peer of the group which collective it
  /// waits in (sequence number and kind), then listens for the peers' reports for a grace
  /// period: a peer waiting in the same collective answers at once (its own poll loop sees
  /// the report and joins here), one waiting in another collective of this group answers
  /// with that one, and a rank that is stopped, sleeping, finished or busy elsewhere does
  /// not answer: those did not arrive. Every rank still alive prints the same account;
  /// then MPI_Abort ends the job, as for any failure once the step's collectives began
  /// (an incomplete MPI collective cannot be cancelled, so the group is unusable anyway).
  [[noreturn]] static void report_timeout(Handle& group, detail::MpiCollective what,
                                          unsigned long long sequence) {
    int rank = 0, size = 1;
    MPI_Comm_rank(group.comm, &rank);
    MPI_Comm_size(group.comm, &size);
    using Report = std::array<long long, 2>;  // {sequence, collective}
    const Report mine = {(long long)sequence, (long long)what};
    std::vector<MPI_Request> sends(static_cast<std::size_t>(size), MPI_REQUEST_NULL);
    for (int p = 0; p < size; ++p)
      if (p != rank)
        MPI_Isend(mine.data(), 2, MPI_LONG_LONG, p, detail::mpi_watchdog_tag, group.comm,
                  &sends[std::size_t(p)]);
    std::vector<Report> heard(static_cast<std::size_t>(size), Report{-1, -1});
    heard[std::size_t(rank)] = mine;
    int answered = 1;
    const auto grace = std::min<std::chrono::milliseconds>(group.options.collective_timeout,
                                                           std::chrono::seconds(1));
    for (const auto until = clock::now() + grace; answered < size && clock::now() < until;) {
      int flag = 0;
      MPI_Status status;
      MPI_Iprobe(MPI_ANY_SOURCE, detail::mpi_watchdog_tag, group.comm, &flag, &status);
      if (!flag) continue;
      Report report;
      MPI_Recv(report.data(), 2, MPI_LONG_LONG, status.MPI_SOURCE, detail::mpi_watchdog_tag,
               group.comm, MPI_STATUS_IGNORE);
      if (heard[std::size_t(status.MPI_SOURCE)][0] < 0) ++answered;
      heard[std::size_t(status.MPI_SOURCE)] = report;
    }

    // Group rank -> world rank, for naming the processes.
    std::vector<int> group_ranks(static_cast<std::size_t>(size)), world_ranks(group_ranks.size());
    for (int p = 0; p < size; ++p) group_ranks[std::size_t(p)] = p;
    MPI_Group local_group, world_group;
    MPI_Comm_group(group.comm, &local_group);
    MPI_Comm_group(MPI_COMM_WORLD, &world_group);
    MPI_Group_translate_ranks(local_group, size, group_ranks.data(), world_group,
                              world_ranks.data());
    MPI_Group_free(&local_group);
    MPI_Group_free(&world_group);
    const auto who = [&](int p) {
      return "rank " + std::to_string(p) + " (world rank " +
             std::to_string(world_ranks[std::size_t(p)]) + ")";
    };
    std::string missing, elsewhere, arrived;
    const auto append = [](std::string& list, const std::string& item) {
      list += (list.empty() ? "" : ", ") + item;
    };
    for (int p = 0; p < size; ++p) {
      const Report& r = heard[std::size_t(p)];
      if (r[0] < 0)
        append(missing, who(p));
      else if (r != mine)
        append(elsewhere, who(p) + " waits in " + detail::mpi_collective_name(r[1]) + " #" +
                              std::to_string(r[0]));
      else
        append(arrived, who(p));
    }
    std::string message = std::string("kmoe watchdog: ") +
                          detail::mpi_collective_name((long long)what) + " #" +
                          std::to_string(sequence) + " on group '" + group.name + "' (" +
                          std::to_string(size) + " ranks) did not complete within " +
                          seconds(group.options) + ", in step " + detail::mpi_current_step() + ". ";
    if (!missing.empty())
      message += "Did not arrive: " + missing + " (no answer within " +
                 std::to_string(grace.count()) +
                 " ms: stopped, sleeping, finished, or busy outside kmoe's collectives). ";
    if (!elsewhere.empty()) message += "Out of sequence: " + elsewhere + ". ";
    message += "Arrived: " + arrived + ".";
    std::fprintf(stderr, "kmoe: rank %d: %s\n", world_ranks[std::size_t(rank)], message.c_str());
    std::fflush(stderr);
    // The peers that timed out with this rank print theirs within the same moment, so the
    // first arrived rank waits a little before MPI_Abort ends every process. The others
    // wait longer and abort only if that one did not: Open MPI 4.1's mpirun was seen to
    // hang now and then when several ranks called MPI_Abort at once while a finished
    // rank sat in MPI_Finalize.
    int first_arrived = rank;
    for (int p = 0; p < size; ++p)
      if (heard[std::size_t(p)] == mine) {
        first_arrived = p;
        break;
      }
    const auto settle = clock::now() + (rank == first_arrived ? grace / 4 : 3 * grace);
    while (clock::now() < settle) {
      int flag = 0;
      MPI_Iprobe(MPI_ANY_SOURCE, detail::mpi_watchdog_tag, group.comm, &flag, MPI_STATUS_IGNORE);
    }
    abort_with(group.comm, "collective timeout (the diagnostic above)");
  }

  template <class SendView, class RecvView>
  static constexpr void check_exchange_views() {
    detail::require_host_view<SendView>();
    detail::require_host_view<RecvView>();
    static_assert(std::is_same_v<typename SendView::non_const_value_type,
                                 typename RecvView::non_const_value_type>,
                  "kmoe::MpiCommunicator::all_to_all_v: send and receive value types differ");
  }

  void cache_rank_size() {
    detail::mpi_check(MPI_Comm_rank(native(), &rank_), "MPI_Comm_rank");
    detail::mpi_check(MPI_Comm_size(native(), &size_), "MPI_Comm_size");
  }

  /// int counts and displacements (blocks in rank order) from 64-bit counts.
  std::vector<int> to_int(const std::vector<std::int64_t>& counts, std::size_t capacity,
                          const char* where, const char* name, std::vector<int>& displs) const {
    require(counts.size() == std::size_t(size_), where, name, counts.size(),
            "must have one count per rank (" + std::to_string(size_) + ")");
    std::vector<int> out(counts.size());
    displs.assign(counts.size(), 0);
    std::int64_t offset = 0;
    for (std::size_t p = 0; p < counts.size(); ++p) {
      require(counts[p] >= 0 && counts[p] <= INT_MAX && offset <= INT_MAX, where, name, counts[p],
              "counts and displacements must lie in [0, INT_MAX] elements");
      out[p] = int(counts[p]);
      displs[p] = int(offset);
      offset += counts[p];
    }
    require(std::size_t(offset) <= capacity, where, name, offset,
            "total exceeds the view's " + std::to_string(capacity) + " elements");
    return out;
  }

  template <class View>
  void all_reduce(const View& data, MPI_Op op) const {
    detail::require_host_view<View>();
    detail::no_16_bit_reduction<typename View::value_type>();
    const auto type = detail::mpi_datatype<typename View::value_type>();
    Kokkos::fence();
    for (std::size_t begin = 0; begin < data.size(); begin += std::size_t(INT_MAX)) {
      const std::size_t n = std::min<std::size_t>(data.size() - begin, std::size_t(INT_MAX));
      if (!watched()) {
        detail::mpi_check(MPI_Allreduce(MPI_IN_PLACE, data.data() + begin, int(n), type, op,
                                        native()),
                          "MPI_Allreduce");
        continue;
      }
      const auto sequence = begin_collective();
      MPI_Request request = MPI_REQUEST_NULL;
      detail::mpi_check(MPI_Iallreduce(MPI_IN_PLACE, data.data() + begin, int(n), type, op,
                                       native(), &request),
                        "MPI_Iallreduce");
      wait_watched(*handle_, request, detail::MpiCollective::all_reduce, sequence);
    }
  }

  std::shared_ptr<Handle> handle_;
  int rank_ = 0, size_ = 1;
};

static_assert(check_valid_communicator<MpiCommunicator>());

}  // namespace kmoe
