// StaticCache: a cache of fixed size, allocated once, written at cache_position — transformers'
// StaticCache, with three of its shortcomings fixed:
//   - attention reads only the filled slots: update() returns views of the first
//     get_seq_length(layer) slots, not of all max_cache_len (transformers attends over every slot
//     and masks the empty ones);
//   - get_seq_length is exact: a filled-length counter per layer (transformers counts slots whose
//     keys are non-zero, and is fooled by all-zero keys, #30377);
//   - crop works (transformers has none, #30312), as do reset, reorder_cache, the batch operations
//     and clone.
//
// Layout. Each layer owns keys and values [max_batch_size, num_kv_heads, max_cache_len, head_dim]
// on B's device. With StaticCacheOptions::num_layers, num_kv_heads and head_dim all given, every
// layer is allocated in the constructor (what generate() does: the memory is known before the
// first token and never changes). Without them each layer is allocated, at the full size, at its
// first update, from the layout of its states (layers then arrive in order, as in DynamicCache);
// either way a layer's layout never changes afterwards, and states of another layout are an
// error. A step of `batch` rows (at most max_batch_size) uses rows [0, batch); the batch is fixed
// while any layer holds tokens (reset or crop(0) frees it).
//
// Writes. update(k, v, layer, {.cache_position = p}) writes the q_len new tokens to slots p[0] ..
// p[0] + q_len − 1, which must be consecutive, start at or before the layer's filled length (no
// unwritten gap) and end at or before max_cache_len: cache_position >= max_cache_len is a clear
// error. Afterwards the layer holds p[0] + q_len tokens: rewriting from p[0] < get_seq_length()
// (speculative decoding's rollback) is crop(p[0]) followed by the append, so a later slot never
// survives from a continuation that was abandoned. An empty cache_position appends at the filled
// length. get_mask_sizes gives (p[0] + q_len, 0): the attention mask spans exactly the keys the
// update returns.
//
// Every call checks all of its input before it changes anything, and allocates (a lazy layer, the
// scratch rows of a batch operation) before it writes, so a call that throws leaves the cache as it
// was (the strong guarantee). Sizes and positions are checked without overflow. The storage's
// address never changes after allocation (batch operations copy through scratch and back), which
// is what a replayed CUDA graph needs. Copies are explicit: clone() allocates the full size and
// copies the filled slots; copy construction and assignment are deleted. Not thread-safe.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "kvcache/backend/cpu.hpp"
#include "kvcache/cache/cache.hpp"
#include "kvcache/cache/legacy.hpp"
#include "kvcache/error.hpp"

namespace kvcache {

/// The size of a StaticCache, and optionally its layout to allocate every layer up front.
struct StaticCacheOptions {
  /// Rows the storage holds; a step may use fewer.
  std::int64_t max_batch_size = 1;
  /// Token slots per layer: positions [0, max_cache_len).
  std::int64_t max_cache_len = 0;
  /// The layout, to allocate every layer up front: all three > 0, or all 0 to allocate each layer
  /// at its first update from its states.
  int num_layers = 0;
  /// Key/value heads per layer (with num_layers and head_dim: the up-front layout).
  std::int64_t num_kv_heads = 0;
  /// Elements per head (with num_layers and num_kv_heads: the up-front layout).
  std::int64_t head_dim = 0;
  /// The dtype of the up-front storage (lazy layers take their states' dtype).
  DType dtype = DType::kFloat32;
};

/// A cache of fixed size (transformers' StaticCache): each layer holds max_cache_len slots
/// written at cache_position, allocated once; attention reads the filled slots only, and the
/// storage never moves, so its addresses stay fixed (what CUDA-graph replay needs).
template <CacheBackend B = cpu::Backend>
class StaticCache : public Cache<B> {
 public:
  /// A cache of max_batch_size rows and max_cache_len slots per layer, its layers allocated at
  /// their first update.
  StaticCache(std::int64_t max_batch_size, std::int64_t max_cache_len)
      : StaticCache(
            StaticCacheOptions{.max_batch_size = max_batch_size, .max_cache_len = max_cache_len}) {}

  /// A cache of options.max_batch_size rows and options.max_cache_len slots per layer; with the
  /// layout given, every layer's storage is allocated here.
  explicit StaticCache(StaticCacheOptions options) : options_(options) {
    const char* where = "StaticCache";
    KVCACHE_CHECK(options.max_batch_size >= 1, where, ": expected max_batch_size >= 1, got ",
                  options.max_batch_size);
    KVCACHE_CHECK(options.max_cache_len >= 1, where, ": expected max_cache_len >= 1, got ",
                  options.max_cache_len);
    const bool none = options.num_layers == 0 && options.num_kv_heads == 0 && options.head_dim == 0;
    const bool all = options.num_layers > 0 && options.num_kv_heads > 0 && options.head_dim > 0;
    KVCACHE_CHECK(none || all, where,
                  ": expected num_layers, num_kv_heads and head_dim all > 0 (storage up front) "
                  "or all 0 (each layer at its first update), got ",
                  options.num_layers, ", ", options.num_kv_heads, ", ", options.head_dim);
    KVCACHE_CHECK(is_floating(options.dtype), where,
                  ": expected a float32, float16 or bfloat16 dtype, got ",
                  dtype_name(options.dtype));
    if (all) {
      const std::int64_t shape[4] = {options.max_batch_size, options.num_kv_heads,
                                     options.max_cache_len, options.head_dim};
      // The whole cache's bytes, checked (overflow, then what the device has free) before the
      // first layer is allocated.
      const std::int64_t bytes = detail::checked_mul(
          detail::storage_bytes(shape, options.dtype, where), 2 * options.num_layers, where,
          "the cache's byte count (layers x keys and values x bytes per layer)");
      detail::require_memory(B::kDevice, static_cast<std::uint64_t>(bytes), where,
                             "the storage of every layer");
      layers_.reserve(static_cast<std::size_t>(options.num_layers));
      for (int l = 0; l < options.num_layers; ++l)
        layers_.push_back(Layer::allocate(shape, options.dtype, where));
    }
  }

  StaticCache(const StaticCache&) = delete;  // would share storage: use clone()
  StaticCache& operator=(const StaticCache&) = delete;
  /// Moves the storage; the moved-from cache is empty.
  StaticCache(StaticCache&&) noexcept = default;
  /// Moves the storage; the moved-from cache is empty.
  StaticCache& operator=(StaticCache&&) noexcept = default;

  /// A deep copy: the same options, layers and tokens in storage of its own (the full
  /// max_cache_len, so the copy can go on to the same length). Hides Cache<B>::clone(), which
  /// returns the same as a unique_ptr.
  StaticCache clone() const {
    return detail::out_of_memory_as_error("StaticCache::clone", [&]() -> StaticCache {
      StaticCache copy(StaticCacheOptions{.max_batch_size = options_.max_batch_size,
                                          .max_cache_len = options_.max_cache_len});
      copy.options_ = options_;
      copy.batch_ = batch_;
      copy.layers_.reserve(layers_.size());
      for (const Layer& layer : layers_) {
        Layer fresh = Layer::allocate(layer.keys.shape(), layer.keys.dtype(), "StaticCache::clone");
        fresh.seq_len = layer.seq_len;
        if (layer.seq_len > 0) {
          B::copy(fresh.key_view(batch_), layer.key_view(batch_));
          B::copy(fresh.value_view(batch_), layer.value_view(batch_));
        }
        copy.layers_.push_back(std::move(fresh));
      }
      return copy;
    });
  }

  /// Writes key_states/value_states [batch, num_kv_heads, q_len, head_dim] at
  /// kwargs.cache_position (empty: at the filled length) and returns the layer's filled slots,
  /// [batch, num_kv_heads, cache_position[0] + q_len, head_dim] views of the storage. See the top
  /// of this file for what positions are accepted.
  std::pair<Tensor, Tensor> update(const Tensor& key_states, const Tensor& value_states,
                                   int layer_idx, const CacheKwargs& kwargs = {}) override {
    return detail::out_of_memory_as_error(
        "StaticCache::update", [&]() -> std::pair<Tensor, Tensor> {
          const char* where = "StaticCache::update";
          check_states(key_states, value_states, layer_idx);
          const std::int64_t batch = key_states.size(0), q_len = key_states.size(2);
          const bool new_layer = layer_idx == num_layers();
          const std::int64_t filled =
              new_layer ? 0 : layers_[static_cast<std::size_t>(layer_idx)].seq_len;
          const std::int64_t start = write_start(kwargs.cache_position, q_len, filled, where);
          // A lazy layer is allocated (may throw) before anything the cache exposes changes.
          Layer staged;
          if (new_layer) {
            const std::int64_t shape[4] = {options_.max_batch_size, key_states.size(1),
                                           options_.max_cache_len, key_states.size(3)};
            staged = Layer::allocate(shape, key_states.dtype(), where);
            layers_.reserve(layers_.size() + 1);  // may throw: the push_back below then cannot
          }
          Layer& layer = new_layer ? staged : layers_[static_cast<std::size_t>(layer_idx)];
          if (q_len > 0) {
            const Tensor key_slots = layer.keys.slice(0, 0, batch).slice(2, start, start + q_len);
            const Tensor value_slots =
                layer.values.slice(0, 0, batch).slice(2, start, start + q_len);
            if constexpr (requires {
                            B::copy2(key_slots, key_states, value_slots, value_states);
                          }) {
              B::copy2(key_slots, key_states, value_slots, value_states);  // one launch for both
            } else {
              B::copy(key_slots, key_states);
              B::copy(value_slots, value_states);
            }
          }
          layer.seq_len = start + q_len;
          if (new_layer) layers_.push_back(std::move(staged));
          batch_ = batch;
          const Layer& done = layers_[static_cast<std::size_t>(layer_idx)];
          return {done.key_view(batch), done.value_view(batch)};
        });
  }

  std::int64_t get_seq_length(int layer_idx = 0) const override {
    KVCACHE_CHECK(layer_idx >= 0, "StaticCache::get_seq_length: expected layer_idx >= 0, got ",
                  layer_idx);
    return layer_idx < num_layers() ? layers_[static_cast<std::size_t>(layer_idx)].seq_len : 0;
  }

  std::int64_t get_max_cache_shape(int layer_idx = 0) const override {
    (void)layer_idx;
    return options_.max_cache_len;
  }

  /// (cache_position[0] + q_len, 0): the keys the update at cache_position will return (an empty
  /// cache_position: the filled length). Positions the update would reject give a length the
  /// attention module's own checks refuse, never an overflow.
  MaskSizes get_mask_sizes(std::span<const std::int64_t> cache_position,
                           int layer_idx) const override {
    if (cache_position.empty()) return {get_seq_length(layer_idx), 0};
    const auto q_len = static_cast<std::int64_t>(cache_position.size());
    const std::int64_t start =
        std::clamp<std::int64_t>(cache_position.front(), 0, options_.max_cache_len);
    // start <= max_cache_len, which may be near INT64_MAX: the sum saturates instead of
    // overflowing (an update at such positions is refused anyway).
    if (start > std::numeric_limits<std::int64_t>::max() - q_len)
      return {std::numeric_limits<std::int64_t>::max(), 0};
    return {start + q_len, 0};
  }

  int num_layers() const override { return static_cast<int>(layers_.size()); }

  /// Empties every layer, keeping the storage.
  void reset() override {
    for (auto& layer : layers_) layer.seq_len = 0;
    batch_ = 0;
  }

  void crop(std::int64_t max_length) override {
    detail::out_of_memory_as_error("StaticCache::crop", [&]() {
      const std::int64_t target =
          max_length >= 0 ? max_length
                          : detail::crop_target(max_length, get_seq_length(), "StaticCache::crop");
      for (auto& layer : layers_) layer.seq_len = std::min(layer.seq_len, target);
      if (batch_size() < 0) batch_ = 0;
    });
  }

  // The base's braced-list overloads stay visible beside the overrides below.
  using Cache<B>::reorder_cache;
  using Cache<B>::batch_select_indices;
  void reorder_cache(std::span<const std::int64_t> beam_idx) override {
    detail::out_of_memory_as_error("StaticCache::reorder_cache", [&]() {
      const std::int64_t batch = batch_size();
      KVCACHE_CHECK(batch < 0 || static_cast<std::int64_t>(beam_idx.size()) == batch,
                    "StaticCache::reorder_cache: expected ", batch,
                    " beam indices (one per row), got ", beam_idx.size());
      check_rows(beam_idx, "reorder_cache");
      gather_batch(static_cast<std::int64_t>(beam_idx.size()),
                   [&](std::int64_t i) { return beam_idx[static_cast<std::size_t>(i)]; });
    });
  }

  /// Repeats each row `repeats` times; the new batch must fit in max_batch_size.
  void batch_repeat_interleave(std::int64_t repeats) override {
    detail::out_of_memory_as_error("StaticCache::batch_repeat_interleave", [&]() {
      KVCACHE_CHECK(repeats >= 1,
                    "StaticCache::batch_repeat_interleave: expected repeats >= 1, got ", repeats);
      const std::int64_t batch = batch_size();
      if (batch < 0) return;  // nothing held: nothing to repeat
      KVCACHE_CHECK(repeats <= options_.max_batch_size / batch,
                    "StaticCache::batch_repeat_interleave: expected batch ", batch, " x repeats ",
                    repeats, " to fit in max_batch_size ", options_.max_batch_size);
      gather_batch(batch * repeats, [&](std::int64_t i) { return i / repeats; });
    });
  }

  /// Keeps the rows named by `indices`; at most max_batch_size of them.
  void batch_select_indices(std::span<const std::int64_t> indices) override {
    detail::out_of_memory_as_error("StaticCache::batch_select_indices", [&]() {
      KVCACHE_CHECK(!indices.empty() || batch_size() < 0,
                    "StaticCache::batch_select_indices: expected at least one index, got none");
      KVCACHE_CHECK(
          batch_size() < 0 || static_cast<std::int64_t>(indices.size()) <= options_.max_batch_size,
          "StaticCache::batch_select_indices: expected at most ", options_.max_batch_size,
          " indices (max_batch_size), got ", indices.size());
      check_rows(indices, "batch_select_indices");
      gather_batch(static_cast<std::int64_t>(indices.size()),
                   [&](std::int64_t i) { return indices[static_cast<std::size_t>(i)]; });
    });
  }

  std::size_t nbytes() const override {
    std::size_t total = 0;
    const std::int64_t batch = std::max<std::int64_t>(batch_, 0);
    for (const auto& layer : layers_) {
      if (layer.seq_len > 0)
        total += layer.key_view(batch).nbytes() + layer.value_view(batch).nbytes();
    }
    return total;
  }

  std::size_t capacity_bytes() const override {
    std::size_t total = 0;
    for (const auto& layer : layers_) total += layer.keys.nbytes() + layer.values.nbytes();
    return total;
  }

  /// The legacy format as views of the filled slots (no copy; they alias the storage).
  LegacyCache to_legacy_cache() const {
    return detail::out_of_memory_as_error("StaticCache::to_legacy_cache", [&]() -> LegacyCache {
      LegacyCache legacy;
      legacy.reserve(layers_.size());
      const std::int64_t batch = std::max<std::int64_t>(batch_, 1);
      for (const auto& layer : layers_)
        legacy.emplace_back(layer.key_view(batch), layer.value_view(batch));
      return legacy;
    });
  }

  /// Rows held, or -1 while every layer is empty.
  std::int64_t batch_size() const {
    for (const auto& layer : layers_)
      if (layer.seq_len > 0) return batch_;
    return -1;
  }

  /// Rows the storage holds.
  std::int64_t max_batch_size() const { return options_.max_batch_size; }
  /// Token slots per layer.
  std::int64_t max_cache_len() const { return options_.max_cache_len; }

  /// Layer `layer_idx`'s whole storage, keys and values [max_batch_size, num_kv_heads,
  /// max_cache_len, head_dim]: rows [0, batch_size()) and slots [0, get_seq_length(layer_idx))
  /// hold tokens. Its address is fixed for the cache's life.
  std::pair<Tensor, Tensor> storage(int layer_idx) const {
    KVCACHE_CHECK(layer_idx >= 0 && layer_idx < num_layers(),
                  "StaticCache::storage: expected layer_idx in [0, ", num_layers(), "), got ",
                  layer_idx);
    const Layer& layer = layers_[static_cast<std::size_t>(layer_idx)];
    return {layer.keys, layer.values};
  }

  /// Records that `tokens` more slots of every layer, rows [0, batch_size()), were written
  /// directly into storage() (by a decode step replayed from a CUDA graph), as update() would have
  /// left them. Every layer must hold tokens already and have room for them before max_cache_len;
  /// else nothing changes and the call throws.
  void mark_appended(std::int64_t tokens) {
    const char* where = "StaticCache::mark_appended";
    KVCACHE_CHECK(tokens >= 0, where, ": expected tokens >= 0, got ", tokens);
    KVCACHE_CHECK(num_layers() > 0, where, ": the cache holds no layer");
    for (int l = 0; l < num_layers(); ++l) {
      const Layer& layer = layers_[static_cast<std::size_t>(l)];
      KVCACHE_CHECK(layer.seq_len > 0, where, ": expected layer ", l,
                    " to hold tokens already (an update first), got an empty layer");
      KVCACHE_CHECK(tokens <= options_.max_cache_len - layer.seq_len, where, ": expected room for ",
                    tokens, " more token(s) in layer ", l, ", which holds ", layer.seq_len, " of ",
                    options_.max_cache_len, " slots");
    }
    for (Layer& layer : layers_) layer.seq_len += tokens;
  }

 private:
  struct Layer {
    Tensor keys;  // [max_batch_size, num_kv_heads, max_cache_len, head_dim], owning, on B::kDevice
    Tensor values;             // same
    std::int64_t seq_len = 0;  // slots [0, seq_len) of rows [0, batch_) hold tokens

    static Layer allocate(Shape shape, DType dtype, const char* where) {
      Layer layer;
      layer.keys = detail::allocate_storage<B>(shape, dtype, where);
      layer.values = detail::allocate_storage<B>(shape, dtype, where);
      return layer;
    }
    Tensor key_view(std::int64_t batch) const {
      return keys.slice(0, 0, batch).slice(2, 0, seq_len);
    }
    Tensor value_view(std::int64_t batch) const {
      return values.slice(0, 0, batch).slice(2, 0, seq_len);
    }
  };

  void check_states(const Tensor& k, const Tensor& v, int layer_idx) const {
    const char* where = "StaticCache::update";
    const bool lazy = options_.num_layers == 0;
    KVCACHE_CHECK(layer_idx >= 0 && layer_idx < num_layers() + (lazy ? 1 : 0), where,
                  ": expected layer_idx in [0, ", num_layers() + (lazy ? 0 : -1), "]",
                  lazy ? " (layers are added in order)" : " (the cache's layers)", ", got ",
                  layer_idx);
    detail::check_kv_states(k, v, B::kDevice, where);
    KVCACHE_CHECK(k.size(0) <= options_.max_batch_size, where,
                  ": expected batch <= ", options_.max_batch_size, " (max_batch_size), got ",
                  k.shape_string());
    const std::int64_t batch = batch_size();
    KVCACHE_CHECK(batch < 0 || k.size(0) == batch, where, ": expected batch ", batch,
                  " (the batch the cache holds), got ", k.size(0), " for layer ", layer_idx);
    if (layer_idx < num_layers()) {
      const Layer& layer = layers_[static_cast<std::size_t>(layer_idx)];
      KVCACHE_CHECK(layer.keys.size(1) == k.size(1) && layer.keys.size(3) == k.size(3) &&
                        layer.keys.dtype() == k.dtype(),
                    where, ": layer ", layer_idx, " is laid out [", options_.max_batch_size, ", ",
                    layer.keys.size(1), ", ", options_.max_cache_len, ", ", layer.keys.size(3),
                    "] ", dtype_name(layer.keys.dtype()), "; expected new states [batch, ",
                    layer.keys.size(1), ", q_len, ", layer.keys.size(3), "] ",
                    dtype_name(layer.keys.dtype()), ", got ", k.describe());
    }
  }

  // The first slot an update of q_len tokens writes: cache_position[0], checked to be consecutive,
  // within [0, filled] and to end by max_cache_len; `filled` when cache_position is empty.
  std::int64_t write_start(std::span<const std::int64_t> cache_position, std::int64_t q_len,
                           std::int64_t filled, const char* where) const {
    const std::int64_t max_len = options_.max_cache_len;
    const std::int64_t start = cache_position.empty() ? filled : cache_position.front();
    KVCACHE_CHECK(
        cache_position.empty() || static_cast<std::int64_t>(cache_position.size()) == q_len, where,
        ": expected ", q_len, " cache positions (one per new token), got ", cache_position.size());
    for (std::size_t i = 0; i < cache_position.size(); ++i) {
      KVCACHE_CHECK(cache_position[i] >= 0, where, ": expected cache_position >= 0, got ",
                    cache_position[i], " at index ", i);
      KVCACHE_CHECK(cache_position[i] < max_len, where,
                    ": expected cache_position below max_cache_len ", max_len,
                    " (the cache is full), got ", cache_position[i], " at index ", i);
      // A difference of two non-negative values: no overflow, whatever they are.
      KVCACHE_CHECK(cache_position[i] - start == static_cast<std::int64_t>(i), where,
                    ": expected consecutive cache positions from ", start, ", got ",
                    cache_position[i], " at index ", i);
    }
    KVCACHE_CHECK(q_len <= max_len - start, where, ": expected room for ", q_len,
                  " new token(s) from slot ", start, " in max_cache_len ", max_len,
                  " (the cache is full)");
    KVCACHE_CHECK(start <= filled, where, ": expected cache_position to start at or before slot ",
                  filled, " (the tokens held; slots are written without gaps), got ", start);
    return start;
  }

  // Checks batch-row indices against the batch held (nothing to check while empty).
  void check_rows(std::span<const std::int64_t> rows, const char* op) const {
    const std::int64_t batch = batch_size();
    if (batch < 0) return;
    for (std::size_t i = 0; i < rows.size(); ++i) {
      KVCACHE_CHECK(rows[i] >= 0 && rows[i] < batch, "StaticCache::", op,
                    ": expected indices in [0, ", batch, "), got ", rows[i], " at position ", i);
    }
  }

  // Makes rows [0, rows) of every non-empty layer copies of old rows row_of(i) (checked by the
  // caller; rows <= max_batch_size). The old rows are gathered into scratch storage, all of it
  // allocated before any layer is written, then copied back: the storage's address never changes.
  template <class RowOf>
  void gather_batch(std::int64_t rows, RowOf row_of) {
    if (batch_size() < 0) return;  // nothing held: nothing to rearrange
    std::vector<std::pair<Tensor, Tensor>> scratch(layers_.size());
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const Layer& layer = layers_[l];
      if (layer.seq_len == 0) continue;
      const std::int64_t shape[4] = {rows, layer.keys.size(1), layer.seq_len, layer.keys.size(3)};
      scratch[l] = {detail::allocate_storage<B>(shape, layer.keys.dtype(), "StaticCache"),
                    detail::allocate_storage<B>(shape, layer.keys.dtype(), "StaticCache")};
    }
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const Layer& layer = layers_[l];
      if (layer.seq_len == 0) continue;
      const Tensor keys = layer.key_view(batch_), values = layer.value_view(batch_);
      for (std::int64_t dst = 0; dst < rows; ++dst) {
        const std::int64_t src = row_of(dst);
        B::copy(scratch[l].first.slice(0, dst, dst + 1), keys.slice(0, src, src + 1));
        B::copy(scratch[l].second.slice(0, dst, dst + 1), values.slice(0, src, src + 1));
      }
    }
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const Layer& layer = layers_[l];
      if (layer.seq_len == 0) continue;
      B::copy(layer.key_view(rows), scratch[l].first);
      B::copy(layer.value_view(rows), scratch[l].second);
    }
    batch_ = rows;
  }

  std::unique_ptr<Cache<B>> clone_cache() const override {
    return detail::out_of_memory_as_error("StaticCache::clone", [&]() -> std::unique_ptr<Cache<B>> {
      return std::make_unique<StaticCache>(clone());
    });
  }

  StaticCacheOptions options_;
  std::vector<Layer> layers_;
  std::int64_t batch_ = 0;  // rows in use while any layer holds tokens
};

extern template class StaticCache<cpu::Backend>;

}  // namespace kvcache
