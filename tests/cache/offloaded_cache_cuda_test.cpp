// OffloadedCache on the GPU against DynamicCache<cuda::Backend>: every update returns the same
// keys and values, bit for bit, through prefill and decode steps, crop, beam reorder, batch
// operations and clone; layers after the first step come from the prefetch, and the device holds
// two layers' slots. Skips where no GPU is present (CI).
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "kvcache/backend/cuda.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/cache/offloaded_cache.hpp"
#include "kvcache/generation/generate.hpp"
#include "kvcache/model/llama.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using testing::random_tensor;
using testing::to_doubles;

class OffloadedCacheCuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

constexpr int kLayers = 3;

// One step of q_len tokens through both caches, every layer; the returned views must be equal.
void step_both(OffloadedCache& off, DynamicCache<cuda::Backend>& dyn, std::int64_t batch,
               std::int64_t q_len, DType dtype, std::mt19937& rng, const std::string& what) {
  for (int l = 0; l < kLayers; ++l) {
    const Tensor k = cuda::to_device(random_tensor({batch, 3, q_len, 16}, dtype, rng));
    const Tensor v = cuda::to_device(random_tensor({batch, 3, q_len, 16}, dtype, rng));
    const auto [ok, ov] = off.update(k, v, l);
    const auto [dk, dv] = dyn.update(k, v, l);
    ASSERT_EQ(ok.shape_string(), dk.shape_string()) << what << ", layer " << l;
    EXPECT_EQ(to_doubles(cuda::to_host(ok)), to_doubles(cuda::to_host(dk)))
        << what << ", keys of layer " << l;
    EXPECT_EQ(to_doubles(cuda::to_host(ov)), to_doubles(cuda::to_host(dv)))
        << what << ", values of layer " << l;
    EXPECT_EQ(off.get_seq_length(l), dyn.get_seq_length(l));
  }
}

TEST_F(OffloadedCacheCuda, EveryStepMatchesTheResidentCacheAndComesFromThePrefetch) {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    std::mt19937 rng(61);
    OffloadedCache off;
    DynamicCache<cuda::Backend> dyn;
    const std::vector<std::int64_t> steps = {7, 1, 1, 3, 1, 1, 1, 5, 1, 1, 40, 1};
    for (std::size_t s = 0; s < steps.size(); ++s)
      step_both(off, dyn, 2, steps[s], dtype, rng, "step " + std::to_string(s));
    // The prefill copies nothing in; every later update found its layer prefetched.
    EXPECT_EQ(off.on_demand_updates(), kLayers);
    EXPECT_EQ(off.prefetched_updates(), static_cast<std::int64_t>(steps.size() - 1) * kLayers);
    EXPECT_EQ(off.nbytes(), dyn.nbytes());
    EXPECT_LT(off.capacity_bytes(), dyn.capacity_bytes());  // two slots on the device, not three
    const std::vector<std::int64_t> pos = {62};
    EXPECT_EQ(off.get_mask_sizes(pos, 1).kv_length, dyn.get_mask_sizes(pos, 1).kv_length);
    EXPECT_EQ(off.get_max_cache_shape(), -1);
  }
}

TEST_F(OffloadedCacheCuda, CropReorderBatchOperationsAndCloneMatchTheResidentCache) {
  std::mt19937 rng(62);
  OffloadedCache off;
  DynamicCache<cuda::Backend> dyn;
  step_both(off, dyn, 2, 6, DType::kFloat32, rng, "prefill");
  step_both(off, dyn, 2, 1, DType::kFloat32, rng, "decode");
  off.crop(-2);
  dyn.crop(-2);
  step_both(off, dyn, 2, 1, DType::kFloat32, rng, "after crop");
  off.reorder_cache({1, 1});
  dyn.reorder_cache({1, 1});
  step_both(off, dyn, 2, 1, DType::kFloat32, rng, "after reorder");
  off.batch_repeat_interleave(2);
  dyn.batch_repeat_interleave(2);
  step_both(off, dyn, 4, 2, DType::kFloat32, rng, "after repeat");
  off.batch_select_indices({3, 0, 2});
  dyn.batch_select_indices({3, 0, 2});
  step_both(off, dyn, 3, 1, DType::kFloat32, rng, "after select");

  // A clone evolves on its own: both continue with different states, each like its own twin.
  OffloadedCache off_copy = off.clone();
  DynamicCache<cuda::Backend> dyn_copy = dyn.clone();
  step_both(off_copy, dyn_copy, 3, 1, DType::kFloat32, rng, "clone");
  step_both(off, dyn, 3, 1, DType::kFloat32, rng, "original after the clone's step");
  step_both(off_copy, dyn_copy, 3, 3, DType::kFloat32, rng, "clone again");

  off.reset();
  dyn.reset();
  EXPECT_EQ(off.get_seq_length(), 0);
  step_both(off, dyn, 3, 4, DType::kFloat32, rng, "after reset");
}

TEST_F(OffloadedCacheCuda, BadCallsAreErrorsAndChangeNothing) {
  std::mt19937 rng(63);
  OffloadedCache off;
  DynamicCache<cuda::Backend> dyn;
  step_both(off, dyn, 2, 5, DType::kFloat32, rng, "prefill");
  const Tensor k = cuda::to_device(random_tensor({2, 3, 1, 16}, DType::kFloat32, rng));
  EXPECT_KVCACHE_ERROR(off.update(k, k, kLayers + 1), "expected layer_idx in [0, 3]");
  const Tensor other_heads = cuda::to_device(random_tensor({2, 4, 1, 16}, DType::kFloat32, rng));
  EXPECT_KVCACHE_ERROR(off.update(other_heads, other_heads, 0), "expected new states [2, 3");
  EXPECT_KVCACHE_ERROR(off.update(cuda::to_host(k), cuda::to_host(k), 0), "expected states on");
  EXPECT_KVCACHE_ERROR(off.crop(-6), "expected to drop at most 5 tokens");
  EXPECT_KVCACHE_ERROR(off.reorder_cache({0}), "expected 2 beam indices");
  EXPECT_KVCACHE_ERROR(off.reorder_cache({0, 2}), "expected rows in [0, 2)");
  EXPECT_KVCACHE_ERROR(off.batch_repeat_interleave(0), "expected repeats >= 1");
  EXPECT_EQ(off.get_seq_length(0), 5);
  step_both(off, dyn, 2, 1, DType::kFloat32, rng, "after the errors");
  EXPECT_KVCACHE_ERROR(OffloadedCache({.initial_capacity = -1}), "initial_capacity >= 0");
}

// generate() over an offloaded cache: the tokens of the resident one, on a transformers fixture.
TEST_F(OffloadedCacheCuda, GenerateGivesTheResidentCachesTokens) {
  const std::string dir = std::string(KVCACHE_TEST_DATA_DIR) + "/llama_gqa";
  const LlamaModel model =
      LlamaModel::from_pretrained(dir, {.dtype = DType::kFloat32, .device = Device::kCuda});
  Tensor ids = Tensor::empty({2, 5}, DType::kInt64);
  for (std::int64_t i = 0; i < ids.numel(); ++i) ids.data_as<std::int64_t>()[i] = 3 + 11 * i % 60;
  GenerationConfig config{.max_new_tokens = 12};
  const GenerateResult resident = generate(model, ids, Tensor(), config);
  config.cache_implementation = "offloaded";
  const GenerateResult offloaded = generate(model, ids, Tensor(), config);
  EXPECT_EQ(offloaded.new_tokens, resident.new_tokens);
  EXPECT_EQ(offloaded.cache_length, resident.cache_length);
  EXPECT_EQ(offloaded.graph_steps, 0);  // kernel by kernel
}

}  // namespace
}  // namespace kvcache
