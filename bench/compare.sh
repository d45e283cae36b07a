#!/usr/bin/env bash
# Runs efa-bench pingpong and fabtests' fi_pingpong on the same providers and sizes, on this
# host, interleaving ours and theirs round by round to reduce drift, and prints per size the
# median over rounds of both numbers and their ratio:
#   latency ratio   = ours usec/xfer / fi_pingpong usec/xfer      (target <= 1.05 at 8 B)
#   bandwidth ratio = ours MB/sec   / fi_pingpong MB/sec          (target >= 0.95 at 1m, 4m)
# (libfabric-bin 1.17 ships no fi_bw, so bandwidth is fi_pingpong's MB/sec for both.)
#
# IP providers are pinned to loopback for both tools: efa-bench defaults to -d lo, and
# fi_pingpong gets -d lo plus FI_TCP_IFACE/FI_UDP_IFACE/FI_SOCKETS_IFACE=lo; its client
# connects to 127.0.0.1. Nothing is sent on eth0.
#
# Environment: PROVIDERS, SIZES (bytes), ROUNDS, EFA_BENCH (binary path).
set -euo pipefail

cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=/work/target-bench}"
export CARGO_TARGET_DIR
EFA_BENCH=${EFA_BENCH:-$CARGO_TARGET_DIR/release/efa-bench}
PROVIDERS=${PROVIDERS:-"shm tcp;ofi_rxm udp;ofi_rxd"}
SIZES=${SIZES:-"8 1024 65536 1048576 4194304"}
ROUNDS=${ROUNDS:-3}
export FI_TCP_IFACE=lo FI_UDP_IFACE=lo FI_SOCKETS_IFACE=lo

if ! command -v fi_pingpong >/dev/null; then
    echo "fi_pingpong missing: installing libfabric-bin" >&2
    apt-get install -y libfabric-bin >/dev/null
fi
cargo build --release -q -p efa-bench

iters_for() {
    local s=$1
    if [ "$s" -ge 1048576 ]; then echo 100
    elif [ "$s" -ge 65536 ]; then echo 500
    else echo 3000; fi
}

is_ip() { case "${1%%;*}" in tcp|udp|sockets|net) return 0 ;; *) return 1 ;; esac; }

# Prints "usec/xfer MB/sec" of one efa-bench run.
ours() {
    local p=$1 s=$2 n=$3
    "$EFA_BENCH" pingpong -p "$p" -S "$s" -I "$n" -w 10 --timeout 30 |
        awk 'NR==2 { print $6, $5 }'
}

# Prints "usec/xfer MB/sec" of one fi_pingpong run (server and client on this host).
theirs() {
    local p=$1 s=$2 n=$3 port=$((40000 + RANDOM % 20000)) dom=()
    if is_ip "$p"; then dom=(-d lo); fi
    timeout 60 fi_pingpong -p "$p" "${dom[@]}" -e rdm -m tagged -I "$n" -S "$s" -B "$port" \
        >/dev/null 2>&1 &
    local srv=$!
    sleep 0.3
    timeout 60 fi_pingpong -p "$p" "${dom[@]}" -e rdm -m tagged -I "$n" -S "$s" -P "$port" \
        127.0.0.1 | awk 'NR==2 { print $7, $6 }'
    wait "$srv" || true
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print "nan" }'; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for r in $(seq "$ROUNDS"); do
    for p in $PROVIDERS; do
        for s in $SIZES; do
            n=$(iters_for "$s")
            key="$tmp/$(echo "$p" | tr ';' '_')-$s"
            # Alternate who goes first, so neither always runs on a warmer machine.
            if [ $((r % 2)) -eq 1 ]; then
                ours "$p" "$s" "$n" >>"$key.ours" || echo "nan nan" >>"$key.ours"
                theirs "$p" "$s" "$n" >>"$key.theirs" || echo "nan nan" >>"$key.theirs"
            else
                theirs "$p" "$s" "$n" >>"$key.theirs" || echo "nan nan" >>"$key.theirs"
                ours "$p" "$s" "$n" >>"$key.ours" || echo "nan nan" >>"$key.ours"
            fi
        done
    done
    echo "round $r/$ROUNDS done" >&2
done

printf "# efa-bench pingpong vs fi_pingpong (-e rdm -m tagged), median of %s rounds, %s\n" \
    "$ROUNDS" "$(hostname)"
printf "%-13s %8s %12s %12s %8s %12s %12s %8s\n" provider bytes "ours_us" "fi_us" "lat_x" \
    "ours_MB/s" "fi_MB/s" "bw_x"
for p in $PROVIDERS; do
    for s in $SIZES; do
        key="$tmp/$(echo "$p" | tr ';' '_')-$s"
        ol=$(awk '{print $1}' "$key.ours" | median)
        tl=$(awk '{print $1}' "$key.theirs" | median)
        ob=$(awk '{print $2}' "$key.ours" | median)
        tb=$(awk '{print $2}' "$key.theirs" | median)
        awk -v p="$p" -v s="$s" -v ol="$ol" -v tl="$tl" -v ob="$ob" -v tb="$tb" 'BEGIN {
            lx = (tl + 0 > 0) ? sprintf("%.2f", ol / tl) : "n/a";
            bx = (tb + 0 > 0) ? sprintf("%.2f", ob / tb) : "n/a";
            printf "%-13s %8d %12.2f %12.2f %8s %12.2f %12.2f %8s\n", p, s, ol, tl, lx, ob, tb, bx
        }'
    done
done

# ---- allreduce vs Open MPI --------------------------------------------------------------
# Placeholder: to be added when efa-core has communicators and collectives. It will run
# `efa-bench allreduce` and `mpirun -np 2 osu_allreduce` (Open MPI over the same provider,
# pinned to lo) on the same sizes and print the same kind of table. No numbers until then.
