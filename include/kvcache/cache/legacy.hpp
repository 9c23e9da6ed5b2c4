// The legacy cache format: one (key, value) pair per layer, each [batch, num_kv_heads, seq_len,
// head_dim] — transformers' tuple of tuples. DynamicCache converts to and from it.
#pragma once

#include <utility>
#include <vector>

#include "kvcache/tensor.hpp"

namespace kvcache {

/// legacy[layer] = (keys, values), each [batch, num_kv_heads, seq_len, head_dim].
using LegacyCache = std::vector<std::pair<Tensor, Tensor>>;

}  // namespace kvcache
