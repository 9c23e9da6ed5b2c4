// The legacy format (transformers' tuple of tuples): from_legacy_cache / to_legacy_cache round
// trips, costs (a copy in, views out) and bad input.
#include "kvcache/cache/legacy.hpp"

#include <gtest/gtest.h>

#include <random>

#include "kvcache/cache/dynamic_cache.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using testing::random_tensor;
using testing::to_doubles;

LegacyCache make_legacy(int layers, std::int64_t batch, std::int64_t heads, std::int64_t seq,
                        std::int64_t dim, DType dtype, std::mt19937& rng) {
  LegacyCache legacy;
  for (int i = 0; i < layers; ++i) {
    legacy.emplace_back(random_tensor({batch, heads, seq, dim}, dtype, rng),
                        random_tensor({batch, heads, seq, dim}, dtype, rng));
  }
  return legacy;
}

TEST(LegacyCache, RoundTripIsLossless) {
  std::mt19937 rng(21);
  for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    const LegacyCache legacy = make_legacy(4, 2, 3, 9, 16, dtype, rng);
    const auto cache = DynamicCache<>::from_legacy_cache(legacy);
    EXPECT_EQ(cache.num_layers(), 4);
    EXPECT_EQ(cache.get_seq_length(), 9);
    const LegacyCache back = cache.to_legacy_cache();
    ASSERT_EQ(back.size(), legacy.size());
    for (std::size_t i = 0; i < legacy.size(); ++i) {
      EXPECT_EQ(back[i].first.dtype(), dtype);
      EXPECT_EQ(back[i].first.shape_string(), legacy[i].first.shape_string());
      EXPECT_EQ(to_doubles(back[i].first), to_doubles(legacy[i].first));
      EXPECT_EQ(to_doubles(back[i].second), to_doubles(legacy[i].second));
    }
    // And back again: a cache built from the views equals the first.
    const auto again = DynamicCache<>::from_legacy_cache(back);
    const LegacyCache twice = again.to_legacy_cache();
    for (std::size_t i = 0; i < legacy.size(); ++i)
      EXPECT_EQ(to_doubles(twice[i].first), to_doubles(legacy[i].first));
  }
}

TEST(LegacyCache, FromLegacyCopiesToLegacyViews) {
  std::mt19937 rng(22);
  LegacyCache legacy = make_legacy(2, 1, 2, 5, 8, DType::kFloat32, rng);
  const std::vector<double> original = to_doubles(legacy[0].first);
  auto cache = DynamicCache<>::from_legacy_cache(legacy);
  // from_legacy_cache copied: changing the input afterwards does not reach the cache.
  legacy[0].first.data_as<float>()[0] = 1234.0f;
  LegacyCache views = cache.to_legacy_cache();
  EXPECT_EQ(to_doubles(views[0].first), original);
  // to_legacy_cache returned views: they share the cache's storage.
  auto [keys, values] = cache.update(random_tensor({1, 2, 1, 8}, DType::kFloat32, rng),
                                     random_tensor({1, 2, 1, 8}, DType::kFloat32, rng), 0);
  EXPECT_EQ(views[0].first.data(), keys.data());
  EXPECT_EQ(views[0].first.size(2), 5);  // a view keeps the length it was taken with
}

TEST(LegacyCache, EmptyLegacyGivesEmptyCache) {
  const auto cache = DynamicCache<>::from_legacy_cache({});
  EXPECT_EQ(cache.num_layers(), 0);
  EXPECT_EQ(cache.get_seq_length(), 0);
  EXPECT_TRUE(cache.to_legacy_cache().empty());
}

TEST(LegacyCache, BadLayersAreErrors) {
  std::mt19937 rng(23);
  LegacyCache legacy = make_legacy(3, 2, 2, 4, 8, DType::kFloat32, rng);
  legacy[1].second = random_tensor({2, 2, 5, 8}, DType::kFloat32, rng);
  EXPECT_KVCACHE_ERROR(
      DynamicCache<>::from_legacy_cache(legacy),
      "expected value_states shaped like key_states [2, 2, 4, 8], got [2, 2, 5, 8]");
  legacy = make_legacy(2, 2, 2, 4, 8, DType::kFloat32, rng);
  legacy[1] = {random_tensor({3, 2, 4, 8}, DType::kFloat32, rng),
               random_tensor({3, 2, 4, 8}, DType::kFloat32, rng)};
  EXPECT_KVCACHE_ERROR(DynamicCache<>::from_legacy_cache(legacy),
                       "expected batch 2 (the batch the cache holds), got 3");
}

}  // namespace
}  // namespace kvcache
