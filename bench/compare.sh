#!/usr/bin/env bash
# Side-by-side benchmarks on this host, ours against the tools a user already has, each pair
# run alternately (who goes first alternates by round) and reported as medians over ROUNDS.
# Parts (PARTS, default "osu"; "all" for every part):
#
# osu       Through the communicator (what users call), OSU's method and iteration counts:
#           `efa-bench osu-latency` / `osu-bw` under efarun (2 ranks) against bench/mpi_osu.c
#           built with Open MPI (`--mca pml ob1`), per route: shm (EFA_TRANSPORTS=shm vs
#           `--mca btl self,vader`) and TCP on lo (EFA_TRANSPORTS=ip EFA_IFACE=lo vs
#           `--mca btl self,tcp --mca btl_tcp_if_include lo`), plus fi_pingpong (-e rdm -m
#           tagged) on shm and tcp;ofi_rxm as the fabric's own floor. Prints issue 13's table:
#           latency per size, ratio = ours / Open MPI (lower is better), then osu_bw MB/s,
#           ratio = ours / Open MPI (higher is better). OSU_SIZES, OSU_ROUTES ("shm tcp"),
#           OSU_TESTS ("latency bw"; add "bibw").
# oversub   4 ranks on this host's cores (2 here: oversubscribed): `efa-bench allreduce -N 4`
#           against `mpirun --oversubscribe -np 4` of bench/mpi_allreduce.c, shm/vader,
#           4 KiB..1 MiB float32 sum, auto wait policy; time per call (us), ratio = ours /
#           Open MPI (target <= 1.5). bench/oversubscribed.sh's allreduce part, run with
#           these settings: OV_RANKS (4), OV_MIN, OV_MAX, OV_ITERS, OV_WARMUP.
# pingpong  The raw fabric path: efa-bench pingpong vs fi_pingpong on the same providers:
#   latency ratio   = ours usec/xfer / fi_pingpong usec/xfer      (target <= 1.05 at 8 B)
#   bandwidth ratio = ours MB/sec   / fi_pingpong MB/sec          (target >= 0.95 at 1m, 4m)
# (libfabric-bin 1.17 ships no fi_bw, so bandwidth is fi_pingpong's MB/sec for both.)
#           PROVIDERS, SIZES.
# allreduce `efa-bench allreduce` against Open MPI's MPI_Allreduce (bench/mpi_allreduce.c,
#           same flags and columns), 2 ranks, float32 sum, per route (shm vs vader, TCP on lo
#           vs the TCP BTL on lo); busbw (GB/s) of both and ours/ompi. AR_MIN, AR_MAX,
#           AR_FACTOR, AR_ITERS, AR_WARMUP, AR_ROUTES ("shm tcp").
# hosts     2 "hosts" x 2 ranks: network namespaces h1 and h2 of ci/netns/hosts.sh (one subnet,
#           10.77.1.11 and .12, IP between them on efa0, shared memory within each), allreduce
#           float32 sum. Ours: every rank started in its namespace (EFA_RANK..., store served by
#           rank 0 at 10.77.1.11). Open MPI: mpirun in h1 with --host h1:2,h2:2 and
#           bench/netns-rsh as its rsh agent, which starts each node's orted in its namespace
#           under that node's hostname. 4 ranks on 2 cores: ours EFA_WAIT=block, Open MPI
#           mpi_yield_when_idle 1. Time per call and busbw (2(n-1)/n), ratio = ours / Open MPI.
#           H_MIN (4k), H_MAX (64m), H_FACTOR (4), H_ITERS (20), H_WARMUP (5). Needs root.
#
# IP traffic stays on loopback for every tool: efa-bench gets EFA_IFACE=lo (or -d lo),
# fi_pingpong -d lo plus FI_TCP_IFACE/FI_UDP_IFACE/FI_SOCKETS_IFACE=lo and 127.0.0.1, Open MPI
# btl_tcp_if_include lo. Nothing is sent on eth0.
#
# Environment: PARTS, ROUNDS (3), EFA_BENCH and EFARUN (binary paths), CARGO_TARGET_DIR.
# Installs what is missing (libfabric-bin, openmpi-bin, libopenmpi-dev) with apt-get.
set -euo pipefail

cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=/work/target-bench}"
export CARGO_TARGET_DIR
EFA_BENCH=${EFA_BENCH:-$CARGO_TARGET_DIR/release/efa-bench}
EFARUN=${EFARUN:-$CARGO_TARGET_DIR/release/efarun}
PROVIDERS=${PROVIDERS:-"shm tcp;ofi_rxm udp;ofi_rxd"}
SIZES=${SIZES:-"8 1024 65536 1048576 4194304"}
ROUNDS=${ROUNDS:-3}
PARTS=${PARTS:-osu}
[ "$PARTS" = all ] && PARTS="osu oversub pingpong allreduce hosts"
export FI_TCP_IFACE=lo FI_UDP_IFACE=lo FI_SOCKETS_IFACE=lo

want() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if { want pingpong || want osu; } && ! command -v fi_pingpong >/dev/null; then
    echo "fi_pingpong missing: installing libfabric-bin" >&2
    apt-get install -y libfabric-bin >/dev/null
fi
cargo build --release -q -p efa-bench -p efarun

# Open MPI and its compiler wrapper, for the C baselines.
need_mpi() {
    if ! command -v mpicc.openmpi >/dev/null || ! command -v mpirun.openmpi >/dev/null ||
        ! echo '#include <mpi.h>' | mpicc.openmpi -E -x c - >/dev/null 2>&1; then
        echo "Open MPI missing: installing openmpi-bin libopenmpi-dev" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            openmpi-bin libopenmpi-dev >/dev/null
    fi
}
MPIRUN=(timeout 600 mpirun.openmpi --allow-run-as-root --bind-to none --mca pml ob1)
# Open MPI's BTLs per route: vader (shared memory) or TCP on lo.
btl_for() {
    case $1 in
    shm) echo "--mca btl self,vader" ;;
    tcp) echo "--mca btl self,tcp --mca btl_tcp_if_include lo" ;;
    esac
}
# Our communicator's transport per route.
transports_for() {
    case $1 in
    shm) echo "-x EFA_TRANSPORTS=shm" ;;
    tcp) echo "-x EFA_TRANSPORTS=ip -x EFA_IFACE=lo" ;;
    esac
}

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
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- OSU latency / bandwidth through the communicator vs Open MPI and fi_pingpong ----------
if want osu; then
need_mpi
OSU_SIZES=${OSU_SIZES:-"8 1024 65536 1048576 4194304"}
OSU_ROUTES=${OSU_ROUTES:-"shm tcp"}
OSU_TESTS=${OSU_TESTS:-"latency bw"}
MPI_OSU=$CARGO_TARGET_DIR/mpi_osu
mpicc.openmpi -O2 -o "$MPI_OSU" bench/mpi_osu.c
osu_list=$(echo "$OSU_SIZES" | tr ' ' ',')

# Both print OSU's two columns; keep "size value" rows (efarun prefixes rank 0's lines "[0] ").
osu_rows() { sed 's/^\[[0-9]*\] //' | awk '!/^#/ && NF == 2 { print $1, $2 }'; }

# shellcheck disable=SC2046 # the flag lists are meant to split
ours_osu() {
    timeout 600 "$EFARUN" -n 2 $(transports_for "$1") "$EFA_BENCH" "osu-$2" -S "$osu_list" | osu_rows
}

# shellcheck disable=SC2046
ompi_osu() {
    "${MPIRUN[@]}" -n 2 $(btl_for "$1") "$MPI_OSU" "$2" -S "$osu_list" | osu_rows
}

fi_prov() { case $1 in shm) echo shm ;; tcp) echo "tcp;ofi_rxm" ;; esac; }

for r in $(seq "$ROUNDS"); do
    for route in $OSU_ROUTES; do
        for t in $OSU_TESTS; do
            if [ $((r % 2)) -eq 1 ]; then
                ours_osu "$route" "$t" >"$tmp/osu-$route-$t-ours-$r" || true
                ompi_osu "$route" "$t" >"$tmp/osu-$route-$t-ompi-$r" || true
            else
                ompi_osu "$route" "$t" >"$tmp/osu-$route-$t-ompi-$r" || true
                ours_osu "$route" "$t" >"$tmp/osu-$route-$t-ours-$r" || true
            fi
        done
        # fi_pingpong: the fabric's own latency on the provider under this route.
        for s in $OSU_SIZES; do
            theirs "$(fi_prov "$route")" "$s" "$(iters_for "$s")" |
                awk -v s="$s" '{ print s, $1 }' >>"$tmp/osu-$route-latency-fi-$r" || true
        done
    done
    echo "osu round $r/$ROUNDS done" >&2
done

# median_of ROUTE TEST WHO SIZE
median_of() { cat "$tmp"/osu-"$1"-"$2"-"$3"-* 2>/dev/null | awk -v s="$4" '$1 == s { print $2 }' | median; }
# fmt_us VALUE: µs with 3 significant digits, as in issue 13.
fmt() { awk -v v="$1" -v u="$2" 'BEGIN { if (v == "nan" || v == "") print "n/a"; else if (v < 10) printf "%.2f%s\n", v, u; else if (v < 100) printf "%.1f%s\n", v, u; else printf "%.0f%s\n", v, u }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f×\n", a / b; else print "n/a" }'; }
size_name() { awk -v s="$1" 'BEGIN { if (s >= 1048576) printf "%d MiB\n", s / 1048576; else if (s >= 1024) printf "%d KiB\n", s / 1024; else printf "%d B\n", s }'; }

ompi_version=$(mpirun.openmpi --version 2>/dev/null | head -1 | awk '{print $NF}')
echo
printf "# efa-bench osu-* (through the communicator, under efarun) vs Open MPI %s (bench/mpi_osu.c,\n" "$ompi_version"
printf "# --mca pml ob1) and fi_pingpong, 2 ranks, OSU's method and iteration counts, median of %s\n" "$ROUNDS"
printf "# alternating rounds, %s, %s. shm: EFA_TRANSPORTS=shm vs btl self,vader; TCP: EFA_TRANSPORTS=ip\n" "$(hostname)" "$(date -u +%F)"
printf "# EFA_IFACE=lo vs btl self,tcp on lo. Ratio = ours / Open MPI. Load average at the start: %s,\n" "$load_start"
printf "# now: %s (%s cores; other work on the host makes busy-polling benchmarks noisy).\n\n" "$(cut -d' ' -f1-3 /proc/loadavg)" "$(nproc)"
# osu_table TEST UNIT: a row per size; per route Open MPI, ours, ours / Open MPI, and for
# latency fi_pingpong on the route's provider.
osu_table() {
    local t=$1 unit=$2 hdr="| size |" sep="|---|" route s line m o f
    for route in $OSU_ROUTES; do
        case $route in
        shm) hdr="$hdr shm: Open MPI vader | shm: ours | ratio |" f="fi_pingpong shm" ;;
        tcp) hdr="$hdr TCP on lo: Open MPI | TCP: ours | ratio |" f="fi_pingpong tcp;ofi_rxm" ;;
        esac
        sep="$sep---|---|---|"
        if [ "$t" = latency ]; then hdr="$hdr $f |" sep="$sep---|"; fi
    done
    echo "$hdr"
    echo "$sep"
    for s in $OSU_SIZES; do
        line="| $(size_name "$s") |"
        for route in $OSU_ROUTES; do
            m=$(median_of "$route" "$t" ompi "$s")
            o=$(median_of "$route" "$t" ours "$s")
            line="$line $(fmt "$m" "$unit") | $(fmt "$o" "$unit") | $(ratio "$o" "$m") |"
            if [ "$t" = latency ]; then
                f=$(median_of "$route" latency fi "$s")
                line="$line $(fmt "$f" "$unit") |"
            fi
        done
        echo "$line"
    done
    echo
}
for t in $OSU_TESTS; do
    case $t in
    latency) echo "Latency (osu_latency, half round trip):" && echo && osu_table latency " µs" ;;
    bw | bibw)
        echo "Bandwidth (osu_$t, window 64, MB/s; ratio = ours / Open MPI, higher is better):"
        echo
        osu_table "$t" ""
        ;;
    esac
done
fi # osu

# ---- oversubscribed allreduce vs Open MPI --oversubscribe ----------------------------------
if want oversub; then
need_mpi
NP=${OV_RANKS:-4} ROUTES=shm POLICIES=auto PARTS=allreduce BASE= ROUNDS=$ROUNDS \
    AR_MIN=${OV_MIN:-4k} AR_MAX=${OV_MAX:-1m} AR_FACTOR=4 AR_ITERS=${OV_ITERS:-20} \
    AR_WARMUP=${OV_WARMUP:-5} bench/oversubscribed.sh
fi # oversub

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

need_mpi
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

# ---- 2 "hosts" x 2 ranks in network namespaces, allreduce vs Open MPI ---------------------
if want hosts; then
need_mpi
H_MIN=${H_MIN:-4k}
H_MAX=${H_MAX:-64m}
H_FACTOR=${H_FACTOR:-4}
H_ITERS=${H_ITERS:-20}
H_WARMUP=${H_WARMUP:-5}
why=$(ci/netns/hosts.sh check 2>&1) || { echo "hosts: SKIPPED: $why" >&2; exit 1; }
command -v unshare >/dev/null || { echo "hosts: SKIPPED: unshare (util-linux) missing" >&2; exit 1; }
MPI_AR=$CARGO_TARGET_DIR/mpi_allreduce
mpicc.openmpi -O2 -o "$MPI_AR" bench/mpi_allreduce.c
hflags=(-b "$H_MIN" -e "$H_MAX" -f "$H_FACTOR" -n "$H_ITERS" -w "$H_WARMUP" -c 1 -d float -o sum)
# ci/netns/hosts.sh's naming: `hosts.sh gc` of other runs removes them only once this PID is gone.
export EFA_NS_PREFIX=efans-$$
ci/netns/hosts.sh up "$EFA_NS_PREFIX" >/dev/null
trap 'ci/netns/hosts.sh down "$EFA_NS_PREFIX" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
# Ranks 0, 1 on h1 (10.77.1.11, where rank 0 serves the store), 2, 3 on h2 (10.77.1.12).
hosts_layout=("0 h1 0" "1 h1 1" "2 h2 0" "3 h2 1")
# busbw = size / time * 2(n-1)/n, n = 4.
hrows() { sed 's/^\[[0-9]*\] //' | awk '!/^#/ && NF == 9 && $6 > 0 { printf "%d %.6f %.2f\n", $1, $1 / ($6 * 1e3) * 2 * 3 / 4, $6 }'; }

# Every rank in its namespace under its hostname (as netns-rsh does for Open MPI), IP route on
# efa0, the block wait policy (what auto picks when it knows ranks outnumber cores; each
# "host" here believes it has the 2 cores to itself).
ours_hosts() {
    local port=$((30000 + RANDOM % 20000)) pids=() l rank host lr rc=0
    for l in "${hosts_layout[@]}"; do
        read -r rank host lr <<<"$l"
        env -u FI_TCP_IFACE -u FI_SOCKETS_IFACE -u FI_UDP_IFACE -u EFA_TRANSPORTS \
            EFA_RANK="$rank" EFA_WORLD_SIZE=4 EFA_LOCAL_RANK="$lr" EFA_LOCAL_SIZE=2 \
            EFA_STORE=10.77.1.11:$port EFA_IFACE=efa0 EFA_WAIT=block EFA_TIMEOUT=120 \
            timeout 600 bench/netns-rsh "$host" "$EFA_BENCH" allreduce "${hflags[*]}" \
            >"$tmp/hosts-rank$rank.out" 2>"$tmp/hosts-rank$rank.err" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    [ $rc -eq 0 ] || { cat "$tmp"/hosts-rank*.err >&2; return 1; }
    hrows <"$tmp/hosts-rank0.out"
}

# mpirun in h1; the rsh agent starts each node's orted in its namespace. Open MPI yields when
# idle (what --oversubscribe sets), TCP BTL and out-of-band traffic on efa0.
ompi_hosts() {
    timeout 600 ip netns exec "$EFA_NS_PREFIX-h1" unshare --uts /bin/sh -c "hostname h1 && exec \
        mpirun.openmpi --allow-run-as-root --bind-to none --host h1:2,h2:2 -np 4 \
        --mca plm_rsh_agent $PWD/bench/netns-rsh -x EFA_NS_PREFIX --mca pml ob1 \
        --mca btl self,vader,tcp --mca btl_tcp_if_include efa0 --mca oob_tcp_if_include efa0 \
        --mca mpi_yield_when_idle 1 $MPI_AR ${hflags[*]}" | hrows
}

for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) -eq 1 ]; then
        ours_hosts >"$tmp/h-ours-$r" || true
        ompi_hosts >"$tmp/h-ompi-$r" || true
    else
        ompi_hosts >"$tmp/h-ompi-$r" || true
        ours_hosts >"$tmp/h-ours-$r" || true
    fi
    echo "hosts round $r/$ROUNDS done" >&2
done

echo
printf "# 2 hosts x 2 ranks (network namespaces h1, h2 on one subnet; IP between hosts, shared\n"
printf "# memory within), allreduce float32 sum, out of place, -n %s -w %s, median of %s rounds,\n" \
    "$H_ITERS" "$H_WARMUP" "$ROUNDS"
printf "# %s, %s cores (4 ranks: oversubscribed; ours EFA_WAIT=block, Open MPI mpi_yield_when_idle 1).\n" \
    "$(hostname)" "$(nproc)"
printf "# Time per call (us); ratio = ours / Open MPI (lower is better; target <= 0.83).\n"
printf "%10s %12s %12s %8s %12s %12s\n" bytes ours_us ompi_us ratio ours_busbw ompi_busbw
sizes=$(cat "$tmp"/h-*-* 2>/dev/null | awk '{print $1}' | sort -n | uniq)
for s in $sizes; do
    ot=$(cat "$tmp"/h-ours-* | awk -v s="$s" '$1 == s { print $3 }' | median)
    mt=$(cat "$tmp"/h-ompi-* | awk -v s="$s" '$1 == s { print $3 }' | median)
    ob=$(cat "$tmp"/h-ours-* | awk -v s="$s" '$1 == s { print $2 }' | median)
    mb=$(cat "$tmp"/h-ompi-* | awk -v s="$s" '$1 == s { print $2 }' | median)
    awk -v s="$s" -v ot="$ot" -v mt="$mt" -v ob="$ob" -v mb="$mb" 'BEGIN {
        x = (mt + 0 > 0 && ot + 0 > 0) ? sprintf("%.2f", ot / mt) : "n/a";
        printf "%10d %12s %12s %8s %12.3f %12.3f\n", s, ot, mt, x, ob, mb
    }'
done
fi # hosts
