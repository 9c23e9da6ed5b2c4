// A model or a cache that cannot fit in memory fails with a clear kvcache::Error before it
// allocates (issue #10): available_memory(), detail::require_memory(), LoadOptions::max_memory,
// StaticCache's up-front storage, make_generation_cache's reservation and a cache's large
// allocations. The sizes are taken from what this machine has free when the test runs, so every
// refused request is several times that and nothing large is ever allocated.
#include "kvcache/memory.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>

#include "kvcache/backend/cuda.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/cache/static_cache.hpp"
#include "kvcache/generation/generate.hpp"
#include "kvcache/model/llama.hpp"
#include "max_memory_check.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

const std::string kGqa = std::string(KVCACHE_TEST_DATA_DIR) + "/llama_gqa";

// MemAvailable + SwapFree read here with iostreams, independently of the library's parser.
std::uint64_t meminfo_available() {
  std::ifstream in("/proc/meminfo");
  std::string line;
  std::uint64_t total = 0;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string key;
    std::uint64_t kb = 0;
    fields >> key >> kb;
    if (key == "MemAvailable:" || key == "SwapFree:") total += kb * 1024;
  }
  return total;
}

std::uint64_t host_free() {
  const std::uint64_t free = available_memory(Device::kCpu);
  if (free == 0) ADD_FAILURE() << "available_memory(kCpu) is 0";
  return free;
}

TEST(Memory, AvailableHostMemoryAgreesWithProcMeminfo) {
  // Read on either side of ours, since other processes (parallel tests) move the figure.
  const std::uint64_t before = meminfo_available();
  const std::uint64_t ours = available_memory(Device::kCpu);
  const std::uint64_t after = meminfo_available();
  ASSERT_GT(before, 0u) << "no /proc/meminfo here";
  ASSERT_GT(ours, 0u);
  const std::uint64_t low = std::min(before, after), high = std::max(before, after);
  // A container's cgroup limit can only lower ours.
  EXPECT_LE(ours, high + high / 10) << before << " / " << after;
  if (!std::ifstream("/sys/fs/cgroup/memory.max")) {
    EXPECT_GE(ours, low - low / 10) << before << " / " << after;
  }
  EXPECT_LE(ours, detail::physical_memory_bytes() + high);
}

TEST(Memory, AvailableGpuMemoryIsZeroWithoutAGpu) {
  if (cuda::device_count() > 0) GTEST_SKIP() << "a GPU is here (kvcache_cuda_tests checks it)";
  EXPECT_EQ(available_memory(Device::kCuda), 0u);
}

TEST(Memory, RequireMemoryNamesTheBytesTheLimitAndWhatIsAvailable) {
  EXPECT_KVCACHE_ERROR(detail::require_memory(Device::kCpu, 1000, "here", "the thing", 999),
                       "here: out of memory: the thing needs 1000 bytes");
  EXPECT_KVCACHE_ERROR(detail::require_memory(Device::kCpu, 1000, "here", "the thing", 999),
                       "more than the limit of 999 bytes");
  EXPECT_NO_THROW(detail::require_memory(Device::kCpu, 1000, "here", "the thing", 1000));
  EXPECT_NO_THROW(detail::require_memory(Device::kCpu, 1000, "here", "the thing"));
  const std::uint64_t too_much = 4 * host_free();
  EXPECT_KVCACHE_ERROR(detail::require_memory(Device::kCpu, too_much, "here", "the thing"),
                       "needs " + std::to_string(too_much) + " bytes");
  EXPECT_KVCACHE_ERROR(detail::require_memory(Device::kCpu, too_much, "here", "the thing"),
                       "are available there (MemAvailable + SwapFree)");
  EXPECT_NO_THROW(detail::require_memory(Device::kCpu, host_free() / 4, "here", "the thing"));
}

// Eight layers of 1/8 of the free memory each, keys and values: every single allocation would be
// granted by an overcommitting kernel, the whole could not be held.
TEST(Memory, StaticCacheLargerThanMemoryFailsBeforeItsFirstLayer) {
  constexpr std::int64_t kTokenBytes = 1024 * 4;  // one head of 1024 float32
  const auto len = static_cast<std::int64_t>(host_free() / 8 / kTokenBytes);
  const StaticCacheOptions o{.max_batch_size = 1,
                             .max_cache_len = len,
                             .num_layers = 8,
                             .num_kv_heads = 1,
                             .head_dim = 1024,
                             .dtype = DType::kFloat32};
  EXPECT_KVCACHE_ERROR(StaticCache<> cache(o),
                       "StaticCache: out of memory: the storage of every "
                       "layer needs " +
                           std::to_string(8 * 2 * len * kTokenBytes));
}

// A layer's growth past what is free is refused, the cache as it was.
TEST(Memory, DynamicCacheGrowthPastMemoryIsAnErrorAndChangesNothing) {
  const auto cap = static_cast<std::int64_t>(2 * host_free() / (4 * 64));
  DynamicCache<> cache;
  Tensor k = Tensor::zeros({1, 1, 3, 64}, DType::kFloat32);
  cache.update(k, k, 0);
  DynamicCache<> big(DynamicCacheOptions{.initial_capacity = cap});
  EXPECT_KVCACHE_ERROR(big.update(k, k, 0), "out of memory: cache storage needs");
  EXPECT_EQ(big.get_seq_length(0), 0);
  EXPECT_EQ(big.num_layers(), 0);
  cache.reserve(3);  // a small reservation still works
  EXPECT_KVCACHE_ERROR(cache.reserve(cap), "out of memory");
  EXPECT_EQ(cache.get_seq_length(0), 3);
}

// The reservation generate() makes for a long batch: every layer's max_cache_len slots, refused
// before the prefill when it cannot fit (the cache would otherwise fail, or be killed, mid-way).
TEST(Memory, GenerationCacheReservationLargerThanMemoryIsRefusedUpFront) {
  const LlamaModel model = LlamaModel::from_pretrained(kGqa);
  const ModelConfig& c = model.config();
  const std::int64_t per_token_row = 2 * c.num_key_value_heads * c.head_dim * 4;  // float32
  constexpr std::int64_t kLen = 1024;
  const auto batch =
      static_cast<std::int64_t>(2 * host_free() / (per_token_row * kLen * c.num_hidden_layers));
  EXPECT_KVCACHE_ERROR(make_generation_cache<cpu::Backend>(model, "dynamic", batch, kLen, {}),
                       "make_generation_cache: out of memory: the dynamic cache's reservation of "
                       "1024 tokens a layer needs");
  EXPECT_KVCACHE_ERROR(make_generation_cache<cpu::Backend>(model, "static", batch, kLen, {}),
                       "StaticCache: out of memory");
  EXPECT_NE(make_generation_cache<cpu::Backend>(model, "dynamic", 2, kLen, {}), nullptr);
}

// What the check counts is what the holding takes: with every weight converted (bfloat16 from a
// float32 checkpoint, or Q8_0 blocks), a limit of exactly weight_bytes() loads, one byte less is
// refused with the bytes named.
TEST(Memory, MaxMemoryBoundsTheHoldingOfTheWeightsExactly) {
  testing::expect_max_memory_is_exact(kGqa, {.dtype = DType::kBFloat16});
  testing::expect_max_memory_is_exact(kGqa, {.quantize = cpu::QuantFormat::kQ8_0});
}

}  // namespace
}  // namespace kvcache
