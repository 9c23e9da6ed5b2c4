// The mask rule (key slot j visible to query i when j <= cache_position[i] and not padding) and
// the seed's loop helpers: extend the mask by a column of ones, cache_position = last + 1.
#include "kvcache/attention/mask.hpp"

#include <gtest/gtest.h>

#include "test_util.hpp"

namespace kvcache {
namespace {

using testing::to_doubles;

TEST(Mask, CausalAndPaddingCombine) {
  // Row 0 unpadded, row 1 with one leading pad; a two-token step at slots 3 and 4.
  std::vector<std::int64_t> m = {1, 1, 1, 1, 1, 0, 1, 1, 1, 1};
  Tensor mask = Tensor::from_blob(m.data(), {2, 5}, DType::kInt64);
  const std::vector<std::int64_t> pos = {3, 4};
  Tensor full = make_attention_mask(mask, pos, 2, 5);
  EXPECT_EQ(full.shape_string(), "[2, 2, 5]");
  EXPECT_EQ(to_doubles(full), (std::vector<double>{1, 1, 1, 1, 0,  //
                                                   1, 1, 1, 1, 1,  //
                                                   0, 1, 1, 1, 0,  //
                                                   0, 1, 1, 1, 1}));
}

TEST(Mask, KvOffsetShiftsSlots) {
  // Keys starting at absolute slot 10 (a window), query at slot 11.
  const std::vector<std::int64_t> pos = {11};
  Tensor full = make_attention_mask(Tensor(), pos, 1, 3, 10);
  EXPECT_EQ(to_doubles(full), (std::vector<double>{1, 1, 0}));
}

TEST(Mask, SeedLoopHelpers) {
  std::vector<std::uint8_t> m = {0, 1, 1};
  Tensor mask = Tensor::from_blob(m.data(), {1, 3}, DType::kUInt8);
  Tensor grown = extend_attention_mask(mask);
  EXPECT_EQ(grown.dtype(), DType::kInt64);
  EXPECT_EQ(to_doubles(grown), (std::vector<double>{0, 1, 1, 1}));
  EXPECT_EQ(make_cache_position(10, 3), (std::vector<std::int64_t>{10, 11, 12}));
  EXPECT_EQ(to_doubles(ones_mask(2, 2)), (std::vector<double>{1, 1, 1, 1}));
}

TEST(Mask, ChecksShapeDtypeAndValues) {
  Tensor mask = ones_mask(2, 4);
  EXPECT_EQ(mask_to_bytes(mask, 2, 4, "test").size(), 8u);
  EXPECT_TRUE(mask_to_bytes(Tensor(), 2, 4, "test").empty());
  EXPECT_KVCACHE_ERROR(mask_to_bytes(mask, 2, 5, "test"),
                       "test: expected attention_mask [batch, past + new] = [2, 5], got [2, 4]");
  EXPECT_KVCACHE_ERROR(mask_to_bytes(Tensor::zeros({2, 4}, DType::kFloat32), 2, 4, "test"),
                       "expected an int64, int32 or uint8 attention_mask, got float32");
  EXPECT_KVCACHE_ERROR(check_cache_position(std::vector<std::int64_t>{-1}, 1, 4, 0, "test"),
                       "got -1 at index 0");
  EXPECT_KVCACHE_ERROR(make_cache_position(-1, 2), "expected start >= 0");
}

}  // namespace
}  // namespace kvcache
