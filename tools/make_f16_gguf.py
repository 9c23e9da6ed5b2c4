#!/usr/bin/env python3
"""Writes F16 (and BF16) GGUF files of the default model, for the dense-weight benchmarks and tests.

Reads models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/setup-model.sh installs it), dequantizes
every quantized matrix with gguf.quants (Q4_1 layers, the Q8_0 embedding that is also the LM head)
and writes it as float16 (ggml type F16) or bfloat16 (BF16), each value rounded to nearest even;
the norms stay F32 and every metadata key is copied, with general.file_type set to 1 (MOSTLY_F16)
or 32 (MOSTLY_BF16). The values are the Q4_1 file's, rounded, not the original checkpoint's: what
the kernels' speed depends on is the format and the shapes, and the parity tests compare a file
held as stored with the same file widened to float32. Needs numpy and the gguf package.

    python3 tools/make_f16_gguf.py [--src models/SmolLM2-135M-Instruct.Q4_1.gguf]
                                   [--out models/SmolLM2-135M-Instruct.F16.gguf]
                                   [--bf16-out models/SmolLM2-135M-Instruct.BF16.gguf]
                                   [--no-bf16]
"""
import argparse
import collections

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import quants

FILE_TYPE = {T.F16: 1, T.BF16: 32}  # llama.cpp's LLAMA_FTYPE_MOSTLY_F16 / _BF16


def to_bf16_bits(w):
    """float32 array -> uint16 bfloat16 bits, rounded to nearest even (NaN kept a quiet NaN)."""
    u = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)


def write(reader, out, qtype):
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        if field.name == "general.file_type":
            value = FILE_TYPE[qtype]
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    counts = collections.Counter()
    for t in reader.tensors:
        if t.tensor_type == T.F32 or len(t.shape) != 2:
            raw, kind = np.asarray(t.data), t.tensor_type
        else:
            cols = int(t.shape[0])
            w = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1, cols)
            if not np.all(np.isfinite(w)):
                raise SystemExit(f"{t.name}: non-finite values after dequantization")
            if qtype == T.F16:
                if np.abs(w).max() > 65504.0:
                    raise SystemExit(f"{t.name}: values past float16's range")
                raw = w.astype(np.float16)
            else:
                raw = to_bf16_bits(w).view(np.uint8).reshape(w.shape[0], cols * 2)
            kind = qtype
        counts[kind.name] += 1
        if kind == T.F32:
            writer.add_tensor(t.name, raw)
        elif kind == T.F16:
            writer.add_tensor(t.name, raw)  # a float16 array: F16
        else:
            writer.add_tensor(t.name, raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(out, dict(counts))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", default="models/SmolLM2-135M-Instruct.F16.gguf")
    ap.add_argument("--bf16-out", default="models/SmolLM2-135M-Instruct.BF16.gguf")
    ap.add_argument("--no-bf16", action="store_true", help="write the F16 file only")
    args = ap.parse_args()
    reader = gguf.GGUFReader(args.src)
    write(reader, args.out, T.F16)
    if not args.no_bf16:
        write(reader, args.bf16_out, T.BF16)


if __name__ == "__main__":
    main()
