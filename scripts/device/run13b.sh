# Thirteenth session, second call (warm machine, model part b): the whole CUDA suite and the GPU
# model tests with the default model, the main job on the GPU, and the decode benchmark.
tar xJf .xfer/bench/bench.tar.xz && source .xfer/sh/common.sh
cat models/model.xz.a .xfer/b/model.xz.b | xz -d > models/SmolLM2-135M-Instruct.Q4_1.gguf && rm models/model.xz.a
step cuda tests with the model
timeout 200 $B/kvcache_cuda_tests 2>&1 | tee $OUT/cuda_tests_b.log | grep -E "FAILED|Failure|PASSED|tests ran" | head -40
step smollm2 gpu tests
timeout 120 $B/kvcache_tests --gtest_filter='*SmolLM2*:*cuda*:*Cuda*' 2>&1 | tee $OUT/smollm2.log | grep -E "FAILED|Failure|PASSED|tests ran"
step greedy_decode --device cuda
timeout 60 $B/greedy_decode --device cuda 2>&1 | tee $OUT/greedy_decode.log | tail -8
step decode benchmark (graphs on)
timeout 150 $B/greedy_decode_cuda_bench --benchmark_filter='BM_GreedyDecodeCuda/shape:./graph:1' 2>&1 | tee $OUT/greedy_bench.log | grep -E "^BM_"
