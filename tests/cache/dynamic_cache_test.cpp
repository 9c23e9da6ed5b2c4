// DynamicCache against the concatenating reference (transformers' torch.cat semantics): many step
// patterns, every operation of the Cache API, and every error case, with the cache unchanged after
// each rejected call.
#include "kvcache/cache/dynamic_cache.hpp"

#include <gtest/gtest.h>

#include <limits>
#include <memory>
#include <random>
#include <type_traits>
#include <vector>

#include "reference/reference.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using reference::Array4;
using reference::ConcatCache;
using testing::random_tensor;
using testing::to_doubles;

// Checks that every layer of `cache` holds exactly what the reference holds.
void expect_same(const DynamicCache<>& cache, const ConcatCache& ref) {
  ASSERT_EQ(cache.num_layers(), static_cast<int>(ref.keys.size()));
  for (int layer = 0; layer < cache.num_layers(); ++layer) {
    const auto legacy = cache.to_legacy_cache();
    const Array4& rk = ref.keys[static_cast<std::size_t>(layer)];
    const Tensor& k = legacy[static_cast<std::size_t>(layer)].first;
    ASSERT_EQ(cache.get_seq_length(layer), rk.dims[2]) << "layer " << layer;
    ASSERT_EQ(k.size(0), rk.dims[0]);
    ASSERT_EQ(k.size(2), rk.dims[2]);
    EXPECT_EQ(to_doubles(k), rk.data) << "keys of layer " << layer;
    EXPECT_EQ(to_doubles(legacy[static_cast<std::size_t>(layer)].second),
              ref.values[static_cast<std::size_t>(layer)].data)
        << "values of layer " << layer;
  }
}

struct Pattern {
  const char* name;
  std::vector<std::int64_t> steps;  // q_len of each step
};

class DynamicCacheSteps : public ::testing::TestWithParam<std::tuple<Pattern, DType>> {};

TEST_P(DynamicCacheSteps, MatchesConcatenation) {
  const auto& [pattern, dtype] = GetParam();
  std::mt19937 rng(7);
  const int layers = 3;
  const std::int64_t batch = 2, heads = 3, head_dim = 8;
  DynamicCache<> cache;
  ConcatCache ref;
  for (std::int64_t q_len : pattern.steps) {
    for (int layer = 0; layer < layers; ++layer) {
      Tensor k = random_tensor({batch, heads, q_len, head_dim}, dtype, rng);
      Tensor v = random_tensor({batch, heads, q_len, head_dim}, dtype, rng);
      auto [keys, values] = cache.update(k, v, layer);
      ref.update(k, v, layer);
      // update returns views of past + new, [batch, heads, past + q_len, head_dim].
      ASSERT_EQ(keys.size(2), ref.length(layer));
      EXPECT_EQ(to_doubles(keys), ref.keys[static_cast<std::size_t>(layer)].data);
      EXPECT_EQ(to_doubles(values), ref.values[static_cast<std::size_t>(layer)].data);
      EXPECT_EQ(keys.dtype(), dtype);
    }
  }
  expect_same(cache, ref);
  EXPECT_EQ(cache.get_max_cache_shape(), -1);
  const std::int64_t total = ref.length();
  EXPECT_EQ(
      cache.nbytes(),
      static_cast<std::size_t>(layers * 2 * batch * heads * total * head_dim) * dtype_size(dtype));
  EXPECT_GE(cache.capacity_bytes(), cache.nbytes());
}

INSTANTIATE_TEST_SUITE_P(
    Patterns, DynamicCacheSteps,
    ::testing::Combine(::testing::Values(Pattern{"prefill_then_decode",
                                                 {7, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                                  1, 1, 1, 1, 1, 1, 1, 1, 1, 1}},
                                         Pattern{"chunks", {5, 3, 16, 1, 9, 2, 33}},
                                         Pattern{"decode_only", std::vector<std::int64_t>(40, 1)},
                                         Pattern{"empty_steps", {4, 0, 1, 0, 2}},
                                         Pattern{"one_long_prefill", {300}}),
                       ::testing::Values(DType::kFloat32, DType::kBFloat16, DType::kFloat16)),
    [](const auto& info) {
      return std::string(std::get<0>(info.param).name) + "_" +
             std::string(dtype_name(std::get<1>(info.param)));
    });

TEST(DynamicCache, UpdateReturnsViewsNotCopies) {
  std::mt19937 rng(1);
  DynamicCache<> cache(DynamicCacheOptions{.initial_capacity = 64});
  auto [k1, v1] = cache.update(random_tensor({1, 2, 4, 8}, DType::kFloat32, rng),
                               random_tensor({1, 2, 4, 8}, DType::kFloat32, rng), 0);
  auto [k2, v2] = cache.update(random_tensor({1, 2, 1, 8}, DType::kFloat32, rng),
                               random_tensor({1, 2, 1, 8}, DType::kFloat32, rng), 0);
  // No regrowth within capacity: both steps see the same storage, the second step only appended.
  EXPECT_EQ(k1.data(), k2.data());
  EXPECT_EQ(v1.data(), v2.data());
  EXPECT_EQ(cache.capacity(0), 64);
  EXPECT_FALSE(k2.is_contiguous());  // a window of [1, 2, 64, 8] storage
  EXPECT_EQ(k2.stride(1), 64 * 8);
}

TEST(DynamicCache, GrowthIsGeometric) {
  std::mt19937 rng(2);
  DynamicCache<> cache;
  int reallocations = 0;
  const void* last = nullptr;
  for (int step = 0; step < 2000; ++step) {
    auto [k, v] = cache.update(random_tensor({1, 1, 1, 4}, DType::kFloat32, rng),
                               random_tensor({1, 1, 1, 4}, DType::kFloat32, rng), 0);
    if (k.data() != last) ++reallocations;
    last = k.data();
  }
  // 1.5× growth from 16 slots reaches 2000 in about a dozen steps, not 2000.
  EXPECT_LE(reallocations, 14);
  EXPECT_GE(cache.capacity(), 2000);
  EXPECT_LT(cache.capacity(), 2000 * 3 / 2 + 16);
}

TEST(DynamicCache, AcceptsStridedInput) {
  // States as a model produces them: [batch, q_len, heads, head_dim] memory viewed as
  // [batch, heads, q_len, head_dim].
  std::mt19937 rng(3);
  Tensor k_bshd = random_tensor({2, 5, 3, 4}, DType::kFloat32, rng);
  Tensor v_bshd = random_tensor({2, 5, 3, 4}, DType::kFloat32, rng);
  DynamicCache<> cache;
  auto [keys, values] = cache.update(k_bshd.transpose(1, 2), v_bshd.transpose(1, 2), 0);
  EXPECT_EQ(to_doubles(keys), to_doubles(k_bshd.transpose(1, 2)));
  EXPECT_EQ(to_doubles(values), to_doubles(v_bshd.transpose(1, 2)));
}

TEST(DynamicCache, CallerBuffersAreCopiedNotReferenced) {
  std::vector<float> k(1 * 1 * 2 * 4, 1.5f), v(8, -2.0f);
  DynamicCache<> cache;
  cache.update(Tensor::from_blob(k.data(), {1, 1, 2, 4}, DType::kFloat32),
               Tensor::from_blob(v.data(), {1, 1, 2, 4}, DType::kFloat32), 0);
  std::fill(k.begin(), k.end(), 9.0f);  // the caller reuses its buffer
  const auto legacy = cache.to_legacy_cache();
  for (double x : to_doubles(legacy[0].first)) EXPECT_EQ(x, 1.5);
  for (double x : to_doubles(legacy[0].second)) EXPECT_EQ(x, -2.0);
}

// Fills a 2-layer cache with `length` tokens of `batch` rows, mirrored into `ref`.
void fill(DynamicCache<>& cache, ConcatCache& ref, std::int64_t batch, std::int64_t length,
          std::mt19937& rng) {
  for (std::int64_t done = 0; done < length;) {
    const std::int64_t q = done == 0 ? std::min<std::int64_t>(length, 5) : 1;
    for (int layer = 0; layer < 2; ++layer) {
      Tensor k = random_tensor({batch, 2, q, 4}, DType::kFloat32, rng);
      Tensor v = random_tensor({batch, 2, q, 4}, DType::kFloat32, rng);
      cache.update(k, v, layer);
      ref.update(k, v, layer);
    }
    done += q;
  }
}

TEST(DynamicCache, CropKeepsPrefixAndAcceptsNegative) {
  std::mt19937 rng(4);
  DynamicCache<> cache;
  ConcatCache ref;
  fill(cache, ref, 2, 12, rng);
  cache.crop(9);
  ref.crop(9);
  expect_same(cache, ref);
  cache.crop(-3);  // drop three
  ref.crop(-3);
  expect_same(cache, ref);
  EXPECT_EQ(cache.get_seq_length(), 6);
  cache.crop(100);  // past the length: nothing changes
  EXPECT_EQ(cache.get_seq_length(), 6);
  // Appending after a crop overwrites the dropped slots.
  fill(cache, ref, 2, 3, rng);
  expect_same(cache, ref);
}

TEST(DynamicCache, CropZeroEmptiesTheCache) {
  // transformers bug #47433: crop(0) there leaves the cache untouched; here it empties it.
  std::mt19937 rng(5);
  DynamicCache<> cache;
  ConcatCache ref;
  fill(cache, ref, 1, 4, rng);
  cache.crop(0);
  EXPECT_EQ(cache.get_seq_length(0), 0);
  EXPECT_EQ(cache.get_seq_length(1), 0);
  EXPECT_EQ(cache.nbytes(), 0u);
  EXPECT_EQ(cache.num_layers(), 2);
}

TEST(DynamicCache, ResetEmptiesAndKeepsMemory) {
  std::mt19937 rng(6);
  DynamicCache<> cache;
  ConcatCache ref;
  fill(cache, ref, 2, 10, rng);
  const std::size_t capacity = cache.capacity_bytes();
  cache.reset();
  EXPECT_EQ(cache.get_seq_length(), 0);
  EXPECT_EQ(cache.capacity_bytes(), capacity);
  // After a reset a new batch size is welcome (a new conversation).
  ConcatCache fresh;
  fill(cache, fresh, 3, 4, rng);
  expect_same(cache, fresh);
}

TEST(DynamicCache, ReorderCacheForBeams) {
  std::mt19937 rng(8);
  DynamicCache<> cache;
  ConcatCache ref;
  fill(cache, ref, 4, 6, rng);
  const std::vector<std::int64_t> beams = {2, 2, 0, 3};
  cache.reorder_cache(beams);
  ref.select(beams);
  expect_same(cache, ref);
  fill(cache, ref, 4, 2, rng);  // decoding goes on after the reorder
  expect_same(cache, ref);
}

TEST(DynamicCache, BracedListsForReorderAndSelect) {
  std::mt19937 rng(18);
  DynamicCache<> cache;
  ConcatCache ref;
  fill(cache, ref, 3, 5, rng);
  cache.reorder_cache({1, 1, 0});  // the base's initializer_list overloads, seen through the class
  ref.select({1, 1, 0});
  expect_same(cache, ref);
  cache.batch_select_indices({2, 0});
  ref.select({2, 0});
  expect_same(cache, ref);
  Cache<cpu::Backend>& base = cache;
  base.reorder_cache({1, 0});
  ref.select({1, 0});
  expect_same(cache, ref);
  EXPECT_KVCACHE_ERROR(cache.reorder_cache({0, 5}), "expected indices in [0, 2)");
}

TEST(DynamicCache, BatchRepeatInterleave) {
  std::mt19937 rng(9);
  DynamicCache<> cache;
  ConcatCache ref;
  fill(cache, ref, 2, 5, rng);
  cache.batch_repeat_interleave(3);
  ref.select({0, 0, 0, 1, 1, 1});
  expect_same(cache, ref);
  EXPECT_EQ(cache.batch_size(), 6);
}

TEST(DynamicCache, BatchSelectIndices) {
  std::mt19937 rng(10);
  DynamicCache<> cache;
  ConcatCache ref;
  fill(cache, ref, 5, 7, rng);
  cache.batch_select_indices(std::vector<std::int64_t>{4, 1});
  ref.select({4, 1});
  expect_same(cache, ref);
  fill(cache, ref, 2, 1, rng);
  expect_same(cache, ref);
}

TEST(DynamicCache, MaskSizesAreSeqLengthPlusQuery) {
  std::mt19937 rng(11);
  DynamicCache<> cache;
  ConcatCache ref;
  fill(cache, ref, 1, 9, rng);
  const std::vector<std::int64_t> next = {9, 10, 11};
  const MaskSizes sizes = cache.get_mask_sizes(next, 0);
  EXPECT_EQ(sizes.kv_length, 12);
  EXPECT_EQ(sizes.kv_offset, 0);
  EXPECT_EQ(cache.get_mask_sizes(next, 5).kv_length, 3);  // a layer not seen yet
}

TEST(DynamicCache, ViewsOutliveRegrowthAndTheCache) {
  std::mt19937 rng(12);
  Tensor keys;
  std::vector<double> expected;
  {
    DynamicCache<> cache;
    Tensor k = random_tensor({1, 1, 3, 4}, DType::kFloat32, rng);
    keys = cache.update(k, k, 0).first;
    expected = to_doubles(keys);
    for (int i = 0; i < 100; ++i)
      cache.update(random_tensor({1, 1, 1, 4}, DType::kFloat32, rng),
                   random_tensor({1, 1, 1, 4}, DType::kFloat32, rng), 0);
  }
  EXPECT_TRUE(keys.owns_storage());
  EXPECT_EQ(to_doubles(keys), expected);  // still readable: the view shares the old storage
}

// --- errors: each rejected call names what it expected and leaves the cache as it was ---------

class DynamicCacheErrors : public ::testing::Test {
 protected:
  void SetUp() override { fill(cache_, ref_, 2, 6, rng_); }
  void expect_unchanged() {
    expect_same(cache_, ref_);
    EXPECT_EQ(cache_.batch_size(), 2);
  }
  Tensor states(std::int64_t b, std::int64_t h, std::int64_t q, std::int64_t d,
                DType dt = DType::kFloat32) {
    return random_tensor({b, h, q, d}, dt, rng_);
  }
  std::mt19937 rng_{13};
  DynamicCache<> cache_;
  ConcatCache ref_;
};

TEST_F(DynamicCacheErrors, BatchChange) {
  EXPECT_KVCACHE_ERROR(cache_.update(states(3, 2, 1, 4), states(3, 2, 1, 4), 0),
                       "expected new states [2, 2, q_len, 4]");
  expect_unchanged();
}

TEST_F(DynamicCacheErrors, HeadsChange) {
  EXPECT_KVCACHE_ERROR(cache_.update(states(2, 4, 1, 4), states(2, 4, 1, 4), 1),
                       "got [2, 4, 1, 4]");
  expect_unchanged();
}

TEST_F(DynamicCacheErrors, HeadDimChange) {
  EXPECT_KVCACHE_ERROR(cache_.update(states(2, 2, 1, 8), states(2, 2, 1, 8), 0),
                       "layer 0 holds [2, 2, 6, 4]");
  expect_unchanged();
}

TEST_F(DynamicCacheErrors, KeyValueShapesDiffer) {
  EXPECT_KVCACHE_ERROR(
      cache_.update(states(2, 2, 1, 4), states(2, 2, 2, 4), 0),
      "expected value_states shaped like key_states [2, 2, 1, 4], got [2, 2, 2, 4]");
  expect_unchanged();
}

TEST_F(DynamicCacheErrors, KeyValueDtypesDiffer) {
  EXPECT_KVCACHE_ERROR(cache_.update(states(2, 2, 1, 4), states(2, 2, 1, 4, DType::kBFloat16), 0),
                       "one dtype, got float32 and bfloat16");
  expect_unchanged();
}

TEST_F(DynamicCacheErrors, DtypeChangesBetweenSteps) {
  EXPECT_KVCACHE_ERROR(
      cache_.update(states(2, 2, 1, 4, DType::kFloat16), states(2, 2, 1, 4, DType::kFloat16), 0),
      "got [2, 2, 1, 4] float16 cpu");
  expect_unchanged();
}

TEST_F(DynamicCacheErrors, NonFloatStates) {
  Tensor ints = Tensor::zeros({2, 2, 1, 4}, DType::kInt32);
  EXPECT_KVCACHE_ERROR(cache_.update(ints, ints, 0),
                       "expected float32, float16 or bfloat16 states, got int32");
  expect_unchanged();
}

TEST_F(DynamicCacheErrors, DeviceMismatch) {
  std::vector<float> fake(16);
  Tensor on_gpu = Tensor::from_blob(fake.data(), {2, 2, 1, 4}, DType::kFloat32, Device::kCuda);
  EXPECT_KVCACHE_ERROR(cache_.update(on_gpu, on_gpu, 0),
                       "expected states on cpu (the cache's backend), got cuda");
  expect_unchanged();
}

TEST_F(DynamicCacheErrors, LayerSkipped) {
  EXPECT_KVCACHE_ERROR(cache_.update(states(2, 2, 1, 4), states(2, 2, 1, 4), 3),
                       "expected layer_idx in [0, 2] (layers are added in order), got 3");
  EXPECT_KVCACHE_ERROR(cache_.update(states(2, 2, 1, 4), states(2, 2, 1, 4), -1), "got -1");
  expect_unchanged();
}

TEST_F(DynamicCacheErrors, WrongRankOrUndefined) {
  EXPECT_KVCACHE_ERROR(cache_.update(Tensor::zeros({2, 2, 4}, DType::kFloat32),
                                     Tensor::zeros({2, 2, 4}, DType::kFloat32), 0),
                       "expected key_states [batch, num_kv_heads, q_len, head_dim]");
  EXPECT_KVCACHE_ERROR(cache_.update(Tensor(), Tensor(), 0), "undefined tensor");
  expect_unchanged();
}

TEST_F(DynamicCacheErrors, NewLayerWithOtherBatch) {
  EXPECT_KVCACHE_ERROR(cache_.update(states(3, 2, 1, 4), states(3, 2, 1, 4), 2),
                       "expected batch 2 (the batch the cache holds), got 3");
  expect_unchanged();
}

TEST_F(DynamicCacheErrors, BeamIndexOutOfRange) {
  EXPECT_KVCACHE_ERROR(cache_.reorder_cache(std::vector<std::int64_t>{0, 2}),
                       "expected indices in [0, 2), got 2 at position 1");
  EXPECT_KVCACHE_ERROR(cache_.reorder_cache(std::vector<std::int64_t>{0, -1}),
                       "got -1 at position 1");
  EXPECT_KVCACHE_ERROR(cache_.reorder_cache(std::vector<std::int64_t>{0}),
                       "expected 2 beam indices (one per row), got 1");
  EXPECT_KVCACHE_ERROR(cache_.batch_select_indices(std::vector<std::int64_t>{5}),
                       "expected indices in [0, 2), got 5");
  EXPECT_KVCACHE_ERROR(cache_.batch_select_indices(std::vector<std::int64_t>{}),
                       "expected at least one index");
  EXPECT_KVCACHE_ERROR(cache_.batch_repeat_interleave(0), "expected repeats >= 1, got 0");
  expect_unchanged();
}

TEST_F(DynamicCacheErrors, CropPastTheLength) {
  EXPECT_KVCACHE_ERROR(cache_.crop(-7),
                       "expected to drop at most 6 tokens (the cache length), got 7");
  expect_unchanged();
}

TEST(DynamicCache, NegativeInitialCapacityIsAnError) {
  EXPECT_KVCACHE_ERROR(DynamicCache<>(DynamicCacheOptions{.initial_capacity = -1}),
                       "expected initial_capacity >= 0");
}

// --- reserve, storage, mark_appended: what a replayed decode step (a CUDA graph) relies on ------

TEST(DynamicCache, ReserveGrowsEveryLayerAndKeepsTheTokens) {
  std::mt19937 rng(20);
  DynamicCache<> cache;  // 16 slots at the first update
  ConcatCache ref;
  fill(cache, ref, 2, 6, rng);
  ASSERT_EQ(cache.capacity(0), 16);
  cache.reserve(100);
  for (int layer = 0; layer < 2; ++layer) {
    EXPECT_GE(cache.capacity(layer), 100) << "layer " << layer;
    EXPECT_EQ(cache.storage(layer).first.size(2), cache.capacity(layer));
  }
  expect_same(cache, ref);  // lengths and contents kept
  EXPECT_EQ(cache.batch_size(), 2);
}

TEST(DynamicCache, ReservedStorageDoesNotMoveUpToTheReservedLength) {
  std::mt19937 rng(21);
  DynamicCache<> cache;
  ConcatCache ref;
  fill(cache, ref, 2, 5, rng);
  cache.reserve(60);
  const void* keys[2] = {cache.storage(0).first.data(), cache.storage(1).first.data()};
  const void* values[2] = {cache.storage(0).second.data(), cache.storage(1).second.data()};
  const std::int64_t capacity = cache.capacity(0);
  // Decode one token at a time, then a chunk of 4, up to exactly 60 tokens.
  while (cache.get_seq_length() < 60) {
    const std::int64_t q =
        cache.get_seq_length() + 4 <= 60 && cache.get_seq_length() % 10 == 0 ? 4 : 1;
    for (int layer = 0; layer < 2; ++layer) {
      Tensor k = random_tensor({2, 2, q, 4}, DType::kFloat32, rng);
      Tensor v = random_tensor({2, 2, q, 4}, DType::kFloat32, rng);
      const auto [ks, vs] = cache.update(k, v, layer);
      ref.update(k, v, layer);
      ASSERT_EQ(ks.data(), keys[layer])
          << "keys of layer " << layer << " moved at length " << cache.get_seq_length(layer);
      ASSERT_EQ(vs.data(), values[layer]) << "values of layer " << layer << " moved";
      ASSERT_EQ(cache.storage(layer).first.data(), keys[layer]);
      ASSERT_EQ(cache.capacity(layer), capacity);
    }
  }
  expect_same(cache, ref);
}

TEST(DynamicCache, ReserveWithinCapacityChangesNothing) {
  std::mt19937 rng(22);
  DynamicCache<> cache(DynamicCacheOptions{.initial_capacity = 40});
  ConcatCache ref;
  fill(cache, ref, 1, 7, rng);
  const void* before = cache.storage(0).first.data();
  const std::size_t bytes = cache.capacity_bytes();
  for (std::int64_t tokens : {0, 3, 7, 39, 40}) {
    cache.reserve(tokens);
    EXPECT_EQ(cache.capacity(0), 40) << "reserve(" << tokens << ")";
    EXPECT_EQ(cache.capacity(1), 40) << "reserve(" << tokens << ")";
    EXPECT_EQ(cache.storage(0).first.data(), before) << "reserve(" << tokens << ")";
    EXPECT_EQ(cache.capacity_bytes(), bytes);
  }
  expect_same(cache, ref);
}

TEST(DynamicCache, ReserveKeepsAllBatchRowsAndDtypes) {
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    std::mt19937 rng(23);
    DynamicCache<> cache;
    ConcatCache ref;
    for (int layer = 0; layer < 3; ++layer) {
      Tensor k = random_tensor({3, 2, 9, 8}, dtype, rng);
      Tensor v = random_tensor({3, 2, 9, 8}, dtype, rng);
      cache.update(k, v, layer);
      ref.update(k, v, layer);
    }
    cache.reserve(33);
    expect_same(cache, ref);
    for (int layer = 0; layer < 3; ++layer) {
      EXPECT_GE(cache.capacity(layer), 33);
      EXPECT_EQ(cache.storage(layer).first.dtype(), dtype);
    }
  }
}

TEST(DynamicCache, ReserveNegativeIsAnErrorAndChangesNothing) {
  std::mt19937 rng(24);
  DynamicCache<> cache;
  ConcatCache ref;
  fill(cache, ref, 2, 6, rng);
  const void* before = cache.storage(0).first.data();
  EXPECT_KVCACHE_ERROR(cache.reserve(-1), "expected tokens >= 0, got -1");
  EXPECT_EQ(cache.capacity(0), 16);
  EXPECT_EQ(cache.storage(0).first.data(), before);
  expect_same(cache, ref);
}

TEST(DynamicCache, ReserveOnACacheWithoutLayersAddsNone) {
  DynamicCache<> cache;
  cache.reserve(50);
  EXPECT_EQ(cache.num_layers(), 0);
  EXPECT_EQ(cache.capacity(0), 0);
  EXPECT_EQ(cache.get_seq_length(), 0);
}

TEST(DynamicCache, StorageIsTheWholeCapacityWithTheTokensFirst) {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    std::mt19937 rng(25);
    DynamicCache<> cache(DynamicCacheOptions{.initial_capacity = 23});
    ConcatCache ref;
    std::pair<Tensor, Tensor> returned[2];
    for (std::int64_t q : {5, 1, 2}) {
      for (int layer = 0; layer < 2; ++layer) {
        Tensor k = random_tensor({2, 3, q, 8}, dtype, rng);
        Tensor v = random_tensor({2, 3, q, 8}, dtype, rng);
        returned[layer] = cache.update(k, v, layer);
        ref.update(k, v, layer);
      }
    }
    for (int layer = 0; layer < 2; ++layer) {
      const auto [keys, values] = cache.storage(layer);
      EXPECT_EQ(keys.shape_string(), "[2, 3, 23, 8]");
      EXPECT_EQ(values.shape_string(), "[2, 3, 23, 8]");
      EXPECT_EQ(keys.dtype(), dtype);
      EXPECT_EQ(keys.device(), Device::kCpu);
      // The same memory the update's views cover, from slot 0.
      EXPECT_EQ(keys.data(), returned[layer].first.data());
      EXPECT_EQ(values.data(), returned[layer].second.data());
      const std::int64_t length = cache.get_seq_length(layer);
      ASSERT_EQ(length, 8);
      EXPECT_EQ(to_doubles(keys.slice(2, 0, length)),
                ref.keys[static_cast<std::size_t>(layer)].data)
          << "layer " << layer;
      EXPECT_EQ(to_doubles(values.slice(2, 0, length)),
                ref.values[static_cast<std::size_t>(layer)].data)
          << "layer " << layer;
    }
  }
}

TEST(DynamicCache, StorageOfAMissingLayerIsAnError) {
  std::mt19937 rng(26);
  DynamicCache<> empty;
  EXPECT_KVCACHE_ERROR(empty.storage(0), "expected layer_idx in [0, 0), got 0");
  DynamicCache<> cache;
  ConcatCache ref;
  fill(cache, ref, 1, 3, rng);
  EXPECT_KVCACHE_ERROR(cache.storage(2), "expected layer_idx in [0, 2), got 2");
  EXPECT_KVCACHE_ERROR(cache.storage(-1), "got -1");
  expect_same(cache, ref);
}

// Writes `k` and `v` [batch, heads, n, head_dim] into every layer's storage at slots
// [seq_len, seq_len + n), as a replayed decode step's kernels do.
void write_slots(const DynamicCache<>& cache, const std::vector<Tensor>& k,
                 const std::vector<Tensor>& v) {
  for (int layer = 0; layer < cache.num_layers(); ++layer) {
    const auto [keys, values] = cache.storage(layer);
    const std::int64_t past = cache.get_seq_length(layer);
    const std::int64_t n = k[static_cast<std::size_t>(layer)].size(2);
    cpu::copy(keys.slice(2, past, past + n), k[static_cast<std::size_t>(layer)]);
    cpu::copy(values.slice(2, past, past + n), v[static_cast<std::size_t>(layer)]);
  }
}

TEST(DynamicCache, MarkAppendedEqualsUpdate) {
  for (DType dtype : {DType::kFloat32, DType::kFloat16}) {
    std::mt19937 rng(27);
    DynamicCache<> by_update(DynamicCacheOptions{.initial_capacity = 32});
    DynamicCache<> by_hand(DynamicCacheOptions{.initial_capacity = 32});
    for (int layer = 0; layer < 2; ++layer) {
      Tensor k = random_tensor({2, 2, 5, 8}, dtype, rng);
      Tensor v = random_tensor({2, 2, 5, 8}, dtype, rng);
      by_update.update(k, v, layer);
      by_hand.update(k, v, layer);
    }
    // Steps of 1, 1, 3 and 1 tokens: written by hand then recorded, or appended by update().
    for (std::int64_t n : {1, 1, 3, 1}) {
      std::vector<Tensor> k, v;
      for (int layer = 0; layer < 2; ++layer) {
        k.push_back(random_tensor({2, 2, n, 8}, dtype, rng));
        v.push_back(random_tensor({2, 2, n, 8}, dtype, rng));
      }
      for (int layer = 0; layer < 2; ++layer)
        by_update.update(k[static_cast<std::size_t>(layer)], v[static_cast<std::size_t>(layer)],
                         layer);
      const void* storage = by_hand.storage(0).first.data();
      write_slots(by_hand, k, v);
      by_hand.mark_appended(n);
      EXPECT_EQ(by_hand.storage(0).first.data(), storage);  // recorded, not reallocated
      const auto want = by_update.to_legacy_cache();
      const auto got = by_hand.to_legacy_cache();
      ASSERT_EQ(got.size(), want.size());
      for (int layer = 0; layer < 2; ++layer) {
        const auto l = static_cast<std::size_t>(layer);
        ASSERT_EQ(by_hand.get_seq_length(layer), by_update.get_seq_length(layer));
        EXPECT_EQ(got[l].first.shape_string(), want[l].first.shape_string());
        EXPECT_EQ(to_doubles(got[l].first), to_doubles(want[l].first)) << "layer " << layer;
        EXPECT_EQ(to_doubles(got[l].second), to_doubles(want[l].second)) << "layer " << layer;
      }
      EXPECT_EQ(by_hand.nbytes(), by_update.nbytes());
    }
    EXPECT_EQ(by_hand.get_seq_length(), 5 + 6);
    // An ordinary update after mark_appended appends after the recorded tokens.
    Tensor k = random_tensor({2, 2, 1, 8}, dtype, rng);
    for (int layer = 0; layer < 2; ++layer) {
      const auto [hand_keys, hand_values] = by_hand.update(k, k, layer);
      const auto [want_keys, want_values] = by_update.update(k, k, layer);
      EXPECT_EQ(to_doubles(hand_keys), to_doubles(want_keys));
      EXPECT_EQ(to_doubles(hand_values), to_doubles(want_values));
    }
    EXPECT_EQ(by_hand.get_seq_length(1), 12);
  }
}

TEST(DynamicCache, MarkAppendedUpToTheLastSlot) {
  std::mt19937 rng(28);
  DynamicCache<> cache;
  ConcatCache ref;
  fill(cache, ref, 2, 6, rng);
  ASSERT_EQ(cache.capacity(0), 16);
  // The ten free slots, written by hand, then recorded in one call.
  std::vector<Tensor> k, v;
  for (int layer = 0; layer < 2; ++layer) {
    k.push_back(random_tensor({2, 2, 10, 4}, DType::kFloat32, rng));
    v.push_back(random_tensor({2, 2, 10, 4}, DType::kFloat32, rng));
  }
  write_slots(cache, k, v);
  cache.mark_appended(10);
  for (int layer = 0; layer < 2; ++layer)
    ref.update(k[static_cast<std::size_t>(layer)], v[static_cast<std::size_t>(layer)], layer);
  expect_same(cache, ref);
  EXPECT_EQ(cache.get_seq_length(), 16);
  EXPECT_EQ(cache.capacity(0), 16);
  cache.mark_appended(0);  // no tokens: nothing to do, even when full
  expect_same(cache, ref);
}

TEST_F(DynamicCacheErrors, MarkAppendedWithoutRoom) {
  // Six tokens held in 16 slots: ten free.
  ASSERT_EQ(cache_.capacity(0), 16);
  EXPECT_KVCACHE_ERROR(cache_.mark_appended(11), "expected room for 11 more token(s) in layer 0");
  expect_unchanged();
  EXPECT_KVCACHE_ERROR(cache_.mark_appended(1000), "expected room for 1000 more token(s)");
  expect_unchanged();
}

TEST_F(DynamicCacheErrors, MarkAppendedNegative) {
  EXPECT_KVCACHE_ERROR(cache_.mark_appended(-1), "expected tokens >= 0, got -1");
  expect_unchanged();
}

TEST(DynamicCache, MarkAppendedChecksEveryLayerBeforeChangingAny) {
  // Layer 0 holds 6 tokens (10 free slots), layer 1 holds 12 (4 free): 7 fit in layer 0 only.
  std::mt19937 rng(29);
  DynamicCache<> cache;
  ConcatCache ref;
  for (auto [layer, q] : {std::pair{0, 6}, std::pair{1, 12}}) {
    Tensor k = random_tensor({1, 2, q, 4}, DType::kFloat32, rng);
    Tensor v = random_tensor({1, 2, q, 4}, DType::kFloat32, rng);
    cache.update(k, v, layer);
    ref.update(k, v, layer);
  }
  ASSERT_EQ(cache.capacity(0), 16);
  ASSERT_EQ(cache.capacity(1), 16);
  EXPECT_KVCACHE_ERROR(cache.mark_appended(7), "in layer 1, which holds 12 of 16 slots");
  EXPECT_EQ(cache.get_seq_length(0), 6);
  EXPECT_EQ(cache.get_seq_length(1), 12);
  expect_same(cache, ref);
}

TEST(DynamicCache, MarkAppendedOnAnEmptyCacheIsAnError) {
  DynamicCache<> none;
  EXPECT_KVCACHE_ERROR(none.mark_appended(1), "the cache holds no layer");
  EXPECT_EQ(none.num_layers(), 0);
  EXPECT_EQ(none.get_seq_length(), 0);
  // Layers that hold no token (after a reset) have nothing to append after either.
  std::mt19937 rng(30);
  DynamicCache<> cache;
  ConcatCache ref;
  fill(cache, ref, 2, 4, rng);
  cache.reset();
  EXPECT_KVCACHE_ERROR(cache.mark_appended(1), "DynamicCache::mark_appended");
  EXPECT_EQ(cache.get_seq_length(0), 0);
  EXPECT_EQ(cache.get_seq_length(1), 0);
  EXPECT_EQ(cache.batch_size(), -1);
}

// --- copies are explicit and deep: clone() -----------------------------------------------------

static_assert(!std::is_copy_constructible_v<DynamicCache<>>,
              "a member-wise copy would share storage: copying must go through clone()");
static_assert(!std::is_copy_assignable_v<DynamicCache<>>);
static_assert(std::is_nothrow_move_constructible_v<DynamicCache<>>);
static_assert(std::is_nothrow_move_assignable_v<DynamicCache<>>);

TEST(DynamicCache, CloneIsDeepAndIndependent) {
  std::mt19937 rng(40);
  DynamicCache<> original(DynamicCacheOptions{.initial_capacity = 40});
  ConcatCache ref;
  fill(original, ref, 2, 9, rng);
  DynamicCache<> copy = original.clone();
  expect_same(copy, ref);
  EXPECT_EQ(copy.capacity(0), original.capacity(0));  // a reserved prompt stays reserved
  EXPECT_EQ(copy.capacity_bytes(), original.capacity_bytes());
  for (int layer = 0; layer < 2; ++layer) {
    EXPECT_NE(copy.storage(layer).first.data(), original.storage(layer).first.data());
    EXPECT_NE(copy.storage(layer).second.data(), original.storage(layer).second.data());
  }
  // Each side goes on its own way: different tokens, a crop, a batch change.
  ConcatCache ref_copy = ref;
  fill(original, ref, 2, 3, rng);
  fill(copy, ref_copy, 2, 5, rng);
  expect_same(original, ref);
  expect_same(copy, ref_copy);
  copy.crop(4);
  ref_copy.crop(4);
  copy.batch_select_indices(std::vector<std::int64_t>{1});
  ref_copy.select({1});
  expect_same(copy, ref_copy);
  expect_same(original, ref);
  EXPECT_EQ(original.batch_size(), 2);
}

TEST(DynamicCache, CloneThroughTheBaseKeepsTheKind) {
  std::mt19937 rng(41);
  DynamicCache<> original;
  ConcatCache ref;
  fill(original, ref, 1, 6, rng);
  const Cache<cpu::Backend>& base = original;
  std::unique_ptr<Cache<cpu::Backend>> copy = base.clone();
  auto* dynamic = dynamic_cast<DynamicCache<>*>(copy.get());
  ASSERT_NE(dynamic, nullptr);
  expect_same(*dynamic, ref);
  fill(*dynamic, ref, 1, 2, rng);
  EXPECT_EQ(original.get_seq_length(), 6);  // the original is not touched
  EXPECT_EQ(copy->get_seq_length(), 8);
}

TEST(DynamicCache, CloneOfEmptyAndResetCaches) {
  DynamicCache<> none;
  DynamicCache<> none_copy = none.clone();
  EXPECT_EQ(none_copy.num_layers(), 0);
  std::mt19937 rng(42);
  DynamicCache<> cache;
  ConcatCache ref;
  fill(cache, ref, 2, 5, rng);
  cache.reset();
  DynamicCache<> copy = cache.clone();
  EXPECT_EQ(copy.num_layers(), 2);
  EXPECT_EQ(copy.get_seq_length(), 0);
  EXPECT_EQ(copy.batch_size(), -1);
  ConcatCache fresh;
  fill(copy, fresh, 3, 2, rng);  // a new batch size is welcome, as after the reset
  expect_same(copy, fresh);
}

// --- sizes that cannot be held: clear errors, no overflow, the cache unchanged (issue #10) ------

TEST_F(DynamicCacheErrors, CropOfTheMostNegativeValue) {
  EXPECT_KVCACHE_ERROR(cache_.crop(std::numeric_limits<std::int64_t>::min()),
                       "expected to drop at most 6 tokens (the cache length), got "
                       "9223372036854775808");
  expect_unchanged();
  DynamicCache<> empty;
  EXPECT_KVCACHE_ERROR(empty.crop(std::numeric_limits<std::int64_t>::min()),
                       "expected to drop at most 0 tokens");
  empty.crop(std::numeric_limits<std::int64_t>::max());  // past the length: nothing changes
  EXPECT_EQ(empty.get_seq_length(), 0);
}

TEST_F(DynamicCacheErrors, HugeRepeatInterleave) {
  // 2 rows x 2^62 overflows int64 (it used to wrap and leave batch 0).
  EXPECT_KVCACHE_ERROR(cache_.batch_repeat_interleave(std::int64_t{1} << 62),
                       "does not fit in 64 bits");
  EXPECT_KVCACHE_ERROR(cache_.batch_repeat_interleave(std::numeric_limits<std::int64_t>::max()),
                       "does not fit in 64 bits");
  // 2^41 rows fit in int64 but not in memory: an error, not std::bad_alloc.
  EXPECT_KVCACHE_ERROR(cache_.batch_repeat_interleave(std::int64_t{1} << 40), "DynamicCache");
  expect_unchanged();
}

TEST(DynamicCache, HugeInitialCapacityIsAnErrorAtTheFirstUpdate) {
  std::mt19937 rng(43);
  for (const std::int64_t capacity : {std::int64_t{1} << 62, std::int64_t{1} << 45}) {
    DynamicCache<> cache(DynamicCacheOptions{.initial_capacity = capacity});
    const Tensor k = random_tensor({1, 2, 3, 4}, DType::kFloat32, rng);
    // 2^62 slots overflow the byte count; 2^45 slots (2^50 bytes) cannot be allocated.
    EXPECT_KVCACHE_ERROR(cache.update(k, k, 0), "DynamicCache::update");
    EXPECT_EQ(cache.num_layers(), 0);
    EXPECT_EQ(cache.get_seq_length(), 0);
    EXPECT_EQ(cache.capacity_bytes(), 0u);
    LegacyCache legacy = {{k, k}};
    EXPECT_KVCACHE_ERROR(DynamicCache<>::from_legacy_cache(legacy, {.initial_capacity = capacity}),
                         "DynamicCache::update");
  }
  try {
    DynamicCache<> cache(DynamicCacheOptions{.initial_capacity = std::int64_t{1} << 62});
    const Tensor k = random_tensor({1, 2, 3, 4}, DType::kFloat32, rng);
    cache.update(k, k, 0);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("does not fit in 64 bits"), std::string::npos) << e.what();
  }
}

TEST_F(DynamicCacheErrors, HugeReserve) {
  EXPECT_KVCACHE_ERROR(cache_.reserve(std::int64_t{1} << 62), "does not fit in 64 bits");
  EXPECT_KVCACHE_ERROR(cache_.reserve(std::numeric_limits<std::int64_t>::max()),
                       "DynamicCache::reserve");
  EXPECT_KVCACHE_ERROR(cache_.reserve(std::int64_t{1} << 45),
                       "DynamicCache::reserve: out of memory: cache storage needs");
  expect_unchanged();
  EXPECT_EQ(cache_.capacity(0), 16);
}

}  // namespace
}  // namespace kvcache
