// QuantizedCache on the GPU: QuantizedCache<cuda::Backend>, the same cache as on the CPU
// (kvcache/cache/quantized_cache.hpp: what is stored, when a block is quantized, crop's rules) with
// its storage in device memory and its work done by kernels.
//
// Storage, per layer:
// - the blocks: one uint8 device buffer for the keys and one for the values, [batch, chunk
//   capacity · heads · *_head_bytes]; row b's blocks start at b · row stride, in the CPU cache's
//   byte layout (QuantizedKVView), so the bytes of both backends compare equal. The capacity
//   doubles when a flush needs more, and the rows' blocks are copied over once.
// - the residual: token-major [slots, batch, heads, head_dim] device tensors in the states' dtype,
//   as on the CPU, plus a spare pair of the same size: the next step moves the live slots to the
//   front of the spare (no overlapping copy) and the two swap.
//
// A step (update_for_attention) copies the new states into the residual, quantizes the chunks
// leaving it with cuda::quantize_kv_blocks (bit for bit the CPU's codes, scales and minimums), and
// hands the attention module the blocks as they were before this flush (QuantizedKVView with device
// pointers and row strides) beside views of the residual; cuda::attention_quantized reads them
// directly, dequantizing each staged tile of keys and values in registers. update() (transformers'
// API) returns the layer dequantized into fresh device tensors (cuda::dequantize_kv_blocks).
//
// Every call allocates what it needs (larger block or residual buffers, the gathered rows of a
// batch operation) before it changes anything and writes only into storage it has not handed out as
// the layer's live contents, so a call that throws leaves the cache as it was. No host
// synchronisation except block_bytes() (a test's read-back). Not thread-safe; not replayed in a
// CUDA graph (its storage moves as it grows).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "kvcache/backend/cuda.hpp"
#include "kvcache/cache/cache.hpp"
#include "kvcache/cache/quantized_cache.hpp"
#include "kvcache/error.hpp"

namespace kvcache {

/// QuantizedCache with its blocks and residual in device memory (see the file comment).
template <>
class QuantizedCache<cuda::Backend> final : public Cache<cuda::Backend> {
  using B = cuda::Backend;
  using Cpu = QuantizedCache<cpu::Backend>;

 public:
  /// A cache quantizing with `options`; throws kvcache::Error for bits, group size or residual
  /// length it cannot serve (the CPU cache's rules).
  explicit QuantizedCache(QuantizedCacheOptions options = {}) : options_(options) {
    Cpu::check_options(options_);
  }
  QuantizedCache(const QuantizedCache&) = delete;
  QuantizedCache& operator=(const QuantizedCache&) = delete;
  /// Moves the storage; the moved-from cache is empty.
  QuantizedCache(QuantizedCache&&) noexcept = default;
  /// Moves the storage; the moved-from cache is empty.
  QuantizedCache& operator=(QuantizedCache&&) noexcept = default;

  /// The CPU cache's option checks.
  static void check_options(const QuantizedCacheOptions& o) { Cpu::check_options(o); }
  /// The CPU cache's head_dim check.
  static void check_head_dim(const QuantizedCacheOptions& o, std::int64_t head_dim,
                             const char* where) {
    Cpu::check_head_dim(o, head_dim, where);
  }
  /// Bytes one token costs once quantized (as on the CPU: the layout is the same).
  static double bytes_per_token(const QuantizedCacheOptions& o, std::int64_t num_kv_heads,
                                std::int64_t head_dim) {
    return Cpu::bytes_per_token(o, num_kv_heads, head_dim);
  }

  /// The options it was built with.
  const QuantizedCacheOptions& options() const { return options_; }

  /// A deep copy: the same blocks and residual tokens in device storage of its own.
  QuantizedCache clone() const {
    return detail::out_of_memory_as_error("QuantizedCache::clone", [&]() -> QuantizedCache {
      const char* where = "QuantizedCache::clone";
      QuantizedCache out(options_);
      out.layers_.reserve(layers_.size());
      for (const Layer& l : layers_) {
        // The same capacities; only what is live is copied (blocks in use, the live residual
        // slots, moved to the front).
        Layer c = l;
        c.res_begin = 0;
        auto like = [&](const Tensor& t) {
          return t.defined() ? detail::allocate_storage<B>(t.shape(), t.dtype(), where) : Tensor();
        };
        c.kblocks = like(l.kblocks);
        c.vblocks = like(l.vblocks);
        c.res_k = like(l.res_k);
        c.res_v = like(l.res_v);
        c.spare_k = like(l.spare_k);
        c.spare_v = like(l.spare_v);
        out.layers_.push_back(std::move(c));
      }
      for (std::size_t i = 0; i < layers_.size(); ++i) {
        const Layer& l = layers_[i];
        const Layer& c = out.layers_[i];
        const auto kused = static_cast<std::int64_t>(l.used_key_bytes());
        const auto vused = static_cast<std::int64_t>(l.used_value_bytes());
        if (kused > 0) {
          cuda::copy(c.kblocks.slice(1, 0, kused), l.kblocks.slice(1, 0, kused));
          cuda::copy(c.vblocks.slice(1, 0, vused), l.vblocks.slice(1, 0, vused));
        }
        if (l.residual > 0) {
          const std::int64_t from = l.res_begin, to = l.res_begin + l.residual;
          cuda::copy2(c.res_k.slice(0, 0, l.residual), l.res_k.slice(0, from, to),
                      c.res_v.slice(0, 0, l.residual), l.res_v.slice(0, from, to));
        }
      }
      return out;
    });
  }

  /// transformers' update(): the layer's keys and values, past + new, as fresh [batch, heads,
  /// seen, head_dim] device tensors of the states' dtype: the blocks dequantized, then the
  /// residual as given (O(seen) a call; the attention module calls update_for_attention).
  std::pair<Tensor, Tensor> update(const Tensor& key_states, const Tensor& value_states,
                                   int layer_idx, const CacheKwargs& kwargs = {}) override {
    return detail::out_of_memory_as_error(
        "QuantizedCache::update", [&]() -> std::pair<Tensor, Tensor> {
          (void)kwargs;
          const char* where = "QuantizedCache::update";
          check_states(key_states, value_states, layer_idx);
          const std::int64_t seen = detail::checked_add(get_seq_length(layer_idx),
                                                        key_states.size(2), where, "the tokens");
          const std::int64_t shape[4] = {key_states.size(0), key_states.size(1), seen,
                                         key_states.size(3)};
          Tensor out_k = detail::allocate_storage<B>(shape, key_states.dtype(), where);
          Tensor out_v = detail::allocate_storage<B>(shape, key_states.dtype(), where);
          const AttentionKV kv = step(key_states, value_states, layer_idx, where);
          const QuantizedKVView& view = *kv.quantized;
          if (view.tokens > 0) cuda::dequantize_kv_blocks(view, out_k, out_v);
          cuda::copy2(out_k.slice(2, view.tokens, seen), kv.keys, out_v.slice(2, view.tokens, seen),
                      kv.values);
          return {out_k, out_v};
        });
  }

  /// The attention module's update: stores the step (a copy of the new states, plus the
  /// quantization of the blocks leaving the residual) and returns the blocks as stored before this
  /// step's flush (device pointers, AttentionKV::quantized) with the residual and new tokens as
  /// views of the layer's residual storage ([batch, heads, residual + q_len, head_dim] in the
  /// states' dtype, token-major strides). Valid until the layer's next mutating call.
  AttentionKV update_for_attention(const Tensor& key_states, const Tensor& value_states,
                                   int layer_idx, const CacheKwargs& kwargs = {}) override {
    return detail::out_of_memory_as_error(
        "QuantizedCache::update_for_attention", [&]() -> AttentionKV {
          (void)kwargs;
          check_states(key_states, value_states, layer_idx);
          return step(key_states, value_states, layer_idx, "QuantizedCache::update");
        });
  }

  std::int64_t get_seq_length(int layer_idx = 0) const override {
    return has_layer(layer_idx) ? layers_[static_cast<std::size_t>(layer_idx)].seen() : 0;
  }
  /// Tokens of layer_idx held in quantized blocks (the rest are in the residual).
  std::int64_t quantized_length(int layer_idx = 0) const {
    return has_layer(layer_idx) ? layers_[static_cast<std::size_t>(layer_idx)].quantized : 0;
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

  /// Empties every layer, keeping the storage (the next update of the same layout reuses it).
  void reset() override {
    for (Layer& l : layers_) l.quantized = l.residual = l.res_begin = 0;
  }

  /// Keeps the first max_length tokens: any length at or past the quantized tokens, or a block
  /// boundary below them (whole blocks dropped); else a kvcache::Error and nothing changes. Only
  /// lengths change: no device work.
  void crop(std::int64_t max_length) override {
    const char* where = "QuantizedCache::crop";
    // One target for every layer, as the CPU cache, DynamicCache and transformers take it: a
    // negative max_length drops from get_seq_length() (layer 0's tokens; 0 with no layer yet).
    const std::int64_t all =
        max_length >= 0 ? max_length : detail::crop_target(max_length, get_seq_length(), where);
    std::vector<std::int64_t> targets;
    targets.reserve(layers_.size());
    for (const Layer& l : layers_) {
      const std::int64_t t = std::min(all, l.seen());
      KVCACHE_CHECK(t >= l.quantized || t % l.geo.chunk == 0, where, "(", max_length,
                    "): the first ", l.quantized, " tokens are quantized in blocks of ",
                    l.geo.chunk, "; a crop below them must land on a block boundary, got ", t);
      targets.push_back(t);
    }
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      Layer& l = layers_[i];
      const std::int64_t t = targets[i];
      if (t >= l.seen()) continue;
      if (t >= l.quantized) {
        l.residual = t - l.quantized;
      } else {
        l.quantized = t;
        l.residual = l.res_begin = 0;
      }
    }
  }

  using Cache<B>::reorder_cache;
  using Cache<B>::batch_select_indices;
  void reorder_cache(std::span<const std::int64_t> beam_idx) override {
    detail::out_of_memory_as_error("QuantizedCache::reorder_cache", [&]() {
      gather(detail::reorder_rows(beam_idx, batch_size(), "QuantizedCache"), "reorder_cache");
    });
  }
  void batch_repeat_interleave(std::int64_t repeats) override {
    detail::out_of_memory_as_error("QuantizedCache::batch_repeat_interleave", [&]() {
      gather(detail::repeat_rows(repeats, batch_size(), "QuantizedCache"),
             "batch_repeat_interleave");
    });
  }
  void batch_select_indices(std::span<const std::int64_t> indices) override {
    detail::out_of_memory_as_error("QuantizedCache::batch_select_indices", [&]() {
      gather(detail::select_rows(indices, batch_size(), "QuantizedCache"), "batch_select_indices");
    });
  }

  /// Bytes held: the blocks' bytes plus the residual (in the states' dtype), as on the CPU.
  std::size_t nbytes() const override {
    std::size_t total = 0;
    for (const Layer& l : layers_) {
      total += static_cast<std::size_t>(l.batch) * (l.used_key_bytes() + l.used_value_bytes());
      total += 2 * static_cast<std::size_t>(l.residual) * l.token_bytes();
    }
    return total;
  }
  /// Device bytes allocated (blocks at their capacity, residual and spare).
  std::size_t capacity_bytes() const override {
    std::size_t total = 0;
    for (const Layer& l : layers_) {
      for (const Tensor* t : {&l.kblocks, &l.vblocks, &l.res_k, &l.res_v, &l.spare_k, &l.spare_v})
        total += t->defined() ? t->nbytes() : 0;
    }
    return total;
  }

  /// Batch row `row`'s quantized key and value bytes of layer `layer_idx` (blocks in order, each
  /// [num_kv_heads][record]), copied to the host (waits for the stream). For tests: the bytes
  /// equal the CPU cache's block_bytes() after the same updates.
  std::pair<std::vector<unsigned char>, std::vector<unsigned char>> block_bytes(
      int layer_idx, std::int64_t row) const {
    KVCACHE_CHECK(has_layer(layer_idx), "QuantizedCache::block_bytes: no layer ", layer_idx);
    const Layer& l = layers_[static_cast<std::size_t>(layer_idx)];
    KVCACHE_CHECK(row >= 0 && row < l.batch, "QuantizedCache::block_bytes: no row ", row);
    auto read = [&](const Tensor& blocks, std::size_t used) {
      std::vector<unsigned char> bytes(used);
      if (used == 0) return bytes;
      const auto n = static_cast<std::int64_t>(used);
      Tensor dense = detail::allocate_storage<B>(std::array<std::int64_t, 2>{1, n}, DType::kUInt8,
                                                 "QuantizedCache::block_bytes");
      cuda::copy(dense, blocks.slice(0, row, row + 1).slice(1, 0, n));
      const Tensor host = cuda::to_host(dense);
      std::copy_n(static_cast<const unsigned char*>(host.data()), used, bytes.begin());
      return bytes;
    };
    return {read(l.kblocks, l.used_key_bytes()), read(l.vblocks, l.used_value_bytes())};
  }

  /// Writes a GPU view's blocks, dequantized, into slots [0, view.tokens) of out_k / out_v
  /// ([batch, heads, >= tokens, head_dim] contiguous device tensors of any float dtype).
  static void dequantize(const QuantizedKVView& view, const Tensor& out_k, const Tensor& out_v) {
    cuda::dequantize_kv_blocks(view, out_k, out_v);
  }

  /// Batch rows held, or -1 while every layer is empty.
  std::int64_t batch_size() const {
    for (const Layer& l : layers_) {
      if (l.seen() > 0) return l.batch;
    }
    return -1;
  }

 private:
  struct Layer {
    std::int64_t batch = 0, heads = 0, head_dim = 0;
    DType dtype = DType::kFloat32;
    detail::QuantGeometry geo;
    std::int64_t quantized = 0;       // tokens in blocks, a multiple of geo.chunk
    std::int64_t residual = 0;        // live residual slots [res_begin, res_begin + residual)
    std::int64_t res_begin = 0;       // slots flushed by the last step (moved out at the next one)
    std::int64_t chunk_capacity = 0;  // blocks a row's buffer holds
    std::int64_t slot_capacity = 0;   // residual slots (res_* and spare_* alike)
    Tensor kblocks, vblocks;          // uint8 [batch, chunk_capacity * heads * *_head_bytes]
    Tensor res_k, res_v;              // [slot_capacity, batch, heads, head_dim] in dtype
    Tensor spare_k, spare_v;  // the same shape: where the next step compacts the residual to
    std::int64_t seen() const { return quantized + residual; }
    std::size_t token_bytes() const {
      return static_cast<std::size_t>(batch * heads * head_dim) * dtype_size(dtype);
    }
    std::size_t used_key_bytes() const {  // one row's
      return static_cast<std::size_t>(quantized / geo.chunk * heads) * geo.key_head_bytes;
    }
    std::size_t used_value_bytes() const {
      return static_cast<std::size_t>(quantized / geo.chunk * heads) * geo.value_head_bytes;
    }
    bool same_layout(const Tensor& s) const {
      return batch == s.size(0) && heads == s.size(1) && head_dim == s.size(3) &&
             dtype == s.dtype();
    }
  };

  bool has_layer(int layer_idx) const { return layer_idx >= 0 && layer_idx < num_layers(); }

  void check_states(const Tensor& k, const Tensor& v, int layer_idx) const {
    const char* where = "QuantizedCache::update";
    KVCACHE_CHECK(layer_idx >= 0 && layer_idx <= num_layers(), where,
                  ": expected layer_idx in [0, ", num_layers(),
                  "] (layers are added in order), got ", layer_idx);
    detail::check_kv_states(k, v, B::kDevice, where);
    check_head_dim(options_, k.size(3), where);
    if (has_layer(layer_idx)) {
      const Layer& l = layers_[static_cast<std::size_t>(layer_idx)];
      KVCACHE_CHECK(l.seen() == 0 || l.same_layout(k), where, ": layer ", layer_idx, " holds [",
                    l.batch, ", ", l.heads, ", ", l.seen(), ", ", l.head_dim, "] ",
                    dtype_name(l.dtype), "; expected new states of that layout, got ",
                    k.describe());
    }
    const std::int64_t batch = batch_size();
    KVCACHE_CHECK(batch < 0 || k.size(0) == batch, where, ": expected batch ", batch,
                  " (the batch the cache holds), got ", k.size(0));
  }

  // [batch, heads, slots, head_dim] view of token-major residual slots [first, first + count).
  static Tensor residual_view(const Tensor& res, std::int64_t first, std::int64_t count) {
    const std::int64_t batch = res.size(1), heads = res.size(2), d = res.size(3);
    const std::int64_t shape[4] = {batch, heads, count, d};
    const std::int64_t strides[4] = {heads * d, d, batch * heads * d, 1};
    return Tensor::from_storage(res.storage(), res.slice(0, first, first + count).data(), shape,
                                res.dtype(), res.device(), strides);
  }

  QuantizedKVView make_view(const Layer& l, const Tensor& kblocks, const Tensor& vblocks) const {
    QuantizedKVView v;
    v.nbits = options_.nbits;
    v.scale_dtype = options_.scale_dtype;
    v.keys_per_channel = options_.key_axis == QuantAxis::kPerChannel;
    v.batch = l.batch;
    v.heads = l.heads;
    v.head_dim = l.head_dim;
    v.tokens = l.quantized;
    v.chunk = l.geo.chunk;
    v.token_group = l.geo.token_group;
    v.token_record = l.geo.token_record;
    v.key_head_bytes = l.geo.key_head_bytes;
    v.value_head_bytes = l.geo.value_head_bytes;
    v.key_row_stride = kblocks.defined() ? kblocks.stride(0) : 0;
    v.value_row_stride = vblocks.defined() ? vblocks.stride(0) : 0;
    v.keys.reserve(static_cast<std::size_t>(l.batch));
    v.values.reserve(static_cast<std::size_t>(l.batch));
    for (std::int64_t b = 0; b < l.batch; ++b) {
      v.keys.push_back(kblocks.defined() ? static_cast<const unsigned char*>(kblocks.data()) +
                                               b * v.key_row_stride
                                         : nullptr);
      v.values.push_back(vblocks.defined() ? static_cast<const unsigned char*>(vblocks.data()) +
                                                 b * v.value_row_stride
                                           : nullptr);
    }
    return v;
  }

  // One step: allocate everything (may throw; the cache is unchanged), then copy the new tokens
  // into the residual (compacted into fresh or spare storage first), quantize the chunks leaving
  // it and commit. The returned view is the layer before the flush: old blocks, then residual +
  // new tokens.
  AttentionKV step(const Tensor& key_states, const Tensor& value_states, int layer_idx,
                   const char* where) {
    const auto idx = static_cast<std::size_t>(layer_idx);
    const bool fresh = layer_idx == num_layers();
    const bool renew = fresh || layers_[idx].seen() == 0;  // an emptied layer takes the new layout
    Layer next = fresh ? Layer{} : layers_[idx];  // the layer after this step (shares tensors)
    if (renew && !(!fresh && next.same_layout(key_states))) {
      next = Layer{};
      next.batch = key_states.size(0);
      next.heads = key_states.size(1);
      next.head_dim = key_states.size(3);
      next.dtype = key_states.dtype();
      next.geo = detail::quant_geometry(options_, next.head_dim);
    }
    if (renew) next.quantized = next.residual = next.res_begin = 0;
    const detail::QuantGeometry& g = next.geo;
    const std::int64_t batch = next.batch, heads = next.heads, d = next.head_dim,
                       q = key_states.size(2);
    const std::int64_t res = detail::checked_add(next.residual, q, where, "the residual");
    const std::int64_t flush =
        res > options_.residual_length ? (res - options_.residual_length) / g.chunk * g.chunk : 0;
    const std::int64_t chunks = flush / g.chunk;
    const std::int64_t old_chunks = next.quantized / g.chunk;
    const std::int64_t need_chunks = detail::checked_add(old_chunks, chunks, where, "the blocks");

    // 1. Allocate (may throw; nothing observable changes).
    Tensor kblocks = next.kblocks, vblocks = next.vblocks;
    const bool grow_blocks = need_chunks > next.chunk_capacity;
    if (grow_blocks) {
      const std::int64_t cap = std::max({need_chunks, 2 * next.chunk_capacity, std::int64_t{4}});
      const std::int64_t kbytes =
          detail::checked_mul(detail::checked_mul(cap, heads, where, "the key blocks"),
                              static_cast<std::int64_t>(g.key_head_bytes), where, "the key blocks");
      const std::int64_t vbytes = detail::checked_mul(
          detail::checked_mul(cap, heads, where, "the value blocks"),
          static_cast<std::int64_t>(g.value_head_bytes), where, "the value blocks");
      kblocks = detail::allocate_storage<B>(std::array<std::int64_t, 2>{batch, kbytes},
                                            DType::kUInt8, where);
      vblocks = detail::allocate_storage<B>(std::array<std::int64_t, 2>{batch, vbytes},
                                            DType::kUInt8, where);
      next.chunk_capacity = cap;
    }
    Tensor live_k = next.res_k, live_v = next.res_v;  // where the live slots are now
    Tensor res_k = next.res_k, res_v = next.res_v;    // where they are after compaction
    Tensor spare_k = next.spare_k, spare_v = next.spare_v;
    const bool grow_res = res > next.slot_capacity;
    if (grow_res) {
      const std::int64_t cap = std::max({res, 2 * next.slot_capacity, std::int64_t{16}});
      const std::int64_t shape[4] = {cap, batch, heads, d};
      res_k = detail::allocate_storage<B>(shape, next.dtype, where);
      res_v = detail::allocate_storage<B>(shape, next.dtype, where);
      spare_k = detail::allocate_storage<B>(shape, next.dtype, where);
      spare_v = detail::allocate_storage<B>(shape, next.dtype, where);
      next.slot_capacity = cap;
    }

    // 2. Write (device work into storage the layer's live contents do not occupy).
    if (grow_blocks && old_chunks > 0) {
      const auto kused = static_cast<std::int64_t>(next.used_key_bytes());
      const auto vused = static_cast<std::int64_t>(next.used_value_bytes());
      cuda::copy(kblocks.slice(1, 0, kused), next.kblocks.slice(1, 0, kused));
      cuda::copy(vblocks.slice(1, 0, vused), next.vblocks.slice(1, 0, vused));
    }
    if (next.residual > 0 && (grow_res || next.res_begin > 0)) {
      if (!grow_res) {  // compact into the spare, which becomes the residual
        std::swap(res_k, spare_k);
        std::swap(res_v, spare_v);
      }
      const std::int64_t from = next.res_begin, to = next.res_begin + next.residual;
      cuda::copy2(res_k.slice(0, 0, next.residual), live_k.slice(0, from, to),
                  res_v.slice(0, 0, next.residual), live_v.slice(0, from, to));
    }
    cuda::copy2(residual_view(res_k, next.residual, q), key_states,
                residual_view(res_v, next.residual, q), value_states);
    next.res_begin = 0;
    QuantizedKVView view = make_view(next, kblocks, vblocks);  // blocks before this flush
    if (chunks > 0) {
      cuda::quantize_kv_blocks(res_k.slice(0, 0, flush), res_v.slice(0, 0, flush), kblocks, vblocks,
                               view, old_chunks, chunks);
    }
    AttentionKV out{residual_view(res_k, 0, res), residual_view(res_v, 0, res), std::move(view)};

    // 3. Commit (nothing throws past the last allocation but a failing launch).
    next.kblocks = kblocks;
    next.vblocks = vblocks;
    next.res_k = res_k;
    next.res_v = res_v;
    next.spare_k = spare_k;
    next.spare_v = spare_v;
    next.quantized += flush;
    next.residual = res - flush;
    next.res_begin = flush;
    if (fresh) {
      layers_.push_back(std::move(next));
    } else {
      layers_[idx] = std::move(next);
    }
    return out;
  }

  // Rebuilds every non-empty layer with rows `rows` of the old one (allocated first, then
  // copied; the swap at the end is the commit).
  void gather(const std::vector<std::int64_t>& rows, const char* op) {
    const std::int64_t batch = batch_size();
    if (batch < 0) return;
    for (std::size_t i = 0; i < rows.size(); ++i) {
      KVCACHE_CHECK(rows[i] >= 0 && rows[i] < batch, "QuantizedCache::", op,
                    ": expected indices in [0, ", batch, "), got ", rows[i], " at position ", i);
    }
    const char* where = "QuantizedCache::gather";
    const auto n = static_cast<std::int64_t>(rows.size());
    std::vector<Layer> rebuilt;
    rebuilt.reserve(layers_.size());
    for (const Layer& l : layers_) {
      if (l.seen() == 0) {
        rebuilt.push_back(l);
        continue;
      }
      Layer out = l;
      out.batch = n;
      out.res_begin = 0;
      if (l.kblocks.defined()) {
        out.kblocks = detail::allocate_storage<B>(std::array<std::int64_t, 2>{n, l.kblocks.size(1)},
                                                  DType::kUInt8, where);
        out.vblocks = detail::allocate_storage<B>(std::array<std::int64_t, 2>{n, l.vblocks.size(1)},
                                                  DType::kUInt8, where);
      }
      const std::int64_t shape[4] = {l.slot_capacity, n, l.heads, l.head_dim};
      out.res_k = detail::allocate_storage<B>(shape, l.dtype, where);
      out.res_v = detail::allocate_storage<B>(shape, l.dtype, where);
      out.spare_k = detail::allocate_storage<B>(shape, l.dtype, where);
      out.spare_v = detail::allocate_storage<B>(shape, l.dtype, where);
      rebuilt.push_back(std::move(out));
    }
    for (std::size_t li = 0; li < layers_.size(); ++li) {
      const Layer& l = layers_[li];
      const Layer& out = rebuilt[li];
      if (l.seen() == 0) continue;
      const auto kused = static_cast<std::int64_t>(l.used_key_bytes());
      const auto vused = static_cast<std::int64_t>(l.used_value_bytes());
      const std::int64_t from = l.res_begin, to = l.res_begin + l.residual;
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t src = rows[static_cast<std::size_t>(i)];
        if (kused > 0) {
          cuda::copy(out.kblocks.slice(0, i, i + 1).slice(1, 0, kused),
                     l.kblocks.slice(0, src, src + 1).slice(1, 0, kused));
          cuda::copy(out.vblocks.slice(0, i, i + 1).slice(1, 0, vused),
                     l.vblocks.slice(0, src, src + 1).slice(1, 0, vused));
        }
        if (l.residual > 0) {
          cuda::copy2(out.res_k.slice(0, 0, l.residual).slice(1, i, i + 1),
                      l.res_k.slice(0, from, to).slice(1, src, src + 1),
                      out.res_v.slice(0, 0, l.residual).slice(1, i, i + 1),
                      l.res_v.slice(0, from, to).slice(1, src, src + 1));
        }
      }
    }
    layers_.swap(rebuilt);
  }

  std::unique_ptr<Cache<B>> clone_cache() const override {
    return detail::out_of_memory_as_error(
        "QuantizedCache::clone",
        [&]() -> std::unique_ptr<Cache<B>> { return std::make_unique<QuantizedCache>(clone()); });
  }

  QuantizedCacheOptions options_;
  std::vector<Layer> layers_;  // one per decoder layer seen
};

}  // namespace kvcache
