// DynamicCache: a cache that grows as tokens arrive, like transformers' DynamicCache, without its
// cost. transformers appends with torch.cat, copying the whole layer every step (O(S) a step,
// O(S²) a generation, two full copies alive at once). Here each layer owns capacity-managed
// storage [batch, num_kv_heads, capacity, head_dim]; an update copies only its new tokens into the
// free slots and returns views of the first past + q_len slots. When capacity runs out it grows
// by 1.5× (at least to what the step needs), so appends cost amortised O(new tokens).
//
// Views returned by update() and to_legacy_cache() share ownership of the storage: they stay valid
// memory after the cache grows, is reset or destroyed, but they alias it, so a later crop followed
// by an update can overwrite slots an old view still covers. Take a copy (cpu::clone) to snapshot.
//
// Copies are explicit: the copy constructor and assignment are deleted (a member-wise copy would
// share storage with the original, see cache.hpp) and clone() makes a deep copy with the same
// capacity; moves transfer the storage.
//
// Every mutating call checks all of its input before it changes anything and allocates before it
// commits, so a call that throws leaves the cache as it was. Sizes are checked without overflow
// (initial_capacity, reserve, batch_repeat_interleave, crop): storage that cannot be indexed or
// allocated is a kvcache::Error, never a wrapped size. Not thread-safe.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <numeric>
#include <span>
#include <utility>
#include <vector>

#include "kvcache/backend/cpu.hpp"
#include "kvcache/cache/cache.hpp"
#include "kvcache/cache/legacy.hpp"
#include "kvcache/error.hpp"

namespace kvcache {

struct DynamicCacheOptions {
  /// Token slots each layer allocates on its first update (at least what that update needs).
  /// Setting it to prompt + max_new_tokens makes a whole generation run without regrowth.
  std::int64_t initial_capacity = 0;
};

template <CacheBackend B = cpu::Backend>
class DynamicCache : public Cache<B> {
 public:
  DynamicCache() = default;
  explicit DynamicCache(DynamicCacheOptions options) : options_(options) {
    KVCACHE_CHECK(options.initial_capacity >= 0,
                  "DynamicCache: expected initial_capacity >= 0, got ", options.initial_capacity);
  }
  DynamicCache(const DynamicCache&) = delete;  // would share storage: use clone()
  DynamicCache& operator=(const DynamicCache&) = delete;
  DynamicCache(DynamicCache&&) noexcept = default;
  DynamicCache& operator=(DynamicCache&&) noexcept = default;

  /// A deep copy: the same options, layers, tokens and capacity, in storage of its own (one copy
  /// of the tokens held). Hides Cache<B>::clone(), which returns the same as a unique_ptr.
  DynamicCache clone() const {
    DynamicCache copy(options_);
    copy.layers_.reserve(layers_.size());
    for (const Layer& layer : layers_) copy.layers_.push_back(layer.deep_copy());
    return copy;
  }

  /// Builds a cache from the legacy format, copying every layer into cache storage (one copy of
  /// the data; the legacy tensors are not referenced afterwards). Tensors must be on B's device.
  static DynamicCache from_legacy_cache(const LegacyCache& legacy,
                                        DynamicCacheOptions options = {}) {
    DynamicCache cache(options);
    for (std::size_t i = 0; i < legacy.size(); ++i) {
      cache.update(legacy[i].first, legacy[i].second, static_cast<int>(i));
    }
    return cache;
  }

  /// The legacy format as views of the cache's storage: no copy, O(layers). See the aliasing
  /// note at the top of this file.
  LegacyCache to_legacy_cache() const {
    LegacyCache legacy;
    legacy.reserve(layers_.size());
    for (const auto& layer : layers_) legacy.emplace_back(layer.key_view(), layer.value_view());
    return legacy;
  }

  std::pair<Tensor, Tensor> update(const Tensor& key_states, const Tensor& value_states,
                                   int layer_idx, const CacheKwargs& kwargs = {}) override {
    (void)kwargs;
    check_states(key_states, value_states, layer_idx);
    const bool new_layer = layer_idx == num_layers();
    const std::int64_t q_len = key_states.size(2);
    Layer staged = new_layer ? Layer{} : layers_[static_cast<std::size_t>(layer_idx)];
    const std::int64_t past = staged.seq_len;
    // Allocate first (may throw), then copy into slots past the committed length: until the
    // commit below, nothing the cache exposes has changed.
    staged.ensure_capacity(key_states, past + q_len, options_.initial_capacity);
    const Tensor key_slots = staged.keys.slice(2, past, past + q_len);
    const Tensor value_slots = staged.values.slice(2, past, past + q_len);
    if constexpr (requires { B::copy2(key_slots, key_states, value_slots, value_states); }) {
      B::copy2(key_slots, key_states, value_slots, value_states);  // one launch for both
    } else {
      B::copy(key_slots, key_states);
      B::copy(value_slots, value_states);
    }
    staged.seq_len = past + q_len;
    if (new_layer) {
      layers_.push_back(std::move(staged));  // may throw: the cache is still unchanged
    } else {
      layers_[static_cast<std::size_t>(layer_idx)] = std::move(staged);
    }
    const Layer& layer = layers_[static_cast<std::size_t>(layer_idx)];
    return {layer.key_view(), layer.value_view()};
  }

  std::int64_t get_seq_length(int layer_idx = 0) const override {
    KVCACHE_CHECK(layer_idx >= 0, "DynamicCache::get_seq_length: expected layer_idx >= 0, got ",
                  layer_idx);
    return layer_idx < num_layers() ? layers_[static_cast<std::size_t>(layer_idx)].seq_len : 0;
  }

  std::int64_t get_max_cache_shape(int layer_idx = 0) const override {
    (void)layer_idx;
    return -1;
  }

  MaskSizes get_mask_sizes(std::span<const std::int64_t> cache_position,
                           int layer_idx) const override {
    return {get_seq_length(layer_idx) + static_cast<std::int64_t>(cache_position.size()), 0};
  }

  int num_layers() const override { return static_cast<int>(layers_.size()); }

  void reset() override {
    for (auto& layer : layers_) layer.seq_len = 0;
  }

  void crop(std::int64_t max_length) override {
    const std::int64_t target =
        max_length >= 0 ? max_length
                        : detail::crop_target(max_length, get_seq_length(), "DynamicCache::crop");
    for (auto& layer : layers_) layer.seq_len = std::min(layer.seq_len, target);
  }

  // The base's braced-list overloads stay visible beside the overrides below.
  using Cache<B>::reorder_cache;
  using Cache<B>::batch_select_indices;
  void reorder_cache(std::span<const std::int64_t> beam_idx) override {
    const std::int64_t batch = batch_size();
    KVCACHE_CHECK(batch < 0 || static_cast<std::int64_t>(beam_idx.size()) == batch,
                  "DynamicCache::reorder_cache: expected ", batch,
                  " beam indices (one per row), got ", beam_idx.size());
    check_rows(beam_idx, "reorder_cache");
    gather_batch(static_cast<std::int64_t>(beam_idx.size()),
                 [&](std::int64_t i) { return beam_idx[static_cast<std::size_t>(i)]; });
  }

  void batch_repeat_interleave(std::int64_t repeats) override {
    KVCACHE_CHECK(repeats >= 1,
                  "DynamicCache::batch_repeat_interleave: expected repeats >= 1, got ", repeats);
    const std::int64_t batch = batch_size();
    if (batch < 0) return;  // nothing held: nothing to repeat
    const std::int64_t rows =
        detail::checked_mul(batch, repeats, "DynamicCache::batch_repeat_interleave",
                            "the new batch size (batch x repeats)");
    gather_batch(rows, [&](std::int64_t i) { return i / repeats; });
  }

  void batch_select_indices(std::span<const std::int64_t> indices) override {
    KVCACHE_CHECK(!indices.empty() || batch_size() < 0,
                  "DynamicCache::batch_select_indices: expected at least one index, got none");
    check_rows(indices, "batch_select_indices");
    gather_batch(static_cast<std::int64_t>(indices.size()),
                 [&](std::int64_t i) { return indices[static_cast<std::size_t>(i)]; });
  }

  std::size_t nbytes() const override {
    std::size_t total = 0;
    for (const auto& layer : layers_)
      total += layer.key_view().nbytes() + layer.value_view().nbytes();
    return total;
  }

  std::size_t capacity_bytes() const override {
    std::size_t total = 0;
    for (const auto& layer : layers_) total += layer.keys.nbytes() + layer.values.nbytes();
    return total;
  }

  /// Token slots layer `layer_idx` has allocated.
  std::int64_t capacity(int layer_idx = 0) const {
    return layer_idx < num_layers() ? layers_[static_cast<std::size_t>(layer_idx)].capacity() : 0;
  }

  /// Grows every layer's storage to hold at least `tokens` slots (the tokens held are kept), so the
  /// updates that follow, up to that length, neither reallocate nor move the storage. Layers not
  /// created yet (no update so far) are not affected: DynamicCacheOptions::initial_capacity sizes
  /// those. Strong guarantee: all new storage is allocated before any layer changes.
  void reserve(std::int64_t tokens) {
    KVCACHE_CHECK(tokens >= 0, "DynamicCache::reserve: expected tokens >= 0, got ", tokens);
    std::vector<Layer> grown = layers_;
    bool changed = false;
    for (auto& layer : grown) {
      if (!layer.keys.defined() || layer.capacity() >= tokens) continue;
      layer.grow_to(tokens);
      changed = true;
    }
    if (changed) layers_ = std::move(grown);
  }

  /// Layer `layer_idx`'s whole storage, keys and values [batch, num_kv_heads, capacity, head_dim]:
  /// slots [0, get_seq_length(layer_idx)) hold tokens, the rest are free. For kernels that write
  /// the next slots themselves (a decode step replayed from a CUDA graph), with mark_appended.
  std::pair<Tensor, Tensor> storage(int layer_idx) const {
    KVCACHE_CHECK(layer_idx >= 0 && layer_idx < num_layers(),
                  "DynamicCache::storage: expected layer_idx in [0, ", num_layers(), "), got ",
                  layer_idx);
    const Layer& layer = layers_[static_cast<std::size_t>(layer_idx)];
    return {layer.keys, layer.values};
  }

  /// Records that `tokens` more slots of every layer were written directly into storage() (by a
  /// replayed decode step), as update() would have left them. Every layer must hold tokens and
  /// have room for them; else nothing changes and the call throws.
  void mark_appended(std::int64_t tokens) {
    KVCACHE_CHECK(tokens >= 0, "DynamicCache::mark_appended: expected tokens >= 0, got ", tokens);
    KVCACHE_CHECK(num_layers() > 0, "DynamicCache::mark_appended: the cache holds no layer");
    for (int l = 0; l < num_layers(); ++l) {
      const Layer& layer = layers_[static_cast<std::size_t>(l)];
      KVCACHE_CHECK(layer.seq_len > 0, "DynamicCache::mark_appended: expected layer ", l,
                    " to hold tokens already (an update first), got an empty layer");
      KVCACHE_CHECK(tokens <= layer.capacity() - layer.seq_len,
                    "DynamicCache::mark_appended: expected room for ", tokens,
                    " more token(s) in layer ", l, ", which holds ", layer.seq_len, " of ",
                    layer.capacity(), " slots");
    }
    for (auto& layer : layers_) layer.seq_len += tokens;
  }

  /// Batch size of the rows held, or -1 while every layer is empty.
  std::int64_t batch_size() const {
    for (const auto& layer : layers_)
      if (layer.seq_len > 0) return layer.keys.size(0);
    return -1;
  }

 private:
  struct Layer {
    Tensor keys;               // [batch, num_kv_heads, capacity, head_dim], owning, on B::kDevice
    Tensor values;             // same
    std::int64_t seq_len = 0;  // slots [0, seq_len) hold tokens

    std::int64_t capacity() const { return keys.defined() ? keys.size(2) : 0; }
    Tensor key_view() const { return keys.defined() ? keys.slice(2, 0, seq_len) : keys; }
    Tensor value_view() const { return values.defined() ? values.slice(2, 0, seq_len) : values; }

    bool layout_matches(const Tensor& states) const {
      return keys.defined() && keys.dtype() == states.dtype() && keys.size(0) == states.size(0) &&
             keys.size(1) == states.size(1) && keys.size(3) == states.size(3);
    }

    // New storage of `slots` slots with the tokens held copied over.
    void grow_to(std::int64_t slots) {
      const std::int64_t shape[4] = {keys.size(0), keys.size(1), slots, keys.size(3)};
      Tensor new_keys = detail::allocate_storage<B>(shape, keys.dtype(), "DynamicCache::reserve");
      Tensor new_values =
          detail::allocate_storage<B>(shape, values.dtype(), "DynamicCache::reserve");
      if (seq_len > 0) {
        B::copy(new_keys.slice(2, 0, seq_len), key_view());
        B::copy(new_values.slice(2, 0, seq_len), value_view());
      }
      keys = std::move(new_keys);
      values = std::move(new_values);
    }
    // Makes room for `needed` tokens. An empty layer whose shape no longer fits is reallocated.
    void ensure_capacity(const Tensor& states, std::int64_t needed, std::int64_t initial) {
      if (layout_matches(states) && needed <= capacity()) return;
      const bool keep = layout_matches(states) && seq_len > 0;
      std::int64_t grown = std::max({needed, initial, std::int64_t{16}});
      if (keep) grown = std::max(grown, capacity() + capacity() / 2);
      const std::int64_t shape[4] = {states.size(0), states.size(1), grown, states.size(3)};
      Tensor new_keys = detail::allocate_storage<B>(shape, states.dtype(), "DynamicCache::update");
      Tensor new_values =
          detail::allocate_storage<B>(shape, states.dtype(), "DynamicCache::update");
      if (keep) {
        B::copy(new_keys.slice(2, 0, seq_len), key_view());
        B::copy(new_values.slice(2, 0, seq_len), value_view());
      }
      keys = std::move(new_keys);
      values = std::move(new_values);
    }
    // The same layer in storage of its own: same capacity, the tokens held copied.
    Layer deep_copy() const {
      Layer copy;
      copy.seq_len = seq_len;
      if (!keys.defined()) return copy;
      copy.keys = detail::allocate_storage<B>(keys.shape(), keys.dtype(), "DynamicCache::clone");
      copy.values =
          detail::allocate_storage<B>(values.shape(), values.dtype(), "DynamicCache::clone");
      if (seq_len > 0) {
        B::copy(copy.keys.slice(2, 0, seq_len), key_view());
        B::copy(copy.values.slice(2, 0, seq_len), value_view());
      }
      return copy;
    }
  };

  void check_states(const Tensor& k, const Tensor& v, int layer_idx) const {
    KVCACHE_CHECK(layer_idx >= 0 && layer_idx <= num_layers(),
                  "DynamicCache::update: expected layer_idx in [0, ", num_layers(),
                  "] (layers are added in order), got ", layer_idx);
    detail::check_kv_states(k, v, B::kDevice, "DynamicCache::update");
    if (layer_idx < num_layers()) {
      const Layer& layer = layers_[static_cast<std::size_t>(layer_idx)];
      if (layer.seq_len > 0) {
        KVCACHE_CHECK(layer.layout_matches(k), "DynamicCache::update: layer ", layer_idx,
                      " holds [", layer.keys.size(0), ", ", layer.keys.size(1), ", ", layer.seq_len,
                      ", ", layer.keys.size(3), "] ", dtype_name(layer.keys.dtype()),
                      "; expected new states [", layer.keys.size(0), ", ", layer.keys.size(1),
                      ", q_len, ", layer.keys.size(3), "] ", dtype_name(layer.keys.dtype()),
                      ", got ", k.describe());
      }
    }
    const std::int64_t batch = batch_size();
    KVCACHE_CHECK(batch < 0 || k.size(0) == batch, "DynamicCache::update: expected batch ", batch,
                  " (the batch the cache holds), got ", k.size(0), " for layer ", layer_idx);
  }

  // Checks batch-row indices against the batch held (nothing to check while empty).
  void check_rows(std::span<const std::int64_t> rows, const char* op) const {
    const std::int64_t batch = batch_size();
    if (batch < 0) return;
    for (std::size_t i = 0; i < rows.size(); ++i) {
      KVCACHE_CHECK(rows[i] >= 0 && rows[i] < batch, "DynamicCache::", op,
                    ": expected indices in [0, ", batch, "), got ", rows[i], " at position ", i);
    }
  }

  // Rebuilds every non-empty layer with `rows` batch rows, row i a copy of old row row_of(i)
  // (checked in range by the caller). All new storage is allocated and filled before any layer is
  // replaced; its size is checked before allocating, so an absurd row count is an error.
  template <class RowOf>
  void gather_batch(std::int64_t rows, RowOf row_of) {
    if (batch_size() < 0) return;  // nothing held: nothing to rearrange
    std::vector<Layer> rebuilt = layers_;
    for (auto& layer : rebuilt) {
      if (layer.seq_len == 0) continue;
      const std::int64_t shape[4] = {rows, layer.keys.size(1), layer.capacity(),
                                     layer.keys.size(3)};
      Tensor keys = detail::allocate_storage<B>(shape, layer.keys.dtype(), "DynamicCache");
      Tensor values = detail::allocate_storage<B>(shape, layer.values.dtype(), "DynamicCache");
      for (std::int64_t dst = 0; dst < rows; ++dst) {
        const std::int64_t src = row_of(dst);
        B::copy(keys.slice(0, dst, dst + 1).slice(2, 0, layer.seq_len),
                layer.key_view().slice(0, src, src + 1));
        B::copy(values.slice(0, dst, dst + 1).slice(2, 0, layer.seq_len),
                layer.value_view().slice(0, src, src + 1));
      }
      layer.keys = std::move(keys);
      layer.values = std::move(values);
    }
    layers_.swap(rebuilt);
  }

  std::unique_ptr<Cache<B>> clone_cache() const override {
    return std::make_unique<DynamicCache>(clone());
  }

  DynamicCacheOptions options_;
  std::vector<Layer> layers_;
};

extern template class DynamicCache<cpu::Backend>;

}  // namespace kvcache
