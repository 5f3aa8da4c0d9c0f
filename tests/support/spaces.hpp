// SPDX-License-Identifier: BSD-3-Clause
#pragma once
// The execution spaces every templated test runs on: each one Kokkos was built with, or
// Serial alone where KMOE_TEST_SERIAL_ONLY is defined (the sanitizer build: ASan and UBSan
// see the same kmoe kernels under Serial as under OpenMP, and one space halves its compile
// time).
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
#if defined(KOKKOS_ENABLE_OPENMP) && !defined(KMOE_TEST_SERIAL_ONLY)
    std::tuple<Kokkos::OpenMP>;
#else
    std::tuple<>;
#endif
using CudaSpaces =
#if defined(KOKKOS_ENABLE_CUDA) && !defined(KMOE_TEST_SERIAL_ONLY)
    std::tuple<Kokkos::Cuda>;
#else
    std::tuple<>;
#endif

using ExecutionSpaces =
    typename type_list_cat<typename type_list_cat<SerialSpaces, OpenMPSpaces>::type,
                           CudaSpaces>::type;

}  // namespace kmoe::test
