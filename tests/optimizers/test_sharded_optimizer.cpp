// SPDX-License-Identifier: BSD-3-Clause
// The sharded optimizer's partition, checked element by element with plain loops, and the
// sharded optimizer on one rank (one shard holding everything) against the plain optimizer:
// the same clipped steps bit for bit in both stages. Across ranks: tests/mpi/test_mpi_zero.
#include <kmoe/expert.hpp>
#include <kmoe/global_clip.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/optimizer.hpp>
#include <kmoe/routers/softmax_topk.hpp>
#include <kmoe/sharded_optimizer.hpp>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <vector>

#include "support/spaces.hpp"

using namespace kmoe;
using namespace kmoe::test;
using Catch::Matchers::ContainsSubstring;

TEST_CASE("the flat partition covers each element once, cut at norm chunks, in equal shares",
          "[optimizer][zero]") {
  const std::size_t chunk = detail::norm_chunk;
  const std::vector<std::size_t> sizes = {5000, 100, 3 * chunk + 7, 3, 0, 2 * chunk};
  std::size_t total = 0;
  for (auto n : sizes) total += n;
  for (int ranks = 1; ranks <= 5; ++ranks) {
    CAPTURE(ranks);
    const auto shards = detail::partition_flat(sizes, ranks);
    REQUIRE(shards.size() == std::size_t(ranks));
    std::vector<std::vector<int>> owner(sizes.size());
    for (std::size_t t = 0; t < sizes.size(); ++t) owner[t].assign(sizes[t], -1);
    std::size_t previous_end = 0;  // flat position where the previous shard ended
    for (int r = 0; r < ranks; ++r) {
      const auto& shard = shards[std::size_t(r)];
      std::size_t length = 0, chunks = 0;
      for (const auto& s : shard.segments) {
        CHECK(s.begin % chunk == 0);
        CHECK((s.end % chunk == 0 || s.end == sizes[s.tensor]));
        CHECK(s.offset == length);
        std::size_t taken = 0;  // elements another shard holds too
        for (std::size_t i = s.begin; i < s.end; ++i) {
          taken += owner[s.tensor][i] != -1;
          owner[s.tensor][i] = r;
        }
        CHECK(taken == 0);
        length += s.end - s.begin;
        chunks += (s.end - s.begin + chunk - 1) / chunk;
      }
      CHECK(shard.length == length);
      CHECK(shard.chunks == chunks);
      // Within one norm chunk of the equal share.
      CHECK(double(length) >= double(total) / ranks - double(chunk));
      CHECK(double(length) <= double(total) / ranks + double(chunk));
      // Contiguous in the flattened order, ranks in turn.
      if (!shard.segments.empty()) {
        std::size_t start = 0;
        for (std::size_t t = 0; t < shard.segments.front().tensor; ++t) start += sizes[t];
        CHECK(start + shard.segments.front().begin == previous_end);
        previous_end += length;
      }
    }
    std::size_t unowned = 0;
    for (std::size_t t = 0; t < sizes.size(); ++t)
      for (std::size_t i = 0; i < sizes[t]; ++i) unowned += owner[t][i] < 0;
    CHECK(unowned == 0);
  }
}

TEMPLATE_LIST_TEST_CASE("on one rank the sharded optimizer steps as the plain one",
                        "[optimizer][zero]", ExecutionSpaces) {
  using X = TestType;
  using Layer = MoELayer<SoftmaxTopKRouter<X, double>, SwiGLUExperts<X, double>>;
  const auto make_layer = [] {
    Layer layer(SoftmaxTopKRouter<X, double>({16, 4, 2}), SwiGLUExperts<X, double>({4, 16, 32}));
    initialize(layer.parameters(), InitConfig{0.3, 0.3, 0.2, 0.0, 0.3}, 5);
    return layer;
  };
  const auto step = [](Layer& layer, int n) {
    Matrix<double, X> x("x", 12, 16), u("u", 12, 16), y("y", 12, 16), gx("gx", 12, 16);
    fill_normal(x, 1.0, 10 + std::uint64_t(n));
    fill_normal(u, 0.1, 20 + std::uint64_t(n));
    RouteContext<X> training;
    training.training = true;
    layer.zero_gradients();
    layer.forward(x, y, training);
    layer.backward(u, gx);
  };
  const typename AdamW<X, double>::Config config{1e-2, 0.9, 0.99, 1e-8, 0.05};
  for (auto stage : {ZeroStage::one, ZeroStage::two}) {
    CAPTURE(int(stage));
    Layer plain = make_layer(), sharded_layer = make_layer();
    AdamW<X, double> unsharded(plain.parameters(), config);
    ShardedOptimizer<AdamW<X, double>, SingleProcessCommunicator> sharded(sharded_layer, config,
                                                                          {stage});
    CHECK(sharded.state_bytes() == unsharded.state_bytes());
    for (int n = 0; n < 3; ++n) {
      step(plain, n);
      plain.synchronize_gradients();
      const double norm = clip_grad_norm(plain, 0.05);
      unsharded.step();
      step(sharded_layer, n);
      sharded.reduce_gradients(sharded_layer);
      CHECK(sharded.clip_grad_norm(0.05) == norm);
      sharded.step();
      CHECK(norm > 0.05);
    }
    const auto a = plain.parameters(), b = sharded_layer.parameters();
    std::size_t differences = 0;
    for (std::size_t p = 0; p < a.size(); ++p) {
      const auto ha = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), a[p].value);
      const auto hb = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), b[p].value);
      for (std::size_t i = 0; i < ha.size(); ++i) differences += ha(i) != hb(i);
    }
    CHECK(differences == 0);
  }
}

TEMPLATE_LIST_TEST_CASE("the sharded optimizer refuses bad settings and early state reads",
                        "[optimizer][zero]", ExecutionSpaces) {
  using X = TestType;
  Vector<double, X> w("w", 5), g("g", 5);
  const ParameterList<X, double> list = {make_parameter<X>("router.weight", w, g)};
  const ParallelGroups<SingleProcessCommunicator> groups;
  ShardingOptions bad;
  bad.stage = ZeroStage(3);
  using Sharded = ShardedOptimizer<SGD<X, double>, SingleProcessCommunicator>;
  CHECK_THROWS_WITH(Sharded(list, groups, {}, bad), ContainsSubstring("options.stage"));
  Sharded sharded(list, groups, {});
  CHECK_THROWS_WITH(sharded.state(), ContainsSubstring("call gather_state()"));
  sharded.gather_state();
  REQUIRE(sharded.state().size() == 1);
  CHECK(sharded.state()[0].name == "router.weight.momentum_buffer");
  CHECK(sharded.state()[0].value.size() == 5);
}
