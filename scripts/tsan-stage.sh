#!/usr/bin/env bash
# The ThreadSanitizer stage of .ci/run (issue #10): builds kvcache and its sanitizer suite with
# clang under -fsanitize=thread in a build folder of its own (CUDA off) and runs the thread-safety
# tests: several std::threads generating on one shared model (float32 and quantized weights) and
# encoding/decoding on one tokenizer. Any report fails the stage (TSan exits non-zero).
#
# OpenMP: clang's runtime (libomp, which -fopenmp links under clang) is not built with TSan, so
# its barriers are invisible to it. The tests run twice:
# with one OpenMP thread per generating thread (everything TSan sees is kvcache's own code), and
# with two, telling TSan to ignore the uninstrumented runtime (ignore_noninstrumented_modules), so
# a race between kvcache's own threaded kernels would show too unless libomp's synchronisation
# hides it. Usage: bash scripts/tsan-stage.sh [BUILD_DIR] (default build-tsan). About 5 minutes on
# 2 cores from a clean build folder.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-tsan}

bash scripts/install-deps.sh --sanitizers
start=$(date +%s)

cmake -B "$build" -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14 \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS=-gline-tables-only -DKVCACHE_CUDA=OFF \
  -DKVCACHE_SANITIZE=thread -DKVCACHE_BUILD_BENCHMARKS=OFF -DKVCACHE_BUILD_EXAMPLES=OFF \
  -DKVCACHE_INSTALL=OFF
cmake --build "$build" -j2 --target kvcache_sanitizer_tests

export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1"
OMP_NUM_THREADS=1 "$build/tests/kvcache_sanitizer_tests" --gtest_brief=1 --gtest_filter='ThreadSafety*'
TSAN_OPTIONS="$TSAN_OPTIONS ignore_noninstrumented_modules=1" OMP_NUM_THREADS=2 \
  "$build/tests/kvcache_sanitizer_tests" --gtest_brief=1 --gtest_filter='ThreadSafety*'

echo "tsan stage: passed in $(($(date +%s) - start)) s"
