// SPDX-License-Identifier: BSD-3-Clause
#pragma once
// The execution spaces every templated test runs on: each one Kokkos was built with.
#include <Kokkos_Core.hpp>

#include <tuple>

namespace kmoe::test {

template <class... T>
struct type_list_cat;
template <class... A, class... B>
struct type_list_cat<std::tuple<A...>, std::tuple<B...>> {
  using type = std::tuple<A..., B...>;
};

using SerialSpaces =
#ifdef KOKKOS_ENABLE_SERIAL
    std::tuple<Kokkos::Serial>;
#else
    std::tuple<>;
#endif
using OpenMPSpaces =
#ifdef KOKKOS_ENABLE_OPENMP
    std::tuple<Kokkos::OpenMP>;
#else
    std::tuple<>;
#endif
using CudaSpaces =
#ifdef KOKKOS_ENABLE_CUDA
    std::tuple<Kokkos::Cuda>;
#else
    std::tuple<>;
#endif

using ExecutionSpaces =
    typename type_list_cat<typename type_list_cat<SerialSpaces, OpenMPSpaces>::type,
                           CudaSpaces>::type;

}  // namespace kmoe::test
