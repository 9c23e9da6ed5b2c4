#!/bin/sh
# Runs one fuzz target over its seed folder: run_one.sh BINARY SEED_DIR [libFuzzer flags...].
# New inputs the fuzzer finds go to a scratch folder (removed after), never into the seeds; a
# finding leaves its input as crash-*/leak-*/timeout-* in the current folder and exits non-zero.
set -eu
bin=$1
seeds=$2
shift 2
# A huge allocation is std::bad_alloc (a kvcache::Error from the library), as without ASan.
export ASAN_OPTIONS="${ASAN_OPTIONS:-allocator_may_return_null=1}"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$bin" -timeout=10 -rss_limit_mb=4096 -max_len=131072 -print_final_stats=1 "$@" "$scratch" "$seeds"
