#!/usr/bin/env python3
"""Writes the committed seed corpora of the libFuzzer targets that do not read a file format the
fixtures already hold (issue #10): tests/data/fuzz/<target>/. fuzz/CMakeLists.txt copies every file
there into the target's seed folder, beside the fixture files it names.

- fuzz_cache: one byte stream per cache kind the target's first byte picks (DynamicCache full or
  sliding, StaticCache lazy or up front, SinkCache, QuantizedCache), each kind twice, the rest of
  each stream pseudo-random operations, so every kind is reached from the first input.
- fuzz_chat_template: each real template of tests/data/chat_templates/reference.json with each of
  its conversations, in the target's format (template, then role and content, NUL-separated).
- fuzz_encode: for each of the three tiny tokenizers (the first byte picks one) texts that reach
  the encoder's corners: ASCII, multi-byte UTF-8, control bytes, special tokens written in the text,
  invalid UTF-8, digits and long runs of spaces.

Standard library only; deterministic (fixed seeds), so a rerun writes the same bytes. Usage:
    python3 tools/make_fuzz_seeds.py [--out tests/data/fuzz]
"""
import argparse
import json
import random
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CACHE_KINDS = ["dynamic", "sliding", "static_lazy", "static_up_front", "sink", "quantized"]

ENCODE_TEXTS = [
    b"Hello, what's your name.",
    "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f600 \u0394\u03b5\u03b9".encode(),
    b"a\x04b\x06c\x13\x14\x16\x1d",
    b"<|im_start|>user\nHi<|im_end|>\n<|endoftext|><s></s><|begin_of_text|>",
    b"\xff\xfe\xc3\x28\xe2\x82\xf0\x9f\x98",
    b"1234567890 3.14159 2026-12-04",
    b"     leading and   runs   of spaces\t\ttabs\r\nnewlines\n\n",
    b"don't won't it's I'm we're they've",
]


def cache_seeds(out: Path) -> int:
    rng = random.Random(20261204)
    n = 0
    for kind, name in enumerate(CACHE_KINDS):
        for variant in range(2):
            body = bytes(rng.randrange(256) for _ in range(240))
            (out / f"{name}_{variant}.bin").write_bytes(bytes([kind]) + body)
            n += 1
    return n


def chat_template_seeds(out: Path) -> int:
    reference = json.loads((ROOT / "tests/data/chat_templates/reference.json").read_text())
    n = 0
    for name, entry in sorted(reference["templates"].items()):
        template = entry["template"]
        for conv_name, messages in sorted(reference["conversations"].items()):
            parts = [template]
            for m in messages:
                parts += [m["role"], m["content"]]
            (out / f"{name}_{conv_name}.txt").write_bytes("\0".join(parts).encode())
            n += 1
    return n


def encode_seeds(out: Path) -> int:
    n = 0
    for tokenizer in range(3):  # tiny_gpt2, tiny_llama3, tiny_smollm (fuzz_encode.cpp's order)
        for i, text in enumerate(ENCODE_TEXTS):
            (out / f"tokenizer{tokenizer}_{i}.bin").write_bytes(bytes([tokenizer]) + text)
            n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests/data/fuzz")
    args = parser.parse_args()
    total = 0
    for target, make in [("fuzz_cache", cache_seeds), ("fuzz_chat_template", chat_template_seeds),
                         ("fuzz_encode", encode_seeds)]:
        folder = args.out / target
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        count = make(folder)
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"{target}: {count} seeds, {size} bytes in {folder}")
        total += size
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
