// The Cache base: the contract every cache (dynamic now; static, sliding-window, sink, quantized,
// offloaded and paged later) offers the attention module and generation loops. Names and meanings
// follow transformers' cache_utils so a Python loop ports line by line.
//
// Cache is templated on a Backend (kvcache::cpu::Backend, kvcache::cuda::Backend): the backend
// decides where storage lives (its device) and how elements are copied. A cache owns storage and
// bookkeeping and never does attention math; the attention module asks it for keys and values.
// Virtual dispatch happens once per layer per step, never per element, so one attention module
// serves every cache kind of a backend.
#pragma once

#include <concepts>
#include <cstdint>
#include <span>
#include <utility>

#include "kvcache/tensor.hpp"

namespace kvcache {

/// What a cache needs from a backend.
template <class B>
concept CacheBackend = requires(Shape shape, DType dtype, const Tensor& t) {
  { B::kDevice } -> std::convertible_to<Device>;
  { B::empty(shape, dtype) } -> std::same_as<Tensor>;
  {B::copy(t, t)};
};

/// Extra per-call information some caches need (transformers' cache_kwargs). DynamicCache ignores
/// it; sliding-window and static caches read cache_position, sink caches the RoPE sin/cos.
struct CacheKwargs {
  std::span<const std::int64_t> cache_position;  // [q_len] absolute slots of the new tokens
  Tensor sin;                                    // RoPE sin/cos used for the new keys
  Tensor cos;
};

/// (kv_length, kv_offset) of get_mask_sizes: the attention mask for the next step spans kv_length
/// key slots starting at absolute slot kv_offset.
struct MaskSizes {
  std::int64_t kv_length = 0;
  std::int64_t kv_offset = 0;
};

template <CacheBackend B>
class Cache {
 public:
  using Backend = B;

  virtual ~Cache() = default;

  /// Stores key_states/value_states [batch, num_kv_heads, q_len, head_dim] for `layer_idx` and
  /// returns the layer's keys and values, past + new, as [batch, num_kv_heads, past + q_len,
  /// head_dim] views of the cache's storage (no copy). layer_idx may be at most the number of
  /// layers seen so far (a new layer is added then). Throws kvcache::Error on bad input and then
  /// leaves the cache as it was.
  virtual std::pair<Tensor, Tensor> update(const Tensor& key_states, const Tensor& value_states,
                                           int layer_idx, const CacheKwargs& kwargs = {}) = 0;

  /// Tokens held by `layer_idx` (0 for a layer not seen yet).
  virtual std::int64_t get_seq_length(int layer_idx = 0) const = 0;

  /// Maximum tokens the cache can hold, or -1 when it grows without bound.
  virtual std::int64_t get_max_cache_shape(int layer_idx = 0) const = 0;

  /// (kv_length, kv_offset) of the mask for a step whose new tokens sit at `cache_position`:
  /// the attention mask passed with that step must have kv_length columns.
  virtual MaskSizes get_mask_sizes(std::span<const std::int64_t> cache_position,
                                   int layer_idx) const = 0;

  /// Number of layers the cache holds.
  virtual int num_layers() const = 0;

  /// Empties every layer, keeping allocated memory for reuse.
  virtual void reset() = 0;

  /// Keeps the first max_length tokens of every layer; negative drops -max_length tokens from the
  /// end. crop(0) empties the cache. A max_length at or past the length changes nothing.
  virtual void crop(std::int64_t max_length) = 0;

  /// Reorders the batch for beam search: row i becomes old row beam_idx[i]. beam_idx has one entry
  /// per row, each in [0, batch).
  virtual void reorder_cache(std::span<const std::int64_t> beam_idx) = 0;

  /// Repeats each batch row `repeats` times in place (row i becomes rows i*repeats … ).
  virtual void batch_repeat_interleave(std::int64_t repeats) = 0;

  /// Keeps only the batch rows named by `indices` (in that order; repeats allowed).
  virtual void batch_select_indices(std::span<const std::int64_t> indices) = 0;

  /// Bytes of keys and values the cache holds (tokens in use, not capacity).
  virtual std::size_t nbytes() const = 0;

  /// Bytes of device memory the cache has allocated (capacity).
  virtual std::size_t capacity_bytes() const = 0;

 protected:
  Cache() = default;
  Cache(const Cache&) = default;
  Cache(Cache&&) noexcept = default;
  Cache& operator=(const Cache&) = default;
  Cache& operator=(Cache&&) noexcept = default;
};

}  // namespace kvcache
