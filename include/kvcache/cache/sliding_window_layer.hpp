// SlidingWindowLayer: one decoder layer's cache for sliding-window attention (Mistral; Qwen2's
// windowed layers), transformers' DynamicSlidingWindowLayer without its copies.
//
// Where it sits. A cache holds one layer object per decoder layer, each of its own kind:
// DynamicCache (dynamic_cache.hpp) makes a full-attention layer (every token kept) or, for the
// layers DynamicCacheOptions::sliding_windows names, one of these. The attention module asks the
// cache, and so the layer, what to attend to: get_mask_sizes gives (kv_length, kv_offset), update
// returns kv_length keys and values starting at absolute slot kv_offset. Which keys a query sees
// (slot in (q - window, q], plus the causal and padding rules) is the model's rule
// (AttentionOptions::sliding_window, from its config), applied by the attention kernel; the layer
// only decides which tokens stay stored. A full-attention layer under a windowed model is
// therefore exact too (it keeps more than needed); a layer that dropped keys a query still sees is
// a clear error in the attention module, never a silently different result.
//
// Semantics (transformers'): get_seq_length() counts every token the layer has seen (its
// cumulative length, not what it keeps), and after each update the layer keeps at least the last
// window - 1 tokens, which with the next step's q_len new ones are what that step attends over:
// get_mask_sizes(q_len) = (kept + q_len, seen - kept), kept = min(seen, window - 1).
//
// Storage: a mirrored ring. keys and values are [batch, num_kv_heads, 2 * ring, head_dim]; token
// t is written at slot t % ring and again at t % ring + ring, so any ring consecutive tokens lie
// in one contiguous run of slots, and the keys a step attends over are one strided view the CPU
// kernel reads in place. An update writes only its new tokens (twice): O(new tokens) a step, no
// roll or shift. ring grows like a DynamicCache (1.5x, at least what the step needs) up to
// window - 1 + spare_slots, so a short conversation under a long window does not allocate the
// whole window. The spare slots keep a few tokens beyond window - 1, so crop() can drop the last
// few tokens after the window has filled (speculative decoding's rollback; transformers' layer
// refuses every crop once full, #46629): crop to n needs the n's last window - 1 tokens still
// held, else it is a kvcache::Error and nothing changes. A step of more tokens than the ring can
// hold alongside the kept ones (a prefill longer than the window) returns fresh storage holding
// kept + new (one copy of those) and stores the last of them in the ring.
//
// Views returned by update() and kept() alias the ring: the next update of the layer may overwrite
// their slots (the ring reuses them), so use them before the next update or copy them.
//
// Value semantics like a Tensor: copying a layer object shares its storage (DynamicCache copies
// layer objects to stage a change and commits by assignment); deep_copy() allocates its own.
// Every mutating call checks its input and allocates before it writes, so a call that throws
// leaves the layer as it was. Not thread-safe.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#include "kvcache/cache/cache.hpp"
#include "kvcache/error.hpp"

namespace kvcache {

/// One sliding-window layer of a DynamicCache (transformers' DynamicSlidingWindowLayer): a
/// mirrored ring of window - 1 + spare_slots tokens, written in O(new tokens) a step.
template <CacheBackend B>
class SlidingWindowLayer {
 public:
  /// Spare slots kept beyond window - 1 unless told otherwise: crop() can drop this many of the
  /// last tokens once the window has filled.
  static constexpr std::int64_t kDefaultSpareSlots = 8;

  /// A layer for a window of `window` tokens (each query sees itself and the window - 1 slots
  /// before it), keeping window - 1 + spare_slots tokens at most.
  explicit SlidingWindowLayer(std::int64_t window, std::int64_t spare_slots = kDefaultSpareSlots)
      : window_(window), spare_(spare_slots) {
    KVCACHE_CHECK(window >= 1, "SlidingWindowLayer: expected a window >= 1, got ", window);
    KVCACHE_CHECK(spare_slots >= 0 && spare_slots <= (std::int64_t{1} << 40) - window,
                  "SlidingWindowLayer: expected spare_slots >= 0 (and window + spare_slots "
                  "below 2^40), got ",
                  spare_slots, " for window ", window);
    KVCACHE_CHECK(window - 1 + spare_slots >= 1,
                  "SlidingWindowLayer: a window of 1 with no spare slot holds nothing; expected "
                  "spare_slots >= 1, got ",
                  spare_slots);
  }

  /// The attention window W (a query sees the W - 1 keys before it and itself).
  std::int64_t window() const { return window_; }
  /// Slots kept beyond window - 1, which crop() can roll back after the window has filled.
  std::int64_t spare_slots() const { return spare_; }
  /// Tokens held at most: window - 1 + spare_slots.
  std::int64_t max_held() const { return window_ - 1 + spare_; }
  /// Token slots of the ring allocated so far (the storage has twice as many).
  std::int64_t ring_capacity() const { return ring_; }

  /// Tokens seen (transformers' cumulative_length), not tokens kept.
  std::int64_t get_seq_length() const { return seen_; }
  /// Absolute slot of the oldest token still held.
  std::int64_t first_held() const { return first_; }
  /// Tokens held: absolute slots [first_held(), get_seq_length()).
  std::int64_t held() const { return seen_ - first_; }
  /// Tokens the next step attends over besides its own: min(seen, window - 1).
  std::int64_t kept_length() const { return std::min(seen_, window_ - 1); }
  /// Batch rows of the storage (0 before the first update).
  std::int64_t batch() const { return keys_.defined() ? keys_.size(0) : 0; }

  /// (kept + q_len, seen - kept): the keys the next update of q_len tokens returns.
  MaskSizes get_mask_sizes(std::int64_t q_len) const {
    const std::int64_t kept = kept_length();
    return {kept + q_len, seen_ - kept};
  }

  /// Whether states of this layout ([batch, heads, *, head_dim], dtype) fit the storage.
  bool layout_matches(const Tensor& states) const {
    return keys_.defined() && keys_.dtype() == states.dtype() && keys_.size(0) == states.size(0) &&
           keys_.size(1) == states.size(1) && keys_.size(3) == states.size(3);
  }

  /// Stores key_states/value_states [batch, num_kv_heads, q_len, head_dim] (checked by the
  /// caller: detail::check_kv_states, and layout_matches while the layer has seen tokens) and
  /// returns the kept tokens followed by the new ones, [batch, num_kv_heads, kept + q_len,
  /// head_dim]: views of the ring, or fresh storage when they do not fit in it together.
  /// `initial_capacity` sizes the ring's first allocation (capped at max_held()).
  std::pair<Tensor, Tensor> update(const Tensor& key_states, const Tensor& value_states,
                                   std::int64_t initial_capacity = 0) {
    const char* where = "SlidingWindowLayer::update";
    const std::int64_t q_len = key_states.size(2);
    const std::int64_t kept = kept_length();
    const std::int64_t after = detail::checked_add(seen_, q_len, where, "the tokens seen");
    const bool fits = layout_matches(key_states);
    KVCACHE_CHECK(fits || seen_ == 0, where, ": expected new states laid out like the ",
                  keys_.defined() ? keys_.shape_string() : std::string("[]"),
                  " storage of a layer that has seen tokens, got ", key_states.describe());

    // 1. Allocate (may throw): a new ring when there is none, the layout changed, or it must grow.
    Tensor keys = keys_, values = values_;
    std::int64_t ring = ring_;
    const bool grow = fits && ring_ < max_held() && after > ring_;
    if (!fits || grow) {
      ring = std::min(max_held(), std::max({after, std::min(initial_capacity, max_held()),
                                            ring_ + ring_ / 2, std::int64_t{16}}));
      const std::int64_t shape[4] = {key_states.size(0), key_states.size(1), 2 * ring,
                                     key_states.size(3)};
      keys = detail::allocate_storage<B>(shape, key_states.dtype(), where);
      values = detail::allocate_storage<B>(shape, key_states.dtype(), where);
    }
    const std::int64_t out_len = kept + q_len;
    const bool direct = out_len <= ring;  // the kept tokens survive the new writes
    Tensor out_keys, out_values;
    if (!direct) {
      const std::int64_t shape[4] = {key_states.size(0), key_states.size(1), out_len,
                                     key_states.size(3)};
      out_keys = detail::allocate_storage<B>(shape, key_states.dtype(), where);
      out_values = detail::allocate_storage<B>(shape, key_states.dtype(), where);
    }

    // 2. Write. Into fresh storage first (the old state is untouched until the commit), then into
    // the ring (which may overwrite slots of tokens the old state held: nothing throws after).
    const std::int64_t first = first_;  // 0 whenever seen_ is (a fresh or reset layer)
    if (grow && held() > 0) {
      write(keys, values, ring, first_, held_view(keys_, first_, held()),
            held_view(values_, first_, held()));
    }
    if (!direct) {
      if (kept > 0) {
        B::copy(out_keys.slice(2, 0, kept), held_view(keys, seen_ - kept, kept, ring));
        B::copy(out_values.slice(2, 0, kept), held_view(values, seen_ - kept, kept, ring));
      }
      if (q_len > 0) {
        B::copy(out_keys.slice(2, kept, out_len), key_states);
        B::copy(out_values.slice(2, kept, out_len), value_states);
      }
    }
    const std::int64_t stored = std::min(q_len, ring);
    if (stored > 0) {
      write(keys, values, ring, after - stored, key_states.slice(2, q_len - stored, q_len),
            value_states.slice(2, q_len - stored, q_len));
    }

    // 3. Commit.
    keys_ = std::move(keys);
    values_ = std::move(values);
    ring_ = ring;
    seen_ = after;
    first_ = std::max(first, after - ring);
    if (direct) {
      return {held_view(keys_, after - out_len, out_len),
              held_view(values_, after - out_len, out_len)};
    }
    return {out_keys, out_values};
  }

  /// The kept tokens, [batch, num_kv_heads, kept_length(), head_dim] views of the ring (what
  /// transformers' layer.keys / layer.values hold; the legacy format). Undefined before the first
  /// update.
  std::pair<Tensor, Tensor> kept() const {
    if (!keys_.defined()) return {};
    const std::int64_t n = kept_length();
    return {held_view(keys_, seen_ - n, n), held_view(values_, seen_ - n, n)};
  }

  /// Every token held, [batch, num_kv_heads, held(), head_dim] views (slots [first_held(), seen)).
  std::pair<Tensor, Tensor> held_tokens() const {
    if (!keys_.defined()) return {};
    return {held_view(keys_, first_, held()), held_view(values_, first_, held())};
  }

  /// Throws unless crop(target) can keep what the next step needs: the last min(target, window -
  /// 1) tokens before slot target must still be held. target >= seen is always fine (no change).
  void check_crop(std::int64_t target, const char* where) const {
    if (target >= seen_) return;
    const std::int64_t need = std::min(target, window_ - 1);
    KVCACHE_CHECK(need == 0 || target - need >= first_, where, "(", target,
                  "): a sliding-window layer (window ", window_, ") keeping slots [", first_, ", ",
                  seen_, ") cannot crop to ", target,
                  " tokens: the next step would need slots from ", target - need,
                  ", which are gone (at most ", spare_,
                  " tokens can be dropped once the window has filled: spare_slots)");
  }

  /// Keeps the first `target` tokens seen (checked by check_crop; larger targets change nothing).
  void crop(std::int64_t target) {
    check_crop(target, "SlidingWindowLayer::crop");
    if (target >= seen_) return;
    seen_ = target;
    first_ = std::min(first_, target);
  }

  /// Forgets every token, keeping the storage.
  void reset() { seen_ = first_ = 0; }

  /// The same layer with `rows` batch rows, row i a copy of this layer's row row_of(i) (in range,
  /// checked by the caller), in new storage of the same ring. Only held tokens are copied.
  template <class RowOf>
  SlidingWindowLayer gathered(std::int64_t rows, RowOf row_of, const char* where) const {
    SlidingWindowLayer out = *this;
    if (!keys_.defined()) return out;
    const std::int64_t shape[4] = {rows, keys_.size(1), keys_.size(2), keys_.size(3)};
    out.keys_ = detail::allocate_storage<B>(shape, keys_.dtype(), where);
    out.values_ = detail::allocate_storage<B>(shape, values_.dtype(), where);
    if (held() == 0) return out;
    const auto [k, v] = held_tokens();
    for (std::int64_t dst = 0; dst < rows; ++dst) {
      const std::int64_t src = row_of(dst);
      write(out.keys_.slice(0, dst, dst + 1), out.values_.slice(0, dst, dst + 1), ring_, first_,
            k.slice(0, src, src + 1), v.slice(0, src, src + 1));
    }
    return out;
  }

  /// The same layer in storage of its own (same ring; the held tokens copied).
  SlidingWindowLayer deep_copy(const char* where) const {
    const std::int64_t rows = batch();
    return gathered(
        rows, [](std::int64_t i) { return i; }, where);
  }

  /// Bytes of the tokens held (keys and values).
  std::size_t nbytes() const {
    if (!keys_.defined()) return 0;
    return 2 * static_cast<std::size_t>(keys_.size(0) * keys_.size(1) * held() * keys_.size(3)) *
           dtype_size(keys_.dtype());
  }
  /// Bytes allocated (keys and values, both halves of the ring).
  std::size_t capacity_bytes() const {
    return keys_.defined() ? keys_.nbytes() + values_.nbytes() : 0;
  }

  /// The ring's storage, [batch, num_kv_heads, 2 * ring_capacity(), head_dim] keys and values:
  /// token t at slots t % ring and t % ring + ring. For tests and inspection.
  std::pair<Tensor, Tensor> storage() const { return {keys_, values_}; }

 private:
  // n tokens from absolute slot t0 (n <= ring): one contiguous run of the mirrored storage.
  static Tensor held_view(const Tensor& storage, std::int64_t t0, std::int64_t n,
                          std::int64_t ring) {
    const std::int64_t s = ring > 0 ? t0 % ring : 0;
    return storage.slice(2, s, s + n);
  }
  Tensor held_view(const Tensor& storage, std::int64_t t0, std::int64_t n) const {
    return held_view(storage, t0, n, ring_);
  }

  // Writes tokens [t0, t0 + n) (n = src.size(2) <= ring) at both of their ring slots: the run
  // [s, s + n) from s = t0 % ring holds each token once (some in the upper half, where they
  // belong too), and the other copy of each is [s + ring, 2 ring) then [0, s + n - ring).
  static void write(const Tensor& keys, const Tensor& values, std::int64_t ring, std::int64_t t0,
                    const Tensor& src_keys, const Tensor& src_values) {
    const std::int64_t n = src_keys.size(2);
    if (n == 0) return;
    const std::int64_t s = t0 % ring;
    const std::int64_t upper = std::min(n, ring - s);  // tokens whose first copy is below ring
    B::copy(keys.slice(2, s, s + n), src_keys);
    B::copy(values.slice(2, s, s + n), src_values);
    B::copy(keys.slice(2, s + ring, s + ring + upper), src_keys.slice(2, 0, upper));
    B::copy(values.slice(2, s + ring, s + ring + upper), src_values.slice(2, 0, upper));
    if (upper < n) {
      B::copy(keys.slice(2, 0, n - upper), src_keys.slice(2, upper, n));
      B::copy(values.slice(2, 0, n - upper), src_values.slice(2, upper, n));
    }
  }

  Tensor keys_;    // [batch, num_kv_heads, 2 * ring_, head_dim], owning, on B::kDevice: token t
  Tensor values_;  // at slots t % ring_ and t % ring_ + ring_; same layout for values
  std::int64_t ring_ = 0;    // ring slots allocated (<= max_held())
  std::int64_t window_ = 1;  // the attention window this layer serves
  std::int64_t spare_ = 0;   // tokens kept beyond window - 1
  std::int64_t seen_ = 0;    // tokens seen (absolute slots [0, seen_))
  std::int64_t first_ = 0;   // oldest token held: slots [first_, seen_) are in the ring
};

}  // namespace kvcache
