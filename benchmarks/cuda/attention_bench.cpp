// cuda::attention against what the GPU can do, in one run so the ratios need no other program:
//
// - BM_DeviceCopyCuda: a 1 GiB cudaMemcpy device to device, counted as read + write (2 GiB per
//   copy): the bandwidth a memory-bound kernel can hope for (4.18 TB/s on the H200). Registered
//   first, so it runs first and the decode rows divide by this run's figure.
// - BM_DecodeAttentionCuda/<batch>/<context>: one decode step's attention (q_len 1, 32 query heads,
//   8 kv heads, head_dim 128, bfloat16, no padding mask), K+V bytes read per second and their
//   ratio to the device copy (copy_ratio; target >= 0.85). Every timed call reads a different
//   layer's keys and values, cycling through enough layers that at least 512 MiB lies between two
//   reads of the same bytes: the 50 MiB L2 never holds them, as in a real model's step.
// - BM_DecodeAttentionQuantizedCuda/<batch>/<context>/<nbits>: the same step over a QuantizedCache
//   layer (cuda::attention_quantized reading the blocks), bytes = what the layer holds.
// - BM_PrefillAttentionCuda/<shape>/512: a 512-token causal prefill from an empty cache, batch 1,
//   TinyLlama's attention (32 / 4 heads, head_dim 64) and Llama-2-7B's (32 / 32, head_dim 128),
//   bfloat16, in TFLOP/s (4 · heads · head_dim flops per visible (query, key) pair).
// - BM_OffloadedCacheUpdate/<context> and BM_DynamicCacheUpdateCuda/<context>: one decode step's
//   cache updates (one token into each of kUpdateLayers layers, batch 1, 8 kv heads, head_dim 128,
//   bfloat16) at a context of <context> tokens, with no attention between them: what the cache
//   itself costs a step. The offloaded cache moves every layer's tokens host -> device once a
//   step (update_us is then the bus time of a layer; host_to_device_GBps the rate); the resident
//   DynamicCache appends in place.
// All GPU time comes from CUDA events around a batch of calls (UseManualTime), after warm-up
// calls; one iteration is a batch, and call_us is the time of one call. The decode rows also
// replay the same calls as a CUDA graph (graph_call_us, graph_copy_ratio): without the host's
// launch cost between calls, which at batch 1 is comparable to the kernels' time. Every
// benchmark skips where no GPU is present.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_bench_util.hpp"
#include "kvcache/backend/cuda.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/cache/offloaded_cache.hpp"
#include "kvcache/cache/quantized_cache.hpp"
#include "kvcache/tensor.hpp"

namespace {

using kvcache::DType;
using kvcache::Tensor;
namespace cuda = kvcache::cuda;
using kvcache::bench_cuda::check;
using kvcache::bench_cuda::EventTimer;
using kvcache::bench_cuda::graph_seconds_per_call;
using kvcache::bench_cuda::skip_without_device;
using kvcache::bench_cuda::stream;

constexpr int kCallsPerIteration = 20;  // calls between two events

// --- device copy ---------------------------------------------------------------------------------

constexpr std::size_t kCopyBytes = std::size_t{1} << 30;
double g_copy_bytes_per_second = 0.0;  // read + write, set by BM_DeviceCopyCuda

double time_copies(const Tensor& dst, const Tensor& src, int copies, EventTimer& timer) {
  return timer.seconds([&] {
    for (int i = 0; i < copies; ++i)
      check(cudaMemcpyAsync(dst.data(), src.data(), kCopyBytes, cudaMemcpyDeviceToDevice, stream()),
            "cudaMemcpyAsync");
  });
}

void bm_device_copy_cuda(benchmark::State& state) {
  if (skip_without_device(state)) return;
  constexpr int kCopies = 4;  // per iteration
  const auto n = static_cast<std::int64_t>(kCopyBytes);
  const Tensor src = cuda::empty({n}, DType::kUInt8), dst = cuda::empty({n}, DType::kUInt8);
  check(cudaMemsetAsync(src.data(), 1, kCopyBytes, stream()), "cudaMemsetAsync");
  check(cudaMemsetAsync(dst.data(), 0, kCopyBytes, stream()), "cudaMemsetAsync");
  EventTimer timer;
  time_copies(dst, src, 2, timer);  // warm-up
  double total = 0.0;
  for (auto _ : state) {
    const double s = time_copies(dst, src, kCopies, timer);
    state.SetIterationTime(s);
    total += s;
  }
  const double bytes = 2.0 * static_cast<double>(kCopyBytes) * kCopies;  // read + write
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes) * state.iterations());
  g_copy_bytes_per_second = bytes * static_cast<double>(state.iterations()) / total;
  state.counters["call_us"] = total / (static_cast<double>(state.iterations()) * kCopies) * 1e6;
}

// The copy bandwidth the ratios divide by; measured here when BM_DeviceCopyCuda was filtered out.
double copy_bytes_per_second() {
  if (g_copy_bytes_per_second <= 0.0) {
    const auto n = static_cast<std::int64_t>(kCopyBytes);
    const Tensor src = cuda::empty({n}, DType::kUInt8), dst = cuda::empty({n}, DType::kUInt8);
    check(cudaMemsetAsync(src.data(), 1, kCopyBytes, stream()), "cudaMemsetAsync");
    EventTimer timer;
    time_copies(dst, src, 2, timer);
    const double s = time_copies(dst, src, 8, timer);
    g_copy_bytes_per_second = 2.0 * static_cast<double>(kCopyBytes) * 8 / s;
  }
  return g_copy_bytes_per_second;
}

// --- attention -----------------------------------------------------------------------------------

Tensor uniform(std::initializer_list<std::int64_t> shape, std::uint64_t seed) {
  Tensor t = cuda::empty(shape, DType::kBFloat16);
  cuda::fill_uniform(t, seed, -1.0f, 1.0f);
  return t;
}

Tensor positions(std::int64_t first, std::int64_t count) {
  Tensor host = Tensor::empty({count}, DType::kInt64);
  for (std::int64_t i = 0; i < count; ++i) host.data_as<std::int64_t>()[i] = first + i;
  return cuda::to_device(host);
}

constexpr std::int64_t kDecodeHeads = 32, kDecodeKvHeads = 8, kDecodeHeadDim = 128;
constexpr double kColdBytes = 512.0 * (1 << 20);  // K+V between two reads of the same layer

void bm_decode_attention_cuda(benchmark::State& state) {
  if (skip_without_device(state)) return;
  const std::int64_t batch = state.range(0), context = state.range(1);
  // Keys and values [batch, kv_heads, context, head_dim] bfloat16, one pair per layer.
  const double kv_bytes = 2.0 * batch * kDecodeKvHeads * context * kDecodeHeadDim * 2;
  const int layers = std::max(1, static_cast<int>((kColdBytes + kv_bytes - 1) / kv_bytes));
  std::vector<Tensor> keys, values;
  for (int l = 0; l < layers; ++l) {
    keys.push_back(uniform({batch, kDecodeKvHeads, context, kDecodeHeadDim}, 2 * l + 1));
    values.push_back(uniform({batch, kDecodeKvHeads, context, kDecodeHeadDim}, 2 * l + 2));
  }
  const Tensor query = uniform({batch, kDecodeHeads, 1, kDecodeHeadDim}, 999);
  const Tensor cache_position = positions(context - 1, 1);
  const Tensor out = cuda::empty({batch, 1, kDecodeHeads, kDecodeHeadDim}, DType::kBFloat16);
  const float scale = 0.08838834764831845f;  // 1 / sqrt(128)

  int layer = 0;
  auto calls = [&](int count) {
    for (int c = 0; c < count; ++c) {
      cuda::attention(query, keys[layer], values[layer], Tensor(), cache_position, 0, scale, out);
      layer = (layer + 1) % layers;
    }
  };
  EventTimer timer;
  timer.seconds([&] { calls(2 * layers + 4); });  // warm-up: plans, pool, clocks
  double total = 0.0;
  for (auto _ : state) {
    const double s = timer.seconds([&] { calls(kCallsPerIteration); });
    state.SetIterationTime(s);
    total += s;
  }
  const double reads = kv_bytes * kCallsPerIteration * static_cast<double>(state.iterations());
  state.SetBytesProcessed(static_cast<std::int64_t>(reads));
  state.counters["call_us"] =
      total / (static_cast<double>(state.iterations()) * kCallsPerIteration) * 1e6;
  state.counters["layers"] = layers;
  state.counters["copy_ratio"] = reads / total / copy_bytes_per_second();

  // The same calls replayed as a CUDA graph, as a model's decode step runs: no host launch cost
  // between the kernels, so small shapes show the kernels' own bandwidth.
  const double graph_s =
      graph_seconds_per_call(kCallsPerIteration, [&] { calls(kCallsPerIteration); });
  if (graph_s > 0.0) {
    state.counters["graph_call_us"] = graph_s * 1e6;
    state.counters["graph_copy_ratio"] = kv_bytes / graph_s / copy_bytes_per_second();
  }
}

// One decode step's attention over a QuantizedCache layer (cuda::attention_quantized): the same
// shape as BM_DecodeAttentionCuda, keys per channel and values per token in groups of 64, 128
// residual tokens in bfloat16, the rest of the context in nbits-bit blocks read directly by the
// kernel. Bytes counted are what the layer holds (blocks + residual, QuantizedCache::nbytes), so
// copy_ratio says how close the kernel comes to streaming the compact cache; compare call_us with
// BM_DecodeAttentionCuda's at the same batch and context.
void bm_decode_attention_quantized_cuda(benchmark::State& state) {
  if (skip_without_device(state)) return;
  const std::int64_t batch = state.range(0), context = state.range(1);
  const int nbits = static_cast<int>(state.range(2));
  const kvcache::QuantizedCacheOptions options{
      .nbits = nbits, .group_size = 64, .residual_length = 128};
  std::vector<std::unique_ptr<kvcache::QuantizedCache<cuda::Backend>>> caches;
  std::vector<kvcache::AttentionKV> views;
  double layer_bytes = 0.0;
  int layers = 1;
  for (int l = 0; l < layers; ++l) {
    auto cache = std::make_unique<kvcache::QuantizedCache<cuda::Backend>>(options);
    const Tensor k = uniform({batch, kDecodeKvHeads, context, kDecodeHeadDim}, 2 * l + 1);
    const Tensor v = uniform({batch, kDecodeKvHeads, context, kDecodeHeadDim}, 2 * l + 2);
    // context - 1 tokens stored, then the step's own token: the view holds all context keys.
    cache->update_for_attention(k.slice(2, 0, context - 1), v.slice(2, 0, context - 1), 0);
    views.push_back(cache->update_for_attention(k.slice(2, context - 1, context),
                                                v.slice(2, context - 1, context), 0));
    caches.push_back(std::move(cache));
    if (l == 0) {
      layer_bytes = static_cast<double>(caches[0]->nbytes());
      layers = std::max(1, static_cast<int>((kColdBytes + layer_bytes - 1) / layer_bytes));
      layers = std::min(layers, 256);
    }
  }
  const Tensor query = uniform({batch, kDecodeHeads, 1, kDecodeHeadDim}, 999);
  const Tensor cache_position = positions(context - 1, 1);
  const Tensor out = cuda::empty({batch, 1, kDecodeHeads, kDecodeHeadDim}, DType::kBFloat16);
  const float scale = 0.08838834764831845f;  // 1 / sqrt(128)
  int layer = 0;
  auto calls = [&](int count) {
    for (int c = 0; c < count; ++c) {
      const kvcache::AttentionKV& kv = views[static_cast<std::size_t>(layer)];
      cuda::attention_quantized(query, *kv.quantized, kv.keys, kv.values, Tensor(), cache_position,
                                0, scale, out);
      layer = (layer + 1) % layers;
    }
  };
  EventTimer timer;
  timer.seconds([&] { calls(2 * layers + 4); });  // warm-up
  double total = 0.0;
  for (auto _ : state) {
    const double s = timer.seconds([&] { calls(kCallsPerIteration); });
    state.SetIterationTime(s);
    total += s;
  }
  const double reads = layer_bytes * kCallsPerIteration * static_cast<double>(state.iterations());
  state.SetBytesProcessed(static_cast<std::int64_t>(reads));
  state.counters["call_us"] =
      total / (static_cast<double>(state.iterations()) * kCallsPerIteration) * 1e6;
  state.counters["layers"] = layers;
  state.counters["bytes_per_token"] = layer_bytes / (static_cast<double>(batch) * context);
  state.counters["copy_ratio"] = reads / total / copy_bytes_per_second();
}

// --- cache updates -------------------------------------------------------------------------------

constexpr int kUpdateLayers = 8;
constexpr int kUpdateSteps = 16;  // decode steps between two events

// cache: 0 DynamicCache<cuda::Backend> (resident), 1 OffloadedCache.
void bm_cache_update_cuda(benchmark::State& state, bool offloaded) {
  if (skip_without_device(state)) return;
  const std::int64_t context = state.range(0);
  // Room for the prefill, the warm-up and every timed step, so no update regrows a layer.
  const std::int64_t capacity = context + kUpdateSteps * 64 + 64;
  std::unique_ptr<kvcache::Cache<cuda::Backend>> cache;
  if (offloaded) {
    cache = std::make_unique<kvcache::OffloadedCache>(
        kvcache::OffloadedCacheOptions{.initial_capacity = capacity});
  } else {
    cache = std::make_unique<kvcache::DynamicCache<cuda::Backend>>(
        kvcache::DynamicCacheOptions{.initial_capacity = capacity});
  }
  {
    const Tensor k = uniform({1, kDecodeKvHeads, context, kDecodeHeadDim}, 1);
    const Tensor v = uniform({1, kDecodeKvHeads, context, kDecodeHeadDim}, 2);
    for (int l = 0; l < kUpdateLayers; ++l) cache->update(k, v, l);
  }
  const Tensor key = uniform({1, kDecodeKvHeads, 1, kDecodeHeadDim}, 3);
  const Tensor value = uniform({1, kDecodeKvHeads, 1, kDecodeHeadDim}, 4);
  auto steps = [&](int count) {
    for (int s = 0; s < count; ++s)
      for (int l = 0; l < kUpdateLayers; ++l) {
        auto views = cache->update(key, value, l);
        benchmark::DoNotOptimize(views);
      }
  };
  EventTimer timer;
  timer.seconds([&] { steps(2); });  // warm-up: the first step after the prefill
  double total = 0.0;
  std::int64_t timed_steps = 0;
  for (auto _ : state) {
    if (cache->get_seq_length(0) + kUpdateSteps > capacity) {
      state.PauseTiming();
      cache->crop(context);
      steps(1);  // refills the slots, untimed
      state.ResumeTiming();
    }
    const double s = timer.seconds([&] { steps(kUpdateSteps); });
    state.SetIterationTime(s);
    total += s;
    timed_steps += kUpdateSteps;
  }
  const double updates = static_cast<double>(timed_steps) * kUpdateLayers;
  state.counters["update_us"] = total / updates * 1e6;
  state.counters["step_us"] = total / static_cast<double>(timed_steps) * 1e6;
  // Bytes of one layer's keys and values at this context (what an offloaded update moves).
  const double layer_bytes =
      2.0 * kDecodeKvHeads * static_cast<double>(context) * kDecodeHeadDim * 2;
  state.counters["layer_MB"] = layer_bytes * 1e-6;
  if (offloaded) state.counters["host_to_device_GBps"] = layer_bytes * updates / total * 1e-9;
  state.counters["cache_device_MB"] = static_cast<double>(cache->capacity_bytes()) * 1e-6;
}

struct PrefillShape {
  const char* name;
  std::int64_t heads, kv_heads, head_dim;
};
constexpr PrefillShape kPrefillShapes[] = {{"tinyllama_1.1b", 32, 4, 64},
                                           {"llama2_7b", 32, 32, 128}};
constexpr std::int64_t kPrefillTokens = 512;
constexpr int kPrefillCalls = 10;

void bm_prefill_attention_cuda(benchmark::State& state, const PrefillShape& shape) {
  if (skip_without_device(state)) return;
  const std::int64_t q = kPrefillTokens;
  const Tensor query = uniform({1, shape.heads, q, shape.head_dim}, 11);
  const Tensor keys = uniform({1, shape.kv_heads, q, shape.head_dim}, 12);
  const Tensor values = uniform({1, shape.kv_heads, q, shape.head_dim}, 13);
  const Tensor cache_position = positions(0, q);
  const Tensor out = cuda::empty({1, q, shape.heads, shape.head_dim}, DType::kBFloat16);
  const float scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
  auto calls = [&](int count) {
    for (int c = 0; c < count; ++c)
      cuda::attention(query, keys, values, Tensor(), cache_position, 0, scale, out);
  };
  EventTimer timer;
  timer.seconds([&] { calls(3); });
  double total = 0.0;
  for (auto _ : state) {
    const double s = timer.seconds([&] { calls(kPrefillCalls); });
    state.SetIterationTime(s);
    total += s;
  }
  // Q·Kᵀ and P·V: 2 · 2 · head_dim flops per visible (query, key) pair, q (q + 1) / 2 pairs.
  const double flops = 4.0 * shape.heads * shape.head_dim * (q * (q + 1) / 2.0);
  state.counters["TFLOPs"] = benchmark::Counter(flops * kPrefillCalls * 1e-12,
                                                benchmark::Counter::kIsIterationInvariantRate);
  state.counters["call_us"] =
      total / (static_cast<double>(state.iterations()) * kPrefillCalls) * 1e6;
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::RegisterBenchmark("BM_DeviceCopyCuda", bm_device_copy_cuda)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  auto* decode = benchmark::RegisterBenchmark("BM_DecodeAttentionCuda", bm_decode_attention_cuda);
  for (std::int64_t batch : {1, 8, 32})
    for (std::int64_t context : {4096, 16384}) decode->Args({batch, context});
  decode->UseManualTime()->Unit(benchmark::kMicrosecond);
  auto* quantized = benchmark::RegisterBenchmark("BM_DecodeAttentionQuantizedCuda",
                                                 bm_decode_attention_quantized_cuda);
  for (std::int64_t batch : {1, 8})
    for (std::int64_t context : {4096, 16384})
      for (std::int64_t nbits : {8, 4, 2}) quantized->Args({batch, context, nbits});
  quantized->UseManualTime()->Unit(benchmark::kMicrosecond);
  for (const bool offloaded : {false, true}) {
    benchmark::RegisterBenchmark(
        offloaded ? "BM_OffloadedCacheUpdate" : "BM_DynamicCacheUpdateCuda", bm_cache_update_cuda,
        offloaded)
        ->RangeMultiplier(4)
        ->Range(512, 32768)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
  for (const PrefillShape& shape : kPrefillShapes) {
    const std::string name =
        std::string("BM_PrefillAttentionCuda/") + shape.name + "/" + std::to_string(kPrefillTokens);
    benchmark::RegisterBenchmark(name.c_str(), bm_prefill_attention_cuda, shape)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
