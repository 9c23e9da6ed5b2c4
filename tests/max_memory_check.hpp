// The exactness check of LoadOptions::max_memory, shared by the CPU and GPU memory tests: loaded
// with `options` (every weight converted, so the holding is all of weight_bytes()), the checkpoint
// loads under a limit of exactly weight_bytes() and is refused, with the bytes and the limit
// named, one byte below it.
#pragma once

#include <gtest/gtest.h>

#include <cstddef>
#include <string>

#include "kvcache/model/llama.hpp"
#include "test_util.hpp"

namespace kvcache::testing {

inline void expect_max_memory_is_exact(const std::string& checkpoint, LoadOptions options) {
  const std::size_t held = LlamaModel::from_pretrained(checkpoint, options).weight_bytes();
  options.max_memory = held;
  EXPECT_EQ(LlamaModel::from_pretrained(checkpoint, options).weight_bytes(), held);
  options.max_memory = held - 1;
  EXPECT_KVCACHE_ERROR(
      LlamaModel::from_pretrained(checkpoint, options),
      "out of memory: holding the weights needs " + std::to_string(held) + " bytes");
  EXPECT_KVCACHE_ERROR(LlamaModel::from_pretrained(checkpoint, options),
                       "more than the limit of " + std::to_string(held - 1) + " bytes");
}

}  // namespace kvcache::testing
