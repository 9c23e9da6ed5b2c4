# Twelfth session, first call: the whole CUDA suite without the default model (its tests skip),
# the new memory and crop tests under memcheck; stages the model's first part.
tar xJf .xfer/dev/dev.tar.xz && source .xfer/sh/common.sh
mkdir -p models && cp .xfer/a/model.xz.a models/
step cuda tests without the model
timeout 150 $B/kvcache_cuda_tests 2>&1 | tee $OUT/cuda_tests_a.log | grep -E "FAILED|Failure|PASSED|Skipped|tests ran" | head -40
step memcheck memory and crop tests
timeout 120 compute-sanitizer --tool memcheck --print-limit 10 $B/kvcache_cuda_tests --gtest_filter='MemoryCuda.*:QuantizedCacheCuda.*Crop*' > $OUT/memcheck_a.log 2>&1; echo rc $?
grep -E "ERROR SUMMARY|FAILED|PASSED" $OUT/memcheck_a.log
step gpu parity fixtures
timeout 90 $B/kvcache_tests --gtest_filter='*Parity*cuda*:Memory.*' 2>&1 | tee $OUT/parity.log | grep -E "FAILED|Failure|PASSED"
