# Thirteenth session, first call (no model yet; its tests skip): the whole CUDA suite, the CUDA
# allocation-failure program, memcheck over it and the memory tests, the CPU-side memory tests and
# the GPU parity fixtures; stages the model's first part.
tar xJf .xfer/dev/dev.tar.xz && source .xfer/sh/common.sh
mkdir -p models && cp .xfer/a/model.xz.a models/
step cuda tests without the model
timeout 150 $B/kvcache_cuda_tests 2>&1 | tee $OUT/cuda_tests_a.log | grep -E "FAILED|Failure|PASSED|Skipped|tests ran" | head -40
step cuda allocation failure tests
timeout 120 $B/kvcache_cuda_allocation_failure_tests 2>&1 | tee $OUT/alloc_fail.log | grep -E "FAILED|Failure|PASSED|OK \]|tests ran|Expected|Which is|Value of|allocation [0-9]" | head -60
step memcheck memory and allocation failure tests
timeout 150 compute-sanitizer --tool memcheck --print-limit 10 $B/kvcache_cuda_tests --gtest_filter='MemoryCuda.*' > $OUT/memcheck_a.log 2>&1; echo rc $?
grep -E "ERROR SUMMARY|FAILED|PASSED" $OUT/memcheck_a.log
timeout 200 compute-sanitizer --tool memcheck --print-limit 10 $B/kvcache_cuda_allocation_failure_tests > $OUT/memcheck_af.log 2>&1; echo rc $?
grep -E "ERROR SUMMARY|FAILED|PASSED" $OUT/memcheck_af.log
step cpu memory tests and gpu parity fixtures
timeout 90 $B/kvcache_tests --gtest_filter='*Parity*cuda*:Memory.*' 2>&1 | tee $OUT/parity.log | grep -E "FAILED|Failure|PASSED"
