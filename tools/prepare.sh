# SPDX-License-Identifier: BSD-3-Clause
# Sourced by the tools/*.sh entry points: from the repository root, installs/caches the
# dependencies (tools/setup.sh), loads their environment and points ccache at its cache.
bash tools/setup.sh
source "${KMOE_DEPS:-$HOME/.cache/kmoe-deps}/env.sh"
export CCACHE_DIR="${CCACHE_DIR:-$KMOE_DEPS/ccache}"
# Paths relative to the checkout in the cache keys: a fresh clone elsewhere still hits.
export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=true
