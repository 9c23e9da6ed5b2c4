// StaticCache on the CUDA backend against the same cache on the CPU: the same writes (appends,
// rollbacks), batch operations, crop and clone must leave identical keys and values, in storage
// whose address never changes. Skips where no GPU is present (CI).
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "cuda_test_util.hpp"
#include "kvcache/backend/cuda.hpp"
#include "kvcache/cache/static_cache.hpp"

namespace kvcache {
namespace {

class StaticCacheCuda : public testing::CudaTest {};
using testing::random_tensor;
using testing::to_doubles;

void expect_same(const StaticCache<cuda::Backend>& gpu, const StaticCache<>& cpu) {
  ASSERT_EQ(gpu.num_layers(), cpu.num_layers());
  const auto g = gpu.to_legacy_cache();
  const auto c = cpu.to_legacy_cache();
  for (std::size_t i = 0; i < c.size(); ++i) {
    ASSERT_EQ(gpu.get_seq_length(static_cast<int>(i)), cpu.get_seq_length(static_cast<int>(i)));
    if (cpu.get_seq_length(static_cast<int>(i)) == 0) continue;
    EXPECT_EQ(g[i].first.device(), Device::kCuda);
    EXPECT_EQ(to_doubles(cuda::to_host(g[i].first)), to_doubles(c[i].first))
        << "keys of layer " << i;
    EXPECT_EQ(to_doubles(cuda::to_host(g[i].second)), to_doubles(c[i].second))
        << "values of layer " << i;
  }
}

TEST_F(StaticCacheCuda, MatchesCpu) {
  std::mt19937 rng(61);
  for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    const StaticCacheOptions options{.max_batch_size = 4,
                                     .max_cache_len = 40,
                                     .num_layers = 3,
                                     .num_kv_heads = 2,
                                     .head_dim = 16,
                                     .dtype = dtype};
    StaticCache<cuda::Backend> gpu(options);
    StaticCache<> cpu(options);
    const void* storage = gpu.storage(0).first.data();
    // (start, q_len): a prefill, decode steps, a rollback, more decode.
    const std::vector<std::pair<std::int64_t, std::int64_t>> steps = {
        {0, 7}, {7, 1}, {8, 1}, {9, 3}, {10, 2}, {12, 1}, {13, 20}};
    for (const auto& [start, q] : steps) {
      const std::vector<std::int64_t> positions = make_cache_position(start, q);
      for (int layer = 0; layer < 3; ++layer) {
        const Tensor k = random_tensor({3, 2, q, 16}, dtype, rng);
        const Tensor v = random_tensor({3, 2, q, 16}, dtype, rng);
        auto [gk, gv] = gpu.update(cuda::to_device(k), cuda::to_device(v), layer,
                                   {.cache_position = positions});
        auto [ck, cv] = cpu.update(k, v, layer, {.cache_position = positions});
        ASSERT_EQ(gk.shape_string(), ck.shape_string());
        EXPECT_EQ(to_doubles(cuda::to_host(gk)), to_doubles(ck));
        EXPECT_EQ(to_doubles(cuda::to_host(gv)), to_doubles(cv));
      }
    }
    expect_same(gpu, cpu);
    const std::vector<std::int64_t> beams = {2, 0, 0};
    gpu.reorder_cache(beams);
    cpu.reorder_cache(beams);
    expect_same(gpu, cpu);
    gpu.batch_select_indices(std::vector<std::int64_t>{1, 2});
    cpu.batch_select_indices(std::vector<std::int64_t>{1, 2});
    gpu.batch_repeat_interleave(2);
    cpu.batch_repeat_interleave(2);
    expect_same(gpu, cpu);
    gpu.crop(-5);
    cpu.crop(-5);
    expect_same(gpu, cpu);
    EXPECT_EQ(gpu.storage(0).first.data(), storage);
    StaticCache<cuda::Backend> copy = gpu.clone();
    expect_same(copy, cpu);
    EXPECT_NE(copy.storage(0).first.data(), storage);
    gpu.reset();
    expect_same(copy, cpu);  // the copy keeps its tokens
    EXPECT_EQ(gpu.get_seq_length(), 0);
  }
}

TEST_F(StaticCacheCuda, ErrorsOnTheGpuLeaveItUnchanged) {
  std::mt19937 rng(62);
  StaticCache<cuda::Backend> gpu(2, 8);
  const Tensor k = cuda::to_device(random_tensor({2, 2, 6, 4}, DType::kFloat32, rng));
  gpu.update(k, k, 0);
  const Tensor one = cuda::to_device(random_tensor({2, 2, 3, 4}, DType::kFloat32, rng));
  EXPECT_KVCACHE_ERROR(gpu.update(one, one, 0), "expected room for 3 new token(s) from slot 6");
  const Tensor host = random_tensor({2, 2, 1, 4}, DType::kFloat32, rng);
  EXPECT_KVCACHE_ERROR(gpu.update(host, host, 0), "expected states on cuda");
  EXPECT_EQ(gpu.get_seq_length(), 6);
}

}  // namespace
}  // namespace kvcache
