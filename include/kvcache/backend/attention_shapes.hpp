// The operand checks both backends' attention kernels make before they touch memory: one piece of
// code, so cpu::attention and cuda::attention accept and refuse exactly the same shapes and say so
// in the same words.
#pragma once

#include <cstdint>

#include "kvcache/tensor.hpp"

namespace kvcache::detail {

/// The sizes of one attention call, read off its operands.
struct AttentionShape {
  std::int64_t batch = 0, num_heads = 0, num_kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0;
};

/// Checks query [batch, num_heads, q_len, head_dim], keys and values [batch, num_kv_heads, kv_len,
/// head_dim] and out [batch, q_len, num_heads, head_dim]: defined, rank 4, on `device`, one float
/// dtype, num_heads a multiple of num_kv_heads, keys and values with a contiguous last dimension.
/// Throws kvcache::Error naming the operand, what was expected and what came; `where` names the
/// caller.
AttentionShape check_attention_operands(const Tensor& query, const Tensor& keys,
                                        const Tensor& values, const Tensor& out, Device device,
                                        const char* where);

}  // namespace kvcache::detail
