# Eleventh session, second call: the GEMM write probe, decode-attention benchmarks after the
# block-setup refactor, initcheck and racecheck over the CUDA suite.
tar xJf .xfer/dev/dev.tar.xz && source .xfer/sh/common.sh
step probe
KVCACHE_PROBE_GEMM=1 timeout 40 $B/kvcache_cuda_tests_probe --gtest_filter='CudaGenerate.GreedyTokens*' > $OUT/probe.log 2>&1
grep -c PROBE $OUT/probe.log; grep PROBE $OUT/probe.log | grep -v ": 0 unwritten" | head; grep PROBE $OUT/probe.log | sed 's/ x 0x.*:/:/' | sort | uniq -c | sort -rn | head -12; grep -E "OK \]|FAILED" $OUT/probe.log | head -3
step bench
timeout 70 $B/attention_cuda_bench --benchmark_min_time=0.2 --benchmark_filter='BM_DeviceCopy|BM_DecodeAttention(Quantized)?Cuda/(1|8)/(4096|16384)(/4)?/' 2>&1 | tee $OUT/bench.log | grep -E "^BM_"
step initcheck suite
timeout 220 compute-sanitizer --tool initcheck --print-limit 20 $B/kvcache_cuda_tests > $OUT/initcheck.log 2>&1; echo rc $?
grep -E "ERROR SUMMARY|PASSED|FAILED|tests ran" $OUT/initcheck.log | head; grep -E "^\[ RUN" $OUT/initcheck.log | tail -1; grep -B2 -A3 -m3 "Uninitialized" $OUT/initcheck.log | grep -E "at |RUN" | sort | uniq -c | head
step racecheck suite
timeout 200 compute-sanitizer --tool racecheck --print-limit 20 $B/kvcache_cuda_tests --gtest_filter='-CudaGenerate*:*Parity*' > $OUT/racecheck.log 2>&1; echo rc $?
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED" $OUT/racecheck.log | head; grep -E "^\[ RUN" $OUT/racecheck.log | tail -1; grep -c "^\[       OK" $OUT/racecheck.log
