#!/usr/bin/env python3
"""transformers' own greedy output for the default model, the oracle for kvcache's real-model parity.

transformers loads the same GGUF file kvcache loads (its gguf integration dequantizes to float32),
runs eager attention in float32 on the CPU, and greedily generates up to 64 new tokens for a few
conversations (chat template applied, generation prompt added) and raw prompts. The prompt ids,
the new ids, the decoded text and the smallest top-1/top-2 logit margin of each case go to one
small JSON file that tests/model/smollm2_parity_test.cpp reads.

Run where torch, transformers and gguf are installed:
    python3 tools/make_smollm2_reference.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out tests/data/smollm2_reference.json
"""
import argparse
import hashlib
import json
import os

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

CASES = [
    {"name": "seed_conversation", "messages": [{"role": "user", "content": "Hello, what's your name."}]},
    {"name": "capital", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"name": "with_system", "messages": [
        {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"}]},
    {"name": "two_turns", "messages": [
        {"role": "user", "content": "Give me a number between 1 and 10."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Now double it and explain."}]},
    {"name": "raw_story", "text": "Once upon a time, in a small village by the sea,"},
    {"name": "raw_code", "text": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"},
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()

    torch.manual_seed(0)
    folder, name = os.path.split(os.path.abspath(args.gguf))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    eos = model.generation_config.eos_token_id
    eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    sha = hashlib.sha256(open(args.gguf, "rb").read()).hexdigest()

    out = {
        "description": __doc__.strip().splitlines()[0],
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "gguf_file": name,
        "gguf_sha256": sha,
        "dtype": "float32",
        "attn_implementation": "eager",
        "eos_token_ids": eos_ids,
        "max_new_tokens": args.new_tokens,
        "cases": [],
    }
    for case in CASES:
        if "messages" in case:
            prompt = tokenizer.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=False)
        else:
            prompt = case["text"]
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            result = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                    do_sample=False, eos_token_id=eos_ids or None,
                                    pad_token_id=tokenizer.pad_token_id, output_scores=True,
                                    return_dict_in_generate=True)
        new = result.sequences[0, ids.shape[1]:].tolist()
        margins = []
        for step_scores in result.scores:
            top = torch.topk(step_scores[0].float(), 2).values
            margins.append(float(top[0] - top[1]))
        entry = {"name": case["name"], "prompt": prompt, "input_ids": ids[0].tolist(), "new_tokens": new,
                 "text": tokenizer.decode(new, skip_special_tokens=False), "min_logit_margin": min(margins)}
        entry.update({k: case[k] for k in ("messages", "text") if k in case and k != "text"})
        if "text" in case:
            entry["raw_text"] = case["text"]
        out["cases"].append(entry)
        print(f"{case['name']:20s} prompt {ids.shape[1]:3d} new {len(new):3d} margin {min(margins):.3e} "
              f"{entry['text'][:60]!r}")
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
