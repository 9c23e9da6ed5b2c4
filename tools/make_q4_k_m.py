#!/usr/bin/env python3
"""Writes a llama.cpp "Q4_K_M"-style GGUF of the default model, for the K-quant kernels' benchmarks.

Reads models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/setup-model.sh installs it), dequantizes
each matrix with gguf.quants and re-quantizes it to the type llama.cpp's Q4_K_M rule gives it
(llama_tensor_get_type in llama-quant.cpp, as of 2026):

- attn_v and ffn_down: Q6_K where use_more_bits(layer, n_layers) (the first and last eighth of the
  layers and every third one between), else Q4_K;
- every other matrix: Q4_K;
- a K-quant that does not fit the row (SmolLM2's 576 columns are not a multiple of the 256-value
  superblock) falls back as llama.cpp does: Q4_K -> Q5_0, Q6_K -> Q8_0;
- token_embd (Q8_0) and the norms (F32) are copied as the source file has them.

For SmolLM2-135M (30 layers) that is Q5_0 166 / Q4_K 16 / Q6_K 14 / Q8_0 15 tensors, the counts of
llama.cpp's own Q4_K_M file of this model. The values come from Q4_1 weights, not the original
bfloat16 ones, and gguf-py 0.19 cannot quantize K-types, so Q4_K and Q6_K are made here by a plain
min/max quantizer (no RMSE search as llama.cpp does): the kernels' speed depends on the layout, not
on how the values were chosen. Needs numpy and the gguf package.

    python3 tools/make_q4_k_m.py [--src models/SmolLM2-135M-Instruct.Q4_1.gguf]
                                 [--out models/SmolLM2-135M-Instruct.Q4_K_M.gguf]
"""
import argparse
import collections
import re

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import quants

QK_K = 256


def fp16(x):
    return np.asarray(x, dtype=np.float32).astype(np.float16)


def quantize_q4_k(w):
    """[rows, cols] float32 -> uint8 [rows, cols / 256 * 144] ggml Q4_K blocks (min/max)."""
    rows, cols = w.shape
    x = w.reshape(-1, 8, 32).astype(np.float32)  # superblock, sub-block, element
    lo = np.minimum(x.min(axis=2), 0.0)
    hi = x.max(axis=2)
    scale = (hi - lo) / 15.0
    d = fp16(scale.max(axis=1) / 63.0)
    dmin = fp16((-lo).max(axis=1) / 63.0)
    df, dminf = d.astype(np.float32), dmin.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df[:, None] > 0, np.rint(scale / df[:, None]), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dminf[:, None] > 0, np.rint(-lo / dminf[:, None]), 0).clip(0, 63).astype(
            np.uint8)
        step = df[:, None] * sc.astype(np.float32)
        offset = dminf[:, None] * mn.astype(np.float32)
        q = np.where(step[:, :, None] > 0, np.rint((x + offset[:, :, None]) / step[:, :, None]), 0)
    q = q.clip(0, 15).astype(np.uint8)  # [sb, 8, 32]
    n = x.shape[0]
    packed = np.zeros((n, 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    # Element chunk*64 + nibble*32 + l: nibble `nibble` of qs[chunk*32 + l].
    qc = q.reshape(n, 4, 2, 32)
    qs = (qc[:, :, 0, :] | (qc[:, :, 1, :] << 4)).reshape(n, 128)
    blocks = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2),
                             packed, qs], axis=1)
    return blocks.reshape(rows, cols // QK_K * 144)


def quantize_q6_k(w):
    """[rows, cols] float32 -> uint8 [rows, cols / 256 * 210] ggml Q6_K blocks (absmax)."""
    rows, cols = w.shape
    x = w.reshape(-1, 16, 16).astype(np.float32)
    s = np.abs(x).max(axis=2) / 31.0
    d = fp16(s.max(axis=1) / 127.0)
    df = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df[:, None] > 0, np.rint(s / df[:, None]), 0).clip(-128, 127).astype(np.int8)
        step = df[:, None] * sc.astype(np.float32)
        q = np.where(step[:, :, None] != 0, np.rint(x / step[:, :, None]), 0)
    q = (q.clip(-32, 31) + 32).astype(np.uint8).reshape(-1, 256)  # 0..63
    n = q.shape[0]
    # Element half*128 + r: low 4 bits nibble r // 64 of ql[half*64 + r % 64], high 2 bits at
    # 2 * (r // 32) of qh[half*32 + r % 32].
    qh4 = q.reshape(n, 2, 128)
    low, high = qh4 & 0x0F, qh4 >> 4
    ql = (low[:, :, 0:64] | (low[:, :, 64:128] << 4)).reshape(n, 128)
    hb = high.reshape(n, 2, 4, 32)
    qh = (hb[:, :, 0] | (hb[:, :, 1] << 2) | (hb[:, :, 2] << 4) | (hb[:, :, 3] << 6)).reshape(n, 64)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(n, 2)], axis=1)
    return blocks.reshape(rows, cols // QK_K * 210)


def use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def target_type(name, cols, n_layers):
    """llama.cpp's Q4_K_M choice for a matrix, with its fallback for rows not of 256s."""
    m = re.match(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m is None:
        return None  # token_embd / output: kept
    layer, kind = int(m.group(1)), m.group(2)
    want = T.Q4_K
    if kind in ("attn_v", "ffn_down") and use_more_bits(layer, n_layers):
        want = T.Q6_K
    if cols % QK_K:
        want = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}[want]
    return want


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", default="models/SmolLM2-135M-Instruct.Q4_K_M.gguf")
    args = ap.parse_args()
    reader = gguf.GGUFReader(args.src)
    arch = reader.fields["general.architecture"].contents()
    n_layers = int(reader.fields[f"{arch}.block_count"].contents())
    writer = gguf.GGUFWriter(args.out, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        if field.name == "general.file_type":
            value = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    counts = collections.Counter()
    for t in reader.tensors:
        cols = int(t.shape[0])
        want = target_type(t.name, cols, n_layers) if len(t.shape) == 2 else None
        if want is None:
            raw, qtype = np.asarray(t.data), t.tensor_type
        else:
            w = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1, cols)
            if want == T.Q4_K:
                raw = quantize_q4_k(w)
            elif want == T.Q6_K:
                raw = quantize_q6_k(w)
            else:
                raw = quants.quantize(w, want)
            back = quants.dequantize(raw, want).reshape(w.shape)
            rel = np.sqrt(np.mean((back - w) ** 2) / max(np.mean(w ** 2), 1e-30))
            if rel > 0.2:
                raise SystemExit(f"{t.name}: {want.name} relative RMS error {rel:.3f}")
            qtype = want
        counts[qtype.name] += 1
        if qtype == T.F32:
            writer.add_tensor(t.name, raw)
        else:
            writer.add_tensor(t.name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(args.out, dict(counts))


if __name__ == "__main__":
    main()
