#!/usr/bin/env bash
# ci/netns/flowcap-check.sh: proves the emulated per-flow cap (ci/netns/flowcap.sh) with plain
# TCP flows (ci/netns/flowtool.py), between the namespace hosts h1 and h3 of ci/netns/hosts.sh
# (two subnets, through the router). About 35 s. Needs root; ci/test runs it.
#
# With a per-flow cap C and an aggregate cap A on both hosts it measures, over the steady part
# of each run (flowtool.py: receiver-side goodput, after 1 s of warm-up):
#   1. K = 1, 2, 4, 8 flows h1 -> h3: the total is >= 0.8 x min(K x C, A) (issue 15's bound),
#      no flow exceeds 1.05 x C and the total does not exceed 1.05 x A;
#   2. K = 2 flows h3 -> h1: the same (the cap is applied at both hosts' egress: symmetric);
#   3. K = 4 with the flow of the window's second port throttled to C/2 (--slow-port): that
#      flow gets 0.8..1.05 x C/2, the others 0.8..1.05 x C each;
#   4. `flowcap.sh clear` leaves no htb and no reserved ports;
#   5. under a per-flow cap of 4 x C one flow reaches >= 2 x C: the cap, not the machine, was
#      the limit above. (Not uncapped: one uncapped flow takes a whole core here, 7-18 Gbit/s,
#      and starved the other runs when checks ran side by side.)
#
# Margins. Goodput is at most 1448/1514 = 0.956 of what htb counts (it counts Ethernet, IP
# and TCP headers), so a capped flow measures about 0.95 x C: the lower bound 0.8 leaves 15 %
# for a loaded machine (htb's timers fire late when both cores are busy compiling), and the
# upper bound 1.05 allows for the 50 ms sampling of the rate and htb's 128 KiB bursts while
# still failing if a cap is missing (uncapped, one flow does 8-18 Gbit/s here). The caps
# default to C = 250 Mbit/s and A = 1500 Mbit/s (FLOWCAP_PER_FLOW, FLOWCAP_AGGREGATE, in
# Mbit/s): K = 2 and 4 are limited by the per-flow cap, K = 8 by the aggregate, and 1.5 Gbit/s
# is a sixth or less of what one uncapped flow did (8.7-13 Gbit/s) with 3 such checks and
# other developers' compilers running at once, so the machine is not the bottleneck.
#
# A step whose only failures are lower bounds is run once more and judged by that second run
# (both are printed): load can slow a flow, but it cannot make one exceed its cap, so upper
# bounds and tool failures are never retried. Without the retry, 2 of 2 checks failed once
# (a flow at 197-199.6 against a bound of 200) at load average 30 while a third cap job and
# an uncapped flow ran beside them.
#
# Output: one line per run and per assertion, then `flowcap-check: RESULT: PASS`, `FAIL` (exit
# 1) or `NOT RUN: <why>` (exit 2, where network namespaces cannot be made; it also prints
# "SKIPPED: flowcap-check: <why>").
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

C=${FLOWCAP_PER_FLOW:-250}
A=${FLOWCAP_AGGREGATE:-1500}
SECONDS_PER_RUN=${FLOWCAP_SECONDS:-3}
read -r PORT _ <<<"$(ci/netns/flowcap.sh window)"   # the first port of flowcap.sh's window
HOSTS_SH=ci/netns/hosts.sh
FLOWCAP=ci/netns/flowcap.sh
FLOWTOOL=ci/netns/flowtool.py

[[ $C =~ ^[0-9]+$ && $A =~ ^[0-9]+$ && $C -gt 0 && $C -le $A ]] ||
  { echo "flowcap-check: FLOWCAP_PER_FLOW=$C and FLOWCAP_AGGREGATE=$A must be integers (Mbit/s), 0 < per-flow <= aggregate" >&2; exit 2; }

if ! why=$($HOSTS_SH check); then
  echo "SKIPPED: flowcap-check: network namespaces cannot be created here: $why" >&2
  echo "flowcap-check: RESULT: NOT RUN: network namespaces cannot be created here: $why"
  exit 2
fi

prefix="efans-$$"
$HOSTS_SH gc || true
trap '$HOSTS_SH down "$prefix"' EXIT
trap 'exit 130' INT TERM
$HOSTS_SH up "$prefix" || { echo "flowcap-check: RESULT: FAIL: hosts.sh up $prefix failed"; exit 1; }

CHECK_NAME=flowcap-check
# shellcheck source=ci/netns/checklib.sh
. ci/netns/checklib.sh

# measure FROM TO K: runs K flows, prints "total per-flow..." (Mbit/s); fails (status 1,
# nothing printed) if flowtool.py does.
measure() {
  local json
  json=$(python3 "$FLOWTOOL" run --prefix "$prefix" --from "$1" --to "$2" --port "$PORT" --flows "$3" --seconds "$SECONDS_PER_RUN") || return 1
  echo "flowcap-check: $3 flow(s) $1 -> $2: $json" >&2
  python3 -c 'import json, sys; d = json.loads(sys.argv[1]); print(d["total_mbit"], *d["mbit"])' "$json"
}

# Steps 1 and 2, for FROM TO K.
capped() {
  local r total f i=0 x want=$(($3 * C < A ? $3 * C : A))
  r=$(measure "$1" "$2" "$3") || { hard "K=$3 $1->$2: flowtool.py failed (see above)"; return; }
  read -r total f <<<"$r"
  check "K=$3 $1->$2 total Mbit/s >= 0.8 x min(K x $C, $A)" "$total" ">=" "$(times 0.8 "$want")"
  check "K=$3 $1->$2 total Mbit/s <= 1.05 x aggregate" "$total" "<=" "$(times 1.05 "$A")"
  for x in $f; do
    check "K=$3 $1->$2 flow $i Mbit/s <= 1.05 x per-flow cap" "$x" "<=" "$(times 1.05 "$C")"
    i=$((i + 1))
  done
}

# Step 3: 4 flows, the one on port PORT+1 capped at SLOW.
slow_flow() {
  local r total f0 f1 f2 f3 x
  r=$(measure h1 h3 4) || { hard "K=4 with a slow flow: flowtool.py failed (see above)"; return; }
  read -r total f0 f1 f2 f3 <<<"$r"
  check "slow flow (port $((PORT + 1)), capped at $slow) Mbit/s >= 0.8 x $slow" "$f1" ">=" "$(times 0.8 "$slow")"
  check "slow flow Mbit/s <= 1.05 x $slow" "$f1" "<=" "$(times 1.05 "$slow")"
  for x in "$f0" "$f2" "$f3"; do
    check "a full-rate flow beside the slow one, Mbit/s >= 0.8 x $C" "$x" ">=" "$(times 0.8 "$C")"
    check "a full-rate flow beside the slow one, Mbit/s <= 1.05 x $C" "$x" "<=" "$(times 1.05 "$C")"
  done
}

# Step 4: clear leaves no htb and no reserved ports on either host.
cleared() {
  local h q
  for h in h1 h3; do
    q=$(ip netns exec "$prefix-$h" tc qdisc show dev efa0)
    [[ $q != *htb* ]] || hard "after clear, $prefix-$h efa0 still has: $q"
    q=$(ip netns exec "$prefix-$h" sysctl -n net.ipv4.ip_local_reserved_ports)
    [ -z "$q" ] || hard "after clear, $prefix-$h still reserves ports $q"
  done
  [ "$step_hard" -gt 0 ] || ok "clear removed the qdiscs and the reserved ports of h1 and h3"
}

# Step 5: under a cap of 4 x C, one flow does >= 2 x C.
wider() {
  local r
  r=$(measure h1 h3 1) || { hard "K=1 under a cap of $((4 * C)): flowtool.py failed (see above)"; return; }
  check "K=1 under a per-flow cap of $((4 * C)) Mbit/s >= 2 x $C" "${r%% *}" ">=" $((2 * C))
  check "K=1 under a per-flow cap of $((4 * C)) Mbit/s <= 1.05 x $((4 * C))" "${r%% *}" "<=" "$(times 1.05 $((4 * C)))"
}

echo "flowcap-check: per-flow cap $C Mbit/s, aggregate $A Mbit/s, $SECONDS_PER_RUN s per run, $prefix"
if ! $FLOWCAP apply "$prefix" --per-flow "${C}mbit" --aggregate "${A}mbit"; then
  echo "flowcap-check: RESULT: FAIL: flowcap.sh apply failed"; exit 1
fi
for k in 1 2 4 8; do attempt capped h1 h3 "$k"; done
attempt capped h3 h1 2

slow=$((C / 2))
if $FLOWCAP apply "$prefix" --per-flow "${C}mbit" --aggregate "${A}mbit" --slow-port $((PORT + 1)) --slow-rate "${slow}mbit"; then
  attempt slow_flow
else
  echo "flowcap-check: FAIL: flowcap.sh apply with --slow-port failed"; failures=$((failures + 1))
fi

if $FLOWCAP clear "$prefix"; then
  attempt cleared
else
  echo "flowcap-check: FAIL: flowcap.sh clear failed"; failures=$((failures + 1))
fi

wide=$((4 * C)) wide_agg=$((4 * C > A ? 4 * C : A))
if $FLOWCAP apply "$prefix" --per-flow "${wide}mbit" --aggregate "${wide_agg}mbit"; then
  attempt wider
else
  echo "flowcap-check: FAIL: flowcap.sh apply of the wider cap failed"; failures=$((failures + 1))
fi

if [ "$failures" -eq 0 ]; then
  echo "flowcap-check: RESULT: PASS"
else
  echo "flowcap-check: RESULT: FAIL: $failures assertion(s) failed (see above)"
  exit 1
fi
