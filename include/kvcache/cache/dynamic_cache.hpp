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
// Layers of their own kind. The cache holds one layer object per decoder layer: a full-attention
// layer (the storage above) or, for the layers DynamicCacheOptions::sliding_windows gives a window,
// a SlidingWindowLayer (sliding_window_layer.hpp: a mirrored ring keeping the last window - 1 +
// spare tokens), as transformers' DynamicCache(config=...) makes DynamicSlidingWindowLayer for
// config.layer_types' sliding layers. ModelConfig::sliding_windows() gives the list for a model;
// without it every layer is full (transformers' DynamicCache()), which is exact for a windowed
// model too (the attention applies the model's window; it just keeps more). The Cache API is the
// same over both kinds: get_seq_length counts tokens seen, get_mask_sizes and update are the
// layer's (kv_offset > 0 once a sliding layer has dropped tokens), to_legacy_cache gives what each
// layer keeps. storage(), mark_appended() and reserve() are for full layers (a replayed CUDA graph
// writes slots [0, capacity) directly): a sliding layer is an error there, or skipped by reserve.
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
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "kvcache/backend/cpu.hpp"
#include "kvcache/cache/cache.hpp"
#include "kvcache/cache/legacy.hpp"
#include "kvcache/cache/sliding_window_layer.hpp"
#include "kvcache/error.hpp"

namespace kvcache {

/// How a DynamicCache allocates: its first capacity, and which layers slide over a window.
struct DynamicCacheOptions {
  /// Token slots each layer allocates on its first update (at least what that update needs).
  /// Setting it to prompt + max_new_tokens makes a whole generation run without regrowth. (A
  /// sliding layer allocates at most its window - 1 + sliding_spare_slots.)
  std::int64_t initial_capacity = 0;
  /// Per layer, the attention window of a sliding layer (transformers' DynamicSlidingWindowLayer)
  /// or 0 for a full-attention layer; layers past the list are full. ModelConfig::sliding_windows()
  /// gives a model's. Empty: every layer full.
  std::vector<std::int64_t> sliding_windows{};
  /// Tokens a sliding layer keeps beyond window - 1, so crop() can drop that many of the last
  /// tokens after the window has filled.
  std::int64_t sliding_spare_slots = SlidingWindowLayer<cpu::Backend>::kDefaultSpareSlots;
};

/// A cache that grows as tokens arrive (transformers' DynamicCache), in amortised O(1) per
/// token: each layer appends into capacity-managed storage and update() returns views. Layers
/// are full, or SlidingWindowLayer rings where DynamicCacheOptions::sliding_windows says so.
template <CacheBackend B = cpu::Backend>
class DynamicCache : public Cache<B> {
 public:
  DynamicCache() = default;
  /// A cache with `options` (initial capacity, sliding windows per layer); its layers are made at
  /// their first update.
  explicit DynamicCache(DynamicCacheOptions options) : options_(std::move(options)) {
    KVCACHE_CHECK(options_.initial_capacity >= 0,
                  "DynamicCache: expected initial_capacity >= 0, got ", options_.initial_capacity);
    KVCACHE_CHECK(options_.sliding_spare_slots >= 0,
                  "DynamicCache: expected sliding_spare_slots >= 0, got ",
                  options_.sliding_spare_slots);
    for (std::size_t l = 0; l < options_.sliding_windows.size(); ++l) {
      const std::int64_t window = options_.sliding_windows[l];
      KVCACHE_CHECK(window >= 0,
                    "DynamicCache: expected sliding_windows entries >= 0 (0 = full "
                    "attention), got ",
                    window, " for layer ", l);
      // The layer's own checks of window and spare slots, now rather than at its first update.
      if (window > 0) (void)SlidingWindowLayer<B>(window, options_.sliding_spare_slots);
    }
  }
  DynamicCache(const DynamicCache&) = delete;  // would share storage: use clone()
  DynamicCache& operator=(const DynamicCache&) = delete;
  /// Moves the storage; the moved-from cache is empty.
  DynamicCache(DynamicCache&&) noexcept = default;
  /// Moves the storage; the moved-from cache is empty.
  DynamicCache& operator=(DynamicCache&&) noexcept = default;

  /// A deep copy: the same options, layers, tokens and capacity, in storage of its own (one copy
  /// of the tokens held). Hides Cache<B>::clone(), which returns the same as a unique_ptr.
  DynamicCache clone() const {
    return detail::out_of_memory_as_error("DynamicCache::clone", [&]() -> DynamicCache {
      DynamicCache copy(options_);
      copy.layers_.reserve(layers_.size());
      for (const LayerSlot& slot : layers_) {
        copy.layers_.push_back(std::visit(
            [](const auto& layer) -> LayerSlot { return layer.deep_copy("DynamicCache::clone"); },
            slot));
      }
      return copy;
    });
  }

  /// Builds a cache from the legacy format, copying every layer into cache storage (one copy of
  /// the data; the legacy tensors are not referenced afterwards). Tensors must be on B's device.
  /// A sliding layer of `options` keeps the last of the pairs' tokens and counts them all as seen.
  static DynamicCache from_legacy_cache(const LegacyCache& legacy,
                                        DynamicCacheOptions options = {}) {
    return detail::out_of_memory_as_error("DynamicCache::from_legacy_cache", [&]() -> DynamicCache {
      DynamicCache cache(std::move(options));
      for (std::size_t i = 0; i < legacy.size(); ++i) {
        cache.update(legacy[i].first, legacy[i].second, static_cast<int>(i));
      }
      return cache;
    });
  }

  /// The legacy format as views of the cache's storage: no copy, O(layers). See the aliasing
  /// note at the top of this file. A sliding layer gives the tokens it keeps (its last window - 1,
  /// as transformers' layer.keys), valid until its next update.
  LegacyCache to_legacy_cache() const {
    return detail::out_of_memory_as_error("DynamicCache::to_legacy_cache", [&]() -> LegacyCache {
      LegacyCache legacy;
      legacy.reserve(layers_.size());
      for (const LayerSlot& slot : layers_) {
        if (const Layer* full = std::get_if<Layer>(&slot)) {
          legacy.emplace_back(full->key_view(), full->value_view());
        } else {
          legacy.push_back(std::get<Sliding>(slot).kept());
        }
      }
      return legacy;
    });
  }

  std::pair<Tensor, Tensor> update(const Tensor& key_states, const Tensor& value_states,
                                   int layer_idx, const CacheKwargs& kwargs = {}) override {
    return detail::out_of_memory_as_error(
        "DynamicCache::update", [&]() -> std::pair<Tensor, Tensor> {
          (void)kwargs;
          check_states(key_states, value_states, layer_idx);
          const bool new_layer = layer_idx == num_layers();
          if (new_layer) layers_.reserve(layers_.size() + 1);  // may throw: the push_back cannot
          LayerSlot staged =
              new_layer ? make_layer(layer_idx) : layers_[static_cast<std::size_t>(layer_idx)];
          std::pair<Tensor, Tensor> out;
          if (Layer* full = std::get_if<Layer>(&staged)) {
            const std::int64_t q_len = key_states.size(2);
            const std::int64_t past = full->seq_len;
            // Allocate first (may throw), then copy into slots past the committed length: until the
            // commit below, nothing the cache exposes has changed.
            full->ensure_capacity(key_states, past + q_len, options_.initial_capacity);
            const Tensor key_slots = full->keys.slice(2, past, past + q_len);
            const Tensor value_slots = full->values.slice(2, past, past + q_len);
            if constexpr (requires {
                            B::copy2(key_slots, key_states, value_slots, value_states);
                          }) {
              B::copy2(key_slots, key_states, value_slots, value_states);  // one launch for both
            } else {
              B::copy(key_slots, key_states);
              B::copy(value_slots, value_states);
            }
            full->seq_len = past + q_len;
            out = {full->key_view(), full->value_view()};
          } else {
            // Allocates before it writes; its ring writes come last and do not throw.
            out = std::get<Sliding>(staged).update(key_states, value_states,
                                                   options_.initial_capacity);
          }
          if (new_layer) {
            layers_.push_back(std::move(staged));  // capacity reserved above: does not throw
          } else {
            layers_[static_cast<std::size_t>(layer_idx)] = std::move(staged);
          }
          return out;
        });
  }

  /// Tokens layer_idx has seen (a sliding layer keeps fewer: transformers' cumulative length).
  std::int64_t get_seq_length(int layer_idx = 0) const override {
    KVCACHE_CHECK(layer_idx >= 0, "DynamicCache::get_seq_length: expected layer_idx >= 0, got ",
                  layer_idx);
    if (layer_idx >= num_layers()) return 0;
    return std::visit([](const auto& layer) { return layer.get_seq_length(); },
                      layers_[static_cast<std::size_t>(layer_idx)]);
  }

  std::int64_t get_max_cache_shape(int layer_idx = 0) const override {
    (void)layer_idx;
    return -1;
  }

  /// Full layer: (seen + q_len, 0). Sliding layer: (kept + q_len, seen - kept), kept = min(seen,
  /// window - 1), as transformers' DynamicSlidingWindowLayer. A layer not created yet: as the
  /// kind it will be, empty.
  MaskSizes get_mask_sizes(std::span<const std::int64_t> cache_position,
                           int layer_idx) const override {
    const auto q_len = static_cast<std::int64_t>(cache_position.size());
    if (layer_idx >= 0 && layer_idx < num_layers()) {
      if (const Sliding* s = std::get_if<Sliding>(&layers_[static_cast<std::size_t>(layer_idx)]))
        return s->get_mask_sizes(q_len);
    }
    return {get_seq_length(layer_idx) + q_len, 0};
  }

  int num_layers() const override { return static_cast<int>(layers_.size()); }

  /// The window of layer layer_idx when it is (or will be made) a sliding layer, else 0.
  std::int64_t sliding_window(int layer_idx) const {
    if (layer_idx >= 0 && layer_idx < num_layers()) {
      const Sliding* s = std::get_if<Sliding>(&layers_[static_cast<std::size_t>(layer_idx)]);
      return s ? s->window() : 0;
    }
    return configured_window(layer_idx);
  }

  /// Whether any layer is (or will be made) a sliding layer.
  bool has_sliding_layers() const {
    for (int l = 0; l < num_layers(); ++l)
      if (sliding_window(l) > 0) return true;
    return std::any_of(options_.sliding_windows.begin(), options_.sliding_windows.end(),
                       [](std::int64_t w) { return w > 0; });
  }

  void reset() override {
    for (LayerSlot& slot : layers_) {
      if (Layer* full = std::get_if<Layer>(&slot)) {
        full->seq_len = 0;
      } else {
        std::get<Sliding>(slot).reset();
      }
    }
  }

  /// Keeps the first max_length tokens seen. A sliding layer must still hold what its next step
  /// needs (the last window - 1 tokens before the cut): crop within its spare slots works after the
  /// window has filled, deeper is a kvcache::Error and no layer changes.
  void crop(std::int64_t max_length) override {
    detail::out_of_memory_as_error("DynamicCache::crop", [&]() {
      const char* where = "DynamicCache::crop";
      const std::int64_t target =
          max_length >= 0 ? max_length : detail::crop_target(max_length, get_seq_length(), where);
      for (const LayerSlot& slot : layers_) {
        if (const Sliding* s = std::get_if<Sliding>(&slot)) s->check_crop(target, where);
      }
      for (LayerSlot& slot : layers_) {
        if (Layer* full = std::get_if<Layer>(&slot)) {
          full->seq_len = std::min(full->seq_len, target);
        } else {
          std::get<Sliding>(slot).crop(target);
        }
      }
    });
  }

  // The base's braced-list overloads stay visible beside the overrides below.
  using Cache<B>::reorder_cache;
  using Cache<B>::batch_select_indices;
  void reorder_cache(std::span<const std::int64_t> beam_idx) override {
    detail::out_of_memory_as_error("DynamicCache::reorder_cache", [&]() {
      const std::int64_t batch = batch_size();
      KVCACHE_CHECK(batch < 0 || static_cast<std::int64_t>(beam_idx.size()) == batch,
                    "DynamicCache::reorder_cache: expected ", batch,
                    " beam indices (one per row), got ", beam_idx.size());
      check_rows(beam_idx, "reorder_cache");
      gather_batch(static_cast<std::int64_t>(beam_idx.size()),
                   [&](std::int64_t i) { return beam_idx[static_cast<std::size_t>(i)]; });
    });
  }

  void batch_repeat_interleave(std::int64_t repeats) override {
    detail::out_of_memory_as_error("DynamicCache::batch_repeat_interleave", [&]() {
      KVCACHE_CHECK(repeats >= 1,
                    "DynamicCache::batch_repeat_interleave: expected repeats >= 1, got ", repeats);
      const std::int64_t batch = batch_size();
      if (batch < 0) return;  // nothing held: nothing to repeat
      const std::int64_t rows =
          detail::checked_mul(batch, repeats, "DynamicCache::batch_repeat_interleave",
                              "the new batch size (batch x repeats)");
      gather_batch(rows, [&](std::int64_t i) { return i / repeats; });
    });
  }

  void batch_select_indices(std::span<const std::int64_t> indices) override {
    detail::out_of_memory_as_error("DynamicCache::batch_select_indices", [&]() {
      KVCACHE_CHECK(!indices.empty() || batch_size() < 0,
                    "DynamicCache::batch_select_indices: expected at least one index, got none");
      check_rows(indices, "batch_select_indices");
      gather_batch(static_cast<std::int64_t>(indices.size()),
                   [&](std::int64_t i) { return indices[static_cast<std::size_t>(i)]; });
    });
  }

  std::size_t nbytes() const override {
    std::size_t total = 0;
    for (const LayerSlot& slot : layers_) {
      if (const Layer* full = std::get_if<Layer>(&slot)) {
        total += full->key_view().nbytes() + full->value_view().nbytes();
      } else {
        total += std::get<Sliding>(slot).nbytes();
      }
    }
    return total;
  }

  std::size_t capacity_bytes() const override {
    std::size_t total = 0;
    for (const LayerSlot& slot : layers_) {
      if (const Layer* full = std::get_if<Layer>(&slot)) {
        total += full->keys.nbytes() + full->values.nbytes();
      } else {
        total += std::get<Sliding>(slot).capacity_bytes();
      }
    }
    return total;
  }

  /// Token slots layer `layer_idx` has allocated (a sliding layer: its ring's 2 x ring slots).
  std::int64_t capacity(int layer_idx = 0) const {
    if (layer_idx < 0 || layer_idx >= num_layers()) return 0;
    const LayerSlot& slot = layers_[static_cast<std::size_t>(layer_idx)];
    if (const Layer* full = std::get_if<Layer>(&slot)) return full->capacity();
    return 2 * std::get<Sliding>(slot).ring_capacity();
  }

  /// Grows every full layer's storage to hold at least `tokens` slots (the tokens held are kept),
  /// so the updates that follow, up to that length, neither reallocate nor move the storage.
  /// Layers not created yet (no update so far) are not affected: DynamicCacheOptions::
  /// initial_capacity sizes those; sliding layers are bounded by their window and skipped.
  /// Strong guarantee: all new storage is allocated before any layer changes.
  void reserve(std::int64_t tokens) {
    KVCACHE_CHECK(tokens >= 0, "DynamicCache::reserve: expected tokens >= 0, got ", tokens);
    std::vector<LayerSlot> grown = layers_;
    bool changed = false;
    for (LayerSlot& slot : grown) {
      Layer* layer = std::get_if<Layer>(&slot);
      if (!layer || !layer->keys.defined() || layer->capacity() >= tokens) continue;
      layer->grow_to(tokens);
      changed = true;
    }
    if (changed) layers_ = std::move(grown);
  }

  /// Layer `layer_idx`'s whole storage, keys and values [batch, num_kv_heads, capacity, head_dim]:
  /// slots [0, get_seq_length(layer_idx)) hold tokens, the rest are free. For kernels that write
  /// the next slots themselves (a decode step replayed from a CUDA graph), with mark_appended.
  /// Full-attention layers only.
  std::pair<Tensor, Tensor> storage(int layer_idx) const {
    KVCACHE_CHECK(layer_idx >= 0 && layer_idx < num_layers(),
                  "DynamicCache::storage: expected layer_idx in [0, ", num_layers(), "), got ",
                  layer_idx);
    const Layer& layer = full_layer(layer_idx, "DynamicCache::storage");
    return {layer.keys, layer.values};
  }

  /// Records that `tokens` more slots of every layer were written directly into storage() (by a
  /// replayed decode step), as update() would have left them. Every layer must be a full layer
  /// holding tokens, with room for them; else nothing changes and the call throws.
  void mark_appended(std::int64_t tokens) {
    KVCACHE_CHECK(tokens >= 0, "DynamicCache::mark_appended: expected tokens >= 0, got ", tokens);
    KVCACHE_CHECK(num_layers() > 0, "DynamicCache::mark_appended: the cache holds no layer");
    for (int l = 0; l < num_layers(); ++l) {
      const Layer& layer = full_layer(l, "DynamicCache::mark_appended");
      KVCACHE_CHECK(layer.seq_len > 0, "DynamicCache::mark_appended: expected layer ", l,
                    " to hold tokens already (an update first), got an empty layer");
      KVCACHE_CHECK(tokens <= layer.capacity() - layer.seq_len,
                    "DynamicCache::mark_appended: expected room for ", tokens,
                    " more token(s) in layer ", l, ", which holds ", layer.seq_len, " of ",
                    layer.capacity(), " slots");
    }
    for (LayerSlot& slot : layers_) std::get<Layer>(slot).seq_len += tokens;
  }

  /// Batch size of the rows held, or -1 while every layer is empty.
  std::int64_t batch_size() const {
    for (const LayerSlot& slot : layers_) {
      if (const Layer* full = std::get_if<Layer>(&slot)) {
        if (full->seq_len > 0) return full->keys.size(0);
      } else if (std::get<Sliding>(slot).get_seq_length() > 0) {
        return std::get<Sliding>(slot).batch();
      }
    }
    return -1;
  }

 private:
  // A full-attention layer: every token, slots [0, seq_len) of capacity-managed storage.
  struct Layer {
    Tensor keys;               // [batch, num_kv_heads, capacity, head_dim], owning, on B::kDevice
    Tensor values;             // same
    std::int64_t seq_len = 0;  // slots [0, seq_len) hold tokens

    std::int64_t get_seq_length() const { return seq_len; }
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
    Layer deep_copy(const char* where) const {
      Layer copy;
      copy.seq_len = seq_len;
      if (!keys.defined()) return copy;
      copy.keys = detail::allocate_storage<B>(keys.shape(), keys.dtype(), where);
      copy.values = detail::allocate_storage<B>(values.shape(), values.dtype(), where);
      if (seq_len > 0) {
        B::copy(copy.keys.slice(2, 0, seq_len), key_view());
        B::copy(copy.values.slice(2, 0, seq_len), value_view());
      }
      return copy;
    }
    // The same layer with `rows` batch rows, row i a copy of row row_of(i), in new storage.
    template <class RowOf>
    Layer gathered(std::int64_t rows, RowOf row_of, const char* where) const {
      Layer out = *this;
      const std::int64_t shape[4] = {rows, keys.size(1), capacity(), keys.size(3)};
      out.keys = detail::allocate_storage<B>(shape, keys.dtype(), where);
      out.values = detail::allocate_storage<B>(shape, values.dtype(), where);
      for (std::int64_t dst = 0; dst < rows; ++dst) {
        const std::int64_t src = row_of(dst);
        B::copy(out.keys.slice(0, dst, dst + 1).slice(2, 0, seq_len),
                key_view().slice(0, src, src + 1));
        B::copy(out.values.slice(0, dst, dst + 1).slice(2, 0, seq_len),
                value_view().slice(0, src, src + 1));
      }
      return out;
    }
  };
  using Sliding = SlidingWindowLayer<B>;
  using LayerSlot = std::variant<Layer, Sliding>;

  // The window options_ gives layer layer_idx (0: full attention).
  std::int64_t configured_window(int layer_idx) const {
    const auto l = static_cast<std::size_t>(layer_idx);
    return layer_idx >= 0 && l < options_.sliding_windows.size() ? options_.sliding_windows[l] : 0;
  }

  // A new, empty layer of the kind options_ gives layer_idx.
  LayerSlot make_layer(int layer_idx) const {
    const std::int64_t window = configured_window(layer_idx);
    if (window > 0) return Sliding(window, options_.sliding_spare_slots);
    return Layer{};
  }

  const Layer& full_layer(int layer_idx, const char* where) const {
    const Layer* layer = std::get_if<Layer>(&layers_[static_cast<std::size_t>(layer_idx)]);
    KVCACHE_CHECK(layer != nullptr, where, ": layer ", layer_idx,
                  " is a sliding-window layer (a ring of its last tokens, not slots [0, seq_len)); "
                  "only full-attention layers expose their storage");
    return *layer;
  }

  void check_states(const Tensor& k, const Tensor& v, int layer_idx) const {
    KVCACHE_CHECK(layer_idx >= 0 && layer_idx <= num_layers(),
                  "DynamicCache::update: expected layer_idx in [0, ", num_layers(),
                  "] (layers are added in order), got ", layer_idx);
    detail::check_kv_states(k, v, B::kDevice, "DynamicCache::update");
    if (layer_idx < num_layers()) {
      const LayerSlot& slot = layers_[static_cast<std::size_t>(layer_idx)];
      const bool holds = std::visit([](const auto& l) { return l.get_seq_length() > 0; }, slot);
      const bool matches = std::visit([&](const auto& l) { return l.layout_matches(k); }, slot);
      if (holds && !matches) {
        const Tensor held = std::visit(
            [](const auto& l) {
              if constexpr (std::is_same_v<std::decay_t<decltype(l)>, Layer>) {
                return l.key_view();
              } else {
                return l.kept().first;
              }
            },
            slot);
        KVCACHE_FAIL("DynamicCache::update: layer ", layer_idx, " holds [", held.size(0), ", ",
                     held.size(1), ", ", get_seq_length(layer_idx), ", ", held.size(3), "] ",
                     dtype_name(held.dtype()), "; expected new states [", held.size(0), ", ",
                     held.size(1), ", q_len, ", held.size(3), "] ", dtype_name(held.dtype()),
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
    std::vector<LayerSlot> rebuilt = layers_;
    for (LayerSlot& slot : rebuilt) {
      std::visit(
          [&](auto& layer) {
            if (layer.get_seq_length() == 0) return;
            layer = layer.gathered(rows, row_of, "DynamicCache");
          },
          slot);
    }
    layers_.swap(rebuilt);
  }

  std::unique_ptr<Cache<B>> clone_cache() const override {
    return detail::out_of_memory_as_error(
        "DynamicCache::clone",
        [&]() -> std::unique_ptr<Cache<B>> { return std::make_unique<DynamicCache>(clone()); });
  }

  DynamicCacheOptions options_;
  std::vector<LayerSlot> layers_;  // one per decoder layer seen, each of its own kind
};

extern template class DynamicCache<cpu::Backend>;

}  // namespace kvcache
