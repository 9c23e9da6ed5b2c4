#!/bin/sh
# Decode tokens/s of the default model with 1 and 2 CPU threads, on the machine as it is ("idle")
# and with one core taken by a busy loop (taskset -c 1), for one or more greedy_decode builds.
# Runs are interleaved (run 1 of every build and thread count, then run 2, ...) so that load from
# other processes, which comes and goes, falls on every configuration alike; prints every run, the
# medians, and the load average through the measurement. benchmarks/README.md "Decode on a shared
# machine".
#   sh benchmarks/shared_core_decode.sh RUNS GREEDY_DECODE [GREEDY_DECODE...]
set -eu
runs=$1
shift
tokens=128
# A prompt whose answer runs the whole 128 tokens (the default question stops at EOS after ~30).
prompt="Write a long story about a cat who learns to fly."
out=$(mktemp -d)
trap 'rm -rf "$out"; [ -n "${busy:-}" ] && kill "$busy" 2>/dev/null || true' EXIT
one() {  # $1 condition, $2 build index, $3 binary, $4 threads
  "$3" --threads "$4" --max-new-tokens "$tokens" --prompt "$prompt" --json | tail -n 1 |
    sed 's/.*"decode_tokens_per_s":\([0-9.e+-]*\).*/\1/' >> "$out/$1.$2.$4"
}
phase() {  # $1 condition, then the binaries
  cond=$1
  shift
  echo "$cond: load average before $(cut -d' ' -f1-3 /proc/loadavg)"
  for i in $(seq "$runs"); do
    n=1
    for bin in "$@"; do
      for threads in 1 2; do one "$cond" "$n" "$bin" "$threads"; done
      n=$((n + 1))
    done
  done
  echo "$cond: load average after $(cut -d' ' -f1-3 /proc/loadavg)"
}
report() {  # $1 condition, then the binaries
  cond=$1
  shift
  n=1
  for bin in "$@"; do
    for threads in 1 2; do
      f="$out/$cond.$n.$threads"
      med=$(sort -n "$f" | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
      printf '%-5s %-32s threads %s: median %6.1f tok/s  runs: %s\n' "$cond" "$bin" "$threads" \
        "$med" "$(printf '%.1f ' $(cat "$f"))"
    done
    n=$((n + 1))
  done
}
phase idle "$@"
taskset -c 1 sh -c 'while :; do :; done' &
busy=$!
sleep 1
phase busy "$@"
kill "$busy"
busy=""
report idle "$@"
report busy "$@"
