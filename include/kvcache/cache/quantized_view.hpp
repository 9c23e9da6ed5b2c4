// What a cache layer that keeps part of its keys and values quantized hands the attention module
// (Cache::update_for_attention): the layer's quantized blocks as they sit in its storage, read by
// the attention kernels directly (cpu::attention_quantized dequantizes a few dozen keys at a time
// into an L1-sized buffer, never the whole history), beside the full-precision tokens after them.
//
// Layout (QuantizedCache's; every group asymmetric: x' = code * scale + min, scale and min stored
// as a pair of scale_dtype, codes packed little-endian within a byte, 8 / nbits to a byte).
// Per batch row b, keys[b] and values[b] hold blocks in order; block k, head h starts at
// k * heads * *_head_bytes + h * *_head_bytes. A block holds `chunk` tokens:
// - values, and keys when !keys_per_channel: `chunk` token records of token_record bytes, each
//   head_dim / token_group (scale, min) pairs, then head_dim codes;
// - keys when keys_per_channel (KIVI): head_dim (scale, min) pairs, one per channel, each over the
//   block's chunk tokens, then chunk * head_dim codes token-major (code of token i, channel c at
//   index i * head_dim + c).
// Slots [0, tokens) of the layer are in the blocks; the full-precision keys and values passed
// beside the view hold slots [tokens, tokens + their length). On the CPU each row's blocks are a
// host allocation of their own; on the GPU (QuantizedCache<cuda::Backend>) all rows sit in one
// device buffer, row b at b * key_row_stride / value_row_stride bytes, and the pointers are device
// addresses.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "kvcache/tensor.hpp"

namespace kvcache {

/// A layer's quantized blocks as the attention kernels read them (layout in the file comment).
struct QuantizedKVView {
  int nbits = 4;                        ///< 2, 4 or 8
  DType scale_dtype = DType::kFloat16;  ///< scale and min: float16 or float32
  bool keys_per_channel = true;         ///< keys' groups run along a channel's tokens (KIVI)
  std::int64_t batch = 0;               ///< batch rows
  std::int64_t heads = 0;               ///< kv heads
  std::int64_t head_dim = 0;            ///< elements per head
  /// Quantized tokens per row (slots [0, tokens)), a multiple of chunk.
  std::int64_t tokens = 0;
  std::int64_t chunk = 1;            ///< tokens per block
  std::int64_t token_group = 1;      ///< channels per group of a token record (divides head_dim)
  std::size_t token_record = 0;      ///< bytes of one token record (one head)
  std::size_t key_head_bytes = 0;    ///< bytes of one block of one head's keys
  std::size_t value_head_bytes = 0;  ///< bytes of one block of one head's values
  std::vector<const unsigned char*> keys{};    ///< per batch row: its key blocks
  std::vector<const unsigned char*> values{};  ///< per batch row: its value blocks
  /// Bytes from one batch row's key blocks to the next when every row sits in one buffer at a
  /// fixed stride (the GPU cache: keys[b] = keys[0] + b * key_row_stride, and the CUDA kernels
  /// read keys[0] and the stride); 0 when the rows are separate allocations (the CPU cache).
  std::int64_t key_row_stride = 0;
  std::int64_t value_row_stride = 0;  ///< the same for the values
};

namespace detail {

/// Bytes of one group's (scale, min) pair of `scale_dtype` (float16 or float32).
constexpr std::size_t quant_meta_bytes(DType scale_dtype) { return 2 * dtype_size(scale_dtype); }

/// The (scale, min) pair at `p` as floats: one reader for the cache's quantizer and reference
/// dequantizer and for the attention kernels, so both decode the blocks alike.
inline std::pair<float, float> quant_meta(const unsigned char* p, DType scale_dtype) {
  if (scale_dtype == DType::kFloat16) {
    float16 h[2];
    std::memcpy(h, p, sizeof(h));
    return {to_float(h[0]), to_float(h[1])};
  }
  float f[2];
  std::memcpy(f, p, sizeof(f));
  return {f[0], f[1]};
}

}  // namespace detail

}  // namespace kvcache
