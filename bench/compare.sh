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
# Then (second part) `efa-bench allreduce` against Open MPI's MPI_Allreduce (bench/mpi_allreduce.c,
# same flags and columns), 2 ranks, float32 sum, per route: ours over shm (EFA_TRANSPORTS=shm) vs
# Open MPI's vader BTL, and ours over TCP on lo (EFA_TRANSPORTS=ip EFA_IFACE=lo) vs Open MPI's TCP
# BTL on lo. Prints busbw (GB/s, nccl-tests' definition) of both and ours/ompi.
#
# Environment: PARTS ("pingpong allreduce"), PROVIDERS, SIZES (bytes), ROUNDS, EFA_BENCH
# (binary path); for allreduce AR_MIN, AR_MAX, AR_FACTOR, AR_ITERS, AR_WARMUP, AR_ROUTES
# ("shm tcp").
set -euo pipefail

cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=/work/target-bench}"
export CARGO_TARGET_DIR
EFA_BENCH=${EFA_BENCH:-$CARGO_TARGET_DIR/release/efa-bench}
PROVIDERS=${PROVIDERS:-"shm tcp;ofi_rxm udp;ofi_rxd"}
SIZES=${SIZES:-"8 1024 65536 1048576 4194304"}
ROUNDS=${ROUNDS:-3}
PARTS=${PARTS:-"pingpong allreduce"}
export FI_TCP_IFACE=lo FI_UDP_IFACE=lo FI_SOCKETS_IFACE=lo

want() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if want pingpong && ! command -v fi_pingpong >/dev/null; then
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

if want pingpong; then
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

fi # pingpong

# ---- allreduce vs Open MPI --------------------------------------------------------------
if want allreduce; then
AR_MIN=${AR_MIN:-4k}
AR_MAX=${AR_MAX:-64m}
AR_FACTOR=${AR_FACTOR:-4} # 4k, 16k, 64k, 256k, 1m, 4m, 16m, 64m
AR_ITERS=${AR_ITERS:-20}
AR_WARMUP=${AR_WARMUP:-5}
AR_ROUTES=${AR_ROUTES:-"shm tcp"}
# Issue 6's Gloo number (torch.distributed gloo, 2 ranks, 1 MiB float32): quoted, not measured
# here (PyTorch is not installed on this host).
GLOO_1M_BUSBW=0.57

if ! command -v mpicc.openmpi >/dev/null || ! command -v mpirun.openmpi >/dev/null; then
    echo "Open MPI missing: installing openmpi-bin libopenmpi-dev" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        openmpi-bin libopenmpi-dev >/dev/null
fi
MPI_AR=$CARGO_TARGET_DIR/mpi_allreduce
mpicc.openmpi -O2 -o "$MPI_AR" bench/mpi_allreduce.c
flags=(-b "$AR_MIN" -e "$AR_MAX" -f "$AR_FACTOR" -n "$AR_ITERS" -w "$AR_WARMUP" -c 1 -d float -o sum)

# Both print nccl-tests rows: field 1 = size (B), field 6 = time (us). Output: "size busbw",
# busbw recomputed from the time (the printed column has only 2 decimals):
# busbw = size / time * 2(n-1)/n, n = 2.
rows() { awk '!/^#/ && NF == 9 && $6 > 0 { printf "%d %.6f\n", $1, $1 / ($6 * 1e3) * 2 * (2 - 1) / 2 }'; }

ours_ar() {
    case $1 in
    shm) EFA_TRANSPORTS=shm "$EFA_BENCH" allreduce -N 2 "${flags[@]}" ;;
    tcp) EFA_TRANSPORTS=ip EFA_IFACE=lo "$EFA_BENCH" allreduce -N 2 "${flags[@]}" ;;
    esac | rows
}

ompi_ar() {
    local btl=()
    case $1 in
    shm) btl=(--mca btl self,vader) ;;
    tcp) btl=(--mca btl self,tcp --mca btl_tcp_if_include lo) ;;
    esac
    # pml ob1 for both: the BTLs named above carry the data (not an OFI MTL via pml cm).
    timeout 600 mpirun.openmpi --allow-run-as-root -n 2 --bind-to none --mca pml ob1 "${btl[@]}" \
        "$MPI_AR" "${flags[@]}" | rows
}

for r in $(seq "$ROUNDS"); do
    for route in $AR_ROUTES; do
        # Alternate who goes first, so neither always runs on a warmer machine.
        if [ $((r % 2)) -eq 1 ]; then
            ours_ar "$route" >"$tmp/ar-$route-ours-$r" || true
            ompi_ar "$route" >"$tmp/ar-$route-ompi-$r" || true
        else
            ompi_ar "$route" >"$tmp/ar-$route-ompi-$r" || true
            ours_ar "$route" >"$tmp/ar-$route-ours-$r" || true
        fi
    done
    echo "allreduce round $r/$ROUNDS done" >&2
done

echo
printf "# efa-bench allreduce vs Open MPI %s MPI_Allreduce, 2 ranks, float32 sum, out of place,\n" \
    "$(mpirun.openmpi --version 2>/dev/null | head -1 | awk '{print $NF}')"
printf "# -n %s -w %s, busbw in GB/s (= algbw for 2 ranks), median of %s rounds, %s\n" \
    "$AR_ITERS" "$AR_WARMUP" "$ROUNDS" "$(hostname)"
printf "# shm: EFA_TRANSPORTS=shm vs --mca btl self,vader; tcp: EFA_TRANSPORTS=ip EFA_IFACE=lo vs\n"
printf "#      --mca btl self,tcp --mca btl_tcp_if_include lo (both: --mca pml ob1)\n"
printf "%-6s %10s %12s %12s %8s\n" route bytes ours_busbw ompi_busbw ours/ompi
for route in $AR_ROUTES; do
    sizes=$(cat "$tmp"/ar-"$route"-*-* 2>/dev/null | awk '{print $1}' | sort -n | uniq)
    for s in $sizes; do
        o=$(cat "$tmp"/ar-"$route"-ours-* | awk -v s="$s" '$1 == s { print $2 }' | median)
        m=$(cat "$tmp"/ar-"$route"-ompi-* | awk -v s="$s" '$1 == s { print $2 }' | median)
        awk -v r="$route" -v s="$s" -v o="$o" -v m="$m" 'BEGIN {
            x = (m + 0 > 0) ? sprintf("%.2f", o / m) : "n/a";
            printf "%-6s %10d %12.3f %12.3f %8s\n", r, s, o, m, x
        }'
    done
done
printf "# reference, NOT measured in this run: Gloo (issue 6) 1 MiB busbw %s GB/s\n" "$GLOO_1M_BUSBW"
fi # allreduce
