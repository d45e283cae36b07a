#!/usr/bin/env bash
# bench/flows.sh: bandwidth against the number of flows K under the emulated EC2 per-flow cap
# (issue 15). Makes the namespace hosts of ci/netns/hosts.sh, caps h1 and h3 with
# ci/netns/flowcap.sh, runs a command for K = 1, 2, 4, 8, 16 from h1 to h3, prints a table, a
# text plot, and last the summary line issue 15 specifies:
#
#   flows: K=1 X MB/s, K=4 Y MB/s, K=8 Z MB/s; one slow flow: adaptive A MB/s, equal E MB/s
#
# Values that were not measured are printed as "n/a" (no unit). MB/s = 10^6 bytes/s.
#
# The command is a template (bash -c) with these placeholders:
#   {prefix} the namespace prefix (namespaces {prefix}-h1 ...)   {from} {to} host names (h1, h3)
#   {to_addr} the address of {to}      {flows} K      {seconds} the run's length (RUN_SECONDS)
#   {port} {port_last} the listening-port window flowcap.sh classifies flows by: each flow must
#          listen on its own port in it (libfabric's tcp provider: FI_TCP_PORT_LOW_RANGE={port}
#          FI_TCP_PORT_HIGH_RANGE={port_last})
# The last line the command prints is its result: a JSON object with "total_mbit" (and
# optionally "mbit", per flow), as ci/netns/flowtool.py prints, or a bare number of MB/s.
#
#   FLOWS_CMD           the sweep's command. Default: plain TCP flows,
#                       python3 ci/netns/flowtool.py run --prefix {prefix} --from {from} --to {to}
#                         --port {port} --flows {flows} --seconds {seconds}
#   FLOWS_ADAPTIVE_CMD  the striped transfer with adaptive shares, FLOWS_EQUAL_CMD with an
#                       equal split (e.g. efa-bench bw --flows {flows} over the IP route, when it
#                       has them). Each runs once with SLOW_K flows while the flow listening on
#                       {port} is throttled to half the cap. Unset: "n/a" in the summary.
#   PER_FLOW (250), AGGREGATE (1500)  the caps in Mbit/s; KS ("1 2 4 8 16"); SLOW_K (8);
#   RUN_SECONDS (5); RUN_TIMEOUT (RUN_SECONDS + 60: a run still going then is killed).
#
# With one slow flow it also runs FLOWS_CMD (SLOW_K flows) and, if it reports per-flow rates,
# prints their sum (what an adaptive split can reach at best) and K x the slowest flow (what an
# equal split is held to). The plain TCP flows have no striping, hence no adaptive or equal
# split of their own: with the default command the summary says "n/a" for both.
#
# Needs root (network namespaces). The namespaces and their qdiscs are removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

PER_FLOW=${PER_FLOW:-250}
AGGREGATE=${AGGREGATE:-1500}
KS=${KS:-"1 2 4 8 16"}
SLOW_K=${SLOW_K:-8}
RUN_SECONDS=${RUN_SECONDS:-5}
RUN_TIMEOUT=${RUN_TIMEOUT:-$((RUN_SECONDS + 60))}
FLOWS_CMD=${FLOWS_CMD:-"python3 ci/netns/flowtool.py run --prefix {prefix} --from {from} --to {to} --port {port} --flows {flows} --seconds {seconds}"}
FLOWS_ADAPTIVE_CMD=${FLOWS_ADAPTIVE_CMD:-}
FLOWS_EQUAL_CMD=${FLOWS_EQUAL_CMD:-}
read -r PORT PORT_LAST <<<"$(ci/netns/flowcap.sh window)"   # flowcap.sh's port window
FROM=h1 TO=h3

die() { echo "flows.sh: $*" >&2; exit 1; }
for v in PER_FLOW AGGREGATE SLOW_K RUN_SECONDS RUN_TIMEOUT; do
  [[ ${!v} =~ ^[0-9]+$ ]] && [ "${!v}" -gt 0 ] || die "$v=${!v}: a positive integer"
done
for k in $KS; do [[ $k =~ ^[0-9]+$ ]] && [ "$k" -ge 1 ] && [ "$k" -le 256 ] || die "KS: $k is not in 1..256"; done
[ "$PER_FLOW" -le "$AGGREGATE" ] || die "PER_FLOW is above AGGREGATE"

if ! why=$(ci/netns/hosts.sh check); then die "network namespaces cannot be created here: $why"; fi
prefix="efans-$$"
ci/netns/hosts.sh gc || true
trap 'ci/netns/hosts.sh down "$prefix"' EXIT
trap 'exit 130' INT TERM
ci/netns/hosts.sh up "$prefix" >&2
to_addr=$(ci/netns/hosts.sh addr "$TO")

# run TEMPLATE K: runs the command, prints "MBps [per-flow Mbit/s...]" (MB/s of the total).
run() {
  local cmd=$1 k=$2 out last
  cmd=${cmd//\{prefix\}/$prefix}
  cmd=${cmd//\{from\}/$FROM}
  cmd=${cmd//\{to\}/$TO}
  cmd=${cmd//\{to_addr\}/$to_addr}
  cmd=${cmd//\{flows\}/$k}
  cmd=${cmd//\{seconds\}/$RUN_SECONDS}
  cmd=${cmd//\{port\}/$PORT}
  cmd=${cmd//\{port_last\}/$PORT_LAST}
  echo "flows.sh: K=$k: $cmd" >&2
  out=$(timeout -k 5 "$RUN_TIMEOUT" bash -c "$cmd") || die "K=$k: the command failed or ran past ${RUN_TIMEOUT} s (exit $?)"
  last=$(printf '%s\n' "$out" | tail -1)
  python3 -c '
import json, sys
line = sys.argv[1].strip()
try:
    v = float(line)
    print(round(v, 1))
except ValueError:
    try:
        d = json.loads(line)
        print(round(d["total_mbit"] / 8, 1), *d.get("mbit", []))
    except (ValueError, KeyError, TypeError):
        sys.exit("flows.sh: the last line is neither a number (MB/s) nor JSON with total_mbit: %r" % line)
' "$last"
}

ci/netns/flowcap.sh apply "$prefix" --per-flow "${PER_FLOW}mbit" --aggregate "${AGGREGATE}mbit" >&2
declare -A mbps
rows=()
for k in $KS; do
  r=$(run "$FLOWS_CMD" "$k")
  mbps[$k]=${r%% *}
  want=$((k * PER_FLOW < AGGREGATE ? k * PER_FLOW : AGGREGATE))
  rows+=("$k ${mbps[$k]} $(awk -v w="$want" 'BEGIN { printf "%.1f", w / 8 }')")
done

echo
echo "per-flow cap $PER_FLOW Mbit/s ($(awk -v c="$PER_FLOW" 'BEGIN { printf "%.1f", c / 8 }') MB/s), aggregate $AGGREGATE Mbit/s ($(awk -v a="$AGGREGATE" 'BEGIN { printf "%.1f", a / 8 }') MB/s), $RUN_SECONDS s per run, $FROM -> $TO"
echo "(limit = min(K x per-flow cap, aggregate); MB/s as the command measured it)"
printf '%6s %12s %12s %9s\n' flows "MB/s" "limit MB/s" "of limit"
for row in "${rows[@]}"; do
  read -r k m w <<<"$row"
  printf '%6s %12s %12s %9s\n' "$k" "$m" "$w" "$(awk -v m="$m" -v w="$w" 'BEGIN { printf "%.2f", m / w }')"
done
echo
# A text plot: one bar per K, scaled to the aggregate cap (60 columns).
amb=$(awk -v a="$AGGREGATE" 'BEGIN { print a / 8 }')
for row in "${rows[@]}"; do
  read -r k m _ <<<"$row"
  printf 'K=%-3s |%s %s\n' "$k" "$(awk -v m="$m" -v a="$amb" 'BEGIN { n = int(60 * m / a + 0.5); if (n > 70) n = 70; s = ""; for (i = 0; i < n; i++) s = s "#"; print s }')" "$m"
done
echo "       (60 columns = the aggregate cap, $amb MB/s)"

# One flow throttled to half the cap.
slow=$((PER_FLOW / 2))
ci/netns/flowcap.sh apply "$prefix" --per-flow "${PER_FLOW}mbit" --aggregate "${AGGREGATE}mbit" --slow-port "$PORT" --slow-rate "${slow}mbit" >&2
echo
r=$(run "$FLOWS_CMD" "$SLOW_K")
# $r is split on purpose: total, then the per-flow rates.
# shellcheck disable=SC2086
python3 -c '
import sys
k, port, total, per = int(sys.argv[1]), sys.argv[2], sys.argv[3], [float(x) for x in sys.argv[4:]]
head = f"one slow flow (port {port} at half the cap), the sweep command with {k} flows: {total} MB/s"
if per:
    print(f"{head}; per flow: sum {sum(per) / 8:.1f} MB/s (what an adaptive split can reach at "
          f"best), {k} x the slowest {k * min(per) / 8:.1f} MB/s (what an equal split is held to)")
else:
    print(f"{head} (it reports no per-flow rates)")
' "$SLOW_K" "$PORT" $r
adaptive=n/a equal=n/a
[ -z "$FLOWS_ADAPTIVE_CMD" ] || { r=$(run "$FLOWS_ADAPTIVE_CMD" "$SLOW_K"); adaptive="${r%% *} MB/s"; }
[ -z "$FLOWS_EQUAL_CMD" ] || { r=$(run "$FLOWS_EQUAL_CMD" "$SLOW_K"); equal="${r%% *} MB/s"; }

val() { if [ -n "${mbps[$1]:-}" ]; then echo "${mbps[$1]} MB/s"; else echo n/a; fi; }
echo "flows: K=1 $(val 1), K=4 $(val 4), K=8 $(val 8); one slow flow: adaptive $adaptive, equal $equal"
