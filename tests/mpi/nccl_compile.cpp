// SPDX-License-Identifier: BSD-3-Clause
// Instantiates every NcclCommunicator operation so that the header is compiled and linked
// against the toolkit's NCCL on any machine; with a GPU it also runs them on a group of one.
#include <kmoe/communicators/nccl.hpp>

#include <cstdio>

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
  return ok ? 0 : 1;
}
