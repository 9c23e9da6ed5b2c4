// The Cache base: the contract every cache (dynamic, with sliding-window layers inside a
// DynamicCache, static, sink, quantized and offloaded; paged later) offers the attention module
// and generation loops. Names and meanings follow transformers' cache_utils so a Python loop ports
// line by line.
//
// Layering. A cache holds one layer object per decoder layer, each of its own kind (a full layer,
// a SlidingWindowLayer, ...), as transformers 5's caches hold CacheLayerMixin objects; this API
// dispatches to them per layer. For a layer, get_mask_sizes says which keys update() returns
// (kv_length of them from absolute slot kv_offset); the attention module applies the model's rule
// (causal, padding, the layer's sliding window) over them and refuses a layer that dropped keys
// a query still sees. A DynamicCache mixes kinds per layer (full layers and SlidingWindowLayer
// rings, from ModelConfig::sliding_windows: config.layer_types, max_window_layers); the other
// caches give every layer their one kind (a StaticCache of a windowed model keeps full-length
// layers, and the attention applies the window over the slots held).
//
// Cache is templated on a Backend (kvcache::cpu::Backend, kvcache::cuda::Backend): the backend
// decides where storage lives (its device) and how elements are copied. A cache owns storage and
// bookkeeping and never does attention math; the attention module asks it for keys and values
// (update_for_attention: full-precision views, or a quantized layer's blocks as they are stored).
// Virtual dispatch happens once per layer per step, never per element, so one attention module
// serves every cache kind of a backend.
//
// Copies are explicit and deep. A Tensor copy shares storage, so a cache copied member by member
// would alias its original: two conversations continued from one copied prompt cache would
// overwrite each other's slots. Concrete caches therefore delete their copy constructor and copy
// assignment (moves stay) and offer clone(): `auto b = a.clone();` gives a cache of a's own type
// with storage of its own (transformers' copy.deepcopy(prompt_cache)), and Cache<B>::clone()
// gives the same behind a std::unique_ptr<Cache<B>> when only the base is known.
//
// Integer arguments and the sizes they imply are range-checked without overflow (the helpers in
// kvcache::detail below): a count that cannot be held is a kvcache::Error before anything is
// allocated or changed, never a wrapped product or a std::bad_alloc.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "kvcache/cache/quantized_view.hpp"
#include "kvcache/error.hpp"
#include "kvcache/float16.hpp"
#include "kvcache/memory.hpp"
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
  /// Absolute cache slots of the new tokens, [q_len].
  std::span<const std::int64_t> cache_position{};  // [q_len] absolute slots of the new tokens
  /// RoPE sin used for the new keys (unused by today's caches).
  Tensor sin{};  // RoPE sin/cos used for the new keys
  /// RoPE cos used for the new keys (unused by today's caches).
  Tensor cos{};
};

/// (kv_length, kv_offset) of get_mask_sizes: the attention mask for the next step spans kv_length
/// key slots starting at absolute slot kv_offset.
struct MaskSizes {
  /// Key slots the mask spans (columns of the next step's attention mask).
  std::int64_t kv_length = 0;
  /// Absolute slot of the first of them (0 unless the layer dropped its oldest keys).
  std::int64_t kv_offset = 0;
};

/// What update_for_attention() returns: the kv_length keys and values a step attends over. Without
/// `quantized`, keys and values are all of them (update()'s views). With it, slots [0,
/// quantized->tokens) are the layer's quantized blocks and keys / values [batch, num_kv_heads,
/// kv_length - tokens, head_dim] (contiguous head_dim, any other strides) the full-precision
/// tokens after them. Valid until the layer's next mutating call.
struct AttentionKV {
  Tensor keys{};    ///< all kv_length keys, or (with `quantized`) the full-precision ones after it
  Tensor values{};  ///< the same for the values
  std::optional<QuantizedKVView> quantized{};  ///< the quantized blocks, for a QuantizedCache
};

/// The interface every cache implements (transformers' Cache): the attention module stores
/// and reads keys and values through update(), generation loops use the rest. `B` is the
/// backend whose device holds the storage (cpu::Backend or cuda::Backend).
template <CacheBackend B>
class Cache {
 public:
  /// The backend the cache stores its keys and values on.
  using Backend = B;

  virtual ~Cache() = default;

  /// Stores key_states/value_states [batch, num_kv_heads, q_len, head_dim] for `layer_idx` and
  /// returns the layer's keys and values, past + new, as [batch, num_kv_heads, past + q_len,
  /// head_dim] views of the cache's storage (no copy). layer_idx may be at most the number of
  /// layers seen so far (a new layer is added then). Throws kvcache::Error on bad input and then
  /// leaves the cache as it was.
  virtual std::pair<Tensor, Tensor> update(const Tensor& key_states, const Tensor& value_states,
                                           int layer_idx, const CacheKwargs& kwargs = {}) = 0;

  /// update() as the attention module calls it: the same storage step, but a layer that keeps
  /// part of its tokens in a compact form may return them as they are stored (AttentionKV::
  /// quantized: QuantizedCache) so the kernel reads them directly instead of a full-precision
  /// copy. Every other cache keeps this default, update()'s views.
  virtual AttentionKV update_for_attention(const Tensor& key_states, const Tensor& value_states,
                                           int layer_idx, const CacheKwargs& kwargs = {}) {
    auto [keys, values] = update(key_states, value_states, layer_idx, kwargs);
    return {keys, values, std::nullopt};
  }

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
  /// The same from a braced list: `cache.reorder_cache({1, 1, 0})`.
  void reorder_cache(std::initializer_list<std::int64_t> beam_idx) {
    reorder_cache(std::span<const std::int64_t>(beam_idx.begin(), beam_idx.size()));
  }

  /// Repeats each batch row `repeats` times in place (row i becomes rows i*repeats … ).
  virtual void batch_repeat_interleave(std::int64_t repeats) = 0;

  /// Keeps only the batch rows named by `indices` (in that order; repeats allowed).
  virtual void batch_select_indices(std::span<const std::int64_t> indices) = 0;
  /// The same from a braced list: `cache.batch_select_indices({0, 2})`.
  void batch_select_indices(std::initializer_list<std::int64_t> indices) {
    batch_select_indices(std::span<const std::int64_t>(indices.begin(), indices.size()));
  }

  /// The RoPE position of the first of the next step's q_len new tokens (the others follow one by
  /// one) for a cache that places tokens at positions of its own, or nullopt (every cache but
  /// SinkCache): positions then come from the attention mask. SinkCache gives each token its index
  /// in the cache, as StreamingLLM does; the model asks here when no position_ids are passed.
  virtual std::optional<std::int64_t> rope_position_start(std::int64_t q_len,
                                                          int layer_idx = 0) const {
    (void)q_len;
    (void)layer_idx;
    return std::nullopt;
  }

  /// Whether the cache drops, by design, keys a full-attention query would see (SinkCache's
  /// evicted middle). The model and the attention module refuse a layer that returns keys from
  /// kv_offset > 0 to a full-attention query unless this says the loss is intended.
  virtual bool evicts_tokens() const { return false; }

  /// Bytes of keys and values the cache holds (tokens in use, not capacity).
  virtual std::size_t nbytes() const = 0;

  /// Bytes of device memory the cache has allocated (capacity).
  virtual std::size_t capacity_bytes() const = 0;

  /// A deep copy: a cache of the same kind, options and contents with storage of its own, so the
  /// two evolve independently (reusing one prefilled prompt for several conversations). Concrete
  /// caches hide this with a clone() returning their own type by value.
  std::unique_ptr<Cache> clone() const { return clone_cache(); }

 protected:
  /// clone()'s implementation: a new cache of the concrete type holding a deep copy.
  virtual std::unique_ptr<Cache> clone_cache() const = 0;

  Cache() = default;
  /// Copies and moves for the concrete caches (which delete their copies: clone() copies).
  Cache(const Cache&) = default;
  /// Moves the bookkeeping; for the concrete caches' moves.
  Cache(Cache&&) noexcept = default;
  /// Copy assignment for the concrete caches (which delete theirs).
  Cache& operator=(const Cache&) = default;
  /// Move assignment for the concrete caches' moves.
  Cache& operator=(Cache&&) noexcept = default;
};

namespace detail {

/// a * b for non-negative a and b, or a kvcache::Error naming `what` and `where` when the product
/// does not fit in int64.
inline std::int64_t checked_mul(std::int64_t a, std::int64_t b, const char* where,
                                const char* what) {
  KVCACHE_CHECK(a >= 0 && b >= 0, where, ": expected non-negative factors of ", what, ", got ", a,
                " and ", b);
  KVCACHE_CHECK(a == 0 || b <= std::numeric_limits<std::int64_t>::max() / a, where, ": ", what,
                " of ", a, " x ", b, " does not fit in 64 bits");
  return a * b;
}

/// a + b for non-negative a and b, or a kvcache::Error when the sum does not fit in int64.
inline std::int64_t checked_add(std::int64_t a, std::int64_t b, const char* where,
                                const char* what) {
  KVCACHE_CHECK(a >= 0 && b >= 0, where, ": expected non-negative terms of ", what, ", got ", a,
                " and ", b);
  KVCACHE_CHECK(b <= std::numeric_limits<std::int64_t>::max() - a, where, ": ", what, " of ", a,
                " + ", b, " does not fit in 64 bits");
  return a + b;
}

/// Bytes of a [d0, d1, d2, d3] tensor of `dtype`, checked: every size non-negative and the
/// element and byte counts within int64 (so within what Tensor and the allocator can index).
inline std::int64_t storage_bytes(Shape shape, DType dtype, const char* where) {
  std::int64_t bytes = static_cast<std::int64_t>(dtype_size(dtype));
  for (std::int64_t s : shape) bytes = checked_mul(bytes, s, where, "the storage's byte count");
  return bytes;
}

/// B::empty(shape, dtype) for cache storage: the byte count checked first, and an allocation
/// that fails (std::bad_alloc, or the backend's own kvcache::Error) reported as a kvcache::Error
/// naming the caller, the shape and the bytes.
template <CacheBackend B>
Tensor allocate_storage(Shape shape, DType dtype, const char* where) {
  const std::int64_t bytes = storage_bytes(shape, dtype, where);
  if (static_cast<std::uint64_t>(bytes) >= kLargeAllocation)
    require_memory(B::kDevice, static_cast<std::uint64_t>(bytes), where, "cache storage");
  std::string reason;
  try {
    return B::empty(shape, dtype);
  } catch (const std::bad_alloc&) {
    reason = "out of memory";
  } catch (const Error& e) {
    reason = e.what();
  }
  std::string dims;
  for (std::int64_t s : shape) dims += (dims.empty() ? "" : ", ") + std::to_string(s);
  KVCACHE_FAIL(where, ": could not allocate cache storage [", dims, "] ", dtype_name(dtype), " (",
               bytes, " bytes) on ", device_name(B::kDevice), ": ", reason);
}

/// The checks every cache's update() makes of its new states, with `where` naming the caller:
/// defined, [batch, num_kv_heads, q_len, head_dim] alike for keys and values, one float dtype,
/// on `device`, non-zero batch, heads and head_dim.
inline void check_kv_states(const Tensor& k, const Tensor& v, Device device, const char* where) {
  KVCACHE_CHECK(k.defined() && v.defined(), where, ": expected defined key and value states, got ",
                k.describe(), " and ", v.describe());
  KVCACHE_CHECK(k.rank() == 4, where,
                ": expected key_states [batch, num_kv_heads, q_len, head_dim], got ", k.describe());
  KVCACHE_CHECK(v.rank() == 4 && v.size(0) == k.size(0) && v.size(1) == k.size(1) &&
                    v.size(2) == k.size(2) && v.size(3) == k.size(3),
                where, ": expected value_states shaped like key_states ", k.shape_string(),
                ", got ", v.shape_string());
  KVCACHE_CHECK(k.dtype() == v.dtype(), where, ": expected key and value states of one dtype, got ",
                dtype_name(k.dtype()), " and ", dtype_name(v.dtype()));
  KVCACHE_CHECK(is_floating(k.dtype()), where,
                ": expected float32, float16 or bfloat16 states, got ", dtype_name(k.dtype()));
  KVCACHE_CHECK(k.device() == device && v.device() == device, where, ": expected states on ",
                device_name(device), " (the cache's backend), got ", device_name(k.device()),
                " and ", device_name(v.device()));
  KVCACHE_CHECK(k.size(0) > 0 && k.size(1) > 0 && k.size(3) > 0, where,
                ": expected non-zero batch, num_kv_heads and head_dim, got ", k.shape_string());
}

/// Element i of a float32, float16 or bfloat16 buffer as a float (host memory).
inline float load_float(const void* base, DType dtype, std::int64_t i) {
  switch (dtype) {
    case DType::kFloat16:
      return to_float(static_cast<const float16*>(base)[i]);
    case DType::kBFloat16:
      return to_float(static_cast<const bfloat16*>(base)[i]);
    default:
      return static_cast<const float*>(base)[i];
  }
}

/// Stores v (rounded to nearest even) as element i of a float32, float16 or bfloat16 buffer.
inline void store_float(void* base, DType dtype, std::int64_t i, float v) {
  switch (dtype) {
    case DType::kFloat16:
      static_cast<float16*>(base)[i] = from_float<float16>(v);
      break;
    case DType::kBFloat16:
      static_cast<bfloat16*>(base)[i] = from_float<bfloat16>(v);
      break;
    default:
      static_cast<float*>(base)[i] = v;
  }
}

/// The length crop(max_length) leaves of a cache holding `length` tokens: max_length itself when
/// non-negative (capped at length), length + max_length when negative, which must drop at most
/// `length` tokens. Written so that no value of max_length (INT64_MIN included) overflows.
inline std::int64_t crop_target(std::int64_t max_length, std::int64_t length, const char* where) {
  if (max_length >= 0) return std::min(max_length, length);
  // The magnitude of a negative max_length, computed in unsigned arithmetic: -INT64_MIN is UB.
  const std::uint64_t drop = 0 - static_cast<std::uint64_t>(max_length);
  KVCACHE_CHECK(drop <= static_cast<std::uint64_t>(length), where, "(", max_length,
                "): expected to drop at most ", length, " tokens (the cache length), got ", drop);
  return length + max_length;
}

/// The rows a batch operation gathers, for the caches that carry out all three as one gather (row
/// i of the result is row rows[i] of the cache); `cache` names the class in the messages and
/// `batch` is the cache's batch size, -1 while it holds no tokens.
/// reorder_cache: the beam indices themselves, one per row.
inline std::vector<std::int64_t> reorder_rows(std::span<const std::int64_t> beam_idx,
                                              std::int64_t batch, const char* cache) {
  KVCACHE_CHECK(batch < 0 || static_cast<std::int64_t>(beam_idx.size()) == batch, cache,
                "::reorder_cache: expected ", batch, " beam indices (one per row), got ",
                beam_idx.size());
  return {beam_idx.begin(), beam_idx.end()};
}

/// batch_repeat_interleave: each row `repeats` times in turn (none while the cache is empty).
inline std::vector<std::int64_t> repeat_rows(std::int64_t repeats, std::int64_t batch,
                                             const char* cache) {
  KVCACHE_CHECK(repeats >= 1, cache, "::batch_repeat_interleave: expected repeats >= 1, got ",
                repeats);
  if (batch < 0) return {};
  const std::string where = std::string(cache) + "::batch_repeat_interleave";
  const std::int64_t new_batch = checked_mul(batch, repeats, where.c_str(), "the new batch");
  // The row list alone is 8 bytes a row, and the layers' new storage far more: a batch whose list
  // could not fit in the machine's memory is refused before anything is allocated (a failed
  // operator new is not a std::bad_alloc under every allocator: AddressSanitizer aborts).
  const std::uint64_t memory = physical_memory_bytes();
  KVCACHE_CHECK(
      memory == 0 || static_cast<std::uint64_t>(new_batch) <= memory / sizeof(std::int64_t), where,
      ": out of memory: the new batch of ", batch, " x ", repeats, " = ", new_batch,
      " rows needs more than the ", memory, " bytes of memory this machine has");
  std::vector<std::int64_t> rows(static_cast<std::size_t>(new_batch));
  for (std::size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<std::int64_t>(i) / repeats;
  return rows;
}

/// batch_select_indices: the indices themselves, at least one while the cache holds tokens.
inline std::vector<std::int64_t> select_rows(std::span<const std::int64_t> indices,
                                             std::int64_t batch, const char* cache) {
  KVCACHE_CHECK(!indices.empty() || batch < 0, cache,
                "::batch_select_indices: expected at least one index, got none");
  return {indices.begin(), indices.end()};
}

}  // namespace detail

}  // namespace kvcache
