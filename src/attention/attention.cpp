// The attention module on either backend: check the step, update the cache, attend over its views.
#include "kvcache/attention/attention.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kvcache/error.hpp"

namespace kvcache {

Attention::Attention(int layer_idx, AttentionOptions options)
    : layer_idx_(layer_idx), options_(options) {
  KVCACHE_CHECK(layer_idx >= 0, "Attention: expected layer_idx >= 0, got ", layer_idx);
  KVCACHE_CHECK(options.num_heads > 0 && options.num_kv_heads > 0 && options.head_dim > 0,
                "Attention: expected positive num_heads, num_kv_heads and head_dim, got ",
                options.num_heads, ", ", options.num_kv_heads, ", ", options.head_dim);
  KVCACHE_CHECK(options.num_heads % options.num_kv_heads == 0, "Attention: expected num_heads (",
                options.num_heads, ") to be a multiple of num_kv_heads, got ",
                options.num_kv_heads);
  KVCACHE_CHECK(!options.sliding_window || *options.sliding_window >= 1,
                "Attention: expected a sliding_window >= 1 (or none), got ",
                options.sliding_window.value_or(0));
  scale_ = options.scale.value_or(1.0f / std::sqrt(static_cast<float>(options.head_dim)));
}

namespace {

// The columns [kv_offset, kv_offset + kv_length) of every row of a [batch, kv_offset + kv_length]
// mask (empty: no padding): what a cache layer that keeps keys from slot kv_offset attends over.
std::vector<std::uint8_t> kept_columns(std::vector<std::uint8_t> mask, std::int64_t batch,
                                       const MaskSizes& sizes) {
  if (mask.empty() || sizes.kv_offset == 0) return mask;
  const std::int64_t columns = sizes.kv_offset + sizes.kv_length;
  std::vector<std::uint8_t> kept(static_cast<std::size_t>(batch * sizes.kv_length));
  for (std::int64_t b = 0; b < batch; ++b) {
    const auto from = mask.begin() + b * columns + sizes.kv_offset;
    std::copy(from, from + sizes.kv_length, kept.begin() + b * sizes.kv_length);
  }
  return kept;
}

}  // namespace

template <CacheBackend B>
Tensor Attention::forward(const Tensor& query_states, const Tensor& key_states,
                          const Tensor& value_states, Cache<B>& cache, const Tensor& attention_mask,
                          std::span<const std::int64_t> cache_position,
                          const Tensor& cache_position_device) const {
  const char* where = "Attention::forward";
  const AttentionOptions& o = options_;
  KVCACHE_CHECK(query_states.defined() && query_states.rank() == 4 &&
                    query_states.size(1) == o.num_heads && query_states.size(3) == o.head_dim,
                where, ": expected query_states [batch, ", o.num_heads, ", q_len, ", o.head_dim,
                "], got ", query_states.describe());
  const std::int64_t batch = query_states.size(0), q_len = query_states.size(2);
  for (const Tensor* t : {&key_states, &value_states}) {
    KVCACHE_CHECK(t->defined() && t->rank() == 4 && t->size(0) == batch &&
                      t->size(1) == o.num_kv_heads && t->size(2) == q_len &&
                      t->size(3) == o.head_dim,
                  where, ": expected key/value states [", batch, ", ", o.num_kv_heads, ", ", q_len,
                  ", ", o.head_dim, "], got ", t->describe());
    KVCACHE_CHECK(t->dtype() == query_states.dtype(), where, ": expected key/value states in ",
                  dtype_name(query_states.dtype()), " (the query's dtype), got ",
                  dtype_name(t->dtype()));
  }
  for (const Tensor* t : {&query_states, &key_states, &value_states}) {
    KVCACHE_CHECK(t->device() == B::kDevice, where, ": expected states on ",
                  device_name(B::kDevice), " (the cache's device), got ", t->describe());
  }
  KVCACHE_CHECK(is_floating(query_states.dtype()), where,
                ": expected float32, float16 or bfloat16 states, got ",
                dtype_name(query_states.dtype()));
  const MaskSizes sizes = cache.get_mask_sizes(cache_position, layer_idx_);
  check_cache_position(cache_position, q_len, sizes.kv_length, sizes.kv_offset, where);
  if (!cache.evicts_tokens()) {
    check_keys_held(cache_position, sizes.kv_offset, o.sliding_window, layer_idx_, where);
  }
  // The mask covers every slot seen: the layer's keys are its columns from kv_offset.
  const std::int64_t mask_columns = sizes.kv_offset + sizes.kv_length;
  CacheKwargs kwargs;
  kwargs.cache_position = cache_position;

  if constexpr (B::kDevice == Device::kCpu) {
    // Checked (and converted once) before the update, so a bad mask leaves the cache as it was.
    const std::vector<std::uint8_t> mask =
        kept_columns(mask_to_bytes(attention_mask, batch, mask_columns, where), batch, sizes);
    Tensor out = Tensor::empty({batch, q_len, o.num_heads, o.head_dim}, query_states.dtype());
    const AttentionKV kv = cache.update_for_attention(key_states, value_states, layer_idx_, kwargs);
    if (kv.quantized) {  // a quantized layer: its blocks are read as stored
      cpu::attention_quantized(query_states, *kv.quantized, kv.keys, kv.values, mask,
                               cache_position, sizes.kv_offset, scale_, out, o.sliding_window);
    } else {
      cpu::attention(query_states, kv.keys, kv.values, mask, cache_position, sizes.kv_offset,
                     scale_, out, o.sliding_window);
    }
    return out;
  } else {
    // The mask as device bytes [batch, kv_length], its columns from kv_offset (the layer's
    // keys): given so by the caller, or checked here and sent over.
    Tensor mask = attention_mask;
    if (mask.defined() && mask.device() == Device::kCuda) {
      KVCACHE_CHECK(mask.rank() == 2 && mask.dtype() == DType::kUInt8 && mask.is_contiguous() &&
                        mask.size(0) == batch && mask.size(1) == mask_columns,
                    where, ": expected a device attention_mask [", batch, ", ", mask_columns,
                    "] uint8 contiguous, got ", mask.describe());
      if (sizes.kv_offset > 0) {  // a sliding layer past its window
        const Tensor kept = cuda::empty({batch, sizes.kv_length}, DType::kUInt8);
        cuda::copy(kept, mask.slice(1, sizes.kv_offset, mask_columns));
        mask = kept;
      }
    } else {
      const std::vector<std::uint8_t> bytes =
          kept_columns(mask_to_bytes(attention_mask, batch, mask_columns, where), batch, sizes);
      mask = bytes.empty() ? Tensor() : cuda::upload(bytes.data(), bytes.size());
    }
    Tensor positions = cache_position_device;
    if (positions.defined()) {
      KVCACHE_CHECK(positions.device() == Device::kCuda && positions.dtype() == DType::kInt64 &&
                        positions.rank() == 1 && positions.size(0) == q_len,
                    where, ": expected cache_position_device [", q_len, "] int64 on cuda, got ",
                    positions.describe());
    } else {
      positions = cuda::upload(Tensor::from_blob(const_cast<std::int64_t*>(cache_position.data()),
                                                 {q_len}, DType::kInt64));
    }
    Tensor out = cuda::empty({batch, q_len, o.num_heads, o.head_dim}, query_states.dtype());
    const AttentionKV kv = cache.update_for_attention(key_states, value_states, layer_idx_, kwargs);
    if (kv.quantized) {  // a quantized layer: its blocks are read as stored
      cuda::attention_quantized(query_states, *kv.quantized, kv.keys, kv.values, mask, positions,
                                sizes.kv_offset, scale_, out, o.sliding_window);
    } else {
      cuda::attention(query_states, kv.keys, kv.values, mask, positions, sizes.kv_offset, scale_,
                      out, o.sliding_window);
    }
    return out;
  }
}

template Tensor Attention::forward<cpu::Backend>(const Tensor&, const Tensor&, const Tensor&,
                                                 Cache<cpu::Backend>&, const Tensor&,
                                                 std::span<const std::int64_t>,
                                                 const Tensor&) const;
template Tensor Attention::forward<cuda::Backend>(const Tensor&, const Tensor&, const Tensor&,
                                                  Cache<cuda::Backend>&, const Tensor&,
                                                  std::span<const std::int64_t>,
                                                  const Tensor&) const;

}  // namespace kvcache
