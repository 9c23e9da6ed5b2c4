// Private to the CUDA backend: a QuantizedCache layer's blocks as the kernels see them (device
// pointers, row strides, the record geometry) and the device functions that read one element of
// them. The byte layout is QuantizedKVView's (kvcache/cache/quantized_view.hpp): every group
// asymmetric, x' = code · scale + min, the (scale, min) pair stored as two float16 or two float32,
// codes packed little-endian within a byte, 8 / nbits to a byte. Records need not be aligned: the
// element readers read metadata byte by byte. When every record, row and buffer is 4-byte aligned
// and groups hold whole runs of 8 channels (QuantBlocksView::vec, the usual geometry), the kernels
// read 8 channels of a token at a time with word loads instead (quant_key8 / quant_value8).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "kvcache/cache/quantized_view.hpp"
#include "kvcache/error.hpp"

namespace kvcache::cuda::detail {

struct QuantBlocksView {
  const unsigned char* keys = nullptr;    // row 0's key blocks
  const unsigned char* values = nullptr;  // row 0's value blocks
  std::int64_t key_row_stride = 0;        // bytes between rows
  std::int64_t value_row_stride = 0;
  std::int64_t key_head_bytes = 0;    // one block of one head
  std::int64_t value_head_bytes = 0;  // one block of one head
  int tokens = 0;                     // quantized slots [0, tokens)
  int chunk = 1;                      // tokens per block
  int heads = 0;                      // kv heads
  int head_dim = 0;
  int token_group = 1;   // channels per group of a token record
  int token_record = 0;  // bytes of one token record (one head)
  int nbits = 4;         // 2, 4 or 8
  int meta_bytes = 4;    // 4: float16 (scale, min); 8: float32
  bool keys_per_channel = true;
  bool vec = false;  // word loads of 8-channel runs are aligned (see the top of the file)
};

/// The device view of a GPU QuantizedKVView, checked: one buffer per kind with a row stride
/// (batch > 1 needs it), sizes within 32-bit indices, a geometry the layout allows.
inline QuantBlocksView quant_blocks_view(const QuantizedKVView& v, const char* where) {
  KVCACHE_CHECK(v.nbits == 2 || v.nbits == 4 || v.nbits == 8, where,
                ": expected quantized blocks of 2, 4 or 8 bits, got ", v.nbits);
  KVCACHE_CHECK(v.scale_dtype == DType::kFloat16 || v.scale_dtype == DType::kFloat32, where,
                ": expected float16 or float32 scales, got ", dtype_name(v.scale_dtype));
  KVCACHE_CHECK(v.batch >= 1 && v.heads >= 1 && v.head_dim >= 1 && v.chunk >= 1 &&
                    v.token_group >= 1 && v.head_dim % v.token_group == 0 &&
                    (v.head_dim * v.nbits) % 8 == 0 && v.tokens >= 0 && v.tokens % v.chunk == 0,
                where, ": expected a consistent quantized layout, got batch ", v.batch, ", heads ",
                v.heads, ", head_dim ", v.head_dim, ", chunk ", v.chunk, ", token_group ",
                v.token_group, ", tokens ", v.tokens);
  KVCACHE_CHECK(static_cast<std::int64_t>(v.keys.size()) == v.batch &&
                    static_cast<std::int64_t>(v.values.size()) == v.batch,
                where, ": expected ", v.batch, " rows of block pointers, got ", v.keys.size(),
                " and ", v.values.size());
  KVCACHE_CHECK(v.tokens == 0 || (v.keys[0] != nullptr && v.values[0] != nullptr), where,
                ": expected device block pointers for ", v.tokens, " quantized tokens");
  for (std::int64_t b = 1; b < v.batch && v.tokens > 0; ++b) {
    KVCACHE_CHECK(v.keys[static_cast<std::size_t>(b)] == v.keys[0] + b * v.key_row_stride &&
                      v.values[static_cast<std::size_t>(b)] == v.values[0] + b * v.value_row_stride,
                  where,
                  ": expected every row's blocks at a fixed stride from row 0's (the GPU "
                  "cache's layout), row ",
                  b, " is not");
  }
  KVCACHE_CHECK(v.tokens <= (std::int64_t{1} << 30) && v.head_dim <= 4096 &&
                    v.token_record <= (std::size_t{1} << 20),
                where, ": expected sizes within 32-bit indices, got ", v.tokens, " tokens");
  QuantBlocksView q;
  q.keys = v.keys.empty() ? nullptr : v.keys[0];
  q.values = v.values.empty() ? nullptr : v.values[0];
  q.key_row_stride = v.key_row_stride;
  q.value_row_stride = v.value_row_stride;
  q.key_head_bytes = static_cast<std::int64_t>(v.key_head_bytes);
  q.value_head_bytes = static_cast<std::int64_t>(v.value_head_bytes);
  q.tokens = static_cast<int>(v.tokens);
  q.chunk = static_cast<int>(v.chunk);
  q.heads = static_cast<int>(v.heads);
  q.head_dim = static_cast<int>(v.head_dim);
  q.token_group = static_cast<int>(v.token_group);
  q.token_record = static_cast<int>(v.token_record);
  q.nbits = v.nbits;
  q.meta_bytes = v.scale_dtype == DType::kFloat16 ? 4 : 8;
  q.keys_per_channel = v.keys_per_channel;
  // Word loads: buffers, row strides and records at multiples of 4 bytes, and every run of 8
  // channels inside one group (one token meta per run) with its codes starting on a whole word
  // (a half word for 2-bit codes: 8 of them are 2 bytes).
  auto a4 = [](std::int64_t x) { return x % 4 == 0; };
  q.vec = q.head_dim % 8 == 0 && q.token_group % 8 == 0 &&
          a4(static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(q.keys))) &&
          a4(static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(q.values))) &&
          (v.batch == 1 || (a4(q.key_row_stride) && a4(q.value_row_stride))) &&
          a4(q.key_head_bytes) && a4(q.value_head_bytes) && a4(q.token_record);
  return q;
}

#ifdef __CUDACC__

/// The (scale, min) pair at p (any alignment).
__device__ __forceinline__ float2 quant_meta(const unsigned char* p, int meta_bytes) {
  if (meta_bytes == 4) {
    const unsigned short s = static_cast<unsigned short>(p[0] | (p[1] << 8));
    const unsigned short m = static_cast<unsigned short>(p[2] | (p[3] << 8));
    return make_float2(__half2float(__ushort_as_half(s)), __half2float(__ushort_as_half(m)));
  }
  const unsigned s = p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<unsigned>(p[3]) << 24);
  const unsigned m = p[4] | (p[5] << 8) | (p[6] << 16) | (static_cast<unsigned>(p[7]) << 24);
  return make_float2(__uint_as_float(s), __uint_as_float(m));
}

/// Code `idx` of a packed code array.
__device__ __forceinline__ unsigned quant_code(const unsigned char* codes, int idx, int nbits) {
  const int shift = nbits == 8 ? 0 : nbits == 4 ? 1 : 2;  // log2(codes per byte)
  const int lane = idx & ((1 << shift) - 1);
  return (codes[idx >> shift] >> (lane * nbits)) & ((1u << nbits) - 1u);
}

/// Channel c of a token record (metas of head_dim / token_group groups, then head_dim codes).
__device__ __forceinline__ float quant_token_record(const QuantBlocksView& q,
                                                    const unsigned char* rec, int c) {
  const float2 meta = quant_meta(rec + (c / q.token_group) * q.meta_bytes, q.meta_bytes);
  const unsigned char* codes = rec + (q.head_dim / q.token_group) * q.meta_bytes;
  return static_cast<float>(quant_code(codes, c, q.nbits)) * meta.x + meta.y;
}

/// Key slot `key` (< q.tokens), channel c, of batch row b and kv head h, dequantized.
__device__ __forceinline__ float quant_key(const QuantBlocksView& q, int b, int h, int key, int c) {
  const unsigned char* row = q.keys + b * q.key_row_stride;
  if (!q.keys_per_channel) {  // chunk 1: one token record per block
    return quant_token_record(
        q, row + (static_cast<std::int64_t>(key) * q.heads + h) * q.key_head_bytes, c);
  }
  const int block = key / q.chunk, i = key % q.chunk;
  const unsigned char* rec =
      row + (static_cast<std::int64_t>(block) * q.heads + h) * q.key_head_bytes;
  const float2 meta = quant_meta(rec + c * q.meta_bytes, q.meta_bytes);
  const unsigned char* codes = rec + q.head_dim * q.meta_bytes;
  return static_cast<float>(quant_code(codes, i * q.head_dim + c, q.nbits)) * meta.x + meta.y;
}

/// Value slot `key` (< q.tokens), channel c, of batch row b and kv head h, dequantized.
__device__ __forceinline__ float quant_value(const QuantBlocksView& q, int b, int h, int key,
                                             int c) {
  const int block = key / q.chunk, i = key % q.chunk;
  const unsigned char* rec = q.values + b * q.value_row_stride +
                             (static_cast<std::int64_t>(block) * q.heads + h) * q.value_head_bytes +
                             static_cast<std::int64_t>(i) * q.token_record;
  return quant_token_record(q, rec, c);
}

/// Eight dequantized channels of one token.
struct Quant8 {
  float x[8];
};

/// 8 consecutive codes at p (q.vec: p is 4-byte aligned for 4- and 8-bit codes, 2-byte for 2-bit)
/// as one 64-bit word, code k at bits [k · nbits, (k + 1) · nbits).
__device__ __forceinline__ unsigned long long quant_codes8(const unsigned char* p, int nbits) {
  if (nbits == 8) {
    const unsigned lo = __ldg(reinterpret_cast<const unsigned*>(p));
    const unsigned hi = __ldg(reinterpret_cast<const unsigned*>(p) + 1);
    return lo | (static_cast<unsigned long long>(hi) << 32);
  }
  if (nbits == 4) return __ldg(reinterpret_cast<const unsigned*>(p));
  return __ldg(reinterpret_cast<const unsigned short*>(p));
}

/// The (scale, min) pair at p, 4-byte aligned (q.vec).
__device__ __forceinline__ float2 quant_meta_aligned(const unsigned char* p, int meta_bytes) {
  if (meta_bytes == 4) {
    const unsigned w = __ldg(reinterpret_cast<const unsigned*>(p));
    return make_float2(__half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu))),
                       __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16))));
  }
  const unsigned s = __ldg(reinterpret_cast<const unsigned*>(p));
  const unsigned m = __ldg(reinterpret_cast<const unsigned*>(p) + 1);
  return make_float2(__uint_as_float(s), __uint_as_float(m));
}

/// Channels [c0, c0 + 8) of a token record (q.vec, c0 a multiple of 8): one meta, one code word.
__device__ __forceinline__ Quant8 quant_token_record8(const QuantBlocksView& q,
                                                      const unsigned char* rec, int c0) {
  const float2 meta = quant_meta_aligned(rec + (c0 / q.token_group) * q.meta_bytes, q.meta_bytes);
  const unsigned char* codes = rec + (q.head_dim / q.token_group) * q.meta_bytes;
  const unsigned long long bits = quant_codes8(codes + (c0 * q.nbits) / 8, q.nbits);
  const unsigned mask = (1u << q.nbits) - 1u;
  Quant8 r;
#pragma unroll
  for (int k = 0; k < 8; ++k)
    r.x[k] =
        static_cast<float>(static_cast<unsigned>(bits >> (k * q.nbits)) & mask) * meta.x + meta.y;
  return r;
}

/// quant_key for channels [c0, c0 + 8) (q.vec, c0 a multiple of 8). Per channel (KIVI): 8 metas
/// of the block's channels and one code word of the token; the same arithmetic as quant_key.
__device__ __forceinline__ Quant8 quant_key8(const QuantBlocksView& q, int b, int h, int key,
                                             int c0) {
  const unsigned char* row = q.keys + b * q.key_row_stride;
  if (!q.keys_per_channel) {
    return quant_token_record8(
        q, row + (static_cast<std::int64_t>(key) * q.heads + h) * q.key_head_bytes, c0);
  }
  const int block = key / q.chunk, i = key % q.chunk;
  const unsigned char* rec =
      row + (static_cast<std::int64_t>(block) * q.heads + h) * q.key_head_bytes;
  const unsigned char* codes = rec + q.head_dim * q.meta_bytes;
  const unsigned long long bits =
      quant_codes8(codes + ((i * q.head_dim + c0) * q.nbits) / 8, q.nbits);
  float2 meta[8];
#pragma unroll
  for (int k = 0; k < 8; ++k)
    meta[k] = quant_meta_aligned(rec + (c0 + k) * q.meta_bytes, q.meta_bytes);
  const unsigned mask = (1u << q.nbits) - 1u;
  Quant8 r;
#pragma unroll
  for (int k = 0; k < 8; ++k)
    r.x[k] = static_cast<float>(static_cast<unsigned>(bits >> (k * q.nbits)) & mask) * meta[k].x +
             meta[k].y;
  return r;
}

/// quant_value for channels [c0, c0 + 8) (q.vec, c0 a multiple of 8).
__device__ __forceinline__ Quant8 quant_value8(const QuantBlocksView& q, int b, int h, int key,
                                               int c0) {
  const int block = key / q.chunk, i = key % q.chunk;
  const unsigned char* rec = q.values + b * q.value_row_stride +
                             (static_cast<std::int64_t>(block) * q.heads + h) * q.value_head_bytes +
                             static_cast<std::int64_t>(i) * q.token_record;
  return quant_token_record8(q, rec, c0);
}

#endif  // __CUDACC__

}  // namespace kvcache::cuda::detail
