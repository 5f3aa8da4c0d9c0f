# SPDX-License-Identifier: BSD-3-Clause
# Spack recipe for kmoe. kmoe has no published release or public URL yet, so the recipe
# builds a checkout: `spack repo add packaging/spack`, then in a Spack environment
# `spack develop --path /path/to/kmoe kmoe@main` and `spack add kmoe@main+mpi`, `spack install`.
# CI checks it with tools/check_packaging.py (it parses, the variants exist, each option it
# sets is one CMakeLists.txt declares).

from spack.package import *


class Kmoe(CMakePackage, CudaPackage):
    """Header-only C++17 Kokkos library of Mixture-of-Experts layers: routers, experts,
    balance losses, forward and backward, expert/tensor/data parallelism."""

    license("BSD-3-Clause")

    version("main")

    variant("mpi", default=True, description="MPI communicator target kmoe::mpi")
    variant("nccl", default=False, description="NCCL communicator target kmoe::nccl (CUDA)")
    variant("io", default=True, description="safetensors and Hugging Face model adapters (kmoe::io, kmoe-run)")

    conflicts("+nccl", when="~cuda", msg="the NCCL communicator needs CUDA")

    depends_on("cmake@3.21:", type="build")
    # Tested: 3.4.01 (source-built default, OpenMP and CUDA), 4.5.1 and 5.2.2 (docs/versions.md).
    depends_on("kokkos@3.4.01:")
    depends_on("kokkos-kernels@3.4.01:")
    depends_on("kokkos+openmp", when="~cuda")
    depends_on("kokkos+cuda+cuda_lambda", when="+cuda")
    depends_on("kokkos-kernels+blas", when="~cuda")
    depends_on("kokkos-kernels+cublas", when="+cuda")
    depends_on("mpi", when="+mpi")
    depends_on("nccl", when="+nccl")
    depends_on("nlohmann-json@3:", when="+io")
    depends_on("catch2@3:", type="test")

    def cmake_args(self):
        args = [
            self.define_from_variant("KMOE_ENABLE_MPI", "mpi"),
            self.define_from_variant("KMOE_ENABLE_NCCL", "nccl"),
            self.define("KMOE_ENABLE_TESTS", self.run_tests),
            self.define("KMOE_ENABLE_EXAMPLES", False),
            self.define("KMOE_ENABLE_BENCHMARKS", False),
        ]
        if "~io" in self.spec:
            # kmoe::io exists only where nlohmann-json is found.
            args.append(self.define("CMAKE_DISABLE_FIND_PACKAGE_nlohmann_json", True))
        if "+cuda" in self.spec:
            args.append(self.define("CMAKE_CXX_COMPILER", self.spec["kokkos"].kokkos_cxx))
        return args
