#!/usr/bin/env python3
"""Random blocks of every GGUF quantization type kvcache reads beyond Q8_0/Q4_0/Q4_1, with the
values the gguf package (llama.cpp's own Python code, gguf.quants) dequantizes them to.

Writes tests/data/gguf/quant_types.gguf, one pair of tensors per type:

  <TYPE>           3 rows of 512 elements of random blocks, stored as <TYPE>
  <TYPE>.expected  the same 3 x 512 values as F32: gguf.quants.dequantize of those bytes (Q8_K,
                   which gguf.quants cannot dequantize, as d * q in float32, ggml's formula)

for Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and Q8_K, and tests/data/gguf/tiny_q4_k_m.gguf, a
one-layer llama (hidden 256) whose matrices are random blocks of Q8_0, Q5_0, Q5_1 and the K-quants,
as a llama.cpp "Q4_K_M" file mixes them, for the model-loading tests. The blocks are random bytes except their
scale fields (fp16 d and dmin; Q8_K's float32 d), which are set to random finite values of either
sign so that no element is NaN or infinite. tests/model/gguf_quant_types_test.cpp checks that
kvcache's GgufFile::to_float32 gives these values bit for bit.

Usage (needs numpy and the gguf package, e.g. pip install gguf):
  python3 tools/make_quant_type_fixtures.py --out tests/data/gguf [--seed 1]
"""

import argparse
import os

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize

ROWS, COLS = 3, 512

# Type: (ggml type, elements per block, bytes per block, byte offsets of the fp16 scale fields,
# byte offset of a float32 scale or None)
TYPES = {
    "Q5_0": (Q.Q5_0, 32, 22, [0], None),
    "Q5_1": (Q.Q5_1, 32, 24, [0, 2], None),
    "Q2_K": (Q.Q2_K, 256, 84, [80, 82], None),
    "Q3_K": (Q.Q3_K, 256, 110, [108], None),
    "Q4_K": (Q.Q4_K, 256, 144, [0, 2], None),
    "Q5_K": (Q.Q5_K, 256, 176, [0, 2], None),
    "Q6_K": (Q.Q6_K, 256, 210, [208], None),
    "Q8_K": (Q.Q8_K, 256, 292, [], 0),
}
FORMATS = dict(TYPES, Q8_0=(Q.Q8_0, 32, 34, [0], None))

# The tiny model: a llama of hidden 256 (the K-quant superblock), 1 layer, 4 heads / 2 kv heads,
# ffn 512, vocab 320, its matrices in the types a llama.cpp "Q4_K_M" file mixes (and the rest).
TINY = dict(hidden=256, ffn=512, heads=4, kv_heads=2, vocab=320)
TINY_MATRICES = [  # GGUF name, rows, columns (ne[1], ne[0]), type
    ("token_embd.weight", 320, 256, "Q8_0"),
    ("output.weight", 320, 256, "Q5_1"),
    ("blk.0.attn_q.weight", 256, 256, "Q5_0"),
    ("blk.0.attn_k.weight", 128, 256, "Q5_0"),
    ("blk.0.attn_v.weight", 128, 256, "Q6_K"),
    ("blk.0.attn_output.weight", 256, 256, "Q4_K"),
    ("blk.0.ffn_gate.weight", 512, 256, "Q2_K"),
    ("blk.0.ffn_up.weight", 512, 256, "Q3_K"),
    ("blk.0.ffn_down.weight", 256, 512, "Q5_K"),
]


def random_blocks(rng, block_elems, block_bytes, fp16_fields, f32_field, elements=ROWS * COLS,
                  max_exponent=-2):
    blocks = elements // block_elems
    raw = rng.integers(0, 256, size=(blocks, block_bytes), dtype=np.uint8)
    for at in fp16_fields:
        # Magnitudes 2^-14 .. 2^max_exponent, either sign: finite, normal fp16 values like real
        # scales.
        value = (rng.uniform(-1, 1, size=blocks) *
                 2.0 ** rng.integers(-14, max_exponent, size=blocks))
        raw[:, at:at + 2] = value.astype(np.float16).view(np.uint8).reshape(blocks, 2)
    if f32_field is not None:
        value = rng.uniform(-1e-2, 1e-2, size=blocks).astype(np.float32)
        raw[:, f32_field:f32_field + 4] = value.view(np.uint8).reshape(blocks, 4)
    return raw


def q8_k_values(raw):
    d = raw[:, 0:4].copy().view(np.float32)                    # [blocks, 1]
    q = raw[:, 4:260].copy().view(np.int8).astype(np.float32)  # [blocks, 256]
    return (d * q).astype(np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data/gguf")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    path = os.path.join(args.out, "quant_types.gguf")
    writer = GGUFWriter(path, arch="kvcache-quant-types")
    for name, (qtype, block_elems, block_bytes, fp16_fields, f32_field) in TYPES.items():
        raw = random_blocks(rng, block_elems, block_bytes, fp16_fields, f32_field)
        if qtype == Q.Q8_K:
            values = q8_k_values(raw)
        else:
            values = dequantize(raw.reshape(-1), qtype)
        values = np.asarray(values, dtype=np.float32).reshape(ROWS, COLS)
        assert np.isfinite(values).all(), name
        row_bytes = COLS // block_elems * block_bytes
        writer.add_tensor(name, raw.reshape(ROWS, row_bytes), raw_dtype=qtype)
        writer.add_tensor(name + ".expected", values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")
    write_tiny_model(rng, os.path.join(args.out, "tiny_q4_k_m.gguf"))


def write_tiny_model(rng, path):
    """The tiny llama of TINY in the types of TINY_MATRICES (random blocks, small scales), with
    float32 norms, for tests/model/gguf_quant_types_test.cpp's loading tests."""
    writer = GGUFWriter(path, arch="llama")
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(TINY["vocab"])
    for name, rows, cols, kind in TINY_MATRICES:
        qtype, block_elems, block_bytes, fp16_fields, f32_field = FORMATS[kind]
        raw = random_blocks(rng, block_elems, block_bytes, fp16_fields, f32_field,
                            elements=rows * cols, max_exponent=-9)
        writer.add_tensor(name, raw.reshape(rows, cols // block_elems * block_bytes),
                          raw_dtype=qtype)
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        writer.add_tensor(name, rng.uniform(0.8, 1.2, size=TINY["hidden"]).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
