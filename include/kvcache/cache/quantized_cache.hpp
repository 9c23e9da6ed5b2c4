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
// tokens attends over the quantized blocks followed by the residual and the new tokens in full
// precision; only then are the tokens past residual_length flushed into blocks, so a prefill
// attends over its own tokens exactly, as in transformers.
//
// Attention path (CPU). The attention module calls update_for_attention(), which costs O(q_len)
// plus the quantization of the blocks leaving the residual: the new tokens are appended to the
// residual storage, and the layer's blocks are handed over as they are stored (a
// QuantizedKVView, kvcache/cache/quantized_view.hpp) beside views of the residual;
// cpu::attention_quantized reads the blocks directly, dequantizing a chunk of keys at a time into
// a per-thread buffer that stays in L1, so the O(seen) part of a step is the kernel's streaming
// read of compact blocks and nothing else. update() (transformers' API) still returns the whole
// layer dequantized into fresh tensors of the states' dtype (O(seen) a call).
//
// Bytes per cached token (bytes_per_token()): for head_dim 64, group 64, float16 scale and min,
// keys + values per kv head: 8 bits 136, 4 bits 72, 2 bits 40 bytes, against 256 for bfloat16
// and 512 for float32 (4 bits: 0.28x of bfloat16). The residual is held in the states' dtype
// (bfloat16 states: a bfloat16 residual; exact, since it is what was given) and counted so in
// nbytes().
//
// Slots as in a DynamicCache: get_seq_length() is every token seen, get_mask_sizes() is
// (seen + q_len, 0), get_max_cache_shape() is -1. crop() to any length at or past the quantized
// tokens, or to a block boundary below them (whole blocks dropped, never re-quantized); elsewhere
// it is a kvcache::Error. Batch operations, reset and clone work. On the GPU,
// QuantizedCache<cuda::Backend> (kvcache/cache/quantized_cache_cuda.hpp, included below) is the
// same cache with device storage and kernels: the same bytes, bit for bit.
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
  std::size_t meta_size() const { return quant_meta_bytes(scale_dtype); }
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
    return quant_meta(p, scale_dtype);
  }
  // log2 of the codes a byte holds: shifts and masks, not a division per code.
  int per_shift() const { return nbits == 8 ? 0 : nbits == 4 ? 1 : 2; }
  void put_code(unsigned char* codes, std::int64_t idx, unsigned code) const {
    const int sh = per_shift();
    const std::int64_t lane = idx & ((std::int64_t{1} << sh) - 1);
    codes[idx >> sh] |= static_cast<unsigned char>(code << (lane * nbits));
  }
  unsigned get_code(const unsigned char* codes, std::int64_t idx) const {
    const int sh = per_shift();
    const std::int64_t lane = idx & ((std::int64_t{1} << sh) - 1);
    return (codes[idx >> sh] >> (lane * nbits)) & qmax();
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
      // A NaN (from a NaN or an infinite value in the group) is code 0, as the GPU's conversion
      // makes it; converting it to unsigned here would be undefined (fuzz_cache found it).
      const unsigned code =
          c >= 0.0f ? static_cast<unsigned>(std::min(c, static_cast<float>(qmax()))) : 0u;
      put_code(codes, first + k * step, code);
    }
  }
};

// Record sizes for a head_dim: a chunk is the tokens flushed together (group_size for per-channel
// keys, else 1); *_head_bytes are one chunk of one head. Both backends' caches lay blocks out so.
struct QuantGeometry {
  std::int64_t chunk = 1;
  std::int64_t token_groups = 1;  // per-token groups per token
  std::int64_t token_group = 1;   // channels per per-token group
  std::size_t token_record = 0;   // one token of one head, per-token: metas + codes
  std::size_t key_head_bytes = 0;
  std::size_t value_head_bytes = 0;
};
inline QuantGeometry quant_geometry(const QuantizedCacheOptions& o, std::int64_t d) {
  const QuantCodec codec{o.nbits, o.scale_dtype};
  QuantGeometry g;
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

}  // namespace detail

/// A KIVI-style quantized cache (transformers' QuantizedCache): keys and values kept as
/// nbits-bit groups with a scale and minimum each, the last residual_length tokens in full
/// precision; a block is quantized once as it leaves the residual. This is the CPU cache; the
/// GPU's is the specialization QuantizedCache<cuda::Backend>.
template <CacheBackend B = cpu::Backend>
class QuantizedCache final : public Cache<B> {
  static_assert(B::kDevice == Device::kCpu,
                "QuantizedCache<cuda::Backend> is a specialization of its own "
                "(kvcache/cache/quantized_cache_cuda.hpp)");

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
    return detail::out_of_memory_as_error("QuantizedCache::clone", [&]() -> QuantizedCache {
      QuantizedCache out(options_);
      out.layers_ = layers_;  // vectors only: a deep copy
      return out;
    });
  }

  /// transformers' update(): the layer's keys and values, past + new, as fresh [batch, heads,
  /// seen, head_dim] tensors of the states' dtype: the blocks dequantized, then the residual as
  /// given (O(seen) a call; the attention module calls update_for_attention instead).
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
          dequantize(view, out_k, out_v);
          cpu::copy(out_k.slice(2, view.tokens, seen), kv.keys);
          cpu::copy(out_v.slice(2, view.tokens, seen), kv.values);
          return {out_k, out_v};
        });
  }

  /// The attention module's update: stores the step (O(q_len), plus quantizing the blocks that
  /// leave the residual) and returns the blocks as stored (AttentionKV::quantized, before this
  /// step's flush) with the residual and new tokens as views of the layer's residual storage
  /// ([batch, heads, residual + q_len, head_dim] in the states' dtype, token-major strides).
  /// Valid until the layer's next mutating call.
  AttentionKV update_for_attention(const Tensor& key_states, const Tensor& value_states,
                                   int layer_idx, const CacheKwargs& kwargs = {}) override {
    return detail::out_of_memory_as_error("QuantizedCache::update_for_attention",
                                          [&]() -> AttentionKV {
                                            (void)kwargs;
                                            const char* where = "QuantizedCache::update";
                                            check_states(key_states, value_states, layer_idx);
                                            return step(key_states, value_states, layer_idx, where);
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

  void reset() override {
    for (Layer& l : layers_) {
      for (auto& r : l.keys) r.clear();
      for (auto& r : l.values) r.clear();
      l.res_k.clear();
      l.res_v.clear();
      l.quantized = l.residual = l.res_begin = 0;
    }
  }

  /// Keeps the first max_length tokens: any length at or past the quantized tokens, or a block
  /// boundary below them (whole blocks dropped); else a kvcache::Error and nothing changes.
  void crop(std::int64_t max_length) override {
    detail::out_of_memory_as_error("QuantizedCache::crop", [&]() {
      const char* where = "QuantizedCache::crop";
      std::vector<std::int64_t> targets;
      // One target for every layer, as DynamicCache and transformers take it: a negative
      // max_length drops from get_seq_length() (layer 0's tokens; 0 with no layer yet).
      const std::int64_t all =
          max_length >= 0 ? max_length : detail::crop_target(max_length, get_seq_length(), where);
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
          const std::size_t keep =
              static_cast<std::size_t>(l.res_begin + l.residual) * l.token_bytes();
          l.res_k.resize(keep);
          l.res_v.resize(keep);
        } else {
          const std::int64_t chunks = t / l.geo.chunk;
          for (auto& r : l.keys)
            r.resize(static_cast<std::size_t>(chunks * l.heads) * l.geo.key_head_bytes);
          for (auto& r : l.values)
            r.resize(static_cast<std::size_t>(chunks * l.heads) * l.geo.value_head_bytes);
          l.quantized = t;
          l.residual = l.res_begin = 0;
          l.res_k.clear();
          l.res_v.clear();
        }
      }
    });
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

  /// Bytes held: the blocks' bytes plus the residual (in the states' dtype).
  std::size_t nbytes() const override {
    std::size_t total = 0;
    for (const Layer& l : layers_) {
      for (const auto& r : l.keys) total += r.size();
      for (const auto& r : l.values) total += r.size();
      total += 2 * static_cast<std::size_t>(l.residual) * l.token_bytes();
    }
    return total;
  }
  std::size_t capacity_bytes() const override {
    std::size_t total = 0;
    for (const Layer& l : layers_) {
      for (const auto& r : l.keys) total += r.capacity();
      for (const auto& r : l.values) total += r.capacity();
      total += l.res_k.capacity() + l.res_v.capacity();
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

  /// Writes a view's blocks, dequantized, into slots [0, view.tokens) of out_k / out_v [batch,
  /// heads, >= tokens, head_dim] (contiguous CPU tensors of any float dtype): the simple scalar
  /// form, update()'s dequantize-then-attend path and the tests' reference.
  static void dequantize(const QuantizedKVView& view, const Tensor& out_k, const Tensor& out_v) {
    const detail::QuantCodec codec{view.nbits, view.scale_dtype};
    const std::int64_t d = view.head_dim, len = out_k.size(2), chunks = view.tokens / view.chunk;
    const std::int64_t groups = d / view.token_group;
    auto token_record = [&](const unsigned char* rec, void* out, DType dt, std::int64_t o) {
      const unsigned char* codes = rec + static_cast<std::size_t>(groups) * codec.meta_size();
      for (std::int64_t grp = 0; grp < groups; ++grp) {
        const auto [sc, mn] =
            codec.get_meta(rec + static_cast<std::size_t>(grp) * codec.meta_size());
        for (std::int64_t c = grp * view.token_group; c < (grp + 1) * view.token_group; ++c)
          detail::store_float(out, dt, o + c,
                              static_cast<float>(codec.get_code(codes, c)) * sc + mn);
      }
    };
    for (std::int64_t b = 0; b < view.batch; ++b) {
      const unsigned char* kb = view.keys[static_cast<std::size_t>(b)];
      const unsigned char* vb = view.values[static_cast<std::size_t>(b)];
      for (std::int64_t k = 0; k < chunks; ++k)
        for (std::int64_t h = 0; h < view.heads; ++h) {
          const unsigned char* krec =
              kb + static_cast<std::size_t>(k * view.heads + h) * view.key_head_bytes;
          const unsigned char* vrec =
              vb + static_cast<std::size_t>(k * view.heads + h) * view.value_head_bytes;
          const std::int64_t base = ((b * view.heads + h) * len + k * view.chunk) * d;
          for (std::int64_t i = 0; i < view.chunk; ++i)
            token_record(vrec + static_cast<std::size_t>(i) * view.token_record, out_v.data(),
                         out_v.dtype(), base + i * d);
          if (!view.keys_per_channel) {
            token_record(krec, out_k.data(), out_k.dtype(), base);
            continue;
          }
          const unsigned char* codes = krec + static_cast<std::size_t>(d) * codec.meta_size();
          for (std::int64_t c = 0; c < d; ++c) {
            const auto [sc, mn] =
                codec.get_meta(krec + static_cast<std::size_t>(c) * codec.meta_size());
            for (std::int64_t i = 0; i < view.chunk; ++i)
              detail::store_float(out_k.data(), out_k.dtype(), base + i * d + c,
                                  static_cast<float>(codec.get_code(codes, i * d + c)) * sc + mn);
          }
        }
    }
  }

  /// Batch rows held, or -1 while every layer is empty.
  std::int64_t batch_size() const {
    for (const Layer& l : layers_) {
      if (l.seen() > 0) return l.batch;
    }
    return -1;
  }

 private:
  using Geometry = detail::QuantGeometry;
  static Geometry geometry(const QuantizedCacheOptions& o, std::int64_t d) {
    return detail::quant_geometry(o, d);
  }

  struct Layer {
    std::int64_t batch = 0, heads = 0, head_dim = 0;
    DType dtype = DType::kFloat32;
    Geometry geo;
    std::int64_t quantized = 0;  // tokens in blocks, a multiple of geo.chunk
    std::int64_t residual = 0;   // tokens after them: slots [res_begin, res_begin + residual)
    std::int64_t res_begin = 0;  // slots already flushed (dropped at the next update)
    std::vector<std::vector<unsigned char>> keys, values;  // per batch row: chunks appended
    // Token-major [slot][batch][heads][head_dim] in `dtype`: a step appends its tokens, a flush
    // only advances res_begin (the step's views still read those slots), the next step moves the
    // live ones to the front.
    std::vector<unsigned char> res_k, res_v;
    std::int64_t seen() const { return quantized + residual; }
    std::size_t token_bytes() const {
      return static_cast<std::size_t>(batch * heads * head_dim) * dtype_size(dtype);
    }
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

  // Writes states [b, h, q, d] (any strides, the layer's dtype) to token-major residual slots
  // [slot, slot + q) of `res`.
  static void write_states(const Tensor& s, unsigned char* res, std::int64_t slot) {
    const std::int64_t batch = s.size(0), heads = s.size(1), q = s.size(2), d = s.size(3);
    const std::size_t es = dtype_size(s.dtype());
    const auto* src = static_cast<const unsigned char*>(s.data());
    for (std::int64_t t = 0; t < q; ++t)
      for (std::int64_t b = 0; b < batch; ++b)
        for (std::int64_t h = 0; h < heads; ++h) {
          unsigned char* dst =
              res + static_cast<std::size_t>(((slot + t) * batch + b) * heads + h) *
                        static_cast<std::size_t>(d) * es;
          const std::int64_t off = b * s.stride(0) + h * s.stride(1) + t * s.stride(2);
          if (s.stride(3) == 1) {
            std::memcpy(dst, src + static_cast<std::size_t>(off) * es,
                        static_cast<std::size_t>(d) * es);
          } else {
            for (std::int64_t c = 0; c < d; ++c)
              std::memcpy(dst + static_cast<std::size_t>(c) * es,
                          src + static_cast<std::size_t>(off + c * s.stride(3)) * es, es);
          }
        }
  }

  // One step: reserve everything (may throw; the cache is unchanged), then append the new tokens
  // to the residual, quantize the chunks leaving it and commit (nothing throws). The returned
  // view is the layer before the flush: old blocks, then residual + new tokens.
  AttentionKV step(const Tensor& key_states, const Tensor& value_states, int layer_idx,
                   const char* where) {
    const auto idx = static_cast<std::size_t>(layer_idx);
    const bool fresh = layer_idx == num_layers();
    const bool renew = fresh || layers_[idx].seen() == 0;  // an emptied layer takes the new layout
    Layer replacement = renew ? make_layer(key_states) : Layer{};
    Layer& l = renew ? replacement : layers_[idx];
    const Geometry& g = l.geo;
    const std::int64_t batch = l.batch, heads = l.heads, d = l.head_dim, q = key_states.size(2);
    const std::int64_t res = detail::checked_add(l.residual, q, where, "the residual");
    detail::checked_mul(detail::checked_mul(batch * heads * d, res, where, "the residual"),
                        static_cast<std::int64_t>(dtype_size(l.dtype)), where, "the residual");
    const std::int64_t flush =
        res > options_.residual_length ? (res - options_.residual_length) / g.chunk * g.chunk : 0;
    const std::int64_t chunks = flush / g.chunk;
    const std::size_t tb = l.token_bytes();
    // 1. Reserve (may throw; nothing observable changes).
    if (fresh) layers_.reserve(layers_.size() + 1);
    auto grow = [](std::vector<unsigned char>& v, std::size_t size) {
      if (size > v.capacity()) v.reserve(std::max(size, 2 * v.capacity()));
    };
    grow(l.res_k, std::max<std::size_t>(static_cast<std::size_t>(res) * tb, tb));
    grow(l.res_v, std::max<std::size_t>(static_cast<std::size_t>(res) * tb, tb));
    const std::size_t add_k = static_cast<std::size_t>(chunks * heads) * g.key_head_bytes;
    const std::size_t add_v = static_cast<std::size_t>(chunks * heads) * g.value_head_bytes;
    for (std::int64_t b = 0; b < batch; ++b) {
      grow(l.keys[static_cast<std::size_t>(b)], l.keys[static_cast<std::size_t>(b)].size() + add_k);
      grow(l.values[static_cast<std::size_t>(b)],
           l.values[static_cast<std::size_t>(b)].size() + add_v);
    }
    const bool wide = l.dtype == DType::kFloat32;  // else the flushed tokens are widened first
    std::vector<float> fk(wide ? 0 : static_cast<std::size_t>(flush * batch * heads * d)),
        fv(fk.size());
    QuantizedKVView view = make_view(l);  // the blocks before this step's flush
    // 2. Write (nothing throws: every resize below stays within the capacity reserved).
    if (l.res_begin > 0) {
      const std::size_t live = static_cast<std::size_t>(l.residual) * tb;
      const std::size_t from = static_cast<std::size_t>(l.res_begin) * tb;
      std::memmove(l.res_k.data(), l.res_k.data() + from, live);
      std::memmove(l.res_v.data(), l.res_v.data() + from, live);
      l.res_begin = 0;
    }
    l.res_k.resize(static_cast<std::size_t>(res) * tb);
    l.res_v.resize(l.res_k.size());
    write_states(key_states, l.res_k.data(), l.residual);
    write_states(value_states, l.res_v.data(), l.residual);
    const float* rk = reinterpret_cast<const float*>(l.res_k.data());
    const float* rv = reinterpret_cast<const float*>(l.res_v.data());
    if (!wide) {
      for (std::size_t i = 0; i < fk.size(); ++i) {
        fk[i] = detail::load_float(l.res_k.data(), l.dtype, static_cast<std::int64_t>(i));
        fv[i] = detail::load_float(l.res_v.data(), l.dtype, static_cast<std::int64_t>(i));
      }
      rk = fk.data();
      rv = fv.data();
    }
    for (std::int64_t b = 0; b < batch; ++b) {
      auto& kb = l.keys[static_cast<std::size_t>(b)];
      auto& vb = l.values[static_cast<std::size_t>(b)];
      const std::size_t k0 = kb.size(), v0 = vb.size();
      kb.resize(k0 + add_k);  // zeroed: codes are OR-ed in
      vb.resize(v0 + add_v);
      for (std::int64_t k = 0; k < chunks; ++k)
        for (std::int64_t h = 0; h < heads; ++h) {
          unsigned char* krec =
              kb.data() + k0 + static_cast<std::size_t>(k * heads + h) * g.key_head_bytes;
          unsigned char* vrec =
              vb.data() + v0 + static_cast<std::size_t>(k * heads + h) * g.value_head_bytes;
          quantize_chunk(rk, rv, k * g.chunk, b, h, batch, heads, d, krec, vrec, g);
        }
    }
    // The residual + new tokens as [batch, heads, res, d] views of the token-major slots.
    const std::int64_t shape[4] = {batch, heads, res, d};
    const std::int64_t strides[4] = {heads * d, d, batch * heads * d, 1};
    AttentionKV out{Tensor::from_blob(l.res_k.data(), shape, l.dtype, Device::kCpu, strides),
                    Tensor::from_blob(l.res_v.data(), shape, l.dtype, Device::kCpu, strides),
                    std::move(view)};
    l.quantized += flush;
    l.residual = res - flush;
    l.res_begin = flush;
    // 3. Commit (moving a Layer moves its vectors' buffers: the views stay valid).
    if (fresh) {
      layers_.push_back(std::move(replacement));
    } else if (renew) {
      layers_[idx] = std::move(replacement);
    }
    return out;
  }

  QuantizedKVView make_view(const Layer& l) const {
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
    v.keys.reserve(static_cast<std::size_t>(l.batch));
    v.values.reserve(static_cast<std::size_t>(l.batch));
    for (std::int64_t b = 0; b < l.batch; ++b) {
      v.keys.push_back(l.keys[static_cast<std::size_t>(b)].data());
      v.values.push_back(l.values[static_cast<std::size_t>(b)].data());
    }
    return v;
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
      // One token of one row: heads * head_dim elements; the live slots move to the front.
      const auto hd = static_cast<std::ptrdiff_t>(l.heads * l.head_dim) *
                      static_cast<std::ptrdiff_t>(dtype_size(l.dtype));
      out.res_begin = 0;
      out.res_k.assign(static_cast<std::size_t>(l.residual * n * hd), 0);
      out.res_v.assign(out.res_k.size(), 0);
      for (std::int64_t i = 0; i < n; ++i) {
        const auto src = static_cast<std::size_t>(rows[static_cast<std::size_t>(i)]);
        out.keys[static_cast<std::size_t>(i)] = l.keys[src];
        out.values[static_cast<std::size_t>(i)] = l.values[src];
        for (std::int64_t t = 0; t < l.residual; ++t) {
          const auto from = static_cast<std::ptrdiff_t>((l.res_begin + t) * l.batch +
                                                        static_cast<std::int64_t>(src)) *
                            hd;
          const auto to = static_cast<std::ptrdiff_t>(t * n + i) * hd;
          std::copy(l.res_k.begin() + from, l.res_k.begin() + from + hd, out.res_k.begin() + to);
          std::copy(l.res_v.begin() + from, l.res_v.begin() + from + hd, out.res_v.begin() + to);
        }
      }
      rebuilt.push_back(std::move(out));
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

extern template class QuantizedCache<cpu::Backend>;

}  // namespace kvcache

#include "kvcache/cache/quantized_cache_cuda.hpp"  // QuantizedCache<cuda::Backend>
