// The attention module: what one decoder layer's self-attention does with the cache. Given the new
// tokens' query, key and value states (RoPE already applied to q and k), it stores k and v through
// cache.update, builds the mask from the 2D attention_mask [batch, past + new] and cache_position,
// and computes softmax(Q·Kᵀ·scale + mask)·V over past + new keys on the cache's backend.
//
// Everything the step could reject (shapes, heads, mask length, cache_position) is checked before
// cache.update runs, so a rejected step leaves the cache as it was.
//
// What a query sees is split between the cache layer and this module. The layer says which keys
// it returns: get_mask_sizes(cache_position, layer) gives (kv_length, kv_offset), and update()
// returns kv_length keys starting at absolute slot kv_offset (0 for a full-attention layer; past a
// sliding layer's window, the slot of its oldest kept token). The module applies the model's rule:
// causal, padding (columns [kv_offset, kv_offset + kv_length) of the mask), and
// AttentionOptions::sliding_window when the layer slides (key slot > query slot - window). So a
// windowed model is exact over a full-attention cache layer too, and a layer that dropped keys a
// query still sees is a clear error before the update (check_keys_held).
//
// The keys and values come from cache.update_for_attention: full-precision views for every cache
// but a QuantizedCache, whose blocks the CPU kernel reads as stored (cpu::attention_quantized).
//
// On the GPU the kernels apply the window too, over full-attention cache layers; a cache layer
// that has dropped its oldest keys (kv_offset > 0, a sliding layer past its window) is refused
// there for now (a kvcache::Error saying so).
//
// One module for both backends: forward() is a template over the cache's backend (instantiated
// for cpu::Backend and cuda::Backend). The states must live on the cache's device; the mask may
// be a host tensor on either backend (checked and, for the GPU, sent over) or, for the GPU, a
// device uint8 [batch, past + q_len] tensor already made (the model sends it once per step, not
// once per layer).
#pragma once

#include <cstdint>
#include <optional>
#include <span>

#include "kvcache/attention/mask.hpp"
#include "kvcache/backend/cpu.hpp"
#include "kvcache/backend/cuda.hpp"
#include "kvcache/cache/cache.hpp"
#include "kvcache/tensor.hpp"

namespace kvcache {

/// The shape of one layer's attention: heads, kv heads, head size, scale and window.
struct AttentionOptions {
  /// Query heads.
  std::int64_t num_heads = 0;
  /// Key/value heads: num_heads for multi-head attention, a divisor of it for grouped-query.
  std::int64_t num_kv_heads = 0;  // num_heads for multi-head attention, fewer for grouped-query
  /// Elements per head.
  std::int64_t head_dim = 0;
  /// The softmax scale; 1 / sqrt(head_dim) when unset.
  std::optional<float> scale{};  // default 1 / sqrt(head_dim)
  /// The layer's sliding window W (Mistral; Qwen2's sliding layers): a query at slot q sees key
  /// slots in (q - W, q]. None: full causal attention.
  std::optional<std::int64_t> sliding_window{};
};

/// One decoder layer's self-attention over a cache: stores the new keys and values through
/// Cache::update and attends over past + new with the mask of attention_mask and cache_position.
class Attention {
 public:
  /// The attention of layer `layer_idx` (the cache layer it reads and writes) with `options`;
  /// throws kvcache::Error for sizes that are not positive or heads that do not divide.
  Attention(int layer_idx, AttentionOptions options);

  /// One step of self-attention for layer layer_idx().
  ///   query_states    [batch, num_heads, q_len, head_dim]     (after RoPE)
  ///   key_states      [batch, num_kv_heads, q_len, head_dim]  (after RoPE; cached as given)
  ///   value_states    [batch, num_kv_heads, q_len, head_dim]
  ///   attention_mask  [batch, past + q_len] int64/int32/uint8, 1 = attend; undefined = no padding
  ///                   (past = the tokens the layer has seen, kv_offset + kv_length - q_len)
  ///   cache_position  [q_len] absolute cache slots of the new tokens (host memory)
  ///   cache_position_device  the same on the GPU as int64 [q_len] (CUDA only; undefined: sent
  ///                   here)
  /// Returns [batch, q_len, num_heads, head_dim] in the query's dtype, on the cache's device.
  template <CacheBackend B>
  Tensor forward(const Tensor& query_states, const Tensor& key_states, const Tensor& value_states,
                 Cache<B>& cache, const Tensor& attention_mask,
                 std::span<const std::int64_t> cache_position,
                 const Tensor& cache_position_device = Tensor()) const;

  /// The cache layer this module reads and writes.
  int layer_idx() const { return layer_idx_; }
  /// The options it was built with.
  const AttentionOptions& options() const { return options_; }
  /// The softmax scale in use (options().scale, or 1 / sqrt(head_dim)).
  float scale() const { return scale_; }

 private:
  int layer_idx_;
  AttentionOptions options_;
  float scale_;
};

}  // namespace kvcache
