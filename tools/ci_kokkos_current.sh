#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# CI job: kmoe's core tests against the newest Kokkos the package registries serve, next to
# the source-built default (Kokkos 3.4.01, tools/setup.sh):
#   kokkos-4.5  Kokkos 4.5.1 + Kokkos Kernels 4.5.1 (Debian sid trilinos 16.1 binaries;
#               Serial backend, BLAS TPL), C++17;
#   kokkos-5.2  Kokkos 5.2.2 (Debian sid libkokkos-dev; OpenMP backend) with the Kokkos
#               Kernels 4.5.1 headers and no compiled Kokkos Kernels (none exists for 5.x),
#               C++20.
# No source package of either is downloadable (docs/versions.md), so the binary packages are
# fetched with `apt-get download` through a private apt configuration (the system's sources
# and / are never touched) and unpacked with `dpkg -x` into private prefixes under
# $KMOE_DEPS/kokkos-current, together with sid's libc6, libstdc++6, libgcc-s1 and libgomp1,
# which those binaries need (glibc >= 2.38, libstdc++ >= 13). Test executables run on that
# glibc through its own dynamic linker. The prefixes are cached: a rerun downloads nothing.
#
# Usage: tools/ci_kokkos_current.sh [4.5] [5.2]   (default: both)
# Environment: KMOE_DEPS (cache, default ~/.cache/kmoe-deps), KMOE_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
log() { printf '[kokkos-current %4ds] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() { log "ERROR: $*" >&2; exit 1; }

versions=("$@")
[ "${#versions[@]}" -gt 0 ] || versions=(4.5 5.2)
jobs="${KMOE_JOBS:-2}"

# Catch2, OpenBLAS and ccache come from the default set-up (cached; seconds).
source tools/prepare.sh
root="$KMOE_DEPS/kokkos-current"
multiarch="$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch)"
openblas="/usr/lib/$multiarch/openblas-openmp/libopenblas.so"
[ -e "$openblas" ] || die "missing $openblas (libopenblas-openmp-dev, tools/setup.sh)"

# Exact versions, so that a cached prefix always holds what the docs say was tested.
trilinos_version="16.1.0-5+b2"
kokkos_packages_4_5=(
  "libtrilinos-kokkos-dev=$trilinos_version" "libtrilinos-kokkos-16.1=$trilinos_version"
  "libtrilinos-kokkos-kernels-dev=$trilinos_version"
  "libtrilinos-kokkos-kernels-16.1=$trilinos_version"
)
kokkos_packages_5_2=("libkokkos-dev=5.2.2-2" "libkokkos5.2=5.2.2-2")
# The C and C++ runtime those binaries were built against (sid's current ones).
runtime_packages=(libc6 libstdc++6 libgcc-s1 libgomp1)
# Bump when the prefix layout or a shim below changes: the prefixes are then rebuilt from
# the cached packages.
shim_revision=2

# ----------------------------------------------------------------------------
# packages: downloaded once into $root/debs with a private apt configuration
# ----------------------------------------------------------------------------
apt_dir="$root/apt"
apt_private=(
  -o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
  -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null
  -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
  -o "Dir::Cache::archives=$apt_dir/archives" -o Debug::NoLocking=1
  -o APT::Sandbox::User=root
)
download_packages() {  # <package[=version]>...
  local debs="$root/debs" missing=() p
  mkdir -p "$debs"
  for p in "$@"; do
    local name="${p%%=*}" version="${p#*=}"
    [ "$version" = "$p" ] && version="*"
    # Debian file names encode the epoch-less version with ':' as %3a; '+' stays.
    compgen -G "$debs/${name}_${version}_*.deb" >/dev/null || missing+=("$p")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  if [ ! -f "$apt_dir/lists/updated" ]; then
    log "private apt index of Debian sid (binary packages; the system's sources are untouched)"
    mkdir -p "$apt_dir/sources.list.d" "$apt_dir/lists/partial" "$apt_dir/archives/partial"
    cat > "$apt_dir/sources.list.d/sid.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt-get "${apt_private[@]}" -q update >"$apt_dir/update.log" 2>&1 \
      || { cat "$apt_dir/update.log" >&2; die "apt-get update (private sid index) failed"; }
    touch "$apt_dir/lists/updated"
  fi
  log "downloading ${missing[*]}"
  (cd "$debs" && apt-get "${apt_private[@]}" -q download "${missing[@]}") >"$root/download.log" 2>&1 \
    || { cat "$root/download.log" >&2; die "apt-get download failed (log: $root/download.log)"; }
}

unpack() {  # <prefix> <package-name>...
  local prefix="$1" p deb; shift
  for p in "$@"; do
    deb=$(compgen -G "$root/debs/${p%%=*}_*.deb") || die "no package file for $p in $root/debs"
    dpkg -x "$deb" "$prefix"
  done
}

# ----------------------------------------------------------------------------
# shims shared by both prefixes
# ----------------------------------------------------------------------------
write_empty_archive() { printf '!<arch>\n' > "$1"; }

# Kokkos Kernels 4.5.1's compiled HostBlas<float|double>::gemm|gemv (kept in
# libkokkoskernels, which exists for Kokkos 4.5 only): the four calls kmoe's GEMM reaches,
# forwarding to the Fortran BLAS.
write_host_blas_source() {
  cat > "$1" <<'EOF'
// kmoe CI shim: the HostBlas members Kokkos Kernels keeps in its compiled library.
#include <KokkosBlas_Host_tpl.hpp>
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*);
void sgemv_(const char*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*);
void dgemv_(const char*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*);
}
namespace KokkosBlas::Impl {
template <>
void HostBlas<float>::gemm(const char ta, const char tb, int m, int n, int k, const float alpha,
                           const float* a, int lda, const float* b, int ldb, const float beta,
                           float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
template <>
void HostBlas<double>::gemm(const char ta, const char tb, int m, int n, int k, const double alpha,
                            const double* a, int lda, const double* b, int ldb, const double beta,
                            double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
template <>
void HostBlas<float>::gemv(const char t, int m, int n, const float alpha, const float* a, int lda,
                           const float* x, int incx, const float beta, float* y, int incy) {
  sgemv_(&t, &m, &n, &alpha, a, &lda, x, &incx, &beta, y, &incy);
}
template <>
void HostBlas<double>::gemv(const char t, int m, int n, const double alpha, const double* a,
                            int lda, const double* x, int incx, const double beta, double* y,
                            int incy) {
  dgemv_(&t, &m, &n, &alpha, a, &lda, x, &incx, &beta, y, &incy);
}
}  // namespace KokkosBlas::Impl
EOF
}

# Kokkos 4.5.1 + Kokkos Kernels 4.5.1 as trilinos 16.1 installs them.
assemble_4_5() {  # <prefix>
  local prefix="$1" cmake_dir="$1/usr/lib/$multiarch/cmake" pkg
  unpack "$prefix" "${kokkos_packages_4_5[@]}" "${runtime_packages[@]}"
  # The TriBITS Kokkos Kernels config includes trilinos' BLAS and LAPACK package files,
  # which live in other packages; OpenBLAS provides both.
  for pkg in BLAS LAPACK; do
    mkdir -p "$cmake_dir/trilinos_external_packages/$pkg"
    cat > "$cmake_dir/trilinos_external_packages/$pkg/${pkg}Config.cmake" <<EOF
# kmoe CI shim: trilinos' $pkg external package as OpenBLAS (OpenMP variant).
if(NOT TARGET $pkg::all_libs)
  add_library($pkg::all_libs INTERFACE IMPORTED)
  set_target_properties($pkg::all_libs PROPERTIES INTERFACE_LINK_LIBRARIES "$openblas")
endif()
EOF
  done
  # kmoe links the target name Kokkos Kernels' own CMake build exports.
  cat >> "$cmake_dir/KokkosKernels/KokkosKernelsConfig.cmake" <<'EOF'
# kmoe CI shim: the target name of Kokkos Kernels' standalone CMake build.
if(NOT TARGET Kokkos::kokkoskernels)
  add_library(Kokkos::kokkoskernels INTERFACE IMPORTED)
  set_target_properties(Kokkos::kokkoskernels PROPERTIES
    INTERFACE_LINK_LIBRARIES KokkosKernels::all_libs)
endif()
EOF
}

# Kokkos 5.2.2 with Kokkos Kernels 4.5.1 headers, header-only (no ETI).
assemble_5_2() {  # <prefix>
  local prefix="$1" libdir="$1/usr/lib/$multiarch" headers kk_unpacked
  unpack "$prefix" "${kokkos_packages_5_2[@]}" "${runtime_packages[@]}"
  # The package's targets name /usr/include/kokkos instead of their own prefix, and two
  # static libraries the package does not ship (their code is header-only here).
  sed -i 's|"/usr/include/kokkos"|"${_IMPORT_PREFIX}/include/kokkos"|' \
    "$libdir/cmake/Kokkos/KokkosTargets.cmake"
  write_empty_archive "$libdir/libkokkosalgorithms.a"
  write_empty_archive "$libdir/libkokkossimd.a"
  # Kokkos Kernels' headers, with every explicit instantiation turned off: the compiled
  # instantiations exist only in the Kokkos 4.5 library.
  kk_unpacked=$(mktemp -d)
  unpack "$kk_unpacked" "libtrilinos-kokkos-kernels-dev=$trilinos_version"
  headers="$prefix/usr/include/kokkos-kernels"
  mv "$kk_unpacked/usr/include/trilinos" "$headers"
  rm -rf "$kk_unpacked"
  sed -i -E 's|^#define (KOKKOSKERNELS_INST_[A-Z0-9_]+)$|/* \1: off (kmoe CI shim, no ETI) */|' \
    "$headers/KokkosKernels_config.h"
  # The generated headers name each compiled instantiation (on Kokkos::Serial, which the
  # 5.2 package lacks) one macro call per line.
  sed -i -E '/^KOKKOS[A-Z0-9_]+_ETI_SPEC_[A-Z_]+\(.*\)$/d' \
    "$headers"/generated_specializations_hpp/*.hpp
  write_host_blas_source "$prefix/host_blas.cpp"
  g++ -std=c++20 -O2 -fPIC -I"$prefix/usr/include/kokkos" -I"$headers" \
    -c "$prefix/host_blas.cpp" -o "$prefix/host_blas.o"
  ar rcs "$libdir/libkmoe_kk_host_blas.a" "$prefix/host_blas.o"
  mkdir -p "$libdir/cmake/KokkosKernels"
  cat > "$libdir/cmake/KokkosKernels/KokkosKernelsConfig.cmake" <<EOF
# kmoe CI shim: Kokkos Kernels 4.5.1 headers over Kokkos 5.2.2, BLAS TPL = OpenBLAS.
include(CMakeFindDependencyMacro)
find_dependency(Kokkos)
set(KokkosKernels_VERSION 4.5.1)
if(NOT TARGET Kokkos::kokkoskernels)
  add_library(Kokkos::kokkoskernels INTERFACE IMPORTED)
  set_target_properties(Kokkos::kokkoskernels PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "$headers"
    INTERFACE_LINK_LIBRARIES "Kokkos::kokkos;$libdir/libkmoe_kk_host_blas.a;$openblas")
endif()
EOF
  cat > "$libdir/cmake/KokkosKernels/KokkosKernelsConfigVersion.cmake" <<'EOF'
set(PACKAGE_VERSION 4.5.1)
set(PACKAGE_VERSION_COMPATIBLE TRUE)
EOF
}

prefix_of() { echo "$root/kokkos-$1"; }

prepare_prefix() {  # <version>
  local version="$1" prefix stamp
  prefix=$(prefix_of "$version")
  stamp="$prefix/.kmoe-prefix-$shim_revision"
  [ -f "$stamp" ] && return 0
  case "$version" in
    4.5) download_packages "${kokkos_packages_4_5[@]}" "${runtime_packages[@]}" ;;
    5.2) download_packages "${kokkos_packages_5_2[@]}" "${runtime_packages[@]}" \
           "libtrilinos-kokkos-kernels-dev=$trilinos_version" ;;
  esac
  log "assembling $prefix"
  rm -rf "$prefix"; mkdir -p "$prefix"
  "assemble_${version/./_}" "$prefix"
  touch "$stamp"
}

# ----------------------------------------------------------------------------
# build and run the core tests against one prefix
# ----------------------------------------------------------------------------
# The single-process suites that exercise routers, experts (grouped GEMM), backward, the
# policies and thread-count determinism; MPI, I/O and model suites need nothing
# version-specific from Kokkos and stay with the default build.
core_targets=(test_forward_routers test_forward_experts test_backward test_policies
              test_randomized test_api_misuse determinism_probe)
core_tests='^(test_forward_routers|test_forward_experts|test_backward|test_policies|test_randomized|test_api_misuse|determinism_threads)$'

run_version() {  # <version>
  local version="$1" prefix libdir build standard
  prefix=$(prefix_of "$version")
  libdir="$prefix/usr/lib/$multiarch"
  build="build-kokkos-$version"
  standard=17
  [ "$version" = 5.2 ] && standard=20   # Kokkos 5 requires C++20
  local found
  found=$(sed -n 's/^set(PACKAGE_VERSION "\{0,1\}\([0-9.]*\)"\{0,1\})$/\1/p' \
            "$libdir/cmake/Kokkos/KokkosConfigVersion.cmake")
  log "Kokkos $found (C++$standard): configuring $build"
  # Executables load sid's glibc through its own dynamic linker; RPATH (not RUNPATH) so
  # that the libraries they load find it too. Kokkos' libraries need newer libstdc++
  # symbols than the system's link-time libstdc++ has: they resolve at run time.
  local link="-Wl,--dynamic-linker=$libdir/ld-linux-x86-64.so.2 -Wl,--disable-new-dtags"
  link="$link -Wl,-rpath,$libdir -Wl,--allow-shlib-undefined"
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_STANDARD="$standard" \
    "-DCMAKE_PREFIX_PATH=$libdir/cmake;$KMOE_DEPS/catch2" \
    -DKokkos_DIR="$libdir/cmake/Kokkos" -DKokkosKernels_DIR="$libdir/cmake/KokkosKernels" \
    -DCMAKE_EXE_LINKER_FLAGS="$link" \
    -DKMOE_ENABLE_TESTS=ON -DKMOE_ENABLE_EXAMPLES=OFF -DKMOE_ENABLE_BENCHMARKS=OFF \
    -DKMOE_ENABLE_MPI=OFF -DKMOE_ENABLE_NCCL=OFF >"$root/configure-$version.log" 2>&1 \
    || { cat "$root/configure-$version.log" >&2; die "configure against Kokkos $version failed"; }
  log "building ${core_targets[*]}"
  cmake --build "$build" -j "$jobs" --target "${core_targets[@]}"
  log "running the core tests"
  # The 4.5 binaries have no OpenMP backend: kmoe's host GEMM tiles run one after another
  # and OpenBLAS threads each call by OMP_NUM_THREADS, so results are deterministic for a
  # fixed thread count only (docs/design.md, "Determinism") and the 1-vs-2-thread
  # comparison does not apply there.
  local skip=()
  [ "$version" = 4.5 ] && skip=(-E '^determinism_threads$')
  (cd "$build" && ctest --output-on-failure -j 1 --timeout 600 -R "$core_tests" "${skip[@]}")
  log "Kokkos $found: core tests passed"
}

for version in "${versions[@]}"; do
  case "$version" in 4.5|5.2) ;; *) die "unknown version '$version' (4.5 or 5.2)" ;; esac
  prepare_prefix "$version"
done
for version in "${versions[@]}"; do run_version "$version"; done
log "done"
