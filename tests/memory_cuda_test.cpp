// The memory checks on the GPU (issue #10): available_memory(kCuda) follows what the device and
// kvcache's pool have free, and a model, a StaticCache or a DynamicCache's growth that cannot fit
// in the device's memory fails with a kvcache::Error before it allocates.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "cuda_test_util.hpp"
#include "kvcache/backend/cuda.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/cache/static_cache.hpp"
#include "kvcache/memory.hpp"
#include "kvcache/model/llama.hpp"
#include "max_memory_check.hpp"

namespace kvcache {
namespace {

using MemoryCuda = testing::CudaTest;

const std::string kGqa = std::string(KVCACHE_TEST_DATA_DIR) + "/llama_gqa";
constexpr std::int64_t kGiB = std::int64_t{1} << 30;

// A gibibyte taken from the device lowers the figure by about that; freed, it comes back (the
// pool keeps the memory reserved, and the figure counts what it holds unused).
TEST_F(MemoryCuda, AvailableMemoryFollowsAllocationsThroughThePool) {
  cuda::synchronize();
  const std::uint64_t before = available_memory(Device::kCuda);
  ASSERT_GT(before, static_cast<std::uint64_t>(2 * kGiB));
  {
    const Tensor block = cuda::empty_persistent({kGiB}, DType::kUInt8);
    cuda::synchronize();
    const std::uint64_t during = available_memory(Device::kCuda);
    EXPECT_LT(during, before - kGiB + kGiB / 16) << before << " -> " << during;
    EXPECT_GT(during + kGiB, before - kGiB / 16) << before << " -> " << during;
  }
  cuda::synchronize();
  const std::uint64_t after = available_memory(Device::kCuda);
  EXPECT_GT(after, before - kGiB / 16) << before << " -> " << after;
}

TEST_F(MemoryCuda, StaticCacheLargerThanTheDeviceFailsBeforeItsFirstLayer) {
  constexpr std::int64_t kTokenBytes = 1024 * 2;  // one head of 1024 bfloat16
  const auto len = static_cast<std::int64_t>(available_memory(Device::kCuda) / 8 / kTokenBytes);
  const StaticCacheOptions o{.max_batch_size = 1,
                             .max_cache_len = len,
                             .num_layers = 8,
                             .num_kv_heads = 1,
                             .head_dim = 1024,
                             .dtype = DType::kBFloat16};
  const std::uint64_t before = available_memory(Device::kCuda);
  EXPECT_KVCACHE_ERROR(StaticCache<cuda::Backend> cache(o),
                       "StaticCache: out of memory: the storage of every layer needs " +
                           std::to_string(8 * 2 * len * kTokenBytes) + " bytes");
  EXPECT_KVCACHE_ERROR(StaticCache<cuda::Backend> cache(o), "on cuda");
  // Nothing was taken from the device.
  EXPECT_GT(available_memory(Device::kCuda), before - kGiB / 16);
}

TEST_F(MemoryCuda, DynamicCacheGrowthPastTheDeviceIsAnErrorAndChangesNothing) {
  const auto cap = static_cast<std::int64_t>(2 * available_memory(Device::kCuda) / (2 * 64));
  DynamicCache<cuda::Backend> cache(DynamicCacheOptions{.initial_capacity = cap});
  const Tensor k = cuda::to_device(Tensor::zeros({1, 1, 3, 64}, DType::kBFloat16));
  EXPECT_KVCACHE_ERROR(cache.update(k, k, 0), "out of memory: cache storage needs");
  EXPECT_EQ(cache.num_layers(), 0);
}

// On the GPU every weight is converted, so the holding is weight_bytes() whatever the dtype.
TEST_F(MemoryCuda, MaxMemoryBoundsTheHoldingOfTheWeightsExactly) {
  testing::expect_max_memory_is_exact(kGqa, {.dtype = DType::kBFloat16, .device = Device::kCuda});
  testing::expect_max_memory_is_exact(kGqa, {.dtype = DType::kFloat32, .device = Device::kCuda});
}

}  // namespace
}  // namespace kvcache
