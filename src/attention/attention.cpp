// The attention module's CPU path: check the step, update the cache, attend over its views.
#include "kvcache/attention/attention.hpp"

#include <cmath>

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
  scale_ = options.scale.value_or(1.0f / std::sqrt(static_cast<float>(options.head_dim)));
}

Tensor Attention::forward(const Tensor& query_states, const Tensor& key_states,
                          const Tensor& value_states, Cache<cpu::Backend>& cache,
                          const Tensor& attention_mask,
                          std::span<const std::int64_t> cache_position) const {
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
  KVCACHE_CHECK(query_states.device() == Device::kCpu, where, ": expected CPU tensors, got ",
                query_states.describe());
  KVCACHE_CHECK(is_floating(query_states.dtype()), where,
                ": expected float32, float16 or bfloat16 states, got ",
                dtype_name(query_states.dtype()));
  const MaskSizes sizes = cache.get_mask_sizes(cache_position, layer_idx_);
  check_cache_position(cache_position, q_len, sizes.kv_length, sizes.kv_offset, where);
  // Checked (and converted once) before the update, so a bad mask leaves the cache as it was.
  const std::vector<std::uint8_t> mask =
      mask_to_bytes(attention_mask, batch, sizes.kv_length, where);

  Tensor out = Tensor::empty({batch, q_len, o.num_heads, o.head_dim}, query_states.dtype());
  CacheKwargs kwargs;
  kwargs.cache_position = cache_position;
  auto [keys, values] = cache.update(key_states, value_states, layer_idx_, kwargs);
  cpu::attention(query_states, keys, values, mask, cache_position, sizes.kv_offset, scale_, out);
  return out;
}

}  // namespace kvcache
