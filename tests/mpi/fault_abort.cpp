// SPDX-License-Identifier: BSD-3-Clause
// A rank whose expert throws in the middle of a step, after the dispatch exchange has
// begun, while its peer already waits for the return exchange. The failing rank catches
// the exception and tries another step, as a program that recovers would: without the
// abort of agreement.hpp the peers would be left in mismatched collectives. ctest expects
// the job to end within its timeout with the failing rank's message (abort exit status).
#include <kmoe/combiner.hpp>
#include <kmoe/communicators/mpi.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/routers/softmax_topk.hpp>

#include <cstdio>
#include <stdexcept>

namespace {

using X = Kokkos::DefaultHostExecutionSpace;
using S = double;
using Router = kmoe::SoftmaxTopKRouter<X, S>;

// SwiGLU experts whose forward fails on one chosen rank (the fault injected by the test).
class FailingExperts : public kmoe::SwiGLUExperts<X, S> {
 public:
  FailingExperts(const kmoe::ExpertShape& shape, bool fail)
      : kmoe::SwiGLUExperts<X, S>(shape), fail_(fail) {}
  void forward(const kmoe::ConstMatrix<S, X>& x, const kmoe::Segments<X>& segments,
               const kmoe::Matrix<S, X>& y, kmoe::ExpertMode mode) {
    if (fail_) throw std::runtime_error("injected expert failure");
    kmoe::SwiGLUExperts<X, S>::forward(x, segments, y, mode);
  }

 private:
  bool fail_;
};

int run() {
  const auto world = kmoe::MpiCommunicator::world();
  kmoe::ParallelLayout layout;
  layout.ep = world.size();
  const auto groups = kmoe::ParallelGroups<kmoe::MpiCommunicator>::create(world, layout);
  constexpr int hidden = 8, tokens = 16;
  const int experts = 2 * world.size();
  kmoe::MoELayer<Router, FailingExperts, kmoe::WeightedSumCombiner<X, S>, kmoe::MpiCommunicator>
      layer(Router({hidden, experts, 2}), FailingExperts({2, hidden, 12}, world.rank() == 1), {},
            std::nullopt, groups);
  kmoe::fill_normal(layer.parameters(), 0.3, 5);
  kmoe::Matrix<S, X> x("x", tokens, hidden), y("y", tokens, hidden);
  kmoe::fill_normal(x, 1.0, 6 + world.rank());
  for (int step = 0; step < 2; ++step) {
    try {
      layer.forward(x, y);
    } catch (const std::exception& e) {
      std::printf("rank %d caught '%s' and carries on\n", world.rank(), e.what());
    }
  }
  std::printf("rank %d finished both steps: the fault did not end the job\n", world.rank());
  return 0;
}

}  // namespace

int main(int argc, char* argv[]) {
  MPI_Init(&argc, &argv);
  int result = 0;
  {
    Kokkos::ScopeGuard kokkos(argc, argv);
    result = run();
  }
  MPI_Finalize();
  return result;
}
