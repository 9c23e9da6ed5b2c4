// SinkCache: StreamingLLM's attention-sink cache (Xiao et al. 2023; transformers 4.x' SinkCache,
// dropped from transformers 5). Each layer keeps the first num_sink_tokens tokens (the "sinks"
// the softmax leans on) and the most recent window_length - num_sink_tokens ones, dropping the
// middle, so a generation runs on far past the window in memory that never grows past
// window_length tokens a layer.
//
// Positions (transformers 4.36's behaviour, which is StreamingLLM's). Every token is rotated at
// its index in the cache, not at its index in the text: the keys held are always at positions
// 0, 1, ..., stored - 1. When tokens are evicted the recent keys slide down to close the gap
// and are re-rotated by the shift (RoPE composes: R(p - e) = R(-e) R(p)), with cos/sin of the
// shift computed once per eviction in float64 from the model's inverse frequencies
// (SinkCacheOptions::rope_inv_freq, RotaryEmbedding::inv_freq(), so linear and llama3 scaling are
// covered) and rounded to float32; the rotation itself runs in float32, sixteen lanes at a time,
// fused with the slide (cpu::rotate_rows), and is rounded once to the storage dtype. The sinks
// never move and are never touched. The queries of a step get the positions its new keys get
// (rope_position_start(), which the model asks for when no position_ids are passed): with q_len new
// tokens and `stored` held,
//   stored + q_len <= window                  append:  new token i at position stored + i
//   q_len <= window - sinks (and it overflows) evict:   the oldest recent tokens leave first, the
//                                                       rest slide down; new token i at
//                                                       window - q_len + i (a decode step: the
//                                                       query at window - 1)
//   q_len >  window - sinks (a long prefill)  attend over all stored + q_len tokens (position
//                                             stored + i), then keep the sinks and the last
//                                             window - sinks of them, re-rotated.
// This differs from transformers 4.4x, which rotated the new keys at their text position while
// re-rotating the kept ones by -q_len (the stored positions then stop being contiguous).
//
// Slots, as this repo's sliding layers count them (transformers' SinkCache counted stored tokens
// and cropped the mask instead): get_seq_length() is the number of tokens seen, cache_position and
// the attention mask keep growing ([batch, seen + q_len]), and get_mask_sizes gives (kv_length,
// kv_offset) with kv_length the keys the step attends over (the update's keys: sinks, recent,
// new) and kv_offset = seen + q_len - kv_length, so that the new tokens' slots are their
// cache_position and every held key precedes them (causal order within the step holds). The mask
// columns the attention reads are the last kv_length ones: a padded batch is not served (the
// sinks' padding columns would be misread); generate() with one unpadded row or equal rows is.
// evicts_tokens() is true, so the attention module accepts keys from kv_offset > 0 under a
// full-attention model. get_max_cache_shape() is -1: any number of tokens can be fed.
//
// Storage per layer: keys and values [batch, num_kv_heads, window_length, head_dim] in the
// states' dtype (float32, float16 or bfloat16), allocated on the layer's first update; an update
// returns views of slots [0, kv_length), valid until the layer's next update.
//
// On the GPU (SinkCache<cuda::Backend>) the same steps run as kernels: a slide copies the recent
// slots to a scratch buffer (keys and values in one launch) and writes them back shifted, the keys
// through cuda::rotate_rows, which computes cpu::rotate_rows' float32 expression, so both backends
// hold the same bits. The shift's cos/sin go to the device once per shift length (a decode step
// always shifts by one, so once a generation) and are kept. A decode step over a sink cache runs
// kernel by kernel (no CUDA graph: the slide's length changes until the window has filled).
//
// Every mutating call checks its input and allocates before it writes, so a call that throws
// leaves the cache as it was. Copies are explicit (clone()). Not thread-safe.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "kvcache/backend/cpu.hpp"
#include "kvcache/cache/cache.hpp"
#include "kvcache/error.hpp"

namespace kvcache {

/// The window of a SinkCache (transformers 4.36's SinkCache arguments) and the RoPE it re-rotates
/// with.
struct SinkCacheOptions {
  /// Tokens kept per layer, sinks included (transformers' window_length).
  std::int64_t window_length = 0;
  /// Leading tokens kept for good (transformers' num_sink_tokens); < window_length.
  std::int64_t num_sink_tokens = 4;
  /// The model's RoPE inverse frequencies (head_dim / 2 of them, after scaling: what
  /// RotaryEmbedding::inv_freq() gives), used to re-rotate the kept keys. Empty: keys are not
  /// re-rotated (a model without RoPE).
  std::vector<float> rope_inv_freq{};
};

/// StreamingLLM's cache (transformers 4.36's SinkCache): the first num_sink_tokens tokens
/// and the most recent window_length - num_sink_tokens, the recent keys re-rotated to their new
/// cache positions as older ones are evicted. Memory fixed at window_length per layer. CPU and
/// CUDA.
template <CacheBackend B = cpu::Backend>
class SinkCache final : public Cache<B> {
 public:
  /// A cache keeping `options.window_length` tokens per layer; throws kvcache::Error unless
  /// 0 <= num_sink_tokens < window_length.
  explicit SinkCache(SinkCacheOptions options) : options_(std::move(options)) {
    check_options(options_);
  }
  SinkCache(const SinkCache&) = delete;
  SinkCache& operator=(const SinkCache&) = delete;
  /// Moves the storage; the moved-from cache is empty.
  SinkCache(SinkCache&&) noexcept = default;
  /// Moves the storage; the moved-from cache is empty.
  SinkCache& operator=(SinkCache&&) noexcept = default;

  /// The options' checks: window_length >= 1, 0 <= num_sink_tokens < window_length.
  static void check_options(const SinkCacheOptions& o) {
    KVCACHE_CHECK(o.window_length >= 1 && o.window_length <= (std::int64_t{1} << 40),
                  "SinkCache: expected window_length in [1, 2^40], got ", o.window_length);
    KVCACHE_CHECK(o.num_sink_tokens >= 0 && o.num_sink_tokens < o.window_length,
                  "SinkCache: expected num_sink_tokens in [0, window_length = ", o.window_length,
                  "), got ", o.num_sink_tokens);
  }

  /// The options it was built with.
  const SinkCacheOptions& options() const { return options_; }
  /// Tokens kept per layer, sinks included.
  std::int64_t window_length() const { return options_.window_length; }
  /// Leading tokens kept for good.
  std::int64_t num_sink_tokens() const { return options_.num_sink_tokens; }

  /// A deep copy: same options, contents and capacity in storage of its own.
  SinkCache clone() const {
    return detail::out_of_memory_as_error("SinkCache::clone", [&]() -> SinkCache {
      SinkCache out(options_);
      out.layers_.reserve(layers_.size());
      for (const Layer& l : layers_)
        out.layers_.push_back(l.gathered(l.batch(), identity, "clone"));
      return out;
    });
  }

  std::pair<Tensor, Tensor> update(const Tensor& key_states, const Tensor& value_states,
                                   int layer_idx, const CacheKwargs& kwargs = {}) override {
    return detail::out_of_memory_as_error("SinkCache::update", [&]() -> std::pair<Tensor, Tensor> {
      (void)kwargs;
      const char* where = "SinkCache::update";
      check_states(key_states, value_states, layer_idx);
      const std::int64_t W = options_.window_length, S = options_.num_sink_tokens;
      const std::int64_t q = key_states.size(2);
      Layer next =
          layer_idx < num_layers() ? layers_[static_cast<std::size_t>(layer_idx)] : Layer{};
      const std::int64_t n = next.stored;
      const std::int64_t seen = detail::checked_add(next.seen, q, where, "the tokens seen");
      // 1. Allocate (may throw): storage on first use (or for a new layout of an empty layer), and
      // the step's own output when it attends over more than the window.
      if (!next.layout_matches(key_states)) {
        const std::int64_t shape[4] = {key_states.size(0), key_states.size(1), W,
                                       key_states.size(3)};
        next.keys = detail::allocate_storage<B>(shape, key_states.dtype(), where);
        next.values = detail::allocate_storage<B>(shape, key_states.dtype(), where);
      }
      const bool long_step = n + q > W && q > W - S;
      Tensor out_k, out_v;
      if (long_step) {
        const std::int64_t shape[4] = {key_states.size(0), key_states.size(1), n + q,
                                       key_states.size(3)};
        out_k = detail::allocate_storage<B>(shape, key_states.dtype(), where);
        out_v = detail::allocate_storage<B>(shape, key_states.dtype(), where);
      }
      if (layer_idx == num_layers()) layers_.reserve(layers_.size() + 1);
      const std::int64_t evicted = n + q > W ? n + q - W : 0;
      const Rotation& rot = rotation(evicted, key_states.size(3));  // cos/sin of the shift, once
      // A slide on the GPU goes through a scratch copy of the slots it moves (a kernel may not
      // read slots another block of it writes).
      Tensor scratch_k, scratch_v;
      if constexpr (B::kDevice != Device::kCpu) {
        const std::int64_t moved = n - (S + evicted);
        if (!long_step && evicted > 0 && moved > 0) {
          const std::int64_t shape[4] = {key_states.size(0), key_states.size(1), moved,
                                         key_states.size(3)};
          scratch_k = detail::allocate_storage<B>(shape, key_states.dtype(), where);
          scratch_v = detail::allocate_storage<B>(shape, key_states.dtype(), where);
        }
      }
      // 2. Write (nothing throws from here on). A shared storage is written in place: the old state
      // is gone only through these writes, which cannot fail.
      std::int64_t kv_length = 0;
      if (n + q <= W) {
        B::copy(next.keys.slice(2, n, n + q), key_states);
        B::copy(next.values.slice(2, n, n + q), value_states);
        next.stored = kv_length = n + q;
      } else if (!long_step) {
        const std::int64_t e = n + q - W;  // evicted: recent slots [S, S + e)
        shift_down(next, S + e, n, e, rot, scratch_k, scratch_v);
        B::copy(next.keys.slice(2, W - q, W), key_states);
        B::copy(next.values.slice(2, W - q, W), value_states);
        next.stored = kv_length = W;
      } else {
        // Attend over everything stored and new; keep the sinks and the last W - S of them.
        if (n > 0) {
          B::copy(out_k.slice(2, 0, n), next.keys.slice(2, 0, n));
          B::copy(out_v.slice(2, 0, n), next.values.slice(2, 0, n));
        }
        B::copy(out_k.slice(2, n, n + q), key_states);
        B::copy(out_v.slice(2, n, n + q), value_states);
        const std::int64_t total = n + q, e = total - W;
        B::copy(next.keys.slice(2, 0, S), out_k.slice(2, 0, S));
        B::copy(next.values.slice(2, 0, S), out_v.slice(2, 0, S));
        B::copy(next.keys.slice(2, S, W), out_k.slice(2, S + e, total));
        B::copy(next.values.slice(2, S, W), out_v.slice(2, S + e, total));
        rerotate(next.keys, S, W, rot);
        next.stored = W;
        kv_length = total;
      }
      next.seen = seen;
      // 3. Commit.
      if (layer_idx == num_layers()) {
        layers_.push_back(std::move(next));
      } else {
        layers_[static_cast<std::size_t>(layer_idx)] = std::move(next);
      }
      if (long_step) return {out_k, out_v};
      const Layer& l = layers_[static_cast<std::size_t>(layer_idx)];
      return {l.keys.slice(2, 0, kv_length), l.values.slice(2, 0, kv_length)};
    });
  }

  /// Tokens seen by the layer (its slots), not tokens held: see stored_length().
  std::int64_t get_seq_length(int layer_idx = 0) const override {
    return has_layer(layer_idx) ? layers_[static_cast<std::size_t>(layer_idx)].seen : 0;
  }

  /// Tokens the layer holds: min(seen, window_length) (transformers' SinkCache.get_seq_length).
  std::int64_t stored_length(int layer_idx = 0) const {
    return has_layer(layer_idx) ? layers_[static_cast<std::size_t>(layer_idx)].stored : 0;
  }

  /// -1: the cache takes any number of tokens (its memory is bounded by window_length).
  std::int64_t get_max_cache_shape(int layer_idx = 0) const override {
    (void)layer_idx;
    return -1;
  }

  /// (kv_length, seen + q_len - kv_length): kv_length = stored + q_len while that fits the window
  /// or the step is longer than window - sinks, else window_length.
  MaskSizes get_mask_sizes(std::span<const std::int64_t> cache_position,
                           int layer_idx) const override {
    const auto q = static_cast<std::int64_t>(cache_position.size());
    const std::int64_t n = stored_length(layer_idx), seen = get_seq_length(layer_idx);
    const std::int64_t W = options_.window_length, S = options_.num_sink_tokens;
    const std::int64_t kv_length = (n + q <= W || q > W - S) ? n + q : W;
    return {kv_length, seen + q - kv_length};
  }

  /// The position of the next step's first new token: stored + 0 unless the step evicts, then
  /// window_length - q_len (see the file comment).
  std::optional<std::int64_t> rope_position_start(std::int64_t q_len,
                                                  int layer_idx = 0) const override {
    const std::int64_t n = stored_length(layer_idx);
    const std::int64_t W = options_.window_length, S = options_.num_sink_tokens;
    if (n + q_len <= W || q_len > W - S) return n;
    return W - q_len;
  }

  bool evicts_tokens() const override { return true; }

  int num_layers() const override { return static_cast<int>(layers_.size()); }

  void reset() override {
    for (Layer& l : layers_) l.stored = l.seen = 0;
  }

  /// Keeps the first max_length tokens seen. Before any eviction every crop works; after, the
  /// last tokens can be dropped while they are recent ones still held (at most stored - sinks of
  /// them), or everything past the sinks (max_length <= num_sink_tokens). A crop into the evicted
  /// middle is a kvcache::Error and nothing changes.
  void crop(std::int64_t max_length) override {
    detail::out_of_memory_as_error("SinkCache::crop", [&]() {
      const char* where = "SinkCache::crop";
      const std::int64_t S = options_.num_sink_tokens;
      std::vector<std::pair<std::int64_t, std::int64_t>> next;  // (stored, seen) per layer
      // One target for every layer, as DynamicCache and transformers take it: a negative
      // max_length drops from get_seq_length() (layer 0's tokens; 0 with no layer yet).
      const std::int64_t all =
          max_length >= 0 ? max_length : detail::crop_target(max_length, get_seq_length(), where);
      for (const Layer& l : layers_) {
        const std::int64_t target = std::min(all, l.seen);
        const std::int64_t drop = l.seen - target;
        if (drop == 0) {
          next.emplace_back(l.stored, l.seen);
        } else if (l.seen == l.stored || target <= S) {
          next.emplace_back(std::min(l.stored, target), target);
        } else {
          KVCACHE_CHECK(drop <= l.stored - S, where, "(", max_length, "): the layer saw ", l.seen,
                        " tokens and holds the ", S, " sinks and the last ", l.stored - S,
                        "; a crop to ", target,
                        " tokens needs tokens it has evicted (at most the held recent ones can be "
                        "dropped, or everything past the sinks)");
          next.emplace_back(l.stored - drop, target);
        }
      }
      for (std::size_t i = 0; i < layers_.size(); ++i) {
        layers_[i].stored = next[i].first;
        layers_[i].seen = next[i].second;
      }
    });
  }

  using Cache<B>::reorder_cache;
  using Cache<B>::batch_select_indices;
  void reorder_cache(std::span<const std::int64_t> beam_idx) override {
    detail::out_of_memory_as_error("SinkCache::reorder_cache", [&]() {
      gather(detail::reorder_rows(beam_idx, batch_size(), "SinkCache"), "reorder_cache");
    });
  }
  void batch_repeat_interleave(std::int64_t repeats) override {
    detail::out_of_memory_as_error("SinkCache::batch_repeat_interleave", [&]() {
      gather(detail::repeat_rows(repeats, batch_size(), "SinkCache"), "batch_repeat_interleave");
    });
  }
  void batch_select_indices(std::span<const std::int64_t> indices) override {
    detail::out_of_memory_as_error("SinkCache::batch_select_indices", [&]() {
      gather(detail::select_rows(indices, batch_size(), "SinkCache"), "batch_select_indices");
    });
  }

  std::size_t nbytes() const override {
    std::size_t total = 0;
    for (const Layer& l : layers_) {
      if (l.keys.defined()) total += 2 * l.keys.slice(2, 0, l.stored).nbytes();
    }
    return total;
  }
  std::size_t capacity_bytes() const override {
    std::size_t total = 0;
    for (const Layer& l : layers_) {
      if (l.keys.defined()) total += l.keys.nbytes() + l.values.nbytes();
    }
    return total;
  }

  /// Layer `layer_idx`'s storage, keys and values [batch, num_kv_heads, window_length, head_dim]:
  /// slots [0, stored_length()) hold tokens at positions 0, 1, ... For tests and inspection.
  std::pair<Tensor, Tensor> storage(int layer_idx) const {
    KVCACHE_CHECK(has_layer(layer_idx), "SinkCache::storage: expected layer_idx in [0, ",
                  num_layers(), "), got ", layer_idx);
    const Layer& l = layers_[static_cast<std::size_t>(layer_idx)];
    return {l.keys, l.values};
  }

  /// Batch rows held, or -1 while every layer is empty.
  std::int64_t batch_size() const {
    for (const Layer& l : layers_) {
      if (l.stored > 0) return l.batch();
    }
    return -1;
  }

 private:
  struct Layer {
    Tensor keys;    // [batch, num_kv_heads, window_length, head_dim], owning; slots [0, stored)
    Tensor values;  // same; slot j holds the token rotated at position j
    std::int64_t stored = 0;  // tokens held
    std::int64_t seen = 0;    // tokens seen (slots)

    std::int64_t batch() const { return keys.defined() ? keys.size(0) : 0; }
    bool layout_matches(const Tensor& s) const {
      return keys.defined() && keys.dtype() == s.dtype() && keys.size(0) == s.size(0) &&
             keys.size(1) == s.size(1) && keys.size(3) == s.size(3);
    }
    template <class RowOf>
    Layer gathered(std::int64_t rows, RowOf row_of, const char* where) const {
      Layer out = *this;
      if (!keys.defined()) return out;
      const std::int64_t shape[4] = {rows, keys.size(1), keys.size(2), keys.size(3)};
      out.keys = detail::allocate_storage<B>(shape, keys.dtype(), where);
      out.values = detail::allocate_storage<B>(shape, values.dtype(), where);
      if (stored == 0) return out;
      for (std::int64_t dst = 0; dst < rows; ++dst) {
        const std::int64_t src = row_of(dst);
        B::copy(out.keys.slice(0, dst, dst + 1).slice(2, 0, stored),
                keys.slice(0, src, src + 1).slice(2, 0, stored));
        B::copy(out.values.slice(0, dst, dst + 1).slice(2, 0, stored),
                values.slice(0, src, src + 1).slice(2, 0, stored));
      }
      return out;
    }
  };
  static std::int64_t identity(std::int64_t i) { return i; }

  bool has_layer(int layer_idx) const { return layer_idx >= 0 && layer_idx < num_layers(); }

  void check_states(const Tensor& k, const Tensor& v, int layer_idx) const {
    const char* where = "SinkCache::update";
    KVCACHE_CHECK(layer_idx >= 0 && layer_idx <= num_layers(), where,
                  ": expected layer_idx in [0, ", num_layers(),
                  "] (layers are added in order), got ", layer_idx);
    detail::check_kv_states(k, v, B::kDevice, where);
    const auto half = static_cast<std::size_t>(k.size(3) / 2);
    KVCACHE_CHECK(options_.rope_inv_freq.empty() ||
                      (k.size(3) % 2 == 0 && options_.rope_inv_freq.size() == half),
                  where, ": expected head_dim / 2 = ", half,
                  " RoPE inverse frequencies for head_dim ", k.size(3), ", got ",
                  options_.rope_inv_freq.size());
    if (has_layer(layer_idx)) {
      const Layer& l = layers_[static_cast<std::size_t>(layer_idx)];
      KVCACHE_CHECK(l.stored == 0 || l.layout_matches(k), where, ": layer ", layer_idx, " holds ",
                    l.keys.shape_string(), " ", dtype_name(l.keys.dtype()),
                    " storage; expected new states of that layout, got ", k.describe());
    }
    const std::int64_t batch = batch_size();
    KVCACHE_CHECK(batch < 0 || k.size(0) == batch, where, ": expected batch ", batch,
                  " (the batch the cache holds), got ", k.size(0));
  }

  // cos and sin of a = -e * inv_freq[i] for the head_dim / 2 frequencies (computed in float64,
  // rounded once to float32); empty without RoPE or for e == 0. On the GPU also on the device,
  // as one [2, head_dim / 2] float32 tensor (cos, then sin).
  struct Rotation {
    std::vector<float> cos, sin;
    Tensor table;  // on the device (GPU backends only)
    std::int64_t shift = 0, head_dim = 0;
  };
  // The rotation by -e for head_dim d, made once per (e, d) and kept: a decode step always
  // shifts by one. Not part of the cache's contents (a failed call may leave a new one here).
  const Rotation& rotation(std::int64_t e, std::int64_t d) {
    static const Rotation none;
    if (options_.rope_inv_freq.empty() || e == 0) return none;
    if (rotation_.shift == e && rotation_.head_dim == d) return rotation_;
    Rotation rot;
    const std::int64_t half = d / 2;
    rot.cos.resize(static_cast<std::size_t>(half));
    rot.sin.resize(rot.cos.size());
    for (std::int64_t i = 0; i < half; ++i) {
      const double a = -static_cast<double>(e) *
                       static_cast<double>(options_.rope_inv_freq[static_cast<std::size_t>(i)]);
      rot.cos[static_cast<std::size_t>(i)] = static_cast<float>(std::cos(a));
      rot.sin[static_cast<std::size_t>(i)] = static_cast<float>(std::sin(a));
    }
    if constexpr (B::kDevice != Device::kCpu) {
      Tensor host = Tensor::empty({2, half}, DType::kFloat32);
      std::copy(rot.cos.begin(), rot.cos.end(), host.data_as<float>());
      std::copy(rot.sin.begin(), rot.sin.end(), host.data_as<float>() + half);
      rot.table = B::upload(host);
    }
    rot.shift = e;
    rot.head_dim = d;
    rotation_ = std::move(rot);
    return rotation_;
  }

  // Moves slots [from, to) of keys and values down by e slots (their tokens' positions drop by e),
  // the keys re-rotated by -e as they move (one pass: read, rotate, write). Ascending order: each
  // destination slot was read already.
  // On the GPU through scratch_k / scratch_v [batch, heads, to - from, head_dim].
  void shift_down(Layer& l, std::int64_t from, std::int64_t to, std::int64_t e, const Rotation& rot,
                  const Tensor& scratch_k, const Tensor& scratch_v) const {
    const std::int64_t count = to - from;
    if (count <= 0) return;
    if constexpr (B::kDevice != Device::kCpu) {
      const Tensor dst_k = l.keys.slice(2, from - e, to - e);
      const Tensor dst_v = l.values.slice(2, from - e, to - e);
      B::copy2(scratch_k, l.keys.slice(2, from, to), scratch_v, l.values.slice(2, from, to));
      if (rot.cos.empty()) {
        B::copy2(dst_k, scratch_k, dst_v, scratch_v);
      } else {
        B::rotate_rows(scratch_k, dst_k, rot.table);
        B::copy(dst_v, scratch_v);
      }
      return;
    }
    const std::int64_t rows = l.keys.size(0) * l.keys.size(1), W = l.keys.size(2),
                       d = l.keys.size(3);
    const std::size_t es = dtype_size(l.keys.dtype());
    auto* kb = static_cast<unsigned char*>(l.keys.data());  // contiguous [rows, W, d]
    auto* vb = static_cast<unsigned char*>(l.values.data());
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::size_t dst = static_cast<std::size_t>((r * W + from - e) * d) * es;
      const std::size_t src = static_cast<std::size_t>((r * W + from) * d) * es;
      const std::size_t bytes = static_cast<std::size_t>(count * d) * es;
      std::memmove(vb + dst, vb + src, bytes);
      if (rot.cos.empty()) {
        std::memmove(kb + dst, kb + src, bytes);
      } else {
        cpu::rotate_rows(kb + src, kb + dst, l.keys.dtype(), count, d, d, d, rot.cos.data(),
                         rot.sin.data());
      }
    }
  }

  // Rotates the keys of slots [from, to) of contiguous storage [b, h, W, d] by -e positions in
  // place: (x1, x2) -> (x1 cos a - x2 sin a, x2 cos a + x1 sin a), the pairs (i, i + d/2) of
  // rotate_half, in float32 (cpu::rotate_rows), rounded once to the storage dtype.
  static void rerotate(const Tensor& keys, std::int64_t from, std::int64_t to,
                       const Rotation& rot) {
    if (rot.cos.empty() || to <= from) return;
    if constexpr (B::kDevice != Device::kCpu) {
      const Tensor slots = keys.slice(2, from, to);
      B::rotate_rows(slots, slots, rot.table);  // in place: each pair is read, then written
      return;
    }
    const std::int64_t rows = keys.size(0) * keys.size(1), W = keys.size(2), d = keys.size(3);
    const std::size_t es = dtype_size(keys.dtype());
    auto* base = static_cast<unsigned char*>(keys.data());
    for (std::int64_t r = 0; r < rows; ++r) {
      unsigned char* row = base + static_cast<std::size_t>((r * W + from) * d) * es;
      cpu::rotate_rows(row, row, keys.dtype(), to - from, d, d, d, rot.cos.data(), rot.sin.data());
    }
  }

  template <class Rows>
  void gather(const Rows& rows, const char* op) {
    const std::int64_t batch = batch_size();
    if (batch < 0) return;
    for (std::size_t i = 0; i < rows.size(); ++i) {
      KVCACHE_CHECK(rows[i] >= 0 && rows[i] < batch, "SinkCache::", op,
                    ": expected indices in [0, ", batch, "), got ", rows[i], " at position ", i);
    }
    std::vector<Layer> rebuilt;
    rebuilt.reserve(layers_.size());
    for (const Layer& l : layers_) {
      rebuilt.push_back(l.stored == 0
                            ? l
                            : l.gathered(
                                  static_cast<std::int64_t>(rows.size()),
                                  [&](std::int64_t i) { return rows[static_cast<std::size_t>(i)]; },
                                  "SinkCache"));
    }
    layers_.swap(rebuilt);
  }

  std::unique_ptr<Cache<B>> clone_cache() const override {
    return detail::out_of_memory_as_error("SinkCache::clone", [&]() -> std::unique_ptr<Cache<B>> {
      return std::make_unique<SinkCache>(clone());
    });
  }

  SinkCacheOptions options_;
  std::vector<Layer> layers_;  // one per decoder layer seen
  Rotation rotation_;          // the last shift's cos/sin (rotation())
};

extern template class SinkCache<cpu::Backend>;

}  // namespace kvcache
