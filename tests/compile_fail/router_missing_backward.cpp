// SPDX-License-Identifier: BSD-3-Clause
// Must NOT compile: a user router without backward(). The ctest compile_fail_router builds
// this target and passes only if the compiler prints kmoe's message naming the member.
#include <kmoe/kmoe.hpp>

using X = Kokkos::DefaultHostExecutionSpace;

struct RouterWithoutBackward {
  using execution_space = X;
  using scalar_type = float;
  static constexpr kmoe::ProbabilityKind probability_kind = kmoe::ProbabilityKind::softmax;
  int num_experts() const { return 4; }
  int hidden_size() const { return 8; }
  int slots_per_token() const { return 1; }
  void forward(const kmoe::ConstMatrix<float, X>&, kmoe::RoutingPlan<X, float>&,
               const kmoe::RouteContext<X>&) {}
  void collect_parameters(kmoe::ParameterList<X, float>&) const {}
};

int main() {
  kmoe::MoELayer<RouterWithoutBackward, kmoe::SwiGLUExperts<X, float>> layer(
      RouterWithoutBackward{}, kmoe::SwiGLUExperts<X, float>({4, 8, 8}));
  return 0;
}
