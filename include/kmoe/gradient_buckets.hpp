// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file gradient_buckets.hpp
/// \brief Bucketed gradient averaging over the ranks that hold a tensor, started as soon
/// as backward has produced a group of gradients and finished before the optimizer step
/// (PyTorch DDP's buckets; Megatron-Core's overlapped grad reduce).
///
/// Tensors are taken in list order. One of at least `bucket_bytes` is reduced in place, on
/// its own (no copy); smaller ones are packed into a staging bucket of at most
/// `bucket_bytes`, so that many small tensors (router, biases) cost one collective. The
/// staging buffers persist between steps (the same parameters give the same buckets).
/// finish() waits in start order, copies each packed gradient back and scales every tensor
/// by 1 / divisor: the same multiplications as a per-tensor average. With compression the
/// buckets travel as bf16 or fp16 (exchange/compressed_all_reduce.hpp: half the bytes of
/// fp32, added in Scalar), blocking: the compressed sum is not overlapped with backward.

#include <kmoe/communicator.hpp>
#include <kmoe/error.hpp>
#include <kmoe/exchange/compressed_all_reduce.hpp>
#include <kmoe/parameters.hpp>
#include <kmoe/types.hpp>
#include <kmoe/wire_compression.hpp>

#include <cstddef>
#include <string>
#include <vector>

namespace kmoe {

/// \brief What gradient sums put on the wire: the gradients' own type, or 16 bits.
using GradientCompression = WireCompression;

/// \brief How MoELayer synchronises gradients (LayerOptions::gradient_sync).
struct GradientSyncOptions {
  /// Start each group's reduction inside backward as soon as its gradients exist (routed
  /// experts, then shared experts, then the router); synchronize_gradients() then only
  /// waits. Needs synchronize_gradients() after every backward (no accumulation of several
  /// backward calls before one sync; turn it off for that).
  bool overlap = false;
  /// Largest staging bucket; a tensor at least this large is reduced alone, in place (0:
  /// every tensor alone). 25 MiB, PyTorch DDP's bucket_cap_mb default.
  std::size_t bucket_bytes = std::size_t(25) << 20;
  /// bf16 / fp16: each sum carries 16-bit values and adds in the gradients' type (a
  /// reduce-scatter in 16 bits, then an all-gather): half of fp32's bytes, every rank with
  /// the same result, within the error bound of compressed_all_reduce.hpp of the exact
  /// mean; blocking (overlap then only moves where the sums run).
  GradientCompression compression = GradientCompression::none;
};

namespace detail {
template <class R>
using request_test_of = decltype(bool(std::declval<R&>().test()));
template <class C, class View>
using comm_sum_start_of =
    decltype(std::declval<const C&>().all_reduce_sum_start(std::declval<const View&>()));

/// grad *= factor. A free function: nvcc refuses an extended lambda in a private member.
template <class X, class Flat, class S>
void scale_in_place(const Flat& grad, S factor) {
  Kokkos::parallel_for(
      "kmoe::GradientBuckets::average", Kokkos::RangePolicy<X>(0, grad.size()),
      KOKKOS_LAMBDA(std::size_t i) { grad(i) *= factor; });
}
}  // namespace detail

/// Scalar is the gradients' type: a layer stored in 16 bits keeps its gradients, and so
/// sums them, in accumulation_t (float).
template <class ExecSpace, class Scalar, class Communicator>
class GradientBuckets {
  using Flat = typename Parameter<ExecSpace, Scalar>::grad_view;
  using Staging = Kokkos::View<Scalar*, typename ExecSpace::memory_space>;
  using Request = typename Communicator::Request;

 public:
  /// \param bucket_bytes largest staging bucket (0: every tensor alone, in place)
  /// \param compression  what the sums put on the wire
  explicit GradientBuckets(std::size_t bucket_bytes = GradientSyncOptions{}.bucket_bytes,
                           GradientCompression compression = GradientCompression::none)
      : bucket_bytes_(bucket_bytes), compression_(compression) {}

  /// \brief Packs the gradients of `parameters` into buckets and starts their sums over
  /// `comm` (collective: every rank of comm starts the same groups in the same order);
  /// finish() divides them by `divisor`.
  template <class ParameterScalar>
  void start(const Communicator& comm, const ParameterList<ExecSpace, ParameterScalar>& parameters,
             int divisor) {
    static_assert(std::is_same_v<accumulation_t<ParameterScalar>, Scalar>,
                  "kmoe::GradientBuckets: the parameters' gradients must be of its Scalar");
    require(divisor >= 1, "kmoe::GradientBuckets::start", "divisor", divisor, "must be >= 1");
    if (comm.size() == 1) {
      // Nothing to sum: each tensor is only scaled, in place.
      if (divisor == 1) return;
      for (const auto& p : parameters) {
        Bucket& bucket = next_bucket();
        bucket.divisor = divisor;
        bucket.tensors = {p.grad};
        bucket.in_place = true;
        bucket.request = Request{};
      }
      return;
    }
    std::vector<Flat> packed;
    std::size_t packed_elements = 0;
    const std::size_t capacity = bucket_bytes_ / sizeof(Scalar);
    const auto flush = [&] {
      if (packed.empty()) return;
      Bucket& bucket = next_bucket();
      bucket.divisor = divisor;
      bucket.tensors = packed;
      if (bucket.staging.extent(0) < packed_elements)
        bucket.staging = Staging(Kokkos::view_alloc(Kokkos::WithoutInitializing,
                                                    "kmoe::GradientBuckets::staging"),
                                 packed_elements);
      std::size_t offset = 0;
      for (const auto& grad : packed) {
        Kokkos::deep_copy(ExecSpace(), staging_range(bucket, offset, grad.size()), grad);
        offset += grad.size();
      }
      launch(comm, bucket, Flat(bucket.staging.data(), packed_elements));
      packed.clear();
      packed_elements = 0;
    };
    for (const auto& p : parameters) {
      if (p.grad.size() == 0) continue;
      if (p.grad.size() >= capacity) {
        Bucket& bucket = next_bucket();
        bucket.divisor = divisor;
        bucket.tensors = {p.grad};
        bucket.in_place = true;
        launch(comm, bucket, p.grad);
        continue;
      }
      if (packed_elements + p.grad.size() > capacity) flush();
      packed.push_back(p.grad);
      packed_elements += p.grad.size();
    }
    flush();
  }

  /// \brief Lets the started sums advance (Request::test() where the communicator has it);
  /// called between the phases of backward, so that the sums progress while it computes.
  void progress() {
    if constexpr (detail::is_detected_v<detail::request_test_of, Request>)
      for (std::size_t b = 0; b < started_; ++b) buckets_[b].request.test();
  }

  /// True between start() and finish() (or discard()).
  bool pending() const { return started_ > 0; }

  /// \brief Completes every started sum in start order, copies packed gradients back and
  /// averages; afterwards each gradient is its group's mean.
  void finish() {
    for (std::size_t b = 0; b < started_; ++b) {
      Bucket& bucket = buckets_[b];
      bucket.request.wait();
      std::size_t offset = 0;
      for (const auto& grad : bucket.tensors) {
        if (!bucket.in_place) {
          Kokkos::deep_copy(ExecSpace(), grad, staging_range(bucket, offset, grad.size()));
          offset += grad.size();
        }
        if (bucket.divisor != 1)
          detail::scale_in_place<ExecSpace>(grad, Scalar(1) / Scalar(bucket.divisor));
      }
    }
    ExecSpace().fence();
    reset();
  }

  /// \brief Completes every started sum and leaves the gradients as they are (tensors
  /// reduced in place hold the sum; packed ones their local value): the way out after a
  /// failed step whose gradients will be zeroed.
  void discard() {
    for (std::size_t b = 0; b < started_; ++b) buckets_[b].request.wait();
    reset();
  }

 private:
  struct Bucket {
    Staging staging;
    std::vector<Flat> tensors;
    bool in_place = false;
    int divisor = 1;
    Request request;
  };

  Bucket& next_bucket() {
    if (started_ == buckets_.size()) buckets_.emplace_back();
    Bucket& bucket = buckets_[started_++];
    bucket.in_place = false;
    bucket.tensors.clear();
    return bucket;
  }

  void reset() {
    for (std::size_t b = 0; b < started_; ++b) buckets_[b].tensors.clear();
    started_ = 0;
  }

  static auto staging_range(const Bucket& bucket, std::size_t offset, std::size_t n) {
    return Kokkos::subview(bucket.staging, Kokkos::make_pair(offset, offset + n));
  }

  void launch(const Communicator& comm, Bucket& bucket, const Flat& data) {
    ExecSpace().fence();  // the packing copies and backward's kernels wrote `data`
    if (compression_ != GradientCompression::none) {
      if (compression_ == GradientCompression::bf16)
        compressed_bf16_.sum(comm, data);
      else
        compressed_fp16_.sum(comm, data);
      bucket.request = Request{};
      return;
    }
    if constexpr (detail::is_detected_v<detail::comm_sum_start_of, Communicator, Flat>) {
      bucket.request = comm.all_reduce_sum_start(data);
    } else {
      comm.all_reduce_sum(data);
      bucket.request = Request{};
    }
  }

  std::size_t bucket_bytes_;
  GradientCompression compression_;
  CompressedAllReduce<ExecSpace, Scalar, bfloat16> compressed_bf16_;
  CompressedAllReduce<ExecSpace, Scalar, float16> compressed_fp16_;
  std::vector<Bucket> buckets_;
  std::size_t started_ = 0;
};

}  // namespace kmoe
