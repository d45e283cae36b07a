#!/usr/bin/env bash
# Prints the commands the soft-RoCE VM runs (one per line, for ci/vm/softroce.sh), after
# building the test binaries on the host. Each runs with EFA_TEST_PROVIDER='verbs;ofi_rxm'.
set -euo pipefail
cd "$(dirname "$0")/../.."
# Test executables of the named targets, from cargo's JSON build messages.
bins=$(cargo test --workspace --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
want = {"smoke", "datapath"}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in want:
        print(m["target"]["name"], m["executable"])
')
for t in smoke datapath; do
  bin=$(printf '%s\n' "$bins" | awk -v t="$t" '$1 == t {print $2}' | head -1)
  [ -n "$bin" ] || { echo "testlist: no test binary for $t" >&2; exit 1; }
  # One provider in the VM: all of it must run there.
  echo "EFA_TEST_MIN_PROVIDERS=1 $bin --test-threads=1"
done
