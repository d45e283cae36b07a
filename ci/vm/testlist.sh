#!/usr/bin/env bash
# Prints the commands the soft-RoCE VM runs (one per line, for ci/vm/softroce.sh), after
# building the test binaries on the host. Each runs with EFA_TEST_PROVIDER='verbs;ofi_rxm'.
set -euo pipefail
cd "$(dirname "$0")/../.."
# Test executables of the named targets, from cargo's JSON build messages.
json=$(cargo test -p efa-ffi -p efa-fabric -p efa-core -p efa-cli --no-run --message-format=json) ||
  { echo "testlist: building the test binaries failed" >&2; exit 1; }
# The multi-rank tests start their ranks under efarun, which they find next to their own
# directory (target/debug/efarun). Inside the VM there is no cargo to build it, so build it here.
cargo build -q -p efarun || { echo "testlist: building efarun failed" >&2; exit 1; }
bins=$(printf '%s\n' "$json" | python3 -c '
import json, sys
want = {"smoke", "datapath", "memory", "comm", "cli", "agree", "rma", "coll"}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in want:
        print(m["target"]["name"], m["executable"])
')
bin_of() {
  local bin
  bin=$(printf '%s\n' "$bins" | awk -v t="$1" '$1 == t {print $2}' | head -1)
  [ -n "$bin" ] || { echo "testlist: no test binary for $1" >&2; exit 1; }
  echo "$bin"
}
# `bin_of T` followed by filter names: each name must be a test of that binary (a renamed
# test fails here, before the VM boots; inside it, ci/vm/check-ran.sh also fails a command
# whose named test did not run).
exact() {
  local bin name list
  bin=$(bin_of "$1") || exit 1
  shift
  for name in "$@"; do
    list=$("$bin" --list --exact "$name" 2>/dev/null) ||
      { echo "testlist: $bin --list failed" >&2; exit 1; }
    grep -qx "$name: test" <<<"$list" ||
      { echo "testlist: $name is not a test of $bin (renamed?)" >&2; exit 1; }
  done
  echo "$bin --test-threads=1 --nocapture --exact $*"
}
# efa-ffi and efa-fabric: everything, on the one provider of the VM.
for t in smoke datapath memory comm cli agree rma coll; do bin_of "$t" > /dev/null || exit 1; done
for t in smoke datapath memory; do
  echo "EFA_TEST_MIN_PROVIDERS=1 $(bin_of "$t") --test-threads=1"
done
# efa-core: the communicator over the verbs fabric (2 and 4 ranks), and placement on two
# subnets of the rxe device (same subnet -> fabric, across -> IP). The host-only tests of
# that binary (which expect shm) are not selected.
exact comm all_pairs_on_the_fabric two_subnets_route_by_subnet || exit 1
# RMA windows over the verbs fabric.
exact rma put_get_on_the_fabric || exit 1
# Collectives (every op and type against the serial reference) over the verbs fabric.
exact coll collectives_on_the_fabric || exit 1
# efa info names the providers and the route that a started 2-rank job reports, for every
# provider set (with the verbs fabric, and bound to the device's second subnet).
exact agree efa_info_agrees_with_the_communicator || exit 1
# efa-cli: its integration tests, then `efa info` must choose verbs for the fabric role and
# `efa doctor` must pass (rxe active, memlock unlimited inside the VM).
echo "$(bin_of cli) --test-threads=1"
efa=$(dirname "$(dirname "$(bin_of cli)")")/efa
echo "$efa info --json | python3 -c 'import json,sys; d=json.load(sys.stdin); r=[x for x in d[\"roles\"] if x[\"role\"]==\"fabric\"][0]; print(\"fabric role:\", r); sys.exit(0 if r[\"provider\"]==\"verbs;ofi_rxm\" else 1)'"
echo "$efa doctor"
