// StaticCache against a naive reference of its semantics (writes at cache_position; rewriting from
// slot p keeps the first p tokens and appends): many step patterns, lazy and up-front layouts,
// every operation of the Cache API, the attention module over it, and every error case with the
// cache unchanged after each rejected call.
#include "kvcache/cache/static_cache.hpp"

#include <gtest/gtest.h>

#include <limits>
#include <memory>
#include <random>
#include <type_traits>
#include <vector>

#include "kvcache/attention/attention.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "reference/reference.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using reference::Array4;
using testing::random_tensor;
using testing::to_doubles;

constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
constexpr std::int64_t kMin = std::numeric_limits<std::int64_t>::min();

// The reference: per layer the filled slots as a dense array; a write at `start` keeps the first
// `start` slots and appends the new ones.
struct SlotCache {
  std::vector<Array4> keys, values;

  void update(const Tensor& k, const Tensor& v, int layer, std::int64_t start) {
    if (static_cast<std::size_t>(layer) == keys.size()) {
      keys.emplace_back();
      values.emplace_back();
    }
    auto& rk = keys[static_cast<std::size_t>(layer)];
    auto& rv = values[static_cast<std::size_t>(layer)];
    if (!rk.data.empty()) {
      rk = reference::crop_seq(rk, start);
      rv = reference::crop_seq(rv, start);
    }
    rk = reference::cat_seq(rk, Array4::from(k));
    rv = reference::cat_seq(rv, Array4::from(v));
  }
  std::int64_t length(int layer = 0) const {
    return static_cast<std::size_t>(layer) < keys.size()
               ? keys[static_cast<std::size_t>(layer)].dims[2]
               : 0;
  }
  void crop(std::int64_t n) {
    for (auto* side : {&keys, &values})
      for (auto& a : *side) a = reference::crop_seq(a, n);
  }
  void select(const std::vector<std::int64_t>& rows) {
    for (auto* side : {&keys, &values})
      for (auto& a : *side) a = reference::select_batch(a, rows);
  }
};

void expect_same(const StaticCache<>& cache, const SlotCache& ref) {
  ASSERT_EQ(cache.num_layers(), static_cast<int>(ref.keys.size()));
  const LegacyCache legacy = cache.to_legacy_cache();
  for (int layer = 0; layer < cache.num_layers(); ++layer) {
    const auto l = static_cast<std::size_t>(layer);
    ASSERT_EQ(cache.get_seq_length(layer), ref.keys[l].dims[2]) << "layer " << layer;
    if (ref.keys[l].dims[2] == 0) continue;
    ASSERT_EQ(legacy[l].first.size(0), ref.keys[l].dims[0]);
    EXPECT_EQ(to_doubles(legacy[l].first), ref.keys[l].data) << "keys of layer " << layer;
    EXPECT_EQ(to_doubles(legacy[l].second), ref.values[l].data) << "values of layer " << layer;
  }
}

// Appends `length` tokens (a 5-token prefill, then single tokens) to a 2-layer cache of `batch`
// rows, 2 heads, head_dim 4, at explicit cache positions.
void fill(StaticCache<>& cache, SlotCache& ref, std::int64_t batch, std::int64_t length,
          std::mt19937& rng) {
  for (std::int64_t done = 0; done < length;) {
    const std::int64_t q = done == 0 ? std::min<std::int64_t>(length, 5) : 1;
    const std::int64_t start = cache.get_seq_length();
    const std::vector<std::int64_t> positions = make_cache_position(start, q);
    for (int layer = 0; layer < 2; ++layer) {
      Tensor k = random_tensor({batch, 2, q, 4}, DType::kFloat32, rng);
      Tensor v = random_tensor({batch, 2, q, 4}, DType::kFloat32, rng);
      cache.update(k, v, layer, {.cache_position = positions});
      ref.update(k, v, layer, start);
    }
    done += q;
  }
}

static_assert(!std::is_copy_constructible_v<StaticCache<>>);
static_assert(!std::is_copy_assignable_v<StaticCache<>>);
static_assert(std::is_nothrow_move_constructible_v<StaticCache<>>);

// --- step patterns against the reference ---------------------------------------------------------

struct Step {
  std::int64_t start;  // -1: append (an empty cache_position)
  std::int64_t q_len;
};
struct Pattern {
  const char* name;
  std::vector<Step> steps;
};

class StaticCacheSteps
    : public ::testing::TestWithParam<std::tuple<Pattern, DType, bool /*up front*/>> {};

TEST_P(StaticCacheSteps, MatchesTheReference) {
  const auto& [pattern, dtype, up_front] = GetParam();
  std::mt19937 rng(17);
  const int layers = 3;
  const std::int64_t max_batch = 3, batch = 2, heads = 2, head_dim = 8, max_len = 48;
  StaticCacheOptions options{.max_batch_size = max_batch, .max_cache_len = max_len};
  if (up_front) {
    options.num_layers = layers;
    options.num_kv_heads = heads;
    options.head_dim = head_dim;
    options.dtype = dtype;
  }
  StaticCache<> cache(options);
  SlotCache ref;
  const std::size_t capacity =
      static_cast<std::size_t>(layers * 2 * max_batch * heads * max_len * head_dim) *
      dtype_size(dtype);
  if (up_front) {
    EXPECT_EQ(cache.capacity_bytes(), capacity);
  }
  std::vector<const void*> storage;
  for (const Step& step : pattern.steps) {
    const std::int64_t start = step.start < 0 ? cache.get_seq_length() : step.start;
    const std::vector<std::int64_t> positions =
        step.start < 0 ? std::vector<std::int64_t>{} : make_cache_position(start, step.q_len);
    for (int layer = 0; layer < layers; ++layer) {
      const MaskSizes sizes = cache.get_mask_sizes(positions, layer);
      Tensor k = random_tensor({batch, heads, step.q_len, head_dim}, dtype, rng);
      Tensor v = random_tensor({batch, heads, step.q_len, head_dim}, dtype, rng);
      auto [keys, values] = cache.update(k, v, layer, {.cache_position = positions});
      ref.update(k, v, layer, start);
      const auto l = static_cast<std::size_t>(layer);
      // Views of exactly the filled slots, and the mask sized to them.
      ASSERT_EQ(keys.size(2), ref.length(layer));
      ASSERT_EQ(keys.size(0), batch);
      if (!positions.empty()) {
        EXPECT_EQ(sizes.kv_length, ref.length(layer));
      }
      EXPECT_EQ(sizes.kv_offset, 0);
      EXPECT_EQ(to_doubles(keys), ref.keys[l].data);
      EXPECT_EQ(to_doubles(values), ref.values[l].data);
      EXPECT_EQ(keys.dtype(), dtype);
      // Fixed storage: the same address at every step.
      if (storage.size() == l) storage.push_back(cache.storage(layer).first.data());
      EXPECT_EQ(cache.storage(layer).first.data(), storage[l]);
    }
  }
  expect_same(cache, ref);
  EXPECT_EQ(cache.get_max_cache_shape(), max_len);
  EXPECT_EQ(cache.capacity_bytes(), capacity);
  EXPECT_EQ(cache.nbytes(),
            static_cast<std::size_t>(layers * 2 * batch * heads * ref.length() * head_dim) *
                dtype_size(dtype));
  // A deep copy holds the same and moves on alone.
  StaticCache<> copy = cache.clone();
  expect_same(copy, ref);
  copy.crop(1);
  expect_same(cache, ref);
}

INSTANTIATE_TEST_SUITE_P(
    Patterns, StaticCacheSteps,
    ::testing::Combine(
        ::testing::Values(
            Pattern{"prefill_then_decode",
                    {{0, 7}, {7, 1}, {8, 1}, {9, 1}, {10, 1}, {11, 1}, {12, 1}, {13, 1}}},
            Pattern{"appends_without_positions", {{-1, 5}, {-1, 1}, {-1, 3}, {-1, 1}}},
            Pattern{"chunks_to_the_last_slot", {{0, 5}, {5, 16}, {21, 9}, {30, 17}, {47, 1}}},
            Pattern{"speculative_rollback", {{0, 10}, {10, 4}, {11, 3}, {14, 1}, {3, 2}, {5, 1}}},
            Pattern{"rewrite_from_zero", {{0, 6}, {0, 2}, {2, 1}}},
            Pattern{"empty_steps", {{0, 4}, {-1, 0}, {4, 1}, {-1, 0}, {5, 2}}},
            Pattern{"decode_only", {{0, 1}, {1, 1}, {2, 1}, {3, 1}, {4, 1}, {5, 1}, {6, 1}}}),
        ::testing::Values(DType::kFloat32, DType::kBFloat16, DType::kFloat16), ::testing::Bool()),
    [](const auto& info) {
      return std::string(std::get<0>(info.param).name) + "_" +
             std::string(dtype_name(std::get<1>(info.param))) +
             (std::get<2>(info.param) ? "_up_front" : "_lazy");
    });

TEST(StaticCache, UpFrontLayoutAllocatesEveryLayerInTheConstructor) {
  StaticCache<> cache({.max_batch_size = 2,
                       .max_cache_len = 10,
                       .num_layers = 4,
                       .num_kv_heads = 3,
                       .head_dim = 8,
                       .dtype = DType::kBFloat16});
  EXPECT_EQ(cache.num_layers(), 4);
  EXPECT_EQ(cache.capacity_bytes(), 4u * 2 * 2 * 3 * 10 * 8 * 2);
  EXPECT_EQ(cache.nbytes(), 0u);
  for (int l = 0; l < 4; ++l) EXPECT_EQ(cache.get_seq_length(l), 0);
  EXPECT_EQ(cache.batch_size(), -1);
  EXPECT_EQ(cache.storage(3).first.shape_string(), "[2, 3, 10, 8]");
}

TEST(StaticCache, LazyLayersAreAllocatedAtFullSizeAtTheirFirstUpdate) {
  std::mt19937 rng(2);
  StaticCache<> cache(4, 32);
  EXPECT_EQ(cache.num_layers(), 0);
  EXPECT_EQ(cache.capacity_bytes(), 0u);
  const Tensor k = random_tensor({1, 2, 3, 4}, DType::kFloat16, rng);
  cache.update(k, k, 0);
  EXPECT_EQ(cache.num_layers(), 1);
  EXPECT_EQ(cache.storage(0).first.shape_string(), "[4, 2, 32, 4]");
  EXPECT_EQ(cache.storage(0).first.dtype(), DType::kFloat16);
  EXPECT_EQ(cache.capacity_bytes(), 2u * 4 * 2 * 32 * 4 * 2);
}

TEST(StaticCache, SeqLengthIsExactEvenForAllZeroKeys) {
  // transformers #30377: its StaticCache counts slots whose keys are non-zero.
  StaticCache<> cache(1, 16);
  const Tensor zeros = Tensor::zeros({1, 2, 5, 4}, DType::kFloat32);
  cache.update(zeros, zeros, 0, {.cache_position = make_cache_position(0, 5)});
  EXPECT_EQ(cache.get_seq_length(), 5);
  cache.update(zeros.slice(2, 0, 1), zeros.slice(2, 0, 1), 0,
               {.cache_position = make_cache_position(5, 1)});
  EXPECT_EQ(cache.get_seq_length(), 6);
}

TEST(StaticCache, MaskSizesAreTheWrittenEnd) {
  std::mt19937 rng(3);
  StaticCache<> cache(1, 20);
  SlotCache ref;
  fill(cache, ref, 1, 9, rng);
  const std::vector<std::int64_t> next = {9, 10, 11};
  EXPECT_EQ(cache.get_mask_sizes(next, 0).kv_length, 12);
  const std::vector<std::int64_t> rollback = {4, 5};
  EXPECT_EQ(cache.get_mask_sizes(rollback, 0).kv_length, 6);
  EXPECT_EQ(cache.get_mask_sizes({}, 0).kv_length, 9);
  EXPECT_EQ(cache.get_mask_sizes(next, 7).kv_length, 12);  // a layer not seen yet
  // Positions the update would reject give no overflow.
  const std::vector<std::int64_t> huge = {kMax, kMax};
  EXPECT_EQ(cache.get_mask_sizes(huge, 0).kv_length, 22);
  const std::vector<std::int64_t> negative = {kMin};
  EXPECT_EQ(cache.get_mask_sizes(negative, 0).kv_length, 1);
}

// Found by fuzz_cache: with max_cache_len near INT64_MAX the clamped start plus q_len overflowed
// (UBSan: signed overflow). The length saturates, and the update at those positions is refused.
TEST(StaticCache, MaskSizesOfAHugeCacheDoNotOverflow) {
  StaticCache<> cache(1, kMax);
  const std::vector<std::int64_t> huge = {kMax - 1, kMax};
  EXPECT_EQ(cache.get_mask_sizes(huge, 0).kv_length, kMax);
  const std::vector<std::int64_t> last = {kMax};
  EXPECT_EQ(cache.get_mask_sizes(last, 0).kv_length, kMax);
  const std::vector<std::int64_t> first = {0, 1, 2};
  EXPECT_EQ(cache.get_mask_sizes(first, 0).kv_length, 3);
  const Tensor states = Tensor::zeros({1, 1, 2, 4}, DType::kFloat32);
  EXPECT_KVCACHE_ERROR(cache.update(states, states, 0, {.cache_position = huge}), "max_cache_len");
  EXPECT_EQ(cache.get_seq_length(), 0);
}

TEST(StaticCache, SmallerBatchThanTheMaximum) {
  std::mt19937 rng(4);
  StaticCache<> cache(8, 16);
  SlotCache ref;
  fill(cache, ref, 3, 7, rng);
  expect_same(cache, ref);
  EXPECT_EQ(cache.batch_size(), 3);
  EXPECT_EQ(cache.to_legacy_cache()[0].first.shape_string(), "[3, 2, 7, 4]");
  EXPECT_EQ(cache.nbytes(), 2u * 2 * 3 * 2 * 7 * 4 * 4);
}

// What a decode step replayed from a CUDA graph does: write the next slot of every layer straight
// into storage(), then mark_appended(1). The cache then holds what update() would have left.
TEST(StaticCache, WritesIntoStorageThenMarkAppended) {
  std::mt19937 rng(41);
  StaticCache<> cache(4, 9);
  SlotCache ref;
  fill(cache, ref, 3, 6, rng);
  for (int layer = 0; layer < 2; ++layer) {
    const Tensor k = random_tensor({3, 2, 1, 4}, DType::kFloat32, rng);
    const Tensor v = random_tensor({3, 2, 1, 4}, DType::kFloat32, rng);
    const auto [keys, values] = cache.storage(layer);
    EXPECT_EQ(keys.shape_string(), "[4, 2, 9, 4]");  // the whole storage, max_batch_size rows
    cpu::Backend::copy(keys.slice(0, 0, 3).slice(2, 6, 7), k);
    cpu::Backend::copy(values.slice(0, 0, 3).slice(2, 6, 7), v);
    ref.update(k, v, layer, 6);
  }
  cache.mark_appended(1);
  expect_same(cache, ref);
  EXPECT_EQ(cache.get_seq_length(), 7);
  cache.mark_appended(0);
  EXPECT_EQ(cache.get_seq_length(), 7);
}

TEST(StaticCache, MarkAppendedPastTheEndOrOnAnEmptyCacheIsAnErrorAndChangesNothing) {
  std::mt19937 rng(42);
  StaticCache<> none(2, 8);
  EXPECT_KVCACHE_ERROR(none.mark_appended(1), "holds no layer");
  StaticCache<> cache(2, 8);
  SlotCache ref;
  fill(cache, ref, 2, 6, rng);
  EXPECT_KVCACHE_ERROR(cache.mark_appended(3), "room for 3");
  EXPECT_KVCACHE_ERROR(cache.mark_appended(-1), "tokens >= 0");
  EXPECT_KVCACHE_ERROR(cache.mark_appended(kMax), "room for");
  expect_same(cache, ref);
  cache.reset();
  EXPECT_KVCACHE_ERROR(cache.mark_appended(1), "empty layer");
  EXPECT_EQ(cache.get_seq_length(), 0);
}

// --- the operations ----------------------------------------------------------------------------

TEST(StaticCache, CropKeepsPrefixAcceptsNegativeAndZero) {
  std::mt19937 rng(5);
  StaticCache<> cache(2, 32);
  SlotCache ref;
  fill(cache, ref, 2, 12, rng);
  cache.crop(9);
  ref.crop(9);
  expect_same(cache, ref);
  cache.crop(-3);
  ref.crop(6);
  expect_same(cache, ref);
  cache.crop(100);  // past the length: nothing changes
  expect_same(cache, ref);
  fill(cache, ref, 2, 4, rng);  // writing goes on after the crop
  expect_same(cache, ref);
  cache.crop(0);
  EXPECT_EQ(cache.get_seq_length(), 0);
  EXPECT_EQ(cache.batch_size(), -1);
  SlotCache fresh;
  fill(cache, fresh, 1, 3, rng);  // empty again: another batch size is welcome
  expect_same(cache, fresh);
}

TEST(StaticCache, ResetEmptiesAndKeepsMemory) {
  std::mt19937 rng(6);
  StaticCache<> cache(4, 24);
  SlotCache ref;
  fill(cache, ref, 2, 10, rng);
  const std::size_t capacity = cache.capacity_bytes();
  const void* keys = cache.storage(0).first.data();
  cache.reset();
  EXPECT_EQ(cache.get_seq_length(), 0);
  EXPECT_EQ(cache.nbytes(), 0u);
  EXPECT_EQ(cache.capacity_bytes(), capacity);
  EXPECT_EQ(cache.storage(0).first.data(), keys);
  SlotCache fresh;
  fill(cache, fresh, 4, 3, rng);
  expect_same(cache, fresh);
}

TEST(StaticCache, BatchOperationsKeepTheStorageInPlace) {
  std::mt19937 rng(7);
  StaticCache<> cache(6, 16);
  SlotCache ref;
  fill(cache, ref, 4, 6, rng);
  const void* keys = cache.storage(1).first.data();
  const std::vector<std::int64_t> beams = {2, 2, 0, 3};
  cache.reorder_cache(beams);
  ref.select(beams);
  expect_same(cache, ref);
  fill(cache, ref, 4, 2, rng);  // decoding goes on after the reorder
  expect_same(cache, ref);
  cache.batch_select_indices(std::vector<std::int64_t>{3, 1});
  ref.select({3, 1});
  expect_same(cache, ref);
  EXPECT_EQ(cache.batch_size(), 2);
  cache.batch_repeat_interleave(3);
  ref.select({0, 0, 0, 1, 1, 1});
  expect_same(cache, ref);
  EXPECT_EQ(cache.batch_size(), 6);
  EXPECT_EQ(cache.storage(1).first.data(), keys);
}

TEST(StaticCache, CloneIsDeepAndIndependent) {
  std::mt19937 rng(8);
  StaticCache<> original({.max_batch_size = 2,
                          .max_cache_len = 20,
                          .num_layers = 2,
                          .num_kv_heads = 2,
                          .head_dim = 4});
  SlotCache ref;
  fill(original, ref, 2, 7, rng);
  StaticCache<> copy = original.clone();
  expect_same(copy, ref);
  EXPECT_EQ(copy.capacity_bytes(), original.capacity_bytes());
  EXPECT_EQ(copy.get_max_cache_shape(), 20);
  EXPECT_NE(copy.storage(0).first.data(), original.storage(0).first.data());
  SlotCache ref_copy = ref;
  fill(original, ref, 2, 3, rng);
  fill(copy, ref_copy, 2, 5, rng);
  expect_same(original, ref);
  expect_same(copy, ref_copy);
  // Through the base: the same kind.
  const Cache<cpu::Backend>& base = original;
  std::unique_ptr<Cache<cpu::Backend>> again = base.clone();
  auto* as_static = dynamic_cast<StaticCache<>*>(again.get());
  ASSERT_NE(as_static, nullptr);
  expect_same(*as_static, ref);
  EXPECT_EQ(again->get_max_cache_shape(), 20);
}

TEST(StaticCache, AttentionOverItEqualsAttentionOverADynamicCache) {
  // Left-padded batch: prefill 6 then decode 5, the same states into both caches.
  std::mt19937 rng(9);
  const Attention attn(0, {.num_heads = 4, .num_kv_heads = 2, .head_dim = 8});
  StaticCache<> fixed(2, 16);
  DynamicCache<> dynamic;
  Tensor mask = Tensor::empty({2, 6}, DType::kInt64);
  for (int j = 0; j < 6; ++j) {
    mask.data_as<std::int64_t>()[j] = 1;
    mask.data_as<std::int64_t>()[6 + j] = j >= 2;
  }
  std::vector<std::int64_t> positions = make_cache_position(0, 6);
  for (int step = 0; step < 6; ++step) {
    const auto q_len = static_cast<std::int64_t>(positions.size());
    const Tensor q = random_tensor({2, 4, q_len, 8}, DType::kFloat32, rng);
    const Tensor k = random_tensor({2, 2, q_len, 8}, DType::kFloat32, rng);
    const Tensor v = random_tensor({2, 2, q_len, 8}, DType::kFloat32, rng);
    const Tensor a = attn.forward(q, k, v, fixed, mask, positions);
    const Tensor b = attn.forward(q, k, v, dynamic, mask, positions);
    EXPECT_EQ(to_doubles(a), to_doubles(b)) << "step " << step;
    EXPECT_EQ(fixed.get_seq_length(), dynamic.get_seq_length());
    mask = extend_attention_mask(mask);
    positions = {positions.back() + 1};
  }
  EXPECT_EQ(fixed.get_seq_length(), 11);
}

// --- errors: each names what it expected; the cache is unchanged afterwards
// -----------------------

class StaticCacheErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    fill(cache_, ref_, 2, 6, rng_);
    storage_ = cache_.storage(0).first.data();
  }
  void expect_unchanged() {
    expect_same(cache_, ref_);
    EXPECT_EQ(cache_.batch_size(), 2);
    EXPECT_EQ(cache_.storage(0).first.data(), storage_);
  }
  Tensor states(std::int64_t b, std::int64_t h, std::int64_t q, std::int64_t d,
                DType dt = DType::kFloat32) {
    return random_tensor({b, h, q, d}, dt, rng_);
  }
  // One update of q_len tokens at `positions` to layer 0.
  void update_at(std::vector<std::int64_t> positions, std::int64_t q_len) {
    const Tensor k = states(2, 2, q_len, 4);
    cache_.update(k, k, 0, {.cache_position = positions});
  }
  std::mt19937 rng_{13};
  StaticCache<> cache_{3, 8};
  SlotCache ref_;
  const void* storage_ = nullptr;
};

TEST_F(StaticCacheErrors, PositionAtOrPastMaxCacheLen) {
  EXPECT_KVCACHE_ERROR(update_at({8}, 1),
                       "expected cache_position below max_cache_len 8 (the cache is full), got 8");
  EXPECT_KVCACHE_ERROR(update_at({6, 7, 8}, 3), "got 8 at index 2");
  EXPECT_KVCACHE_ERROR(update_at({kMax}, 1), "max_cache_len 8");
  EXPECT_KVCACHE_ERROR(update_at({}, 3), "expected room for 3 new token(s) from slot 6");
  expect_unchanged();
  update_at({6, 7}, 2);  // the last two slots are fine
  EXPECT_EQ(cache_.get_seq_length(0), 8);
  EXPECT_KVCACHE_ERROR(update_at({}, 1), "expected room for 1 new token(s) from slot 8");
}

TEST_F(StaticCacheErrors, PositionsWithAGapOrOutOfOrder) {
  EXPECT_KVCACHE_ERROR(update_at({7}, 1),
                       "expected cache_position to start at or before slot 6 (the tokens held");
  EXPECT_KVCACHE_ERROR(update_at({5, 4}, 2), "expected consecutive cache positions from 5");
  EXPECT_KVCACHE_ERROR(update_at({-1}, 1), "got -1 at index 0");
  EXPECT_KVCACHE_ERROR(update_at({kMin}, 1), "expected cache_position >= 0");
  EXPECT_KVCACHE_ERROR(update_at({6, 7}, 1), "expected 1 cache positions (one per new token)");
  expect_unchanged();
}

TEST_F(StaticCacheErrors, BatchAndLayout) {
  const Tensor four = states(4, 2, 1, 4);
  EXPECT_KVCACHE_ERROR(cache_.update(four, four, 0), "expected batch <= 3 (max_batch_size)");
  const Tensor three = states(3, 2, 1, 4);
  EXPECT_KVCACHE_ERROR(cache_.update(three, three, 0),
                       "expected batch 2 (the batch the cache holds), got 3");
  const Tensor heads = states(2, 3, 1, 4);
  EXPECT_KVCACHE_ERROR(cache_.update(heads, heads, 1), "layer 1 is laid out [3, 2, 8, 4]");
  const Tensor half = states(2, 2, 1, 4, DType::kFloat16);
  EXPECT_KVCACHE_ERROR(cache_.update(half, half, 0), "float32; expected new states [batch, 2");
  const Tensor ok = states(2, 2, 1, 4);
  EXPECT_KVCACHE_ERROR(cache_.update(ok, ok, 3), "expected layer_idx in [0, 2]");
  EXPECT_KVCACHE_ERROR(cache_.update(ok, states(2, 2, 2, 4), 0), "shaped like key_states");
  EXPECT_KVCACHE_ERROR(cache_.update(Tensor(), Tensor(), 0), "undefined tensor");
  expect_unchanged();
}

TEST_F(StaticCacheErrors, BatchOperations) {
  EXPECT_KVCACHE_ERROR(cache_.reorder_cache(std::vector<std::int64_t>{0, 2}),
                       "expected indices in [0, 2), got 2 at position 1");
  EXPECT_KVCACHE_ERROR(cache_.reorder_cache(std::vector<std::int64_t>{0}),
                       "expected 2 beam indices (one per row), got 1");
  EXPECT_KVCACHE_ERROR(cache_.batch_select_indices(std::vector<std::int64_t>{0, 1, 0, 1}),
                       "expected at most 3 indices (max_batch_size), got 4");
  EXPECT_KVCACHE_ERROR(cache_.batch_select_indices(std::vector<std::int64_t>{}),
                       "expected at least one index");
  EXPECT_KVCACHE_ERROR(cache_.batch_repeat_interleave(2),
                       "expected batch 2 x repeats 2 to fit in max_batch_size 3");
  EXPECT_KVCACHE_ERROR(cache_.batch_repeat_interleave(std::int64_t{1} << 62), "to fit in");
  EXPECT_KVCACHE_ERROR(cache_.batch_repeat_interleave(kMax), "to fit in");
  EXPECT_KVCACHE_ERROR(cache_.batch_repeat_interleave(0), "expected repeats >= 1, got 0");
  expect_unchanged();
}

TEST_F(StaticCacheErrors, Crop) {
  EXPECT_KVCACHE_ERROR(cache_.crop(-7), "expected to drop at most 6 tokens (the cache length)");
  EXPECT_KVCACHE_ERROR(cache_.crop(kMin), "got 9223372036854775808");
  expect_unchanged();
}

TEST(StaticCache, BadConstructionIsAnErrorBeforeAllocating) {
  EXPECT_KVCACHE_ERROR(StaticCache<>(0, 8), "expected max_batch_size >= 1, got 0");
  EXPECT_KVCACHE_ERROR(StaticCache<>(1, 0), "expected max_cache_len >= 1, got 0");
  EXPECT_KVCACHE_ERROR(StaticCache<>(1, -5), "expected max_cache_len >= 1, got -5");
  EXPECT_KVCACHE_ERROR(StaticCache<>({.max_batch_size = 1, .max_cache_len = 4, .num_layers = 2}),
                       "expected num_layers, num_kv_heads and head_dim all > 0");
  EXPECT_KVCACHE_ERROR(StaticCache<>({.max_batch_size = 1,
                                      .max_cache_len = 4,
                                      .num_layers = 1,
                                      .num_kv_heads = 1,
                                      .head_dim = 4,
                                      .dtype = DType::kInt64}),
                       "expected a float32, float16 or bfloat16 dtype");
  // Sizes whose byte counts overflow int64, and sizes that fit but cannot be allocated.
  EXPECT_KVCACHE_ERROR(StaticCache<>({.max_batch_size = 1,
                                      .max_cache_len = std::int64_t{1} << 62,
                                      .num_layers = 2,
                                      .num_kv_heads = 2,
                                      .head_dim = 4}),
                       "does not fit in 64 bits");
  EXPECT_KVCACHE_ERROR(StaticCache<>({.max_batch_size = kMax,
                                      .max_cache_len = kMax,
                                      .num_layers = 1,
                                      .num_kv_heads = 1,
                                      .head_dim = 1}),
                       "does not fit in 64 bits");
  EXPECT_KVCACHE_ERROR(StaticCache<>({.max_batch_size = 1,
                                      .max_cache_len = std::int64_t{1} << 45,
                                      .num_layers = 1,
                                      .num_kv_heads = 2,
                                      .head_dim = 4}),
                       "out of memory: the storage of every layer needs");
  // Lazily: the first update fails, the cache stays empty.
  std::mt19937 rng(10);
  StaticCache<> lazy(1, std::int64_t{1} << 62);
  const Tensor k = random_tensor({1, 2, 1, 4}, DType::kFloat32, rng);
  EXPECT_KVCACHE_ERROR(lazy.update(k, k, 0), "does not fit in 64 bits");
  EXPECT_EQ(lazy.num_layers(), 0);
  EXPECT_EQ(lazy.capacity_bytes(), 0u);
}

TEST(StaticCache, UpFrontLayerCountIsFixed) {
  std::mt19937 rng(11);
  StaticCache<> cache(
      {.max_batch_size = 1, .max_cache_len = 4, .num_layers = 2, .num_kv_heads = 2, .head_dim = 4});
  const Tensor k = random_tensor({1, 2, 1, 4}, DType::kFloat32, rng);
  EXPECT_KVCACHE_ERROR(cache.update(k, k, 2), "expected layer_idx in [0, 1] (the cache's layers)");
  cache.update(k, k, 1);  // layers need not arrive in order when allocated up front
  EXPECT_EQ(cache.get_seq_length(1), 1);
  EXPECT_EQ(cache.get_seq_length(0), 0);
}

TEST(StaticCache, DeviceMismatchIsAnError) {
  std::mt19937 rng(12);
  StaticCache<> cache(1, 4);
  const Tensor k = random_tensor({1, 2, 1, 4}, DType::kFloat32, rng);
  const Tensor on_gpu = Tensor::from_blob(k.data(), {1, 2, 1, 4}, DType::kFloat32, Device::kCuda);
  EXPECT_KVCACHE_ERROR(cache.update(on_gpu, on_gpu, 0), "expected states on cpu");
  EXPECT_EQ(cache.num_layers(), 0);
}

}  // namespace
}  // namespace kvcache
