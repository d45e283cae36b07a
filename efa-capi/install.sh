#!/usr/bin/env bash
# efa-capi/install.sh: install libefa (libefa.so, libefa.a), efa.h and efa.pc under a prefix.
#
#   efa-capi/install.sh [--prefix DIR] [--from TARGET_PROFILE_DIR]
#
# --prefix   where to install (default /usr/local): DIR/lib, DIR/include, DIR/lib/pkgconfig
# --from     take the libraries from this directory (e.g. target/debug) instead of building
#            them with `cargo build --release -p efa-capi`
# Then: cc prog.c $(pkg-config --cflags --libs efa)   (PKG_CONFIG_PATH=DIR/lib/pkgconfig if
# DIR is not searched by default), or --static with libefa.a.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
prefix=/usr/local
from=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --from) from=$2; shift 2 ;;
    *) echo "install.sh: unknown argument $1 (see the comment at the top)" >&2; exit 2 ;;
  esac
done
if [ -z "$from" ]; then
  (cd "$here/.." && cargo build --release -p efa-capi)
  from="$here/../target/release"
fi
for f in libefa.so libefa.a; do
  [ -f "$from/$f" ] || { echo "install.sh: $from/$f is missing" >&2; exit 1; }
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../Cargo.toml" | head -1)
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
install -m 0755 "$from/libefa.so" "$prefix/lib/libefa.so"
install -m 0644 "$from/libefa.a" "$prefix/lib/libefa.a"
install -m 0644 "$here/include/efa.h" "$prefix/include/efa.h"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$here/efa.pc.in" > "$prefix/lib/pkgconfig/efa.pc"
echo "install.sh: installed libefa $version under $prefix"
