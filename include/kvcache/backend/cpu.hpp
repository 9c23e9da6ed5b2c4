// The CPU backend: element copies between tensors, and the attention math over views, written with
// Eigen maps over the tensors' memory and OpenMP across the cores. It owns no bookkeeping: caches
// decide what to copy where, this file only moves and multiplies numbers.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

#include "kvcache/cache/quantized_view.hpp"
#include "kvcache/tensor.hpp"

namespace kvcache::cpu {

/// Copies `src` into `dst` element by element. Shapes must match; dtypes may differ (converted with
/// round-to-nearest-even); any strides. Both tensors on the CPU.
void copy(const Tensor& dst, const Tensor& src);

/// A new contiguous CPU tensor holding `src`'s elements, converted to `dtype`.
Tensor cast(const Tensor& src, DType dtype);
/// A new contiguous CPU tensor holding `src`'s elements in its own dtype.
inline Tensor clone(const Tensor& src) { return cast(src, src.dtype()); }

/// The backend a Cache is instantiated on: where its storage lives and how it copies.
struct Backend {
  static constexpr Device kDevice = Device::kCpu;   ///< where the storage lives
  static constexpr std::string_view kName = "cpu";  ///< the backend's name in messages
  /// Contiguous, uninitialised storage on this backend's device.
  static Tensor empty(Shape shape, DType dtype) { return Tensor::empty(shape, dtype); }
  /// Same-shape copy between two tensors on this backend's device.
  static void copy(const Tensor& dst, const Tensor& src) { cpu::copy(dst, src); }
};

/// softmax(Q·Kᵀ·scale + mask)·V over given keys and values, grouped-query aware, softmax and
/// accumulation in float32 whatever the input dtype.
///   query           [batch, num_heads, q_len, head_dim]        float32 / float16 / bfloat16
///   keys, values    [batch, num_kv_heads, kv_len, head_dim]    same dtype as query
///   attention_mask  [batch, kv_len] int64 / int32 / uint8 (nonzero = attend), or undefined (all)
///   cache_position  [q_len] absolute slot of each query; key j sits at slot kv_offset + j and is
///                   visible to query i when kv_offset + j <= cache_position[i] and it is not
///                   padding
///   out             [batch, q_len, num_heads, head_dim]        query's dtype (transformers' layout
///                   after eager attention's transpose, ready for the output projection)
///   sliding_window  none (full attention), or W >= 1: key slot kv_offset + j is visible to
///                   query i only when it is also > cache_position[i] - W (transformers' sliding
///                   window: the query and the W - 1 slots before it)
/// num_heads must be a multiple of num_kv_heads. Query rows that see no key give zeros.
/// Shapes are checked (kvcache::Error); `out` is written only after all checks pass.
void attention(const Tensor& query, const Tensor& keys, const Tensor& values,
               const Tensor& attention_mask, std::span<const std::int64_t> cache_position,
               std::int64_t kv_offset, float scale, const Tensor& out,
               std::optional<std::int64_t> sliding_window = std::nullopt);

/// The same with the padding mask already as bytes ([batch, kv_len] row-major, nonzero = attend;
/// empty = no padding), as kvcache::mask_to_bytes gives it: callers that checked the mask once
/// (the attention module) do not convert it again.
void attention(const Tensor& query, const Tensor& keys, const Tensor& values,
               std::span<const std::uint8_t> mask_bytes,
               std::span<const std::int64_t> cache_position, std::int64_t kv_offset, float scale,
               const Tensor& out, std::optional<std::int64_t> sliding_window = std::nullopt);

/// The same over a layer whose oldest keys and values are quantized (QuantizedCache): key slots
/// [0, blocks.tokens) are read from the blocks, dequantized a chunk of keys at a time into a
/// per-thread buffer that stays in L1 (never the whole history), and slots [blocks.tokens,
/// kv_len) from `keys` / `values` [batch, num_kv_heads, kv_len - blocks.tokens, head_dim] (full
/// precision, query's dtype, contiguous head_dim). kv_len = blocks.tokens + keys.size(2); mask
/// bytes, cache_position, kv_offset and sliding_window as above. Equal to attention() over the
/// dequantized keys and values within float32 rounding (no rounding of them to the query's
/// dtype).
void attention_quantized(const Tensor& query, const QuantizedKVView& blocks, const Tensor& keys,
                         const Tensor& values, std::span<const std::uint8_t> mask_bytes,
                         std::span<const std::int64_t> cache_position, std::int64_t kv_offset,
                         float scale, const Tensor& out,
                         std::optional<std::int64_t> sliding_window = std::nullopt);

/// RoPE re-rotation of `rows` head_dim-long rows (rotate_half pairs (i, i + head_dim / 2)):
/// dst row r = (x1 cos - x2 sin, x2 cos + x1 sin) of src row r, in float32 with cos / sin
/// [head_dim / 2] given (the shift's, computed once), rounded once to `dtype` (float32, float16 or
/// bfloat16). Strides in elements; dst may be src (in place) or rows below it taken in ascending
/// order (a slide down). Sixteen lanes at a time for float32 and bfloat16.
void rotate_rows(const void* src, void* dst, DType dtype, std::int64_t rows, std::int64_t head_dim,
                 std::int64_t src_stride, std::int64_t dst_stride, const float* cos,
                 const float* sin);

// --- dense layers (the model's building blocks) ---------------------------------------------
// All take and return contiguous float32 CPU tensors; weights may be float32, bfloat16 or float16
// (16-bit weights are widened on the fly). Threaded over the output features with OpenMP.

/// y = x · Wᵀ (+ bias): x [rows, in] float32, weight [out, in], bias [out] or undefined;
/// returns [rows, out] float32.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias = Tensor());

/// RMSNorm as transformers computes it: x · rsqrt(mean(x²) + eps) · weight, per row of x
/// [rows, hidden] float32; weight [hidden]. Returns a new tensor.
Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps);

/// The SiLU-gated MLP's middle: silu(gate) · up, elementwise, [rows, n] float32 each.
Tensor silu_mul(const Tensor& gate, const Tensor& up);

/// y += x elementwise (same shape, float32, contiguous).
void add_inplace(const Tensor& y, const Tensor& x);

/// Rows of `table` [vocab, hidden] picked by `ids` (int64, any shape, values checked against
/// vocab): returns [numel(ids), hidden] float32.
Tensor embedding(const Tensor& table, const Tensor& ids);

/// Number of threads the CPU kernels use (OpenMP's maximum, 1 when built without OpenMP).
int num_threads();

/// Sets the number of threads the CPU kernels use from now on, on the calling thread (OpenMP's
/// omp_set_num_threads: the setting belongs to the thread that makes it, so a program running
/// generations on several threads sets it on each). Without a call, OpenMP's default applies:
/// OMP_NUM_THREADS if set, else one thread per core. n must be at least 1; a library built
/// without OpenMP accepts only 1.
void set_num_threads(int n);

}  // namespace kvcache::cpu
