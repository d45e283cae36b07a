#!/usr/bin/env bash
# bench/flows-osu.sh PREFIX FROM TO FLOWS PORT MODE: the communicator's striped IP route
# between two namespace hosts of ci/netns/hosts.sh, as a command for bench/flows.sh
# (issue 15). Runs `efa-bench osu-bw` with 4 MiB messages: rank 0 (the sender) in
# PREFIX-FROM, rank 1 (which reads the data) in PREFIX-TO, EFA_IP_FLOWS=FLOWS and
# EFA_IP_STRIPE=MODE (adaptive or equal), and prints the bandwidth in MB/s as its last line.
#
# Every flow is an endpoint listening on a port of its own; libfabric's tcp provider picks
# each at random in FI_TCP_PORT_LOW_RANGE..FI_TCP_PORT_HIGH_RANGE, so the range is exactly
# PORT..PORT+FLOWS-1: each flow then lands in its own class of ci/netns/flowcap.sh, and the
# flow listening on PORT (the one flows.sh throttles) is one of this run's flows.
#
#   bench/flows.sh with
#     FLOWS_CMD='bench/flows-osu.sh {prefix} {from} {to} {flows} {port} adaptive'
#     FLOWS_ADAPTIVE_CMD='bench/flows-osu.sh {prefix} {from} {to} {flows} {port} adaptive'
#     FLOWS_EQUAL_CMD='bench/flows-osu.sh {prefix} {from} {to} {flows} {port} equal'
#
# EFA_BENCH names the efa-bench binary (default target/release/efa-bench); ITERS (3) windows
# of WINDOW (16) messages are timed. Needs root (ip netns exec).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 6 ] || { echo "usage: $0 PREFIX FROM TO FLOWS PORT adaptive|equal" >&2; exit 2; }
prefix=$1 from=$2 to=$3 flows=$4 port=$5 mode=$6
bench=${EFA_BENCH:-target/release/efa-bench}
[ -x "$bench" ] || { echo "$0: $bench is missing: cargo build --release -p efa-bench" >&2; exit 2; }
if ! [[ $flows =~ ^[0-9]+$ ]] || [ "$flows" -lt 1 ] || [ "$flows" -gt 64 ]; then
  echo "$0: FLOWS=$flows: 1 to 64" >&2
  exit 2
fi
[[ $port =~ ^[0-9]+$ ]] || { echo "$0: PORT=$port is not a port" >&2; exit 2; }
store=$(mktemp -d /tmp/efa-flows-osu.XXXXXX)
trap 'rm -rf "$store"' EXIT
run_rank() { # RANK HOST
  # Anything pinning libfabric to another interface (ci/test pins the IP providers to lo for
  # its single-host tests) is removed: each rank uses its namespace's efa0.
  ip netns exec "$prefix-$2" env -u FI_TCP_IFACE -u FI_SOCKETS_IFACE -u FI_UDP_IFACE \
    -u FI_PROVIDER -u EFA_FABRIC_ADDR -u EFA_HOST_ID EFA_RANK="$1" EFA_WORLD_SIZE=2 EFA_STORE="file://$store" \
    EFA_TRANSPORTS=ip EFA_IFACE=efa0 EFA_IP_STRIPE="$mode" \
    FI_TCP_PORT_LOW_RANGE="$port" FI_TCP_PORT_HIGH_RANGE=$((port + flows - 1)) \
    timeout 300 "$bench" osu-bw -S 4m -i "${ITERS:-3}" -W "${WINDOW:-16}" --flows "$flows"
}
run_rank 1 "$to" >/dev/null &
reader=$!
out=$(run_rank 0 "$from")
wait "$reader"
echo "$out" | awk '$1 == 4194304 { v = $2 } END { if (v == "") exit 1; print v }' || {
  echo "$0: no 4 MiB result in the output:" >&2
  echo "$out" >&2
  exit 1
}
