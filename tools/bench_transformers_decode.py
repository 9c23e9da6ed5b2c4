#!/usr/bin/env python3
"""Times transformers' greedy decoding on the GPU for the shapes BM_GreedyDecodeCuda measures, so
kvcache's figures get a ratio to transformers from the same card in the same run.

Random bfloat16 weights (made on the device), batch 1, a 128-token prompt, 256 new tokens, the
seed document's loop: a DynamicCache, the attention mask growing a column a step, cache_position
advancing by one. Prints one JSON line per shape: decode tokens/s (median of --runs, after a
warm-up run) with the attention implementation used.

    python3 tools/bench_transformers_decode.py [--shapes tinyllama_1.1b,llama2_7b] [--runs 3]
"""
import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

SHAPES = {
    "tinyllama_1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, intermediate_size=5632, vocab_size=32000),
    "llama2_7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=11008, vocab_size=32000),
}


@torch.no_grad()
def decode_tokens_per_s(model, prompt_len, new_tokens):
    vocab = model.config.vocab_size
    input_ids = (torch.arange(prompt_len, device="cuda") * 7919 % vocab).unsqueeze(0)
    attention_mask = torch.ones_like(input_ids)
    cache = DynamicCache()
    cache_position = torch.arange(prompt_len, device="cuda")
    out = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                cache_position=cache_position, use_cache=True, logits_to_keep=1)
    next_ids = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((1, 1))], dim=-1)
        cache_position = cache_position[-1:] + 1
        out = model(input_ids=next_ids, attention_mask=attention_mask, past_key_values=cache,
                    cache_position=cache_position, use_cache=True, logits_to_keep=1)
        next_ids = out.logits[:, -1:].argmax(-1)
        next_ids.item()  # the token goes back to the host every step, as in a real loop
    torch.cuda.synchronize()
    return (new_tokens - 1) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--attn", default="eager", help="eager or sdpa")
    args = parser.parse_args()
    for name in args.shapes.split(","):
        config = LlamaConfig(**SHAPES[name], max_position_embeddings=4096,
                             attn_implementation=args.attn)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
        decode_tokens_per_s(model, 128, 8)  # warm-up
        rates = [decode_tokens_per_s(model, 128, 256) for _ in range(args.runs)]
        print(json.dumps({"shape": name, "attn": args.attn, "card": torch.cuda.get_device_name(),
                          "decode_tokens_per_s": statistics.median(rates),
                          "runs": rates, "torch": torch.__version__}), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
