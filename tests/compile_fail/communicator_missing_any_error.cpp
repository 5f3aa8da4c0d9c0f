// SPDX-License-Identifier: BSD-3-Clause
// Must NOT compile: a user communicator without any_error(), the agreement step that keeps
// a failing rank from leaving the others blocked. The ctest
// compile_fail_communicator_missing_any_error builds this target and passes only if the
// compiler prints kmoe's message naming the member.
#include <kmoe/kmoe.hpp>

using X = Kokkos::DefaultHostExecutionSpace;
using S = float;

// Every other member of the role, taken from the single-process communicator.
class CommunicatorWithoutAnyError : private kmoe::SingleProcessCommunicator {
  using Base = kmoe::SingleProcessCommunicator;

 public:
  using Base::Request;
  using Base::all_gather;
  using Base::all_reduce_max;
  using Base::all_reduce_sum;
  using Base::all_to_all_v;
  using Base::all_to_all_v_start;
  using Base::exchange_counts;
  using Base::rank;
  using Base::size;
  CommunicatorWithoutAnyError split(int, int) const { return {}; }
};

int main() {
  kmoe::MoELayer<kmoe::SoftmaxTopKRouter<X, S>, kmoe::SwiGLUExperts<X, S>,
                 kmoe::WeightedSumCombiner<X, S>, CommunicatorWithoutAnyError>
      layer(kmoe::SoftmaxTopKRouter<X, S>({8, 4, 1}), kmoe::SwiGLUExperts<X, S>({4, 8, 8}));
  return 0;
}
