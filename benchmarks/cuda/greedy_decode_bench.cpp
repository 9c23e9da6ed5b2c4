// Greedy decoding on the GPU with whole Llama-shaped models, against the bytes a decode step must
// read and against llama.cpp's and transformers' figures on the same card (an H200; the issue's
// table). Two shapes, random bfloat16 weights drawn on the device, batch 1, a 128-token prompt and
// 256 new tokens through kvcache::generate() with a DynamicCache<cuda::Backend>:
//   TinyLlama-1.1B  hidden 2048, 22 layers, 32 heads / 4 kv heads, ffn 5632, vocab 32000
//   Llama-2-7B      hidden 4096, 32 layers, 32 / 32 heads, ffn 11008, vocab 32000
// BM_GreedyDecodeCuda reports decode tokens/s (manual time = generate()'s decode time: every step
// ends by reading the chosen id back, so the host clock sees the GPU's whole step), with the decode
// step replayed from a CUDA graph (graph:1; the first decode step runs
// kernel by kernel and the second captures, both inside the timed window) and without (graph:0),
// and floor_ratio = tokens/s over the weight-bytes floor at the same binary's device-copy bandwidth
// (BM_DeviceCopyCuda in attention_cuda_bench; 4.18 TB/s on the H200 counting read + write).
// BM_PrefillCuda times a 512-token prefill (tokens/s) of the same shapes, and BM_KvAppendCuda one
// decode step's append of the new token's keys and values into a DynamicCache<cuda::Backend> layer.
// BM_GreedyDecodeOffloadedCuda: the OffloadedCache (layers in host memory) against the resident
// DynamicCache at a short and a long prompt.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>

#include "kvcache/backend/cuda.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/cache/offloaded_cache.hpp"
#include "kvcache/generation/generate.hpp"
#include "kvcache/model/llama.hpp"

namespace {

using kvcache::DType;
using kvcache::LlamaModel;
using kvcache::Tensor;

struct Shape {
  const char* name;
  std::int64_t hidden, layers, heads, kv_heads, ffn, vocab;
  double llama_cpp_decode, transformers_compiled, transformers_eager, llama_cpp_prefill;
};

constexpr Shape kShapes[] = {
    {"tinyllama_1.1b", 2048, 22, 32, 4, 5632, 32000, 760, 363, 43.3, 68478},
    {"llama2_7b", 4096, 32, 32, 32, 11008, 32000, 224, 161, 42.9, 21685},
};
constexpr double kCopyBandwidth = 4.18e12;  // bytes/s, the H200's 1 GiB device copy (read+write)

kvcache::ModelConfig config_of(const Shape& s) {
  kvcache::ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.vocab_size = s.vocab;
  c.hidden_size = s.hidden;
  c.intermediate_size = s.ffn;
  c.num_hidden_layers = s.layers;
  c.num_attention_heads = s.heads;
  c.num_key_value_heads = s.kv_heads;
  c.head_dim = s.hidden / s.heads;
  c.max_position_embeddings = 4096;
  c.rms_norm_eps = 1e-5;
  c.rope.head_dim = c.head_dim;
  c.rope.rope_theta = 10000.0;
  c.tie_word_embeddings = false;
  return c;
}

// One model of each shape, made on the device once and kept for every benchmark of that shape.
const LlamaModel& model_of(int index) {
  static LlamaModel* models[2] = {nullptr, nullptr};
  if (models[index] == nullptr) {
    const kvcache::ModelConfig c = config_of(kShapes[index]);
    auto weights =
        kvcache::random_llama_weights(c, 7, DType::kBFloat16, 0.02f, kvcache::Device::kCuda);
    models[index] =
        new LlamaModel(LlamaModel::from_weights(c, weights, {.device = kvcache::Device::kCuda}));
  }
  return *models[index];
}

Tensor prompt_ids(std::int64_t batch, std::int64_t length, std::int64_t vocab) {
  Tensor ids = Tensor::empty({batch, length}, DType::kInt64);
  for (std::int64_t i = 0; i < ids.numel(); ++i)
    ids.data_as<std::int64_t>()[i] = (i * 7919) % vocab;
  return ids;
}

void BM_GreedyDecodeCuda(benchmark::State& state) {
  if (kvcache::cuda::device_count() == 0) return state.SkipWithError("no CUDA device");
  const Shape& s = kShapes[state.range(0)];
  const LlamaModel& model = model_of(static_cast<int>(state.range(0)));
  const Tensor ids = prompt_ids(1, 128, s.vocab);
  const kvcache::GenerationConfig config{.max_new_tokens = 256, .cuda_graph = state.range(1) != 0};
  (void)kvcache::generate(model, ids, Tensor(), config);  // warm-up: the pool, cuBLAS's plans
  double tokens = 0, seconds = 0;
  std::int64_t replayed = 0;
  for (auto _ : state) {
    const kvcache::GenerateResult r = kvcache::generate(model, ids, Tensor(), config);
    state.SetIterationTime(r.decode_ms * 1e-3);
    tokens += static_cast<double>(r.decode_steps);
    seconds += r.decode_ms * 1e-3;
    replayed = r.graph_steps;
  }
  const double tps = tokens / seconds;
  const double floor = kCopyBandwidth / static_cast<double>(model.weight_bytes());
  state.counters["tokens_per_s"] = tps;
  state.counters["floor_ratio"] = tps / floor;
  state.counters["vs_llama_cpp"] = tps / s.llama_cpp_decode;
  state.counters["vs_transformers_compiled"] = tps / s.transformers_compiled;
  state.counters["vs_transformers_eager"] = tps / s.transformers_eager;
  state.counters["graph_steps"] = static_cast<double>(replayed);
  state.counters["peak_device_GB"] =
      static_cast<double>(kvcache::cuda::memory_stats().peak_in_use) * 1e-9;
  state.SetLabel(s.name);
}
// Args: shape (0 TinyLlama, 1 7B), CUDA graph replay of the decode step (1 on, the default; 0 off).
BENCHMARK(BM_GreedyDecodeCuda)
    ->ArgsProduct({{0, 1}, {1, 0}})
    ->ArgNames({"shape", "graph"})
    ->UseManualTime()
    ->Iterations(3)
    ->Unit(benchmark::kMillisecond);

// The offloaded cache against the resident one (DynamicCache, decode kernel by kernel as the
// offloaded one runs), at a prompt of 128 or 2048 tokens and 128 new: decode tokens/s and the
// device bytes each cache allocates (cache_device_MB) beside the tokens' bytes (cache_MB).
void BM_GreedyDecodeOffloadedCuda(benchmark::State& state) {
  if (kvcache::cuda::device_count() == 0) return state.SkipWithError("no CUDA device");
  const Shape& s = kShapes[state.range(0)];
  const bool offloaded = state.range(1) != 0;
  const LlamaModel& model = model_of(static_cast<int>(state.range(0)));
  const Tensor ids = prompt_ids(1, state.range(2), s.vocab);
  const kvcache::GenerationConfig config{.max_new_tokens = 128, .cuda_graph = false};
  double tokens = 0, seconds = 0;
  std::size_t device_bytes = 0, bytes = 0;
  std::int64_t prefetched = 0;
  auto once = [&] {
    std::unique_ptr<kvcache::Cache<kvcache::cuda::Backend>> cache;
    if (offloaded) {
      cache = std::make_unique<kvcache::OffloadedCache>();
    } else {
      cache = std::make_unique<kvcache::DynamicCache<kvcache::cuda::Backend>>();
    }
    const kvcache::GenerateResult r = kvcache::generate(model, ids, Tensor(), config, cache.get());
    device_bytes = cache->capacity_bytes();
    bytes = cache->nbytes();
    if (offloaded) prefetched = static_cast<kvcache::OffloadedCache&>(*cache).prefetched_updates();
    return r;
  };
  (void)once();  // warm-up
  for (auto _ : state) {
    const kvcache::GenerateResult r = once();
    state.SetIterationTime(r.decode_ms * 1e-3);
    tokens += static_cast<double>(r.decode_steps);
    seconds += r.decode_ms * 1e-3;
  }
  state.counters["tokens_per_s"] = tokens / seconds;
  state.counters["cache_device_MB"] = static_cast<double>(device_bytes) * 1e-6;
  state.counters["cache_MB"] = static_cast<double>(bytes) * 1e-6;
  state.counters["prefetched_updates"] = static_cast<double>(prefetched);
  state.SetLabel(std::string(s.name) + (offloaded ? " offloaded" : " resident"));
}
// Args: shape (0 TinyLlama, 1 7B), cache (0 DynamicCache, 1 OffloadedCache), prompt tokens.
BENCHMARK(BM_GreedyDecodeOffloadedCuda)
    ->ArgsProduct({{0, 1}, {0, 1}, {128, 2048}})
    ->ArgNames({"shape", "offloaded", "prompt"})
    ->UseManualTime()
    ->Iterations(2)
    ->Unit(benchmark::kMillisecond);

void BM_PrefillCuda(benchmark::State& state) {
  if (kvcache::cuda::device_count() == 0) return state.SkipWithError("no CUDA device");
  const Shape& s = kShapes[state.range(0)];
  const LlamaModel& model = model_of(static_cast<int>(state.range(0)));
  const Tensor ids = prompt_ids(1, 512, s.vocab);
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  auto once = [&] {
    kvcache::DynamicCache<kvcache::cuda::Backend> cache;
    cudaEventRecord(start, nullptr);
    const Tensor logits =
        model.forward({.input_ids = ids, .past_key_values = &cache, .logits_to_keep = 1});
    cudaEventRecord(stop, nullptr);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    return ms;
  };
  once();
  for (auto _ : state) state.SetIterationTime(once() * 1e-3);
  state.counters["tokens_per_s"] =
      benchmark::Counter(512.0, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(std::string(s.name) + ", llama.cpp " +
                 std::to_string(static_cast<int>(s.llama_cpp_prefill)) + " tok/s");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}
BENCHMARK(BM_PrefillCuda)
    ->DenseRange(0, 1)
    ->UseManualTime()
    ->Iterations(10)
    ->Unit(benchmark::kMillisecond);

// One decode step's append for one layer: [1, kv_heads, 1, head_dim] keys and values into a
// DynamicCache<cuda::Backend> holding 4096 tokens (capacity reserved, so no regrowth).
void BM_KvAppendCuda(benchmark::State& state) {
  if (kvcache::cuda::device_count() == 0) return state.SkipWithError("no CUDA device");
  const std::int64_t kv_heads = state.range(0), hd = 128;
  kvcache::DynamicCache<kvcache::cuda::Backend> cache({.initial_capacity = 1 << 20});
  Tensor k = kvcache::cuda::empty({1, kv_heads, 4096, hd}, DType::kBFloat16);
  kvcache::cuda::fill_uniform(k, 1, -1, 1);
  cache.update(k, k, 0);
  Tensor step = kvcache::cuda::empty({1, kv_heads, 1, hd}, DType::kBFloat16);
  kvcache::cuda::fill_uniform(step, 2, -1, 1);
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  for (auto _ : state) {
    constexpr int kSteps = 100;
    cudaEventRecord(start, nullptr);
    for (int i = 0; i < kSteps; ++i) cache.update(step, step, 0);
    cudaEventRecord(stop, nullptr);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(ms * 1e-3 / kSteps);
    cache.crop(4096);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}
// A fixed count: each iteration is 100 appends, and auto-sizing on the tiny manual time would run
// for minutes of host time.
BENCHMARK(BM_KvAppendCuda)
    ->Arg(4)
    ->Arg(8)
    ->Arg(32)
    ->UseManualTime()
    ->Iterations(200)
    ->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
