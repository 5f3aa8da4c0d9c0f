// SPDX-License-Identifier: BSD-3-Clause
// The expert-parallel exchange on its own (EP = world size): random routing of every
// rank's tokens to global experts, dispatch, identity experts (expert_y = expert_x), then
// combine. Each rank's expert rows must hold exactly the tokens routed to its experts, in
// the expert order (local expert, source rank, token), checked against a reference built
// on every rank from all ranks' routing (gathered with the communicator); combine must
// return every kept row to its token.
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/exchange/expert_parallel_exchange.hpp>
#include <kmoe/parallel.hpp>

#include <catch2/catch_test_macros.hpp>

#include <algorithm>
#include <random>
#include <vector>

using namespace kmoe;

namespace {
using X = Kokkos::DefaultHostExecutionSpace;
using S = double;

/// Row h of token t on rank p: distinct for every (p, t, h), exact in double.
double value(int p, int t, int h) { return 1e6 * p + 1e3 * t + h; }
}  // namespace

TEST_CASE("the exchange dispatches every token to its experts' ranks and combines it back",
          "[mpi][exchange]") {
  const auto world = MpiCommunicator::world();
  const int ranks = world.size(), rank = world.rank();
  const int experts = 2 * ranks + 1, slots = 3, tokens = 17, hidden = 4;
  for (const auto placement : {Placement::block, Placement::round_robin}) {
    DYNAMIC_SECTION("placement " << int(placement)) {
      ParallelLayout layout;
      layout.ep = ranks;
      layout.placement = placement;
      const auto groups = ParallelGroups<MpiCommunicator>::create(world, layout);
      ExpertParallelExchange<X, S, MpiCommunicator> exchange(groups, experts, hidden, 1);

      // Random routing: distinct experts per token, some slots empty.
      RoutingPlan<X, S> plan;
      plan.resize(tokens, experts, slots, false);
      auto expert = Kokkos::create_mirror_view(plan.expert);
      std::mt19937 gen(1234 + 77 * rank);
      for (int t = 0; t < tokens; ++t) {
        std::vector<int> all(experts);
        for (int e = 0; e < experts; ++e) all[e] = e;
        std::shuffle(all.begin(), all.end(), gen);
        for (int s = 0; s < slots; ++s) expert(t, s) = gen() % 4 == 0 ? -1 : all[s];
      }
      Kokkos::deep_copy(plan.expert, expert);
      Kokkos::deep_copy(plan.weight, 1.0);
      Matrix<S, X> x("x", tokens, hidden);
      auto x_host = Kokkos::create_mirror_view(x);
      for (int t = 0; t < tokens; ++t)
        for (int h = 0; h < hidden; ++h) x_host(t, h) = value(rank, t, h);
      Kokkos::deep_copy(x, x_host);

      Dispatch<X> dispatch;
      dispatch.build(plan, exchange.expert_key(), experts, -1, DropPolicy::by_position);
      exchange.plan(dispatch, plan.expert, x);
      exchange.exchange_counts();
      auto request = exchange.dispatch_start();
      request.wait();
      const Matrix<S, X> expert_x = exchange.arrive();
      const auto& segments = exchange.segments();

      // Reference: every rank's routing, gathered.
      Vector<int, X> mine("mine", std::size_t(tokens) * slots);
      Vector<int, X> everyone("everyone", std::size_t(tokens) * slots * ranks);
      Kokkos::deep_copy(mine, Kokkos::View<int*, X::memory_space>(plan.expert.data(), mine.size()));
      world.all_gather(mine, everyone);
      const auto routed = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), everyone);
      const auto owned = layout.local_experts(experts, groups.ep_rank);
      REQUIRE(segments.experts() == int(owned.size()));
      const auto rows = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), expert_x);
      int row = 0;
      for (int j = 0; j < int(owned.size()); ++j) {
        CHECK(segments.begin(j) == row);
        for (int p = 0; p < ranks; ++p)
          for (int t = 0; t < tokens; ++t)
            for (int s = 0; s < slots; ++s)
              if (routed((std::size_t(p) * tokens + t) * slots + s) == owned[j]) {
                REQUIRE(row < segments.rows());
                for (int h = 0; h < hidden; ++h) CHECK(rows(row, h) == value(p, t, h));
                ++row;
              }
        CHECK(segments.end(j) == row);
      }
      CHECK(segments.rows() == row);

      // Rows exchanged with each peer (the monitoring counts), from the gathered routing:
      // the dispatch carries each token once per rank holding any of its experts, the
      // combine one row per assignment.
      const auto owner = [&](int e) {
        for (int r = 0; r < ranks; ++r) {
          const auto held = layout.local_experts(experts, r);
          if (std::find(held.begin(), held.end(), e) != held.end()) return r;
        }
        return -1;
      };
      std::vector<std::int64_t> tokens_from(ranks, 0), assignments_from(ranks, 0),
          tokens_to(ranks, 0), assignments_to(ranks, 0);
      for (int p = 0; p < ranks; ++p)
        for (int t = 0; t < tokens; ++t) {
          bool to_me = false;
          std::vector<bool> to_rank(ranks, false);
          for (int s = 0; s < slots; ++s) {
            const int e = routed((std::size_t(p) * tokens + t) * slots + s);
            if (e < 0) continue;
            const int r = owner(e);
            if (r == groups.ep_rank) {
              to_me = true;
              ++assignments_from[p];
            }
            if (p == groups.ep_rank) {
              to_rank[r] = true;
              ++assignments_to[r];
            }
          }
          tokens_from[p] += to_me;
          for (int r = 0; r < ranks; ++r) tokens_to[r] += to_rank[r];
        }
      CHECK(exchange.dispatch_rows() == tokens_to);
      CHECK(exchange.dispatch_rows_received() == tokens_from);
      CHECK(exchange.combine_rows_sent() == assignments_from);
      CHECK(exchange.combine_rows_received() == assignments_to);

      // Identity experts, then the way back: every kept slot's row is its token's.
      const Matrix<S, X> send_y = exchange.combine(expert_x);
      const auto back = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), send_y);
      const auto position =
          Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), dispatch.position);
      std::int64_t kept = 0;
      for (int t = 0; t < tokens; ++t)
        for (int s = 0; s < slots; ++s) {
          CHECK((position(t, s) >= 0) == (expert(t, s) >= 0));
          if (position(t, s) < 0) continue;
          ++kept;
          for (int h = 0; h < hidden; ++h) CHECK(back(position(t, s), h) == value(rank, t, h));
        }
      CHECK(std::int64_t(send_y.extent(0)) == kept);
    }
  }
}
