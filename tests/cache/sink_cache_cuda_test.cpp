// SinkCache on the GPU against the same cache on the CPU: every update returns the same keys and
// values, bit for bit, and leaves the same storage, through appends, one-token and longer slides
// (the kept keys re-rotated by cuda::rotate_rows), a prefill longer than the window, crop, beam
// reorder, batch operations and clone; a GPU model over a GPU sink cache gives the CPU's logits far
// past the window. Skips where no GPU is present (CI).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_util.hpp"
#include "kvcache/attention/mask.hpp"
#include "kvcache/attention/rope.hpp"
#include "kvcache/backend/cuda.hpp"
#include "kvcache/cache/sink_cache.hpp"
#include "kvcache/generation/generate.hpp"
#include "kvcache/model/llama.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using testing::random_tensor;
using testing::to_doubles;

class SinkCacheCuda : public testing::CudaTest {};

constexpr int kLayers = 2;
constexpr std::int64_t kHeadDim = 16;

SinkCacheOptions options(bool rope) {
  SinkCacheOptions o{.window_length = 12, .num_sink_tokens = 3};
  if (rope) {
    for (std::int64_t i = 0; i < kHeadDim / 2; ++i)
      o.rope_inv_freq.push_back(static_cast<float>(std::pow(10000.0, -2.0 * i / kHeadDim)));
  }
  return o;
}

void expect_same_storage(const SinkCache<cuda::Backend>& gpu, const SinkCache<>& cpu,
                         const std::string& what) {
  ASSERT_EQ(gpu.num_layers(), cpu.num_layers()) << what;
  for (int l = 0; l < cpu.num_layers(); ++l) {
    ASSERT_EQ(gpu.get_seq_length(l), cpu.get_seq_length(l)) << what << ", layer " << l;
    ASSERT_EQ(gpu.stored_length(l), cpu.stored_length(l)) << what << ", layer " << l;
    const std::int64_t n = cpu.stored_length(l);
    if (n == 0) continue;
    const auto [gk, gv] = gpu.storage(l);
    const auto [ck, cv] = cpu.storage(l);
    EXPECT_EQ(gk.device(), Device::kCuda);
    EXPECT_EQ(to_doubles(cuda::to_host(gk.slice(2, 0, n))), to_doubles(ck.slice(2, 0, n)))
        << what << ", keys held by layer " << l;
    EXPECT_EQ(to_doubles(cuda::to_host(gv.slice(2, 0, n))), to_doubles(cv.slice(2, 0, n)))
        << what << ", values held by layer " << l;
  }
}

// One step of q_len tokens through both caches, every layer: the returned keys and values and the
// storage left behind must be equal.
void step_both(SinkCache<cuda::Backend>& gpu, SinkCache<>& cpu, std::int64_t batch,
               std::int64_t q_len, DType dtype, std::mt19937& rng, const std::string& what) {
  for (int l = 0; l < kLayers; ++l) {
    const Tensor k = random_tensor({batch, 2, q_len, kHeadDim}, dtype, rng);
    const Tensor v = random_tensor({batch, 2, q_len, kHeadDim}, dtype, rng);
    const auto [gk, gv] = gpu.update(cuda::to_device(k), cuda::to_device(v), l);
    const auto [ck, cv] = cpu.update(k, v, l);
    ASSERT_EQ(gk.shape_string(), ck.shape_string()) << what << ", layer " << l;
    EXPECT_EQ(to_doubles(cuda::to_host(gk)), to_doubles(ck)) << what << ", keys of layer " << l;
    EXPECT_EQ(to_doubles(cuda::to_host(gv)), to_doubles(cv)) << what << ", values of layer " << l;
  }
  expect_same_storage(gpu, cpu, what);
}

TEST_F(SinkCacheCuda, EveryStepMatchesTheCpuBitForBit) {
  for (bool rope : {true, false}) {
    for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
      std::mt19937 rng(71);
      SinkCache<cuda::Backend> gpu(options(rope));
      SinkCache<> cpu(options(rope));
      // Appends, one-token slides past the window, a 3-token slide, a step longer than
      // window - sinks (attends over everything, keeps the last ones re-rotated), more slides.
      const std::vector<std::int64_t> steps = {5, 1, 1, 4, 1, 1, 1, 1, 3, 1, 15, 1, 1, 2, 1};
      for (std::size_t s = 0; s < steps.size(); ++s) {
        step_both(gpu, cpu, 2, steps[s], dtype, rng,
                  std::string(dtype_name(dtype)) + (rope ? " rope" : " no rope") + ", step " +
                      std::to_string(s));
      }
      EXPECT_EQ(gpu.get_seq_length(0), 39);
      EXPECT_EQ(gpu.stored_length(0), 12);
    }
  }
}

TEST_F(SinkCacheCuda, CropReorderBatchOpsAndCloneMatchTheCpu) {
  std::mt19937 rng(72);
  SinkCache<cuda::Backend> gpu(options(true));
  SinkCache<> cpu(options(true));
  step_both(gpu, cpu, 2, 6, DType::kBFloat16, rng, "prefill");
  for (int i = 0; i < 9; ++i) step_both(gpu, cpu, 2, 1, DType::kBFloat16, rng, "decode");
  gpu.crop(13);
  cpu.crop(13);
  expect_same_storage(gpu, cpu, "crop");
  step_both(gpu, cpu, 2, 1, DType::kBFloat16, rng, "after crop");
  gpu.reorder_cache({1, 0});
  cpu.reorder_cache({1, 0});
  expect_same_storage(gpu, cpu, "reorder");
  SinkCache<cuda::Backend> copy = gpu.clone();
  step_both(gpu, cpu, 2, 1, DType::kBFloat16, rng, "after clone");
  EXPECT_EQ(copy.get_seq_length(0), gpu.get_seq_length(0) - 1);  // the clone did not move on
  gpu.batch_repeat_interleave(2);
  cpu.batch_repeat_interleave(2);
  expect_same_storage(gpu, cpu, "repeat_interleave");
  gpu.batch_select_indices({3, 0});
  cpu.batch_select_indices({3, 0});
  expect_same_storage(gpu, cpu, "select");
  step_both(gpu, cpu, 2, 2, DType::kBFloat16, rng, "after the batch operations");
  EXPECT_KVCACHE_ERROR(gpu.update(random_tensor({2, 2, 1, kHeadDim}, DType::kBFloat16, rng),
                                  random_tensor({2, 2, 1, kHeadDim}, DType::kBFloat16, rng), 0),
                       "expected states on");
  expect_same_storage(gpu, cpu, "after a refused update");
}

TEST_F(SinkCacheCuda, RotateRowsChecksItsArguments) {
  const Tensor x = cuda::empty({1, 2, 3, 8}, DType::kFloat32);
  const Tensor table = cuda::empty({2, 4}, DType::kFloat32);
  EXPECT_KVCACHE_ERROR(cuda::rotate_rows(x, cuda::empty({1, 2, 4, 8}, DType::kFloat32), table),
                       "expected dst shaped and typed as src");
  EXPECT_KVCACHE_ERROR(cuda::rotate_rows(x, x, cuda::empty({2, 3}, DType::kFloat32)),
                       "expected cos_sin [2, 4]");
  EXPECT_KVCACHE_ERROR(cuda::rotate_rows(Tensor::empty({1, 2, 3, 8}, DType::kFloat32), x, table),
                       "expected src [batch, heads, slots, head_dim] float on CUDA");
}

// A GPU model over a GPU sink cache against the CPU model over a CPU one, far past the window,
// teacher-forced on the CPU's greedy tokens (float32, a transformers fixture's weights): every
// step's logits agree to float32 noise (the GEMMs add in other orders, so greedy tokens may part
// after a near tie; a wrong position, slide or mask offset would move the logits by far more).
// generate() with cache_implementation "sink" on the GPU gives the hand-written loop's tokens.
TEST_F(SinkCacheCuda, LogitsMatchTheCpuFarPastTheWindowAndGenerateFollowsTheLoop) {
  const std::string dir = std::string(KVCACHE_TEST_DATA_DIR) + "/llama_gqa";
  const LlamaModel gpu_model =
      LlamaModel::from_pretrained(dir, {.dtype = DType::kFloat32, .device = Device::kCuda});
  const LlamaModel cpu_model = LlamaModel::from_pretrained(dir, {.dtype = DType::kFloat32});
  const SinkCacheOptions opts{.window_length = 16,
                              .num_sink_tokens = 4,
                              .rope_inv_freq = RotaryEmbedding(cpu_model.config().rope).inv_freq()};
  Tensor ids = Tensor::empty({1, 6}, DType::kInt64);
  for (std::int64_t i = 0; i < ids.numel(); ++i) ids.data_as<std::int64_t>()[i] = 3 + 11 * i % 60;
  constexpr int kSteps = 60;  // 6 + 60 tokens through a window of 16

  auto run_loop = [&](const LlamaModel& model, Cache<cuda::Backend>* gpu_cache,
                      Cache<cpu::Backend>* cpu_cache, const std::vector<std::int64_t>* forced,
                      std::vector<Tensor>& logits) {
    Tensor mask = ones_mask(1, 6);
    std::vector<std::int64_t> pos = make_cache_position(0, 6);
    Tensor step = ids;
    std::vector<std::int64_t> tokens;
    for (int i = 0; i < kSteps; ++i) {
      Tensor out;
      if (gpu_cache) {
        out = cuda::to_host(model.forward({.input_ids = step,
                                           .attention_mask = mask,
                                           .cache_position = pos,
                                           .past_key_values = gpu_cache,
                                           .logits_to_keep = 1}));
      } else {
        out = model.forward({.input_ids = step,
                             .attention_mask = mask,
                             .cache_position = pos,
                             .past_key_values = cpu_cache,
                             .logits_to_keep = 1});
      }
      logits.push_back(out);
      const std::int64_t next =
          forced ? (*forced)[static_cast<std::size_t>(i)] : argmax_last(out)[0];
      tokens.push_back(next);
      step = token_column({next});
      mask = extend_attention_mask(mask);
      pos = {pos.back() + 1};
    }
    return tokens;
  };
  SinkCache<> cpu_cache(opts);
  std::vector<Tensor> cpu_logits, gpu_logits, free_logits;
  const std::vector<std::int64_t> cpu_tokens =
      run_loop(cpu_model, nullptr, &cpu_cache, nullptr, cpu_logits);
  SinkCache<cuda::Backend> gpu_cache(opts);
  run_loop(gpu_model, &gpu_cache, nullptr, &cpu_tokens, gpu_logits);
  EXPECT_EQ(gpu_cache.stored_length(0), 16);
  double worst = 0.0;
  int worst_step = -1;
  for (int i = 0; i < kSteps; ++i) {
    const std::vector<double> c = to_doubles(cpu_logits[static_cast<std::size_t>(i)]);
    const std::vector<double> g = to_doubles(gpu_logits[static_cast<std::size_t>(i)]);
    ASSERT_EQ(c.size(), g.size());
    double diff = 0.0, scale = 0.0;
    for (std::size_t j = 0; j < c.size(); ++j) {
      diff = std::max(diff, std::abs(c[j] - g[j]));
      scale = std::max(scale, std::abs(c[j]));
    }
    if (diff / scale > worst) {
      worst = diff / scale;
      worst_step = i;
    }
  }
  EXPECT_LT(worst, 1e-4) << "worst relative logit error at step " << worst_step;
  std::cout << "[ sink, GPU vs CPU ] worst relative logit error over " << kSteps
            << " steps: " << worst << " (step " << worst_step << ")\n";

  // generate() on the GPU: the free-running GPU loop's tokens, in memory bounded by the window.
  SinkCache<cuda::Backend> loop_cache(opts);
  const std::vector<std::int64_t> gpu_tokens =
      run_loop(gpu_model, &loop_cache, nullptr, nullptr, free_logits);
  GenerationConfig config{.max_new_tokens = kSteps + 1, .cache_implementation = "sink"};
  config.cache_config.window_length = 16;
  config.cache_config.num_sink_tokens = 4;
  const GenerateResult gen = generate(gpu_model, ids, Tensor(), config);
  ASSERT_EQ(gen.new_tokens.size(), 1u);
  ASSERT_EQ(gen.new_tokens[0].size(), static_cast<std::size_t>(kSteps + 1));
  // The loop's i-th logits give generate()'s token i (its first comes from the prefill).
  for (int i = 0; i < kSteps; ++i) {
    ASSERT_EQ(gen.new_tokens[0][static_cast<std::size_t>(i)],
              gpu_tokens[static_cast<std::size_t>(i)])
        << "token " << i;
  }
  EXPECT_EQ(gen.cache_bytes, 2u * 2 * 16 * 16 * 4 * cpu_model.config().num_hidden_layers)
      << "k+v, kv heads, window, head_dim, float32, layers";
  EXPECT_EQ(gen.graph_steps, 0);  // kernel by kernel
}

}  // namespace
}  // namespace kvcache
