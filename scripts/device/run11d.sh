# Eleventh session, fourth call: racecheck over the split attention kernels after the block-setup
# refactor (plain, mma, generic and quantized decode).
tar xJf .xfer/dev/dev.tar.xz && source .xfer/sh/common.sh
step racecheck attention
timeout 250 compute-sanitizer --tool racecheck --print-limit 20 $B/kvcache_cuda_tests --gtest_filter='CudaAttention.*:CudaAttentionKvLen.*' > $OUT/rc_attn.log 2>&1; echo rc $?
grep -E "RACECHECK SUMMARY|ERROR SUMMARY|PASSED|FAILED" $OUT/rc_attn.log; grep -c "^\[       OK" $OUT/rc_attn.log; grep -E "^\[ RUN" $OUT/rc_attn.log | tail -1
step racecheck quantized attention
timeout 250 compute-sanitizer --tool racecheck --print-limit 20 $B/kvcache_cuda_tests --gtest_filter='QuantizedCacheCuda.AttentionMatchesTheCpu' > $OUT/rc_quant.log 2>&1; echo rc $?
grep -E "RACECHECK SUMMARY|ERROR SUMMARY|PASSED|FAILED" $OUT/rc_quant.log; grep -E "^\[ RUN" $OUT/rc_quant.log | tail -1
