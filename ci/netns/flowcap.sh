#!/usr/bin/env bash
# ci/netns/flowcap.sh: an emulated EC2 per-flow bandwidth cap on the hosts of ci/netns/hosts.sh.
#
#   flowcap.sh apply PREFIX --per-flow RATE --aggregate RATE [--hosts h1,h3] [--ports BASE]
#                           [--slow-port PORT --slow-rate RATE]...
#   flowcap.sh throttle PREFIX --slow-port PORT --slow-rate RATE... [--hosts h1,h3] [--ports BASE]
#   flowcap.sh clear PREFIX [--hosts h1,h3]
#   flowcap.sh show PREFIX [--hosts h1,h3]
#   flowcap.sh window                  print the default port window: "30464 30719"
#
# RATE is an integer with a unit: bit, kbit, mbit or gbit (10^3 steps, as tc counts), e.g.
# 300mbit. Exit status: 0 done, 1 a tc/ip command failed (its message is printed), 2 bad usage.
#
# What it emulates. EC2 caps each flow (5-tuple) between two instances (5 Gbit/s outside a
# placement group) far below the instance's ENA limit (up to 100 Gbit/s), in each direction, at
# the sending instance's Nitro card. Here every chosen host (default h1 and h3, the pair that
# talks across the router, as the IP route does) gets, on the egress of its efa0:
#
#   htb root 1:  (default class 1:2)
#   `-- 1:1  rate = ceil = --aggregate           the instance's limit (all of its egress)
#       |-- 1:2   ceil --per-flow                traffic that is not a TCP flow of the window
#       |         (ARP, ICMP, other ports): capped as one flow
#       `-- 1:1XX ceil --per-flow (or --slow-rate for a --slow-port), XX = port & 0xff: one
#                 class per listening port BASE .. BASE+255
#
# Every leaf class's guaranteed `rate` is aggregate/257 (there are 257 leaves, so even all of
# them busy at that rate stay within the aggregate); above it a class borrows from 1:1 up to its
# `ceil`. So one flow gets at most its ceil, and K busy flows get min(K x per-flow, aggregate)
# in total, shared by htb's round robin (quantum 64 KiB, the largest GSO packet). The cap applies at each host's egress, so it holds in both directions of a flow
# when both of its hosts are capped (the default), as EC2's does.
#
# How a flow is recognised. The host kernel here has htb, tbf and the u32 classifier with hash
# tables, but neither sch_fq (whose maxrate is a per-flow cap) nor cls_flow. A u32 hash table
# hashes at most 8 bits of one field, so a true 5-tuple hash is not available. Instead a flow
# is identified by its LISTENING port, which must lie in the window BASE .. BASE+255 (BASE a
# multiple of 256, default 30464 = 0x7700, below Linux's ephemeral range 32768-60999):
#   - filter 800::800 (IPv4 TCP, source port in the window): hash on the source port's low 8 bits;
#   - filter 800::801 (else, destination port in the window): hash on the destination port's;
#   each of the 256 buckets of those two tables sends the packet to class 1:1XX.
# A packet leaving the listening side has it as source port, one leaving the connecting side as
# destination port, so both directions of a connection land in the class of its listening
# port. The window is also put into net.ipv4.ip_local_reserved_ports of each capped host, so
# the kernel never picks one of its ports as an ephemeral (connecting) port.
# Hence the rule for traffic measured under the cap: EACH FLOW MUST LISTEN ON ITS OWN PORT OF
# THE WINDOW (ci/netns/flowtool.py serve --port BASE; libfabric's tcp provider:
# FI_TCP_PORT_LOW_RANGE=BASE FI_TCP_PORT_HIGH_RANGE=BASE+255). Two connections accepted on one
# listening port share one cap, unlike on EC2. Assumes IPv4 headers without options (Linux TCP
# sends none).
#
# --slow-port PORT --slow-rate RATE (repeatable) caps the flow listening on PORT (in the window)
# at RATE instead of --per-flow: one throttled flow for the adaptive-striping test (e.g. half
# the cap). `throttle` does the same on a cap already applied, in place (tc class change), so
# running flows keep their connections: for a port only known once the flows are up (libfabric
# picks its listening ports at random in the range; `ip netns exec PREFIX-h3 ss -tln` lists
# them). `throttle --slow-rate` with the per-flow rate undoes it.
#
# Namespaces come from ci/netns/hosts.sh up PREFIX; deleting them (hosts.sh down) removes the
# qdiscs too. `apply` replaces a cap applied before. `clear` removes the qdisc and the reserved
# ports from the hosts; `show` prints each host's qdisc and the classes that carried traffic,
# with their byte counters (tc -s).
set -euo pipefail

usage() {
  echo "usage: $0 apply PREFIX --per-flow RATE --aggregate RATE [--hosts h1,h3] [--ports BASE] [--slow-port PORT --slow-rate RATE]..." >&2
  echo "       $0 throttle PREFIX --slow-port PORT --slow-rate RATE... [--hosts h1,h3] [--ports BASE]" >&2
  echo "       $0 clear PREFIX [--hosts h1,h3] | show PREFIX [--hosts h1,h3] | window" >&2
  exit 2
}
bad() { echo "flowcap.sh: $*" >&2; exit 2; }
die() { echo "flowcap.sh: $*" >&2; exit 1; }

# bit/s of a tc-style rate: "300mbit" -> 300000000. Bytes-per-second units (tc's "bps",
# "mbps") are refused rather than guessed.
bits() {
  local v=$1 n u
  [[ $v =~ ^([0-9]+)(bit|kbit|mbit|gbit)$ ]] || bad "rate '$v': expected an integer and bit, kbit, mbit or gbit (e.g. 300mbit)"
  n=${BASH_REMATCH[1]} u=${BASH_REMATCH[2]}
  case $u in bit) echo $((n)) ;; kbit) echo $((n * 1000)) ;; mbit) echo $((n * 1000000)) ;; gbit) echo $((n * 1000000000)) ;; esac
}

# htb burst in bytes for a rate in bit/s: 2 ms at that rate, but at least 128 KiB, twice the
# largest (GSO) packet a veth may pass, so that one packet never exceeds the bucket.
burst() { local b=$(($1 / 8 / 500)); [ "$b" -ge 131072 ] || b=131072; echo "$b"; }

DEFAULT_BASE=30464
if [ "${1:-}" = window ]; then echo "$DEFAULT_BASE $((DEFAULT_BASE + 255))"; exit 0; fi
[ $# -ge 2 ] || usage
cmd=$1 prefix=$2
shift 2
[[ $prefix =~ ^[A-Za-z0-9_.-]+$ ]] || bad "PREFIX '$prefix': letters, digits, '.', '_' and '-' only"
hosts=h1,h3 per_flow="" aggregate="" base=$DEFAULT_BASE
slow_ports=() slow_rates=()
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || bad "$1 needs a value"
  case $1 in
    --hosts) hosts=$2 ;;
    --per-flow) per_flow=$(bits "$2") ;;
    --aggregate) aggregate=$(bits "$2") ;;
    --ports) base=$2 ;;
    --slow-port) slow_ports+=("$2") ;;
    --slow-rate) slow_rates+=("$(bits "$2")") ;;
    *) bad "unknown option $1" ;;
  esac
  shift 2
done
[[ $base =~ ^[0-9]+$ ]] && [ "$base" -ge 1024 ] && [ $((base % 256)) -eq 0 ] && [ "$base" -le 65280 ] ||
  bad "--ports $base: a multiple of 256 in 1024..65280"
[[ $hosts =~ ^h[0-9]+(,h[0-9]+)*$ ]] || bad "--hosts '$hosts': a list like h1,h3"
IFS=, read -r -a host_list <<<"$hosts"
for h in "${host_list[@]}"; do
  ip netns list | awk '{print $1}' | grep -qx "$prefix-$h" || die "namespace $prefix-$h does not exist (ci/netns/hosts.sh up $prefix)"
done

ns() { ip netns exec "$prefix-$1" "${@:2}"; }

clear_host() {
  # No root qdisc (already cleared) is not an error; anything else is.
  local out
  if ! out=$(ns "$1" tc qdisc del dev efa0 root 2>&1) && [[ $out != *"Cannot delete qdisc with handle of zero"* && $out != *"No such file"* ]]; then
    die "$prefix-$1: tc qdisc del: $out"
  fi
  ns "$1" sysctl -qw net.ipv4.ip_local_reserved_ports=
}

apply_host() {
  local h=$1 i port ceil class g bf ba hex
  g=$((aggregate / 257))
  [ "$g" -ge 8 ] || g=8
  bf=$(burst "$per_flow") ba=$(burst "$aggregate")
  {
    echo "qdisc add dev efa0 root handle 1: htb default 2"
    echo "class add dev efa0 parent 1: classid 1:1 htb rate ${aggregate}bit ceil ${aggregate}bit burst $ba cburst $ba quantum 65536"
    echo "class add dev efa0 parent 1:1 classid 1:2 htb rate ${g}bit ceil ${per_flow}bit burst $bf cburst $bf quantum 65536"
    for i in $(seq 0 255); do
      port=$((base + i)) ceil=$per_flow
      for j in "${!slow_ports[@]}"; do [ "${slow_ports[$j]}" -eq "$port" ] && ceil=${slow_rates[$j]}; done
      class=$(printf '1:%x' $((0x100 + i)))
      echo "class add dev efa0 parent 1:1 classid $class htb rate ${g}bit ceil ${ceil}bit burst $(burst "$ceil") cburst $(burst "$ceil") quantum 65536"
    done
    # Hash tables 2: (keyed on the source port) and 3: (on the destination port).
    echo "filter add dev efa0 parent 1: prio 1 handle 2: protocol ip u32 divisor 256"
    echo "filter add dev efa0 parent 1: prio 1 handle 3: protocol ip u32 divisor 256"
    for i in $(seq 0 255); do
      hex=$(printf '%x' "$i") class=$(printf '1:%x' $((0x100 + i)))
      echo "filter add dev efa0 parent 1: prio 1 protocol ip u32 ht 2:$hex: match u32 0 0 flowid $class"
      echo "filter add dev efa0 parent 1: prio 1 protocol ip u32 ht 3:$hex: match u32 0 0 flowid $class"
    done
    # In table 800: (tried in this order): TCP with the source port in the window, then TCP
    # with the destination port in it. The port word is at offset 20 (no IP options).
    echo "filter add dev efa0 parent 1: prio 1 protocol ip u32 ht 800:: match ip protocol 6 0xff match ip sport $base 0xff00 hashkey mask 0x00ff0000 at 20 link 2:"
    echo "filter add dev efa0 parent 1: prio 1 protocol ip u32 ht 800:: match ip protocol 6 0xff match ip dport $base 0xff00 hashkey mask 0x000000ff at 20 link 3:"
  } >"$tmp"
  local out
  # A cap applied before (htb cannot be changed into another htb in place) goes first.
  clear_host "$h"
  if ! out=$(ns "$h" tc -batch "$tmp" 2>&1); then
    # No host is left half capped.
    for x in "${host_list[@]}"; do clear_host "$x" || true; done
    die "$prefix-$h: tc -batch failed: $out"
  fi
  ns "$h" sysctl -qw net.ipv4.ip_local_reserved_ports="$base-$((base + 255))"
}

# Checks the --slow-port/--slow-rate pairs.
check_slow() {
  [ "${#slow_ports[@]}" -eq "${#slow_rates[@]}" ] || bad "each --slow-port needs one --slow-rate"
  for p in "${slow_ports[@]}"; do
    [[ $p =~ ^[0-9]+$ ]] && [ "$p" -ge "$base" ] && [ "$p" -le $((base + 255)) ] ||
      bad "--slow-port $p: not in the window $base..$((base + 255))"
  done
}

# The ceil of the class of each --slow-port becomes its --slow-rate, on a cap applied before.
throttle_host() {
  local h=$1 j class line rate b
  for j in "${!slow_ports[@]}"; do
    class=$(printf '1:%x' $((0x100 + slow_ports[j] - base)))
    line=$(ns "$h" tc class show dev efa0 classid "$class")
    # The guaranteed rate stays as apply set it (tc reads back its own units).
    [[ $line =~ " rate "([0-9.]+[A-Za-z]*bit)" " ]] || die "$prefix-$h: no class $class on efa0: apply a cap first (with the same --ports)"
    rate=${BASH_REMATCH[1]} b=$(burst "${slow_rates[$j]}")
    ns "$h" tc class change dev efa0 parent 1:1 classid "$class" htb rate "$rate" ceil "${slow_rates[$j]}bit" burst "$b" cburst "$b" quantum 65536 ||
      die "$prefix-$h: tc class change $class failed"
  done
}

case $cmd in
  throttle)
    [ "${#slow_ports[@]}" -gt 0 ] || bad "throttle needs --slow-port and --slow-rate"
    check_slow
    for h in "${host_list[@]}"; do throttle_host "$h"; done
    for j in "${!slow_ports[@]}"; do
      echo "flowcap.sh: $prefix ${host_list[*]}: the flow listening on port ${slow_ports[$j]} is capped at $((slow_rates[j] / 1000000)) Mbit/s"
    done
    ;;
  apply)
    [ -n "$per_flow" ] && [ -n "$aggregate" ] || bad "apply needs --per-flow and --aggregate"
    check_slow
    [ "$per_flow" -le "$aggregate" ] || bad "--per-flow is above --aggregate"
    tmp=$(mktemp /tmp/flowcap.XXXXXX)
    trap 'rm -f "$tmp"' EXIT
    for h in "${host_list[@]}"; do apply_host "$h"; done
    slow=""
    for j in "${!slow_ports[@]}"; do slow+=", port ${slow_ports[$j]} at $((slow_rates[j] / 1000000)) Mbit/s"; done
    echo "flowcap.sh: $prefix ${host_list[*]}: egress of efa0 capped at $((per_flow / 1000000)) Mbit/s per flow (listening port in $base..$((base + 255))$slow), $((aggregate / 1000000)) Mbit/s in all"
    ;;
  clear)
    for h in "${host_list[@]}"; do clear_host "$h"; done
    ;;
  show)
    for h in "${host_list[@]}"; do
      echo "== $prefix-$h efa0 (reserved ports: $(ns "$h" sysctl -n net.ipv4.ip_local_reserved_ports))"
      ns "$h" tc -s qdisc show dev efa0
      # Only the classes that carried traffic, and the parents.
      ns "$h" tc -s class show dev efa0 | awk '
        /^class/ { if (blk != "") flush(); blk = $0; next }
        { blk = blk "\n" $0 }
        function flush() { if (blk ~ /class htb 1:[12] / || blk !~ /Sent 0 bytes/) print blk; blk = "" }
        END { if (blk != "") flush() }'
    done
    ;;
  *) usage ;;
esac
