// SPDX-License-Identifier: BSD-3-Clause
// Instantiates every NcclCommunicator operation so that the header is compiled and linked
// against the toolkit's NCCL on any machine; with a GPU it also runs them on a group of one.
// In a CUDA build of Kokkos it also instantiates the whole layer over NCCL on Kokkos::Cuda
// and, with a GPU, checks its forward against the single-process layer bit for bit.
#include <kmoe/communicators/nccl.hpp>
#ifdef KOKKOS_ENABLE_CUDA
#include <kmoe/kmoe.hpp>
#endif

#include <cstdio>

#ifdef KOKKOS_ENABLE_CUDA
namespace {
// One rank: the NCCL layer runs the same kernels as the single-process one, so the outputs
// must be identical; this exercises the layer's collectives on device views.
bool layer_over_nccl_matches(const kmoe::NcclCommunicator& world) {
  using X = Kokkos::Cuda;
  using Router = kmoe::SoftmaxTopKRouter<X, float>;
  using Experts = kmoe::SwiGLUExperts<X, float>;
  using Combiner = kmoe::WeightedSumCombiner<X, float>;
  const auto groups = kmoe::ParallelGroups<kmoe::NcclCommunicator>::create(world, {});
  kmoe::MoELayer<Router, Experts, Combiner, kmoe::NcclCommunicator> over_nccl(
      Router({32, 8, 2, true}), Experts({8, 32, 48}), {}, std::nullopt, groups);
  kmoe::MoELayer<Router, Experts> local(Router({32, 8, 2, true}), Experts({8, 32, 48}));
  kmoe::fill_normal(over_nccl.parameters(), 0.3, 3);
  kmoe::fill_normal(local.parameters(), 0.3, 3);
  kmoe::Matrix<float, X> x("x", 100, 32), y("y", 100, 32), y_local("y_local", 100, 32);
  kmoe::fill_normal(x, 1.0, 4);
  over_nccl.forward(x, y);
  local.forward(x, y_local);
  const auto a = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), y);
  const auto b = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), y_local);
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a.data()[i] != b.data()[i]) return false;
  return true;
}
}  // namespace
#endif

int main(int argc, char* argv[]) {
  static_assert(kmoe::check_valid_communicator<kmoe::NcclCommunicator>());
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("nccl_compile: no CUDA device, built and linked only\n");
    return 77;
  }
  Kokkos::ScopeGuard kokkos(argc, argv);
  kmoe::NcclCommunicator world(kmoe::NcclCommunicator::unique_id(), 0, 1, 0);
  const auto sub = world.split(0, 0);
  float* device = nullptr;
  kmoe::detail::cuda_check(cudaMalloc(&device, 8 * sizeof(float)), "cudaMalloc");
  // Device memory under a host-space view type: this build's Kokkos has no CUDA space, and
  // the communicator only reads data() and size().
  Kokkos::View<float*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>> send(device, 4),
      recv(device + 4, 4);
  const float values[4] = {1, 2, 3, 4};
  kmoe::detail::cuda_check(cudaMemcpy(device, values, sizeof(values), cudaMemcpyHostToDevice),
                           "cudaMemcpy");
  auto request = sub.all_to_all_v_start(send, {4}, recv, {4});
  request.wait();
  world.all_reduce_sum(recv);
  world.all_reduce_max(recv);
  world.all_gather(recv, send);
  float back[8];
  kmoe::detail::cuda_check(cudaMemcpy(back, device, sizeof(back), cudaMemcpyDeviceToHost),
                           "cudaMemcpy");
  const bool ok = world.exchange_counts({7})[0] == 7 && world.any_error(true) &&
                  !world.any_error(false) && back[0] == 1 && back[3] == 4 && back[7] == 4;
  cudaFree(device);
  std::printf("nccl_compile: %s\n", ok ? "ok" : "wrong results");
#ifdef KOKKOS_ENABLE_CUDA
  const bool layer_ok = layer_over_nccl_matches(world);
  std::printf("nccl_compile: layer over NCCL %s\n", layer_ok ? "ok" : "differs");
  return ok && layer_ok ? 0 : 1;
#else
  return ok ? 0 : 1;
#endif
}
