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

#include <kmoe/communicator.hpp>
#include <kmoe/error.hpp>

#include <Kokkos_Core.hpp>
#include <mpi.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace kmoe {

namespace detail {

/// MPI datatype of a view's value type; a static_assert names the unsupported ones.
template <class T>
MPI_Datatype mpi_datatype() {
  using V = std::remove_cv_t<T>;
  static_assert(std::is_same_v<V, float> || std::is_same_v<V, double> || std::is_same_v<V, int> ||
                    std::is_same_v<V, long> || std::is_same_v<V, long long>,
                "kmoe::MpiCommunicator: value type must be float, double, int, long or long long "
                "(std::int64_t is one of the last two)");
  if constexpr (std::is_same_v<V, float>) return MPI_FLOAT;
  else if constexpr (std::is_same_v<V, double>) return MPI_DOUBLE;
  else if constexpr (std::is_same_v<V, int>) return MPI_INT;
  else if constexpr (std::is_same_v<V, long>) return MPI_LONG;
  else return MPI_LONG_LONG;
}

inline void mpi_check(int code, const char* call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw runtime_error(std::string("kmoe::MpiCommunicator: ") + call + " failed: " +
                      std::string(text, std::size_t(length)));
}

template <class View>
constexpr void require_host_view() {
  static_assert(Kokkos::SpaceAccessibility<Kokkos::HostSpace,
                                           typename View::memory_space>::accessible,
                "kmoe::MpiCommunicator: views must be host-accessible (use NcclCommunicator "
                "for device memory)");
  static_assert(View::rank == 1, "kmoe::MpiCommunicator: views must be rank 1");
}

}  // namespace detail

/// \brief A group of MPI ranks. Copies share the group; the last copy frees the
/// communicator it owns (every communicator made by the constructor or split()).
class MpiCommunicator {
  // Owned communicators are freed with MPI_Comm_free unless MPI is already finalized
  // (a communicator kept in a static must not crash the program at exit).
  struct Handle {
    MPI_Comm comm = MPI_COMM_NULL;
    ~Handle() {
      int finalized = 0;
      MPI_Finalized(&finalized);
      if (comm != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm);
    }
  };
  static std::shared_ptr<Handle> make_handle() { return std::make_shared<Handle>(); }

  // An in-flight Ialltoallv: MPI reads the count and displacement arrays until completion,
  // and the views must outlive it, so the request owns all of them.
  struct Pending {
    MPI_Request request = MPI_REQUEST_NULL;
    std::vector<int> send_counts, send_displs, recv_counts, recv_displs;
    std::shared_ptr<const void> buffers;
    std::shared_ptr<Handle> comm;
    ~Pending() {
      // A request dropped without wait() still completes here: freeing the buffers under
      // a running exchange would corrupt memory.
      int finalized = 0;
      MPI_Finalized(&finalized);
      if (request != MPI_REQUEST_NULL && !finalized) MPI_Wait(&request, MPI_STATUS_IGNORE);
    }
  };

 public:
  /// \brief Handle on a non-blocking all-to-all-v; wait() completes it (a no-op when empty).
  class Request {
   public:
    Request() = default;
    void wait() {
      if (!pending_ || pending_->request == MPI_REQUEST_NULL) return;
      detail::mpi_check(MPI_Wait(&pending_->request, MPI_STATUS_IGNORE), "MPI_Wait");
      pending_.reset();
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
  explicit MpiCommunicator(MPI_Comm comm) : handle_(make_handle()) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    require(initialized != 0, "kmoe::MpiCommunicator", "MPI state", "not initialized",
            "call MPI_Init before building a communicator");
    require(comm != MPI_COMM_NULL, "kmoe::MpiCommunicator", "comm", "MPI_COMM_NULL",
            "must be a valid communicator");
    detail::mpi_check(MPI_Comm_dup(comm, &handle_->comm), "MPI_Comm_dup");
    cache_rank_size();
  }

  /// \brief A duplicate of MPI_COMM_WORLD.
  static MpiCommunicator world() { return MpiCommunicator(MPI_COMM_WORLD); }

  MPI_Comm native() const { return handle_ ? handle_->comm : MPI_COMM_SELF; }
  int rank() const { return rank_; }
  int size() const { return size_; }

  std::vector<std::int64_t> exchange_counts(const std::vector<std::int64_t>& send) const {
    require(send.size() == std::size_t(size_), "kmoe::MpiCommunicator::exchange_counts",
            "send.size()", send.size(), "must equal the group size " + std::to_string(size_));
    std::vector<std::int64_t> recv(send.size());
    detail::mpi_check(MPI_Alltoall(send.data(), 1, MPI_INT64_T, recv.data(), 1, MPI_INT64_T,
                                   native()),
                      "MPI_Alltoall");
    return recv;
  }

  /// Blocking form: one MPI_Alltoallv, without the request the non-blocking form keeps
  /// alive (on OpenMPI 4.1 shared memory the two took the same time: bench/ep_bench).
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
    detail::mpi_check(MPI_Alltoallv(send.data(), send_ints.data(), send_displs.data(), type,
                                    recv.data(), recv_ints.data(), recv_displs.data(), type,
                                    native()),
                      "MPI_Alltoallv");
  }

  template <class SendView, class RecvView>
  Request all_to_all_v_start(const SendView& send, const std::vector<std::int64_t>& send_counts,
                             const RecvView& recv,
                             const std::vector<std::int64_t>& recv_counts) const {
    check_exchange_views<SendView, RecvView>();
    constexpr const char* where = "kmoe::MpiCommunicator::all_to_all_v_start";
    auto pending = std::make_shared<Pending>();
    pending->send_counts = to_int(send_counts, send.size(), where, "send_counts",
                                  pending->send_displs);
    pending->recv_counts = to_int(recv_counts, recv.size(), where, "recv_counts",
                                  pending->recv_displs);
    pending->buffers = std::make_shared<std::pair<SendView, RecvView>>(send, recv);
    pending->comm = handle_;
    const auto type = detail::mpi_datatype<typename SendView::value_type>();
    Kokkos::fence();
    detail::mpi_check(
        MPI_Ialltoallv(send.data(), pending->send_counts.data(), pending->send_displs.data(), type,
                       recv.data(), pending->recv_counts.data(), pending->recv_displs.data(), type,
                       native(), &pending->request),
        "MPI_Ialltoallv");
    return Request(std::move(pending));
  }

  template <class View> void all_reduce_sum(const View& data) const { all_reduce(data, MPI_SUM); }
  template <class View> void all_reduce_max(const View& data) const { all_reduce(data, MPI_MAX); }

  template <class SendView, class RecvView>
  void all_gather(const SendView& send, const RecvView& recv) const {
    detail::require_host_view<SendView>();
    detail::require_host_view<RecvView>();
    require(recv.size() >= send.size() * std::size_t(size_), "kmoe::MpiCommunicator::all_gather",
            "recv.size()", recv.size(),
            "must hold size() * send.size() = " + std::to_string(send.size() * size_));
    require(send.size() <= std::size_t(INT_MAX), "kmoe::MpiCommunicator::all_gather",
            "send.size()", send.size(), "must not exceed INT_MAX elements");
    const auto type = detail::mpi_datatype<typename SendView::value_type>();
    Kokkos::fence();
    detail::mpi_check(MPI_Allgather(send.data(), int(send.size()), type, recv.data(),
                                    int(send.size()), type, native()),
                      "MPI_Allgather");
  }

  /// \brief The ranks with the same color, ordered by key (MPI_Comm_split).
  MpiCommunicator split(int color, int key) const {
    require(color >= 0, "kmoe::MpiCommunicator::split", "color", color, "must be >= 0");
    MpiCommunicator sub;
    sub.handle_ = make_handle();
    detail::mpi_check(MPI_Comm_split(native(), color, key, &sub.handle_->comm),
                      "MPI_Comm_split");
    sub.cache_rank_size();
    return sub;
  }

  bool any_error(bool local_error) const {
    int mine = local_error ? 1 : 0, any = 0;
    detail::mpi_check(MPI_Allreduce(&mine, &any, 1, MPI_INT, MPI_LOR, native()),
                      "MPI_Allreduce");
    return any != 0;
  }

  /// \brief Ends every process of the job (MPI_Abort) after printing `message` with this
  /// rank's number: the way out of a failure once peers may already wait in a collective.
  [[noreturn]] void abort(const std::string& message) const {
    int world_rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    std::fprintf(stderr, "kmoe: rank %d aborts the job: %s\n", world_rank, message.c_str());
    std::fflush(stderr);
    MPI_Abort(native(), 1);
    std::abort();  // MPI_Abort does not return; this keeps [[noreturn]] true if it did
  }

 private:
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
      require(counts[p] >= 0 && counts[p] <= INT_MAX && offset <= INT_MAX, where, name,
              counts[p], "counts and displacements must lie in [0, INT_MAX] elements");
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
    const auto type = detail::mpi_datatype<typename View::value_type>();
    Kokkos::fence();
    for (std::size_t begin = 0; begin < data.size(); begin += std::size_t(INT_MAX)) {
      const std::size_t n = std::min<std::size_t>(data.size() - begin, std::size_t(INT_MAX));
      detail::mpi_check(
          MPI_Allreduce(MPI_IN_PLACE, data.data() + begin, int(n), type, op, native()),
          "MPI_Allreduce");
    }
  }

  std::shared_ptr<Handle> handle_;
  int rank_ = 0, size_ = 1;
};

}  // namespace kmoe
