// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file nccl.hpp
/// \brief kmoe::NcclCommunicator: the Communicator role (kmoe/communicator.hpp) over NCCL,
/// for layers whose views live in CUDA device (or managed) memory.
///
/// Every operation is enqueued on the communicator's own CUDA stream after a Kokkos fence
/// (the views are written by kernels on Kokkos' stream). Blocking operations synchronise
/// that stream before returning; all_to_all_v_start returns at once and its Request::wait()
/// synchronises the stream, so host-side work and kernels on other streams overlap it.
/// All-to-all-v is a grouped set of ncclSend/ncclRecv pairs, one per peer with a non-empty
/// block; NCCL counts are size_t, so no 32-bit limit applies.
///
/// Only the C APIs of the CUDA runtime and NCCL are called, so the header compiles with any
/// host compiler (link CUDA::cudart and libnccl: target kmoe::nccl does both).

#include <kmoe/communicator.hpp>
#include <kmoe/error.hpp>
#include <kmoe/low_precision.hpp>

#include <Kokkos_Core.hpp>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#if NCCL_VERSION_CODE < NCCL_VERSION(2, 18, 0)
#error "kmoe::NcclCommunicator needs NCCL >= 2.18 (ncclCommSplit)"
#endif

namespace kmoe {

namespace detail {

template <class T>
ncclDataType_t nccl_datatype() {
  using V = std::remove_cv_t<T>;
  static_assert(std::is_same_v<V, float> || std::is_same_v<V, double> || std::is_same_v<V, int> ||
                    ((std::is_same_v<V, long> || std::is_same_v<V, long long>)&&sizeof(V) == 8) ||
                    is_packed_float_v<V>,
                "kmoe::NcclCommunicator: value type must be float, double, int, a 64-bit "
                "integer, kmoe::bfloat16 or kmoe::float16");
  if constexpr (std::is_same_v<V, bfloat16>)
    return ncclBfloat16;
  else if constexpr (std::is_same_v<V, float16>)
    return ncclFloat16;
  else if constexpr (std::is_same_v<V, float>)
    return ncclFloat32;
  else if constexpr (std::is_same_v<V, double>)
    return ncclFloat64;
  else if constexpr (std::is_same_v<V, int>)
    return ncclInt32;
  else
    return ncclInt64;
}

inline void nccl_check(ncclResult_t code, const char* call) {
  if (code != ncclSuccess)
    throw runtime_error(std::string("kmoe::NcclCommunicator: ") + call +
                        " failed: " + ncclGetErrorString(code));
}

inline void cuda_check(cudaError_t code, const char* call) {
  if (code != cudaSuccess)
    throw runtime_error(std::string("kmoe::NcclCommunicator: ") + call +
                        " failed: " + cudaGetErrorString(code));
}

/// NCCL reads device memory only: a host pointer would fault inside a kernel, so it is
/// rejected here with the parameter named.
inline void require_device_pointer(const void* data, const char* where, const char* parameter) {
  if (data == nullptr) return;
  cudaPointerAttributes attributes{};
  const cudaError_t code = cudaPointerGetAttributes(&attributes, data);
  if (code != cudaSuccess) cudaGetLastError();  // clear the sticky-free error of a host pointer
  require(code == cudaSuccess &&
              (attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged),
          where, parameter, "a host pointer", "must point to CUDA device or managed memory");
}

}  // namespace detail

/// \brief A group of GPUs, one per rank. Copies share the group; the last copy destroys the
/// NCCL communicator, its stream and its scratch buffer.
class NcclCommunicator {
  struct State {
    ncclComm_t comm = nullptr;
    cudaStream_t stream = nullptr;
    void* scratch = nullptr;  // device space for counts and the error flag
    std::size_t scratch_bytes = 0;
    int rank = 0, size = 1;
    ~State() {
      if (scratch) cudaFree(scratch);
      if (stream) cudaStreamDestroy(stream);
      if (comm) ncclCommDestroy(comm);
    }
  };

 public:
  /// \brief Completes a started all-to-all-v (a no-op when empty).
  class Request {
   public:
    Request() = default;
    void wait() {
      if (!state_) return;
      detail::cuda_check(cudaStreamSynchronize(state_->stream), "cudaStreamSynchronize");
      state_.reset();
    }
    /// True once the stream's work has completed (NCCL progresses on its own).
    bool test() {
      if (!state_) return true;
      const cudaError_t status = cudaStreamQuery(state_->stream);
      if (status == cudaErrorNotReady) return false;
      detail::cuda_check(status, "cudaStreamQuery");
      state_.reset();
      return true;
    }

   private:
    friend class NcclCommunicator;
    explicit Request(std::shared_ptr<State> s) : state_(std::move(s)) {}
    std::shared_ptr<State> state_;
  };

  /// \brief This rank alone with no NCCL communicator; every collective is a local copy.
  /// Used by default-constructed ParallelGroups members before create() assigns them.
  NcclCommunicator() = default;

  /// \brief A unique id, made on one rank and sent to the others by the application (e.g.
  /// MPI_Bcast of its bytes) before they all construct the communicator.
  static ncclUniqueId unique_id() {
    ncclUniqueId id;
    detail::nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    return id;
  }

  /// \brief Joins the group `id` as `rank` of `size` on CUDA device `device` (collective).
  NcclCommunicator(const ncclUniqueId& id, int rank, int size, int device) {
    constexpr const char* where = "kmoe::NcclCommunicator";
    require(size >= 1, where, "size", size, "must be >= 1");
    require(rank >= 0 && rank < size, where, "rank", rank,
            "must lie in [0, " + std::to_string(size) + ")");
    require(device >= 0, where, "device", device, "must be >= 0");
    detail::cuda_check(cudaSetDevice(device), "cudaSetDevice");
    auto state = std::make_shared<State>();
    detail::nccl_check(ncclCommInitRank(&state->comm, size, id, rank), "ncclCommInitRank");
    adopt(state);
  }

  int rank() const { return state_ ? state_->rank : 0; }
  int size() const { return state_ ? state_->size : 1; }
  cudaStream_t stream() const { return state_ ? state_->stream : nullptr; }

  std::vector<std::int64_t> exchange_counts(const std::vector<std::int64_t>& send) const {
    require(send.size() == std::size_t(size()), "kmoe::NcclCommunicator::exchange_counts",
            "send.size()", send.size(), "must equal the group size " + std::to_string(size()));
    if (!state_) return send;
    const std::size_t n = send.size();
    auto* device = static_cast<std::int64_t*>(scratch(2 * n * sizeof(std::int64_t)));
    std::vector<std::int64_t> recv(n);
    detail::cuda_check(cudaMemcpyAsync(device, send.data(), n * sizeof(std::int64_t),
                                       cudaMemcpyHostToDevice, state_->stream),
                       "cudaMemcpyAsync");
    detail::nccl_check(ncclGroupStart(), "ncclGroupStart");
    for (int p = 0; p < size(); ++p) {
      detail::nccl_check(ncclSend(device + p, 1, ncclInt64, p, state_->comm, state_->stream),
                         "ncclSend");
      detail::nccl_check(ncclRecv(device + n + p, 1, ncclInt64, p, state_->comm, state_->stream),
                         "ncclRecv");
    }
    detail::nccl_check(ncclGroupEnd(), "ncclGroupEnd");
    detail::cuda_check(cudaMemcpyAsync(recv.data(), device + n, n * sizeof(std::int64_t),
                                       cudaMemcpyDeviceToHost, state_->stream),
                       "cudaMemcpyAsync");
    synchronize();
    return recv;
  }

  template <class SendView, class RecvView>
  void all_to_all_v(const SendView& send, const std::vector<std::int64_t>& send_counts,
                    const RecvView& recv, const std::vector<std::int64_t>& recv_counts) const {
    all_to_all_v_start(send, send_counts, recv, recv_counts).wait();
  }

  template <class SendView, class RecvView>
  Request all_to_all_v_start(const SendView& send, const std::vector<std::int64_t>& send_counts,
                             const RecvView& recv,
                             const std::vector<std::int64_t>& recv_counts) const {
    static_assert(std::is_same_v<typename SendView::non_const_value_type,
                                 typename RecvView::non_const_value_type>,
                  "kmoe::NcclCommunicator::all_to_all_v: send and receive value types differ");
    constexpr const char* where = "kmoe::NcclCommunicator::all_to_all_v";
    check_counts(send_counts, send.size(), where, "send_counts");
    check_counts(recv_counts, recv.size(), where, "recv_counts");
    if (!state_) {
      SingleProcessCommunicator().all_to_all_v(send, send_counts, recv, recv_counts);
      return {};
    }
    detail::require_device_pointer(send.data(), where, "send");
    detail::require_device_pointer(recv.data(), where, "recv");
    const auto type = detail::nccl_datatype<typename SendView::value_type>();
    Kokkos::fence();
    const auto* send_data = send.data();
    auto* recv_data = recv.data();
    std::size_t send_offset = 0, recv_offset = 0;
    detail::nccl_check(ncclGroupStart(), "ncclGroupStart");
    for (int p = 0; p < size(); ++p) {
      if (send_counts[p] > 0)
        detail::nccl_check(ncclSend(send_data + send_offset, std::size_t(send_counts[p]), type, p,
                                    state_->comm, state_->stream),
                           "ncclSend");
      if (recv_counts[p] > 0)
        detail::nccl_check(ncclRecv(recv_data + recv_offset, std::size_t(recv_counts[p]), type, p,
                                    state_->comm, state_->stream),
                           "ncclRecv");
      send_offset += std::size_t(send_counts[p]);
      recv_offset += std::size_t(recv_counts[p]);
    }
    detail::nccl_check(ncclGroupEnd(), "ncclGroupEnd");
    return Request(state_);
  }

  template <class View>
  void all_reduce_sum(const View& data) const {
    all_reduce(data, ncclSum);
  }

  /// \brief The in-place sum enqueued on the communicator's stream; the Request's wait()
  /// synchronises that stream (kernels on Kokkos' stream run meanwhile).
  template <class View>
  Request all_reduce_sum_start(const View& data) const {
    if (!state_ || data.size() == 0) return Request();
    detail::require_device_pointer(data.data(), "kmoe::NcclCommunicator::all_reduce_sum_start",
                                   "data");
    Kokkos::fence();
    detail::nccl_check(ncclAllReduce(data.data(), data.data(), data.size(),
                                     detail::nccl_datatype<typename View::value_type>(), ncclSum,
                                     state_->comm, state_->stream),
                       "ncclAllReduce");
    return Request(state_);
  }
  template <class View>
  void all_reduce_max(const View& data) const {
    all_reduce(data, ncclMax);
  }

  template <class SendView, class RecvView>
  void all_gather(const SendView& send, const RecvView& recv) const {
    constexpr const char* where = "kmoe::NcclCommunicator::all_gather";
    require(recv.size() >= send.size() * std::size_t(size()), where, "recv.size()", recv.size(),
            "must hold size() * send.size() = " + std::to_string(send.size() * size()));
    if (!state_) {
      SingleProcessCommunicator().all_gather(send, recv);
      return;
    }
    detail::require_device_pointer(send.data(), where, "send");
    detail::require_device_pointer(recv.data(), where, "recv");
    Kokkos::fence();
    detail::nccl_check(ncclAllGather(send.data(), recv.data(), send.size(),
                                     detail::nccl_datatype<typename SendView::value_type>(),
                                     state_->comm, state_->stream),
                       "ncclAllGather");
    synchronize();
  }

  /// \brief The ranks with the same color, ordered by key (ncclCommSplit; collective).
  NcclCommunicator split(int color, int key) const {
    require(color >= 0, "kmoe::NcclCommunicator::split", "color", color, "must be >= 0");
    if (!state_) return {};
    auto state = std::make_shared<State>();
    detail::nccl_check(ncclCommSplit(state_->comm, color, key, &state->comm, nullptr),
                       "ncclCommSplit");
    NcclCommunicator sub;
    sub.adopt(state);
    return sub;
  }

  /// \brief Max-reduces an int flag on the device: true everywhere if any rank passed true.
  bool any_error(bool local_error) const {
    if (!state_) return local_error;
    auto* device = static_cast<int*>(scratch(sizeof(int)));
    int flag = local_error ? 1 : 0;
    detail::cuda_check(cudaMemcpyAsync(device, &flag, sizeof(int), cudaMemcpyHostToDevice,
                                       state_->stream),
                       "cudaMemcpyAsync");
    detail::nccl_check(ncclAllReduce(device, device, 1, ncclInt32, ncclMax, state_->comm,
                                     state_->stream),
                       "ncclAllReduce");
    detail::cuda_check(cudaMemcpyAsync(&flag, device, sizeof(int), cudaMemcpyDeviceToHost,
                                       state_->stream),
                       "cudaMemcpyAsync");
    synchronize();
    return flag != 0;
  }

 private:
  void adopt(const std::shared_ptr<State>& state) {
    detail::nccl_check(ncclCommUserRank(state->comm, &state->rank), "ncclCommUserRank");
    detail::nccl_check(ncclCommCount(state->comm, &state->size), "ncclCommCount");
    detail::cuda_check(cudaStreamCreateWithFlags(&state->stream, cudaStreamNonBlocking),
                       "cudaStreamCreateWithFlags");
    state_ = state;
  }

  void synchronize() const {
    detail::cuda_check(cudaStreamSynchronize(state_->stream), "cudaStreamSynchronize");
  }

  /// Device scratch of at least `bytes`, grown on demand (the stream is idle between calls).
  void* scratch(std::size_t bytes) const {
    if (state_->scratch_bytes < bytes) {
      if (state_->scratch) detail::cuda_check(cudaFree(state_->scratch), "cudaFree");
      state_->scratch = nullptr;
      detail::cuda_check(cudaMalloc(&state_->scratch, bytes), "cudaMalloc");
      state_->scratch_bytes = bytes;
    }
    return state_->scratch;
  }

  void check_counts(const std::vector<std::int64_t>& counts, std::size_t capacity,
                    const char* where, const char* name) const {
    require(counts.size() == std::size_t(size()), where, name, counts.size(),
            "must have one count per rank (" + std::to_string(size()) + ")");
    std::int64_t total = 0;
    for (auto c : counts) {
      require(c >= 0, where, name, c, "counts must be >= 0");
      total += c;
    }
    require(std::size_t(total) <= capacity, where, name, total,
            "total exceeds the view's " + std::to_string(capacity) + " elements");
  }

  template <class View>
  void all_reduce(const View& data, ncclRedOp_t op) const {
    if (!state_ || data.size() == 0) return;
    detail::require_device_pointer(data.data(), "kmoe::NcclCommunicator::all_reduce", "data");
    Kokkos::fence();
    detail::nccl_check(ncclAllReduce(data.data(), data.data(), data.size(),
                                     detail::nccl_datatype<typename View::value_type>(), op,
                                     state_->comm, state_->stream),
                       "ncclAllReduce");
    synchronize();
  }

  std::shared_ptr<State> state_;
};

static_assert(check_valid_communicator<NcclCommunicator>());

}  // namespace kmoe
