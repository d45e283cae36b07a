#!/usr/bin/env bash
# Oversubscribed runs: NP ranks (default 4) on this host, ours against Open MPI under the same
# oversubscription (`mpirun --oversubscribe`, which makes Open MPI yield when idle), one
# session, ours and theirs alternating round by round; prints per test the median over rounds
# and ours/Open MPI.
#
#   allreduce  efa-bench allreduce -N NP (float32 sum, out of place; time per call in us) vs
#              bench/mpi_allreduce.c, sizes AR_MIN (4k) to AR_MAX (1m) times AR_FACTOR (16)
#   halo       examples/halo.rs vs bench/mpi_halo.c (ring of NP ranks, 4096 f64 cells each,
#              1 KiB halos both ways per iteration, 3-point stencil; us per iteration)
#
# Ours runs under each wait policy in POLICIES (EFA_WAIT; "auto" is the default one), so the
# table also says which policy wins here. Routes: shm (ours over libfabric shm, Open MPI's
# vader BTL) and tcp (ours over TCP on lo, Open MPI's TCP BTL on lo).
#
# With BASE set (the target/release directory of an earlier commit, with efa-bench, efarun and
# examples/halo built), that build runs too (column "base"; it reads no EFA_WAIT).
#
# Part two (PARTS contains "np2"): 2 ranks, not oversubscribed, the auto policy against the
# BASE build: 8 B ping-pong latency (examples/pingpong) and 1 MiB allreduce, shm.
#
# Environment: NP, ROUNDS (3), ROUTES ("shm tcp"), POLICIES ("auto yield block"),
# PARTS ("allreduce halo np2"), AR_MIN, AR_MAX, AR_FACTOR, AR_ITERS (200), AR_WARMUP (20),
# HALO_ITERS (1000), BASE. `PARTS=oversub bench/compare.sh` runs the allreduce part.
set -euo pipefail

cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$PWD/target}"
export CARGO_TARGET_DIR
REL=$CARGO_TARGET_DIR/release
NP=${NP:-4}
ROUNDS=${ROUNDS:-3}
ROUTES=${ROUTES:-"shm tcp"}
POLICIES=${POLICIES:-"auto yield block"}
PARTS=${PARTS:-"allreduce halo np2"}
AR_MIN=${AR_MIN:-4k}
AR_MAX=${AR_MAX:-1m}
AR_FACTOR=${AR_FACTOR:-16}
AR_ITERS=${AR_ITERS:-200}
AR_WARMUP=${AR_WARMUP:-20}
HALO_ITERS=${HALO_ITERS:-1000}
BASE=${BASE:-}

want() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

cargo build --release -q -p efa-bench -p efarun -p efa-examples --example halo --example pingpong
if ! command -v mpicc.openmpi >/dev/null || ! command -v mpirun.openmpi >/dev/null; then
    echo "Open MPI (mpicc.openmpi, mpirun.openmpi) missing: apt-get install openmpi-bin libopenmpi-dev" >&2
    exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mpicc.openmpi -O2 -o "$tmp/mpi_allreduce" bench/mpi_allreduce.c
mpicc.openmpi -O2 -o "$tmp/mpi_halo" bench/mpi_halo.c -lm

mpirun_() {
    local route=$1 np=$2
    shift 2
    local btl=(--mca btl self,vader)
    if [ "$route" = tcp ]; then btl=(--mca btl self,tcp --mca btl_tcp_if_include lo); fi
    timeout 300 mpirun.openmpi --allow-run-as-root --oversubscribe -np "$np" --bind-to none \
        --mca pml ob1 "${btl[@]}" "$@"
}

ours_env() {
    local route=$1 policy=$2
    if [ "$route" = tcp ]; then echo "EFA_TRANSPORTS=ip EFA_IFACE=lo EFA_WAIT=$policy"
    else echo "EFA_TRANSPORTS=shm EFA_WAIT=$policy"; fi
}

ar_flags=(-b "$AR_MIN" -e "$AR_MAX" -f "$AR_FACTOR" -n "$AR_ITERS" -w "$AR_WARMUP")
# "size time_us" lines of a nccl-tests-style table.
ar_rows() { awk '$3 == "float" && $1 ~ /^[0-9]+$/ { print $1, $6 }'; }
halo_row() { awk '/usec_per_iter/ { print "halo", $NF }'; }

record() { # key file: appends "size value" lines to $tmp/<key>-<size>
    while read -r size value; do echo "$value" >>"$tmp/$1-$size"; done
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print "nan" }'; }

ompi_ar() { mpirun_ "$1" "$NP" "$tmp/mpi_allreduce" "${ar_flags[@]}" | ar_rows | record "ar-$1-ompi"; }
ours_ar() {
    local route=$1 p bin
    for p in $POLICIES ${BASE:+base}; do
        bin=$REL/efa-bench
        if [ "$p" = base ]; then bin=$BASE/efa-bench; fi
        # shellcheck disable=SC2046 # the variable list is meant to split
        env $(ours_env "$route" "$p") timeout 300 "$bin" allreduce -N "$NP" \
            "${ar_flags[@]}" | ar_rows | record "ar-$route-$p"
    done
}
ompi_halo() { ITERS=$HALO_ITERS mpirun_ "$1" "$NP" "$tmp/mpi_halo" | halo_row | record "halo-$1-ompi"; }
ours_halo() {
    local route=$1 p dir
    for p in $POLICIES ${BASE:+base}; do
        dir=$REL
        if [ "$p" = base ]; then dir=$BASE; fi
        # shellcheck disable=SC2046
        env $(ours_env "$route" "$p") ITERS="$HALO_ITERS" timeout 300 "$dir/efarun" \
            -n "$NP" "$dir/examples/halo" | sed 's/^\[[0-9]*\] //' | halo_row |
            record "halo-$route-$p"
    done
}

# in_turn ROUND A B ARGS...: A then B in odd rounds, B then A in even ones, so that neither
# always runs on a warmer (or busier) machine.
in_turn() {
    local r=$1 a=$2 b=$3
    shift 3
    if [ $((r % 2)) -eq 1 ]; then
        "$a" "$@"
        "$b" "$@"
    else
        "$b" "$@"
        "$a" "$@"
    fi
}

for r in $(seq "$ROUNDS"); do
    for route in $ROUTES; do
        if want allreduce; then in_turn "$r" ompi_ar ours_ar "$route"; fi
        if want halo; then in_turn "$r" ompi_halo ours_halo "$route"; fi
    done
    if want np2; then
        for build in new ${BASE:+base}; do
            dir=$REL
            if [ "$build" = base ]; then dir=$BASE; fi
            EFA_TRANSPORTS=shm timeout 300 "$dir/efarun" -n 2 "$dir/examples/pingpong" 20000 |
                sed 's/^\[[0-9]*\] //' | awk '$1 == 8 { print "8B", $3 }' | record "np2-$build"
            EFA_TRANSPORTS=shm timeout 300 "$dir/efa-bench" allreduce -N 2 -b 1m -e 1m -n 100 -w 10 |
                ar_rows | record "np2-$build"
        done
        mpirun_ shm 2 "$tmp/mpi_allreduce" -b 1m -e 1m -n 100 -w 10 | ar_rows | record "np2-ompi"
    fi
    echo "round $r/$ROUNDS done" >&2
done

printf "# %s ranks on %s cores (nproc), medians of %s alternating rounds; times in us\n" \
    "$NP" "$(nproc)" "$ROUNDS"
for route in $ROUTES; do
    for test in ar halo; do
        if [ "$test" = ar ] && ! want allreduce; then continue; fi
        if [ "$test" = halo ] && ! want halo; then continue; fi
        sizes=$(ls "$tmp" | sed -n "s/^$test-$route-ompi-//p" | sort -n)
        printf "%-6s %-10s %10s %12s" "$route" "$test" "size(B)" "open-mpi"
        for p in $POLICIES ${BASE:+base}; do printf " %10s" "ours:$p"; done
        printf " %12s\n" "auto/ompi"
        for s in $sizes; do
            o=$(median <"$tmp/$test-$route-ompi-$s")
            printf "%-6s %-10s %10s %12s" "$route" "$test" "$s" "$o"
            for p in $POLICIES ${BASE:+base}; do
                printf " %10s" "$(median <"$tmp/$test-$route-$p-$s" 2>/dev/null || echo nan)"
            done
            a=$(median <"$tmp/$test-$route-auto-$s" 2>/dev/null || echo nan)
            printf " %12s\n" "$(awk -v a="$a" -v o="$o" 'BEGIN { if (o > 0) printf "%.2f", a / o; else print "nan" }')"
        done
    done
done
if want np2; then
    printf "# 2 ranks on shm, not oversubscribed (auto policy = spin): 8 B half round trip (examples/pingpong), 1 MiB allreduce\n"
    printf "%-10s %12s %12s %12s\n" "test" "new" "base" "open-mpi"
    for k in 8B 1048576; do
        n=$(median <"$tmp/np2-new-$k")
        b=$( [ -n "$BASE" ] && median <"$tmp/np2-base-$k" || echo "-")
        o=$( [ "$k" = 1048576 ] && median <"$tmp/np2-ompi-$k" || echo "-")
        printf "%-10s %12s %12s %12s\n" "$k" "$n" "$b" "$o"
    done
fi
