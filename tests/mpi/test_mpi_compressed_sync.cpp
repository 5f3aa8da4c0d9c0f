// SPDX-License-Identifier: BSD-3-Clause
// Compressed sums (exchange/compressed_all_reduce.hpp): bit for bit the formula they define
// (each rank's value rounded to the wire type, added in rank order in Scalar, the sum
// rounded once), computed here with io/float16.hpp's exact conversions from every rank's
// gathered inputs; within the documented bound of the exact sum; 16-bit payloads handed to
// the communicator (half of fp32's bytes); and a layer's gradient sync with
// GradientSyncOptions::compression on every layout of the world.
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/io/float16.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include "training_step.hpp"

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>

#include <array>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

using namespace kmoe;

namespace {

using X = Kokkos::DefaultHostExecutionSpace;

/// The wire round trip of one value, by io/float16.hpp's exact conversions.
template <class Wire>
float through_wire(double value) {
  if constexpr (std::is_same_v<Wire, bfloat16>)
    return io::bfloat16_bits_to_float(io::to_bfloat16_bits(float(value)));
  else
    return io::half_bits_to_float(io::to_half_bits(float(value)));
}

/// The compressed sum of element i over the ranks' gathered values, as the header defines it.
template <class Scalar, class Wire>
Scalar reference_sum(const std::vector<Scalar>& gathered, std::size_t n, int ranks, std::size_t i) {
  Scalar total = 0;
  for (int r = 0; r < ranks; ++r) total += Scalar(through_wire<Wire>(gathered[r * n + i]));
  return Scalar(through_wire<Wire>(total));
}

/// MpiCommunicator that adds up the bytes each collective sends to other ranks.
class ByteCountingCommunicator {
 public:
  using Request = MpiCommunicator::Request;
  explicit ByteCountingCommunicator(MpiCommunicator inner) : inner_(std::move(inner)) {}
  int rank() const { return inner_.rank(); }
  int size() const { return inner_.size(); }
  template <class SendView, class RecvView>
  void all_to_all_v(const SendView& send, const std::vector<std::int64_t>& send_counts,
                    const RecvView& recv, const std::vector<std::int64_t>& recv_counts) const {
    for (int r = 0; r < size(); ++r)
      if (r != rank()) *sent_ += send_counts[r] * sizeof(typename SendView::value_type);
    inner_.all_to_all_v(send, send_counts, recv, recv_counts);
  }
  template <class SendView, class RecvView>
  void all_gather(const SendView& send, const RecvView& recv) const {
    *sent_ += std::int64_t(send.size() * sizeof(typename SendView::value_type)) * (size() - 1);
    inner_.all_gather(send, recv);
  }
  std::int64_t sent() const { return *sent_; }

 private:
  MpiCommunicator inner_;
  std::shared_ptr<std::int64_t> sent_ = std::make_shared<std::int64_t>(0);
};

template <class Scalar, class Wire>
void check_sum(const MpiCommunicator& world, std::size_t n) {
  const int ranks = world.size();
  Kokkos::View<Scalar*, X::memory_space> data("data", n), input("input", n);
  fill_normal(input, 1.0, 300 + world.rank());
  Kokkos::deep_copy(data, input);
  Kokkos::View<Scalar*, X::memory_space> gathered("gathered", n * ranks);
  world.all_gather(input, gathered);

  ByteCountingCommunicator counting(world);
  CompressedAllReduce<X, Scalar, Wire> sum;
  sum.sum(counting, data);
  // A second view of the same size reuses the buffers the first call sized.
  Kokkos::View<Scalar*, X::memory_space> zeros("zeros", n);
  sum.sum(counting, zeros);
  Kokkos::deep_copy(data, input);
  const std::int64_t before = counting.sent();
  sum.sum(counting, data);

  const std::vector<Scalar> all(gathered.data(), gathered.data() + gathered.size());
  const double eps = std::is_same_v<Wire, bfloat16> ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
  std::size_t not_bitwise = 0, out_of_bound = 0;
  for (std::size_t i = 0; i < n; ++i) {
    not_bitwise += data(i) != reference_sum<Scalar, Wire>(all, n, ranks, i);
    double exact = 0, magnitudes = 0;
    for (int r = 0; r < ranks; ++r) {
      exact += double(all[r * n + i]);
      magnitudes += std::abs(double(all[r * n + i]));
    }
    out_of_bound +=
        std::abs(double(data(i)) - exact) > eps * (magnitudes + std::abs(exact)) * 1.0001;
  }
  CAPTURE(n, ranks);
  CHECK(not_bitwise == 0);
  CHECK(out_of_bound == 0);
  // To other ranks: P - 1 shards of the reduce-scatter and one shard to each of P - 1 ranks
  // in the all-gather, 2 bytes each; a bandwidth-optimal fp32 all-reduce sends
  // 2 (P - 1) n / P values of 4 bytes. Half, but for the padding of the last shard.
  const std::int64_t shard = std::int64_t((n + ranks - 1) / ranks);
  const std::int64_t sent = counting.sent() - before;
  CHECK(sent == 2 * (ranks - 1) * shard * 2);
  const double fp32_minimum = 2.0 * (ranks - 1) * double(n) / ranks * 4;
  CHECK(double(sent) <= 0.5 * fp32_minimum + 4.0 * (ranks - 1));
}

}  // namespace

TEST_CASE("CompressedAllReduce: the defined rounding, bit for bit; the error bound; half the "
          "bytes",
          "[compressed]") {
  const MpiCommunicator world = MpiCommunicator::world();
  for (std::size_t n : {std::size_t(1), std::size_t(3), std::size_t(1001), std::size_t(4099)}) {
    check_sum<float, bfloat16>(world, n);
    check_sum<float, float16>(world, n);
    check_sum<double, bfloat16>(world, n);
  }
}

namespace {

using S = double;
using Router = SoftmaxTopKRouter<X, S>;
using GLU = SwiGLUExperts<X, S>;
using Layer = MoELayer<Router, GLU, WeightedSumCombiner<X, S>, MpiCommunicator>;
constexpr int hidden = 8, ffn = 12, experts = 4, top_k = 2, tokens = 11;

Layer make_layer(const ParallelGroups<MpiCommunicator>& groups, GradientCompression compression) {
  LayerOptions options;
  options.gradient_sync.compression = compression;
  options.gradient_sync.bucket_bytes = 512;  // both packed buckets and tensors alone
  const auto owned = groups.layout.local_experts(experts, groups.ep_rank);
  Layer layer(Router({hidden, experts, top_k}),
              GLU({int(owned.size()), hidden, ffn / groups.layout.tp}), options,
              GLU({1, hidden, 10}, "shared_experts"), groups);
  InitConfig init;
  init.router_std = 0.4, init.input_std = 0.3, init.output_std = 0.2;
  initialize(layer.parameters(), init, 7);
  return layer;
}

}  // namespace

TEST_CASE("Gradient sync with bf16 compression: each gradient is the compressed mean of the "
          "ranks' gradients, on every layout",
          "[compressed]") {
  const MpiCommunicator world = MpiCommunicator::world();
  for (auto [tp, ep, dp] :
       {std::array<int, 3>{1, 1, 2}, {1, 2, 1}, {2, 1, 1}, {1, 2, 2}, {2, 1, 2}, {1, 1, 4}}) {
    ParallelLayout layout;
    layout.tp = tp, layout.ep = ep, layout.dp = dp;
    if (layout.world_size() != world.size()) continue;
    const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
    Layer local = make_layer(groups, GradientCompression::none);
    Layer compressed = make_layer(groups, GradientCompression::bf16);
    test::training_step(local, groups, tokens, hidden,
                        false);  // not synchronised: this rank's own gradients
    test::training_step(compressed, groups, tokens, hidden, true);
    const auto local_parameters = local.parameters();
    const auto synced = compressed.parameters();
    std::size_t not_bitwise = 0;
    for (std::size_t t = 0; t < synced.size(); ++t) {
      const auto& p = local_parameters[t];
      const bool routed = p.name.rfind("experts.", 0) == 0;
      const MpiCommunicator& over = routed ? groups.dp : groups.world;
      const int divisor = routed ? groups.tokens.size() : groups.world.size();
      const std::size_t n = p.grad.size();
      Kokkos::View<S*, X::memory_space> own("own", n), gathered("gathered", n * over.size());
      Kokkos::deep_copy(own, p.grad);
      over.all_gather(own, gathered);
      const std::vector<S> all(gathered.data(), gathered.data() + gathered.size());
      for (std::size_t i = 0; i < n; ++i) {
        const S expected = over.size() == 1 ? all[i] * (S(1) / S(divisor))
                                            : reference_sum<S, bfloat16>(all, n, over.size(), i) *
                                                  (S(1) / S(divisor));
        not_bitwise += synced[t].grad(i) != expected;
      }
    }
    CAPTURE(tp, ep, dp);
    CHECK(not_bitwise == 0);
  }
}
