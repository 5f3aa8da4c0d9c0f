// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file compressed_all_reduce.hpp
/// \brief kmoe::CompressedAllReduce: an in-place sum over a communicator's ranks that puts
/// 16-bit values on the wire (bf16 or fp16) and adds in the caller's precision.
///
/// A reduce-scatter by all-to-all and an all-gather, both of Wire values: each rank owns a
/// shard of ceil(n / P) elements, receives every rank's Wire copy of it, adds them in rank
/// order in Scalar (fp32 accumulation for an fp32 layer), rounds the sum to Wire once and
/// all-gathers the shards. Every rank ends with the same values. Per rank, 2 (P - 1)
/// shards of 2 bytes go to other ranks: half of what a bandwidth-optimal fp32 all-reduce
/// (reduce-scatter + all-gather, 2 (P - 1) n / P values of 4 bytes) must send.
/// Error: each input rounds once to Wire and the sum rounds once, so
/// |result - exact| <= eps_wire * (sum_r |x_r| + |sum|) (eps_wire = 2^-8 for bf16, 2^-11
/// for fp16, half a unit in the last place) plus the Scalar additions'.

#include <kmoe/low_precision.hpp>
#include <kmoe/types.hpp>

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <vector>

namespace kmoe {

template <class ExecSpace, class Scalar, class Wire>
class CompressedAllReduce {
  static_assert(is_packed_float_v<Wire>,
                "kmoe::CompressedAllReduce: Wire must be kmoe::bfloat16 or kmoe::float16");
  using WireView = Kokkos::View<Wire*, typename ExecSpace::memory_space>;

 public:
  /// \brief data = the sum of every rank's data, through Wire (collective over comm; every
  /// rank passes the same size).
  template <class Communicator, class Flat>
  void sum(const Communicator& comm, const Flat& data) {
    const std::size_t ranks = std::size_t(comm.size()), n = data.size();
    if (ranks == 1 || n == 0) return;
    const std::size_t shard = (n + ranks - 1) / ranks;
    detail::ensure_extents(send_, "kmoe::CompressedAllReduce::send", shard * ranks);
    detail::ensure_extents(received_, "kmoe::CompressedAllReduce::received", shard * ranks);
    detail::ensure_extents(gathered_, "kmoe::CompressedAllReduce::gathered", shard * ranks);
    detail::ensure_extents(owned_, "kmoe::CompressedAllReduce::owned", shard);
    counts_.assign(ranks, std::int64_t(shard));
    const auto send = send_, received = received_, gathered = gathered_, owned = owned_;
    Kokkos::parallel_for(
        "kmoe::CompressedAllReduce::compress", Kokkos::RangePolicy<ExecSpace>(0, shard * ranks),
        KOKKOS_LAMBDA(std::size_t i) { send(i) = Wire(i < n ? float(data(i)) : 0.0f); });
    ExecSpace().fence();
    comm.all_to_all_v(send, counts_, received, counts_);
    Kokkos::parallel_for(
        "kmoe::CompressedAllReduce::add_shard", Kokkos::RangePolicy<ExecSpace>(0, shard),
        KOKKOS_LAMBDA(std::size_t j) {
          Scalar total = 0;
          for (std::size_t r = 0; r < ranks; ++r) total += Scalar(float(received(r * shard + j)));
          owned(j) = Wire(float(total));
        });
    ExecSpace().fence();
    comm.all_gather(owned, gathered);
    Kokkos::parallel_for(
        "kmoe::CompressedAllReduce::decompress", Kokkos::RangePolicy<ExecSpace>(0, n),
        KOKKOS_LAMBDA(std::size_t i) { data(i) = Scalar(float(gathered(i))); });
    ExecSpace().fence();
  }

 private:
  WireView send_, received_, gathered_, owned_;
  std::vector<std::int64_t> counts_;
};

}  // namespace kmoe
