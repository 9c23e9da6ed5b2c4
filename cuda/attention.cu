// kvcache::cuda::attention: the argument checks and the choice of kernel. Everything is checked
// before anything is launched, so a call that throws has written nothing.
//
// Paths (attention.cuh declares them):
// - prefill (q_len > kMaxDecodeQLen), float16/bfloat16, head_dim 64 or 128, 16-byte aligned rows:
//   the tensor-core flash-attention-2 kernel (prefill_attention.cu);
// - decode (q_len <= kMaxDecodeQLen), float16/bfloat16, head_dim 64 or 128, aligned rows: the
//   tensor-core flash-decoding kernel (mma.sync), split across blocks along the keys when
//   batch × kv_heads alone would leave SMs idle, then merged (decode_attention.cu);
// - decode as above in float32 (or in every dtype with kUseTensorCoreDecode off): the SIMT
//   flash-decoding kernel, with the same splitting and merge;
// - anything else (float32 prefill, other head dims, unaligned views): the generic SIMT kernel,
//   with the same splitting;
// - a QuantizedCache layer with quantized tokens (attention_quantized): for decode at head_dim 64
//   or 128 with word-aligned blocks and 16-byte aligned residual rows, the quantized decode kernel
//   (each lane dequantizes its runs of 8 channels in registers); otherwise the generic kernel,
//   which dequantizes the blocks as it stages each tile of keys and values (any q_len).
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>

#include "attention.cuh"
#include "check.cuh"
#include "dtype.cuh"
#include "kvcache/backend/attention_shapes.hpp"
#include "kvcache/backend/cuda.hpp"

namespace kvcache::cuda {
namespace {

// The tensor-core decode kernel for float16/bfloat16 decode at head_dim 64/128. false: those calls
// go back to the SIMT flash-decoding kernel (same split plan rules, same merge).
constexpr bool kUseTensorCoreDecode = true;

}  // namespace

namespace {

// Both entry points: kv_len_device undefined for the ordinary call, else the decode step whose
// key count is read on the device (keys and values then span the storage's capacity).
void attention_impl(const Tensor& query, const Tensor& keys, const Tensor& values,
                    const Tensor& mask, const Tensor& cache_position, std::int64_t kv_offset,
                    float scale, const Tensor& out, const Tensor& kv_len_device,
                    std::optional<std::int64_t> sliding_window,
                    const QuantizedKVView* quant = nullptr) {
  const char* where = quant ? "cuda::attention_quantized" : "cuda::attention";
  KVCACHE_CHECK(!sliding_window || *sliding_window >= 1, where,
                ": expected a sliding_window >= 1 (or none), got ", sliding_window.value_or(0));
  const kvcache::detail::AttentionShape shape =
      kvcache::detail::check_attention_operands(query, keys, values, out, Device::kCuda, where);
  const DType dtype = query.dtype();
  const std::int64_t batch = shape.batch, num_heads = shape.num_heads, q_len = shape.q_len,
                     head_dim = shape.head_dim, num_kv_heads = shape.num_kv_heads;
  // A quantized layer's keys: its blocks' tokens, then the full-precision ones in `keys`.
  const std::int64_t quant_tokens = quant ? quant->tokens : 0;
  if (quant) {
    KVCACHE_CHECK(
        quant->batch == batch && quant->heads == num_kv_heads && quant->head_dim == head_dim &&
            quant->tokens >= 0 && quant->tokens <= std::numeric_limits<int>::max(),
        where, ": expected quantized blocks of batch ", batch, ", ", num_kv_heads,
        " kv heads and head_dim ", head_dim, ", got batch ", quant->batch, ", ", quant->heads,
        " heads, head_dim ", quant->head_dim, " and ", quant->tokens, " tokens");
  }
  const std::int64_t kv_len = shape.kv_len + quant_tokens;
  KVCACHE_CHECK(head_dim > 0 && head_dim <= 256 && head_dim % 2 == 0, where,
                ": expected an even head_dim up to 256, got ", head_dim);
  KVCACHE_CHECK(query.stride(3) == 1 && keys.stride(3) == 1 && values.stride(3) == 1, where,
                ": expected query, keys and values with a contiguous last dimension, got ",
                query.describe(), ", ", keys.describe(), " and ", values.describe());
  KVCACHE_CHECK(out.is_contiguous(), where, ": expected a contiguous out, got ", out.describe());
  KVCACHE_CHECK(cache_position.defined() && cache_position.device() == Device::kCuda &&
                    cache_position.dtype() == DType::kInt64 && cache_position.rank() == 1 &&
                    cache_position.size(0) == q_len && cache_position.is_contiguous(),
                where, ": expected cache_position [", q_len, "] int64 contiguous on cuda, got ",
                cache_position.defined() ? cache_position.describe() : "undefined");
  KVCACHE_CHECK(reinterpret_cast<std::uintptr_t>(cache_position.data()) % 8 == 0, where,
                ": expected cache_position 8-byte aligned, got address ", cache_position.data());
  if (mask.defined()) {
    // [batch, kv_len], or the same bytes flat ([batch · kv_len], as upload() returns them).
    const bool shaped = (mask.rank() == 2 && mask.size(0) == batch && mask.size(1) == kv_len) ||
                        (mask.rank() == 1 && mask.size(0) == batch * kv_len);
    KVCACHE_CHECK(mask.device() == Device::kCuda && mask.dtype() == DType::kUInt8 && shaped &&
                      mask.is_contiguous(),
                  where, ": expected a padding mask [", batch, ", ", kv_len,
                  "] uint8 contiguous on cuda, got ", mask.describe());
  }
  const bool dynamic = kv_len_device.defined();
  if (dynamic) {
    KVCACHE_CHECK(kv_len_device.device() == Device::kCuda &&
                      kv_len_device.dtype() == DType::kInt64 && kv_len_device.numel() == 1 &&
                      reinterpret_cast<std::uintptr_t>(kv_len_device.data()) % 8 == 0,
                  where, ": expected kv_len_device int64 [1] on cuda, 8-byte aligned, got ",
                  kv_len_device.describe());
    KVCACHE_CHECK(q_len <= detail::kMaxDecodeQLen, where,
                  ": a key count read on the device serves decode (q_len <= ",
                  detail::kMaxDecodeQLen, "), got q_len ", q_len);
  }
  constexpr std::int64_t kIntMax = std::numeric_limits<int>::max();
  KVCACHE_CHECK(batch * num_heads <= kIntMax && q_len * num_heads <= kIntMax && kv_len <= kIntMax,
                where, ": expected sizes that fit 32-bit indices, got query ", query.shape_string(),
                " and keys ", keys.shape_string());
  if (batch == 0 || q_len == 0 || num_heads == 0) return;

  detail::AttentionView view{};
  view.query = query.data();
  view.keys = keys.data();
  view.values = values.data();
  view.out = out.data();
  view.mask = mask.defined() ? static_cast<const std::uint8_t*>(mask.data()) : nullptr;
  view.cache_position = static_cast<const std::int64_t*>(cache_position.data());
  view.kv_len_device = dynamic ? static_cast<const std::int64_t*>(kv_len_device.data()) : nullptr;
  view.mask_stride = kv_len;
  view.q_stride_batch = query.stride(0);
  view.q_stride_head = query.stride(1);
  view.q_stride_seq = query.stride(2);
  view.k_stride_batch = keys.stride(0);
  view.k_stride_head = keys.stride(1);
  view.k_stride_seq = keys.stride(2);
  view.v_stride_batch = values.stride(0);
  view.v_stride_head = values.stride(1);
  view.v_stride_seq = values.stride(2);
  view.batch = static_cast<int>(batch);
  view.num_heads = static_cast<int>(num_heads);
  view.num_kv_heads = static_cast<int>(num_kv_heads);
  view.q_len = static_cast<int>(q_len);
  view.kv_len = static_cast<int>(kv_len);
  view.head_dim = static_cast<int>(head_dim);
  view.group = static_cast<int>(num_heads / num_kv_heads);
  view.rows = static_cast<int>(q_len * view.group);
  view.kv_offset = kv_offset;
  view.scale_log2 = scale * 1.4426950408889634f;  // log2(e): the kernels use exp2
  // A window of 2^31 - 1 slots or more hides nothing a 32-bit key index can reach.
  view.window = sliding_window && *sliding_window < std::numeric_limits<int>::max()
                    ? static_cast<int>(*sliding_window)
                    : 0;

  const cudaStream_t stream = detail::stream();
  const bool decode = q_len <= detail::kMaxDecodeQLen;
  const bool fast_rows =
      (head_dim == 64 || head_dim == 128) && detail::rows_are_16b_aligned(view, dtype);
  // Split partials: float32 [units, splits, rows, head_dim] then float2 [units, splits, rows]
  // (attention.cuh); from the stream-ordered pool, released once the merge has run.
  auto split_workspace = [&](const detail::SplitPlan& plan) {
    return plan.splits > 1 ? empty({detail::split_workspace_floats(view, plan)}, DType::kFloat32)
                           : Tensor();
  };
  if (quant_tokens > 0) {
    // Blocks and residual in one flash loop, split over the keys and merged for decode: the
    // quantized decode kernel where the layout allows word loads, else the generic kernel (every
    // tile staged through shared memory as float32).
    const detail::QuantBlocksView qb = detail::quant_blocks_view(*quant, where);
    const detail::SplitPlan plan =
        detail::plan_split(view, dtype,
                           decode && fast_rows && qb.vec ? detail::SplitKernel::kDecodeQuant
                                                         : detail::SplitKernel::kGeneric);
    const Tensor workspace = split_workspace(plan);
    float* partials = workspace.defined() ? workspace.data_as<float>() : nullptr;
    KVCACHE_CUDA_CHECK(
        detail::launch_split_attention_quantized(view, qb, dtype, plan, partials, stream));
    return;
  }
  if (!decode && detail::prefill_supported(view, dtype)) {
    KVCACHE_CUDA_CHECK(detail::launch_prefill_attention(view, dtype, stream));
    return;
  }
  const bool half_type = dtype == DType::kBFloat16 || dtype == DType::kFloat16;
  detail::SplitKernel kernel = detail::SplitKernel::kGeneric;
  if (decode && fast_rows) {
    kernel = kUseTensorCoreDecode && half_type ? detail::SplitKernel::kDecodeMma
                                               : detail::SplitKernel::kDecode;
  }
  const detail::SplitPlan plan = detail::plan_split(view, dtype, kernel);
  const Tensor workspace = split_workspace(plan);
  float* partials = workspace.defined() ? workspace.data_as<float>() : nullptr;
  KVCACHE_CUDA_CHECK(detail::launch_split_attention(view, dtype, plan, partials, stream));
}

}  // namespace

void attention_quantized(const Tensor& query, const QuantizedKVView& blocks, const Tensor& keys,
                         const Tensor& values, const Tensor& mask, const Tensor& cache_position,
                         std::int64_t kv_offset, float scale, const Tensor& out,
                         std::optional<std::int64_t> sliding_window) {
  attention_impl(query, keys, values, mask, cache_position, kv_offset, scale, out, Tensor(),
                 sliding_window, &blocks);
}

void attention(const Tensor& query, const Tensor& keys, const Tensor& values, const Tensor& mask,
               const Tensor& cache_position, std::int64_t kv_offset, float scale, const Tensor& out,
               std::optional<std::int64_t> sliding_window) {
  attention_impl(query, keys, values, mask, cache_position, kv_offset, scale, out, Tensor(),
                 sliding_window);
}

void attention(const Tensor& query, const Tensor& keys, const Tensor& values, const Tensor& mask,
               const Tensor& cache_position, std::int64_t kv_offset, float scale, const Tensor& out,
               const Tensor& kv_len_device, std::optional<std::int64_t> sliding_window) {
  KVCACHE_CHECK(kv_len_device.defined(),
                "cuda::attention: expected kv_len_device int64 [1] on cuda, got undefined");
  attention_impl(query, keys, values, mask, cache_position, kv_offset, scale, out, kv_len_device,
                 sliding_window);
}

}  // namespace kvcache::cuda
