# Second device call, right after the first (warm machine): the default model's GPU tests, the
# main job on the GPU, and the peers timed on the same card.
source .xfer/sh/common.sh
cat models/model.xz.a .xfer/b/model.xz.b | xz -d > models/SmolLM2-135M-Instruct.Q4_1.gguf && rm models/model.xz.a
step smollm2 gpu tests
timeout 90 $B/kvcache_tests --gtest_filter='*SmolLM2*' 2>&1 | tee $OUT/smollm2.log | grep -E "FAILED|Failure|bf16|PASSED|OK"
step greedy_decode --device cuda
timeout 40 $B/greedy_decode --device cuda 2>&1 | tee $OUT/greedy_decode.log
timeout 40 $B/greedy_decode --device cuda --cuda-graph on 2>&1 | tee $OUT/greedy_decode_graph.log
step peers
timeout 150 python3 tools/bench_transformers_decode.py --runs 2 2>&1 | tee $OUT/transformers.log
timeout 40 python3 tools/sdpa_bench.py --runs 20 2>&1 | tee $OUT/sdpa.log
