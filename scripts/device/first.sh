# First device call: the GPU tests (no model needed), sanitizers, benchmarks; stages model part a.
tar xJf .xfer/dev/dev.tar.xz && source .xfer/sh/common.sh
mkdir -p models && cp .xfer/a/model.xz.a models/
step cuda tests
timeout 90 $B/kvcache_cuda_tests 2>&1 | tee $OUT/cuda_tests.log | grep -E "FAILED|Failure|PASSED"
step gpu parity fixtures
timeout 60 $B/kvcache_tests --gtest_filter='Fixtures/Parity*cuda*' 2>&1 | tee $OUT/parity.log | grep -E "FAILED|Failure|parity|PASSED"
step benchmarks
timeout 100 $B/greedy_decode_cuda_bench 2>&1 | tee $OUT/greedy_bench.log | grep -E "^BM_"
timeout 60 $B/attention_cuda_bench --benchmark_min_time=0.2 2>&1 | tee $OUT/attention_bench.log | grep -E "^BM_"
step memcheck
timeout 90 compute-sanitizer --tool memcheck --print-limit 10 $B/kvcache_cuda_tests 2>&1 | tee $OUT/memcheck.log | grep -E "ERROR SUMMARY|FAILED|PASSED"
