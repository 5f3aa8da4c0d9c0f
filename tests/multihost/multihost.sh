#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# A real multi-host run on one machine: N network namespaces ("hosts") joined by veth links
# to a bridge (itself in a namespace of its own), private addresses 10.77.0.10+i/24 made
# here, Open MPI started across them over TCP (btl tcp,self; the out-of-band channel on the
# same links) with a launch agent that enters a host's namespace where ssh would log in.
# Runs the MPI layer tests and ep_bench there, and reports each step's wall time and the
# bytes that crossed the hosts' links (tx_bytes of every host's veth, before and after).
# Nothing outside the namespaces is touched; they are removed on exit, failure or signal.
#
#   multihost.sh --mpirun PATH [--node-probe PATH] [--layer-test PATH] [--layer-filter TAGS]
#                [--bench PATH]
#                [--exchange flat|hierarchical] [--hosts N] [--ranks-per-host R]
#                [--layer-ranks-per-host R] [--bench-tokens T] [--extra-host ADDRESS]
#                [--step-timeout SECONDS]
#                [--pipeline-bench PATH] [--pipeline-ranks-per-host "R ..."]
#                [--pipeline-args "ARGS"] [--rate MBIT]
#
# The layer tests run with --layer-ranks-per-host ranks per host (1: every EP/TP/DP layout
# of --hosts ranks, each rank alone on its host so that every exchange crosses a link),
# ep_bench with --ranks-per-host (2: traffic within and between hosts).
#
# Exit status: 0 every step passed; 1 a step failed, timed out, or a host is unreachable
# (named on stderr); 77 this machine cannot make network namespaces (not root, no `ip` or
# `unshare`).
# --pipeline-bench runs bench/pipeline_bench (pipelined against sequential exchange) once per
# value of --pipeline-ranks-per-host (default "1": one rank per host, every exchange across
# a link), with --pipeline-args. --rate MBIT shapes each host's link for that step alone
# (a token bucket, `tc qdisc ... tbf`, on every host's egress: MBIT Mbit/s each way), so
# that the wire, not the machine's memory, sets the exchange's time while the kernel moves
# the bytes and the ranks' CPUs are free; the other steps run unshaped.
# MULTIHOST_KEEP_LOG=FILE in the environment keeps the full log of each step there (every
# step overwrites it; the printed summary keeps only its last lines).
# --extra-host adds a host by address only (no namespace holds it unless it is one of ours):
# the reachability check names it and exits 1 within about 10 s.
set -u

mpirun=""
node_probe=""
layer_test=""
layer_filter="[mpi]~[replicas]"
bench=""
exchange="flat"
hosts=2
ranks_per_host=2
layer_ranks_per_host=1
bench_tokens=64
extra_host=""
step_timeout=120
pipeline_bench=""
pipeline_ranks_per_host="1"
pipeline_args=""
rate=""

die() {
  echo "multihost: $*" >&2
  exit 1
}

while [ $# -gt 0 ]; do
  case "$1" in
    --mpirun) mpirun=$2 ;;
    --node-probe) node_probe=$2 ;;
    --layer-test) layer_test=$2 ;;
    --layer-filter) layer_filter=$2 ;;
    --bench) bench=$2 ;;
    --exchange) exchange=$2 ;;
    --hosts) hosts=$2 ;;
    --ranks-per-host) ranks_per_host=$2 ;;
    --layer-ranks-per-host) layer_ranks_per_host=$2 ;;
    --bench-tokens) bench_tokens=$2 ;;
    --extra-host) extra_host=$2 ;;
    --step-timeout) step_timeout=$2 ;;
    --pipeline-bench) pipeline_bench=$2 ;;
    --pipeline-ranks-per-host) pipeline_ranks_per_host=$2 ;;
    --pipeline-args) pipeline_args=$2 ;;
    --rate) rate=$2 ;;
    *) die "unknown argument '$1'" ;;
  esac
  shift 2 || die "argument '$1' needs a value"
done

[ -n "$mpirun" ] || die "--mpirun is required"
case "$exchange" in flat | hierarchical) ;; *) die "--exchange must be flat or hierarchical, not '$exchange'" ;; esac
case "$hosts" in '' | *[!0-9]*) die "--hosts must be a positive integer, not '$hosts'" ;; esac
case "$ranks_per_host" in '' | *[!0-9]*) die "--ranks-per-host must be a positive integer, not '$ranks_per_host'" ;; esac
{ [ "$hosts" -ge 2 ] && [ "$hosts" -le 200 ]; } || die "--hosts must be in [2, 200], not $hosts"
[ "$ranks_per_host" -ge 1 ] || die "--ranks-per-host must be >= 1, not $ranks_per_host"
case "$rate" in *[!0-9]*) die "--rate must be a positive integer (Mbit/s), not '$rate'" ;; esac
[ "$rate" != 0 ] || die "--rate must be a positive integer (Mbit/s), not 0"
for r in $pipeline_ranks_per_host; do
  case "$r" in '' | *[!0-9]* | 0) die "--pipeline-ranks-per-host must list positive integers, not '$pipeline_ranks_per_host'" ;; esac
done
case "$layer_ranks_per_host" in '' | *[!0-9]* | 0) die "--layer-ranks-per-host must be a positive integer, not '$layer_ranks_per_host'" ;; esac

if [ "$(id -u)" != 0 ] || ! command -v ip > /dev/null || ! command -v unshare > /dev/null; then
  echo "multihost: skipped: network namespaces need root, iproute2's ip and util-linux's unshare" >&2
  exit 77
fi

# Namespaces of an earlier run that was killed outright (SIGKILL leaves no trap to run):
# kmoe_mh<pid>_* whose script is gone.
for ns in $(timeout 10 ip netns list | awk '{print $1}' | grep -E '^kmoe_mh[0-9]+_'); do
  owner=${ns#kmoe_mh}
  owner=${owner%%_*}
  kill -0 "$owner" 2> /dev/null && continue
  for pid in $(timeout 10 ip netns pids "$ns" 2> /dev/null); do kill -9 "$pid" 2> /dev/null; done
  timeout 10 ip netns del "$ns" 2> /dev/null && echo "multihost: removed $ns, left by a killed run"
done

prefix="kmoe_mh$$"
bridge_ns="${prefix}_br"
workdir=$(mktemp -d "${TMPDIR:-/tmp}/kmoe-multihost.XXXXXX")
namespaces=()

cleanup() {
  local ns pid
  for ns in "${namespaces[@]}"; do
    # Processes this script started inside the namespace (a rank left by a killed mpirun).
    for pid in $(timeout 10 ip netns pids "$ns" 2> /dev/null); do kill -9 "$pid" 2> /dev/null; done
    timeout 10 ip netns del "$ns" 2> /dev/null
  done
  rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP

# Every `ip` call is bounded: a wedged netlink call must not hang CI.
run_ip() {
  timeout 10 ip "$@" || die "step 'ip $*' failed"
}

address_of() { echo "10.77.0.$((10 + $1))"; }

echo "multihost: $hosts hosts x $ranks_per_host ranks, exchange $exchange, namespaces ${prefix}_*"
run_ip netns add "$bridge_ns"
namespaces+=("$bridge_ns")
run_ip -n "$bridge_ns" link add kmoebr type bridge
run_ip -n "$bridge_ns" link set kmoebr up
for ((i = 0; i < hosts; ++i)); do
  ns="${prefix}_h$i"
  run_ip netns add "$ns"
  namespaces+=("$ns")
  # Created inside the bridge's namespace with its peer moved straight into the host's:
  # no interface ever appears in the machine's own namespace.
  run_ip -n "$bridge_ns" link add "port$i" type veth peer name kmoe0 netns "$ns"
  run_ip -n "$bridge_ns" link set "port$i" master kmoebr
  run_ip -n "$bridge_ns" link set "port$i" up
  run_ip -n "$ns" addr add "$(address_of "$i")/24" dev kmoe0
  run_ip -n "$ns" link set kmoe0 up
  run_ip -n "$ns" link set lo up
done

# Each host also gets a host name of its own (a UTS namespace, `unshare --uts`): Open MPI
# tells nodes apart by the names its daemons report, and with the machine's one name for
# every host MPI_COMM_TYPE_SHARED grouped ranks of different hosts together (and crashed).
#
# The launch agent: Open MPI runs `<agent> <host> <orted command line>` where it would run
# ssh; this one enters the namespaces of the host holding that address and runs the line
# with sh, as sshd would.
agent="$workdir/netns_agent.sh"
{
  echo '#!/usr/bin/env bash'
  echo 'while [ "${1#-}" != "$1" ]; do shift; done  # ssh-style options, if any'
  echo 'host=$1; shift'
  echo 'case "$host" in'
  for ((i = 0; i < hosts; ++i)); do
    echo "  $(address_of "$i")) ns=${prefix}_h$i name=kmoe-host$i ;;"
  done
  echo '  *) echo "netns_agent: no namespace holds host $host" >&2; exit 255 ;;'
  echo 'esac'
  echo 'exec ip netns exec "$ns" unshare --uts sh -c "hostname $name && $*"'
} > "$agent"
chmod +x "$agent"

host_list=()
for ((i = 0; i < hosts; ++i)); do host_list+=("$(address_of "$i")"); done
[ -n "$extra_host" ] && host_list+=("$extra_host")
launch_ns="${prefix}_h0"

# Reachability from the launching host: a TCP connection to an unused port is refused at
# once by a live host; an address nobody answers for fails ARP (no route) or times out.
for host in "${host_list[@]:1}"; do
  reply=$(timeout 10 ip netns exec "$launch_ns" timeout 8 bash -c "exec 3<>/dev/tcp/$host/9" 2>&1)
  status=$?
  case "$reply" in
    *"Connection refused"*) ;;
    *)
      [ $status -eq 0 ] && continue
      reason=$(echo "$reply" | sed -n 's/.*: \([^:]*\)$/\1/p' | tail -1)
      die "host $host is unreachable from $(address_of 0) (${reason:-no answer within 8 s})"
      ;;
  esac
done
echo "multihost: every host answers on its link"

tx_total() {
  local total=0 bytes
  for ((i = 0; i < hosts; ++i)); do
    bytes=$(timeout 10 ip netns exec "${prefix}_h$i" cat /sys/class/net/kmoe0/statistics/tx_bytes)
    total=$((total + bytes))
  done
  echo "$total"
}

# host_flag RANKS_PER_HOST: Open MPI's --host list, every host with that many slots.
host_flag() {
  local IFS=,
  echo "${host_list[*]/%/:$1}"
}
# mpi_flags RANKS_PER_HOST: the launch over the hosts' links (yield when idle: ranks share
# the machine's cores, and busy-polling ranks would starve the others).
mpi_flags() {
  echo --allow-run-as-root --oversubscribe --host "$(host_flag "$1")" -np $((${#host_list[@]} * $1)) \
    --mca plm_rsh_agent "$agent" --mca btl tcp,self --mca btl_tcp_if_include kmoe0 \
    --mca oob_tcp_if_include kmoe0 --mca mpi_yield_when_idle 1 \
    -x OMP_NUM_THREADS=1 -x OMP_PROC_BIND=false
}

failed=0
# run_step NAME RANKS_PER_HOST COMMAND...: mpirun in the launching host's namespace,
# bounded; prints the wall time and the bytes that crossed the links. Run in the background
# and waited for, so that a signal reaches the trap at once.
run_step() {
  local name=$1 per_host=$2
  shift 2
  local before after start end status
  before=$(tx_total)
  start=$(date +%s%N)
  # shellcheck disable=SC2046 # mpi_flags' words are split on purpose (no spaces inside).
  timeout --kill-after=5 "$step_timeout" ip netns exec "$launch_ns" unshare --uts \
    sh -c 'hostname kmoe-host0 && exec "$@"' sh \
    "$mpirun" $(mpi_flags "$per_host") "$@" > "$workdir/$name.log" 2>&1 &
  wait $!
  status=$?
  end=$(date +%s%N)
  after=$(tx_total)
  [ -n "${MULTIHOST_KEEP_LOG:-}" ] && cp "$workdir/$name.log" "$MULTIHOST_KEEP_LOG"
  grep -v -e "^Kokkos::OpenMP::initialize WARNING" -e "^  " -e "Detected:" -e "Requested:" \
    "$workdir/$name.log" | tail -n 25
  printf 'multihost: %s (%d hosts x %d ranks): %s s, %d bytes across the hosts'"'"' links (veth tx, all hosts, with TCP/IP headers and launch traffic), exit %d\n' \
    "$name" "${#host_list[@]}" "$per_host" "$(((end - start) / 1000000000)).$(((end - start) / 100000000 % 10))" \
    "$((after - before))" "$status"
  if [ $status -eq 124 ] || [ $status -eq 137 ]; then
    echo "multihost: $name did not finish within $step_timeout s" >&2
    failed=1
  elif [ $status -ne 0 ]; then
    echo "multihost: $name failed (exit $status)" >&2
    failed=1
  fi
}

# shape_links on|off: the token bucket of --rate on every host's egress, or none. The bucket
# holds 10 ms of the rate (at least 256 KiB: veth hands the qdisc segments of up to 64 KiB).
shape_links() {
  local burst=$((rate * 1250)) i
  [ $burst -ge 262144 ] || burst=262144
  for ((i = 0; i < hosts; ++i)); do
    if [ "$1" = on ]; then
      run_ip netns exec "${prefix}_h$i" tc qdisc replace dev kmoe0 root tbf rate "${rate}mbit" \
        burst "$burst" latency 200ms
    else
      run_ip netns exec "${prefix}_h$i" tc qdisc del dev kmoe0 root
    fi
  done
}

# MPI must see the hosts as nodes (node_probe.cpp), as a hierarchical exchange needs.
[ -n "$node_probe" ] && run_step "node_probe" "$ranks_per_host" "$node_probe" "$ranks_per_host"

if [ -n "$layer_test" ]; then
  run_step "layer_tests" "$layer_ranks_per_host" "$layer_test" "$layer_filter"
else
  echo "multihost: no --layer-test given: layer tests skipped"
fi

if [ -n "$bench" ]; then
  bench_args=(--tokens "$bench_tokens" --repeats 2)
  # ep_bench silently ignores flags it does not know, so a flag is passed only where the
  # binary contains it; a hierarchical run without the flag would measure the flat one.
  knows() { grep -a -q -e "$1" "$bench"; }
  if knows --exchange; then
    bench_args+=(--exchange "$exchange")
    knows --ranks-per-node && bench_args+=(--ranks-per-node "$ranks_per_host")
    run_step "ep_bench_$exchange" "$ranks_per_host" "$bench" "${bench_args[@]}"
  elif [ "$exchange" = flat ]; then
    run_step "ep_bench_flat" "$ranks_per_host" "$bench" "${bench_args[@]}"
  else
    echo "multihost: skipped: this ep_bench has no --exchange flag (no hierarchical exchange in this build)"
  fi
else
  echo "multihost: no --bench given: ep_bench skipped"
fi

if [ -n "$pipeline_bench" ]; then
  if [ -n "$rate" ]; then
    command -v tc > /dev/null || die "--rate needs iproute2's tc"
    shape_links on
    echo "multihost: links shaped to $rate Mbit/s each way (tc tbf on every host's egress)"
  fi
  for per_host in $pipeline_ranks_per_host; do
    # shellcheck disable=SC2086 # the bench's arguments are split on purpose.
    run_step "pipeline_bench_${per_host}_per_host" "$per_host" "$pipeline_bench" $pipeline_args
  done
  [ -n "$rate" ] && shape_links off
fi

exit $failed
