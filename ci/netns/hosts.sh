#!/usr/bin/env bash
# ci/netns/hosts.sh: three "hosts" as network namespaces on two subnets, joined by a router.
#
#   ci/netns/hosts.sh up PREFIX     create them (tears down whatever it made if a step fails)
#   ci/netns/hosts.sh down PREFIX   delete them, killing any process still inside
#   ci/netns/hosts.sh check         exit 0 if namespaces can be created here, else print why
#   ci/netns/hosts.sh gc            delete leftovers of runs whose owner PID is gone
#   ci/netns/hosts.sh addr HOST     print HOST's address (h1 -> 10.77.1.11)
#
# Topology (PREFIX like efans-<pid>, so parallel runs never collide):
#
#   PREFIX-h1  efa0 10.77.1.11/24 --+
#                                   +-- br1 10.77.1.1/24 --+
#   PREFIX-h2  efa0 10.77.1.12/24 --+      PREFIX-rt       +-- ip_forward=1
#   PREFIX-h3  efa0 10.77.2.13/24 ------ h3 10.77.2.1/24 --+
#
# Every host has lo up and a default route via the router. The veth pairs are created
# directly inside the namespaces (`ip link add ... netns A type veth peer ... netns B`), so
# no interface, address or route of the initial namespace is created or touched, and no
# namespace has a link to it: traffic between the hosts cannot leave them.
#
# The owner PID is the number after the last '-' of PREFIX when it has the form
# <name>-<pid>; `gc` removes namespaces of such prefixes whose PID is no longer alive.
set -euo pipefail

die() { echo "hosts.sh: $*" >&2; exit 1; }

HOSTS=(h1 h2 h3)
declare -A ADDR=([h1]=10.77.1.11/24 [h2]=10.77.1.12/24 [h3]=10.77.2.13/24)
declare -A GW=([h1]=10.77.1.1 [h2]=10.77.1.1 [h3]=10.77.2.1)

# Prints why namespaces cannot be used here, or nothing.
why_not() {
  [ "$(id -u)" -eq 0 ] || { echo "not root (uid $(id -u)); network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN"; return; }
  command -v ip >/dev/null || { echo "the ip command (iproute2) is not installed"; return; }
  local probe="efans-probe-$$" err
  if ! err=$(ip netns add "$probe" 2>&1); then
    echo "ip netns add failed: $err"; return
  fi
  if ! err=$(ip -n "$probe" link add efa0 type veth peer name efa1 2>&1); then
    ip netns del "$probe" 2>/dev/null || true
    echo "creating a veth pair inside a namespace failed: $err"; return
  fi
  ip netns del "$probe" 2>/dev/null || true
}

down() {
  local p=$1 ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${p}-(h[0-9]+|rt)$" || true); do
    # Anything still running inside would keep the namespace alive: kill it first.
    local pids
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [ -n "$pids" ]; then
      echo "hosts.sh: killing processes left in $ns: $(echo $pids)" >&2
      kill -9 $pids 2>/dev/null || true
    fi
    ip netns del "$ns" 2>/dev/null || echo "hosts.sh: could not delete $ns" >&2
  done
}

up() {
  local p=$1 rt="$1-rt" h ns
  [ -z "$(ip netns list | awk '{print $1}' | grep -E "^${p}-" || true)" ] || die "namespaces with prefix $p exist already"
  trap 'rc=$?; echo "hosts.sh: setting up $p failed at line $LINENO; removing it" >&2; down "$p"; exit $rc' ERR
  ip netns add "$rt"
  ip -n "$rt" link set lo up
  ip netns exec "$rt" sysctl -qw net.ipv4.ip_forward=1
  ip -n "$rt" link add br1 type bridge
  ip -n "$rt" addr add 10.77.1.1/24 dev br1
  ip -n "$rt" link set br1 up
  for h in "${HOSTS[@]}"; do
    ns="$p-$h"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add efa0 netns "$ns" type veth peer name "$h" netns "$rt"
    ip -n "$ns" addr add "${ADDR[$h]}" dev efa0
    ip -n "$ns" link set efa0 up
    ip -n "$rt" link set "$h" up
    if [ "${GW[$h]}" = 10.77.1.1 ]; then
      ip -n "$rt" link set "$h" master br1
    else
      ip -n "$rt" addr add "${GW[$h]}/24" dev "$h"
    fi
    ip -n "$ns" route add default via "${GW[$h]}" dev efa0
  done
  trap - ERR
  # The hosts reach each other across the router before anyone relies on it.
  local i
  for i in $(seq 1 50); do
    if reachable "$p-h1" 10.77.2.13 && reachable "$p-h3" 10.77.1.12; then
      echo "hosts.sh: $p up: h1 ${ADDR[h1]}, h2 ${ADDR[h2]} (bridge in $rt), h3 ${ADDR[h3]}; iface efa0 in each"
      return 0
    fi
    sleep 0.1
  done
  down "$p"
  die "$p: the hosts cannot ping each other through $rt"
}

# Whether namespace $1 reaches $2, without ping (often not installed): a TCP connection to
# a closed port is refused only if the SYN got there and the RST came back.
reachable() {
  local out
  out=$(ip netns exec "$1" timeout 1 bash -c "exec 3<>/dev/tcp/$2/9" 2>&1) && return 0
  [[ $out == *"Connection refused"* ]]
}

gc() {
  local pfx pid
  for pfx in $(ip netns list 2>/dev/null | awk '{print $1}' | sed -nE 's/^(efans-[0-9]+)-(h[0-9]+|rt)$/\1/p' | sort -u); do
    pid=${pfx##*-}
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "hosts.sh: removing stale $pfx (pid $pid is gone)" >&2
      down "$pfx"
    fi
  done
}

case "${1:-}" in
  up) [ -n "${2:-}" ] || die "usage: $0 up PREFIX"; r=$(why_not); [ -z "$r" ] || die "cannot create namespaces: $r"; up "$2" ;;
  down) [ -n "${2:-}" ] || die "usage: $0 down PREFIX"; down "$2" ;;
  check) r=$(why_not); if [ -n "$r" ]; then echo "$r"; exit 1; fi ;;
  gc) gc ;;
  addr) [ -n "${2:-}" ] && [ -n "${ADDR[$2]:-}" ] || die "usage: $0 addr HOST (one of ${HOSTS[*]})"; echo "${ADDR[$2]%/*}" ;;
  *) die "usage: $0 up PREFIX | down PREFIX | check | gc | addr HOST" ;;
esac
