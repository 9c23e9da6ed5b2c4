// Fuzz target: the Cache API driven by a byte stream. The first bytes pick a DynamicCache (full
// layers, or sliding-window layers with small windows), a StaticCache (lazy or allocated up
// front), a SinkCache (small windows and sinks, with or without re-rotation) or a QuantizedCache
// (8 / 4 / 2 bits, small groups and residuals, either key axis) and the states' layout; the rest is
// a sequence of operations with sizes and indices from the input, the extremes included
// (crop(INT64_MIN), batch_repeat_interleave(2^62), ...): update, crop, reorder_cache,
// batch_repeat_interleave, batch_select_indices, reset, clone, to/from the legacy format,
// get_mask_sizes. Tensors stay tiny (batch <= 4, 2 heads, head_dim
// <= 4, a few tokens), so each input runs in microseconds.
//
// Checked after every operation, against a snapshot taken before it:
// - a call that throws (only kvcache::Error may) changes nothing: every layer's length, shape
//   and contents are as they were (the strong guarantee);
// - a call that returns did what it says on every full-attention layer: update appended (or, in
//   a StaticCache, wrote at cache_position) the new states and kept the slots before them, crop
//   kept a prefix, the batch operations moved whole rows, reset emptied, clone and the legacy
//   round trip copied exactly and independently.
// SinkCache and QuantizedCache have no legacy form: their snapshot is what they expose (a sink
// layer's stored slots from storage(); a quantized layer's lengths and its blocks' bytes, row by
// row), so the strong guarantee is checked on those, and a call that returns is checked for its
// lengths (a sink layer never holds more than its window; a quantized layer keeps every token
// seen, and crop keeps a prefix) rather than its contents, which their unit tests check against
// references (re-rotation; dequantization).
// A broken expectation is a finding (abort), as is any crash or sanitizer report.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "fuzz_util.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/cache/quantized_cache.hpp"
#include "kvcache/cache/sink_cache.hpp"
#include "kvcache/cache/static_cache.hpp"

namespace {

using kvcache::DType;
using kvcache::DynamicCache;
using kvcache::DynamicCacheOptions;
using kvcache::LegacyCache;
using kvcache::QuantizedCache;
using kvcache::QuantizedCacheOptions;
using kvcache::SinkCache;
using kvcache::SinkCacheOptions;
using kvcache::StaticCache;
using kvcache::StaticCacheOptions;
using kvcache::Tensor;
using kvcache::fuzz::ByteReader;

// One layer as to_legacy_cache shows it: [batch, heads, tokens, head_dim] and its bytes.
struct LayerSnap {
  std::int64_t seq_len = 0;  // get_seq_length (tokens seen)
  std::int64_t dims[4] = {0, 0, 0, 0};
  std::size_t element = 0;
  std::vector<unsigned char> keys, values;

  const unsigned char* at(const std::vector<unsigned char>& data, std::int64_t b, std::int64_t h,
                          std::int64_t t) const {
    return data.data() +
           static_cast<std::size_t>(((b * dims[1] + h) * dims[2] + t) * dims[3]) * element;
  }
  std::size_t row_bytes() const { return static_cast<std::size_t>(dims[3]) * element; }
};

struct Snap {
  std::vector<LayerSnap> layers;
};

std::vector<unsigned char> bytes_of(const Tensor& t) {
  std::vector<unsigned char> out;
  if (!t.defined()) return out;
  const std::size_t e = t.element_size();
  out.reserve(static_cast<std::size_t>(t.numel()) * e);
  const auto* base = static_cast<const unsigned char*>(t.data());
  for (std::int64_t b = 0; b < t.size(0); ++b)
    for (std::int64_t h = 0; h < t.size(1); ++h)
      for (std::int64_t s = 0; s < t.size(2); ++s)
        for (std::int64_t d = 0; d < t.size(3); ++d) {
          const unsigned char* p = base + static_cast<std::size_t>(t.offset({b, h, s, d})) * e;
          out.insert(out.end(), p, p + e);
        }
  return out;
}

template <class C>
Snap legacy_snapshot(const C& cache);

template <class C>
constexpr bool kHasLegacy = std::is_same_v<C, DynamicCache<>> || std::is_same_v<C, StaticCache<>>;

template <class C>
Snap snapshot(const C& cache) {
  Snap snap;
  if constexpr (std::is_same_v<C, SinkCache<>>) {
    for (int l = 0; l < cache.num_layers(); ++l) {
      LayerSnap layer;
      layer.seq_len = cache.get_seq_length(l);
      const std::int64_t stored = cache.stored_length(l);
      const auto [k, v] = cache.storage(l);
      if (stored > 0 && k.defined() && k.rank() == 4) {
        FUZZ_ASSERT(stored <= k.size(2), "sink layer %d stores %lld of %lld slots", l,
                    static_cast<long long>(stored), static_cast<long long>(k.size(2)));
        const Tensor ks = k.slice(2, 0, stored), vs = v.slice(2, 0, stored);
        for (int d = 0; d < 4; ++d) layer.dims[d] = ks.size(d);
        layer.element = ks.element_size();
        layer.keys = bytes_of(ks);
        layer.values = bytes_of(vs);
      }
      snap.layers.push_back(std::move(layer));
    }
    return snap;
  } else if constexpr (std::is_same_v<C, QuantizedCache<>>) {
    for (int l = 0; l < cache.num_layers(); ++l) {
      LayerSnap layer;
      layer.seq_len = cache.get_seq_length(l);
      layer.dims[0] = cache.batch_size();
      layer.dims[2] = cache.quantized_length(l);
      for (std::int64_t r = 0; layer.seq_len > 0 && r < layer.dims[0]; ++r) {
        const auto [k, v] = cache.block_bytes(l, r);
        layer.keys.insert(layer.keys.end(), k.begin(), k.end());
        layer.values.insert(layer.values.end(), v.begin(), v.end());
      }
      snap.layers.push_back(std::move(layer));
    }
    return snap;
  } else {
    return legacy_snapshot(cache);
  }
}

template <class C>
Snap legacy_snapshot(const C& cache) {
  Snap snap;
  const LegacyCache legacy = cache.to_legacy_cache();
  FUZZ_ASSERT(static_cast<int>(legacy.size()) == cache.num_layers(), "legacy has %zu layers",
              legacy.size());
  for (int l = 0; l < cache.num_layers(); ++l) {
    LayerSnap layer;
    layer.seq_len = cache.get_seq_length(l);
    const Tensor& k = legacy[static_cast<std::size_t>(l)].first;
    const Tensor& v = legacy[static_cast<std::size_t>(l)].second;
    if (k.defined() && k.rank() == 4) {
      for (int d = 0; d < 4; ++d) layer.dims[d] = k.size(d);
      layer.element = k.element_size();
      FUZZ_ASSERT(v.defined() && v.shape_string() == k.shape_string(), "keys %s, values %s",
                  k.shape_string().c_str(), v.shape_string().c_str());
      layer.keys = bytes_of(k);
      layer.values = bytes_of(v);
    }
    snap.layers.push_back(std::move(layer));
  }
  return snap;
}

bool same_layer(const LayerSnap& a, const LayerSnap& b) {
  if (a.seq_len != b.seq_len) return false;
  if (a.seq_len == 0) return true;  // an empty layer's leftover shape is not part of its state
  return std::memcmp(a.dims, b.dims, sizeof a.dims) == 0 && a.keys == b.keys &&
         a.values == b.values;
}

void expect_same(const Snap& a, const Snap& b, const char* what) {
  FUZZ_ASSERT(a.layers.size() == b.layers.size(), "%s: %zu layers became %zu", what,
              a.layers.size(), b.layers.size());
  for (std::size_t l = 0; l < a.layers.size(); ++l)
    FUZZ_ASSERT(same_layer(a.layers[l], b.layers[l]), "%s: layer %zu changed (length %lld -> %lld)",
                what, l, static_cast<long long>(a.layers[l].seq_len),
                static_cast<long long>(b.layers[l].seq_len));
}

// Token t of every (row, head) of `after` equals token t of row row_of(b) in `before`.
template <class RowOf>
void expect_rows(const LayerSnap& before, const LayerSnap& after, std::int64_t tokens, RowOf row_of,
                 const char* what) {
  for (std::int64_t b = 0; b < after.dims[0]; ++b)
    for (std::int64_t h = 0; h < after.dims[1]; ++h)
      for (std::int64_t t = 0; t < tokens; ++t) {
        const std::int64_t src = row_of(b);
        FUZZ_ASSERT(std::memcmp(after.at(after.keys, b, h, t), before.at(before.keys, src, h, t),
                                after.row_bytes()) == 0 &&
                        std::memcmp(after.at(after.values, b, h, t),
                                    before.at(before.values, src, h, t), after.row_bytes()) == 0,
                    "%s: row %lld head %lld token %lld differs from row %lld before", what,
                    static_cast<long long>(b), static_cast<long long>(h), static_cast<long long>(t),
                    static_cast<long long>(src));
      }
}

// Fresh, distinct, non-zero states [batch, heads, q_len, head_dim] of `dtype`.
Tensor states(std::int64_t batch, std::int64_t heads, std::int64_t q_len, std::int64_t head_dim,
              DType dtype, std::uint32_t& counter) {
  Tensor t = Tensor::empty({batch, heads, q_len, head_dim}, dtype);
  auto* p = static_cast<unsigned char*>(t.data());
  for (std::size_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<unsigned char>(++counter | 1);
  return t;
}

std::int64_t interesting(ByteReader& in) {
  switch (in.below(8)) {
    case 0:
      return std::numeric_limits<std::int64_t>::min();
    case 1:
      return std::numeric_limits<std::int64_t>::max();
    case 2:
      return std::int64_t{1} << 62;
    case 3:
      return in.i64();
    default:
      return static_cast<std::int8_t>(in.byte()) % 12;  // small, either sign
  }
}

// A size: small, or an extreme whose storage could never be allocated (a size that fits in memory
// is a legitimate request, only slow, so no random large one is drawn).
std::int64_t size_or_extreme(ByteReader& in, std::int64_t small) {
  if (in.below(8) != 0) return in.below(small);
  const std::int64_t extremes[] = {std::numeric_limits<std::int64_t>::min(),
                                   -1,
                                   0,
                                   std::numeric_limits<std::int64_t>::max(),
                                   std::int64_t{1} << 62,
                                   (std::int64_t{1} << 62) + 1,
                                   std::int64_t{1} << 50};
  return extremes[in.below(7)];
}

std::vector<std::int64_t> indices(ByteReader& in) {
  std::vector<std::int64_t> out(static_cast<std::size_t>(in.below(6)));
  for (std::int64_t& i : out) i = in.below(16) == 0 ? interesting(in) : in.below(5);
  return out;
}

template <class C>
struct Driver {
  static constexpr bool kStatic = std::is_same_v<C, StaticCache<>>;
  static constexpr bool kSink = std::is_same_v<C, SinkCache<>>;
  static constexpr bool kQuantized = std::is_same_v<C, QuantizedCache<>>;
  std::unique_ptr<C> cache;
  std::vector<std::int64_t> windows;  // DynamicCache: per layer, 0 = full
  std::int64_t heads = 1, head_dim = 1;
  DType dtype = DType::kFloat32;
  std::uint32_t counter = 0;

  // A layer whose contents are checked exactly (its legacy form): not a sink or quantized one.
  bool full_layer(std::size_t l) const {
    return kHasLegacy<C> && (kStatic || l >= windows.size() || windows[l] == 0);
  }
  bool all_full(std::size_t layers) const {
    for (std::size_t l = 0; l < layers; ++l)
      if (!full_layer(l)) return false;
    return true;
  }
  std::int64_t batch() const { return cache->batch_size(); }

  // Runs `op`; when it throws a kvcache::Error the cache must be as it was. Returns whether it
  // returned normally.
  template <class Op>
  bool attempt(const char* what, const Snap& before, Op&& op) {
    bool ok = false;
    kvcache::fuzz::expect_only_errors(what, [&] {
      op();
      ok = true;
    });
    if (!ok) expect_same(before, snapshot(*cache), what);
    return ok;
  }

  void update(ByteReader& in, const Snap& before) {
    const int layer = static_cast<int>(in.below(8) == 0 ? interesting(in) : in.below(4));
    std::int64_t b = batch() > 0 ? batch() : 1 + in.below(3);
    std::int64_t h = heads, d = head_dim, q = in.below(5);
    DType dt = dtype;
    switch (in.below(16)) {  // now and then, states that do not fit
      case 0:
        b = 1 + in.below(4);
        break;
      case 1:
        h = 1 + in.below(3);
        break;
      case 2:
        d = 1 + in.below(5);
        break;
      case 3:
        dt = DType::kBFloat16;
        break;
      default:
        break;
    }
    std::vector<std::int64_t> positions;
    if (kStatic && in.below(2) == 0) {
      const std::int64_t start = in.below(8) == 0 ? interesting(in) : in.below(10);
      for (std::int64_t i = 0; i < q; ++i) {  // consecutive, now and then with a gap
        const bool near_max = start > std::numeric_limits<std::int64_t>::max() - 64;
        positions.push_back(near_max ? start : start + i + (in.below(16) == 0 ? 1 : 0));
      }
    }
    const Tensor k = states(b, h, q, d, dt, counter);
    const Tensor v = states(b, h, q, d, dt, counter);
    std::pair<Tensor, Tensor> out;
    if (!attempt("update", before,
                 [&] { out = cache->update(k, v, layer, {.cache_position = positions}); }))
      return;
    const Snap after = snapshot(*cache);
    const auto l = static_cast<std::size_t>(layer);
    FUZZ_ASSERT(l < after.layers.size(), "update of layer %d left %zu layers", layer,
                after.layers.size());
    for (std::size_t o = 0; o < after.layers.size(); ++o) {
      if (o == l) continue;
      FUZZ_ASSERT(o >= before.layers.size() || same_layer(before.layers[o], after.layers[o]),
                  "update of layer %d changed layer %zu", layer, o);
    }
    const LayerSnap old = l < before.layers.size() ? before.layers[l] : LayerSnap{};
    if constexpr (kSink || kQuantized) {  // tokens seen; a sink layer holds at most its window
      FUZZ_ASSERT(after.layers[l].seq_len == old.seq_len + q,
                  "update: %lld seen, expected %lld + %lld",
                  static_cast<long long>(after.layers[l].seq_len),
                  static_cast<long long>(old.seq_len), static_cast<long long>(q));
      if constexpr (kSink) {
        FUZZ_ASSERT(cache->stored_length(layer) <= cache->window_length(),
                    "update: a sink layer holds %lld tokens past its window of %lld",
                    static_cast<long long>(cache->stored_length(layer)),
                    static_cast<long long>(cache->window_length()));
      }
    }
    if (!full_layer(l)) return;
    const LayerSnap& now = after.layers[l];
    const std::int64_t kept = positions.empty() ? old.seq_len : positions.front();
    FUZZ_ASSERT(now.seq_len == kept + q, "update: length %lld, expected %lld + %lld",
                static_cast<long long>(now.seq_len), static_cast<long long>(kept),
                static_cast<long long>(q));
    if (now.seq_len == 0) return;
    FUZZ_ASSERT(
        now.dims[0] == b && now.dims[1] == h && now.dims[2] == now.seq_len && now.dims[3] == d,
        "update: layer shaped [%lld, %lld, %lld, %lld]", static_cast<long long>(now.dims[0]),
        static_cast<long long>(now.dims[1]), static_cast<long long>(now.dims[2]),
        static_cast<long long>(now.dims[3]));
    if (kept > 0)
      expect_rows(
          old, now, kept, [](std::int64_t r) { return r; }, "update (kept)");
    LayerSnap fresh;
    fresh.seq_len = q;
    fresh.dims[0] = b, fresh.dims[1] = h, fresh.dims[2] = q, fresh.dims[3] = d;
    fresh.element = k.element_size();
    fresh.keys = bytes_of(k);
    fresh.values = bytes_of(v);
    for (std::int64_t r = 0; r < b; ++r)
      for (std::int64_t hh = 0; hh < h; ++hh)
        for (std::int64_t t = 0; t < q; ++t)
          FUZZ_ASSERT(std::memcmp(now.at(now.keys, r, hh, kept + t), fresh.at(fresh.keys, r, hh, t),
                                  now.row_bytes()) == 0 &&
                          std::memcmp(now.at(now.values, r, hh, kept + t),
                                      fresh.at(fresh.values, r, hh, t), now.row_bytes()) == 0,
                      "update: new token %lld not stored", static_cast<long long>(t));
    FUZZ_ASSERT(bytes_of(out.first) == now.keys && bytes_of(out.second) == now.values,
                "update: returned views differ from the cache's contents");
  }

  void crop(ByteReader& in, const Snap& before) {
    const std::int64_t n = interesting(in);
    if (!attempt("crop", before, [&] { cache->crop(n); })) return;
    const Snap after = snapshot(*cache);
    const std::int64_t seen = before.layers.empty() ? 0 : before.layers[0].seq_len;
    FUZZ_ASSERT(n >= 0 || n >= -seen, "crop(%lld) of %lld tokens did not throw",
                static_cast<long long>(n), static_cast<long long>(seen));
    const std::int64_t target = n >= 0 ? n : seen + n;
    for (std::size_t l = 0; l < after.layers.size(); ++l) {
      if constexpr (kQuantized) {  // keeps a prefix of what it has seen
        FUZZ_ASSERT(after.layers[l].seq_len == std::min(before.layers[l].seq_len, target),
                    "crop(%lld): quantized layer %zu holds %lld", static_cast<long long>(n), l,
                    static_cast<long long>(after.layers[l].seq_len));
      }
      if (!full_layer(l)) continue;
      const LayerSnap& old = before.layers[l];
      const LayerSnap& now = after.layers[l];
      FUZZ_ASSERT(now.seq_len == std::min(old.seq_len, target), "crop(%lld): layer %zu holds %lld",
                  static_cast<long long>(n), l, static_cast<long long>(now.seq_len));
      if (now.seq_len > 0)
        expect_rows(
            old, now, now.seq_len, [](std::int64_t r) { return r; }, "crop");
    }
  }

  template <class Op, class RowOf>
  void gather(const char* what, const Snap& before, std::int64_t rows, Op&& op, RowOf row_of) {
    const std::int64_t old_batch = batch();
    if (!attempt(what, before, op)) return;
    const Snap after = snapshot(*cache);
    FUZZ_ASSERT(after.layers.size() == before.layers.size(), "%s: layer count changed", what);
    if (old_batch < 0) {
      expect_same(before, after, what);
      return;
    }
    for (std::size_t l = 0; l < after.layers.size(); ++l) {
      const LayerSnap& old = before.layers[l];
      const LayerSnap& now = after.layers[l];
      FUZZ_ASSERT(now.seq_len == old.seq_len, "%s: layer %zu length changed", what, l);
      if (now.seq_len == 0 || !full_layer(l)) continue;
      FUZZ_ASSERT(now.dims[0] == rows, "%s: layer %zu has %lld rows, expected %lld", what, l,
                  static_cast<long long>(now.dims[0]), static_cast<long long>(rows));
      expect_rows(old, now, now.seq_len, row_of, what);
    }
  }

  void step(ByteReader& in) {
    const Snap before = snapshot(*cache);
    switch (in.below(10)) {
      case 0:
      case 1:
      case 2:
        update(in, before);
        break;
      case 3:
        crop(in, before);
        break;
      case 4: {
        const std::vector<std::int64_t> idx = indices(in);
        gather(
            "reorder_cache", before, static_cast<std::int64_t>(idx.size()),
            [&] { cache->reorder_cache(idx); }, [&](std::int64_t i) { return idx[i]; });
        break;
      }
      case 5: {
        const std::vector<std::int64_t> idx = indices(in);
        gather(
            "batch_select_indices", before, static_cast<std::int64_t>(idx.size()),
            [&] { cache->batch_select_indices(idx); }, [&](std::int64_t i) { return idx[i]; });
        break;
      }
      case 6: {
        std::int64_t n = size_or_extreme(in, 4);
        if (n > 1 && n < 64 && batch() * n > 16) n = 1;  // keeps the states tiny
        const std::int64_t rows = batch() > 0 && n > 0 && n < 64 ? batch() * n : 0;
        gather(
            "batch_repeat_interleave", before, rows, [&] { cache->batch_repeat_interleave(n); },
            [&](std::int64_t i) { return i / n; });
        break;
      }
      case 7: {
        cache->reset();
        const Snap after = snapshot(*cache);
        FUZZ_ASSERT(after.layers.size() == before.layers.size(), "reset changed the layer count");
        for (const LayerSnap& l : after.layers) FUZZ_ASSERT(l.seq_len == 0, "reset left tokens");
        break;
      }
      case 8: {
        // A deep copy: equal now, and independent (updating the copy leaves the original).
        std::unique_ptr<C> copy;
        kvcache::fuzz::expect_only_errors("clone",
                                          [&] { copy = std::make_unique<C>(cache->clone()); });
        if (!copy) break;
        expect_same(before, snapshot(*copy), "clone");
        std::swap(cache, copy);  // drive the clone from now on
        Snap copied = snapshot(*cache);
        update(in, copied);
        expect_same(before, snapshot(*copy), "clone (the original after updating the copy)");
        break;
      }
      default: {
        if constexpr (std::is_same_v<C, DynamicCache<>>) {
          if (all_full(before.layers.size())) {
            std::unique_ptr<C> rebuilt;
            kvcache::fuzz::expect_only_errors("from_legacy_cache", [&] {
              rebuilt = std::make_unique<C>(
                  C::from_legacy_cache(cache->to_legacy_cache(), {.sliding_windows = windows}));
            });
            if (rebuilt) {
              Snap round = snapshot(*rebuilt);
              // Empty layers come back as layers holding nothing; compare what is held.
              expect_same(before, round, "legacy round trip");
              cache = std::move(rebuilt);
            }
            break;
          }
        }
        std::vector<std::int64_t> positions(static_cast<std::size_t>(in.below(4)));
        for (std::int64_t& p : positions) p = in.below(8) == 0 ? interesting(in) : in.below(12);
        const int layer = static_cast<int>(in.below(8) == 0 ? interesting(in) : in.below(4));
        kvcache::fuzz::expect_only_errors("get_mask_sizes", [&] {
          const kvcache::MaskSizes sizes = cache->get_mask_sizes(positions, layer);
          FUZZ_ASSERT(sizes.kv_length >= 0 && sizes.kv_offset >= 0, "mask sizes (%lld, %lld)",
                      static_cast<long long>(sizes.kv_length),
                      static_cast<long long>(sizes.kv_offset));
        });
        kvcache::fuzz::expect_only_errors("get_seq_length",
                                          [&] { (void)cache->get_seq_length(layer); });
        (void)cache->nbytes();
        (void)cache->capacity_bytes();
        break;
      }
    }
  }
};

template <class C>
void run(Driver<C>& driver, ByteReader& in) {
  for (int i = 0; i < 48 && !in.empty(); ++i) driver.step(in);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  ByteReader in(data, size);
  const std::int64_t kind = in.below(6);
  const std::int64_t heads = 1 + in.below(2), head_dim = 1 + in.below(4);
  const DType dtype = in.below(4) == 0 ? DType::kFloat16 : DType::kFloat32;
  if (kind < 2) {
    DynamicCacheOptions options;
    options.initial_capacity = size_or_extreme(in, 20);
    if (kind == 1) {
      for (int l = 0; l < 3; ++l)
        options.sliding_windows.push_back(in.below(4) == 0 ? 0 : 1 + in.below(6));
      options.sliding_spare_slots = size_or_extreme(in, 4);
    }
    Driver<DynamicCache<>> driver;
    driver.windows = options.sliding_windows;
    driver.heads = heads, driver.head_dim = head_dim, driver.dtype = dtype;
    kvcache::fuzz::expect_only_errors(
        "DynamicCache", [&] { driver.cache = std::make_unique<DynamicCache<>>(options); });
    if (driver.cache) run(driver, in);
  } else if (kind == 4) {
    SinkCacheOptions options;
    options.window_length = in.below(8) == 0 ? size_or_extreme(in, 4) : 1 + in.below(8);
    options.num_sink_tokens = in.below(8) == 0 ? interesting(in) : in.below(3);
    if (in.below(2) == 0) {  // re-rotation over head_dim / 2 frequencies (or a wrong count)
      const std::int64_t n = head_dim / 2 + (in.below(8) == 0 ? 1 : 0);
      for (std::int64_t i = 0; i < n; ++i) options.rope_inv_freq.push_back(1.0f / (1.0f + i));
    }
    Driver<SinkCache<>> driver;
    driver.heads = heads, driver.head_dim = head_dim, driver.dtype = dtype;
    kvcache::fuzz::expect_only_errors(
        "SinkCache", [&] { driver.cache = std::make_unique<SinkCache<>>(options); });
    if (driver.cache) run(driver, in);
  } else if (kind == 5) {
    QuantizedCacheOptions options;
    const int bits[] = {2, 4, 8, 3};
    options.nbits = bits[in.below(8) == 0 ? 3 : in.below(3)];
    options.group_size = in.below(8) == 0 ? size_or_extreme(in, 4) : 1 + in.below(4);
    options.key_axis =
        in.below(2) == 0 ? kvcache::QuantAxis::kPerChannel : kvcache::QuantAxis::kPerToken;
    options.residual_length = in.below(8) == 0 ? size_or_extreme(in, 4) : in.below(5);
    options.scale_dtype = in.below(2) == 0 ? DType::kFloat16 : DType::kFloat32;
    Driver<QuantizedCache<>> driver;
    driver.heads = heads, driver.head_dim = head_dim, driver.dtype = dtype;
    kvcache::fuzz::expect_only_errors(
        "QuantizedCache", [&] { driver.cache = std::make_unique<QuantizedCache<>>(options); });
    if (driver.cache) run(driver, in);
  } else {
    StaticCacheOptions options;
    options.max_batch_size = size_or_extreme(in, 5);
    options.max_cache_len = size_or_extreme(in, 12);
    options.dtype = dtype;
    if (kind == 3) {
      options.num_layers = static_cast<int>(in.below(4));
      options.num_kv_heads = heads;
      options.head_dim = head_dim;
    }
    Driver<StaticCache<>> driver;
    driver.heads = heads, driver.head_dim = head_dim, driver.dtype = dtype;
    kvcache::fuzz::expect_only_errors(
        "StaticCache", [&] { driver.cache = std::make_unique<StaticCache<>>(options); });
    if (driver.cache) run(driver, in);
  }
  return 0;
}
