// QuantizedCache: a KIVI-style quantized KV cache (Liu et al. 2024; transformers' QuantizedCache
// with quanto/HQQ backends), 8, 4 or 2 bits with a full-precision residual of recent tokens.
//
// What it stores, per layer and batch row. The most recent tokens (at least residual_length of
// them) stay in full precision; older tokens live in quantized blocks. Keys are quantized per
// channel (KIVI's choice: a group is group_size consecutive tokens of one channel, so a block is
// group_size tokens) or per token; values are always per token (a group is min(group_size,
// head_dim) consecutive channels of one token, which must divide head_dim). Each group is
// quantized asymmetrically: code = round((x - min) / scale) in [0, 2^nbits - 1], x' = code *
// scale + min, with scale and min stored in float16 (default) or float32; float16 ones are rounded
// outward (min down, scale up) so every x of the group stays within [min, min + qmax * scale] and
// the error is at most scale / 2 (plus float rounding). Codes are packed little-endian within a
// byte (8 / nbits codes a byte).
//
// Better than transformers: a block is quantized once, when it leaves the residual window, and is
// never touched again (its bytes are appended to the row's byte stream and stay as they are);
// transformers dequantizes and re-quantizes the whole history at every flush. A step of q_len
// tokens attends over the quantized blocks (dequantized) followed by the residual and the new
// tokens in full precision; only then are the tokens past residual_length flushed into blocks, so
// a prefill attends over its own tokens exactly, as in transformers.
//
// Attention path (CPU, for now): update() dequantizes the layer's blocks into a fresh
// [batch, num_kv_heads, seen, head_dim] buffer of the states' dtype and returns it with the
// residual (dequantize-then-attend, the simple correct form): the buffer lives as long as the
// returned views, one layer at a time, so the cache itself stays small; the per-step cost is
// O(seen) dequantization. Reading the blocks directly in the attention kernel is still to do.
//
// Bytes per cached token (bytes_per_token()): for head_dim 64, group 64, float16 scale and min,
// keys + values per kv head: 8 bits 136, 4 bits 72, 2 bits 40 bytes, against 256 for bfloat16
// and 512 for float32 (4 bits: 0.28x of bfloat16). The residual is held as float32 (exact for
// every input dtype) and counted so in nbytes().
//
// Slots as in a DynamicCache: get_seq_length() is every token seen, get_mask_sizes() is
// (seen + q_len, 0), get_max_cache_shape() is -1. crop() to any length at or past the quantized
// tokens, or to a block boundary below them (whole blocks dropped, never re-quantized); elsewhere
// it is a kvcache::Error. Batch operations, reset and clone work. CPU only for now: on
// cuda::Backend update() is a kvcache::Error (the class compiles for it).
//
// Every mutating call checks its input and allocates before it changes anything, so a call that
// throws leaves the cache as it was. Copies are explicit (clone()). Not thread-safe.
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

/// Which way a quantization group runs: along a token's channels, or along a channel's tokens.
enum class QuantAxis { kPerToken, kPerChannel };

/// The quantization of a QuantizedCache (transformers' QuantizedCacheConfig).
struct QuantizedCacheOptions {
  /// Bits per value: 8, 4 or 2.
  int nbits = 4;  // 2, 4 or 8
  /// Values sharing one scale and minimum.
  std::int64_t group_size = 64;  // values a group holds (see the file comment)
  /// How keys are grouped: per channel across tokens (KIVI, the default) or per token.
  QuantAxis key_axis = QuantAxis::kPerChannel;  // KIVI: keys per channel, values per token
  /// Most recent tokens kept in full precision before their block is quantized.
  std::int64_t residual_length = 128;  // recent tokens kept in full precision
  /// The dtype of the scales and minimums (float16 or float32).
  DType scale_dtype = DType::kFloat16;  // scale and min: float16 or float32
};

namespace detail {

// One group's quantization: the metadata bytes (scale, min) at `meta`, codes at code indices
// first, first + step, ... of `codes` (zeroed by the caller).
struct QuantCodec {
  int nbits = 4;
  DType scale_dtype = DType::kFloat16;

  unsigned qmax() const { return (1u << nbits) - 1u; }
  std::size_t meta_size() const { return 2 * dtype_size(scale_dtype); }
  std::size_t code_bytes(std::int64_t count) const {
    return static_cast<std::size_t>(count * nbits / 8);
  }
  float round_meta(float v) const {
    return scale_dtype == DType::kFloat16 ? to_float(from_float<float16>(v)) : v;
  }
  void put_meta(unsigned char* p, float scale, float mn) const {
    if (scale_dtype == DType::kFloat16) {
      const float16 h[2] = {from_float<float16>(scale), from_float<float16>(mn)};
      std::memcpy(p, h, sizeof(h));
    } else {
      const float f[2] = {scale, mn};
      std::memcpy(p, f, sizeof(f));
    }
  }
  std::pair<float, float> get_meta(const unsigned char* p) const {
    if (scale_dtype == DType::kFloat16) {
      float16 h[2];
      std::memcpy(h, p, sizeof(h));
      return {to_float(h[0]), to_float(h[1])};
    }
    float f[2];
    std::memcpy(f, p, sizeof(f));
    return {f[0], f[1]};
  }
  void put_code(unsigned char* codes, std::int64_t idx, unsigned code) const {
    const std::int64_t per = 8 / nbits;
    codes[idx / per] |= static_cast<unsigned char>(code << ((idx % per) * nbits));
  }
  unsigned get_code(const unsigned char* codes, std::int64_t idx) const {
    const std::int64_t per = 8 / nbits;
    return (codes[idx / per] >> ((idx % per) * nbits)) & qmax();
  }

  // Quantizes x[0], x[stride], ... (n values) into meta and codes [first + k * step].
  void quantize(const float* x, std::int64_t stride, std::int64_t n, unsigned char* meta,
                unsigned char* codes, std::int64_t first, std::int64_t step) const {
    float lo = x[0], hi = x[0];
    for (std::int64_t k = 1; k < n; ++k) {
      lo = std::min(lo, x[k * stride]);
      hi = std::max(hi, x[k * stride]);
    }
    // Rounded outward so [mn, mn + qmax * scale] covers [lo, hi] after rounding to scale_dtype.
    float mn = round_meta(lo);
    if (mn > lo) mn = round_meta(lo - std::abs(lo) * 0x1p-10f - 0x1p-24f);
    float scale = (hi - mn) / static_cast<float>(qmax());
    float sr = round_meta(scale);
    if (sr < scale) sr = round_meta(scale * (1.0f + 0x1p-10f));
    put_meta(meta, sr, mn);
    const float inv = sr > 0 ? 1.0f / sr : 0.0f;
    for (std::int64_t k = 0; k < n; ++k) {
      const float c = std::nearbyint((x[k * stride] - mn) * inv);
      const unsigned code = static_cast<unsigned>(std::clamp(c, 0.0f, static_cast<float>(qmax())));
      put_code(codes, first + k * step, code);
    }
  }
};

}  // namespace detail

/// A KIVI-style quantized cache (transformers' QuantizedCache): keys and values kept as
/// nbits-bit groups with a scale and minimum each, the last residual_length tokens in full
/// precision; a block is quantized once as it leaves the residual. CPU only.
template <CacheBackend B = cpu::Backend>
class QuantizedCache final : public Cache<B> {
 public:
  /// A cache quantizing with `options`; throws kvcache::Error for bits, group size or residual
  /// length it cannot serve.
  explicit QuantizedCache(QuantizedCacheOptions options = {}) : options_(options) {
    check_options(options_);
  }
  QuantizedCache(const QuantizedCache&) = delete;
  QuantizedCache& operator=(const QuantizedCache&) = delete;
  /// Moves the storage; the moved-from cache is empty.
  QuantizedCache(QuantizedCache&&) noexcept = default;
  /// Moves the storage; the moved-from cache is empty.
  QuantizedCache& operator=(QuantizedCache&&) noexcept = default;

  /// nbits 2, 4 or 8; group_size in [1, 2^20] and, for per-channel keys, a multiple of 8 / nbits;
  /// residual_length >= 0; scale_dtype float16 or float32.
  static void check_options(const QuantizedCacheOptions& o) {
    KVCACHE_CHECK(o.nbits == 2 || o.nbits == 4 || o.nbits == 8,
                  "QuantizedCache: expected nbits 2, 4 or 8, got ", o.nbits);
    KVCACHE_CHECK(o.group_size >= 1 && o.group_size <= (1 << 20),
                  "QuantizedCache: expected group_size in [1, 2^20], got ", o.group_size);
    KVCACHE_CHECK(o.residual_length >= 0 && o.residual_length <= (std::int64_t{1} << 40),
                  "QuantizedCache: expected residual_length in [0, 2^40], got ", o.residual_length);
    KVCACHE_CHECK(o.scale_dtype == DType::kFloat16 || o.scale_dtype == DType::kFloat32,
                  "QuantizedCache: expected scale_dtype float16 or float32, got ",
                  dtype_name(o.scale_dtype));
  }

  /// Throws unless head_dim suits the options: per-token groups of min(group_size, head_dim)
  /// channels must divide head_dim, and head_dim * nbits must fill whole bytes.
  static void check_head_dim(const QuantizedCacheOptions& o, std::int64_t head_dim,
                             const char* where) {
    const std::int64_t g = std::min(o.group_size, head_dim);
    KVCACHE_CHECK(head_dim % g == 0 && (head_dim * o.nbits) % 8 == 0, where,
                  ": expected per-token groups of min(group_size, head_dim) = ", g,
                  " channels to divide head_dim ", head_dim, " and head_dim * nbits (", o.nbits,
                  ") to fill whole bytes");
  }

  /// Bytes one token costs once quantized (keys + values, all num_kv_heads heads, one layer).
  static double bytes_per_token(const QuantizedCacheOptions& o, std::int64_t num_kv_heads,
                                std::int64_t head_dim) {
    const Geometry g = geometry(o, head_dim);
    return static_cast<double>(num_kv_heads) *
           static_cast<double>(g.key_head_bytes + g.value_head_bytes) /
           static_cast<double>(g.chunk);
  }

  /// The options it was built with.
  const QuantizedCacheOptions& options() const { return options_; }

  /// A deep copy: the same blocks and residual tokens in storage of its own.
  QuantizedCache clone() const {
    QuantizedCache out(options_);
    out.layers_ = layers_;  // vectors only: a deep copy
    return out;
  }

  std::pair<Tensor, Tensor> update(const Tensor& key_states, const Tensor& value_states,
                                   int layer_idx, const CacheKwargs& kwargs = {}) override {
    (void)kwargs;
    const char* where = "QuantizedCache::update";
    if constexpr (B::kDevice != Device::kCpu) {
      KVCACHE_FAIL(where, ": the quantized cache is not on the GPU yet (", device_name(B::kDevice),
                   "); use it with a CPU model");
    }
    check_states(key_states, value_states, layer_idx);
    const bool fresh = layer_idx == num_layers();
    const Layer empty_layer = fresh || layers_[static_cast<std::size_t>(layer_idx)].seen() == 0
                                  ? make_layer(key_states)
                                  : Layer{};
    const Layer& l =
        empty_layer.heads > 0 ? empty_layer : layers_[static_cast<std::size_t>(layer_idx)];
    const Geometry& g = l.geo;
    const std::int64_t batch = l.batch, heads = l.heads, d = l.head_dim, q = key_states.size(2);
    const std::int64_t res = l.residual + q, seen = l.quantized + res;
    detail::checked_mul(detail::checked_mul(batch * heads, seen, where, "the dequantized keys"), d,
                        where, "the dequantized keys");
    // 1. The residual after the step, token-major [res][batch][heads][d] float32.
    std::vector<float> rk(static_cast<std::size_t>(res * batch * heads * d)), rv(rk.size());
    std::copy(l.res_k.begin(), l.res_k.end(), rk.begin());
    std::copy(l.res_v.begin(), l.res_v.end(), rv.begin());
    append_states(key_states, rk, l.residual);
    append_states(value_states, rv, l.residual);
    // 2. The step's keys and values: the blocks dequantized, then the residual exactly.
    const std::int64_t shape[4] = {batch, heads, seen, d};
    Tensor out_k = detail::allocate_storage<B>(shape, key_states.dtype(), where);
    Tensor out_v = detail::allocate_storage<B>(shape, key_states.dtype(), where);
    dequantize_into(l, out_k, out_v);
    for (std::int64_t t = 0; t < res; ++t)
      for (std::int64_t b = 0; b < batch; ++b)
        for (std::int64_t h = 0; h < heads; ++h) {
          const std::int64_t src = ((t * batch + b) * heads + h) * d;
          const std::int64_t dst = ((b * heads + h) * seen + l.quantized + t) * d;
          for (std::int64_t c = 0; c < d; ++c) {
            detail::store_float(out_k.data(), out_k.dtype(), dst + c,
                                rk[static_cast<std::size_t>(src + c)]);
            detail::store_float(out_v.data(), out_v.dtype(), dst + c,
                                rv[static_cast<std::size_t>(src + c)]);
          }
        }
    // 3. The blocks leaving the residual, quantized once (per row: chunks of [heads][record]).
    const std::int64_t flush =
        res > options_.residual_length ? (res - options_.residual_length) / g.chunk * g.chunk : 0;
    std::vector<std::vector<unsigned char>> new_k(static_cast<std::size_t>(batch)),
        new_v(new_k.size());
    for (std::int64_t b = 0; b < batch; ++b) {
      auto& kb = new_k[static_cast<std::size_t>(b)];
      auto& vb = new_v[static_cast<std::size_t>(b)];
      const std::int64_t chunks = flush / g.chunk;
      kb.assign(static_cast<std::size_t>(chunks * heads) * g.key_head_bytes, 0);
      vb.assign(static_cast<std::size_t>(chunks * heads) * g.value_head_bytes, 0);
      for (std::int64_t k = 0; k < chunks; ++k)
        for (std::int64_t h = 0; h < heads; ++h) {
          unsigned char* krec =
              kb.data() + static_cast<std::size_t>(k * heads + h) * g.key_head_bytes;
          unsigned char* vrec =
              vb.data() + static_cast<std::size_t>(k * heads + h) * g.value_head_bytes;
          quantize_chunk(rk.data(), rv.data(), k * g.chunk, b, h, batch, heads, d, krec, vrec, g);
        }
    }
    // 4. Reserve (may throw), then commit (nothing throws).
    std::vector<Layer> added;
    if (fresh) {
      added.reserve(1);
      added.push_back(empty_layer);
      layers_.reserve(layers_.size() + 1);
    }
    Layer& target = fresh ? added.front() : layers_[static_cast<std::size_t>(layer_idx)];
    if (!fresh && empty_layer.heads > 0) {
      Layer replacement = empty_layer;  // an emptied layer takes the new layout
      reserve_rows(replacement, new_k, new_v);
      target = std::move(replacement);
    } else {
      reserve_rows(target, new_k, new_v);
    }
    for (std::int64_t b = 0; b < batch; ++b) {
      auto& dk = target.keys[static_cast<std::size_t>(b)];
      auto& dv = target.values[static_cast<std::size_t>(b)];
      dk.insert(dk.end(), new_k[static_cast<std::size_t>(b)].begin(),
                new_k[static_cast<std::size_t>(b)].end());
      dv.insert(dv.end(), new_v[static_cast<std::size_t>(b)].begin(),
                new_v[static_cast<std::size_t>(b)].end());
    }
    const std::size_t drop = static_cast<std::size_t>(flush * batch * heads * d);
    rk.erase(rk.begin(), rk.begin() + static_cast<std::ptrdiff_t>(drop));
    rv.erase(rv.begin(), rv.begin() + static_cast<std::ptrdiff_t>(drop));
    target.res_k.swap(rk);
    target.res_v.swap(rv);
    target.residual = res - flush;
    target.quantized += flush;
    if (fresh) layers_.push_back(std::move(added.front()));
    return {out_k, out_v};
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

  void reset() override {
    for (Layer& l : layers_) {
      for (auto& r : l.keys) r.clear();
      for (auto& r : l.values) r.clear();
      l.res_k.clear();
      l.res_v.clear();
      l.quantized = l.residual = 0;
    }
  }

  /// Keeps the first max_length tokens: any length at or past the quantized tokens, or a block
  /// boundary below them (whole blocks dropped); else a kvcache::Error and nothing changes.
  void crop(std::int64_t max_length) override {
    const char* where = "QuantizedCache::crop";
    std::vector<std::int64_t> targets;
    for (const Layer& l : layers_) {
      const std::int64_t t = detail::crop_target(max_length, l.seen(), where);
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
        const std::int64_t chunks = t / l.geo.chunk;
        for (auto& r : l.keys)
          r.resize(static_cast<std::size_t>(chunks * l.heads) * l.geo.key_head_bytes);
        for (auto& r : l.values)
          r.resize(static_cast<std::size_t>(chunks * l.heads) * l.geo.value_head_bytes);
        l.quantized = t;
        l.residual = 0;
      }
      const std::size_t keep =
          static_cast<std::size_t>(l.residual * l.batch * l.heads * l.head_dim);
      l.res_k.resize(keep);
      l.res_v.resize(keep);
    }
  }

  using Cache<B>::reorder_cache;
  using Cache<B>::batch_select_indices;
  void reorder_cache(std::span<const std::int64_t> beam_idx) override {
    const std::int64_t batch = batch_size();
    KVCACHE_CHECK(batch < 0 || static_cast<std::int64_t>(beam_idx.size()) == batch,
                  "QuantizedCache::reorder_cache: expected ", batch,
                  " beam indices (one per row), got ", beam_idx.size());
    gather(std::vector<std::int64_t>(beam_idx.begin(), beam_idx.end()), "reorder_cache");
  }
  void batch_repeat_interleave(std::int64_t repeats) override {
    KVCACHE_CHECK(repeats >= 1,
                  "QuantizedCache::batch_repeat_interleave: expected repeats >= 1, got ", repeats);
    const std::int64_t batch = batch_size();
    if (batch < 0) return;
    detail::checked_mul(batch, repeats, "QuantizedCache::batch_repeat_interleave", "the new batch");
    std::vector<std::int64_t> rows(static_cast<std::size_t>(batch * repeats));
    for (std::size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<std::int64_t>(i) / repeats;
    gather(rows, "batch_repeat_interleave");
  }
  void batch_select_indices(std::span<const std::int64_t> indices) override {
    KVCACHE_CHECK(!indices.empty() || batch_size() < 0,
                  "QuantizedCache::batch_select_indices: expected at least one index, got none");
    gather(std::vector<std::int64_t>(indices.begin(), indices.end()), "batch_select_indices");
  }

  /// Bytes held: the blocks' bytes plus the residual (float32).
  std::size_t nbytes() const override {
    std::size_t total = 0;
    for (const Layer& l : layers_) {
      for (const auto& r : l.keys) total += r.size();
      for (const auto& r : l.values) total += r.size();
      total += (l.res_k.size() + l.res_v.size()) * sizeof(float);
    }
    return total;
  }
  std::size_t capacity_bytes() const override {
    std::size_t total = 0;
    for (const Layer& l : layers_) {
      for (const auto& r : l.keys) total += r.capacity();
      for (const auto& r : l.values) total += r.capacity();
      total += (l.res_k.capacity() + l.res_v.capacity()) * sizeof(float);
    }
    return total;
  }

  /// Batch row `row`'s quantized key and value bytes of layer `layer_idx` (blocks in order, each
  /// [num_kv_heads][record]). For tests: a block's bytes never change once written.
  std::pair<std::span<const unsigned char>, std::span<const unsigned char>> block_bytes(
      int layer_idx, std::int64_t row) const {
    KVCACHE_CHECK(has_layer(layer_idx), "QuantizedCache::block_bytes: no layer ", layer_idx);
    const Layer& l = layers_[static_cast<std::size_t>(layer_idx)];
    KVCACHE_CHECK(row >= 0 && row < l.batch, "QuantizedCache::block_bytes: no row ", row);
    return {l.keys[static_cast<std::size_t>(row)], l.values[static_cast<std::size_t>(row)]};
  }

  /// Batch rows held, or -1 while every layer is empty.
  std::int64_t batch_size() const {
    for (const Layer& l : layers_) {
      if (l.seen() > 0) return l.batch;
    }
    return -1;
  }

 private:
  // Record sizes for a head_dim: a chunk is the tokens flushed together (group_size for
  // per-channel keys, else 1); *_head_bytes are one chunk of one head.
  struct Geometry {
    std::int64_t chunk = 1;
    std::int64_t token_groups = 1;  // per-token groups per token
    std::int64_t token_group = 1;   // channels per per-token group
    std::size_t token_record = 0;   // one token of one head, per-token: metas + codes
    std::size_t key_head_bytes = 0;
    std::size_t value_head_bytes = 0;
  };
  static Geometry geometry(const QuantizedCacheOptions& o, std::int64_t d) {
    const detail::QuantCodec codec{o.nbits, o.scale_dtype};
    Geometry g;
    g.token_group = std::min(o.group_size, d);
    g.token_groups = d / g.token_group;
    g.token_record =
        static_cast<std::size_t>(g.token_groups) * codec.meta_size() + codec.code_bytes(d);
    const bool per_channel = o.key_axis == QuantAxis::kPerChannel;
    g.chunk = per_channel ? o.group_size : 1;
    g.key_head_bytes = per_channel ? static_cast<std::size_t>(d) * codec.meta_size() +
                                         codec.code_bytes(o.group_size * d)
                                   : g.token_record;
    g.value_head_bytes = static_cast<std::size_t>(g.chunk) * g.token_record;
    return g;
  }

  struct Layer {
    std::int64_t batch = 0, heads = 0, head_dim = 0;
    DType dtype = DType::kFloat32;
    Geometry geo;
    std::int64_t quantized = 0;  // tokens in blocks, a multiple of geo.chunk
    std::int64_t residual = 0;   // tokens after them, in res_k / res_v
    std::vector<std::vector<unsigned char>> keys, values;  // per batch row: chunks appended
    std::vector<float> res_k, res_v;  // [residual][batch][heads][head_dim], float32
    std::int64_t seen() const { return quantized + residual; }
  };

  Layer make_layer(const Tensor& s) const {
    Layer l;
    l.batch = s.size(0);
    l.heads = s.size(1);
    l.head_dim = s.size(3);
    l.dtype = s.dtype();
    l.geo = geometry(options_, l.head_dim);
    l.keys.resize(static_cast<std::size_t>(l.batch));
    l.values.resize(static_cast<std::size_t>(l.batch));
    return l;
  }

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
      KVCACHE_CHECK(l.seen() == 0 || (l.batch == k.size(0) && l.heads == k.size(1) &&
                                      l.head_dim == k.size(3) && l.dtype == k.dtype()),
                    where, ": layer ", layer_idx, " holds [", l.batch, ", ", l.heads, ", ",
                    l.seen(), ", ", l.head_dim, "] ", dtype_name(l.dtype),
                    "; expected new states of that layout, got ", k.describe());
    }
    const std::int64_t batch = batch_size();
    KVCACHE_CHECK(batch < 0 || k.size(0) == batch, where, ": expected batch ", batch,
                  " (the batch the cache holds), got ", k.size(0));
  }

  // Appends states [b, h, q, d] (any strides) to a token-major residual after `past` tokens.
  static void append_states(const Tensor& s, std::vector<float>& res, std::int64_t past) {
    const std::int64_t batch = s.size(0), heads = s.size(1), q = s.size(2), d = s.size(3);
    for (std::int64_t t = 0; t < q; ++t)
      for (std::int64_t b = 0; b < batch; ++b)
        for (std::int64_t h = 0; h < heads; ++h)
          for (std::int64_t c = 0; c < d; ++c) {
            const std::int64_t off =
                b * s.stride(0) + h * s.stride(1) + t * s.stride(2) + c * s.stride(3);
            res[static_cast<std::size_t>((((past + t) * batch + b) * heads + h) * d + c)] =
                detail::load_float(s.data(), s.dtype(), off);
          }
  }

  // Quantizes the chunk of tokens [t0, t0 + chunk) of row b, head h of a token-major residual.
  void quantize_chunk(const float* rk, const float* rv, std::int64_t t0, std::int64_t b,
                      std::int64_t h, std::int64_t batch, std::int64_t heads, std::int64_t d,
                      unsigned char* krec, unsigned char* vrec, const Geometry& g) const {
    const detail::QuantCodec codec{options_.nbits, options_.scale_dtype};
    const std::int64_t tok_stride = batch * heads * d;  // between tokens of one (b, h)
    auto token_records = [&](const float* res, std::int64_t t, unsigned char* rec) {
      const float* x = res + t * tok_stride + (b * heads + h) * d;
      unsigned char* codes = rec + static_cast<std::size_t>(g.token_groups) * codec.meta_size();
      for (std::int64_t grp = 0; grp < g.token_groups; ++grp) {
        codec.quantize(x + grp * g.token_group, 1, g.token_group,
                       rec + static_cast<std::size_t>(grp) * codec.meta_size(), codes,
                       grp * g.token_group, 1);
      }
    };
    for (std::int64_t i = 0; i < g.chunk; ++i)
      token_records(rv, t0 + i, vrec + static_cast<std::size_t>(i) * g.token_record);
    if (options_.key_axis == QuantAxis::kPerToken) {
      token_records(rk, t0, krec);
      return;
    }
    // Per channel: channel c's group is tokens t0 .. t0 + chunk - 1; codes token-major [t][c].
    unsigned char* codes = krec + static_cast<std::size_t>(d) * codec.meta_size();
    const float* x = rk + t0 * tok_stride + (b * heads + h) * d;
    for (std::int64_t c = 0; c < d; ++c) {
      codec.quantize(x + c, tok_stride, g.chunk,
                     krec + static_cast<std::size_t>(c) * codec.meta_size(), codes, c, d);
    }
  }

  // Writes the dequantized blocks of every row and head into out [b, h, seen', d] slots
  // [0, quantized).
  void dequantize_into(const Layer& l, const Tensor& out_k, const Tensor& out_v) const {
    const detail::QuantCodec codec{options_.nbits, options_.scale_dtype};
    const Geometry& g = l.geo;
    const std::int64_t d = l.head_dim, len = out_k.size(2), chunks = l.quantized / g.chunk;
    auto token_record = [&](const unsigned char* rec, void* out, DType dt, std::int64_t o) {
      const unsigned char* codes =
          rec + static_cast<std::size_t>(g.token_groups) * codec.meta_size();
      for (std::int64_t grp = 0; grp < g.token_groups; ++grp) {
        const auto [sc, mn] =
            codec.get_meta(rec + static_cast<std::size_t>(grp) * codec.meta_size());
        for (std::int64_t c = grp * g.token_group; c < (grp + 1) * g.token_group; ++c)
          detail::store_float(out, dt, o + c,
                              static_cast<float>(codec.get_code(codes, c)) * sc + mn);
      }
    };
    for (std::int64_t b = 0; b < l.batch; ++b) {
      const unsigned char* kb = l.keys[static_cast<std::size_t>(b)].data();
      const unsigned char* vb = l.values[static_cast<std::size_t>(b)].data();
      for (std::int64_t k = 0; k < chunks; ++k)
        for (std::int64_t h = 0; h < l.heads; ++h) {
          const unsigned char* krec =
              kb + static_cast<std::size_t>(k * l.heads + h) * g.key_head_bytes;
          const unsigned char* vrec =
              vb + static_cast<std::size_t>(k * l.heads + h) * g.value_head_bytes;
          const std::int64_t base = ((b * l.heads + h) * len + k * g.chunk) * d;
          for (std::int64_t i = 0; i < g.chunk; ++i)
            token_record(vrec + static_cast<std::size_t>(i) * g.token_record, out_v.data(),
                         out_v.dtype(), base + i * d);
          if (options_.key_axis == QuantAxis::kPerToken) {
            token_record(krec, out_k.data(), out_k.dtype(), base);
            continue;
          }
          const unsigned char* codes = krec + static_cast<std::size_t>(d) * codec.meta_size();
          for (std::int64_t c = 0; c < d; ++c) {
            const auto [sc, mn] =
                codec.get_meta(krec + static_cast<std::size_t>(c) * codec.meta_size());
            for (std::int64_t i = 0; i < g.chunk; ++i)
              detail::store_float(out_k.data(), out_k.dtype(), base + i * d + c,
                                  static_cast<float>(codec.get_code(codes, i * d + c)) * sc + mn);
          }
        }
    }
  }

  static void reserve_rows(Layer& l, const std::vector<std::vector<unsigned char>>& nk,
                           const std::vector<std::vector<unsigned char>>& nv) {
    auto grow = [](std::vector<unsigned char>& v, std::size_t extra) {
      if (v.size() + extra > v.capacity()) v.reserve(std::max(v.size() + extra, 2 * v.capacity()));
    };
    for (std::size_t b = 0; b < nk.size(); ++b) {
      grow(l.keys[b], nk[b].size());
      grow(l.values[b], nv[b].size());
    }
  }

  void gather(const std::vector<std::int64_t>& rows, const char* op) {
    const std::int64_t batch = batch_size();
    if (batch < 0) return;
    for (std::size_t i = 0; i < rows.size(); ++i) {
      KVCACHE_CHECK(rows[i] >= 0 && rows[i] < batch, "QuantizedCache::", op,
                    ": expected indices in [0, ", batch, "), got ", rows[i], " at position ", i);
    }
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
      out.keys.assign(rows.size(), {});
      out.values.assign(rows.size(), {});
      const std::int64_t hd = l.heads * l.head_dim;
      out.res_k.assign(static_cast<std::size_t>(l.residual * n * hd), 0.0f);
      out.res_v.assign(out.res_k.size(), 0.0f);
      for (std::int64_t i = 0; i < n; ++i) {
        const auto src = static_cast<std::size_t>(rows[static_cast<std::size_t>(i)]);
        out.keys[static_cast<std::size_t>(i)] = l.keys[src];
        out.values[static_cast<std::size_t>(i)] = l.values[src];
        for (std::int64_t t = 0; t < l.residual; ++t) {
          const auto from =
              static_cast<std::ptrdiff_t>((t * l.batch + static_cast<std::int64_t>(src)) * hd);
          const auto to = static_cast<std::ptrdiff_t>((t * n + i) * hd);
          std::copy(l.res_k.begin() + from, l.res_k.begin() + from + hd, out.res_k.begin() + to);
          std::copy(l.res_v.begin() + from, l.res_v.begin() + from + hd, out.res_v.begin() + to);
        }
      }
      rebuilt.push_back(std::move(out));
    }
    layers_.swap(rebuilt);
  }

  std::unique_ptr<Cache<B>> clone_cache() const override {
    return std::make_unique<QuantizedCache>(clone());
  }

  QuantizedCacheOptions options_;
  std::vector<Layer> layers_;  // one per decoder layer seen
};

extern template class QuantizedCache<cpu::Backend>;

}  // namespace kvcache
