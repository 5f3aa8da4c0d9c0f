#!/usr/bin/env bash
# tools/setup.sh -- install and cache every dependency of kmoe on Debian bookworm.
#
# Usage:
#   tools/setup.sh [--cuda] [--cuda-arch=sm_XX] [--jobs=N] [--no-verify] [--verify-only] [--help]
#
#   --cuda            also build Kokkos + Kokkos Kernels for CUDA into
#                     $KMOE_DEPS/kokkos-cuda (needs nvcc, default /usr/local/cuda).
#   --cuda-arch=sm_XX CUDA target arch (default: $KMOE_CUDA_ARCH or sm_90).
#   --jobs=N          parallel build jobs (default: $KMOE_JOBS or nproc).
#   --no-verify       skip the smoke tests run after a (re)build.
#   --verify-only     run only the smoke tests, against what is installed, whatever the
#                     stamps say (no apt, no download, no build): CI runs this every time
#                     so the first-run check cannot rot behind a cached stamp.
#
# Environment:
#   KMOE_DEPS        cache prefix (default: $HOME/.cache/kmoe-deps)
#   KMOE_CUDA_ARCH   CUDA arch (default sm_90); --cuda-arch overrides it
#   KMOE_JOBS        build parallelism
#   CUDA_HOME        CUDA toolkit root (default /usr/local/cuda)
#   KMOE_KEEP_BUILD  1 = keep the cmake build trees under $KMOE_DEPS/build
#
# What it does (each step is skipped when already done, so a rerun takes seconds
# and never calls apt or the network):
#   1. apt: installs the missing Debian packages (checked with dpkg-query),
#      adds deb-src entries (bookworm + trixie, SOURCE ONLY) in
#      /etc/apt/sources.list.d/kmoe-deb-src.sources.
#   2. downloads the Debian source packages trilinos 13.2.0 (bookworm; it ships
#      Kokkos 3.4.01 and Kokkos Kernels 3.4.01) and catch2 3.7.1-0.5 (trixie)
#      into $KMOE_DEPS/downloads (kept, never downloaded twice).
#   3. builds + installs (static libs, -fPIC, C++17, Release, ccache if present):
#        $KMOE_DEPS/kokkos-openmp   Kokkos (OpenMP+Serial) + KokkosKernels
#                                   (BLAS TPL = OpenBLAS *openmp* variant, no ETI)
#        $KMOE_DEPS/catch2          Catch2 3.7.1
#        $KMOE_DEPS/kokkos-cuda     (--cuda) Kokkos (Cuda+Serial) + KokkosKernels
#                                   (cuBLAS TPL, no ETI), bin/nvcc_wrapper
#   4. writes $KMOE_DEPS/env.sh (source it: exports KMOE_DEPS, CMAKE_PREFIX_PATH).
#
# Every build step is guarded by a stamp file ($KMOE_DEPS/stamps/*.stamp) holding
# a hash of its whole configuration (versions, cmake flags, patch revision,
# compiler); a changed configuration rebuilds that step (and its dependents).
set -euo pipefail

# ----------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------
KMOE_DEPS="${KMOE_DEPS:-$HOME/.cache/kmoe-deps}"
CUDA_ARCH="${KMOE_CUDA_ARCH:-sm_90}"
JOBS="${KMOE_JOBS:-$(nproc 2>/dev/null || echo 2)}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
WANT_CUDA=0
VERIFY=1
VERIFY_ONLY=0

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'; }

for arg in "$@"; do
  case "$arg" in
    --cuda) WANT_CUDA=1 ;;
    --cuda-arch=*) CUDA_ARCH="${arg#*=}"; WANT_CUDA=1 ;;
    --jobs=*) JOBS="${arg#*=}" ;;
    --no-verify) VERIFY=0 ;;
    --verify-only) VERIFY_ONLY=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "setup.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

T0=$(date +%s)
log()  { printf '[setup] %s\n' "$*"; }
die()  { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
elapsed() { echo "$(( $(date +%s) - T0 ))s"; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 && SUDO="sudo" || SUDO="__nosudo__"
fi
as_root() {
  [ "$SUDO" = "__nosudo__" ] && die "need root (or sudo) for: $*"
  $SUDO "$@"
}

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-y -q -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

# Versions / pinned artefacts ------------------------------------------------
TRILINOS_SRC="trilinos/bookworm"                 # bookworm: 13.2.0-4
TRILINOS_ORIG="trilinos_13.2.0.orig.tar.gz"
TRILINOS_ORIG_SHA256="0ddb47784ba7b8a6b9a07a4822b33be508feb4ccd54301b2a5d10c9e54524b90"
KOKKOS_VERSION="3.4.01"
CATCH2_DEBVER="3.7.1-0.5"                        # trixie
CATCH2_DSC="catch2_${CATCH2_DEBVER}.dsc"
CATCH2_FILES=(
  "catch2_3.7.1.orig.tar.gz c991b247a1a0d7bb9c39aa35faf0fe9e19764213f28ffba3109388e62ee0269c"
  "catch2_3.7.1-0.5.debian.tar.xz edb4c6fb6912deb567c4fe13382cc90a6247fc458c747a73aa979a2423a20cb4"
)
# Bump when the CUDA-13 source patches below change (forces a CUDA rebuild).
CUDA_PATCH_REV="1"

DEB_PACKAGES=(
  libopenmpi-dev openmpi-bin libopenblas-openmp-dev nlohmann-json3-dev
  libbenchmark-dev ccache dpkg-dev ninja-build cmake g++ python3
  ca-certificates xz-utils
  iproute2  # ip netns / veth for the multi-host tests (tests/multihost)
)

DL="$KMOE_DEPS/downloads"
SRC="$KMOE_DEPS/src"
BLD="$KMOE_DEPS/build"
STAMPS="$KMOE_DEPS/stamps"
P_OMP="$KMOE_DEPS/kokkos-openmp"
P_CATCH="$KMOE_DEPS/catch2"
P_CUDA="$KMOE_DEPS/kokkos-cuda"
mkdir -p "$DL" "$SRC" "$BLD" "$STAMPS"

log "cache prefix: $KMOE_DEPS (jobs=$JOBS, cuda=$WANT_CUDA$([ "$WANT_CUDA" = 1 ] && echo " arch=$CUDA_ARCH"))"

# ----------------------------------------------------------------------------
# smoke tests: a KokkosBlas::gemm program built against an installed prefix
# ----------------------------------------------------------------------------
# ccache is looked up when called: on a fresh machine step 1 installs it.
CCACHE_LAUNCHER=()
use_ccache_if_present() {
  if command -v ccache >/dev/null 2>&1; then
    CCACHE_LAUNCHER=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
    export CCACHE_DIR="${CCACHE_DIR:-$KMOE_DEPS/ccache}"
    ccache --max-size=1G >/dev/null 2>&1 || true
  fi
}

write_smoke() {  # <dir> <exec-space> <mem-space>
  local d="$1"; mkdir -p "$d"
  cat > "$d/CMakeLists.txt" <<'EOF'
cmake_minimum_required(VERSION 3.16)
project(kmoe_setup_smoke CXX)
find_package(Kokkos REQUIRED)
find_package(KokkosKernels REQUIRED)
add_executable(smoke smoke.cpp)
target_link_libraries(smoke PRIVATE Kokkos::kokkos Kokkos::kokkoskernels)
EOF
  cat > "$d/smoke.cpp" <<EOF
#include <Kokkos_Core.hpp>
#include <KokkosBlas3_gemm.hpp>
#include <cstdio>
#include <type_traits>
using Exec = $2;
using Dev = Kokkos::Device<Exec, $3>;
using V   = Kokkos::View<float**, Kokkos::LayoutLeft, Dev>;
using CU  = Kokkos::View<const float**, Kokkos::LayoutLeft, Dev, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
using MU  = Kokkos::View<float**, Kokkos::LayoutLeft, Dev, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
// Kokkos Kernels 4 added the execution space as the first parameter.
#if KOKKOS_VERSION >= 40000
static_assert(KokkosBlas::Impl::gemm_tpl_spec_avail<Exec, CU, CU, MU>::value,
              "KokkosBlas::gemm would not use the BLAS TPL");
#else
static_assert(KokkosBlas::Impl::gemm_tpl_spec_avail<CU, CU, MU>::value,
              "KokkosBlas::gemm would not use the BLAS TPL");
#endif
int main(int argc, char** argv) {
  Kokkos::initialize(argc, argv);
  int rc = 0;
  {
    const int n = 64;
    V A("A", n, n), B("B", n, n), C("C", n, n);
    Kokkos::deep_copy(A, 1.0f); Kokkos::deep_copy(B, 2.0f);
    KokkosBlas::gemm("N", "N", 1.0f, A, B, 0.0f, C);
    auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), C);
    rc = (h(3, 5) == 2.0f * n) ? 0 : 1;
    std::printf("smoke gemm: C(3,5)=%g (expect %d) %s\n", double(h(3, 5)), 2 * n, rc ? "FAIL" : "ok");
  }
  Kokkos::finalize();
  return rc;
}
EOF
}

verify_openmp() {
  log "smoke test: KokkosBlas::gemm on OpenMP via OpenBLAS-openmp ... [$(elapsed)]"
  [ -f "$P_OMP/lib/cmake/KokkosKernels/KokkosKernelsConfig.cmake" ] \
    || die "no Kokkos Kernels in $P_OMP (run tools/setup.sh)"
  local d="$BLD/smoke-openmp" libs
  rm -rf "$d"; write_smoke "$d" Kokkos::OpenMP Kokkos::HostSpace
  if ! { cmake -S "$d" -B "$d/b" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$P_OMP" \
           "${CCACHE_LAUNCHER[@]}" && cmake --build "$d/b"; } >"$d/log" 2>&1; then
    tail -n 40 "$d/log" >&2; die "OpenMP smoke test failed to build (log: $d/log)"
  fi
  OMP_PROC_BIND=false "$d/b/smoke" --kokkos-threads=2 2>&1 | sed 's/^/[setup]   /' \
    || die "OpenMP smoke test failed"
  # Captured whole, then searched: under pipefail `ldd x | grep -q y` fails at random, since
  # grep exits at its first match and ldd may then die of SIGPIPE (a fresh machine's first
  # run failed that way).
  libs=$(ldd "$d/b/smoke")
  if [[ "$libs" != *openblas-openmp/libopenblas* ]]; then
    printf '%s\n' "$libs" >&2
    die "smoke test does not load the OpenMP variant of OpenBLAS at run time"
  fi
  rm -rf "$d"
}

verify_cuda() {
  log "smoke test: compile+link KokkosBlas::gemm for CUDA (cuBLAS) ... [$(elapsed)]"
  [ -x "$P_CUDA/bin/nvcc_wrapper" ] || die "no CUDA Kokkos in $P_CUDA (run tools/setup.sh --cuda)"
  local d="$BLD/smoke-cuda" libs
  rm -rf "$d"; write_smoke "$d" Kokkos::Cuda Kokkos::CudaSpace
  if ! { cmake -S "$d" -B "$d/b" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$P_CUDA" \
           -DCMAKE_CXX_COMPILER="$P_CUDA/bin/nvcc_wrapper" && cmake --build "$d/b"; } >"$d/log" 2>&1; then
    tail -n 40 "$d/log" >&2; die "CUDA smoke test failed to build (log: $d/log)"
  fi
  libs=$(ldd "$d/b/smoke")   # captured, then searched (see verify_openmp)
  [[ "$libs" == *libcublas* ]] || die "CUDA smoke test is not linked against cuBLAS"
  if nvidia-smi -L >/dev/null 2>&1; then
    "$d/b/smoke" 2>&1 | sed 's/^/[setup]   /' || die "CUDA smoke test failed"
  else
    log "  built and linked OK (no GPU here: not run)"
  fi
  rm -rf "$d"
}

if [ "$VERIFY_ONLY" = 1 ]; then
  use_ccache_if_present
  verify_openmp
  if [ "$WANT_CUDA" = 1 ]; then
    export PATH="$CUDA_HOME/bin:$PATH"
    export NVCC_WRAPPER_DEFAULT_COMPILER="${NVCC_WRAPPER_DEFAULT_COMPILER:-g++}"
    verify_cuda
  fi
  log "verified in $(elapsed)"
  exit 0
fi

# ----------------------------------------------------------------------------
# 1. Debian packages + deb-src entries
# ----------------------------------------------------------------------------
APT_UPDATED=0
apt_update_once() {
  if [ "$APT_UPDATED" = 0 ]; then
    log "apt-get update..."
    as_root apt-get update -q >/dev/null || as_root apt-get update
    APT_UPDATED=1
  fi
}

# Source-only entries. deb-src never changes which *binary* packages apt sees,
# so the trixie line cannot make apt upgrade bookworm binaries.
SOURCES_FILE=/etc/apt/sources.list.d/kmoe-deb-src.sources
SOURCES_CONTENT='# Added by kmoe tools/setup.sh: SOURCE packages only (deb-src), used to build
# Kokkos/KokkosKernels (bookworm trilinos) and Catch2 (trixie catch2).
# Never add a binary "deb" line for trixie here.
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg'

write_deb_src() {
  if [ ! -f "$SOURCES_FILE" ] || [ "$(cat "$SOURCES_FILE")" != "$SOURCES_CONTENT" ]; then
    log "adding deb-src entries (bookworm, trixie) in $SOURCES_FILE"
    printf '%s\n' "$SOURCES_CONTENT" | as_root tee "$SOURCES_FILE" >/dev/null
    APT_UPDATED=0
  fi
}
ensure_deb_src() { write_deb_src; apt_update_once; }

is_installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = "installed" ]
}

sha256_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }
trilinos_cached() { sha256_ok "$DL/$TRILINOS_ORIG" "$TRILINOS_ORIG_SHA256"; }
catch2_cached() {
  local e; [ -f "$DL/$CATCH2_DSC" ] || return 1
  for e in "${CATCH2_FILES[@]}"; do sha256_ok "$DL/${e% *}" "${e#* }" || return 1; done
}
NEED_SRC=0
{ trilinos_cached && catch2_cached; } || NEED_SRC=1

missing=()
for p in "${DEB_PACKAGES[@]}"; do is_installed "$p" || missing+=("$p"); done
# Write the deb-src entries before the first apt-get update so one update serves all.
[ "$NEED_SRC" = 1 ] && write_deb_src
if [ "${#missing[@]}" -gt 0 ]; then
  apt_update_once
  log "apt-get install ${missing[*]}"
  as_root apt-get install "${APT_OPTS[@]}" --no-install-recommends "${missing[@]}"
else
  log "Debian packages: all present"
fi

MULTIARCH="$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch)"
OPENBLAS_OMP_DIR="/usr/lib/$MULTIARCH/openblas-openmp"
[ -e "$OPENBLAS_OMP_DIR/libopenblas.so" ] || die "missing $OPENBLAS_OMP_DIR/libopenblas.so (libopenblas-openmp-dev)"

# Fallback when apt cannot provide the source package any more: fetch the pool
# files directly (deb.debian.org pool, then snapshot.debian.org), checked
# against pinned SHA-256 sums.
fetch_pool() {  # fetch_pool <pool-subdir> <file> <sha256>
  local sub="$1" f="$2" sum="$3" url
  for url in "http://deb.debian.org/debian/pool/main/$sub/$f" \
             "http://snapshot.debian.org/archive/debian/20250520T000000Z/pool/main/$sub/$f"; do
    log "  fallback download $url"
    if python3 - "$url" "$DL/$f.part" <<'EOF'
import sys, urllib.request, shutil
with urllib.request.urlopen(sys.argv[1], timeout=120) as r, open(sys.argv[2], "wb") as o:
    shutil.copyfileobj(r, o)
EOF
    then
      if [ -z "$sum" ] || sha256_ok "$DL/$f.part" "$sum"; then mv "$DL/$f.part" "$DL/$f"; return 0; fi
      log "  checksum mismatch for $f"
    fi
    rm -f "$DL/$f.part"
  done
  return 1
}

# apt-get source as root would warn about the _apt sandbox; run unsandboxed.
apt_source() { (cd "$DL" && apt-get -q -o APT::Sandbox::User=root source --download-only "$@"); }

# ----------------------------------------------------------------------------
# 2. source downloads (kept in $DL forever)
# ----------------------------------------------------------------------------
if [ "$NEED_SRC" = 1 ] && ! trilinos_cached; then
  log "downloading Debian source package $TRILINOS_SRC (~165 MB, once)..."
  ensure_deb_src
  apt_source "$TRILINOS_SRC" || fetch_pool t/trilinos "$TRILINOS_ORIG" "$TRILINOS_ORIG_SHA256" \
    || die "could not download $TRILINOS_ORIG"
  sha256_ok "$DL/$TRILINOS_ORIG" "$TRILINOS_ORIG_SHA256" || die "bad checksum: $DL/$TRILINOS_ORIG"
else
  log "trilinos source: cached ($DL/$TRILINOS_ORIG)"
fi

if [ "$NEED_SRC" = 1 ] && ! catch2_cached; then
  log "downloading Debian source package catch2=$CATCH2_DEBVER (trixie)..."
  ensure_deb_src
  if ! apt_source "catch2=$CATCH2_DEBVER"; then
    fetch_pool c/catch2 "$CATCH2_DSC" "" || true   # dsc: no pinned sum, optional
    for e in "${CATCH2_FILES[@]}"; do fetch_pool c/catch2 "${e% *}" "${e#* }" || die "could not download ${e% *}"; done
  fi
  catch2_cached || die "catch2 source incomplete in $DL"
else
  log "catch2 source: cached"
fi

# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
use_ccache_if_present
first_line() { local out; out=$("$@"); printf '%s' "${out%%$'\n'*}"; }
CXX_ID="$(first_line "${CXX:-g++}" --version); $(first_line cmake --version)"

hash_of() { printf '%s\n' "$@" | sha256sum | cut -c1-16; }
stamp_ok() { [ -f "$STAMPS/$1.stamp" ] && [ "$(cat "$STAMPS/$1.stamp")" = "$2" ]; }
stamp_set() { printf '%s\n' "$2" > "$STAMPS/$1.stamp"; }

cmake_build_install() {  # <srcdir> <builddir> <logname> cmake-args...
  local src="$1" bld="$2" name="$3"; shift 3
  rm -rf "$bld"; mkdir -p "$bld"
  local lg="$BLD/$name.log"
  if ! { cmake -S "$src" -B "$bld" -G Ninja "$@" && \
         cmake --build "$bld" -j "$JOBS" && \
         cmake --install "$bld"; } >"$lg" 2>&1; then
    tail -n 60 "$lg" >&2
    die "$name failed; full log: $lg"
  fi
  [ "${KMOE_KEEP_BUILD:-0}" = 1 ] || rm -rf "$bld"
}

# ----------------------------------------------------------------------------
# 3a. extract packages/kokkos + packages/kokkos-kernels (pristine)
# ----------------------------------------------------------------------------
KSRC="$SRC/trilinos-13.2.0"        # pristine: used by the OpenMP build
H_EXTRACT=$(hash_of extract-v1 "$TRILINOS_ORIG_SHA256")
if ! stamp_ok extract-trilinos "$H_EXTRACT" || [ ! -f "$KSRC/packages/kokkos/CMakeLists.txt" ]; then
  log "extracting packages/kokkos and packages/kokkos-kernels from $TRILINOS_ORIG..."
  rm -rf "$KSRC"; mkdir -p "$KSRC"
  tar -xzf "$DL/$TRILINOS_ORIG" -C "$KSRC" --strip-components=1 --wildcards \
      '*/packages/kokkos/*' '*/packages/kokkos-kernels/*'
  grep -q "$KOKKOS_VERSION\|3 4 01\|MINOR 4" "$KSRC/packages/kokkos/CMakeLists.txt" \
    || log "warning: could not confirm Kokkos version $KOKKOS_VERSION"
  stamp_set extract-trilinos "$H_EXTRACT"
fi

# ----------------------------------------------------------------------------
# 3b. Kokkos (OpenMP + Serial) + Kokkos Kernels -> $P_OMP
# ----------------------------------------------------------------------------
COMMON_CMAKE=(
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_STANDARD=17 -DCMAKE_CXX_EXTENSIONS=OFF
  -DBUILD_SHARED_LIBS=OFF -DCMAKE_POSITION_INDEPENDENT_CODE=ON
  -DCMAKE_INSTALL_LIBDIR=lib
)
KK_NO_ETI=(
  -DKokkosKernels_ADD_DEFAULT_ETI=OFF
  -DKokkosKernels_INST_DOUBLE=OFF -DKokkosKernels_INST_FLOAT=OFF
  -DKokkosKernels_INST_COMPLEX_DOUBLE=OFF -DKokkosKernels_INST_COMPLEX_FLOAT=OFF
  -DKokkosKernels_INST_ORDINAL_INT=OFF -DKokkosKernels_INST_ORDINAL_INT64_T=OFF
  -DKokkosKernels_INST_OFFSET_INT=OFF -DKokkosKernels_INST_OFFSET_SIZE_T=OFF
  -DKokkosKernels_INST_LAYOUTLEFT=OFF -DKokkosKernels_INST_LAYOUTRIGHT=OFF
  -DKokkosKernels_INST_EXECSPACE_OPENMP=OFF -DKokkosKernels_INST_EXECSPACE_SERIAL=OFF
  -DKokkosKernels_INST_EXECSPACE_THREADS=OFF -DKokkosKernels_INST_EXECSPACE_CUDA=OFF
  -DKokkosKernels_INST_MEMSPACE_HOSTSPACE=OFF -DKokkosKernels_INST_MEMSPACE_HBWSPACE=OFF
  -DKokkosKernels_INST_MEMSPACE_CUDASPACE=OFF -DKokkosKernels_INST_MEMSPACE_CUDAUVMSPACE=OFF
  -DKokkosKernels_ENABLE_TESTS=OFF -DKokkosKernels_ENABLE_EXAMPLES=OFF
  "-DKokkosKernels_ENABLED_COMPONENTS=BLAS;BATCHED"
)

KOKKOS_OMP_ARGS=(
  "${COMMON_CMAKE[@]}" "${CCACHE_LAUNCHER[@]}" -DCMAKE_INSTALL_PREFIX="$P_OMP"
  -DKokkos_ENABLE_OPENMP=ON -DKokkos_ENABLE_SERIAL=ON
  -DKokkos_ENABLE_TESTS=OFF -DKokkos_ENABLE_EXAMPLES=OFF
)
H_KOKKOS_OMP=$(hash_of kokkos-omp "$H_EXTRACT" "$CXX_ID" "${KOKKOS_OMP_ARGS[@]}")
KK_OMP_ARGS=(
  "${COMMON_CMAKE[@]}" "${CCACHE_LAUNCHER[@]}" -DCMAKE_INSTALL_PREFIX="$P_OMP"
  -DCMAKE_PREFIX_PATH="$P_OMP"
  -DKokkosKernels_ENABLE_TPL_BLAS=ON
  -DBLAS_LIBRARIES=openblas -DBLAS_LIBRARY_DIRS="$OPENBLAS_OMP_DIR"
  -DKokkosKernels_ENABLE_TPL_LAPACK=OFF -DKokkosKernels_ENABLE_TPL_CBLAS=OFF
  -DKokkosKernels_ENABLE_TPL_MKL=OFF
  "${KK_NO_ETI[@]}"
)
H_KK_OMP=$(hash_of kk-omp "$H_KOKKOS_OMP" "${KK_OMP_ARGS[@]}")

BUILT_SOMETHING=0
if ! stamp_ok kokkos-openmp "$H_KOKKOS_OMP" || [ ! -f "$P_OMP/lib/cmake/Kokkos/KokkosConfig.cmake" ]; then
  log "building Kokkos $KOKKOS_VERSION (OpenMP+Serial) -> $P_OMP ... [$(elapsed)]"
  rm -f "$STAMPS/kokkos-openmp.stamp" "$STAMPS/kk-openmp.stamp" "$STAMPS/verify-openmp.stamp"
  rm -rf "$P_OMP"
  cmake_build_install "$KSRC/packages/kokkos" "$BLD/kokkos-openmp" kokkos-openmp "${KOKKOS_OMP_ARGS[@]}"
  stamp_set kokkos-openmp "$H_KOKKOS_OMP"; BUILT_SOMETHING=1
  log "  done [$(elapsed)]"
else
  log "Kokkos (OpenMP+Serial): up to date"
fi
if ! stamp_ok kk-openmp "$H_KK_OMP" || [ ! -f "$P_OMP/lib/cmake/KokkosKernels/KokkosKernelsConfig.cmake" ]; then
  log "building Kokkos Kernels $KOKKOS_VERSION (BLAS TPL=OpenBLAS-openmp, no ETI) -> $P_OMP ... [$(elapsed)]"
  rm -f "$STAMPS/kk-openmp.stamp" "$STAMPS/verify-openmp.stamp"
  rm -rf "$P_OMP/lib/cmake/KokkosKernels"
  cmake_build_install "$KSRC/packages/kokkos-kernels" "$BLD/kk-openmp" kk-openmp "${KK_OMP_ARGS[@]}"
  stamp_set kk-openmp "$H_KK_OMP"; BUILT_SOMETHING=1
  log "  done [$(elapsed)]"
else
  log "Kokkos Kernels (OpenMP): up to date"
fi

# ----------------------------------------------------------------------------
# 3c. Catch2 -> $P_CATCH
# ----------------------------------------------------------------------------
CATCH_ARGS=(
  "${COMMON_CMAKE[@]}" "${CCACHE_LAUNCHER[@]}" -DCMAKE_INSTALL_PREFIX="$P_CATCH"
  -DBUILD_TESTING=OFF -DCATCH_BUILD_TESTING=OFF -DCATCH_INSTALL_DOCS=OFF
  -DCATCH_INSTALL_EXTRAS=ON
)
H_CATCH=$(hash_of catch2 "$CATCH2_DEBVER" "${CATCH2_FILES[@]}" "$CXX_ID" "${CATCH_ARGS[@]}")
if ! stamp_ok catch2 "$H_CATCH" || [ ! -f "$P_CATCH/lib/cmake/Catch2/Catch2Config.cmake" ]; then
  log "building Catch2 $CATCH2_DEBVER -> $P_CATCH ... [$(elapsed)]"
  rm -f "$STAMPS/catch2.stamp"; rm -rf "$P_CATCH" "$SRC/catch2"
  # dpkg-source applies the Debian patches; the .dsc signature is unchecked
  # (no keyring needed) but the file checksums are.
  dpkg-source --no-copy -x "$DL/$CATCH2_DSC" "$SRC/catch2" >"$BLD/catch2-extract.log" 2>&1 \
    || { cat "$BLD/catch2-extract.log" >&2; die "dpkg-source -x catch2 failed"; }
  cmake_build_install "$SRC/catch2" "$BLD/catch2" catch2 "${CATCH_ARGS[@]}"
  rm -rf "$SRC/catch2"
  stamp_set catch2 "$H_CATCH"; BUILT_SOMETHING=1
  log "  done [$(elapsed)]"
else
  log "Catch2: up to date"
fi

# ----------------------------------------------------------------------------
# 3d. (optional) Kokkos + Kokkos Kernels for CUDA -> $P_CUDA
# ----------------------------------------------------------------------------
if [ "$WANT_CUDA" = 1 ]; then
  [ -x "$CUDA_HOME/bin/nvcc" ] || die "--cuda: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"
  export PATH="$CUDA_HOME/bin:$PATH"
  # Kokkos 3.4 predates Hopper: sm_90 (and sm_80) -> AMPERE80. nvcc -arch=sm_80
  # embeds sm_80 SASS + compute_80 PTX, which the driver JIT-compiles on H100.
  case "$CUDA_ARCH" in
    sm_90|sm_90a|sm_89|sm_80) KOKKOS_CUDA_ARCH=AMPERE80 ;;
    sm_86|sm_87)              KOKKOS_CUDA_ARCH=AMPERE86 ;;
    sm_75)                    KOKKOS_CUDA_ARCH=TURING75 ;;
    sm_70)                    KOKKOS_CUDA_ARCH=VOLTA70 ;;
    *) die "unsupported --cuda-arch=$CUDA_ARCH (Kokkos 3.4 + CUDA 13: sm_75..sm_90)" ;;
  esac
  NVCC_ID="$("$CUDA_HOME/bin/nvcc" --version | tail -1)"
  CSRC="$SRC/trilinos-13.2.0-cuda"   # patched copy, separate from the OpenMP sources
  H_CSRC=$(hash_of cuda-src "$H_EXTRACT" "$CUDA_PATCH_REV")
  if ! stamp_ok cuda-src "$H_CSRC" || [ ! -f "$CSRC/packages/kokkos/CMakeLists.txt" ]; then
    log "preparing CUDA-13-patched Kokkos sources in $CSRC ..."
    rm -rf "$CSRC"; mkdir -p "$CSRC"
    cp -a "$KSRC/packages" "$CSRC/"
    K="$CSRC/packages/kokkos"
    # (a) native __half conversions do not compile with CUDA 13: disable the
    #     Cuda half_t block so Kokkos_Half.hpp falls back to its generic half_t.
    sed -i 's|^#ifdef KOKKOS_ENABLE_CUDA$|#if defined(KOKKOS_ENABLE_CUDA) \&\& 0 /* kmoe: disabled for CUDA 13 */|' \
      "$K/core/src/Cuda/Kokkos_Cuda_Half.hpp"
    grep -q 'kmoe: disabled for CUDA 13' "$K/core/src/Cuda/Kokkos_Cuda_Half.hpp" || die "patch (a) failed"
    # (b) CUDA 13: cudaMemPrefetchAsync(ptr, bytes, cudaMemLocation, flags, stream)
    perl -0pi -e 's|CUDA_SAFE_CALL\(cudaMemPrefetchAsync\(ptr, bytes, space\.cuda_device\(\),\s*space\.cuda_stream\(\)\)\);|#if defined(CUDART_VERSION) && CUDART_VERSION >= 13000 /* kmoe */\n    cudaMemLocation kmoe_loc{};\n    kmoe_loc.type = cudaMemLocationTypeDevice;\n    kmoe_loc.id   = space.cuda_device();\n    CUDA_SAFE_CALL(cudaMemPrefetchAsync(ptr, bytes, kmoe_loc, 0, space.cuda_stream()));\n#else\n    CUDA_SAFE_CALL(cudaMemPrefetchAsync(ptr, bytes, space.cuda_device(), space.cuda_stream()));\n#endif|' \
      "$K/core/src/Cuda/Kokkos_CudaSpace.cpp"
    grep -q 'kmoe_loc' "$K/core/src/Cuda/Kokkos_CudaSpace.cpp" || die "patch (b) failed"
    # (c) nvcc_wrapper's default arch sm_35 is rejected by CUDA 13.
    sed -i 's|^default_arch="sm_35"|default_arch="sm_80"|' "$K/bin/nvcc_wrapper"
    grep -q '^default_arch="sm_80"' "$K/bin/nvcc_wrapper" || die "patch (c) failed"
    stamp_set cuda-src "$H_CSRC"
  fi
  export NVCC_WRAPPER_DEFAULT_COMPILER="${NVCC_WRAPPER_DEFAULT_COMPILER:-g++}"
  # No ccache here: it does not handle nvcc_wrapper reliably.
  KOKKOS_CUDA_ARGS=(
    "${COMMON_CMAKE[@]}" -DCMAKE_INSTALL_PREFIX="$P_CUDA"
    -DCMAKE_CXX_COMPILER="$CSRC/packages/kokkos/bin/nvcc_wrapper"
    -DKokkos_ENABLE_CUDA=ON -DKokkos_ENABLE_SERIAL=ON -DKokkos_ENABLE_OPENMP=OFF
    -DKokkos_ENABLE_CUDA_LAMBDA=ON "-DKokkos_ARCH_${KOKKOS_CUDA_ARCH}=ON"
    -DKokkos_ENABLE_TESTS=OFF -DKokkos_ENABLE_EXAMPLES=OFF
  )
  H_KOKKOS_CUDA=$(hash_of kokkos-cuda "$H_CSRC" "$CXX_ID" "$NVCC_ID" "${KOKKOS_CUDA_ARGS[@]}")
  KK_CUDA_ARGS=(
    "${COMMON_CMAKE[@]}" -DCMAKE_INSTALL_PREFIX="$P_CUDA" -DCMAKE_PREFIX_PATH="$P_CUDA"
    -DCMAKE_CXX_COMPILER="$P_CUDA/bin/nvcc_wrapper"
    -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME"
    -DKokkosKernels_ENABLE_TPL_CUBLAS=ON -DKokkosKernels_ENABLE_TPL_CUSPARSE=OFF
    -DKokkosKernels_ENABLE_TPL_BLAS=OFF -DKokkosKernels_ENABLE_TPL_LAPACK=OFF
    "${KK_NO_ETI[@]}"
  )
  H_KK_CUDA=$(hash_of kk-cuda "$H_KOKKOS_CUDA" "${KK_CUDA_ARGS[@]}")

  if ! stamp_ok kokkos-cuda "$H_KOKKOS_CUDA" || [ ! -f "$P_CUDA/lib/cmake/Kokkos/KokkosConfig.cmake" ]; then
    log "building Kokkos $KOKKOS_VERSION (Cuda $CUDA_ARCH->Kokkos_ARCH_$KOKKOS_CUDA_ARCH + Serial) -> $P_CUDA ... [$(elapsed)]"
    rm -f "$STAMPS/kokkos-cuda.stamp" "$STAMPS/kk-cuda.stamp" "$STAMPS/verify-cuda.stamp"
    rm -rf "$P_CUDA"
    cmake_build_install "$CSRC/packages/kokkos" "$BLD/kokkos-cuda" kokkos-cuda "${KOKKOS_CUDA_ARGS[@]}"
    [ -x "$P_CUDA/bin/nvcc_wrapper" ] || die "nvcc_wrapper was not installed into $P_CUDA/bin"
    stamp_set kokkos-cuda "$H_KOKKOS_CUDA"; BUILT_SOMETHING=1
    log "  done [$(elapsed)]"
  else
    log "Kokkos (Cuda+Serial): up to date"
  fi
  if ! stamp_ok kk-cuda "$H_KK_CUDA" || [ ! -f "$P_CUDA/lib/cmake/KokkosKernels/KokkosKernelsConfig.cmake" ]; then
    log "building Kokkos Kernels $KOKKOS_VERSION (cuBLAS TPL, no ETI) -> $P_CUDA ... [$(elapsed)]"
    rm -f "$STAMPS/kk-cuda.stamp" "$STAMPS/verify-cuda.stamp"
    cmake_build_install "$CSRC/packages/kokkos-kernels" "$BLD/kk-cuda" kk-cuda "${KK_CUDA_ARGS[@]}"
    stamp_set kk-cuda "$H_KK_CUDA"; BUILT_SOMETHING=1
    log "  done [$(elapsed)]"
  else
    log "Kokkos Kernels (Cuda): up to date"
  fi
fi

# ----------------------------------------------------------------------------
# 3e. smoke tests (only after a (re)build: stamp-guarded too; --verify-only runs them always)
# ----------------------------------------------------------------------------
if [ "$VERIFY" = 1 ]; then
  H_VER_OMP=$(hash_of verify-omp-v2 "$H_KK_OMP")
  if ! stamp_ok verify-openmp "$H_VER_OMP"; then
    verify_openmp; stamp_set verify-openmp "$H_VER_OMP"
  fi
  if [ "$WANT_CUDA" = 1 ]; then
    H_VER_CUDA=$(hash_of verify-cuda-v2 "$H_KK_CUDA")
    if ! stamp_ok verify-cuda "$H_VER_CUDA"; then
      verify_cuda; stamp_set verify-cuda "$H_VER_CUDA"
    fi
  fi
fi

# ----------------------------------------------------------------------------
# 4. env.sh
# ----------------------------------------------------------------------------
ENV_SH="$KMOE_DEPS/env.sh"
ENV_CONTENT="# generated by kmoe tools/setup.sh -- source this file
export KMOE_DEPS=\"$KMOE_DEPS\"
export CMAKE_PREFIX_PATH=\"$P_OMP:$P_CATCH\${CMAKE_PREFIX_PATH:+:\$CMAKE_PREFIX_PATH}\""
if [ -f "$P_CUDA/lib/cmake/Kokkos/KokkosConfig.cmake" ]; then
  ENV_CONTENT="$ENV_CONTENT
# CUDA build (tools/setup.sh --cuda): configure with
#   -DCMAKE_PREFIX_PATH=\$KMOE_KOKKOS_CUDA_PREFIX:$P_CATCH -DCMAKE_CXX_COMPILER=\$KMOE_KOKKOS_CUDA_PREFIX/bin/nvcc_wrapper
export KMOE_KOKKOS_CUDA_PREFIX=\"$P_CUDA\""
fi
if [ ! -f "$ENV_SH" ] || [ "$(cat "$ENV_SH")" != "$ENV_CONTENT" ]; then
  printf '%s\n' "$ENV_CONTENT" > "$ENV_SH"
fi

log "done in $(elapsed) ($([ "$BUILT_SOMETHING" = 1 ] && echo "built" || echo "nothing to rebuild"))"
log "  Kokkos+KokkosKernels (OpenMP+Serial): $P_OMP"
log "  Catch2:                               $P_CATCH"
[ "$WANT_CUDA" = 1 ] && log "  Kokkos+KokkosKernels (Cuda+Serial):   $P_CUDA (CXX=$P_CUDA/bin/nvcc_wrapper)"
log "  env: source $ENV_SH"
exit 0
