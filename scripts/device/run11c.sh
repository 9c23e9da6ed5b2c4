# Eleventh session, third call: the initcheck report of the first generate() test, pinned down:
# the GEMM write probe (every cuBLAS output poisoned first, then scanned), initcheck alone, after
# the linear test, and with eager module loading.
tar xJf .xfer/dev/dev.tar.xz && source .xfer/sh/common.sh
F='CudaGenerate.GreedyTokens*'
step probe
KVCACHE_PROBE_GEMM=1 timeout 40 $B/kvcache_cuda_tests_probe --gtest_filter="$F" > $OUT/probe.log 2>&1
grep -c PROBE $OUT/probe.log; grep PROBE $OUT/probe.log | grep -v ": 0 unwritten" | head; grep PROBE $OUT/probe.log | sed 's/ x 0x.*:/:/' | sort | uniq -c | sort -rn | head -12; grep -E "OK \]|FAILED" $OUT/probe.log | head -3
step initcheck alone
timeout 60 compute-sanitizer --tool initcheck --print-limit 64 $B/kvcache_cuda_tests --gtest_filter="$F" > $OUT/ic_alone.log 2>&1
grep -E "ERROR SUMMARY" $OUT/ic_alone.log; grep -E "by thread" $OUT/ic_alone.log | sort | uniq -c | head -40; grep Address $OUT/ic_alone.log | head -40 | tr '\n' ' '
step initcheck eager loading
CUDA_MODULE_LOADING=EAGER timeout 90 compute-sanitizer --tool initcheck --print-limit 8 $B/kvcache_cuda_tests --gtest_filter="$F" > $OUT/ic_eager.log 2>&1
grep -E "ERROR SUMMARY|OK \]" $OUT/ic_eager.log
step initcheck after the linear test
timeout 60 compute-sanitizer --tool initcheck --print-limit 8 $B/kvcache_cuda_tests --gtest_filter="CudaOps.LinearWritesEvery*:$F" > $OUT/ic_after.log 2>&1
grep -E "ERROR SUMMARY|OK \]" $OUT/ic_after.log
step initcheck, probe binary without the probe
timeout 60 compute-sanitizer --tool initcheck --print-limit 8 $B/kvcache_cuda_tests_probe --gtest_filter="$F" > $OUT/ic_probebin.log 2>&1
grep -E "ERROR SUMMARY|OK \]" $OUT/ic_probebin.log
