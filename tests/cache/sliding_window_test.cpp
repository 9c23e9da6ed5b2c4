// Sliding-window caching against naive references: SlidingWindowLayer (the mirrored ring) against
// the whole history kept by concatenation, for many windows, spare slot counts and step patterns;
// get_mask_sizes against transformers' DynamicSlidingWindowLayer formula; crop within the spare
// slots and crop too far (an error leaving everything unchanged); the batch operations, clone and
// reset through a DynamicCache mixing full and sliding layers; cpu::attention's window rule
// against the float64 reference on both kernel paths; and the attention module over a sliding
// cache equal to the same module over a full cache.
#include "kvcache/cache/sliding_window_layer.hpp"

#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "kvcache/attention/attention.hpp"
#include "kvcache/backend/cpu.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "reference/reference.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using reference::Array4;
using testing::random_tensor;
using testing::to_doubles;

using Layer = SlidingWindowLayer<cpu::Backend>;

// Tokens [t0, t1) of a [b, h, s, d] history as a dense array.
Array4 tokens(const Array4& history, std::int64_t t0, std::int64_t t1) {
  Array4 out(history.dims[0], history.dims[1], t1 - t0, history.dims[3]);
  for (std::int64_t b = 0; b < out.dims[0]; ++b)
    for (std::int64_t h = 0; h < out.dims[1]; ++h)
      for (std::int64_t s = 0; s < out.dims[2]; ++s)
        for (std::int64_t d = 0; d < out.dims[3]; ++d)
          out.at(b, h, s, d) = history.at(b, h, t0 + s, d);
  return out;
}

// The reference: every token ever stored, by concatenation (crop cuts it).
struct History {
  Array4 keys, values;
  std::int64_t length() const { return keys.data.empty() ? 0 : keys.dims[2]; }
  void append(const Tensor& k, const Tensor& v) {
    keys = reference::cat_seq(keys, Array4::from(k));
    values = reference::cat_seq(values, Array4::from(v));
  }
  void crop(std::int64_t n) {
    keys = reference::crop_seq(keys, n);
    values = reference::crop_seq(values, n);
  }
  void select(const std::vector<std::int64_t>& rows) {
    keys = reference::select_batch(keys, rows);
    values = reference::select_batch(values, rows);
  }
};

// transformers' DynamicSlidingWindowLayer.get_mask_sizes, written as it is there.
MaskSizes transformers_mask_sizes(std::int64_t cumulative_length, std::int64_t window,
                                  std::int64_t query_length) {
  const bool is_full = cumulative_length >= window;
  const std::int64_t kv_offset = std::max<std::int64_t>(cumulative_length - window + 1, 0);
  const std::int64_t kv_length =
      is_full ? window - 1 + query_length : cumulative_length + query_length;
  return {kv_length, kv_offset};
}

// Checks what the layer keeps and holds against the history.
void expect_layer_matches(const Layer& layer, const History& ref, const std::string& what) {
  ASSERT_EQ(layer.get_seq_length(), ref.length()) << what;
  const std::int64_t seen = ref.length();
  const std::int64_t kept = std::min(seen, layer.window() - 1);
  ASSERT_EQ(layer.kept_length(), kept) << what;
  ASSERT_LE(layer.held(), layer.max_held()) << what;
  ASSERT_LE(layer.first_held(), seen - kept) << what << ": the next step's keys must be held";
  if (seen == 0) return;
  const auto [k, v] = layer.kept();
  EXPECT_EQ(to_doubles(k), tokens(ref.keys, seen - kept, seen).data) << what << ": kept keys";
  EXPECT_EQ(to_doubles(v), tokens(ref.values, seen - kept, seen).data) << what << ": kept values";
  const auto [hk, hv] = layer.held_tokens();
  EXPECT_EQ(to_doubles(hk), tokens(ref.keys, layer.first_held(), seen).data) << what;
  EXPECT_EQ(to_doubles(hv), tokens(ref.values, layer.first_held(), seen).data) << what;
}

// One update of q_len tokens, checked: mask sizes before it, what it returns, what stays.
void step(Layer& layer, History& ref, std::int64_t batch, std::int64_t q_len, std::mt19937& rng,
          const std::string& what, DType dtype = DType::kFloat32) {
  const MaskSizes sizes = layer.get_mask_sizes(q_len);
  const MaskSizes want = transformers_mask_sizes(ref.length(), layer.window(), q_len);
  EXPECT_EQ(sizes.kv_length, want.kv_length) << what;
  EXPECT_EQ(sizes.kv_offset, want.kv_offset) << what;
  const Tensor k = random_tensor({batch, 2, q_len, 4}, dtype, rng);
  const Tensor v = random_tensor({batch, 2, q_len, 4}, dtype, rng);
  const auto [keys, values] = layer.update(k, v);
  ref.append(k, v);
  const std::int64_t end = ref.length();
  ASSERT_EQ(keys.size(2), sizes.kv_length) << what;
  EXPECT_EQ(to_doubles(keys), tokens(ref.keys, sizes.kv_offset, end).data) << what << ": keys";
  EXPECT_EQ(to_doubles(values), tokens(ref.values, sizes.kv_offset, end).data) << what;
  expect_layer_matches(layer, ref, what);
}

TEST(SlidingWindowLayer, MaskSizesFollowTransformers) {
  // Window 6: a 9-token prefill attends over all 9; then each step over the 5 kept + 1 new.
  Layer layer(6);
  EXPECT_EQ(layer.get_mask_sizes(9).kv_length, 9);
  EXPECT_EQ(layer.get_mask_sizes(9).kv_offset, 0);
  std::mt19937 rng(1);
  layer.update(random_tensor({1, 2, 9, 4}, DType::kFloat32, rng),
               random_tensor({1, 2, 9, 4}, DType::kFloat32, rng));
  EXPECT_EQ(layer.get_seq_length(), 9);  // tokens seen, not kept
  EXPECT_EQ(layer.get_mask_sizes(1).kv_length, 6);
  EXPECT_EQ(layer.get_mask_sizes(1).kv_offset, 4);
  EXPECT_EQ(layer.get_mask_sizes(3).kv_length, 8);
  for (std::int64_t window : {1, 2, 5, 6, 17}) {
    for (std::int64_t seen : {0, 1, 4, 5, 6, 7, 40}) {
      Layer l(window, 40);
      if (seen > 0)
        l.update(random_tensor({1, 1, seen, 4}, DType::kFloat32, rng),
                 random_tensor({1, 1, seen, 4}, DType::kFloat32, rng));
      for (std::int64_t q_len : {1, 3, 9}) {
        const MaskSizes got = l.get_mask_sizes(q_len);
        const MaskSizes want = transformers_mask_sizes(seen, window, q_len);
        EXPECT_EQ(got.kv_length, want.kv_length) << window << " " << seen << " " << q_len;
        EXPECT_EQ(got.kv_offset, want.kv_offset) << window << " " << seen << " " << q_len;
      }
    }
  }
}

TEST(SlidingWindowLayer, UpdatesPastTheWindowMatchTheHistory) {
  std::mt19937 rng(7);
  for (std::int64_t window : {1, 2, 3, 6, 13, 40}) {  // 40: the ring grows while it fills
    for (std::int64_t spare : {0, 1, 2, 8}) {
      if (window == 1 && spare == 0) continue;  // holds nothing: refused (tested below)
      for (std::int64_t prefill : {1, 4, 9, 30}) {
        Layer layer(window, spare);
        History ref;
        const std::string what = "window " + std::to_string(window) + " spare " +
                                 std::to_string(spare) + " prefill " + std::to_string(prefill);
        step(layer, ref, 2, prefill, rng, what);
        for (int s = 0; s < 30; ++s) {
          // Mostly single tokens, sometimes a few (speculative drafts, chunked prompts).
          const std::int64_t q_len = s % 7 == 3 ? 1 + static_cast<std::int64_t>(rng() % 9) : 1;
          step(layer, ref, 2, q_len, rng, what + " step " + std::to_string(s));
        }
        EXPECT_LE(layer.ring_capacity(), layer.max_held()) << what;
      }
    }
  }
}

TEST(SlidingWindowLayer, SixteenBitStatesToo) {
  std::mt19937 rng(8);
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    Layer layer(5, 3);
    History ref;
    step(layer, ref, 1, 7, rng, "prefill", dtype);
    for (int s = 0; s < 12; ++s) step(layer, ref, 1, 1, rng, "step", dtype);
  }
}

TEST(SlidingWindowLayer, DecodeStepsWriteInPlaceWithoutReallocating) {
  std::mt19937 rng(9);
  Layer layer(6, 4);  // holds at most 9 tokens
  History ref;
  step(layer, ref, 1, 3, rng, "prefill");
  // The ring grows to its bound and then never moves: a step writes only its own tokens.
  for (int s = 0; s < 10; ++s) step(layer, ref, 1, 1, rng, "fill");
  EXPECT_EQ(layer.ring_capacity(), layer.max_held());
  const void* storage = layer.storage().first.data();
  for (int s = 0; s < 40; ++s) {
    const Tensor k = random_tensor({1, 2, 1, 4}, DType::kFloat32, rng);
    const Tensor v = random_tensor({1, 2, 1, 4}, DType::kFloat32, rng);
    const auto [keys, values] = layer.update(k, v);
    ref.append(k, v);
    // Views of the ring: the returned keys lie inside the storage, one contiguous strided run.
    const auto* base = static_cast<const float*>(storage);
    const auto* first = static_cast<const float*>(keys.data());
    EXPECT_GE(first, base);
    EXPECT_LE(first + (keys.size(2) - 1) * keys.stride(2), base + layer.storage().first.numel());
    EXPECT_EQ(keys.size(2), 6);
    EXPECT_EQ(to_doubles(keys), tokens(ref.keys, ref.length() - 6, ref.length()).data);
    EXPECT_EQ(layer.storage().first.data(), storage) << "step " << s;
  }
}

TEST(SlidingWindowLayer, CropWithinTheSpareSlotsWorksAfterTheWindowFilled) {
  std::mt19937 rng(10);
  Layer layer(6, 3);  // keeps 5 + 3
  History ref;
  step(layer, ref, 2, 9, rng, "prefill");
  for (int s = 0; s < 11; ++s) step(layer, ref, 2, 1, rng, "decode");
  ASSERT_EQ(layer.get_seq_length(), 20);
  // Drop the last 2 (a rejected speculative draft), then 1 more: both within the spare slots.
  layer.crop(18);
  ref.crop(18);
  expect_layer_matches(layer, ref, "crop 18");
  layer.crop(17);
  ref.crop(17);
  expect_layer_matches(layer, ref, "crop 17");
  // Continuing gives what a layer fed the same 17 tokens and then the new ones would give.
  for (int s = 0; s < 12; ++s) step(layer, ref, 2, 1 + s % 3, rng, "after crop");
  // A crop at or past the length changes nothing.
  const std::int64_t seen = layer.get_seq_length();
  layer.crop(seen + 5);
  expect_layer_matches(layer, ref, "crop past the end");
}

TEST(SlidingWindowLayer, CropTooFarIsAnErrorAndChangesNothing) {
  std::mt19937 rng(11);
  Layer layer(6, 3);
  History ref;
  step(layer, ref, 1, 9, rng, "prefill");
  for (int s = 0; s < 11; ++s) step(layer, ref, 1, 1, rng, "decode");
  // Holds slots [12, 20): crop(16) would need [11, 16).
  EXPECT_EQ(layer.first_held(), 12);
  EXPECT_KVCACHE_ERROR(layer.crop(16),
                       "cannot crop to 16 tokens: the next step would need slots from 11");
  expect_layer_matches(layer, ref, "after a refused crop");
  EXPECT_KVCACHE_ERROR(layer.crop(3), "cannot crop to 3 tokens");
  expect_layer_matches(layer, ref, "after a refused crop");
  // crop(0) always works: it forgets everything.
  layer.crop(0);
  EXPECT_EQ(layer.get_seq_length(), 0);
  History fresh;
  step(layer, fresh, 1, 4, rng, "after crop(0)");
}

TEST(SlidingWindowLayer, BadWindowsAndStatesAreErrors) {
  EXPECT_KVCACHE_ERROR(Layer(0), "expected a window >= 1, got 0");
  EXPECT_KVCACHE_ERROR(Layer(4, -1), "expected spare_slots >= 0");
  EXPECT_KVCACHE_ERROR(Layer(1, 0), "a window of 1 with no spare slot holds nothing");
  std::mt19937 rng(12);
  Layer layer(4);
  History ref;
  step(layer, ref, 2, 3, rng, "prefill");
  // Another layout while holding tokens: refused, nothing changes.
  EXPECT_KVCACHE_ERROR(layer.update(random_tensor({2, 3, 1, 4}, DType::kFloat32, rng),
                                    random_tensor({2, 3, 1, 4}, DType::kFloat32, rng)),
                       "expected new states laid out like");
  expect_layer_matches(layer, ref, "after a refused update");
}

// --- through DynamicCache: one full layer and one sliding layer -----------------------------

struct Mixed {
  DynamicCache<> cache{DynamicCacheOptions{.sliding_windows = {0, 4}, .sliding_spare_slots = 2}};
  History full, sliding;

  void step(std::int64_t batch, std::int64_t q_len, std::mt19937& rng) {
    for (int l = 0; l < 2; ++l) {
      const Tensor k = random_tensor({batch, 2, q_len, 4}, DType::kFloat32, rng);
      const Tensor v = random_tensor({batch, 2, q_len, 4}, DType::kFloat32, rng);
      const std::vector<std::int64_t> pos(static_cast<std::size_t>(q_len));
      const MaskSizes sizes = cache.get_mask_sizes(pos, l);
      const auto [keys, values] = cache.update(k, v, l);
      History& ref = l == 0 ? full : sliding;
      ref.append(k, v);
      EXPECT_EQ(to_doubles(keys), tokens(ref.keys, sizes.kv_offset, ref.length()).data);
      EXPECT_EQ(to_doubles(values), tokens(ref.values, sizes.kv_offset, ref.length()).data);
    }
  }
  void expect_matches(const std::string& what) const {
    ASSERT_EQ(cache.num_layers(), 2) << what;
    EXPECT_EQ(cache.get_seq_length(0), full.length()) << what;
    EXPECT_EQ(cache.get_seq_length(1), sliding.length()) << what;
    const LegacyCache legacy = cache.to_legacy_cache();
    EXPECT_EQ(to_doubles(legacy[0].first), full.keys.data) << what;
    EXPECT_EQ(to_doubles(legacy[0].second), full.values.data) << what;
    const std::int64_t n = sliding.length(), kept = std::min<std::int64_t>(n, 3);
    EXPECT_EQ(to_doubles(legacy[1].first), tokens(sliding.keys, n - kept, n).data) << what;
    EXPECT_EQ(to_doubles(legacy[1].second), tokens(sliding.values, n - kept, n).data) << what;
  }
};

TEST(DynamicCacheSliding, LayersOfTheirOwnKind) {
  std::mt19937 rng(20);
  Mixed m;
  EXPECT_EQ(m.cache.sliding_window(0), 0);
  EXPECT_EQ(m.cache.sliding_window(1), 4);  // before the layer exists: as configured
  EXPECT_TRUE(m.cache.has_sliding_layers());
  m.step(2, 7, rng);
  for (int s = 0; s < 9; ++s) m.step(2, 1, rng);
  m.expect_matches("after decode");
  const std::int64_t pos[1] = {16};
  EXPECT_EQ(m.cache.get_mask_sizes(pos, 0).kv_length, 17);
  EXPECT_EQ(m.cache.get_mask_sizes(pos, 0).kv_offset, 0);
  EXPECT_EQ(m.cache.get_mask_sizes(pos, 1).kv_length, 4);
  EXPECT_EQ(m.cache.get_mask_sizes(pos, 1).kv_offset, 13);
  EXPECT_EQ(m.cache.get_max_cache_shape(), -1);
  // The sliding layer holds at most 3 + 2 tokens; the full one all 16.
  EXPECT_EQ(m.cache.nbytes(), (2u * 2 * 16 * 4 + 2u * 2 * 5 * 4) * 2 * sizeof(float));
  // A full-layer-only API is a clear error for the sliding layer.
  EXPECT_NO_THROW(m.cache.storage(0));
  m.cache.reserve(100);  // room in the full layer, so mark_appended reaches the sliding one
  EXPECT_KVCACHE_ERROR(m.cache.storage(1), "layer 1 is a sliding-window layer");
  EXPECT_KVCACHE_ERROR(m.cache.mark_appended(1), "layer 1 is a sliding-window layer");
  m.expect_matches("after refused calls");
  EXPECT_KVCACHE_ERROR(DynamicCache<>(DynamicCacheOptions{.sliding_windows = {3, -1}}),
                       "expected sliding_windows entries >= 0 (0 = full attention), got -1");
  EXPECT_KVCACHE_ERROR(
      DynamicCache<>(DynamicCacheOptions{.sliding_windows = {3}, .sliding_spare_slots = -2}),
      "expected sliding_spare_slots >= 0, got -2");
}

TEST(DynamicCacheSliding, CropChecksEveryLayerFirst) {
  std::mt19937 rng(21);
  Mixed m;
  m.step(1, 6, rng);
  for (int s = 0; s < 6; ++s) m.step(1, 1, rng);  // 12 seen; the sliding layer holds [7, 12)
  m.cache.crop(-2);                               // needs [7, 10): held
  m.full.crop(10);
  m.sliding.crop(10);
  m.expect_matches("crop(-2)");
  EXPECT_KVCACHE_ERROR(m.cache.crop(8), "cannot crop to 8 tokens");
  m.expect_matches("after a refused crop: the full layer is unchanged too");
  EXPECT_KVCACHE_ERROR(m.cache.crop(-5), "cannot crop to 5 tokens");
  m.expect_matches("after a refused crop(-5)");
  for (int s = 0; s < 5; ++s) m.step(1, 1, rng);
  m.expect_matches("decode after crop");
}

TEST(DynamicCacheSliding, BatchOperationsCloneAndReset) {
  std::mt19937 rng(22);
  Mixed m;
  m.step(3, 5, rng);
  for (int s = 0; s < 7; ++s) m.step(3, 1, rng);
  m.cache.reorder_cache({2, 0, 0});
  m.full.select({2, 0, 0});
  m.sliding.select({2, 0, 0});
  m.expect_matches("reorder_cache");
  m.cache.batch_select_indices({1, 0});
  m.full.select({1, 0});
  m.sliding.select({1, 0});
  m.expect_matches("batch_select_indices");
  m.cache.batch_repeat_interleave(2);
  m.full.select({0, 0, 1, 1});
  m.sliding.select({0, 0, 1, 1});
  m.expect_matches("batch_repeat_interleave");
  EXPECT_EQ(m.cache.batch_size(), 4);
  for (int s = 0; s < 4; ++s) m.step(4, 1, rng);
  m.expect_matches("decode after the batch operations");

  // clone() is deep: the two evolve independently.
  Mixed copy;
  copy.cache = m.cache.clone();
  copy.full = m.full;
  copy.sliding = m.sliding;
  for (int s = 0; s < 6; ++s) copy.step(4, 1, rng);
  m.expect_matches("the original after the clone moved on");
  copy.expect_matches("the clone");
  for (int s = 0; s < 3; ++s) m.step(4, 1, rng);
  copy.expect_matches("the clone after the original moved on");
  const std::unique_ptr<Cache<cpu::Backend>> base = m.cache.Cache<cpu::Backend>::clone();
  EXPECT_EQ(base->get_seq_length(1), m.cache.get_seq_length(1));
  EXPECT_EQ(base->get_mask_sizes(std::vector<std::int64_t>{99}, 1).kv_offset,
            m.cache.get_mask_sizes(std::vector<std::int64_t>{99}, 1).kv_offset);

  // reset() forgets every token; a new batch size is then fine.
  m.cache.reset();
  EXPECT_EQ(m.cache.get_seq_length(0), 0);
  EXPECT_EQ(m.cache.get_seq_length(1), 0);
  EXPECT_EQ(m.cache.batch_size(), -1);
  m.full = {};
  m.sliding = {};
  m.step(2, 6, rng);
  m.step(2, 1, rng);
  m.expect_matches("after reset");
}

// --- the attention rule ---------------------------------------------------------------------

std::vector<std::vector<int>> mask_rows(const std::vector<std::uint8_t>& bytes, std::int64_t batch,
                                        std::int64_t kv_len) {
  std::vector<std::vector<int>> rows;
  if (bytes.empty()) return rows;
  for (std::int64_t b = 0; b < batch; ++b) {
    rows.emplace_back();
    for (std::int64_t j = 0; j < kv_len; ++j)
      rows.back().push_back(bytes[static_cast<std::size_t>(b * kv_len + j)]);
  }
  return rows;
}

struct WindowCase {
  std::int64_t batch, heads, kv_heads, q_len, kv_len, head_dim, kv_offset, window;
  DType dtype;
};

TEST(CpuAttentionWindow, MatchesTheReferenceOnBothPaths) {
  std::mt19937 rng(30);
  const std::vector<WindowCase> cases = {
      // decode path (n_rep x q_len <= 16): one query, keys of a sliding layer or a full one
      {2, 4, 2, 1, 6, 16, 10, 4, DType::kFloat32},
      {2, 4, 2, 1, 40, 16, 0, 6, DType::kFloat32},
      {1, 4, 1, 3, 700, 32, 0, 300, DType::kFloat32},
      {2, 4, 2, 2, 1500, 16, 0, 1100, DType::kFloat32},  // the window cuts the first piece
      {2, 8, 2, 1, 30, 16, 0, 7, DType::kBFloat16},
      // prefill path: a whole prompt longer than the window, and a chunk past kv_offset
      {2, 4, 2, 20, 20, 16, 0, 6, DType::kFloat32},
      {1, 4, 4, 40, 45, 16, 5, 9, DType::kFloat32},
      {2, 4, 2, 300, 300, 16, 0, 100, DType::kFloat32},    // more than one key chunk
      {1, 4, 2, 200, 5000, 16, 0, 1000, DType::kFloat32},  // query blocks skip early keys
      {2, 4, 2, 24, 24, 16, 0, 5, DType::kFloat16},
      {1, 2, 1, 17, 17, 12, 0, 4, DType::kFloat32},  // head_dim not a multiple of 16
  };
  for (const WindowCase& c : cases) {
    const Tensor q = random_tensor({c.batch, c.heads, c.q_len, c.head_dim}, c.dtype, rng);
    const Tensor k = random_tensor({c.batch, c.kv_heads, c.kv_len, c.head_dim}, c.dtype, rng);
    const Tensor v = random_tensor({c.batch, c.kv_heads, c.kv_len, c.head_dim}, c.dtype, rng);
    // Queries are the last q_len slots; row 0 left-padded by 3 slots of its own.
    std::vector<std::int64_t> pos(static_cast<std::size_t>(c.q_len));
    for (std::int64_t i = 0; i < c.q_len; ++i)
      pos[static_cast<std::size_t>(i)] = c.kv_offset + c.kv_len - c.q_len + i;
    std::vector<std::uint8_t> mask(static_cast<std::size_t>(c.batch * c.kv_len), 1);
    for (std::int64_t j = 0; j < std::min<std::int64_t>(3, c.kv_len); ++j)
      mask[static_cast<std::size_t>(j)] = 0;
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
    Tensor out = Tensor::empty({c.batch, c.q_len, c.heads, c.head_dim}, c.dtype);
    testing::poison(out);
    cpu::attention(q, k, v, mask, pos, c.kv_offset, static_cast<float>(scale), out, c.window);
    const Array4 want =
        reference::attention(Array4::from(q), Array4::from(k), Array4::from(v),
                             mask_rows(mask, c.batch, c.kv_len), pos, c.kv_offset, scale, c.window);
    const auto err = testing::compare(to_doubles(out), want.data);
    const double tol =
        c.dtype == DType::kFloat32 ? 2e-5 : (c.dtype == DType::kFloat16 ? 3e-3 : 2e-2);
    EXPECT_LT(err.max_abs, tol) << "q_len " << c.q_len << " kv_len " << c.kv_len << " window "
                                << c.window;
    // The window matters in every case: full attention gives something else.
    const Array4 full =
        reference::attention(Array4::from(q), Array4::from(k), Array4::from(v),
                             mask_rows(mask, c.batch, c.kv_len), pos, c.kv_offset, scale);
    EXPECT_GT(testing::compare(full.data, want.data).max_abs, 1e-3)
        << "a case the window does not change tests nothing";
  }
}

TEST(CpuAttentionWindow, AWindowThatHidesNothingIsBitIdenticalToNone) {
  std::mt19937 rng(31);
  for (std::int64_t q_len : {1, 2, 64}) {  // decode path, decode with two rows, prefill path
    for (std::int64_t kv_len : {64, 1300}) {
      const Tensor q = random_tensor({2, 4, q_len, 16}, DType::kFloat32, rng);
      const Tensor k = random_tensor({2, 2, kv_len, 16}, DType::kFloat32, rng);
      const Tensor v = random_tensor({2, 2, kv_len, 16}, DType::kFloat32, rng);
      std::vector<std::int64_t> pos(static_cast<std::size_t>(q_len));
      for (std::int64_t i = 0; i < q_len; ++i)
        pos[static_cast<std::size_t>(i)] = kv_len - q_len + i;
      Tensor none = Tensor::empty({2, q_len, 4, 16}, DType::kFloat32);
      Tensor wide = Tensor::empty({2, q_len, 4, 16}, DType::kFloat32);
      testing::poison(none);
      testing::poison(wide);
      cpu::attention(q, k, v, Tensor(), pos, 0, 0.25f, none);
      cpu::attention(q, k, v, Tensor(), pos, 0, 0.25f, wide, kv_len + 1);
      EXPECT_EQ(to_doubles(none), to_doubles(wide)) << q_len << " " << kv_len;
    }
  }
  const Tensor q = random_tensor({1, 2, 1, 16}, DType::kFloat32, rng);
  const Tensor k = random_tensor({1, 2, 4, 16}, DType::kFloat32, rng);
  Tensor out = Tensor::empty({1, 1, 2, 16}, DType::kFloat32);
  const std::int64_t pos[1] = {3};
  EXPECT_KVCACHE_ERROR(cpu::attention(q, k, k, Tensor(), pos, 0, 0.25f, out, 0),
                       "expected a sliding window >= 1 (or none), got 0");
}

// --- the attention module over a sliding cache ----------------------------------------------

TEST(AttentionSliding, SlidingCacheEqualsFullCacheUnderTheWindow) {
  std::mt19937 rng(40);
  const AttentionOptions options{
      .num_heads = 4, .num_kv_heads = 2, .head_dim = 16, .sliding_window = 5};
  const Attention attention(0, options);
  DynamicCache<> sliding(DynamicCacheOptions{.sliding_windows = {5}});
  DynamicCache<> full;
  // Left-padded batch of 2 (the second row pads 4 slots), prefill 9, then 15 single steps.
  Tensor mask = ones_mask(2, 9);
  for (int j = 0; j < 4; ++j) mask.data_as<std::int64_t>()[9 + j] = 0;
  std::int64_t past = 0;
  for (int s = 0; s < 16; ++s) {
    const std::int64_t q_len = s == 0 ? 9 : 1;
    const Tensor q = random_tensor({2, 4, q_len, 16}, DType::kFloat32, rng);
    const Tensor k = random_tensor({2, 2, q_len, 16}, DType::kFloat32, rng);
    const Tensor v = random_tensor({2, 2, q_len, 16}, DType::kFloat32, rng);
    const std::vector<std::int64_t> pos = make_cache_position(past, q_len);
    const Tensor a = attention.forward(q, k, v, sliding, mask, pos);
    const Tensor b = attention.forward(q, k, v, full, mask, pos);
    EXPECT_LT(testing::compare(to_doubles(a), to_doubles(b)).max_abs, 1e-6) << "step " << s;
    past += q_len;
    mask = extend_attention_mask(mask);
  }
  EXPECT_EQ(sliding.get_seq_length(), 24);
  EXPECT_EQ(full.get_seq_length(), 24);
  EXPECT_LT(sliding.nbytes(), full.nbytes());

  // A full-attention module cannot use a layer that dropped keys: an error, the cache unchanged.
  const Attention no_window(0, {.num_heads = 4, .num_kv_heads = 2, .head_dim = 16});
  const std::vector<double> before = to_doubles(sliding.to_legacy_cache()[0].first);
  const std::vector<std::int64_t> pos = {24};
  EXPECT_KVCACHE_ERROR(
      no_window.forward(random_tensor({2, 4, 1, 16}, DType::kFloat32, rng),
                        random_tensor({2, 2, 1, 16}, DType::kFloat32, rng),
                        random_tensor({2, 2, 1, 16}, DType::kFloat32, rng), sliding, mask, pos),
      "attends over every earlier slot (no sliding window), but the cache's layer holds keys "
      "from slot 20 only");
  // Nor can a wider window.
  const Attention wider(0,
                        {.num_heads = 4, .num_kv_heads = 2, .head_dim = 16, .sliding_window = 8});
  EXPECT_KVCACHE_ERROR(
      wider.forward(random_tensor({2, 4, 1, 16}, DType::kFloat32, rng),
                    random_tensor({2, 2, 1, 16}, DType::kFloat32, rng),
                    random_tensor({2, 2, 1, 16}, DType::kFloat32, rng), sliding, mask, pos),
      "sees slots from 17, but the cache's layer holds keys from slot 20 only");
  EXPECT_EQ(sliding.get_seq_length(), 24);
  EXPECT_EQ(to_doubles(sliding.to_legacy_cache()[0].first), before);
  EXPECT_KVCACHE_ERROR(
      Attention(0, {.num_heads = 4, .num_kv_heads = 2, .head_dim = 16, .sliding_window = 0}),
      "expected a sliding_window >= 1");
}

}  // namespace
}  // namespace kvcache
