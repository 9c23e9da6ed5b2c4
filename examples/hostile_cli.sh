#!/bin/sh
# Hostile command lines for greedy_decode (issue #10): each must end in a clear message and the
# right exit status, never a hang, an abort or a silent default. Usage: hostile_cli.sh BINARY DIR
# (DIR: a small folder checkpoint without a tokenizer).
set -u
bin=$1
small=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
expect_failure() {  # NEEDLE ARGS...: non-zero exit (not a signal) and NEEDLE in the output
  needle=$1
  shift
  out=$(timeout 60 "$bin" "$@" 2>&1)
  rc=$?
  if [ "$rc" -eq 0 ] || [ "$rc" -ge 124 ]; then
    echo "FAIL: $* exited $rc (expected an orderly failure): $out"
    status=1
  elif ! printf '%s' "$out" | grep -aqF -- "$needle"; then
    echo "FAIL: $*: expected '$needle' in: $out"
    status=1
  fi
}

# An empty --input-ids is an error, not the default prompt.
expect_failure "--input-ids is empty" --input-ids "" --max-new-tokens 1
expect_failure "--input-ids is empty" --model "$small" --input-ids "" --max-new-tokens 1

# Every separator is followed by an id: a trailing ',' or ';' is refused like ",1", "1,,2" and
# "1;;2", each with a message naming what was expected and what came (examples/input_ids.hpp).
expect_failure "--input-ids ends with ',' at byte 5" --model "$small" --input-ids 1,2,3, --max-new-tokens 1
expect_failure "--input-ids ends with ';' at byte 1" --model "$small" --input-ids "1;" --max-new-tokens 1
expect_failure "--input-ids ends with ';'" --model "$small" --input-ids "3,4;5 ; " --max-new-tokens 1
expect_failure "--input-ids has an empty id before the ',' at byte 0" --model "$small" --input-ids ",1" --max-new-tokens 1
expect_failure "--input-ids has an empty id before the ',' at byte 2" --model "$small" --input-ids "1,,2" --max-new-tokens 1
expect_failure "--input-ids has an empty row (row 1) at byte 2" --model "$small" --input-ids "1;;2" --max-new-tokens 1
expect_failure "--input-ids has a negative id at byte 2" --model "$small" --input-ids "3,-1" --max-new-tokens 1
expect_failure "--input-ids has an id past the largest 64-bit integer" --model "$small" --input-ids 99999999999999999999 --max-new-tokens 1
expect_failure "--input-ids has 'x' at byte 1 where ',', ';' or the end should follow an id" --model "$small" --input-ids "3x" --max-new-tokens 1
expect_failure "--input-ids is empty" --model "$small" --input-ids " " --max-new-tokens 1

# A FIFO as the model is refused before open() could wait for a writer.
mkfifo "$tmp/fifo.gguf"
expect_failure "got a FIFO" --model "$tmp/fifo.gguf" --input-ids 1,2 --max-new-tokens 1
mkdir "$tmp/fifo_dir" && mkfifo "$tmp/fifo_dir/config.json"
expect_failure "got a FIFO" --model "$tmp/fifo_dir" --input-ids 1,2 --max-new-tokens 1

# A model path that is not UTF-8 still gives its --json line (U+FFFD for the bad byte).
odd="$tmp/model_$(printf '\377')"
ln -s "$small" "$odd"
out=$(timeout 60 "$bin" --model "$odd" --input-ids 3,4 --max-new-tokens 2 --json 2>&1)
rc=$?
if [ "$rc" -ne 0 ] || ! printf '%s' "$out" | grep -aq '"new_tokens":\[\['; then
  echo "FAIL: non-UTF-8 model path with --json exited $rc: $out"
  status=1
fi
[ "$status" -eq 0 ] && echo "all hostile command lines handled"
exit "$status"
