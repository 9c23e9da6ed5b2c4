// DynamicCache on the CUDA backend against the same cache on the CPU: the same steps and batch
// operations must leave identical keys and values. Skips where no GPU is present (CI).
#include <gtest/gtest.h>

#include <array>
#include <random>

#include "kvcache/attention/attention.hpp"
#include "kvcache/attention/mask.hpp"
#include "kvcache/backend/cuda.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using testing::random_tensor;
using testing::to_doubles;

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

void expect_same(const DynamicCache<cuda::Backend>& gpu, const DynamicCache<>& cpu) {
  ASSERT_EQ(gpu.num_layers(), cpu.num_layers());
  const auto g = gpu.to_legacy_cache();
  const auto c = cpu.to_legacy_cache();
  for (std::size_t i = 0; i < c.size(); ++i) {
    EXPECT_EQ(g[i].first.device(), Device::kCuda);
    EXPECT_EQ(to_doubles(cuda::to_host(g[i].first)), to_doubles(c[i].first))
        << "keys of layer " << i;
    EXPECT_EQ(to_doubles(cuda::to_host(g[i].second)), to_doubles(c[i].second))
        << "values of layer " << i;
  }
}

TEST_F(CudaTest, StridedCopyMatchesCpu) {
  std::mt19937 rng(51);
  Tensor host = random_tensor({2, 5, 3, 8}, DType::kBFloat16, rng);
  Tensor device = cuda::to_device(host);
  Tensor out = cuda::empty({2, 3, 5, 8}, DType::kBFloat16);
  cuda::copy(out, device.transpose(1, 2));
  EXPECT_EQ(to_doubles(cuda::to_host(out)), to_doubles(host.transpose(1, 2)));
  EXPECT_KVCACHE_ERROR(cuda::copy(out, cuda::empty({2, 3, 5, 8}, DType::kFloat32)),
                       "expected one dtype");
}

TEST_F(CudaTest, DynamicCacheMatchesCpu) {
  std::mt19937 rng(52);
  for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    DynamicCache<cuda::Backend> gpu;
    DynamicCache<> cpu;
    for (std::int64_t q : {7, 1, 1, 3, 1, 30, 1}) {
      for (int layer = 0; layer < 3; ++layer) {
        Tensor k = random_tensor({3, 2, q, 16}, dtype, rng);
        Tensor v = random_tensor({3, 2, q, 16}, dtype, rng);
        auto [gk, gv] = gpu.update(cuda::to_device(k), cuda::to_device(v), layer);
        auto [ck, cv] = cpu.update(k, v, layer);
        ASSERT_EQ(gk.size(2), ck.size(2));
      }
    }
    expect_same(gpu, cpu);
    const std::vector<std::int64_t> beams = {2, 0, 0};
    gpu.reorder_cache(beams);
    cpu.reorder_cache(beams);
    expect_same(gpu, cpu);
    gpu.batch_repeat_interleave(2);
    cpu.batch_repeat_interleave(2);
    gpu.crop(-4);
    cpu.crop(-4);
    expect_same(gpu, cpu);
    const std::vector<std::int64_t> keep = {5, 1};
    gpu.batch_select_indices(keep);
    cpu.batch_select_indices(keep);
    expect_same(gpu, cpu);
  }
}

// copy2 is two copies in one launch: each pair lands as cuda::copy would put it.
TEST_F(CudaTest, Copy2EqualsTwoCopies) {
  std::mt19937 rng(54);
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    const Tensor a = random_tensor({2, 3, 5, 8}, dtype, rng),
                 b = random_tensor({2, 3, 5, 8}, dtype, rng);
    Tensor da = cuda::to_device(a), db = cuda::to_device(b);
    Tensor out_a = cuda::to_device(random_tensor({2, 5, 3, 8}, dtype, rng));
    Tensor out_b = cuda::to_device(random_tensor({2, 5, 3, 8}, dtype, rng));
    cuda::copy2(out_a.transpose(1, 2), da, out_b.transpose(1, 2), db);
    EXPECT_EQ(to_doubles(cuda::to_host(out_a.transpose(1, 2))), to_doubles(a));
    EXPECT_EQ(to_doubles(cuda::to_host(out_b.transpose(1, 2))), to_doubles(b));
  }
}

// Scratch: one block carved front to back inside a scope, restarted by the next scope, grown to
// what the last scope asked; cache storage (Backend::empty) never comes from it.
TEST_F(CudaTest, ScratchScopeReusesOneBlockAndNeverHoldsCacheStorage) {
  const std::uintptr_t first = [] {
    cuda::ScratchScope scope;
    return reinterpret_cast<std::uintptr_t>(cuda::empty({1 << 20}, DType::kUInt8).data());
  }();
  std::uintptr_t a = 0, b = 0, c = 0;
  {
    cuda::ScratchScope scope;
    a = reinterpret_cast<std::uintptr_t>(cuda::empty({1 << 20}, DType::kUInt8).data());
    b = reinterpret_cast<std::uintptr_t>(cuda::empty({100}, DType::kFloat32).data());
    c = reinterpret_cast<std::uintptr_t>(
        cuda::Backend::empty(std::array<std::int64_t, 1>{64}, DType::kFloat32).data());
  }
  EXPECT_GE(b, a + (1 << 20)) << "the second scratch tensor overlaps the first";
  EXPECT_TRUE(c < a || c >= b + 400) << "cache storage came from scratch";
  {
    cuda::ScratchScope scope;  // the block has grown to what the last scope asked
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(cuda::empty({1 << 20}, DType::kUInt8).data()), a);
  }
  (void)first;
  // Outside a scope, each tensor is its own allocation.
  const Tensor x = cuda::empty({16}, DType::kFloat32), y = cuda::empty({16}, DType::kFloat32);
  EXPECT_NE(x.data(), y.data());
}

// The legacy format on the GPU: from_legacy_cache copies device tensors into device storage,
// to_legacy_cache hands back views of it.
TEST_F(CudaTest, LegacyRoundTripOnTheDevice) {
  std::mt19937 rng(55);
  LegacyCache legacy;
  for (int l = 0; l < 3; ++l)
    legacy.emplace_back(cuda::to_device(random_tensor({2, 2, 5, 16}, DType::kBFloat16, rng)),
                        cuda::to_device(random_tensor({2, 2, 5, 16}, DType::kBFloat16, rng)));
  const auto cache = DynamicCache<cuda::Backend>::from_legacy_cache(legacy);
  const LegacyCache back = cache.to_legacy_cache();
  ASSERT_EQ(back.size(), legacy.size());
  for (std::size_t l = 0; l < legacy.size(); ++l) {
    EXPECT_NE(back[l].first.data(), legacy[l].first.data());  // copied into cache storage
    EXPECT_EQ(to_doubles(cuda::to_host(back[l].first)), to_doubles(cuda::to_host(legacy[l].first)));
    EXPECT_EQ(to_doubles(cuda::to_host(back[l].second)),
              to_doubles(cuda::to_host(legacy[l].second)));
  }
}

// Sliding-window cache layers on the GPU past their window: the attention module reads the mask
// from the layer's first kept slot (kv_offset), for a host mask and for a device one, and matches
// the CPU over full layers; the GPU layer keeps the CPU sliding layer's keys.
TEST_F(CudaTest, SlidingLayersPastTheWindowMatchTheCpu) {
  std::mt19937 rng(41);
  const Attention attention(
      0, {.num_heads = 4, .num_kv_heads = 2, .head_dim = 16, .sliding_window = 5});
  for (const bool device_mask : {false, true}) {
    DynamicCache<cuda::Backend> gpu(DynamicCacheOptions{.sliding_windows = {5}});
    DynamicCache<> cpu_sliding(DynamicCacheOptions{.sliding_windows = {5}});
    DynamicCache<> cpu_full;
    Tensor mask = ones_mask(2, 9);  // the second row pads 4 slots on the left
    for (int j = 0; j < 4; ++j) mask.data_as<std::int64_t>()[9 + j] = 0;
    std::int64_t past = 0;
    for (int s = 0; s < 14; ++s) {
      const std::int64_t q_len = s == 0 ? 9 : 1;
      const Tensor q = random_tensor({2, 4, q_len, 16}, DType::kFloat32, rng);
      const Tensor k = random_tensor({2, 2, q_len, 16}, DType::kFloat32, rng);
      const Tensor v = random_tensor({2, 2, q_len, 16}, DType::kFloat32, rng);
      const std::vector<std::int64_t> pos = make_cache_position(past, q_len);
      Tensor gpu_mask = mask;
      if (device_mask) {
        std::vector<std::uint8_t> bytes = mask_to_bytes(mask, 2, past + q_len, "test");
        gpu_mask = cuda::upload(bytes.data(), bytes.size()).view({2, past + q_len});
      }
      const Tensor got = cuda::to_host(attention.forward(cuda::to_device(q), cuda::to_device(k),
                                                         cuda::to_device(v), gpu, gpu_mask, pos));
      const Tensor want = attention.forward(q, k, v, cpu_full, mask, pos);
      attention.forward(q, k, v, cpu_sliding, mask, pos);
      EXPECT_LT(testing::compare(to_doubles(got), to_doubles(want)).max_abs, 1e-5)
          << "step " << s << (device_mask ? ", device mask" : ", host mask");
      past += q_len;
      mask = extend_attention_mask(mask);
    }
    EXPECT_GT(gpu.get_mask_sizes(std::vector<std::int64_t>{past}, 0).kv_offset, 0);
    EXPECT_EQ(gpu.nbytes(), cpu_sliding.nbytes());
    expect_same(gpu, cpu_sliding);
  }
}

TEST_F(CudaTest, HostStatesAreRejected) {
  std::mt19937 rng(53);
  DynamicCache<cuda::Backend> gpu;
  Tensor host = random_tensor({1, 1, 1, 8}, DType::kFloat32, rng);
  EXPECT_KVCACHE_ERROR(gpu.update(host, host, 0),
                       "expected states on cuda (the cache's backend), got cpu");
  EXPECT_EQ(gpu.num_layers(), 0);
}

}  // namespace
}  // namespace kvcache
