// QuantizedCache's kernels on the GPU: the flush that quantizes residual chunks into blocks, and
// the dequantization of a layer's blocks (update()'s path). The quantizer runs the CPU's
// detail::QuantCodec::quantize operation for operation in float32 with explicit round-to-nearest
// intrinsics (no contraction into FMAs, no approximate division), so both backends store the same
// bytes:
//   lo, hi = min, max of the group (std::min / std::max's comparisons)
//   mn = round(lo); if mn > lo: mn = round(lo - |lo| · 2^-10 - 2^-24)      (round: to scale_dtype)
//   s = (hi - mn) / qmax; sr = round(s); if sr < s: sr = round(s · (1 + 2^-10))
//   code = clamp(rint((x - mn) · (1 / sr)), 0, qmax)                    (1 / sr = 0 when sr = 0)
// One thread writes whole bytes of one record (a token record, or a run of 8 / nbits channels of
// a per-channel key block), so no two threads touch one byte and nothing needs zeroing first.
#include <cstdint>

#include "check.cuh"
#include "dtype.cuh"
#include "kvcache/backend/cuda.hpp"
#include "quant_kv.cuh"

namespace kvcache::cuda {
namespace {

using detail::QuantBlocksView;

__device__ __forceinline__ float round_meta(float v, bool f16) {
  return f16 ? __half2float(__float2half_rn(v)) : v;
}

struct GroupCodec {
  float mn, inv;
};

// Quantizes n values x[0], x[stride], ... : writes the (scale, min) pair at meta and returns what
// the codes need.
template <class T>
__device__ GroupCodec quantize_group(const T* x, std::int64_t stride, int n, int qmax,
                                     int meta_bytes, unsigned char* meta) {
  float lo = detail::to_f32(x[0]), hi = lo;
  for (int k = 1; k < n; ++k) {
    const float v = detail::to_f32(x[k * stride]);
    lo = v < lo ? v : lo;
    hi = hi < v ? v : hi;
  }
  const bool f16 = meta_bytes == 4;
  float mn = round_meta(lo, f16);
  if (mn > lo)
    mn = round_meta(__fsub_rn(__fsub_rn(lo, __fmul_rn(fabsf(lo), 0x1p-10f)), 0x1p-24f), f16);
  const float scale = __fdiv_rn(__fsub_rn(hi, mn), static_cast<float>(qmax));
  float sr = round_meta(scale, f16);
  if (sr < scale) sr = round_meta(__fmul_rn(scale, 1.0f + 0x1p-10f), f16);
  // The (scale, min) pair as CPU memory holds it: two float16 (or two float32) little-endian.
  std::uint64_t word;
  if (f16) {
    word = static_cast<std::uint64_t>(__half_as_ushort(__float2half_rn(sr))) |
           (static_cast<std::uint64_t>(__half_as_ushort(__float2half_rn(mn))) << 16);
  } else {
    word = static_cast<std::uint64_t>(__float_as_uint(sr)) |
           (static_cast<std::uint64_t>(__float_as_uint(mn)) << 32);
  }
  for (int k = 0; k < meta_bytes; ++k) meta[k] = static_cast<unsigned char>(word >> (8 * k));
  return {mn, sr > 0.0f ? __fdiv_rn(1.0f, sr) : 0.0f};
}

__device__ __forceinline__ unsigned quantize_code(float x, const GroupCodec& g, int qmax) {
  const float c = rintf(__fmul_rn(__fsub_rn(x, g.mn), g.inv));
  const float q = static_cast<float>(qmax);
  return static_cast<unsigned>(c < 0.0f ? 0.0f : (q < c ? q : c));
}

// One token record: head_dim / token_group groups of the head_dim channels at x (stride 1).
template <class T>
__device__ void quantize_token_record(const T* x, const QuantBlocksView& q, unsigned char* rec) {
  const int qmax = (1 << q.nbits) - 1, groups = q.head_dim / q.token_group;
  unsigned char* codes = rec + groups * q.meta_bytes;
  unsigned acc = 0;
  int filled = 0, out = 0;
  for (int g = 0; g < groups; ++g) {
    const T* xg = x + g * q.token_group;
    const GroupCodec codec =
        quantize_group(xg, 1, q.token_group, qmax, q.meta_bytes, rec + g * q.meta_bytes);
    for (int c = 0; c < q.token_group; ++c) {
      acc |= quantize_code(detail::to_f32(xg[c]), codec, qmax) << filled;
      filled += q.nbits;
      if (filled == 8) {
        codes[out++] = static_cast<unsigned char>(acc);
        acc = 0;
        filled = 0;
      }
    }
  }
}

// Threads: values (and per-token keys) one per (row, chunk, token of the chunk, head); per-channel
// keys one per (row, chunk, head, run of 8 / nbits channels). res: token-major [slots, batch,
// heads, head_dim], slot = chunk · q.chunk + token.
template <class T>
__global__ void quantize_blocks_kernel(const T* __restrict__ res_k, const T* __restrict__ res_v,
                                       unsigned char* kblocks, unsigned char* vblocks,
                                       QuantBlocksView q, int batch, int first_chunk, int chunks) {
  const std::int64_t records = static_cast<std::int64_t>(batch) * chunks * q.chunk * q.heads;
  const int per = 8 / q.nbits, runs = q.head_dim / per;
  const std::int64_t key_items =
      q.keys_per_channel ? static_cast<std::int64_t>(batch) * chunks * q.heads * runs : records;
  const std::int64_t token_stride = static_cast<std::int64_t>(batch) * q.heads * q.head_dim;
  const std::int64_t total = records + key_items;
  for (std::int64_t item = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
       item < total; item += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    if (item < records || !q.keys_per_channel) {
      // A token record: item = ((b · chunks + k) · chunk + i) · heads + h (values first, then the
      // per-token keys with the same numbering).
      const bool value = item < records;
      std::int64_t r = value ? item : item - records;
      const int h = static_cast<int>(r % q.heads);
      r /= q.heads;
      const int i = static_cast<int>(r % q.chunk);
      r /= q.chunk;
      const int k = static_cast<int>(r % chunks);
      const int b = static_cast<int>(r / chunks);
      const std::int64_t slot = static_cast<std::int64_t>(k) * q.chunk + i;
      const T* x = (value ? res_v : res_k) + slot * token_stride +
                   (static_cast<std::int64_t>(b) * q.heads + h) * q.head_dim;
      unsigned char* rec =
          value ? vblocks + b * q.value_row_stride +
                      (static_cast<std::int64_t>(first_chunk + k) * q.heads + h) *
                          q.value_head_bytes +
                      static_cast<std::int64_t>(i) * q.token_record
                : kblocks + b * q.key_row_stride +
                      (static_cast<std::int64_t>(first_chunk + k) * q.heads + h) * q.key_head_bytes;
      quantize_token_record(x, q, rec);
      continue;
    }
    // Per-channel keys: item - records = ((b · chunks + k) · heads + h) · runs + run.
    std::int64_t r = item - records;
    const int run = static_cast<int>(r % runs);
    r /= runs;
    const int h = static_cast<int>(r % q.heads);
    r /= q.heads;
    const int k = static_cast<int>(r % chunks);
    const int b = static_cast<int>(r / chunks);
    const int qmax = (1 << q.nbits) - 1, c0 = run * per;
    unsigned char* rec =
        kblocks + b * q.key_row_stride +
        (static_cast<std::int64_t>(first_chunk + k) * q.heads + h) * q.key_head_bytes;
    unsigned char* codes = rec + q.head_dim * q.meta_bytes;
    // x(i, c): key slot k · chunk + i, channel c.
    const T* x = res_k + static_cast<std::int64_t>(k) * q.chunk * token_stride +
                 (static_cast<std::int64_t>(b) * q.heads + h) * q.head_dim;
    GroupCodec codec[4];
    for (int j = 0; j < per; ++j) {
      codec[j] = quantize_group(x + c0 + j, token_stride, q.chunk, qmax, q.meta_bytes,
                                rec + (c0 + j) * q.meta_bytes);
    }
    for (int i = 0; i < q.chunk; ++i) {
      unsigned byte = 0;
      for (int j = 0; j < per; ++j) {
        byte |= quantize_code(detail::to_f32(x[i * token_stride + c0 + j]), codec[j], qmax)
                << (j * q.nbits);
      }
      codes[(static_cast<std::int64_t>(i) * q.head_dim + c0) / per] =
          static_cast<unsigned char>(byte);
    }
  }
}

// out[b, h, t, c] for t < q.tokens, keys and values; out is [batch, heads, len, head_dim].
template <class T>
__global__ void dequantize_blocks_kernel(QuantBlocksView q, int batch, int len,
                                         T* __restrict__ out_k, T* __restrict__ out_v) {
  const std::int64_t total = static_cast<std::int64_t>(batch) * q.heads * q.tokens * q.head_dim;
  for (std::int64_t item = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
       item < total; item += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    std::int64_t r = item;
    const int c = static_cast<int>(r % q.head_dim);
    r /= q.head_dim;
    const int t = static_cast<int>(r % q.tokens);
    r /= q.tokens;
    const int h = static_cast<int>(r % q.heads);
    const int b = static_cast<int>(r / q.heads);
    const std::int64_t at =
        ((static_cast<std::int64_t>(b) * q.heads + h) * len + t) * q.head_dim + c;
    out_k[at] = detail::from_f32<T>(detail::quant_key(q, b, h, t, c));
    out_v[at] = detail::from_f32<T>(detail::quant_value(q, b, h, t, c));
  }
}

void check_blocks_tensor(const Tensor& t, std::int64_t batch, std::int64_t need_bytes,
                         const char* what, const char* where) {
  KVCACHE_CHECK(t.defined() && t.device() == Device::kCuda && t.dtype() == DType::kUInt8 &&
                    t.rank() == 2 && t.is_contiguous() && t.size(0) == batch &&
                    t.size(1) >= need_bytes,
                where, ": expected ", what, " uint8 [", batch, ", >= ", need_bytes,
                "] contiguous on cuda, got ", t.defined() ? t.describe() : "undefined");
}

}  // namespace

void quantize_kv_blocks(const Tensor& res_k, const Tensor& res_v, const Tensor& key_blocks,
                        const Tensor& value_blocks, const QuantizedKVView& layout,
                        std::int64_t first_chunk, std::int64_t chunks) {
  const char* where = "cuda::quantize_kv_blocks";
  QuantizedKVView geometry = layout;
  geometry.tokens = 0;  // the blocks written here need not exist yet
  geometry.keys.assign(static_cast<std::size_t>(std::max<std::int64_t>(layout.batch, 0)), nullptr);
  geometry.values = geometry.keys;
  QuantBlocksView q = detail::quant_blocks_view(geometry, where);
  KVCACHE_CHECK(first_chunk >= 0 && chunks >= 0 && first_chunk <= (1 << 30) && chunks <= (1 << 30),
                where, ": expected chunk indices in [0, 2^30], got ", first_chunk, " and ", chunks);
  if (chunks == 0) return;
  const std::int64_t slots = chunks * q.chunk;
  for (const Tensor* t : {&res_k, &res_v}) {
    KVCACHE_CHECK(t->defined() && t->device() == Device::kCuda && t->rank() == 4 &&
                      t->is_contiguous() && t->size(0) >= slots && t->size(1) == layout.batch &&
                      t->size(2) == layout.heads && t->size(3) == layout.head_dim &&
                      is_floating(t->dtype()) && t->dtype() == res_k.dtype(),
                  where, ": expected residual [>= ", slots, ", ", layout.batch, ", ", layout.heads,
                  ", ", layout.head_dim, "] contiguous float on cuda, got ",
                  t->defined() ? t->describe() : "undefined");
  }
  check_blocks_tensor(key_blocks, layout.batch, (first_chunk + chunks) * q.heads * q.key_head_bytes,
                      "key blocks", where);
  check_blocks_tensor(value_blocks, layout.batch,
                      (first_chunk + chunks) * q.heads * q.value_head_bytes, "value blocks", where);
  q.keys = static_cast<const unsigned char*>(key_blocks.data());
  q.values = static_cast<const unsigned char*>(value_blocks.data());
  q.key_row_stride = key_blocks.stride(0);
  q.value_row_stride = value_blocks.stride(0);
  const std::int64_t records = layout.batch * chunks * q.chunk * q.heads;
  const std::int64_t items =
      records +
      (q.keys_per_channel ? layout.batch * chunks * q.heads * (q.head_dim * q.nbits / 8) : records);
  constexpr int kThreads = 128;
  detail::dispatch_float(res_k.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    quantize_blocks_kernel<T><<<detail::grid_for(items, kThreads), kThreads, 0, detail::stream()>>>(
        static_cast<const T*>(res_k.data()), static_cast<const T*>(res_v.data()),
        static_cast<unsigned char*>(key_blocks.data()),
        static_cast<unsigned char*>(value_blocks.data()), q, static_cast<int>(layout.batch),
        static_cast<int>(first_chunk), static_cast<int>(chunks));
  });
  KVCACHE_CUDA_CHECK(cudaGetLastError());
}

void dequantize_kv_blocks(const QuantizedKVView& view, const Tensor& out_k, const Tensor& out_v) {
  const char* where = "cuda::dequantize_kv_blocks";
  const QuantBlocksView q = detail::quant_blocks_view(view, where);
  for (const Tensor* t : {&out_k, &out_v}) {
    KVCACHE_CHECK(t->defined() && t->device() == Device::kCuda && t->rank() == 4 &&
                      t->is_contiguous() && t->size(0) == view.batch && t->size(1) == view.heads &&
                      t->size(2) >= view.tokens && t->size(3) == view.head_dim &&
                      is_floating(t->dtype()) && t->dtype() == out_k.dtype() &&
                      t->size(2) <= (std::int64_t{1} << 30),
                  where, ": expected out [", view.batch, ", ", view.heads, ", >= ", view.tokens,
                  ", ", view.head_dim, "] contiguous float on cuda, got ",
                  t->defined() ? t->describe() : "undefined");
  }
  if (view.tokens == 0) return;
  const std::int64_t total = view.batch * view.heads * view.tokens * view.head_dim;
  constexpr int kThreads = 256;
  detail::dispatch_float(out_k.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    dequantize_blocks_kernel<T>
        <<<detail::grid_for(total, kThreads), kThreads, 0, detail::stream()>>>(
            q, static_cast<int>(view.batch), static_cast<int>(out_k.size(2)),
            static_cast<T*>(out_k.data()), static_cast<T*>(out_v.data()));
  });
  KVCACHE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvcache::cuda
