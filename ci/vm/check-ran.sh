#!/usr/bin/env bash
# ci/vm/check-ran.sh CMD LOG -- did test command CMD (one line of the VM's test list), whose
# output is in LOG, test something? ci/vm/softroce.sh runs it inside the VM after every
# command that exited 0, and fails the command when it did not:
#   - a test binary (its output has libtest's "running N tests" line) that ran no test at all
#     (a filter that matches nothing, e.g. after a test was renamed);
#   - a command with --exact NAME...: a named test that did not run, or that printed
#     "SKIPPED: NAME: <reason>" (the VM is where these tests must run, not skip).
# Exit 0 if it did; otherwise 1, with the reason on stdout.
set -uo pipefail
[ $# -eq 2 ] || { echo "usage: $0 CMD LOG" >&2; exit 2; }
cmd=$1 log=$2
[ -r "$log" ] || { echo "no output log $log"; exit 1; }

if grep -qE '^running [0-9]+ tests?$' "$log"; then
    ran=$(sed -nE 's/^test result: [A-Za-z]+\. ([0-9]+) passed; ([0-9]+) failed.*/\1 \2/p' "$log" |
        awk '{ s += $1 + $2 } END { print s + 0 }')
    if [ "$ran" -eq 0 ]; then
        echo "ran 0 tests (does a filter name a test that no longer exists?)"
        exit 1
    fi
fi

case " $cmd " in
    *" --exact "*) ;;
    *) exit 0 ;;
esac
# The filter names: the words after the binary that are neither options nor VAR=value.
read -r -a words <<<"$cmd"
seen_bin=0
for w in "${words[@]}"; do
    if [ "$seen_bin" = 0 ]; then
        [[ "$w" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || seen_bin=1
        continue
    fi
    case "$w" in -*) continue ;; esac
    if ! grep -qE "^test $w \.\.\. " "$log"; then
        echo "test $w did not run"
        exit 1
    fi
    if why=$(grep -m1 -oE "SKIPPED: $w: .*" "$log") && [ -n "$why" ]; then
        echo "test $w skipped instead of running here: ${why#SKIPPED: }"
        exit 1
    fi
done
exit 0
