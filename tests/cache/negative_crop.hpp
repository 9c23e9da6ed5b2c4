// The negative-crop rule, shared by the SinkCache and QuantizedCache tests: crop(-n) drops n from
// get_seq_length() (layer 0's length) and crops every layer to that one target, as DynamicCache
// and transformers do (those caches used to drop n from each layer's own length).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <random>

#include "kvcache/tensor.hpp"
#include "test_util.hpp"

namespace kvcache::testing {

/// On an empty CPU cache of [batch, heads, *, dim] float32 states: layer 0 gets 6 tokens and
/// layer 1 only 4 (mid-step), then crop(-1) and crop(-2) take one target for both, and dropping
/// more than there is remains an error.
template <class Cache>
void expect_negative_crop_takes_one_target(Cache& cache, std::int64_t batch, std::int64_t heads,
                                           std::int64_t dim) {
  std::mt19937 rng(3);
  auto feed = [&](int layer, std::int64_t q) {
    cache.update(random_tensor({batch, heads, q, dim}, DType::kFloat32, rng),
                 random_tensor({batch, heads, q, dim}, DType::kFloat32, rng), layer);
  };
  feed(0, 6);
  feed(1, 4);  // mid-step: layer 1 has not had this step's 2 tokens yet
  cache.crop(-1);
  EXPECT_EQ(cache.get_seq_length(0), 5);
  EXPECT_EQ(cache.get_seq_length(1), 4);
  cache.crop(-2);
  EXPECT_EQ(cache.get_seq_length(0), 3);
  EXPECT_EQ(cache.get_seq_length(1), 3);
  EXPECT_KVCACHE_ERROR(cache.crop(-4), "expected to drop at most 3 tokens");
}

}  // namespace kvcache::testing
