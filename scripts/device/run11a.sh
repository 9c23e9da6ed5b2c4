# Eleventh session, first call: the CUDA suite, the GEMM write probe and initcheck over the first
# generate() test, cache-update and decode-attention benchmarks, memcheck over the attention tests.
tar xJf .xfer/dev/dev.tar.xz && source .xfer/sh/common.sh
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
step cuda tests
timeout 150 $B/kvcache_cuda_tests 2>&1 | tee $OUT/cuda_tests.log | grep -E "FAILED|Failure|PASSED|tests ran"
step probe
KVCACHE_PROBE_GEMM=1 timeout 60 $B/kvcache_cuda_tests_probe --gtest_filter='CudaGenerate.GreedyTokens*' > $OUT/probe.log 2>&1
grep -c PROBE $OUT/probe.log; grep PROBE $OUT/probe.log | grep -v ": 0 unwritten" | head; grep PROBE $OUT/probe.log | sort | uniq -c | sort -rn | head -8; grep -E "OK|FAILED" $OUT/probe.log | head -3
step initcheck
timeout 200 compute-sanitizer --tool initcheck --print-limit 3 --show-backtrace host $B/kvcache_cuda_tests --gtest_filter='CudaGenerate.GreedyTokens*' > $OUT/initcheck.log 2>&1
grep -E "ERROR SUMMARY|OK \]|FAILED" $OUT/initcheck.log | head; grep -A30 -m1 "Uninitialized" $OUT/initcheck.log | head -40
step bench
timeout 150 $B/attention_cuda_bench --benchmark_min_time=0.2 --benchmark_filter='BM_DeviceCopy|BM_DecodeAttention(Quantized)?Cuda/(1|8)/(4096|16384)(/4)?$|CacheUpdate' 2>&1 | tee $OUT/bench.log | grep -E "^BM_"
step memcheck attention
timeout 120 compute-sanitizer --tool memcheck --print-limit 10 $B/kvcache_cuda_tests --gtest_filter='*ttention*:*Quantized*:*Sink*:*Offload*' 2>&1 | tee $OUT/memcheck.log | grep -E "ERROR SUMMARY|FAILED|PASSED"
