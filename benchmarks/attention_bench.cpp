// CPU attention against the memory it has to read. A decode step of one layer reads every cached
// key and value once, so at long lengths it is bound by memory bandwidth, and the honest yardstick
// is what a plain streaming read achieves on the same machine with the same threads. This program
// measures that read (BM_StreamingRead, plus smaller sizes to show where the last-level cache
// ends), then one decode step of kvcache::Attention over a DynamicCache at fixed lengths,
// reporting K+V bytes/s and their ratio to the streaming read (target: >= 0.70 from 4096 tokens),
// once for a single layer read over and over (BM_AttentionDecodeCpu, the target's setting) and
// once cycling through enough layers that K+V comes from DRAM (BM_AttentionDecodeColdCpu, what a
// model sees), and a one-shot prefill in tokens/s for later comparison.
//
// Model shape (a Llama-3-8B-like layer): 32 query heads, 8 kv heads, head_dim 128, float32,
// batch 1.
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "bench_util.hpp"
#include "kvcache/kvcache.hpp"

namespace {

using kvcache::DType;
using kvcache::Tensor;

constexpr std::int64_t kNumHeads = 32;
constexpr std::int64_t kNumKvHeads = 8;
constexpr std::int64_t kHeadDim = 128;
constexpr std::int64_t kDecodeLengths[] = {512, 1024, 2048, 4096, 8192, 16384};
constexpr std::int64_t kPrefillLengths[] = {128, 512};
constexpr std::int64_t kTargetFrom = 4096;  // the bandwidth target applies from this length on
constexpr double kTargetRatio = 0.70;
// K+V the cold decode benchmark spreads over its layers: several times the last-level cache.
constexpr double kColdBytes = 512.0 * (1 << 20);

// --- streaming read ------------------------------------------------------------------------

// BM_StreamingRead (the yardstick) and its calibration live in bench_util.hpp; only the sized
// reads are this program's own.

constexpr std::int64_t kSizedReadMiB[] = {32, 64, 128, 256};

using kvcache::bench::make_stream_buffer;
using kvcache::bench::stream_pass_seconds;
using kvcache::bench::streaming_bytes_per_second;

// The same read over smaller buffers, to show where the last-level cache ends: the single-layer
// decode benchmark below reads 4 to 134 MB per step, and which side of that line it falls on
// decides what bandwidth it can reach. Informational; the ratios never use it.
void bm_streaming_read_size(benchmark::State& state) {
  const std::int64_t mib = state.range(0);
  const Tensor buffer = make_stream_buffer(mib * (1 << 20) / 4);
  stream_pass_seconds(buffer);
  for (auto _ : state) state.SetIterationTime(stream_pass_seconds(buffer));
  state.SetBytesProcessed(state.iterations() * mib * (1 << 20));
}

// --- attention -------------------------------------------------------------------------------

// Uniform [-1, 1) float32 [batch 1, heads, seq_len, head_dim]: softmax over random scores does the
// same work as over a real model's, and zeros would let nothing go wrong unseen.
Tensor random_states(std::int64_t heads, std::int64_t seq_len, std::uint32_t seed) {
  Tensor t = Tensor::empty({1, heads, seq_len, kHeadDim}, DType::kFloat32);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  float* data = t.data_as<float>();  // [1, heads, seq_len, head_dim], contiguous
  for (std::int64_t i = 0; i < t.numel(); ++i) data[i] = dist(rng);
  return t;
}

kvcache::Attention make_attention(int layer_idx) {
  return kvcache::Attention(
      layer_idx, {.num_heads = kNumHeads, .num_kv_heads = kNumKvHeads, .head_dim = kHeadDim});
}

// Bytes of keys and values one decode step reads at a cache of seq_len tokens (plus the new one).
double decode_kv_bytes(std::int64_t seq_len) {
  return 2.0 * kNumKvHeads * static_cast<double>(seq_len + 1) * kHeadDim * 4.0;
}

// Runs decode steps on `attention` (one module per layer, layers used in turn) over `cache`, whose
// layers each hold seq_len tokens, and reports K+V bytes/s and their ratio to the streaming read.
void run_decode_steps(benchmark::State& state, const std::vector<kvcache::Attention>& attention,
                      kvcache::DynamicCache<>& cache, std::int64_t seq_len) {
  const double stream = streaming_bytes_per_second();
  const Tensor query = random_states(kNumHeads, 1, 3);  // [1, 32, 1, 128]
  const Tensor key = random_states(kNumKvHeads, 1, 4);  // [1, 8, 1, 128]
  const Tensor value = random_states(kNumKvHeads, 1, 5);
  const Tensor mask = kvcache::ones_mask(1, seq_len + 1);  // [1, past + 1]: no padding
  const std::vector<std::int64_t> position = kvcache::make_cache_position(seq_len, 1);
  // The prefill leaves capacity == seq_len, so each layer's first step regrows; pay it untimed.
  for (const kvcache::Attention& layer : attention) {
    layer.forward(query, key, value, cache, mask, position);
    cache.crop(seq_len);
  }
  std::size_t next = 0;
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    Tensor out = attention[next].forward(query, key, value, cache, mask, position);
    benchmark::DoNotOptimize(out.data());
    cache.crop(seq_len);  // back to seq_len tokens so every step reads the same amount
    next = next + 1 == attention.size() ? 0 : next + 1;
  }
  // Timed here rather than with a rate counter so the ratio prints as a plain number; the loop's
  // own overhead is microseconds against the benchmark's minimum time.
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double bytes = decode_kv_bytes(seq_len);
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(bytes));
  state.counters["bw_ratio"] = bytes * static_cast<double>(state.iterations()) / seconds / stream;
}

// One layer, read over and over: what the target is stated on. Up to about 8192 tokens the
// layer's K+V (<= 67 MB) largely stays in the last-level cache between steps, which a real model
// with dozens of layers would not allow; BM_AttentionDecodeColdCpu measures that case.
void bm_attention_decode_cpu(benchmark::State& state) {
  const std::int64_t seq_len = state.range(0);
  const std::vector<kvcache::Attention> attention{make_attention(0)};
  kvcache::DynamicCache<> cache;
  cache.update(random_states(kNumKvHeads, seq_len, 1), random_states(kNumKvHeads, seq_len, 2), 0);
  run_decode_steps(state, attention, cache, seq_len);
}

// As above, but steps cycle through enough layers that together they hold at least
// kColdBytes of K+V, so each step finds its layer evicted and reads it from DRAM, as in a model.
void bm_attention_decode_cold_cpu(benchmark::State& state) {
  const std::int64_t seq_len = state.range(0);
  const auto layers =
      static_cast<int>(std::max(2.0, std::ceil(kColdBytes / decode_kv_bytes(seq_len))));
  std::vector<kvcache::Attention> attention;
  for (int layer = 0; layer < layers; ++layer) attention.push_back(make_attention(layer));
  kvcache::DynamicCache<> cache;
  const Tensor past_keys = random_states(kNumKvHeads, seq_len, 1);
  const Tensor past_values = random_states(kNumKvHeads, seq_len, 2);
  for (int layer = 0; layer < layers; ++layer) cache.update(past_keys, past_values, layer);
  run_decode_steps(state, attention, cache, seq_len);
  state.counters["layers"] = layers;
}

void bm_attention_prefill_cpu(benchmark::State& state) {
  const std::int64_t q_len = state.range(0);
  const kvcache::Attention attention = make_attention(0);
  kvcache::DynamicCache<> cache;
  const Tensor query = random_states(kNumHeads, q_len, 1);  // [1, 32, q_len, 128]
  const Tensor key = random_states(kNumKvHeads, q_len, 2);  // [1, 8, q_len, 128]
  const Tensor value = random_states(kNumKvHeads, q_len, 3);
  const Tensor mask = kvcache::ones_mask(1, q_len);
  const std::vector<std::int64_t> position = kvcache::make_cache_position(0, q_len);
  for (auto _ : state) {
    Tensor out = attention.forward(query, key, value, cache, mask, position);
    benchmark::DoNotOptimize(out.data());
    cache.reset();  // empty again, memory kept: every iteration is a first prompt
  }
  state.counters["tokens_per_s"] =
      benchmark::Counter(static_cast<double>(q_len), benchmark::Counter::kIsIterationInvariantRate);
}

void register_benchmarks() {
  // Registered first so it runs first and the decode ratios divide by this run's figure.
  kvcache::bench::register_streaming_read();
  auto* sized = benchmark::RegisterBenchmark("BM_StreamingReadSize", bm_streaming_read_size);
  for (std::int64_t mib : kSizedReadMiB) sized->Arg(mib);
  sized->UseManualTime()->Unit(benchmark::kMillisecond);
  auto* decode = benchmark::RegisterBenchmark("BM_AttentionDecodeCpu", bm_attention_decode_cpu);
  for (std::int64_t seq_len : kDecodeLengths) decode->Arg(seq_len);
  decode->UseRealTime()->Unit(benchmark::kMicrosecond);
  auto* cold =
      benchmark::RegisterBenchmark("BM_AttentionDecodeColdCpu", bm_attention_decode_cold_cpu);
  for (std::int64_t seq_len : kDecodeLengths) cold->Arg(seq_len);
  cold->UseRealTime()->Unit(benchmark::kMicrosecond);
  auto* prefill = benchmark::RegisterBenchmark("BM_AttentionPrefillCpu", bm_attention_prefill_cpu);
  for (std::int64_t q_len : kPrefillLengths) prefill->Arg(q_len);
  prefill->UseRealTime()->Unit(benchmark::kMillisecond);
}

using kvcache::bench::CollectingReporter;

void print_summary(const CollectingReporter& reporter) {
  std::printf("\n");
  kvcache::bench::print_streaming_read();
  for (const char* family : {"BM_AttentionDecodeCpu", "BM_AttentionDecodeColdCpu"}) {
    bool header = false;
    for (std::int64_t seq_len : kDecodeLengths) {
      const std::string name = std::string(family) + "/" + std::to_string(seq_len);
      const double ratio = reporter.counter(name, "bw_ratio");
      const double bytes_per_second = reporter.counter(name, "bytes_per_second");
      if (ratio < 0) continue;
      if (!header) {
        std::printf("%s: K+V GB/s and ratio to the streaming read (target >= %.2f from %lld):\n",
                    family, kTargetRatio, static_cast<long long>(kTargetFrom));
        header = true;
      }
      const char* verdict = seq_len < kTargetFrom   ? "(no target)"
                            : ratio >= kTargetRatio ? "meets target"
                                                    : "MISSES target";
      std::printf("  %6lld tokens: %6.1f GB/s  ratio %.2f  %s\n", static_cast<long long>(seq_len),
                  bytes_per_second * 1e-9, ratio, verdict);
    }
  }
  for (std::int64_t q_len : kPrefillLengths) {
    const double tokens =
        reporter.counter("BM_AttentionPrefillCpu/" + std::to_string(q_len), "tokens_per_s");
    if (tokens >= 0) {
      std::printf("BM_AttentionPrefillCpu/%lld: %.0f tokens/s\n", static_cast<long long>(q_len),
                  tokens);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  return kvcache::bench::run_main(argc, argv, register_benchmarks, print_summary);
}
