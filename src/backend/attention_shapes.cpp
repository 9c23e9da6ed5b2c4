// The attention operand checks shared by the CPU and CUDA kernels (attention_shapes.hpp).
#include "kvcache/backend/attention_shapes.hpp"

#include <utility>

#include "kvcache/error.hpp"

namespace kvcache::detail {

AttentionShape check_attention_operands(const Tensor& query, const Tensor& keys,
                                        const Tensor& values, const Tensor& out, Device device,
                                        const char* where) {
  const std::pair<const char*, const Tensor*> operands[] = {
      {"query", &query}, {"keys", &keys}, {"values", &values}, {"out", &out}};
  for (const auto& [name, t] : operands) {
    KVCACHE_CHECK(t->defined() && t->rank() == 4, where, ": expected ", name,
                  " as a rank-4 tensor, got ", t->defined() ? t->describe() : "undefined");
    KVCACHE_CHECK(t->device() == device, where, ": expected ", name, " on the ",
                  device_name(device), " device, got ", t->describe());
    KVCACHE_CHECK(t->dtype() == query.dtype(), where, ": expected ", name, " in ",
                  dtype_name(query.dtype()), " (the query's dtype), got ", t->describe());
  }
  KVCACHE_CHECK(is_floating(query.dtype()), where, ": expected float32, float16 or bfloat16, got ",
                dtype_name(query.dtype()));
  AttentionShape s{.batch = query.size(0),
                   .num_heads = query.size(1),
                   .num_kv_heads = keys.size(1),
                   .q_len = query.size(2),
                   .kv_len = keys.size(2),
                   .head_dim = query.size(3)};
  KVCACHE_CHECK(keys.size(0) == s.batch && keys.size(3) == s.head_dim, where, ": expected keys [",
                s.batch, ", num_kv_heads, kv_len, ", s.head_dim, "], got ", keys.shape_string());
  KVCACHE_CHECK(values.size(0) == s.batch && values.size(1) == s.num_kv_heads &&
                    values.size(2) == s.kv_len && values.size(3) == s.head_dim,
                where, ": expected values shaped like keys ", keys.shape_string(), ", got ",
                values.shape_string());
  KVCACHE_CHECK(s.num_kv_heads > 0 && s.num_heads % s.num_kv_heads == 0, where,
                ": expected num_heads (", s.num_heads, ") to be a multiple of num_kv_heads, got ",
                s.num_kv_heads);
  KVCACHE_CHECK(out.size(0) == s.batch && out.size(1) == s.q_len && out.size(2) == s.num_heads &&
                    out.size(3) == s.head_dim,
                where, ": expected out [", s.batch, ", ", s.q_len, ", ", s.num_heads, ", ",
                s.head_dim, "], got ", out.shape_string());
  KVCACHE_CHECK(keys.stride(3) == 1 && values.stride(3) == 1, where,
                ": expected keys and values with contiguous head_dim, got ", keys.describe(),
                " and ", values.describe());
  return s;
}

}  // namespace kvcache::detail
