// SinkCache against naive references: which tokens it holds (a list of token ids kept by the
// StreamingLLM rule), their keys equal to the un-rotated keys rotated in float64 at their new
// positions (their index in the cache), the sinks bit-for-bit unchanged, flat memory over 10x the
// window, get_seq_length / get_mask_sizes / rope_position_start as documented, errors that leave
// the cache unchanged, and generate() running far past the window (equal to the DynamicCache's
// tokens while the window has not filled).
#include "kvcache/cache/sink_cache.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "cache/negative_crop.hpp"
#include "kvcache/attention/rope.hpp"
#include "kvcache/backend/cpu.hpp"
#include "kvcache/cache/dynamic_cache.hpp"
#include "kvcache/generation/generate.hpp"
#include "test_util.hpp"

namespace kvcache {
namespace {

using testing::random_tensor;

constexpr std::int64_t kBatch = 2, kHeads = 2, kDim = 8;

// u rotated to `pos` in float64: rotate_half pairs (i, i + d/2), angle pos * inv_freq[i].
std::vector<double> rotate(const std::vector<double>& u, double pos, const std::vector<float>& f) {
  const std::size_t half = u.size() / 2;
  std::vector<double> out(u.size());
  for (std::size_t i = 0; i < half; ++i) {
    const double a = pos * static_cast<double>(f[i]);
    out[i] = u[i] * std::cos(a) - u[i + half] * std::sin(a);
    out[i + half] = u[i + half] * std::cos(a) + u[i] * std::sin(a);
  }
  return out;
}

struct Fixture {
  std::int64_t window, sinks;
  std::vector<float> inv_freq = RotaryEmbedding(RopeOptions{.head_dim = kDim}).inv_freq();
  std::mt19937 rng{7};
  // raw[t][b][h] = token t's un-rotated key of row b, head h (float64 of float32 draws).
  std::vector<std::vector<std::vector<double>>> raw;
  std::vector<std::int64_t> held;  // reference: token ids in cache order
  SinkCache<> cache;

  Fixture(std::int64_t w, std::int64_t s)
      : window(w),
        sinks(s),
        cache(SinkCacheOptions{.window_length = w, .num_sink_tokens = s, .rope_inv_freq = {}}) {
    cache = SinkCache<>(
        SinkCacheOptions{.window_length = w, .num_sink_tokens = s, .rope_inv_freq = inv_freq});
  }

  // One step of q tokens; returns the keys update() gave.
  std::pair<Tensor, Tensor> step(std::int64_t q) {
    const std::int64_t start = *cache.rope_position_start(q);
    Tensor k = Tensor::empty({kBatch, kHeads, q, kDim}, DType::kFloat32);
    const Tensor v = random_tensor({kBatch, kHeads, q, kDim}, DType::kFloat32, rng);
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    for (std::int64_t i = 0; i < q; ++i) {
      std::vector<std::vector<double>> tok(kBatch * kHeads, std::vector<double>(kDim));
      for (std::int64_t bh = 0; bh < kBatch * kHeads; ++bh) {
        for (auto& x : tok[static_cast<std::size_t>(bh)]) x = dist(rng);
        const auto r =
            rotate(tok[static_cast<std::size_t>(bh)], static_cast<double>(start + i), inv_freq);
        for (std::int64_t c = 0; c < kDim; ++c)
          k.data_as<float>()[(bh * q + i) * kDim + c] = static_cast<float>(r[c]);
      }
      raw.push_back(tok);
    }
    // The reference rule: evict then attend while the step fits window - sinks, else attend
    // over all and keep sinks + the last window - sinks.
    const auto n = static_cast<std::int64_t>(held.size());
    const std::int64_t first = static_cast<std::int64_t>(raw.size()) - q;
    if (n + q > window && q <= window - sinks) {
      held.erase(held.begin() + sinks, held.begin() + sinks + (n + q - window));
    }
    for (std::int64_t i = 0; i < q; ++i) held.push_back(first + i);
    auto out = cache.update(k, v, 0);
    if (static_cast<std::int64_t>(held.size()) > window) {
      std::vector<std::int64_t> kept(held.begin(), held.begin() + sinks);
      kept.insert(kept.end(), held.end() - (window - sinks), held.end());
      held = kept;
    }
    return out;
  }

  // Max abs difference between the stored keys and the fresh keys at their cache positions.
  double key_error() const {
    const auto [keys, values] = cache.storage(0);
    double worst = 0;
    for (std::size_t j = 0; j < held.size(); ++j)
      for (std::int64_t bh = 0; bh < kBatch * kHeads; ++bh) {
        const auto want =
            rotate(raw[static_cast<std::size_t>(held[j])][static_cast<std::size_t>(bh)],
                   static_cast<double>(j), inv_freq);
        for (std::int64_t c = 0; c < kDim; ++c) {
          const double got =
              keys.data_as<float>()[(bh * window + static_cast<std::int64_t>(j)) * kDim + c];
          worst = std::max(worst, std::abs(got - want[static_cast<std::size_t>(c)]));
        }
      }
    return worst;
  }
};

TEST(SinkCache, KeptKeysEqualFreshKeysAtTheirNewPositions) {
  for (const auto& [window, sinks] :
       {std::pair<std::int64_t, std::int64_t>{16, 4}, {9, 0}, {12, 1}}) {
    Fixture f(window, sinks);
    const std::int64_t pattern[] = {5, 1, 1, 3, 1, 7, 1, 2, 1, 1, 4, 1, 20, 1, 1, 9, 1};
    double worst = 0;
    std::vector<float> sink_bits;
    for (int round = 0; round < 12; ++round)
      for (std::int64_t q : pattern) {
        const std::int64_t seen_before = f.cache.get_seq_length();
        const std::int64_t pos[64] = {};
        const MaskSizes sizes = f.cache.get_mask_sizes(
            std::span<const std::int64_t>(pos, static_cast<std::size_t>(q)), 0);
        const auto [k, v] = f.step(q);
        // get_mask_sizes said what update returned; the new tokens sit at their slots.
        EXPECT_EQ(k.size(2), sizes.kv_length);
        EXPECT_EQ(sizes.kv_offset + sizes.kv_length, seen_before + q);
        EXPECT_EQ(f.cache.get_seq_length(), seen_before + q);
        EXPECT_EQ(f.cache.stored_length(), std::min<std::int64_t>(seen_before + q, window));
        ASSERT_EQ(f.cache.stored_length(), static_cast<std::int64_t>(f.held.size()));
        worst = std::max(worst, f.key_error());
        // The sinks never change once the cache holds them.
        if (sinks > 0 && f.cache.stored_length() >= sinks) {
          const Tensor keys = f.cache.storage(0).first;
          std::vector<float> now;
          for (std::int64_t bh = 0; bh < kBatch * kHeads; ++bh)
            for (std::int64_t j = 0; j < sinks * kDim; ++j)
              now.push_back(keys.data_as<float>()[bh * window * kDim + j]);
          if (sink_bits.empty()) sink_bits = now;
          EXPECT_EQ(0, std::memcmp(now.data(), sink_bits.data(), now.size() * sizeof(float)));
        }
      }
    std::printf("window %lld sinks %lld: max abs key error vs float64 re-rotation %.3g\n",
                static_cast<long long>(window), static_cast<long long>(sinks), worst);
    EXPECT_LT(worst, 2e-5);
  }
}

TEST(SinkCache, MemoryStaysFlatOverTenWindows) {
  Fixture f(32, 4);
  f.step(10);
  std::size_t full_capacity = 0, full_bytes = 0;
  for (std::int64_t t = 10; t < 320; ++t) {
    f.step(1);
    if (t == 40) {
      full_capacity = f.cache.capacity_bytes();
      full_bytes = f.cache.nbytes();
    }
    if (t > 40) {
      EXPECT_EQ(f.cache.capacity_bytes(), full_capacity);
      EXPECT_EQ(f.cache.nbytes(), full_bytes);
    }
  }
  EXPECT_EQ(full_capacity, static_cast<std::size_t>(2 * kBatch * kHeads * 32 * kDim * 4));
  EXPECT_EQ(f.cache.get_seq_length(), 320);
  EXPECT_EQ(f.cache.stored_length(), 32);
  EXPECT_LT(f.key_error(), 2e-5);
}

TEST(SinkCache, PositionsAndMaskSizes) {
  SinkCache<> cache(SinkCacheOptions{.window_length = 8, .num_sink_tokens = 2});
  std::mt19937 rng(3);
  auto feed = [&](std::int64_t q) {
    cache.update(random_tensor({1, 1, q, 4}, DType::kFloat32, rng),
                 random_tensor({1, 1, q, 4}, DType::kFloat32, rng), 0);
  };
  const std::vector<std::int64_t> one(1), three(3), seven(7);
  EXPECT_EQ(*cache.rope_position_start(3), 0);
  feed(3);  // append: stored 3
  EXPECT_EQ(*cache.rope_position_start(1), 3);
  EXPECT_EQ(cache.get_mask_sizes(one, 0).kv_length, 4);
  EXPECT_EQ(cache.get_mask_sizes(one, 0).kv_offset, 0);
  feed(5);  // fills: stored 8
  // A decode step evicts one: the query sits at window - 1 and sees the window.
  EXPECT_EQ(*cache.rope_position_start(1), 7);
  EXPECT_EQ(cache.get_mask_sizes(one, 0).kv_length, 8);
  EXPECT_EQ(cache.get_mask_sizes(one, 0).kv_offset, 1);
  EXPECT_EQ(*cache.rope_position_start(3), 5);
  // A step longer than window - sinks attends over everything stored and new.
  EXPECT_EQ(*cache.rope_position_start(7), 8);
  EXPECT_EQ(cache.get_mask_sizes(seven, 0).kv_length, 15);
  EXPECT_EQ(cache.get_mask_sizes(seven, 0).kv_offset, 0);
  feed(1);
  EXPECT_EQ(cache.get_seq_length(), 9);
  EXPECT_EQ(cache.stored_length(), 8);
  EXPECT_EQ(cache.get_max_cache_shape(), -1);
  EXPECT_TRUE(cache.evicts_tokens());
}

TEST(SinkCache, ErrorsLeaveTheCacheUnchanged) {
  EXPECT_THROW(SinkCache<>(SinkCacheOptions{.window_length = 0, .num_sink_tokens = 0}), Error);
  EXPECT_THROW(SinkCache<>(SinkCacheOptions{.window_length = 4, .num_sink_tokens = 4}), Error);
  EXPECT_THROW(SinkCache<>(SinkCacheOptions{.window_length = 4, .num_sink_tokens = -1}), Error);
  Fixture f(10, 2);
  for (int i = 0; i < 4; ++i) f.step(4);  // evicted: seen 16, stored 10
  const Tensor before = cpu::clone(f.cache.storage(0).first);
  auto unchanged = [&] {
    EXPECT_EQ(f.cache.get_seq_length(), 16);
    EXPECT_EQ(f.cache.stored_length(), 10);
    EXPECT_EQ(0, std::memcmp(before.data(), f.cache.storage(0).first.data(), before.nbytes()));
  };
  std::mt19937 rng(5);
  const Tensor wrong_batch = random_tensor({3, kHeads, 1, kDim}, DType::kFloat32, rng);
  EXPECT_THROW(f.cache.update(wrong_batch, wrong_batch, 0), Error);
  unchanged();
  const Tensor wrong_dim = random_tensor({kBatch, kHeads, 1, 6}, DType::kFloat32, rng);
  EXPECT_THROW(f.cache.update(wrong_dim, wrong_dim, 0), Error);
  unchanged();
  EXPECT_THROW(f.cache.update(wrong_dim, wrong_dim, 2), Error);
  unchanged();
  EXPECT_THROW(f.cache.crop(5), Error);  // slot 5 was evicted
  unchanged();
  EXPECT_THROW(f.cache.reorder_cache({0, 2}), Error);
  unchanged();
  // Crops that work: the last held recent tokens, or back to the sinks.
  SinkCache<> copy = f.cache.clone();
  f.cache.crop(-3);
  EXPECT_EQ(f.cache.get_seq_length(), 13);
  EXPECT_EQ(f.cache.stored_length(), 7);
  copy.crop(2);
  EXPECT_EQ(copy.get_seq_length(), 2);
  EXPECT_EQ(copy.stored_length(), 2);
  copy.reset();
  EXPECT_EQ(copy.get_seq_length(), 0);
  EXPECT_EQ(f.cache.get_seq_length(), 13);  // the clone is independent
}

// Extreme arguments (issue #10): crop of any int64 (INT64_MIN is not negated) and repeat counts
// whose batch overflows int64 or cannot be allocated end in a kvcache::Error naming the call, and
// the cache's lengths, keys and values are as they were; crop(INT64_MAX) keeps everything.
// An empty cache holds 0 tokens: dropping any is an error, as in a DynamicCache (fuzz_cache found
// crop(INT64_MIN) of a SinkCache with no layer accepted).
TEST(SinkCache, CropOfACacheWithNoLayerChecksItsArgument) {
  SinkCache<> cache(SinkCacheOptions{.window_length = 8, .num_sink_tokens = 2});
  EXPECT_KVCACHE_ERROR(cache.crop(std::numeric_limits<std::int64_t>::min()),
                       "SinkCache::crop(-9223372036854775808): expected to drop at most 0 tokens");
  EXPECT_KVCACHE_ERROR(cache.crop(-1), "expected to drop at most 0 tokens");
  cache.crop(0);
  cache.crop(5);
  EXPECT_EQ(cache.num_layers(), 0);
}

// A negative crop drops from get_seq_length() (layer 0) and crops every layer to that one target,
// as DynamicCache and transformers do; it used to drop |n| from each layer's own length.
TEST(SinkCache, NegativeCropTakesOneTargetForEveryLayer) {
  SinkCache<> cache(SinkCacheOptions{.window_length = 8, .num_sink_tokens = 2});
  testing::expect_negative_crop_takes_one_target(cache, kBatch, kHeads, kDim);
}

TEST(SinkCache, ExtremeArgumentsAreErrorsAndLeaveTheCacheUnchanged) {
  constexpr std::int64_t kMin = std::numeric_limits<std::int64_t>::min();
  constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
  Fixture f(10, 2);
  for (int i = 0; i < 4; ++i) f.step(4);  // evicted: seen 16, stored 10
  const Tensor keys = cpu::clone(f.cache.storage(0).first);
  const Tensor values = cpu::clone(f.cache.storage(0).second);
  auto unchanged = [&] {
    EXPECT_EQ(f.cache.get_seq_length(), 16);
    EXPECT_EQ(f.cache.stored_length(), 10);
    EXPECT_EQ(f.cache.batch_size(), kBatch);
    const auto [k, v] = f.cache.storage(0);
    ASSERT_EQ(k.nbytes(), keys.nbytes());
    EXPECT_EQ(0, std::memcmp(keys.data(), k.data(), keys.nbytes()));
    EXPECT_EQ(0, std::memcmp(values.data(), v.data(), values.nbytes()));
  };
  EXPECT_KVCACHE_ERROR(f.cache.crop(kMin),
                       "SinkCache::crop(-9223372036854775808): expected to drop at most 16 tokens "
                       "(the cache length), got 9223372036854775808");
  unchanged();
  EXPECT_KVCACHE_ERROR(f.cache.crop(kMin + 1), "got 9223372036854775807");
  unchanged();
  EXPECT_KVCACHE_ERROR(f.cache.crop(-17), "expected to drop at most 16 tokens");
  unchanged();
  f.cache.crop(kMax);  // past the length: nothing to drop
  unchanged();
  f.cache.crop(16);
  unchanged();
  // 2 rows x 2^62 and x INT64_MAX overflow int64 (2^62 used to wrap to batch 0).
  EXPECT_KVCACHE_ERROR(f.cache.batch_repeat_interleave(std::int64_t{1} << 62),
                       "SinkCache::batch_repeat_interleave: the new batch of 2 x "
                       "4611686018427387904 does not fit in 64 bits");
  unchanged();
  EXPECT_KVCACHE_ERROR(f.cache.batch_repeat_interleave(kMax), "does not fit in 64 bits");
  unchanged();
  // 2^41 rows fit in int64 but not in memory: a kvcache::Error before anything is allocated.
  EXPECT_KVCACHE_ERROR(f.cache.batch_repeat_interleave(std::int64_t{1} << 40),
                       "SinkCache::batch_repeat_interleave: out of memory");
  unchanged();
  EXPECT_KVCACHE_ERROR(f.cache.batch_repeat_interleave(0), "expected repeats >= 1, got 0");
  EXPECT_KVCACHE_ERROR(f.cache.batch_repeat_interleave(kMin),
                       "expected repeats >= 1, got -9223372036854775808");
  unchanged();
  // The cache still works after the failed calls: the next step is the reference's.
  f.step(1);
  EXPECT_EQ(f.cache.get_seq_length(), 17);
  EXPECT_LT(f.key_error(), 2e-5);
}

TEST(SinkCache, BatchOpsMoveRows) {
  Fixture f(8, 2);
  for (int i = 0; i < 5; ++i) f.step(3);
  const Tensor keys = cpu::clone(f.cache.storage(0).first);
  f.cache.reorder_cache({1, 0});
  const Tensor swapped = f.cache.storage(0).first;
  const std::size_t row = keys.nbytes() / 2;
  EXPECT_EQ(0, std::memcmp(swapped.data(), static_cast<char*>(keys.data()) + row, row));
  f.cache.batch_select_indices({1});
  EXPECT_EQ(f.cache.batch_size(), 1);
  EXPECT_EQ(0, std::memcmp(f.cache.storage(0).first.data(), keys.data(), row));
  f.cache.batch_repeat_interleave(3);
  EXPECT_EQ(f.cache.batch_size(), 3);
}

TEST(SinkCache, GenerateRunsFarPastTheWindow) {
  const ModelConfig c = testing::tiny_llama_config();
  const LlamaModel model = LlamaModel::from_weights(c, random_llama_weights(c, 11));
  Tensor ids = Tensor::empty({1, 6}, DType::kInt64);
  for (std::int64_t i = 0; i < 6; ++i) ids.data_as<std::int64_t>()[i] = 3 + 7 * i;
  GenerationConfig config{.max_new_tokens = 10};
  const GenerateResult dynamic = generate(model, ids, Tensor(), config);
  config.cache_implementation = "sink";
  config.cache_config.window_length = 16;
  config.cache_config.num_sink_tokens = 4;
  // While prompt + new tokens fit the window the sink cache is a dynamic cache.
  EXPECT_EQ(generate(model, ids, Tensor(), config).new_tokens, dynamic.new_tokens);
  config.max_new_tokens = 160;  // 10x the window
  const GenerateResult sink = generate(model, ids, Tensor(), config);
  EXPECT_EQ(sink.new_tokens[0].size(), 160u);
  EXPECT_EQ(sink.cache_length, 6 + 159);
  const std::size_t window_bytes =
      2 * 2 * 16 * 16 * 4 * 2;  // k+v, kv heads, window, dim, f32, layers
  EXPECT_EQ(sink.cache_bytes, window_bytes);
  // The hand-written loop through forward() gives the same tokens as generate().
  SinkCache<> cache(SinkCacheOptions{.window_length = 16,
                                     .num_sink_tokens = 4,
                                     .rope_inv_freq = RotaryEmbedding(c.rope).inv_freq()});
  Tensor mask = ones_mask(1, 6);
  std::vector<std::int64_t> pos = make_cache_position(0, 6);
  Tensor step = ids;
  for (std::size_t i = 0; i < 60; ++i) {
    const Tensor logits = model.forward({.input_ids = step,
                                         .attention_mask = mask,
                                         .cache_position = pos,
                                         .past_key_values = &cache,
                                         .logits_to_keep = 1});
    const std::int64_t next = argmax_last(logits)[0];
    ASSERT_EQ(next, sink.new_tokens[0][i]) << "token " << i;
    step = token_column({next});
    mask = extend_attention_mask(mask);
    pos = {pos.back() + 1};
  }
}

}  // namespace
}  // namespace kvcache
