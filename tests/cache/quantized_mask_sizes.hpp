// QuantizedCache::get_mask_sizes against what the cache holds, for either backend: shared by
// cache/quantized_cache_test.cpp (the CPU cache) and cache/quantized_cache_cuda_test.cpp (the GPU
// cache), so both are held to one expectation.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "kvcache/attention/mask.hpp"
#include "kvcache/backend/cuda.hpp"
#include "kvcache/cache/quantized_cache.hpp"
#include "test_util.hpp"

namespace kvcache::testing {

/// Before every step of several step patterns (one-token decode steps, a prefill past the
/// residual, steps that flush one block or several), for keys per channel and per token:
/// get_mask_sizes is a full-attention layer's (seen + q_len, 0), as a DynamicCache's, with seen
/// counted here; then the step hands over exactly kv_length keys (layer 0 through
/// update_for_attention, blocks and full-precision tokens together; layer 1 through update) and
/// the cache holds kv_length tokens. The patterns must flush blocks, or the check proves little.
template <CacheBackend B>
void expect_quantized_mask_sizes_follow_the_tokens() {
  const auto on_backend = [](const Tensor& t) {
    if constexpr (std::is_same_v<B, cuda::Backend>) {
      return cuda::to_device(t);
    } else {
      return t;
    }
  };
  const std::vector<std::vector<std::int64_t>> patterns = {
      std::vector<std::int64_t>(20, 1), {9, 1, 1, 3, 1, 40, 1, 2, 17, 1}, {3, 13, 1, 26}};
  for (const QuantAxis axis : {QuantAxis::kPerChannel, QuantAxis::kPerToken})
    for (std::size_t p = 0; p < patterns.size(); ++p) {
      SCOPED_TRACE(std::string("keys per ") +
                   (axis == QuantAxis::kPerChannel ? "channel" : "token") + ", pattern " +
                   std::to_string(p));
      QuantizedCache<B> cache(
          {.nbits = 4, .group_size = 8, .key_axis = axis, .residual_length = 5});
      std::mt19937 rng(static_cast<unsigned>(p));
      std::int64_t seen = 0;
      int flushes = 0;
      for (const std::int64_t q : patterns[p]) {
        const std::vector<std::int64_t> pos = make_cache_position(seen, q);
        for (int layer = 0; layer < 2; ++layer) {
          const MaskSizes sizes = cache.get_mask_sizes(pos, layer);
          EXPECT_EQ(sizes.kv_length, seen + q) << "layer " << layer << ", " << seen << " seen";
          EXPECT_EQ(sizes.kv_offset, 0) << "layer " << layer << ", " << seen << " seen";
          const Tensor k = on_backend(random_tensor({2, 2, q, 16}, DType::kFloat32, rng));
          const Tensor v = on_backend(random_tensor({2, 2, q, 16}, DType::kFloat32, rng));
          const std::int64_t quantized_before = cache.quantized_length(layer);
          std::int64_t handed = 0;
          if (layer == 0) {
            const AttentionKV kv = cache.update_for_attention(k, v, layer, {.cache_position = pos});
            handed = (kv.quantized ? kv.quantized->tokens : 0) + kv.keys.size(2);
          } else {
            handed = cache.update(k, v, layer, {.cache_position = pos}).first.size(2);
          }
          EXPECT_EQ(handed, sizes.kv_length) << "layer " << layer << ", " << seen << " seen";
          EXPECT_EQ(cache.get_seq_length(layer), sizes.kv_length) << "layer " << layer;
          if (cache.quantized_length(layer) > quantized_before) ++flushes;
        }
        seen += q;
      }
      EXPECT_GT(flushes, 0) << "the steps should cross the residual flush";
      // A layer not seen yet: the new tokens only.
      EXPECT_EQ(cache.get_mask_sizes(make_cache_position(seen, 3), 2).kv_length, 3);
    }
}

}  // namespace kvcache::testing
