#!/usr/bin/env bash
# ci/launchers/setup.sh: the launchers efa-core is tested under (efa-core/tests/launchers.rs).
#
#   ci/launchers/setup.sh install         install Open MPI, MPICH and Slurm + munge (apt, root)
#   ci/launchers/setup.sh start DIR       start a private one-node Slurm cluster in DIR
#   ci/launchers/setup.sh stop DIR        stop it (and its munged) and remove DIR
#   ci/launchers/setup.sh status DIR      exit 0 if that cluster answers
#
# Open MPI and MPICH coexist on Debian: the alternatives system points `mpirun`/`mpiexec` at
# one of them (Open MPI, by priority), and each stays reachable by its own name:
# `mpirun.openmpi` and `mpiexec.hydra` (= `mpiexec.mpich`). The tests use those names.
#
# The Slurm cluster is private to DIR and touches no system configuration: its own munged
# (socket, key, log in DIR), slurmctld and slurmd as root with StateSaveLocation, spool, logs
# and pid files in DIR, on two ports picked at start (so it does not collide with a system
# Slurm on 6817/6818 or with another private cluster), one node (this host, 127.0.0.1, all
# its CPUs), one partition `debug`, proctrack/linuxproc and task/none (no cgroups needed),
# select/cons_tres. `start` prints `SLURM_CONF=DIR/slurm.conf`; srun, sinfo and scontrol use
# the cluster when that variable is exported. Job ids start at a random FirstJobId, so the
# per-job file stores of different clusters' jobs (/tmp/efa-store-slurm-<job>.<step>) do not
# collide.
#
# Exit status: 0 done; 1 failed (the reason and the daemons' logs are printed); 2 cannot be
# done on this machine (not root, or the packages are missing), with the reason.
set -uo pipefail

die() { echo "launchers/setup.sh: $*" >&2; exit 1; }
cannot() { echo "launchers/setup.sh: $*" >&2; exit 2; }

install() {
  local want=() p
  command -v mpirun.openmpi >/dev/null || want+=(openmpi-bin)
  command -v mpiexec.hydra >/dev/null || want+=(mpich)
  command -v slurmctld >/dev/null || want+=(slurmctld)
  command -v slurmd >/dev/null || want+=(slurmd)
  command -v srun >/dev/null || want+=(slurm-client)
  command -v munged >/dev/null || want+=(munge)
  if [ ${#want[@]} -eq 0 ]; then echo "launchers/setup.sh: Open MPI, MPICH, Slurm and munge are installed"; return 0; fi
  [ "$(id -u)" -eq 0 ] || cannot "not root: cannot install ${want[*]}"
  echo "launchers/setup.sh: installing ${want[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Package scripts must not start the system's munge/slurm services.
  local policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' > $policy; chmod +x $policy; created=1; fi
  apt-get install -y -q --no-install-recommends "${want[@]}" >/tmp/efa-launchers-apt.log 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${want[@]}" >/tmp/efa-launchers-apt.log 2>&1; }
  local rc=$?
  [ $created -eq 0 ] || rm -f $policy
  [ $rc -eq 0 ] || { tail -20 /tmp/efa-launchers-apt.log >&2; die "apt-get install ${want[*]} failed"; }
  for p in mpirun.openmpi mpiexec.hydra slurmctld slurmd srun munged; do
    command -v $p >/dev/null || die "$p is still missing after installing"
  done
}

logs() {
  local d=$1 f
  for f in munged.log slurmctld.log slurmd.log; do
    [ -s "$d/$f" ] && { echo "---- $d/$f (last 15 lines)"; tail -15 "$d/$f"; }
  done >&2
}

stop() {
  local d=$1 f pid
  [ -d "$d" ] || return 0
  for f in slurmd.pid slurmctld.pid munged.pid; do
    pid=$(cat "$d/$f" 2>/dev/null) || continue
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  # Only DIRs this script made are removed.
  [ -f "$d/.efa-launchers" ] && rm -rf "$d"
  return 0
}

start() {
  local d=$1 host cpus port
  [ "$(id -u)" -eq 0 ] || cannot "not root: slurmd must run as root"
  for p in slurmctld slurmd srun scontrol munged; do
    command -v $p >/dev/null || cannot "$p not installed: run ci/launchers/setup.sh install"
  done
  mkdir -p "$d"/{state,spool} && touch "$d/.efa-launchers" || die "cannot create $d"
  d=$(cd "$d" && pwd)
  host=$(hostname -s)
  cpus=$(nproc)
  # Two free ports in 20000..29999 (below the ephemeral range).
  port=$(python3 -c 'import socket,random
for _ in range(200):
    p = random.randrange(20000, 29998, 2)
    try:
        for q in (p, p + 1):
            s = socket.socket(); s.bind(("127.0.0.1", q)); s.close()
        print(p); break
    except OSError: pass' 2>/dev/null) || port=$((20000 + RANDOM % 4999 * 2))

  # munged: its own socket and key; runs as root (--force), which munged otherwise refuses.
  head -c 1024 /dev/urandom > "$d/munge.key" && chmod 600 "$d/munge.key"
  munged --force --socket="$d/munge.sock" --key-file="$d/munge.key" --pid-file="$d/munged.pid" \
    --log-file="$d/munged.log" --seed-file="$d/munged.seed" >"$d/munged.out" 2>&1 ||
    { cat "$d/munged.out" >&2; logs "$d"; stop "$d"; die "munged did not start"; }

  cat > "$d/slurm.conf" <<EOF
# Private one-node cluster made by ci/launchers/setup.sh; remove with: setup.sh stop $d
ClusterName=efa-ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$d/munge.sock
CredType=cred/munge
StateSaveLocation=$d/state
SlurmdSpoolDir=$d/spool
SlurmctldPidFile=$d/slurmctld.pid
SlurmdPidFile=$d/slurmd.pid
SlurmctldLogFile=$d/slurmctld.log
SlurmdLogFile=$d/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
FirstJobId=$((1000 + RANDOM * 30))
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF="$d/slurm.conf"
  slurmctld -i >"$d/slurmctld.out" 2>&1 || { cat "$d/slurmctld.out" >&2; logs "$d"; stop "$d"; die "slurmctld did not start"; }
  slurmd >"$d/slurmd.out" 2>&1 || { cat "$d/slurmd.out" >&2; logs "$d"; stop "$d"; die "slurmd did not start"; }
  local state=""
  for _ in $(seq 1 100); do
    state=$(sinfo -h -n "$host" -o %t 2>/dev/null | head -1)
    case $state in idle|mix|alloc) break ;; esac
    sleep 0.2
  done
  case $state in
    idle|mix|alloc) ;;
    *) logs "$d"; stop "$d"; die "node $host did not become idle (state '${state:-none}')" ;;
  esac
  echo "launchers/setup.sh: Slurm up in $d (node $host, $cpus CPUs, ports $port/$((port + 1)))"
  echo "SLURM_CONF=$d/slurm.conf"
}

case "${1:-}" in
  install) install ;;
  start) [ -n "${2:-}" ] || die "usage: $0 start DIR"; start "$2" ;;
  stop) [ -n "${2:-}" ] || die "usage: $0 stop DIR"; stop "$2" ;;
  status) [ -n "${2:-}" ] || die "usage: $0 status DIR"; SLURM_CONF="$2/slurm.conf" scontrol ping 2>/dev/null | grep -q UP ;;
  *) die "usage: $0 install | start DIR | stop DIR | status DIR" ;;
esac
