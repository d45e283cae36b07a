#!/usr/bin/env bash
# Compile-check efa-ffi and efa-fabric against libfabric 2.x headers.
#
# The 2.x headers come from Debian 13 ("trixie")'s libfabric-dev (2.1.0 at the time of writing),
# fetched with apt into a private apt state directory and unpacked with dpkg-deb into a private
# prefix. Nothing is installed on the host: its libfabric (1.17 on Debian 12) and its apt sources
# are left as they are, so the normal 1.17 build and tests are unaffected. (Installing trixie's
# libfabric1 on Debian 12 is not possible anyway: it needs glibc >= 2.38.)
#
# Only compilation is checked (`cargo check`, no link): trixie's libfabric.so cannot run on a
# Debian 12 host.
#
# Usage: ci/check-libfabric2.sh [extra cargo check args, e.g. --all-targets]
# Environment:
#   LF2_SUITE        Debian suite to take libfabric-dev from (default: trixie)
#   LF2_VERSION      exact libfabric-dev version (default: the suite's current one)
#   LF2_WORK         scratch directory (default: ${TMPDIR:-/tmp}/efa-rs-libfabric2)
#   LF2_TARGET_DIR   CARGO_TARGET_DIR for the check (default: <repo>/target/libfabric2)
#   LF2_REFRESH=1    fetch again even if a prefix is already unpacked
#   DEBIAN_MIRROR    Debian archive URI (default: the first non-security URI in the host's apt sources)
#
# Result: the last line on stderr/stdout is "check-libfabric2: RESULT: PASS|FAIL|NOT RUN ...".
# Exit status: 0 = PASS; 2 = NOT RUN, only when the check could not be attempted here (not a
# Debian-based host, no apt source, the archive unreachable), always with the "RESULT: NOT
# RUN" line; 1 = FAIL, including any unexpected error of a command of this script (an ERR
# trap maps every such error to 1, so that e.g. `ls` or `dpkg-deb` exiting 2 under `set -e`
# can never pass for NOT RUN).
set -eEuo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SUITE=${LF2_SUITE:-trixie}
WANT_VERSION=${LF2_VERSION:-}
WORK=${LF2_WORK:-${TMPDIR:-/tmp}/efa-rs-libfabric2}
TARGET=${LF2_TARGET_DIR:-$ROOT/target/libfabric2}
PREFIX=$WORK/prefix
STAMP=$PREFIX/.libfabric-dev-version

say() { echo "check-libfabric2: $*"; }
# The only way to exit 2: the check cannot be attempted on this host.
not_run() { say "RESULT: NOT RUN: $*" >&2; exit 2; }
fail() { say "ERROR: $*" >&2; say "RESULT: FAIL" >&2; exit 1; }
trap 'rc=$?; say "ERROR: line $LINENO: \`$BASH_COMMAND\` exited $rc" >&2; say "RESULT: FAIL" >&2; exit 1' ERR

for tool in apt-get apt-cache dpkg-deb cargo; do
    command -v "$tool" >/dev/null || not_run "'$tool' not found (this check needs a Debian-based host)"
done

debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    local uri=""
    # deb822 sources (Debian 12 default), then one-line sources.
    uri=$( (grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null || true) |
        awk '{for (i = 2; i <= NF; i++) print $i}' | grep -v security | head -n1 || true)
    if [ -z "$uri" ]; then
        uri=$( (grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true) |
            awk '{for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break }}' |
            grep -v security | head -n1 || true)
    fi
    echo "$uri"
}

fetch() {
    local mirror apt_dir keyring pkg deb
    mirror=$(debian_mirror)
    [ -n "$mirror" ] || not_run "no Debian archive URI found in the apt sources; set DEBIAN_MIRROR"
    apt_dir=$WORK/apt
    rm -rf "$apt_dir" "$PREFIX"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs" "$PREFIX"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [ -f "$keyring" ] || not_run "$keyring missing (apt-get install debian-archive-keyring)"
    echo "deb [signed-by=$keyring] $mirror $SUITE main" >"$apt_dir/sources.list"
    local opts=(
        -o "Dir::Etc::SourceList=$apt_dir/sources.list"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::State::Lists=$apt_dir/lists"
        -o "Dir::Cache=$apt_dir/cache"
        -o "APT::Sandbox::User=$(id -un)"
    )
    say "fetching the $SUITE package index (private apt state in $apt_dir)"
    apt-get "${opts[@]}" -qq update || not_run "apt-get update for $SUITE failed (is $mirror reachable?)"
    pkg=libfabric-dev
    [ -z "$WANT_VERSION" ] || pkg="libfabric-dev=$WANT_VERSION"
    say "downloading $pkg from $SUITE"
    (cd "$apt_dir/debs" && apt-get "${opts[@]}" -qq download "$pkg") ||
        not_run "apt-get download $pkg from $SUITE failed (is $mirror reachable?)"
    deb=$(find "$apt_dir/debs" -maxdepth 1 -name 'libfabric-dev_*.deb' -print -quit)
    [ -n "$deb" ] || fail "apt-get download $pkg succeeded but left no libfabric-dev_*.deb in $apt_dir/debs"
    dpkg-deb -x "$deb" "$PREFIX"
    dpkg-deb -f "$deb" Version >"$STAMP"
}

if [ "${LF2_REFRESH:-0}" = 1 ] || [ ! -f "$STAMP" ] || [ ! -f "$PREFIX/usr/include/rdma/fabric.h" ] ||
    { [ -n "$WANT_VERSION" ] && [ "$(cat "$STAMP")" != "$WANT_VERSION" ]; }; then
    fetch
else
    say "reusing libfabric-dev $(cat "$STAMP") unpacked in $PREFIX (LF2_REFRESH=1 to fetch again)"
fi

DEB_VERSION=$(cat "$STAMP")
FABRIC_H=$PREFIX/usr/include/rdma/fabric.h
define() { awk -v n="$1" '$1 == "#define" && $2 == n { print $3; exit }' "$FABRIC_H"; }
MAJOR=$(define FI_MAJOR_VERSION)
MINOR=$(define FI_MINOR_VERSION)
REV=$(define FI_REVISION_VERSION)
[ -n "$MAJOR" ] && [ "$MAJOR" -ge 2 ] ||
    fail "libfabric-dev $DEB_VERSION from $SUITE has headers ${MAJOR:-?}.${MINOR:-?}, not 2.x"
say "libfabric-dev $DEB_VERSION: headers $MAJOR.$MINOR.$REV in $PREFIX/usr/include"

cd "$ROOT"
say "LIBFABRIC_DIR=$PREFIX/usr CARGO_TARGET_DIR=$TARGET cargo check -p efa-ffi -p efa-fabric $*"
if LIBFABRIC_DIR=$PREFIX/usr CARGO_TARGET_DIR=$TARGET cargo check -p efa-ffi -p efa-fabric "$@"; then
    say "RESULT: PASS (efa-ffi and efa-fabric compile against libfabric $MAJOR.$MINOR.$REV headers)"
else
    say "RESULT: FAIL (efa-ffi/efa-fabric do not compile against libfabric $MAJOR.$MINOR.$REV headers)" >&2
    exit 1
fi
