#!/usr/bin/env bash
# ci/vm/softroce.sh -- run test commands inside a VM that has a soft-RoCE
# (rdma_rxe) verbs device, on libfabric provider "verbs;ofi_rxm".
#
# Why a VM: the CI host kernel has no RDMA support at all, so rdma_rxe cannot
# be loaded there.  Debian's stock kernel (linux-image-amd64) ships
# rdma_rxe.ko, and virtme-ng (`vng`) boots that kernel under qemu with the
# host's root filesystem shared read-only, so binaries built on the host
# (cargo test executables, fi_info, ...) run unchanged inside the guest.
#
# Usage:
#   ci/vm/softroce.sh [--timeout SECS] TESTLIST
#   ci/vm/softroce.sh [--timeout SECS] -- CMD [ARG...]
#
#   TESTLIST  file with one shell command per line; blank lines and lines
#             starting with '#' are ignored.  Each line is run with
#             `bash -c LINE` inside the VM.
#   -- CMD    run a single command (its words are joined with spaces and
#             treated like one TESTLIST line).
#   --timeout hard limit in seconds for the whole VM run (default 600, or
#             $SOFTROCE_TIMEOUT).  On expiry qemu is killed and the stage fails.
#
# Inside the VM each command sees:
#   EFA_TEST_PROVIDER='verbs;ofi_rxm'
#   EFA_TEST_IFACE=<netdev carrying the rxe device>   (dummy0)
#   EFA_TEST_ADDR=<its IPv4>                           (10.10.1.1)
#   EFA_TEST_ADDR1B=<a second IPv4 in the same /24>       (10.10.1.2)
#   EFA_TEST_ADDR2=<a third IPv4 on the same netdev, another /24> (10.10.2.1)
#   FI_UNIVERSE_SIZE=64 (unless already set; see below)
#   TMPDIR=/tmp (a writable overlay inside the guest)
#   SOFTROCE_OUT=<host dir shared read-write into the guest; logs go here>
#
# A command passes only if it exits 0 and ci/vm/check-ran.sh finds that it
# tested something: a test binary that ran 0 tests fails, and so does a
# command whose --exact NAME did not run or printed "SKIPPED: NAME: ...".
#
# Output: one "softroce: PASS <cmd>" / "softroce: FAIL (rc=N) <cmd>" per
# command, then exactly one summary line
#   softroce: N passed, N failed
# Exit status: 0 only if at least one command ran and all passed.  If the
# rxe / verbs setup is broken, nothing is run and the stage FAILS (every
# listed command is counted as failed).
#
# Environment knobs:
#   SOFTROCE_TIMEOUT=600      same as --timeout
#   SOFTROCE_CMD_TIMEOUT=0    per-command timeout inside the VM (0 = none)
#   SOFTROCE_SKIP_RXE=1       do NOT run `rdma link add` (negative test: the
#                             stage must then fail)
#   SOFTROCE_KERNEL=/boot/vmlinuz-X   force a kernel (default: newest one in
#                             /boot whose modules include rdma_rxe.ko)
#   SOFTROCE_MEMORY=2G SOFTROCE_CPUS=2   VM size
#   SOFTROCE_OUT=DIR          where logs/results go (default: mktemp -d)
#   SOFTROCE_RWDIRS="D1 D2"   extra host dirs to share read-write
#   SOFTROCE_KVM=1            try KVM (default: software emulation; KVM
#                             hangs/asserts on the nested CI machine)
#   SOFTROCE_NO_INSTALL=1     never install packages, just report
#   SOFTROCE_VNG_VERSION=1.42 virtme-ng version pip installs
#
# FI_UNIVERSE_SIZE: with libfabric 1.17, ofi_rxm sizes its verbs MSG CQ from
# the universe size (default 256) and rxe's max_cqe is 32767, so fi_enable()
# fails with -EINVAL ("Unable to create verbs CQ") unless FI_UNIVERSE_SIZE is
# <= 127.  We export 64 unless the caller set it.
#
# Tested on: Debian 12.11 host, guest kernel 6.1.0-56-amd64 (Debian), qemu
# 7.2 (TCG), virtme-ng 1.42, libfabric 1.17.0, rdma-core 44.0.
set -euo pipefail

log() { printf 'softroce: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

# ---------------------------------------------------------------- arguments
TIMEOUT="${SOFTROCE_TIMEOUT:-600}"
TESTLIST=""
SINGLE_CMD=""
while [ $# -gt 0 ]; do
    case "$1" in
        --timeout) [ $# -ge 2 ] || die "--timeout needs a value"; TIMEOUT="$2"; shift 2 ;;
        --timeout=*) TIMEOUT="${1#--timeout=}"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; [ $# -gt 0 ] || die "no command after --"; SINGLE_CMD="$*"; break ;;
        -*) die "unknown option $1" ;;
        *) [ -z "$TESTLIST" ] || die "only one TESTLIST allowed"; TESTLIST="$1"; shift ;;
    esac
done
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds"
if [ -n "$SINGLE_CMD" ] && [ -n "$TESTLIST" ]; then die "give either TESTLIST or -- CMD, not both"; fi
if [ -z "$SINGLE_CMD" ] && [ -z "$TESTLIST" ]; then die "usage: $0 [--timeout SECS] TESTLIST | -- CMD..."; fi

# Collect the commands (host side) so we know how many should run.
CMDS=()
if [ -n "$SINGLE_CMD" ]; then
    CMDS=("$SINGLE_CMD")
else
    [ -r "$TESTLIST" ] || die "cannot read TESTLIST $TESTLIST"
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line%$'\r'}"
        [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
        CMDS+=("$line")
    done < "$TESTLIST"
fi
NCMDS=${#CMDS[@]}
if [ "$NCMDS" -eq 0 ]; then
    log "no commands to run"
    echo "softroce: 0 passed, 0 failed"
    exit 1
fi

# ---------------------------------------------------------------- packages
# Debian packages: qemu to run the VM, the stock kernel for rdma_rxe.ko,
# busybox (virtme-ng's initramfs fallback), rdma-core/ibverbs-* for the rxe
# userspace provider and the `rdma` tool (iproute2), libfabric-bin for
# fi_info / fi_pingpong (and libfabric1 itself).
APT_PKGS=(qemu-system-x86 linux-image-amd64 busybox-static rdma-core
          ibverbs-providers ibverbs-utils iproute2 libfabric-bin kmod)
# python3-pip only if there is no pip at all (pyenv, for one, brings its own).
python3 -m pip --version >/dev/null 2>&1 || APT_PKGS+=(python3-pip)
VNG_VERSION="${SOFTROCE_VNG_VERSION:-1.42}"

missing_pkgs() {
    local p
    for p in "${APT_PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
    done
}

MISSING=$(missing_pkgs | tr '\n' ' ')
NEED_VNG=0
command -v vng >/dev/null 2>&1 || NEED_VNG=1
PIP_CMD="python3 -m pip install virtme-ng==$VNG_VERSION"
if [ -n "${MISSING// /}" ] || [ "$NEED_VNG" = 1 ]; then
    if [ "$(id -u)" != 0 ] || [ "${SOFTROCE_NO_INSTALL:-0}" = 1 ]; then
        log "missing prerequisites; run as root:"
        [ -n "${MISSING// /}" ] && log "  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $MISSING"
        [ "$NEED_VNG" = 1 ] && log "  $PIP_CMD   (add --break-system-packages on Debian's system python)"
        echo "softroce: 0 passed, $NCMDS failed"
        exit 2
    fi
    if [ -n "${MISSING// /}" ]; then
        log "installing: $MISSING"
        apt-get update -qq
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $MISSING >&2
    fi
    if [ "$NEED_VNG" = 1 ]; then
        log "installing virtme-ng $VNG_VERSION from PyPI"
        # Debian's system python refuses plain pip installs (PEP 668).
        $PIP_CMD -q >&2 2>&1 || $PIP_CMD -q --break-system-packages >&2
        hash -r
    fi
fi
VNG=$(command -v vng) ||
    VNG=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/vng
[ -x "$VNG" ] || die "vng not found on PATH after install"

# ---------------------------------------------------------------- kernel
# Newest /boot/vmlinuz-<ver> whose /lib/modules/<ver> contains rdma_rxe.ko
# (possibly compressed).
find_kernel() {
    local k ver
    for k in $(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -rV); do
        ver="${k#/boot/vmlinuz-}"
        if [ -n "$(find "/lib/modules/$ver" -name 'rdma_rxe.ko*' -print -quit 2>/dev/null)" ]; then
            echo "$k"; return 0
        fi
    done
    return 1
}
KERNEL="${SOFTROCE_KERNEL:-}"
[ -n "$KERNEL" ] || KERNEL=$(find_kernel) || die "no /boot/vmlinuz-* with rdma_rxe.ko in /lib/modules (install linux-image-amd64)"
[ -r "$KERNEL" ] || die "kernel $KERNEL not readable"
log "kernel: $KERNEL; virtme-ng: $("$VNG" --version 2>&1 | head -1)"

# ---------------------------------------------------------------- work dir
# The guest sees the host filesystem read-only (with tmpfs overlays on /tmp,
# /var, /etc, ... whose writes are lost).  OUT is shared read-write with
# --rwdir so logs and the result file come back to the host.
OUT="${SOFTROCE_OUT:-$(mktemp -d /tmp/softroce.XXXXXX)}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd -P)
rm -f "$OUT/result" "$OUT"/cmd-*.log
printf '%s\n' "${CMDS[@]}" > "$OUT/commands"

# The guest script.  Values are baked in with printf %q because the guest
# does not inherit this shell's environment.
GUEST="$OUT/guest.sh"
{
    echo '#!/bin/bash'
    printf 'OUT=%q\n' "$OUT"
    printf 'SKIP_RXE=%q\n' "${SOFTROCE_SKIP_RXE:-0}"
    printf 'CMD_TIMEOUT=%q\n' "${SOFTROCE_CMD_TIMEOUT:-0}"
    printf 'UNIV=%q\n' "${FI_UNIVERSE_SIZE:-64}"
    printf 'HOST_PATH=%q\n' "$PATH"
    printf 'CHECK_RAN=%q\n' "$(cd "$(dirname "$0")" && pwd -P)/check-ran.sh"
    cat <<'GUEST_EOF'
# ---- runs inside the VM as root ----
set -u
export PATH="$HOST_PATH:/usr/sbin:/sbin"
IFACE=dummy0
ADDR=10.10.1.1
ADDR1B=10.10.1.2
ADDR2=10.10.2.1
result() { echo "$1 $2 $3" > "$OUT/result"; sync; }   # passed failed status
setup_fail() {
    echo "softroce: SETUP FAILED: $*"
    n=$(grep -c '' "$OUT/commands")
    result 0 "$n" setup-failed
    exit 3
}
# Memory registration needs a large RLIMIT_MEMLOCK; children inherit it.
ulimit -l unlimited || setup_fail "ulimit -l unlimited"
echo "softroce: guest kernel $(uname -r)"
modprobe rdma_rxe || setup_fail "modprobe rdma_rxe"
# A dummy netdev carries the rxe device: no traffic ever leaves the VM.
# Two /24s on it give tests a second subnet to bind to.
ip link add "$IFACE" type dummy || setup_fail "ip link add $IFACE"
ip addr add "$ADDR/24" dev "$IFACE" || setup_fail "ip addr add $ADDR"
ip addr add "$ADDR1B/24" dev "$IFACE" || setup_fail "ip addr add $ADDR1B"
ip addr add "$ADDR2/24" dev "$IFACE" || setup_fail "ip addr add $ADDR2"
ip link set "$IFACE" up || setup_fail "ip link set $IFACE up"
ip link set lo up
if [ "$SKIP_RXE" = 1 ]; then
    echo "softroce: SOFTROCE_SKIP_RXE=1: not creating the rxe device"
else
    rdma link add rxe0 type rxe netdev "$IFACE" || setup_fail "rdma link add rxe0"
fi
rdma link show
export FI_UNIVERSE_SIZE="$UNIV"
# The stage must fail loudly if verbs;ofi_rxm is not usable.
if ! fi_info -p 'verbs;ofi_rxm' -t FI_EP_RDM > "$OUT/fi_info.txt" 2>&1 ||
   ! grep -q 'domain: rxe0' "$OUT/fi_info.txt"; then
    cat "$OUT/fi_info.txt"
    setup_fail "fi_info -p 'verbs;ofi_rxm' -t FI_EP_RDM finds no rxe0 domain"
fi
echo "softroce: verbs;ofi_rxm ok on rxe0 ($IFACE $ADDR, $ADDR2)"

export EFA_TEST_PROVIDER='verbs;ofi_rxm' EFA_TEST_IFACE="$IFACE" \
       EFA_TEST_ADDR="$ADDR" EFA_TEST_ADDR1B="$ADDR1B" EFA_TEST_ADDR2="$ADDR2" TMPDIR=/tmp SOFTROCE_OUT="$OUT"
pass=0 fail=0 i=0
result 0 0 running
while IFS= read -r cmd; do
    i=$((i + 1))
    echo "softroce: RUN [$i] $cmd"
    start=$(date +%s)
    if [ "$CMD_TIMEOUT" != 0 ]; then
        timeout -k 10 "$CMD_TIMEOUT" bash -c "$cmd" < /dev/null 2>&1 | tee "$OUT/cmd-$i.log"
    else
        bash -c "$cmd" < /dev/null 2>&1 | tee "$OUT/cmd-$i.log"
    fi
    rc=${PIPESTATUS[0]}
    secs=$(( $(date +%s) - start ))
    if [ "$rc" = 0 ] && ! why=$(bash "$CHECK_RAN" "$cmd" "$OUT/cmd-$i.log"); then
        fail=$((fail + 1)); echo "softroce: FAIL [$i] (exit 0 but ${why:-check-ran.sh failed}, ${secs}s) $cmd"
    elif [ "$rc" = 0 ]; then
        pass=$((pass + 1)); echo "softroce: PASS [$i] (${secs}s) $cmd"
    else
        fail=$((fail + 1)); echo "softroce: FAIL [$i] (rc=$rc, ${secs}s) $cmd"
    fi
    result "$pass" "$fail" running
done < "$OUT/commands"
result "$pass" "$fail" done
[ "$fail" = 0 ] && [ "$pass" -gt 0 ]
GUEST_EOF
} > "$GUEST"
chmod +x "$GUEST"

# ---------------------------------------------------------------- boot
VNG_ARGS=(--run "$KERNEL" --memory "${SOFTROCE_MEMORY:-2G}" --cpus "${SOFTROCE_CPUS:-2}"
          --rwdir "$OUT" --verbose)
[ "${SOFTROCE_KVM:-0}" = 1 ] || VNG_ARGS+=(--disable-kvm)
for d in ${SOFTROCE_RWDIRS:-}; do VNG_ARGS+=(--rwdir "$d"); done
VNG_ARGS+=(--exec "bash $GUEST 2>&1")

log "booting VM (timeout ${TIMEOUT}s, logs in $OUT)"
T0=$(date +%s)
set +e
# No stdin (CI has none; vng works without a TTY when stdin is /dev/null).
# timeout(1) runs vng in its own process group and kills the whole group
# (vng and qemu) on expiry; -k escalates to SIGKILL.
# The guest script's output (stdout+stderr merged) comes out on vng's stdout;
# vng's stderr (qemu messages and, with --verbose, the guest kernel console)
# goes to console.log, shown only if the VM produced no result.
# qemu reopens /proc/self/fd/1 for the guest's output; if our stdout is a
# regular file that gives it a fresh file offset and it overwrites what we
# wrote, so always hand it a pipe (| cat).
timeout -k 15 "$TIMEOUT" "$VNG" "${VNG_ARGS[@]}" < /dev/null 2> "$OUT/console.log" | cat
VNG_RC=${PIPESTATUS[0]}
set -e
T1=$(date +%s)
log "VM finished: vng exit $VNG_RC after $((T1 - T0))s"

# ---------------------------------------------------------------- verdict
# The guest writes "PASSED FAILED STATUS" to $OUT/result; vng's exit code is
# the guest command's exit code (checked with virtme-ng 1.42), but the file is
# the source of truth (it also survives a crash after the tests ran).
PASSED=0 FAILED=$NCMDS STATUS=no-result
if [ -s "$OUT/result" ]; then read -r PASSED FAILED STATUS < "$OUT/result"; fi
RC=0
if [ "$VNG_RC" = 124 ] || [ "$VNG_RC" = 137 ]; then
    log "ERROR: VM timed out after ${TIMEOUT}s"
    RC=1
fi
case "$STATUS" in
    done) ;;
    running) log "ERROR: VM stopped before all commands finished"; RC=1
             FAILED=$(( NCMDS - PASSED )) ;;
    setup-failed) log "ERROR: rxe / verbs setup failed inside the VM (see above)"; RC=1 ;;
    *) [ "$RC" = 0 ] || { echo "softroce: 0 passed, $NCMDS failed"; exit 1; }
       log "ERROR: no result from the VM (boot failure?); last lines of $OUT/console.log:"
       tail -n 30 "$OUT/console.log" >&2 || true
       RC=1 ;;
esac
[ "$FAILED" = 0 ] || RC=1
[ "$PASSED" -gt 0 ] || RC=1
if [ "$RC" = 0 ] && [ "$VNG_RC" != 0 ]; then
    log "ERROR: tests passed but vng exited $VNG_RC"; RC=1
fi
echo "softroce: $PASSED passed, $FAILED failed"
exit "$RC"
