#!/usr/bin/env bash
# The sanitizer stage of .ci/run (issue #10): builds kvcache, its whole CPU test suite, the
# examples and the libFuzzer targets with clang under AddressSanitizer and
# UndefinedBehaviorSanitizer (every report fatal) in a build folder of its own, CUDA off, then runs
# every CTest test but the packaging and docs ones (those build or install the library again, or
# run Doxygen: no kvcache code runs under the sanitizers there). The fuzz tests run each target
# over its seed corpus for a fixed number of runs. Any failing test, sanitizer report, leak, crash
# or fuzzer finding fails the stage (and .ci/run). Usage: bash scripts/sanitizer-stage.sh
# [BUILD_DIR] (default build-asan). About 12.5 minutes on 2 cores from a clean build folder
# (docs/errors.md, "Hardening").
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-asan}

bash scripts/install-deps.sh --sanitizers
start=$(date +%s)

cmake -B "$build" -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14 \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS=-gline-tables-only -DKVCACHE_CUDA=OFF \
  -DKVCACHE_SANITIZE=address,undefined -DKVCACHE_BUILD_FUZZERS=ON \
  -DKVCACHE_BUILD_BENCHMARKS=OFF -DKVCACHE_BUILD_EXAMPLES=ON -DKVCACHE_INSTALL=OFF
# Every test program, example and fuzz target (benchmarks, install and docs are off).
cmake --build "$build" -j2 --target kvcache_tests kvcache_allocation_failure_tests \
  kvcache_hostile_allocation_tests kvcache_readme_tests fuzz_gguf fuzz_safetensors fuzz_config fuzz_tokenizer \
  fuzz_tokenizer_config fuzz_encode fuzz_chat_template fuzz_cache fuzz_input_ids legacy_cache \
  greedy_decode custom_loop
built=$(date +%s)

# allocator_may_return_null: a huge request is std::bad_alloc (which the library turns into a
# kvcache::Error), as without ASan, not an ASan abort.
export ASAN_OPTIONS=allocator_may_return_null=1:detect_leaks=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# clang's OpenMP runtime (libomp) keeps "hot" thread teams for nested parallel regions started
# from several std::threads (the thread-safety tests) and never frees them: LeakSanitizer reports
# that in a program with no kvcache code at all. Without hot teams nothing leaks.
export KMP_HOT_TEAMS_MAX_LEVEL=0
ctest --test-dir "$build" -j2 --output-on-failure -LE 'packaging|docs'

end=$(date +%s)
echo "sanitizer stage: passed in $((end - start)) s ($((built - start)) s building)"
