#!/usr/bin/env python3
"""Times torch's scaled_dot_product_attention for the decode shapes BM_DecodeAttentionCuda measures
(benchmarks/cuda/attention_bench.cpp), so kvcache's K+V bandwidth has torch's beside it from the
same card: q [b, 32, 1, 128], k/v [b, 8, ctx, 128] bfloat16, enable_gqa=True, no mask.

As the C++ benchmark does, every timed call reads a different layer's k/v, cycling through enough
layers that 512 MiB lies between two reads of the same bytes (the L2 never holds them). CUDA events
around --calls calls; the median of --runs such timings after warm-up. One JSON line per shape.

    python3 tools/sdpa_bench.py [--runs 50] [--calls 20]
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
COLD_BYTES = 512 * 2**20


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    for batch in (1, 8, 32):
        for context in (4096, 16384):
            kv_bytes = 2 * batch * KV_HEADS * context * HEAD_DIM * 2
            layers = max(1, -(-COLD_BYTES // kv_bytes))
            shape = (batch, KV_HEADS, context, HEAD_DIM)
            kv = [(torch.randn(shape, device="cuda", dtype=torch.bfloat16),
                   torch.randn(shape, device="cuda", dtype=torch.bfloat16)) for _ in range(layers)]
            q = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            step = [0]

            def calls(n):
                for _ in range(n):
                    k, v = kv[step[0] % layers]
                    F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                    step[0] += 1

            calls(2 * layers + 10)  # warm-up: kernel selection, clocks
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
            seconds = []
            for _ in range(args.runs):
                start.record()
                calls(args.calls)
                stop.record()
                stop.synchronize()
                seconds.append(start.elapsed_time(stop) * 1e-3 / args.calls)
            call_s = statistics.median(seconds)
            print(json.dumps({"batch": batch, "context": context, "layers": layers,
                              "call_us": round(call_s * 1e6, 2),
                              "kv_GBps": round(kv_bytes / call_s * 1e-9, 1),
                              "torch": torch.__version__,
                              "device": torch.cuda.get_device_name()}), flush=True)
            del kv, q
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
