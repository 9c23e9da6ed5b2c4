// Private to the CUDA attention: the plain view of one attention call that attention.cu builds
// from the checked tensors and the kernels of decode_attention.cu and prefill_attention.cu read,
// the split plan of the flash-decoding path, and the launchers (which take the stream, never
// allocate, and return the launch's cudaError_t for attention.cu to check).
//
// Packed query rows. The num_heads / num_kv_heads query heads that share a kv head are processed
// by the same blocks, so each key and value row is read from memory once per block, not once per
// query head (FlashInfer's GQA packing). Inside one (batch row, kv head) the query rows are
// numbered r = i * group + g for query position i and the g-th query head of the group (query
// head kv_head * group + g): consecutive rows are consecutive positions when group == 1 and
// neighbouring heads otherwise, so a block of rows spans few positions and the causal frontier of
// the block stays tight.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kvcache/error.hpp"
#include "kvcache/tensor.hpp"
#include "mma.cuh"
#include "quant_kv.cuh"

namespace kvcache::cuda::detail {

/// One attention call: pointers, strides in elements, sizes. The last dimension of query, keys
/// and values is contiguous; `out` is contiguous.
struct AttentionView {
  const void* query;                   // [batch, num_heads, q_len, head_dim]     strides q_stride_*
  const void* keys;                    // [batch, num_kv_heads, kv_len, head_dim] strides k_stride_*
  const void* values;                  // [batch, num_kv_heads, kv_len, head_dim] strides v_stride_*
  void* out;                           // [batch, q_len, num_heads, head_dim]     contiguous
  const std::uint8_t* mask;            // [batch, kv_len] row-major, nonzero = attend; null: none
  const std::int64_t* cache_position;  // [q_len] absolute slot of each query
  // Split kernels only: when set, the keys taking part are the first min(*kv_len_device, kv_len)
  // (a decode step replayed from a CUDA graph; kv_len is then the storage's capacity, which the
  // split plan covers). Null: all kv_len keys.
  const std::int64_t* kv_len_device;
  std::int64_t mask_stride;  // bytes between mask rows (kv_len, or the capacity with kv_len_device)
  std::int64_t q_stride_batch, q_stride_head, q_stride_seq;
  std::int64_t k_stride_batch, k_stride_head, k_stride_seq;
  std::int64_t v_stride_batch, v_stride_head, v_stride_seq;
  int batch, num_heads, num_kv_heads, q_len, kv_len, head_dim;
  int group;               // num_heads / num_kv_heads: query heads per kv head
  int rows;                // group * q_len: packed query rows per (batch row, kv head)
  std::int64_t kv_offset;  // absolute slot of key 0
  float scale_log2;        // softmax scale · log2(e): the kernels take exp2 of scaled scores
  int window;              // sliding window W: a query at slot q sees slots (q - W, q]; 0: none
};

/// Which split-capable kernel serves a call (decode_attention.cu holds all three).
enum class SplitKernel {
  kDecodeMma,  // float16/bfloat16, head_dim 64/128, 16-byte aligned rows, q_len <= kMaxDecodeQLen:
               // tensor cores (mma.sync m16n8k16), per-warp cp.async pipelines
  kDecode,     // head_dim 64/128, 16-byte aligned rows, q_len <= kMaxDecodeQLen: cp.async pipeline,
               // SIMT dot products (float32, or every dtype when kUseTensorCoreDecode is off)
  kGeneric,    // anything else: any even head_dim <= 256, any alignment, scalar loads (SIMT)
  kDecodeQuant,  // a QuantizedCache layer, head_dim 64/128, word-aligned blocks, 16-byte aligned
                 // residual rows, q_len <= kMaxDecodeQLen: dequantized in registers (SIMT)
};

/// How a split-capable kernel covers the call: blocks = units × splits × row_blocks, units =
/// batch × num_kv_heads. Each block handles `rows_per_block` packed rows of one unit against keys
/// [split · keys_per_split, (split + 1) · keys_per_split).
struct SplitPlan {
  SplitKernel kernel;
  int rows_per_block;  // packed query rows per block (decode, quantized decode: 1, 2, 4 or 8;
                       // mma, generic: 16)
  int row_blocks;      // ceil(rows / rows_per_block)
  int splits;          // blocks along the keys; 1 = the blocks write `out` directly
  int keys_per_split;  // a multiple of the kernel's key tile
};

/// The split workspace (only when splits > 1), float32, allocated by the caller:
///   partial_out    [units, splits, rows, head_dim]  Σ_j exp2(s_j - m) · v_j, unnormalised
///   partial_stats  [units, splits, rows] float2     (m, l): running max (log2 domain, -inf when
///                                                   the split saw no key) and Σ_j exp2(s_j - m)
/// partial_stats starts right after partial_out in one buffer of split_workspace_floats floats.
std::int64_t split_workspace_floats(const AttentionView& view, const SplitPlan& plan);

/// Most query positions the flash-decoding kernel serves; longer calls go to the prefill path.
inline constexpr int kMaxDecodeQLen = 8;

/// True when the 16-byte vector paths (decode kernel, tensor-core prefill) can read every row of
/// query, keys and values and write `out` with aligned 16-byte accesses.
bool rows_are_16b_aligned(const AttentionView& view, DType dtype);

/// Chooses rows per block, row blocks and splits so that the blocks fill the GPU's SMs once
/// (splits > 1 only while batch × kv_heads × row_blocks leaves SMs idle) with each block still
/// long enough to run its load pipeline.
SplitPlan plan_split(const AttentionView& view, DType dtype, SplitKernel kernel);

/// Launches the split kernel and, when plan.splits > 1, the merge kernel that combines the
/// partials in `workspace` (split_workspace_floats(view, plan) floats) into `out`.
cudaError_t launch_split_attention(const AttentionView& view, DType dtype, const SplitPlan& plan,
                                   float* workspace, cudaStream_t stream);

/// The generic kernel over a QuantizedCache layer (keys [0, qb.tokens) from the blocks, the rest
/// from view.keys / view.values at key - qb.tokens) and, when plan.splits > 1, the merge. The plan
/// is plan_split(view, dtype, SplitKernel::kGeneric).
cudaError_t launch_split_attention_quantized(const AttentionView& view, const QuantBlocksView& qb,
                                             DType dtype, const SplitPlan& plan, float* workspace,
                                             cudaStream_t stream);

/// True when the tensor-core prefill serves this call (float16/bfloat16, head_dim 64 or 128,
/// 16-byte aligned rows).
bool prefill_supported(const AttentionView& view, DType dtype);

/// Flash-attention-2 prefill with tensor cores (mma.sync m16n8k16), one pass, no workspace.
cudaError_t launch_prefill_attention(const AttentionView& view, DType dtype, cudaStream_t stream);

/// Calls f(std::integral_constant<int, D>{}) with D = 64 or 128 for those head dims and D = 0
/// (the generic kernel, head_dim read at run time) for any other even head_dim up to 256; any
/// other value is a kvcache::Error naming `where`.
template <class F>
decltype(auto) dispatch_head_dim(int head_dim, const char* where, F&& f) {
  switch (head_dim) {
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    default:
      KVCACHE_CHECK(head_dim > 0 && head_dim <= 256 && head_dim % 2 == 0, where,
                    ": expected an even head_dim up to 256, got ", head_dim);
      return f(std::integral_constant<int, 0>{});
  }
}

}  // namespace kvcache::cuda::detail

// --- device helpers shared by the attention kernels ---------------------------------------------
namespace kvcache::cuda::detail {

/// 16-byte asynchronous copy global → shared (cp.async.cg: through L2, not L1, the data is used
/// once). With `fill` false no global byte is read and the 16 shared bytes become zeros: rows past
/// the key range arrive as zeros, so a masked key's value row is 0, never stale memory (0 · NaN
/// would poison the sum).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool fill) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = fill ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
/// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/// A key's visibility limit for packed row `row`: key j is causally visible iff j <= limit.
/// Clamped to [-1, kv_len - 1], so `j <= limit` also keeps j inside the keys.
__device__ __forceinline__ int row_key_limit(const AttentionView& p, int row) {
  const int i = row / p.group;
  const std::int64_t limit = p.cache_position[i] - p.kv_offset;
  return static_cast<int>(limit < -1 ? -1 : (limit >= p.kv_len ? p.kv_len - 1 : limit));
}

/// The first key visible to packed row `row` under the sliding window: key j is visible iff
/// row_key_first <= j <= row_key_limit (slot kv_offset + j > cache_position[i] - window). 0 without
/// a window; clamped to [0, kv_len].
__device__ __forceinline__ int row_key_first(const AttentionView& p, int row) {
  if (p.window <= 0) return 0;
  const int i = row / p.group;
  const std::int64_t first = p.cache_position[i] - p.kv_offset - p.window + 1;
  return static_cast<int>(first < 0 ? 0 : (first > p.kv_len ? p.kv_len : first));
}

/// The keys a split kernel's block attends over: kv_len, or the count read on the device.
__device__ __forceinline__ int visible_keys(const AttentionView& p) {
  if (p.kv_len_device == nullptr) return p.kv_len;
  const std::int64_t n = *p.kv_len_device;
  return static_cast<int>(n < 0 ? 0 : (n > p.kv_len ? p.kv_len : n));
}

/// Element offset of out[b, i, h, 0] for packed row `row` of kv head `kv_head`.
__device__ __forceinline__ std::int64_t out_row_offset(const AttentionView& p, int b, int kv_head,
                                                       int row) {
  const int i = row / p.group, h = kv_head * p.group + row % p.group;
  return ((static_cast<std::int64_t>(b) * p.q_len + i) * p.num_heads + h) * p.head_dim;
}

/// Element offset of query[b, h, i, 0] for packed row `row` of kv head `kv_head`.
__device__ __forceinline__ std::int64_t query_row_offset(const AttentionView& p, int b, int kv_head,
                                                         int row) {
  const int i = row / p.group, h = kv_head * p.group + row % p.group;
  return b * p.q_stride_batch + h * p.q_stride_head + i * p.q_stride_seq;
}

}  // namespace kvcache::cuda::detail
