// DynamicCache append cost on the CPU backend. The cache claims a decode step costs O(new tokens)
// whatever the length held, where transformers' torch.cat growth costs O(length). This program
// measures both at fixed lengths (steady state, capacity already grown), plus whole generations
// from an empty cache so the 1.5x regrowths are paid and visible, and checks the flatness target:
// the per-step time at 8192 tokens within 1.5x of the time at 128.
//
// Beside it, the same step for every other cache kind (BM_<Kind>CacheUpdate: Static, Sliding,
// Sink, Quantized) and one layer's decode step, attention included, over each kind
// (BM_<Kind>DecodeStep/<dtype>/<context>; Quantized also by bits).
//
// Layer layout throughout: [batch 8, num_kv_heads 4, seq_len, head_dim 64], float32 and bfloat16.
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "bench_util.hpp"
#include "kvcache/kvcache.hpp"

namespace {

using kvcache::DType;
using kvcache::DynamicCache;
using kvcache::Tensor;

constexpr std::int64_t kBatch = 8;
constexpr std::int64_t kKvHeads = 4;
constexpr std::int64_t kHeadDim = 64;
constexpr std::int64_t kFlatShort = 128;  // the flatness target compares these two lengths
constexpr std::int64_t kFlatLong = 8192;
constexpr double kFlatTarget = 1.5;
constexpr DType kDTypes[] = {DType::kFloat32, DType::kBFloat16};

// Uniform [-1, 1) values, never zeros: all-zero memory is what the kernel hands out for untouched
// pages, and a benchmark must not be able to profit from that by accident.
Tensor random_tensor(std::int64_t seq_len, DType dtype, std::uint32_t seed) {
  Tensor values = Tensor::empty({kBatch, kKvHeads, seq_len, kHeadDim}, DType::kFloat32);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  float* data = values.data_as<float>();  // [batch, kv_heads, seq_len, head_dim], contiguous
  for (std::int64_t i = 0; i < values.numel(); ++i) data[i] = dist(rng);
  return kvcache::cpu::cast(values, dtype);
}

// Bytes one decode step appends: one token of keys and one of values.
std::int64_t step_bytes(DType dtype) {
  return 2 * kBatch * kKvHeads * kHeadDim * static_cast<std::int64_t>(kvcache::dtype_size(dtype));
}

void report_per_step(benchmark::State& state, DType dtype) {
  state.SetBytesProcessed(state.iterations() * step_bytes(dtype));
  // Seconds per iteration (= per decode step), shown next to the bytes/s.
  state.counters["time_per_step"] = benchmark::Counter(
      1.0, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

// The cache kinds whose steps are compared side by side, each holding one layer.
enum class Kind { kDynamic, kStatic, kSliding, kSink };

// Sliding: every layer slides over 4096 tokens (Mistral). 64 spare slots, so the decode step's
// crop back by 64 tokens stays within what the ring keeps (the default 8 would refuse it).
constexpr std::int64_t kSlidingWindow = 4096;
constexpr std::int64_t kSlidingSpareSlots = 64;

// A cache of `kind` for a layer of seq_len tokens: Static with 64 slots to spare (the decode step
// writes up to 64 tokens past seq_len before its crop); Sink with a window of seq_len (4 sinks)
// and RoPE inverse frequencies of base 10000 for its re-rotation.
std::unique_ptr<kvcache::Cache<kvcache::cpu::Backend>> make_cache(Kind kind, std::int64_t seq_len) {
  switch (kind) {
    case Kind::kStatic:
      return std::make_unique<kvcache::StaticCache<>>(kBatch, seq_len + 64);
    case Kind::kSliding:
      return std::make_unique<DynamicCache<>>(kvcache::DynamicCacheOptions{
          .sliding_windows = {kSlidingWindow}, .sliding_spare_slots = kSlidingSpareSlots});
    case Kind::kSink: {
      std::vector<float> inv_freq(kHeadDim / 2);
      for (std::int64_t i = 0; i < kHeadDim / 2; ++i)
        inv_freq[static_cast<std::size_t>(i)] =
            1.0f / std::pow(10000.0f, static_cast<float>(2 * i) / static_cast<float>(kHeadDim));
      return std::make_unique<kvcache::SinkCache<>>(kvcache::SinkCacheOptions{
          .window_length = seq_len, .num_sink_tokens = 4, .rope_inv_freq = inv_freq});
    }
    case Kind::kDynamic:
      break;
  }
  return std::make_unique<DynamicCache<>>();
}

// One decode step's update (one token, [8, 4, 1, 64]) on a cache of `kind` holding seq_len tokens.
// A cache that evicts (Sink, full at its window of seq_len) stays at seq_len by itself: each step
// evicts one token, slides the recent ones down and re-rotates their keys, O(window) by design.
// The others are cropped back to seq_len after every step (O(1): the length moves back).
void bm_cache_update(benchmark::State& state, DType dtype, Kind kind) {
  const std::int64_t seq_len = state.range(0);
  const auto cache = make_cache(kind, seq_len);
  cache->update(random_tensor(seq_len, dtype, 1), random_tensor(seq_len, dtype, 2), 0);
  const Tensor key = random_tensor(1, dtype, 3);    // [8, 4, 1, 64]
  const Tensor value = random_tensor(1, dtype, 4);  // [8, 4, 1, 64]
  const bool crop = !cache->evicts_tokens();
  // A DynamicCache's prefill leaves capacity == seq_len, so the first append regrows; pay it
  // outside the timing because this benchmark is about the steady-state step at a fixed length.
  cache->update(key, value, 0);
  if (crop) cache->crop(seq_len);
  for (auto _ : state) {
    auto views = cache->update(key, value, 0);
    benchmark::DoNotOptimize(views);
    if (crop) cache->crop(seq_len);
  }
  report_per_step(state, dtype);
}

// What transformers' torch.cat growth costs at the same length: a new [8, 4, seq_len + 1, 64]
// tensor per step for keys and for values, the whole old layer copied into it, then the token.
void bm_naive_concat_update(benchmark::State& state, DType dtype) {
  const std::int64_t seq_len = state.range(0);
  const Tensor past_keys = random_tensor(seq_len, dtype, 1);
  const Tensor past_values = random_tensor(seq_len, dtype, 2);
  const Tensor key = random_tensor(1, dtype, 3);
  const Tensor value = random_tensor(1, dtype, 4);
  for (auto _ : state) {
    for (const auto& [past, token] :
         {std::pair{&past_keys, &key}, std::pair{&past_values, &value}}) {
      Tensor grown = Tensor::empty({kBatch, kKvHeads, seq_len + 1, kHeadDim}, dtype);
      kvcache::cpu::copy(grown.slice(2, 0, seq_len), *past);
      kvcache::cpu::copy(grown.slice(2, seq_len, seq_len + 1), *token);
      benchmark::DoNotOptimize(grown.data());
      benchmark::ClobberMemory();
    }
  }
  report_per_step(state, dtype);
}

// A whole generation of n single-token steps from an empty cache: regrowth copies, first touches
// of new capacity and the free at the end are all paid, amortised over n tokens. With `reserve`
// the cache is told n up front (initial_capacity), so the difference between the two is what
// growing costs.
void bm_dynamic_cache_generation(benchmark::State& state, DType dtype, bool reserve) {
  const std::int64_t tokens = state.range(0);
  const kvcache::DynamicCacheOptions options{.initial_capacity = reserve ? tokens : 0};
  const Tensor key = random_tensor(1, dtype, 3);
  const Tensor value = random_tensor(1, dtype, 4);
  // Allocations counted in an untimed pass so the timed loop carries no bookkeeping.
  std::int64_t allocations = 0;
  {
    DynamicCache<> cache(options);
    std::int64_t capacity = 0;
    for (std::int64_t i = 0; i < tokens; ++i) {
      cache.update(key, value, 0);
      if (cache.capacity() != capacity) ++allocations;
      capacity = cache.capacity();
    }
  }
  for (auto _ : state) {
    DynamicCache<> cache(options);
    for (std::int64_t i = 0; i < tokens; ++i) {
      auto views = cache.update(key, value, 0);
      benchmark::DoNotOptimize(views);
    }
  }
  state.SetItemsProcessed(state.iterations() * tokens);
  state.SetBytesProcessed(state.iterations() * tokens * step_bytes(dtype));
  state.counters["time_per_token"] = benchmark::Counter(
      static_cast<double>(tokens),
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  // The first allocation counts too: it is what a fresh cache's first update does.
  state.counters["allocations"] = static_cast<double>(allocations);
}

// QuantizedCache (4 bits, group 64, per-channel keys, residual 128) holding seq_len tokens: a
// decode step as the attention module runs it (update_for_attention: the token appended to the
// residual, a block quantized every 64 steps, the blocks handed over as stored: O(new tokens)).
// 4096 steps a run, no crop: a block of 64 tokens is quantized every 64 steps, paid in the average
// (the context grows by 4096 tokens over the run; the step's cost does not depend on it).
// With `dequantize`, update() instead (the path before this change): the whole layer dequantized
// into fresh tensors, O(seq_len); crop() takes the length back every 64 steps (the flushes are
// then mostly not paid: this variant is about the dequantization).
void bm_quantized_cache_update(benchmark::State& state, DType dtype, bool dequantize) {
  const std::int64_t seq_len = state.range(0);
  kvcache::QuantizedCache<> cache({.nbits = 4,
                                   .group_size = 64,
                                   .key_axis = kvcache::QuantAxis::kPerChannel,
                                   .residual_length = 128});
  cache.update(random_tensor(seq_len, dtype, 1), random_tensor(seq_len, dtype, 2), 0);
  const Tensor key = random_tensor(1, dtype, 3);
  const Tensor value = random_tensor(1, dtype, 4);
  std::int64_t step = 0;
  for (auto _ : state) {
    if (dequantize) {
      auto views = cache.update(key, value, 0);
      benchmark::DoNotOptimize(views);
    } else {
      auto views = cache.update_for_attention(key, value, 0);
      benchmark::DoNotOptimize(views);
    }
    if (dequantize && ++step % 64 == 0) cache.crop(seq_len);  // seq_len is a block boundary
  }
  report_per_step(state, dtype);
  state.counters["cache_bytes"] = static_cast<double>(cache.nbytes());
}

// One decode step of one layer's attention (16 query heads over the 4 kv heads, so 4 query rows a
// kv head) at a context of seq_len tokens: Attention::forward stores the token and attends. Over
// a QuantizedCache (bits, group 64, per-channel keys, residual 128) the kernel reads the blocks
// directly; over the other kinds the full-precision keys. Every 64 steps the length is cropped
// back, except for a cache that evicts (Sink, full at its window): it keeps its length by itself,
// so it is never cropped and the positions go on.
constexpr std::int64_t kQueryHeads = 16;

// `dequantize`: the path before the quantized kernel, update()'s dequantized layer then
// cpu::attention (O(seq_len) dequantization and a full-precision copy a step). `sliding_window`:
// the attention's window, for a cache whose layer slides.
void decode_steps(benchmark::State& state, kvcache::Cache<kvcache::cpu::Backend>& cache,
                  DType dtype, std::int64_t seq_len, bool dequantize = false,
                  std::optional<std::int64_t> sliding_window = std::nullopt) {
  const kvcache::Attention attn(0, {.num_heads = kQueryHeads,
                                    .num_kv_heads = kKvHeads,
                                    .head_dim = kHeadDim,
                                    .sliding_window = sliding_window});
  cache.update_for_attention(random_tensor(seq_len, dtype, 1), random_tensor(seq_len, dtype, 2), 0);
  Tensor query = Tensor::empty({kBatch, kQueryHeads, 1, kHeadDim}, DType::kFloat32);
  {
    std::mt19937 rng(5);
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    for (std::int64_t i = 0; i < query.numel(); ++i) query.data_as<float>()[i] = dist(rng);
    query = kvcache::cpu::cast(query, dtype);
  }
  const Tensor key = random_tensor(1, dtype, 3);
  const Tensor value = random_tensor(1, dtype, 4);
  // One step untimed: a DynamicCache's first append past its prefill regrows (and faults in) the
  // whole layer, which is not what a steady decode step costs.
  attn.forward(query, key, value, cache, Tensor(), std::vector<std::int64_t>{seq_len});
  const bool crop = !cache.evicts_tokens();
  std::int64_t next = seq_len + 1;  // the next token's cache slot
  if (crop) {
    cache.crop(seq_len);
    next = seq_len;
  }
  for (auto _ : state) {
    const std::vector<std::int64_t> pos = {next};
    if (dequantize) {
      Tensor out = Tensor::empty({kBatch, 1, kQueryHeads, kHeadDim}, dtype);
      auto [k, v] = cache.update(key, value, 0);
      kvcache::cpu::attention(query, k, v, Tensor(), pos, 0, attn.scale(), out);
      benchmark::DoNotOptimize(out.data());
    } else {
      Tensor out = attn.forward(query, key, value, cache, Tensor(), pos);
      benchmark::DoNotOptimize(out.data());
    }
    if (++next == seq_len + 64 && crop) {
      cache.crop(seq_len);
      next = seq_len;
    }
  }
  report_per_step(state, dtype);
  state.counters["cache_bytes"] = static_cast<double>(cache.nbytes());
}

void bm_quantized_decode_step(benchmark::State& state, bool dequantize) {
  kvcache::QuantizedCache<> cache({.nbits = static_cast<int>(state.range(0)),
                                   .group_size = 64,
                                   .key_axis = kvcache::QuantAxis::kPerChannel,
                                   .residual_length = 128});
  decode_steps(state, cache, DType::kFloat32, state.range(1), dequantize);
}

void bm_decode_step(benchmark::State& state, DType dtype, Kind kind) {
  const std::int64_t seq_len = state.range(0);
  const auto cache = make_cache(kind, seq_len);
  decode_steps(state, *cache, dtype, seq_len, false,
               kind == Kind::kSliding ? std::optional(kSlidingWindow) : std::nullopt);
}

// The per-kind families: BM_<Kind>CacheUpdate and BM_<Kind>DecodeStep.
struct KindFamilies {
  Kind kind;
  const char* update;
  const char* decode;
};
constexpr KindFamilies kKinds[] = {
    {Kind::kDynamic, "BM_DynamicCacheUpdate", "BM_DynamicDecodeStep"},
    {Kind::kStatic, "BM_StaticCacheUpdate", "BM_StaticDecodeStep"},
    {Kind::kSliding, "BM_SlidingCacheUpdate", "BM_SlidingDecodeStep"},
    {Kind::kSink, "BM_SinkCacheUpdate", "BM_SinkDecodeStep"},
};

// "<family>/<dtype>", running fn(state, dtype, args...).
template <class Fn, class... Args>
benchmark::internal::Benchmark* register_family(const char* family, DType dtype, Fn fn,
                                                Args... args) {
  return benchmark::RegisterBenchmark(kvcache::bench::family_name(family, dtype).c_str(), fn, dtype,
                                      args...);
}

void register_benchmarks() {
  for (const KindFamilies& k : kKinds) {
    const bool sink = k.kind == Kind::kSink;  // O(window) a step: fewer lengths, in µs
    for (DType dtype : kDTypes) {
      register_family(k.update, dtype, bm_cache_update, k.kind)
          ->RangeMultiplier(sink ? 4 : 2)
          ->Range(kFlatShort, kFlatLong)
          ->Unit(sink ? benchmark::kMicrosecond : benchmark::kNanosecond);
    }
  }
  for (DType dtype : kDTypes) {
    for (bool dequantize : {false, true}) {
      register_family(dequantize ? "BM_QuantizedCacheUpdateDequantized" : "BM_QuantizedCacheUpdate",
                      dtype, bm_quantized_cache_update, dequantize)
          ->RangeMultiplier(4)
          ->Range(kFlatShort, kFlatLong)
          ->Iterations(dequantize ? 64 : 4096)
          ->Unit(benchmark::kMicrosecond);
    }
  }
  for (bool dequantize : {false, true}) {
    benchmark::RegisterBenchmark(
        dequantize ? "BM_QuantizedDecodeStepDequantized/float32" : "BM_QuantizedDecodeStep/float32",
        bm_quantized_decode_step, dequantize)
        ->ArgsProduct({{8, 4, 2}, {128, 512, 2048, 8192}})
        ->Unit(benchmark::kMicrosecond)
        ->UseRealTime();
  }
  // The decode step of every kind: both dtypes for Dynamic, float32 for the others.
  for (const KindFamilies& k : kKinds) {
    for (DType dtype : kDTypes) {
      if (k.kind != Kind::kDynamic && dtype != DType::kFloat32) continue;
      register_family(k.decode, dtype, bm_decode_step, k.kind)
          ->RangeMultiplier(4)
          ->Range(kFlatShort, kFlatLong)
          ->Unit(benchmark::kMicrosecond)
          ->UseRealTime();
    }
  }
  for (DType dtype : kDTypes) {
    register_family("BM_NaiveConcatUpdate", dtype, bm_naive_concat_update)
        ->RangeMultiplier(2)
        ->Range(kFlatShort, kFlatLong)
        ->Unit(benchmark::kMicrosecond);
  }
  for (DType dtype : kDTypes) {
    for (bool reserve : {false, true}) {
      const char* family =
          reserve ? "BM_DynamicCacheGenerationReserved" : "BM_DynamicCacheGeneration";
      register_family(family, dtype, bm_dynamic_cache_generation, reserve)
          ->Arg(1024)
          ->Arg(8192)
          ->Unit(benchmark::kMicrosecond);
    }
  }
}

using kvcache::bench::CollectingReporter;

// The ratio is judged on CPU time: these benchmarks are single-threaded, and on a small shared VM
// CPU time is what the code costs while real time also counts whoever else had the core.
void print_flatness(const CollectingReporter& reporter) {
  std::printf("\nFlatness: per-step time at %lld tokens / at %lld tokens (target <= %.1fx)\n",
              static_cast<long long>(kFlatLong), static_cast<long long>(kFlatShort), kFlatTarget);
  for (DType dtype : kDTypes) {
    const std::string dtype_name(kvcache::dtype_name(dtype));
    for (const char* family : {"BM_DynamicCacheUpdate", "BM_NaiveConcatUpdate"}) {
      const std::string prefix = std::string(family) + "/" + dtype_name + "/";
      const auto short_run = reporter.result(prefix + std::to_string(kFlatShort));
      const auto long_run = reporter.result(prefix + std::to_string(kFlatLong));
      if (short_run.cpu_ns <= 0 || long_run.cpu_ns <= 0) continue;
      const double cpu_ratio = long_run.cpu_ns / short_run.cpu_ns;
      const bool judged = std::string_view(family) == "BM_DynamicCacheUpdate";
      std::printf("  %s%s: %.2fx cpu (%.2fx real)%s\n", prefix.c_str(),
                  std::to_string(kFlatLong).c_str(), cpu_ratio,
                  long_run.real_ns / short_run.real_ns,
                  !judged                    ? "  (reference, no target)"
                  : cpu_ratio <= kFlatTarget ? "  within target"
                                             : "  MISSES target");
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  return kvcache::bench::run_main(argc, argv, register_benchmarks, print_flatness);
}
