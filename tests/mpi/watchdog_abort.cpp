// SPDX-License-Identifier: BSD-3-Clause
// A rank that is absent from a collective: asleep inside a forward, asleep or stopped
// between steps, or finished one forward early. With a 2 s collective timeout the
// watchdog must end the job, every rank still alive printing which collective, group and
// step it waited in and which ranks did not arrive; tests/mpi/expect_watchdog.sh checks
// those lines and the elapsed time. Without the watchdog the job sleeps on or hangs.
//
//   mpiexec -n P watchdog_abort <sleep-in-forward | sleep-between-steps | stop-between-steps |
//                                skip-last-forward | one-sided-last-backward>
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = double;
using Router = kmoe::SoftmaxTopKRouter<X, S>;

/// Longer than the ctest limit: a job that waits for the sleeper fails by time.
constexpr auto absence = std::chrono::seconds(60);

// SwiGLU experts whose forward sleeps on one chosen rank, after the dispatch exchange
// began: its peers wait for it in the return exchange.
class SleepingExperts : public kmoe::SwiGLUExperts<X, S> {
 public:
  SleepingExperts(const kmoe::ExpertShape& shape, bool sleep)
      : kmoe::SwiGLUExperts<X, S>(shape), sleep_(sleep) {}
  void forward(const kmoe::ConstMatrix<S, X>& x, const kmoe::Segments<X>& segments,
               const kmoe::Matrix<S, X>& y, kmoe::ExpertMode mode) {
    if (sleep_) std::this_thread::sleep_for(absence);
    kmoe::SwiGLUExperts<X, S>::forward(x, segments, y, mode);
  }

 private:
  bool sleep_;
};

int run(const std::string& scenario) {
  kmoe::MpiOptions options;
  options.collective_timeout = std::chrono::seconds(2);
  const auto world = kmoe::MpiCommunicator::world(options);
  const int absent = 1;  // the rank that goes missing
  const bool is_absent = world.rank() == absent;
  kmoe::ParallelLayout layout;
  layout.ep = world.size();
  const auto groups = kmoe::ParallelGroups<kmoe::MpiCommunicator>::create(world, layout);
  constexpr int hidden = 8, tokens = 16;
  const int experts = 2 * world.size();
  kmoe::MoELayer<Router, SleepingExperts, kmoe::WeightedSumCombiner<X, S>, kmoe::MpiCommunicator>
      layer(Router({hidden, experts, 2}),
            SleepingExperts({2, hidden, 12}, scenario == "sleep-in-forward" && is_absent), {},
            std::nullopt, groups);
  kmoe::fill_normal(layer.parameters(), 0.3, 5);
  kmoe::Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden);
  kmoe::Matrix<S, X> grad_y("grad_y", tokens, hidden), grad_x("grad_x", tokens, hidden);
  kmoe::fill_normal(x, 1.0, 6 + world.rank());
  kmoe::fill_normal(grad_y, 1.0, 16 + world.rank());
  kmoe::RouteContext<X> training;
  training.training = true;
  const int steps = 3;
  for (int step = 1; step <= steps; ++step) {
    if (is_absent && step == steps) {
      if (scenario == "sleep-between-steps") std::this_thread::sleep_for(absence);
      if (scenario == "stop-between-steps") std::raise(SIGSTOP);
      if (scenario == "skip-last-forward") break;
    }
    layer.forward(x, y, training);
    if (step == steps && scenario == "one-sided-last-backward" && !is_absent)
      layer.backward(grad_y, grad_x);
  }
  std::printf("rank %d finished all steps: the absent rank did not end the job\n", world.rank());
  return 0;
}

}  // namespace

int main(int argc, char* argv[]) {
  MPI_Init(&argc, &argv);
  int result = 0;
  {
    Kokkos::ScopeGuard kokkos(argc, argv);
    result = run(argc > 1 ? argv[1] : "");
  }
  MPI_Finalize();
  return result;
}
