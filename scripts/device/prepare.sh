#!/usr/bin/env bash
# Prepares a run on the GPU machine (see ../shared/device/README.md): builds the GPU programs for
# Hopper, packs them with the libraries the GPU machine lacks, and splits the default model (92 MiB,
# more than one device call may carry) into two xz parts, all under the ignored folder .xfer/:
#   .xfer/dev/dev.tar.xz   the packed programs (carry in the first call)
#   .xfer/a, .xfer/b        the model's two parts (carry .xfer/a in the first call, .xfer/b in the
#                           second, back to back while the machine is warm)
#   .xfer/sh                the scripts the calls run (carry in both)
# Then: run `bash .xfer/sh/first.sh` carrying .xfer/sh .xfer/a .xfer/dev, and at once
# `bash .xfer/sh/second.sh` carrying .xfer/sh .xfer/b.
set -euo pipefail
cd "$(dirname "$0")/../.."
programs=(tests/kvcache_tests tests/kvcache_cuda_tests tests/kvcache_cuda_allocation_failure_tests
          examples/greedy_decode examples/custom_loop
          benchmarks/attention_cuda_bench benchmarks/greedy_decode_cuda_bench benchmarks/gemv_cuda_bench)
cmake -B build-gpu -DCMAKE_BUILD_TYPE=Release -DKVCACHE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DKVCACHE_NATIVE=OFF \
  -DKVCACHE_BUILD_EXAMPLES=ON -DKVCACHE_BUILD_BENCHMARKS=ON
cmake --build build-gpu -j2 --target $(for p in "${programs[@]}"; do basename "$p"; done)
rm -rf .device .xfer/dev .xfer/sh && mkdir -p .xfer/dev .xfer/a .xfer/b .xfer/sh
bash ../shared/device/pack.sh .device "${programs[@]/#/build-gpu/}"
strip -s .device/bin/*
tar cJf .xfer/dev/dev.tar.xz .device
if [[ ! -f .xfer/b/model.xz.b ]]; then
  # 45 MB parts: two of them hold the 88 MB archive, and the tree (~9 MB) + the pack (~6 MB) + a
  # 50 MB part would pass the 64 MiB a call may carry.
  xz -T2 -6 -c models/SmolLM2-135M-Instruct.Q4_1.gguf | split -b 45M - .xfer/m.
  mv .xfer/m.aa .xfer/a/model.xz.a && mv .xfer/m.ab .xfer/b/model.xz.b
fi
cp scripts/device/*.sh .xfer/sh/
