#!/usr/bin/env bash
# The sanitizer stage of .ci/run (issue #10): builds kvcache with clang under AddressSanitizer and
# UndefinedBehaviorSanitizer (every report fatal) in a build folder of its own, CUDA off, then runs
# the hostile-input, parser and cache tests and each libFuzzer target over its seed corpus for a
# fixed number of runs. Any failing test, sanitizer report, leak, crash or fuzzer finding fails
# the stage (and .ci/run). Usage: bash scripts/sanitizer-stage.sh [BUILD_DIR] (default build-asan).
# About 3.5 minutes on 2 cores from a clean build folder (docs/errors.md, "Hardening").
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-asan}

bash scripts/install-deps.sh --sanitizers
start=$(date +%s)

cmake -B "$build" -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14 \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS=-gline-tables-only -DKVCACHE_CUDA=OFF \
  -DKVCACHE_SANITIZE=address,undefined -DKVCACHE_BUILD_FUZZERS=ON \
  -DKVCACHE_BUILD_BENCHMARKS=OFF -DKVCACHE_BUILD_EXAMPLES=OFF -DKVCACHE_INSTALL=OFF
cmake --build "$build" -j2 --target kvcache_sanitizer_tests kvcache_allocation_failure_tests fuzz_gguf fuzz_safetensors fuzz_config \
  fuzz_tokenizer fuzz_tokenizer_config fuzz_encode fuzz_chat_template fuzz_cache

# allocator_may_return_null: a huge request is std::bad_alloc (which the library turns into a
# kvcache::Error), as without ASan, not an ASan abort.
export ASAN_OPTIONS=allocator_may_return_null=1:detect_leaks=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# The hostile-input, tensor, cache, parser and thread-safety suites (the binary holds nothing
# else).
suites=(Hostile Tensor CpuCopy Float16 DynamicCache StaticCache LegacyCache SlidingWindowLayer
        SinkCache QuantizedCache QuantizedAttention AttentionSliding CpuAttentionWindow Config Gguf
        Safetensors Tokenizer ChatTemplate ThreadSafety)
filter=$(printf '%s*:' "${suites[@]}")
OMP_NUM_THREADS=2 "$build/tests/kvcache_sanitizer_tests" --gtest_brief=1 --gtest_filter="${filter%:}"
# Every cache call with its Nth allocation failing, N = 1, 2, ... (its own program: it replaces
# the global operator new).
OMP_NUM_THREADS=2 "$build/tests/kvcache_allocation_failure_tests" --gtest_brief=1
ctest --test-dir "$build" -L fuzz -j2 --output-on-failure

echo "sanitizer stage: passed in $(($(date +%s) - start)) s"
