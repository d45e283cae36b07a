# ci/netns/checklib.sh: the assertions of the namespace checks (flowcap-check.sh,
# stripe-check.sh), sourced by them. Set CHECK_NAME (the prefix of every line) first.
#
#   check DESCRIPTION VALUE OP BOUND   one assertion on numbers (awk does the arithmetic); a
#                                      failed ">=" counts as a lower bound, any other as hard
#   hard MESSAGE                       a failure that is not a bound (a tool failed)
#   times F X                          F x X
#   attempt STEP ARGS...               runs a step; if only lower bounds failed, runs it once
#                                      more and keeps that result (load can slow a run, it
#                                      cannot push one over its cap); adds to $failures
failures=0    # assertions failed, over the whole check
step_lo=0     # in the current attempt of a step: lower bounds failed
step_hard=0   # and anything else: an upper bound, a tool failing
ok() { echo "$CHECK_NAME: ok: $*"; }
check() {
  if awk -v v="$2" -v b="$4" "BEGIN { exit !(v $3 b) }"; then
    ok "$1: $2 $3 $4"
  else
    echo "$CHECK_NAME: FAIL: $1: $2 is not $3 $4"
    if [ "$3" = ">=" ]; then step_lo=$((step_lo + 1)); else step_hard=$((step_hard + 1)); fi
  fi
}
hard() { echo "$CHECK_NAME: FAIL: $*"; step_hard=$((step_hard + 1)); }
times() { awk -v f="$1" -v x="$2" 'BEGIN { print f * x }'; }
attempt() {
  step_lo=0 step_hard=0
  "$@"
  if [ "$step_hard" -eq 0 ] && [ "$step_lo" -gt 0 ]; then
    echo "$CHECK_NAME: retrying '$*' once: only lower bounds failed, which load on the machine can cause"
    step_lo=0
    "$@"
  fi
  failures=$((failures + step_lo + step_hard))
}
